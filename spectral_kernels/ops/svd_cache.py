"""On-disk cache of truncated SVD factors, keyed by a hash of the weight and of the options.

One safetensors file per matrix, ``<cache_dir>/<sha256>.safetensors`` with tensors U, S, V and
metadata {key, sha256 of the factors' bytes}. The key hashes the weight's bytes (every byte: the
sha256 digests of its 16 MB pieces, taken on all cores, so a hit costs ~80 ms per 180 MB on 2
cores rather than the ~150 ms of one sha256 stream), shape and dtype together with every option
that changes the result (k, method, oversample, n_iter, tol and the generator state), so a
changed weight or option is a miss, never a stale hit. Files are written to
a temporary name and renamed, so an interrupted run leaves no half-written entry.

An entry is trusted only after :func:`check_entry`: it must carry U, S and V, name its own key
(not another matrix's), match the weight's shapes and the rank, match its stored checksum, hold
finite values, have singular values non-negative and sorted non-increasing, and satisfy
uᵢᵀ·A·vᵢ ≈ sᵢ (one A·V product, a fraction of the SVD's cost). :func:`load` warns, naming the
file and the failed check, and returns a miss, so the caller recomputes and rewrites the entry.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spectral_kernels._hashing import update_with_bytes, update_with_chunk_digests

#: bump when the algorithm or the entry layout changes
#: v3: entries carry their key and a checksum of the factors; "auto" uses block Krylov for large matrices
#: v4: the weight's bytes enter the key as the digests of 16 MB pieces; wide matrices' Krylov space
#:     on their long side
#: v5: block Krylov steps in bf16 on AMX CPUs (certified in fp32); far-from-unit-norm matrices
#:     scaled first
#: v6: wide matrices on bf16 steps keep their Krylov space on the short side; rank-deficient
#:     matrices finished by the range finder
CACHE_FORMAT = "truncated_svd-v6"

FACTORS = ("U", "S", "V")


def cache_key(A: Tensor, options: dict[str, Any]) -> str:
    """sha256 of A's bytes (as piece digests), shape and dtype and of the sorted options."""
    h = hashlib.sha256()
    h.update(CACHE_FORMAT.encode())
    h.update(repr((tuple(A.shape), str(A.dtype), sorted(options.items()))).encode())
    update_with_chunk_digests(h, A)
    return h.hexdigest()


def factors_checksum(U: Tensor, S: Tensor, V: Tensor) -> str:
    """sha256 of the factors' shapes, dtypes and bytes (stored with an entry, checked on load)."""
    h = hashlib.sha256()
    for t in (U, S, V):
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        update_with_bytes(h, t)
    return h.hexdigest()


def generator_fingerprint(generator: torch.Generator | None) -> str:
    """A hashable stand-in for the generator's state (None: the default seed 0)."""
    if generator is None:
        return "seed0"
    return hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()


def check_entry(key: str, tensors: dict[str, Tensor], metadata: dict[str, str] | None, A: Tensor, k: int) -> str | None:
    """What is wrong with a cache entry for the weight A [..., m, n] at rank k, or None when it
    passes every check of the module docstring."""
    missing = [n for n in FACTORS if n not in tensors]
    if missing:
        return f"has no tensor {', '.join(missing)} (an entry holds U, S and V)"
    metadata = metadata or {}
    if "key" not in metadata or "sha256" not in metadata:
        return "carries no key and checksum (written by an older version, or not by this cache)"
    if metadata["key"] != key:
        return f"holds the factors of another matrix (its key is {metadata['key'][:16]}…)"
    U, S, V = (tensors[n] for n in FACTORS)
    *lead, m, n = A.shape
    want = {"U": (*lead, m, k), "S": (*lead, k), "V": (*lead, n, k)}
    for name, t in zip(FACTORS, (U, S, V)):
        if tuple(t.shape) != want[name]:
            return (f"has {name} of shape {tuple(t.shape)}, expected {want[name]} for a weight of shape "
                    f"{tuple(A.shape)} at k={k}")
    if not (U.dtype == S.dtype == V.dtype) or not U.is_floating_point():
        return f"has factors of dtypes {U.dtype}, {S.dtype}, {V.dtype}; expected one floating dtype"
    if factors_checksum(U, S, V) != metadata["sha256"]:
        return "does not match its checksum (the file was changed or corrupted)"
    if not all(torch.isfinite(t).all() for t in (U, S, V)):
        return "holds NaN or Inf"
    if (S < 0).any() or (S[..., 1:] > S[..., :-1]).any():
        return "has singular values that are negative or not sorted non-increasing"
    rayleigh = (U * (A.detach().to(U.dtype) @ V)).sum(-2)  # uᵢᵀ·A·vᵢ [..., k]
    scale = S.amax(-1, keepdim=True).clamp_min(torch.finfo(S.dtype).tiny)
    tol = 1e4 * torch.finfo(S.dtype).eps  # observed ≲ 1e-6 relative in float32 on every method
    if ((rayleigh - S).abs() / scale > tol).any():
        return "is not consistent with the weight (uᵢᵀ·W·vᵢ differs from sᵢ)"
    return None


def load(cache_dir: str | os.PathLike, key: str, A: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """The factors (U, S, V) of A at rank k on A's device, or None for a miss. An entry that fails
    :func:`check_entry` (or cannot be read) is a miss with a RuntimeWarning naming the file."""
    path = Path(cache_dir) / f"{key}.safetensors"
    try:
        if not path.is_file():
            return None
    except OSError:  # an unreadable directory: a miss
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata()
            tensors = {n: f.get_tensor(n).to(A.device) for n in f.keys()}
    except Exception as exc:
        problem = f"cannot be read ({type(exc).__name__}: {exc})"
    else:
        problem = check_entry(key, tensors, metadata, A, k)
    if problem is not None:
        warnings.warn(f"SVD cache entry {path} {problem}; ignoring it and recomputing the SVD",
                      RuntimeWarning, stacklevel=3)
        return None
    return tuple(tensors[n] for n in FACTORS)


def store(cache_dir: str | os.PathLike, key: str, U: Tensor, S: Tensor, V: Tensor) -> None:
    """Write an entry (atomically: a temporary file renamed). Raises OSError when the directory
    cannot be created or written."""
    from safetensors.torch import save_file

    d = Path(cache_dir)
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    os.close(fd)
    try:
        tensors = {n: t.detach().contiguous().cpu() for n, t in zip(FACTORS, (U, S, V))}
        save_file(tensors, tmp, metadata={"key": key, "sha256": factors_checksum(*tensors.values()),
                                          "format": CACHE_FORMAT})
        os.replace(tmp, d / f"{key}.safetensors")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
