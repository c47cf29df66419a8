"""Fingerprints of base weights: how an adapter recognises the base it was trained on.

The fingerprint of a tensor W (a base weight in nn.Linear orientation [out, in], a bias, an
embedding, ...; viewed as rows × columns, ``[shape[0], rest]``) is
``{version, shape, dtype, sha256, sum, abs_sum, norm, bf16}``:

- ``sha256`` covers shape, dtype and W's bytes: all of them up to 2²² entries (16 MiB of float32);
  beyond that a deterministic sample of max(2²⁰, rows) entries that takes the same number of
  entries from *every* row, at columns spread over the row and shifted from row to row
  (:func:`sample_positions`), so the hash costs a bounded copy off the device and a change to any
  whole row, or any column touching many rows, is seen;
- ``sum``, ``abs_sum``, ``norm``: float64 sums and Frobenius norm over every entry;
- ``bf16``: a sample of ``bf16_sample`` entries (4096 for an adapted weight, 1024 for another base
  tensor; every entry of a small tensor, else every row while rows ≤ the sample, evenly spaced
  rows beyond), rounded to bfloat16, base64 of the bytes.

Comparing a stored fingerprint with a base:

- same dtype: the sha256 must be equal. A different checkpoint, a rescaled one, or one changed
  entry within the hashed part is refused.
- another dtype (the same fp32 checkpoint loaded in bf16 or fp16, say): bytes cannot match, so the
  ``bf16`` samples are compared entry by entry. Both sides are the same real weights rounded to
  bfloat16 through their own dtype: fp32 → bf16 is one rounding, fp16 → bf16 (or fp64 → fp32 →
  bf16) two, which differ by at most one bf16 ulp (the fp16 grid holds every bf16 midpoint, so a
  double rounding can land on the other side of a tie); fp16 also flushes |w| < 2⁻¹⁴ to its
  subnormal grid of step 2⁻²⁴. So an entry is accepted within 1 ulp of bf16 at the larger
  magnitude, plus 2⁻²⁴ when fp16 is involved, and every sampled entry must be. A weight scaled by
  1.01 moves entries by 2.6 ulps of bf16 (1.3 in the upper half of a binade, which with rounding
  still leaves ≥ 2 ulps for nearly all entries), another initialisation by many: both refused. The
  sums and norm must also agree within 4 ulps of the coarser dtype (rounding moves a sum by at
  most ε·Σ|w|), which sees gross changes outside the sample.

What a fingerprint cannot see: across dtypes, a change smaller than bf16 rounding (~0.4 % of an
entry) or confined to entries outside the bf16 sample that leaves the sums within
rounding; in the same dtype, a change confined to the unhashed entries of a tensor over 2²²
entries that moves the float64 sums by no more than their own rounding (every row is hashed in
part, so this takes a change to a few entries only). Fingerprints written by version 1 of the
format (no ``bf16`` sample, large tensors hashed on a linspace sample) are compared by sums and
norm only, where their sha256 cannot be recomputed.
"""
from __future__ import annotations

import base64
import hashlib
import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from spectral_kernels._hashing import update_with_bytes
from spectral_kernels.nn.spectral_linear import SpectralLinear

FINGERPRINT_VERSION = 2
#: a tensor with at most this many entries is hashed whole; a larger one by a sample covering every row
FULL_HASH_NUMEL = 1 << 22
#: at least this many entries are hashed from a larger tensor (every row contributes the same number)
SAMPLE_NUMEL = 1 << 20
#: entries of the bfloat16 sample that a base in another dtype is compared with, entry by entry: for
#: an adapted weight, and for each other base tensor (embeddings, norms, other layers; fewer, as an
#: adapter file holds one per tensor of the model: ~0.4 MB of metadata for 300 tensors)
CROSS_DTYPE_SAMPLE = 4096
BASE_TENSOR_SAMPLE = 1024
#: attribute where a pure-form layer keeps its base fingerprint (it has no W left to hash)
FINGERPRINT_ATTR = "spectral_fingerprint"
#: step between the columns sampled in consecutive rows (a prime, so columns spread over the row)
_COLUMN_SHIFT = 7919


