"""Hashing a tensor's bytes: the one way the SVD cache, adapter files and base fingerprints feed a
tensor to hashlib, so equal tensors give equal digests wherever they are taken."""
from __future__ import annotations

import torch
from torch import Tensor


def update_with_bytes(h, t: Tensor) -> None:
    """Feed ``t``'s bytes in C order to the hashlib object ``h`` (the tensor is made contiguous and
    moved to the CPU; the bytes go in as a buffer, not copied into a ``bytes`` object; bfloat16 has
    no numpy dtype, hence the uint8 view)."""
    h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
