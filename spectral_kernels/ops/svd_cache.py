"""On-disk cache of truncated SVD factors, keyed by a hash of the weight and of the options.

One safetensors file per matrix, ``<cache_dir>/<sha256>.safetensors`` with tensors U, S, V. The
key hashes the weight's bytes, shape and dtype together with every option that changes the result
(k, method, oversample, n_iter, tol and the generator state), so a changed weight or option is a
miss, never a stale hit. Files are written to a temporary name and renamed, so an interrupted run
leaves no half-written entry.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

#: bump when the algorithm changes in a way that changes results
CACHE_FORMAT = "truncated_svd-v3"  # v3: "auto" uses block Krylov for large matrices


def cache_key(A: Tensor, options: dict[str, Any]) -> str:
    """sha256 of A's bytes, shape and dtype and of the sorted options."""
    h = hashlib.sha256()
    h.update(CACHE_FORMAT.encode())
    h.update(repr((tuple(A.shape), str(A.dtype), sorted(options.items()))).encode())
    data = A.detach().contiguous().cpu()
    # hash the raw bytes: bfloat16 has no numpy dtype, so view as bytes through uint8
    h.update(data.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of the bytes
    return h.hexdigest()


def generator_fingerprint(generator: torch.Generator | None) -> str:
    """A hashable stand-in for the generator's state (None: the default seed 0)."""
    if generator is None:
        return "seed0"
    return hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()


def load(cache_dir: str | os.PathLike, key: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor] | None:
    path = Path(cache_dir) / f"{key}.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        t = load_file(str(path), device=str(device))
    except Exception:  # an unreadable entry is a miss; it is rewritten below
        return None
    return t["U"], t["S"], t["V"]


def store(cache_dir: str | os.PathLike, key: str, U: Tensor, S: Tensor, V: Tensor) -> None:
    from safetensors.torch import save_file

    d = Path(cache_dir)
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    os.close(fd)
    try:
        tensors = {"U": U.detach().contiguous().cpu(), "S": S.detach().contiguous().cpu(),
                   "V": V.detach().contiguous().cpu()}
        save_file(tensors, tmp)
        os.replace(tmp, d / f"{key}.safetensors")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
