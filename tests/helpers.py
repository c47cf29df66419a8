"""Test utilities: random operands of the spectral linear op and the comparison rule.

The rule (DESIGN.md §9): a result in a given dtype passes when its relative error against the
float64 reference is at most 2× the error of plain PyTorch computing the same thing in that
dtype, plus a floor of a fraction of the dtype's epsilon so that exact-by-luck PyTorch results
(tiny shapes) do not demand perfection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spectral_kernels.ops.reference import spectral_linear_bwd_ref, spectral_linear_fwd_ref, spectral_linear_ref

OPERANDS = ("x", "U", "d", "V", "bias", "weight")


@dataclass
class Operands:
    x: Tensor
    U: Tensor
    d: Tensor
    V: Tensor
    bias: Tensor | None
    weight: Tensor | None

    def as_tuple(self):
        return (self.x, self.U, self.d, self.V, self.bias, self.weight)

    def cast(self, dtype: torch.dtype, grads: tuple[str, ...] = ()) -> "Operands":
        """Detached copies in ``dtype``; those named in ``grads`` require grad. Strides of x kept."""
        out = {}
        for name in OPERANDS:
            t = getattr(self, name)
            if t is None:
                out[name] = None
                continue
            c = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=t.device)
            c.copy_(t.detach())
            out[name] = c.requires_grad_(name in grads)
        return Operands(**out)


def make_operands(lead, in_f, out_f, k, *, bias=True, weight=True, device="cpu", transpose_x=False) -> Operands:
    """float64 operands with realistic scales: y has entries of order 1."""
    g = lambda *s: torch.randn(*s, dtype=torch.float64, device=device)  # noqa: E731
    if transpose_x:  # x as a non-contiguous view: the transpose of a [..., in, T_last] tensor
        x = g(*lead[:-1], in_f, lead[-1]).transpose(-1, -2)
    else:
        x = g(*lead, in_f)
    return Operands(
        x=x,
        U=g(out_f, k) / k**0.5,
        d=g(k),
        V=g(in_f, k) / in_f**0.5,
        bias=g(out_f) if bias else None,
        weight=g(out_f, in_f) / in_f**0.5 if weight else None,
    )


def rel_err(a: Tensor, ref: Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    return (a - ref).norm().item() / (denom if denom > 0 else 1.0)


def forward_backward(fn, ops: Operands, dy: Tensor) -> dict[str, Tensor]:
    """Run fn on ops, backprop dy; return {"y": y, "dx": ..., "dd": ...} for operands with grads."""
    y = fn(*ops.as_tuple())
    y.backward(dy.to(y.dtype))
    out = {"y": y.detach()}
    for name in OPERANDS:
        t = getattr(ops, name)
        if t is not None and t.requires_grad:
            out["d" + name] = t.grad
    return out


def assert_matches_reference(fn, base: Operands, dtype: torch.dtype, grads=("x", "d", "bias")) -> dict:
    """Check fn (same signature as spectral_linear_ref) in ``dtype`` against the float64 reference
    with the 2× rule, for y and every gradient named. Returns the errors for reporting."""
    grads = tuple(g for g in grads if getattr(base, g) is not None)
    y_shape = base.x.shape[:-1] + (base.U.shape[0],)
    dy = torch.randn(y_shape, dtype=torch.float64, device=base.x.device)
    exact = forward_backward(spectral_linear_ref, base.cast(torch.float64, grads), dy)
    plain = forward_backward(spectral_linear_ref, base.cast(dtype, grads), dy)
    ours = forward_backward(fn, base.cast(dtype, grads), dy)
    # float64 is compared with itself, so plain PyTorch's error is 0: allow reassociation only.
    floor = 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps / 8
    report = {}
    for key, ref in exact.items():
        assert ours[key].dtype == dtype, f"{key}: dtype {ours[key].dtype}, expected {dtype}"
        assert ours[key].shape == ref.shape, f"{key}: shape {tuple(ours[key].shape)}, expected {tuple(ref.shape)}"
        err, plain_err = rel_err(ours[key], ref), rel_err(plain[key], ref)
        report[key] = (err, plain_err)
        assert err <= 2 * plain_err + floor, (
            f"{key} in {dtype}: relative error {err:.3e} > 2 × plain PyTorch's {plain_err:.3e} + {floor:.1e}"
        )
    return report


def backend_fwd_bwd(fwd, bwd, x2d, U, d, V, bias, weight, dy2d, idx=None):
    extra = () if idx is None else (idx,)
    y, z = fwd(x2d, U, d, V, bias, weight, *extra)
    dx, dd, g = bwd(dy2d, z, U, d, V, weight, *extra)
    return {"y": y, "z": z, "dx": dx, "dd": dd, "g": g}


def check_backend_direct(fwd, bwd, x2d, U, d, V, bias, weight, dy2d, idx=None):
    """A backend's ``fwd`` / ``bwd`` functions (flattened tokens, any strides; with ``idx`` [T],
    d a bank [n, k]) against the float64 reference with the 2× rule, for y, z, dx, dd and g."""
    ours = backend_fwd_bwd(fwd, bwd, x2d, U, d, V, bias, weight, dy2d, idx)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    exact = backend_fwd_bwd(spectral_linear_fwd_ref, spectral_linear_bwd_ref,
                            *map(f64, (x2d, U, d, V, bias, weight, dy2d)), idx)
    plain = backend_fwd_bwd(spectral_linear_fwd_ref, spectral_linear_bwd_ref, x2d, U, d, V, bias, weight, dy2d, idx)
    floor = torch.finfo(x2d.dtype).eps / 8
    for key in ("y", "z", "dx", "dd", "g"):
        err, plain_err = rel_err(ours[key], exact[key]), rel_err(plain[key], exact[key])
        assert err <= 2 * plain_err + floor, f"{key}: {err:.3e} > 2 × {plain_err:.3e}"


# --- adapter banks ---------------------------------------------------------------------------------
def make_bank_operands(lead, in_f, out_f, k, n, *, seed=0, device="cpu", bias=True, weight=True) -> Operands:
    """make_operands with d a bank [n, k] (float64), seeded."""
    torch.manual_seed(seed)
    ops = make_operands(lead, in_f, out_f, k, device=device, bias=bias, weight=weight)
    ops.d = torch.randn(n, k, dtype=torch.float64, device=device)
    return ops


def _bank_run(fn, ops: Operands, dtype, grads, dy, idx) -> dict[str, Tensor]:
    c = ops.cast(dtype, grads)
    y = fn(*c.as_tuple(), adapter_index=idx)
    y.backward(dy.to(y.dtype))
    out = {"y": y.detach()}
    for g in grads:
        out["d" + g] = getattr(c, g).grad
    return out


def assert_bank_matches_reference(fn, ops: Operands, dtype, idx, grads=("x", "d", "bias")) -> dict[str, Tensor]:
    """The 2x rule with a bank: ``fn(x, U, d, V, bias, weight, adapter_index=idx)`` in ``dtype``
    against the float64 reference, within 2x plain torch in ``dtype`` + a floor. Returns ours."""
    y_shape = ops.x.shape[:-1] + (ops.U.shape[0],)
    dy = torch.randn(y_shape, dtype=torch.float64, device=ops.x.device)
    exact = _bank_run(spectral_linear_ref, ops, torch.float64, grads, dy, idx)
    plain = _bank_run(spectral_linear_ref, ops, dtype, grads, dy, idx)
    ours = _bank_run(fn, ops, dtype, grads, dy, idx)
    floor = torch.finfo(dtype).eps / 8
    for key, ref in exact.items():
        assert ours[key].shape == ref.shape and ours[key].dtype == dtype, key
        err, plain_err = rel_err(ours[key], ref), rel_err(plain[key], ref)
        assert err <= 2 * plain_err + floor, f"{key} {dtype}: {err:.3e} > 2 x {plain_err:.3e}"
    return ours


def cuda_backend_ready() -> tuple[bool, str]:
    """(whether the cuda backend can run here, why not): a CUDA device and a loadable _C for it."""
    from spectral_kernels import _ext

    if not torch.cuda.is_available():
        return False, "needs a CUDA device"
    return _ext.cuda_status(torch.device("cuda"))


# --- the truncated SVD's accuracy contract -------------------------------------------------------------
SV_TOL = 1e-3  # top-k singular values, relative
RESID_TOL = 1.001  # ‖A − U·diag(S)·Vᵀ‖_F over the optimal rank-k error
ORTH_TOL = 1e-5  # max |UᵀU − I|, |VᵀV − I| in float32


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A = P·diag(s)·Qᵀ with Haar-random P [m, r], Q [n, r], r = len(s)."""
    g = torch.Generator().manual_seed(seed)
    P, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return ((P * s.to(torch.float64)) @ Q.T).to(dtype)


