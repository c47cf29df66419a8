"""One working copy of a matrix stack, kept between calls: the truncated SVD's bf16 copy of a float32
input (:mod:`._low_precision`) or float32 copy of a bf16 / fp16 input (:func:`compute_copy`).

    A [B, m, n] (by rows or by columns)  →  a copy in ``dtype``, same layout   (kept_copy, a context)

A fresh buffer of LLM size costs its page faults on every call (90 MB: 15 ms on top of the 14 ms
copy, 2-core Xeon); one buffer, locked, reused while it is large enough, does not. A concurrent
call gets a buffer of its own.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch import Tensor


def stored_by_rows_or_columns(A: Tensor) -> bool:
    """Whether the matrices of A [..., m, n] have contiguous rows or contiguous columns."""
    return A.stride(-1) == 1 or A.stride(-2) == 1


#: Smallest float32 copy (bytes) of a bf16 / fp16 input that :func:`compute_copy` puts in the
#: kept buffer; smaller ones are converted as usual.
MIN_KEPT_COPY_BYTES = 16 << 20

#: The kept buffer's largest size: larger copies get a buffer of their own, freed on return.
#: :func:`release_workspace` frees the kept one.
MAX_KEPT_BYTES = 256 << 20

_kept: Tensor | None = None  # uint8, viewed as the dtype of each use
_kept_lock = threading.Lock()
_release_requested = False


@contextlib.contextmanager
def kept_copy(A: Tensor, dtype: torch.dtype) -> Iterator[Tensor]:
    """A copy of the CPU stack A [B, m, n] in ``dtype``, in A's layout (by rows, or by columns: a
    transposed view then), valid inside the block. It lives in the kept buffer when that is free
    and large enough (or can be made so within MAX_KEPT_BYTES); a concurrent call, a larger copy,
    or an A stored neither by rows nor by columns gets a buffer of its own."""
    global _kept, _release_requested
    by_columns = A.stride(-1) != 1
    rows = A.transpose(-2, -1) if by_columns else A  # the matrices as stored, rows contiguous

    def view(T: Tensor) -> Tensor:
        return T.transpose(-2, -1) if by_columns else T

    nbytes = A.numel() * torch.empty((), dtype=dtype).element_size()
    if (A.device.type != "cpu" or not stored_by_rows_or_columns(A) or nbytes > MAX_KEPT_BYTES
            or not _kept_lock.acquire(blocking=False)):
        yield A.to(dtype)
        return
    try:
        if _kept is None or _kept.numel() < nbytes:
            _kept = None  # the old buffer goes before the new one is allocated
            _kept = torch.empty(nbytes, dtype=torch.uint8)
        yield view(_kept[:nbytes].view(dtype).view(rows.shape).copy_(rows))
    finally:
        if _release_requested:
            _kept, _release_requested = None, False
        _kept_lock.release()


def compute_copy(src: Tensor, dtype: torch.dtype) -> contextlib.AbstractContextManager[Tensor]:
    """src [B, m, n] in the compute ``dtype`` (float32 for a bf16 / fp16 input), valid inside the
    block: a CPU input of at least MIN_KEPT_COPY_BYTES (as float32) that needs converting is
    copied into the kept buffer (:func:`kept_copy`), any other converted as usual."""
    if src.dtype != dtype and src.device.type == "cpu" and src.numel() * 4 >= MIN_KEPT_COPY_BYTES:
        return kept_copy(src, dtype)
    return contextlib.nullcontext(src.to(dtype))


def release_workspace() -> None:
    """Free the kept buffer now, or, while a call is using it, when that call is done."""
    global _kept, _release_requested
    if _kept_lock.acquire(blocking=False):
        try:
            _kept = None
        finally:
            _kept_lock.release()
    else:
        _release_requested = True
