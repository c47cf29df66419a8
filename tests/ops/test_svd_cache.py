"""The SVD cache checks its entries before use: a corrupted, foreign, reordered, non-finite or
incomplete entry is recomputed with a warning naming it; an unwritable cache is skipped."""
import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import spectral_kernels.ops.truncated_svd as tsvd
from spectral_kernels.ops import svd_cache
from spectral_kernels.ops.truncated_svd import batched_truncated_svd

K = 4


def _mats():
    g = torch.Generator().manual_seed(11)
    return {"a": torch.randn(23, 17, generator=g), "b": torch.randn(23, 17, generator=g) * 3}


def _entry(cache: Path, mats, name) -> Path:
    key = svd_cache.cache_key(mats[name], {"k": K, "oversample": None, "n_iter": None, "tol": None,
                                           "method": "auto", "generator": "seed0"})
    return cache / f"{key}.safetensors"


def _read(path: Path):
    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}, f.metadata()


def _rewrite(path: Path, tensors, *, valid_checksum: bool, metadata=None):
    """Write tensors into the entry; with valid_checksum the metadata is made to match them, so only
    the numeric checks can catch the fault."""
    _, meta = _read(path)
    meta = dict(meta if metadata is None else metadata)
    if valid_checksum and all(n in tensors for n in "USV"):
        meta["sha256"] = svd_cache.factors_checksum(tensors["U"], tensors["S"], tensors["V"])
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path), metadata=meta)


def _flip_byte_of_U(path: Path):
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start, _ = json.loads(raw[8:8 + n])["U"]["data_offsets"]
    raw[8 + n + start + 3] ^= 0x40  # the exponent byte of U[0, 0]: off by ~1e19 or more
    path.write_bytes(bytes(raw))


def _swap_pairs(t):
    U, S, V = t["U"].clone(), t["S"].clone(), t["V"].clone()
    for x in (U, V):
        x[:, [0, 1]] = x[:, [1, 0]]
    S[[0, 1]] = S[[1, 0]]
    return {"U": U, "S": S, "V": V}


def _swap_U_columns(t):
    U = t["U"].clone()
    U[:, [0, 1]] = U[:, [1, 0]]
    return {**t, "U": U}


def _nan_in_S(t):
    S = t["S"].clone()
    S[2] = float("nan")
    return {**t, "S": S}


FAULTS = {
    "flipped byte in U": (lambda p, mats, cache: _flip_byte_of_U(p), "does not match its checksum"),
    "another matrix's file": (lambda p, mats, cache: p.write_bytes(_entry(cache, mats, "b").read_bytes()),
                              "another matrix"),
    "another matrix's factors, checksum made valid": (
        lambda p, mats, cache: _rewrite(p, _read(_entry(cache, mats, "b"))[0], valid_checksum=True),
        "not consistent with the weight"),
    "swapped singular pairs": (lambda p, mats, cache: _rewrite(p, _swap_pairs(_read(p)[0]), valid_checksum=False),
                               "does not match its checksum"),
    "swapped singular pairs, checksum made valid": (
        lambda p, mats, cache: _rewrite(p, _swap_pairs(_read(p)[0]), valid_checksum=True), "not sorted"),
    "swapped U columns, checksum made valid": (
        lambda p, mats, cache: _rewrite(p, _swap_U_columns(_read(p)[0]), valid_checksum=True),
        "not consistent with the weight"),
    "NaN in S, checksum made valid": (lambda p, mats, cache: _rewrite(p, _nan_in_S(_read(p)[0]), valid_checksum=True),
                                      "NaN or Inf"),
    "missing V": (lambda p, mats, cache: _rewrite(p, {n: t for n, t in _read(p)[0].items() if n != "V"},
                                                 valid_checksum=False), "has no tensor V"),
    "no metadata": (lambda p, mats, cache: save_file(_read(p)[0], str(p)), "no key and checksum"),
    "truncated file": (lambda p, mats, cache: p.write_bytes(p.read_bytes()[:100]), "cannot be read"),
    "wrong rank, checksum made valid": (
        lambda p, mats, cache: _rewrite(p, {n: t[..., :K - 1] for n, t in _read(p)[0].items()}, valid_checksum=True),
        "expected"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_bad_entry_is_recomputed_with_a_warning(tmp_path, fault):
    mats = _mats()
    fresh = batched_truncated_svd(mats, K, cache_dir=tmp_path, progress=False)
    path = _entry(tmp_path, mats, "a")
    inject, message = FAULTS[fault]
    inject(path, mats, tmp_path)
    with pytest.warns(RuntimeWarning, match=rf"SVD cache entry {path}.*{message}.*recomputing"):
        again = batched_truncated_svd(mats, K, cache_dir=tmp_path, progress=False)
    for name in mats:
        for a, b in zip(fresh[name], again[name]):
            assert torch.equal(a, b), (fault, name)
    with warnings.catch_warnings():  # the entry was rewritten: a clean hit now
        warnings.simplefilter("error")
        hit = batched_truncated_svd(mats, K, cache_dir=tmp_path, progress=False)
    assert torch.equal(hit["a"].U, fresh["a"].U)


def test_good_entries_are_hits_without_recomputing(tmp_path, monkeypatch):
    mats = {"stack": torch.randn(3, 30, 20, dtype=torch.float64), "wide": torch.randn(9, 40)}
    first = batched_truncated_svd(mats, K, cache_dir=tmp_path, progress=False)
    monkeypatch.setattr(tsvd, "_svd_group", lambda *a, **k: pytest.fail("a valid entry was recomputed"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = batched_truncated_svd(mats, K, cache_dir=tmp_path, progress=False)
    for name in mats:
        for a, b in zip(first[name], second[name]):
            assert torch.equal(a, b)


def test_a_cache_under_a_file_is_skipped_with_a_warning(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    mats = _mats()
    with pytest.warns(RuntimeWarning, match="cannot write the SVD cache.*continuing without caching"):
        out = batched_truncated_svd(mats, K, cache_dir=blocker / "cache", progress=False)
    want = batched_truncated_svd(mats, K, progress=False)
    assert all(torch.equal(out[n].S, want[n].S) for n in mats)


def test_a_read_only_cache_is_skipped_with_a_warning(tmp_path, monkeypatch):
    """Tests run as root, where chmod does not stop a write: the write fails as it would there."""
    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(svd_cache.tempfile, "mkstemp", read_only)
    with pytest.warns(RuntimeWarning, match="Permission denied") as record:
        batched_truncated_svd(_mats(), K, cache_dir=tmp_path, progress=False)
    assert len([w for w in record if "cannot write" in str(w.message)]) == 1  # once, not per matrix


def test_adapt_recomputes_a_corrupted_entry(tmp_path):
    from spectral_kernels.tuning import SpectralConfig, adapt, spectral_layers

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Linear(10, 12))

    cfg = SpectralConfig(target_modules="all-linear", rank=3, progress=False, svd_cache_dir=str(tmp_path))
    want = spectral_layers(adapt(model(), cfg))
    for path in tmp_path.glob("*.safetensors"):
        _flip_byte_of_U(path)
    with pytest.warns(RuntimeWarning, match="does not match its checksum"):
        got = spectral_layers(adapt(model(), cfg))
    for name, layer in want.items():
        assert torch.equal(got[name].U, layer.U) and torch.equal(got[name].s, layer.s)
