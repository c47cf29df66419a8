"""Hashing a tensor's bytes: the one way the SVD cache, adapter files and base fingerprints feed a
tensor to hashlib, so equal tensors give equal digests wherever they are taken."""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from spectral_kernels._threads import shared_pool


def _byte_view(t: Tensor):
    """``t``'s bytes in C order as a uint8 numpy array (made contiguous and moved to the CPU; a
    buffer, not a copy into a ``bytes`` object; bfloat16 has no numpy dtype, hence the uint8 view)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def update_with_bytes(h, t: Tensor) -> None:
    """Feed ``t``'s bytes in C order to the hashlib object ``h``."""
    h.update(_byte_view(t))


#: Bytes per piece of :func:`update_with_chunk_digests`.
DIGEST_CHUNK_BYTES = 1 << 24


def update_with_chunk_digests(h, t: Tensor, workers: int | None = None) -> None:
    """Feed ``h`` the sha256 digests of ``t``'s bytes (C order) cut into DIGEST_CHUNK_BYTES pieces,
    the pieces hashed on ``workers`` threads (default: torch's intra-op thread count; hashlib
    releases the GIL on large buffers). An exact digest of every byte, like update_with_bytes
    but not equal to it, at the speed of all cores: 11008×4096 fp32 (180 MB) in 83 ms on 2 cores,
    153 ms as one sha256 stream."""
    data = _byte_view(t)
    pieces = [data[i:i + DIGEST_CHUNK_BYTES] for i in range(0, data.size, DIGEST_CHUNK_BYTES)]
    workers = torch.get_num_threads() if workers is None else workers
    if workers <= 1 or len(pieces) <= 1:
        digests = [hashlib.sha256(p).digest() for p in pieces]
    else:
        digests = list(shared_pool("sha256", workers).map(lambda p: hashlib.sha256(p).digest(), pieces))
    h.update(len(pieces).to_bytes(8, "little"))
    for d in digests:
        h.update(d)