def contract_errors(A: torch.Tensor, k: int, res) -> dict[str, float]:
    """Relative singular-value error, residual ratio and orthonormality of (U, S, V) vs float64."""
    A64 = A.to(torch.float64)
    s = torch.linalg.svdvals(A64)
    U, S, V = (t.to(torch.float64) for t in res)
    sv = ((S - s[..., :k]).abs() / s[..., :k]).max().item()
    resid = torch.linalg.matrix_norm(A64 - (U * S[..., None, :]) @ V.transpose(-2, -1))
    opt = torch.linalg.vector_norm(s[..., k:], dim=-1)
    I = torch.eye(k, dtype=torch.float64)
    orth = max((U.transpose(-2, -1) @ U - I).abs().max().item(), (V.transpose(-2, -1) @ V - I).abs().max().item())
    return {"sv": sv, "ratio": (resid / opt).max().item(), "orth": orth}


def assert_contract(A, k, res, what=""):
    e = contract_errors(A, k, res)
    assert e["sv"] <= SV_TOL, f"{what}: singular values off by {e['sv']:.2e} relative (> {SV_TOL})"
    assert e["ratio"] <= RESID_TOL, f"{what}: residual {e['ratio']:.6f}× optimal (> {RESID_TOL})"
    assert e["orth"] <= ORTH_TOL, f"{what}: factors orthonormal only to {e['orth']:.2e} (> {ORTH_TOL})"
