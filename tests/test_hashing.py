"""spectral_kernels/_hashing.py: the piece-digest hash of large tensors (the SVD cache's key)."""
from __future__ import annotations

import hashlib

import pytest
import torch

from spectral_kernels import _hashing


def _digest(t, workers=None):
    h = hashlib.sha256()
    _hashing.update_with_chunk_digests(h, t, workers)
    return h.hexdigest()


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(_hashing, "DIGEST_CHUNK_BYTES", 1000)  # a 40×30 fp32 tensor: 5 pieces, a ragged last one


def test_same_bytes_same_digest_whatever_the_threads_and_layout(small_pieces):
    t = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    d = _digest(t, 1)
    assert _digest(t, 2) == d == _digest(t, 3)
    assert _digest(t.T.contiguous().T) == d  # same values in C order, other strides
    # equal to the sha256 of the piece digests, by definition
    raw = t.numpy().tobytes()
    h = hashlib.sha256()
    pieces = [raw[i:i + 1000] for i in range(0, len(raw), 1000)]
    h.update(len(pieces).to_bytes(8, "little"))
    for p in pieces:
        h.update(hashlib.sha256(p).digest())
    assert h.hexdigest() == d


@pytest.mark.parametrize("flat_index", [0, 250, 599, 1199])
def test_any_changed_entry_changes_the_digest(small_pieces, flat_index):
    t = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    d = _digest(t, 2)
    u = t.clone()
    u.view(-1)[flat_index] = torch.nextafter(u.view(-1)[flat_index], torch.tensor(float("inf")))
    assert _digest(u, 2) != d


def test_bfloat16_and_empty_tensors(small_pieces):
    t = torch.randn(33, 17).bfloat16()
    assert _digest(t, 2) == _digest(t.clone(), 1)
    assert _digest(torch.empty(0, 5), 2) == _digest(torch.empty(0, 5), 1)