def _rows_cols(shape: Iterable[int]) -> tuple[int, int]:
    shape = list(shape)
    if not shape:
        return 1, 1
    rows = shape[0]
    return rows, math.prod(shape[1:]) if len(shape) > 1 else 1


def sample_positions(shape: Iterable[int], count: int) -> tuple[Tensor, Tensor] | None:
    """(rows, cols) int64 of a deterministic sample of about ``count`` entries of a tensor of
    ``shape`` viewed as [rows, cols] (None: take every entry, the tensor has at most ``count``).

    With rows ≤ count every row gives ``count // rows`` entries at evenly spaced columns, shifted
    from one row to the next; with more rows, ``count`` evenly spaced rows give one entry each."""
    R, C = _rows_cols(shape)
    if R * C <= count:
        return None
    if R >= count:
        rows = torch.linspace(0, R - 1, count, dtype=torch.float64).round().long()
        return rows, (rows * _COLUMN_SHIFT) % C
    per = count // R  # ≥ 1, and < C since R·C > count
    rows = torch.arange(R).repeat_interleave(per)
    j = torch.arange(per).repeat(R)
    return rows, (j * C // per + rows * _COLUMN_SHIFT) % C


def _gather(W: Tensor, positions: tuple[Tensor, Tensor] | None) -> Tensor:
    """The sampled entries of W (all of them, flattened, for None), on the CPU."""
    R, C = _rows_cols(W.shape)
    W2 = W.reshape(R, C)
    if positions is None:
        return W2.reshape(-1).contiguous().cpu()
    rows, cols = positions
    return W2[rows.to(W.device), cols.to(W.device)].contiguous().cpu()


def _bytes(t: Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _full(W: Tensor) -> Tensor:
    """W detached; an FSDP2-sharded weight (a DTensor) gathered (every rank must call together)."""
    W = W.detach()
    return W.full_tensor() if hasattr(W, "full_tensor") else W


def _sha256(W: Tensor) -> str:
    """The fingerprint's sha256 of W (module docstring): the hashed entries are fed to hashlib as a
    buffer, without a copy into a bytes object."""
    R, _ = _rows_cols(W.shape)
    positions = None if W.numel() <= FULL_HASH_NUMEL else sample_positions(W.shape, max(SAMPLE_NUMEL, R))
    h = hashlib.sha256(repr((tuple(W.shape), str(W.dtype))).encode())
    update_with_bytes(h, _gather(W, positions))
    return h.hexdigest()


#: entries converted to float64 at a time by :func:`_float64_sums` (8 MiB)
_SUM_CHUNK = 1 << 20


def _float64_sums(W: Tensor) -> tuple[float, float, float]:
    """(Σw, Σ|w|, Σw²) in float64 over every entry of W, in one pass: each chunk is converted to
    float64 once and reduced three ways while it is in cache (three full reductions read W three
    times and convert it each time)."""
    flat = W.reshape(-1)
    acc = torch.zeros(3, dtype=torch.float64, device=W.device)
    for i in range(0, flat.numel(), _SUM_CHUNK):
        x = flat[i:i + _SUM_CHUNK].double()
        acc += torch.stack((x.sum(), x.abs().sum(), torch.dot(x, x)))
    total, abs_total, squares = acc.tolist()
    return total, abs_total, squares


@torch.no_grad()
def fingerprint(W: Tensor, *, sample: int = CROSS_DTYPE_SAMPLE) -> dict[str, Any]:
    """Fingerprint of a base tensor (see the module docstring for what it covers and why), with a
    bf16 sample of ``sample`` entries. An FSDP2-sharded weight (a DTensor) is gathered first:
    every rank must call this together."""
    W = _full(W)
    fp: dict[str, Any] = {
        "version": FINGERPRINT_VERSION,
        "shape": list(W.shape),
        "dtype": str(W.dtype).removeprefix("torch."),
        "sha256": _sha256(W),
        "bf16": None,
    }
    if W.is_floating_point():
        total, abs_total, squares = _float64_sums(W)
        fp.update(
            sum=total,
            abs_sum=abs_total,
            norm=math.sqrt(squares),
            bf16=base64.b64encode(_bytes(_gather(W, sample_positions(W.shape, sample))
                                         .to(torch.bfloat16))).decode("ascii"),
            bf16_sample=sample,
        )
    return fp


#: attribute of a tensor holding the fingerprint taken when an adapter was saved: (its _version, sample, fingerprint)
_SAVED_ATTR = "_spectral_saved_fingerprint"


def saved_fingerprint(W: Tensor, *, sample: int = CROSS_DTYPE_SAMPLE) -> dict[str, Any]:
    """:func:`fingerprint` of a frozen base tensor for an adapter being saved, taken once per tensor
    and reused while the tensor is not modified in place (its version counter), so that a
    Trainer's periodic checkpoints do not hash the whole base every time (seconds for a BERT-base
    on a CPU). Loading never uses it: a base being checked is always hashed afresh."""
    hit = getattr(W, _SAVED_ATTR, None)
    if hit is not None and hit[0] == W._version and hit[1] == sample:
        return dict(hit[2])
    fp = fingerprint(W, sample=sample)
    try:
        setattr(W, _SAVED_ATTR, (W._version, sample, fp))
    except (AttributeError, TypeError):  # a tensor type without attributes: not cached
        pass
    return dict(fp)


def _bf16_values(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.bfloat16).double()


def compare_fingerprints(stored: dict[str, Any], actual: dict[str, Any], what: str = "base weight") -> str | None:
    """None when ``actual`` is the base ``stored`` was taken from; otherwise what differs, in words
    (``what`` names the tensor in the message).

    A quantized base's fingerprint (:func:`spectral_kernels.tuning.quantized.quantized_fingerprint`)
    carries its settings under ``quant``: it matches only a base quantized with the same settings
    (each differing setting is named) and the same stored bytes."""
    if list(stored["shape"]) != list(actual["shape"]):
        return f"{what} shape {actual['shape']} differs from the adapter's {stored['shape']}"
    sq, aq = stored.get("quant"), actual.get("quant")
    if sq is not None or aq is not None:
        return _compare_quantized(stored, actual, sq, aq)
    if stored["dtype"] == actual["dtype"]:
        if stored["sha256"] == actual["sha256"]:
            return None
        if stored.get("version") is None and math.prod(stored["shape"]) > FULL_HASH_NUMEL and _sums_equal(stored, actual):
            return None  # a version-1 fingerprint hashed another sample of this large tensor
        return (f"{what} differs from the one the adapter was trained on (sha256 {actual['sha256'][:12]} vs "
                f"{stored['sha256'][:12]}; norm {actual.get('norm', float('nan')):.6g} vs "
                f"{stored.get('norm', float('nan')):.6g})")
    if "sum" not in stored or "sum" not in actual:
        return f"{what} has dtype {actual['dtype']}, the adapter's {stored['dtype']}: not comparable"
    fp16 = "float16" in (stored["dtype"], actual["dtype"])
    if stored.get("bf16") and actual.get("bf16"):
        diff = _compare_samples(stored, actual, fp16)
        if diff is not None:
            return f"{what} ({actual['dtype']}) differs from the adapter's ({stored['dtype']}) beyond rounding: {diff}"
    try:
        eps = max(torch.finfo(getattr(torch, stored["dtype"])).eps, torch.finfo(getattr(torch, actual["dtype"])).eps)
    except (AttributeError, TypeError):
        return f"{what} has dtype {actual['dtype']}, the adapter's {stored['dtype']}: not comparable"
    tol = 4 * eps
    n = math.prod(stored["shape"])
    sub = 2.0 ** -24 if fp16 else 0.0  # fp16's subnormal grid: an absolute error per entry
    norm_ok = abs(actual["norm"] - stored["norm"]) <= tol * max(stored["norm"], 1e-30) + math.sqrt(n) * sub
    sum_ok = abs(actual["sum"] - stored["sum"]) <= tol * max(stored["abs_sum"], 1e-30) + n * sub
    if norm_ok and sum_ok:
        return None
    return (f"{what} ({actual['dtype']}) differs from the adapter's ({stored['dtype']}) beyond rounding: "
            f"norm {actual['norm']:.6g} vs {stored['norm']:.6g}, sum {actual['sum']:.6g} vs {stored['sum']:.6g}")


@torch.no_grad()
def check_fingerprint(stored: dict[str, Any], W: Tensor, what: str = "base weight") -> str | None:
    """``compare_fingerprints(stored, fingerprint(W, ...))``, computing only what that comparison
    reads: in W's own dtype the sha256 alone decides when it matches (the float64 sums and the
    bf16 sample are read only across dtypes, for a version-1 fingerprint of a large tensor, and
    for the message of a refusal), so loading on the dtype an adapter was saved on costs one
    hash of each base tensor (a bounded sample beyond 2²² entries) instead of four passes over
    every entry. Same result as the full comparison in every case."""
    W = _full(W)
    if (list(stored["shape"]) == list(W.shape) and stored.get("quant") is None
            and stored["dtype"] == str(W.dtype).removeprefix("torch.") and stored["sha256"] == _sha256(W)):
        return None
    return compare_fingerprints(stored, fingerprint(W, sample=stored.get("bf16_sample", CROSS_DTYPE_SAMPLE)), what)


def _sums_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if "sum" not in a or "sum" not in b:
        return False
    return all(abs(a[k] - b[k]) <= 1e-9 * max(abs(a["abs_sum"]), 1e-30) for k in ("sum", "abs_sum", "norm"))


def _compare_samples(stored: dict[str, Any], actual: dict[str, Any], fp16: bool) -> str | None:
    """Entry-by-entry comparison of two bf16 samples (module docstring: the tolerance)."""
    a, b = _bf16_values(stored["bf16"]), _bf16_values(actual["bf16"])
    if a.shape != b.shape:
        return f"its sample has {b.numel()} entries, the adapter's {a.numel()}"
    big = torch.maximum(a.abs(), b.abs())
    _, exp = torch.frexp(big)  # big = f·2^exp, f in [0.5, 1): one bf16 ulp (8 significant bits) is 2^(exp-8)
    tol = torch.ldexp(torch.ones_like(big), exp - 8) + (2.0 ** -24 if fp16 else 0.0)
    same = (a == b) | ((a - b).abs() <= tol) | (a.isnan() & b.isnan())
    if bool(same.all()):
        return None
    bad = (~same).nonzero().reshape(-1)
    i = int(bad[0])
    positions = sample_positions(stored["shape"], stored.get("bf16_sample", CROSS_DTYPE_SAMPLE))
    _, C = _rows_cols(stored["shape"])
    row, col = (i // C, i % C) if positions is None else (int(positions[0][i]), int(positions[1][i]))
    return (f"{bad.numel()} of {a.numel()} sampled entries differ by more than one bf16 ulp, e.g. row {row} "
            f"column {col}: {b[i].item():.6g} vs {a[i].item():.6g}")


def _describe_quant(q: dict[str, Any] | None, dtype: str) -> str:
    if q is None:
        return f"an unquantized {dtype} weight"
    return q["kind"] + " (" + ", ".join(f"{k}={v}" for k, v in q.items() if k != "kind") + ")"


def _compare_quantized(stored: dict[str, Any], actual: dict[str, Any], sq: dict | None, aq: dict | None) -> str | None:
    if sq is None or aq is None:
        return (f"the base is {_describe_quant(aq, actual['dtype'])} but the adapter was trained on "
                f"{_describe_quant(sq, stored['dtype'])}")
    diffs = [f"{k}={aq.get(k)!r} (adapter: {sq.get(k)!r})" for k in sorted(set(sq) | set(aq)) if sq.get(k) != aq.get(k)]
    if diffs:
        return "the base is quantized differently from the adapter's: " + ", ".join(diffs)
    if stored["sha256"] != actual["sha256"]:
        return (f"quantized base weight differs from the one the adapter was trained on (same settings "
                f"{_describe_quant(aq, actual['dtype'])}, sha256 {actual['sha256'][:12]} vs {stored['sha256'][:12]})")
    return None


def layer_fingerprint(layer: SpectralLinear, *, saving: bool = False) -> dict[str, Any] | None:
    """The base fingerprint of an adapted layer: hashed from its frozen W (delta form; ``saving``:
    through :func:`saved_fingerprint`), or the one adapt() recorded (pure form); None if neither
    exists."""
    if getattr(layer, FINGERPRINT_ATTR, None) is not None:
        return getattr(layer, FINGERPRINT_ATTR)
    if layer.weight is not None:
        return saved_fingerprint(layer.weight) if saving else fingerprint(layer.weight)
    return None


def check_layer_fingerprint(stored: dict[str, Any], layer: SpectralLinear) -> str | None:
    """``compare_fingerprints(stored, layer_fingerprint(layer))`` through :func:`check_fingerprint`
    (None also for a layer with neither a base weight nor a recorded fingerprint)."""
    recorded = getattr(layer, FINGERPRINT_ATTR, None)
    if recorded is not None:
        return compare_fingerprints(stored, recorded)
    return check_fingerprint(stored, layer.weight) if layer.weight is not None else None


def _is_plain(p: Tensor) -> bool:
    """A dense tensor a fingerprint can read: not a bitsandbytes / torchao quantized storage (whose
    bytes move between devices; a quantized *target* has its own fingerprint) and not on meta."""
    data = p.data if isinstance(p, nn.Parameter) else p
    roots = {type(p).__module__.split(".")[0], type(data).__module__.split(".")[0]}
    return not roots & {"bitsandbytes", "torchao"} and not p.is_meta


def frozen_tensors(model: nn.Module, skip_prefixes: Iterable[str], skip_names: Iterable[str]) -> dict[str, Tensor]:
    """The base parameters an adapter depends on but does not hold, by qualified name: every
    dense parameter of ``model`` except those under ``skip_prefixes`` (the adapted layers, whose
    weights have per-layer fingerprints) and those in ``skip_names`` (the trained tensors an
    adapter file holds). Buffers are left out: forward passes may update them (BatchNorm running
    statistics), so a fingerprint of them would refuse the very base an adapter was trained on."""
    prefixes = tuple(f"{p}." for p in skip_prefixes)
    skip = set(skip_names)
    return {n: p for n, p in model.named_parameters()
            if n not in skip and not n.startswith(prefixes) and _is_plain(p)}


def compare_tensor_fingerprints(stored: dict[str, dict], actual: dict[str, Tensor]) -> str | None:
    """None when every tensor of ``stored`` ({name: fingerprint}) is in ``actual`` ({name: tensor})
    and matches; otherwise the first difference, naming the tensor."""
    missing = sorted(set(stored) - set(actual))
    if missing:
        return (f"base parameter {missing[0]!r}, which the adapter was trained against, is not in the model "
                f"({len(missing)} such)")
    for name in sorted(stored):
        diff = check_fingerprint({"bf16_sample": BASE_TENSOR_SAMPLE, **stored[name]}, actual[name],
                                 what=f"base parameter {name!r}")
        if diff is not None:
            return diff
    return None
