"""QuantizedSpectralLinear: a spectral term on top of a frozen quantized linear layer (QLoRA-style).

The base is any module computing y = x·Ŵᵀ + b from quantized storage (bitsandbytes Linear4bit /
Linear8bitLt, an nn.Linear holding a torchao quantized weight); Ŵ [out, in] is its dequantized
weight. With the top-k factors of Ŵ = U·diag(s)·Vᵀ + (rest) (U [out, k], s [k], V [in, k], taken in
float32 from the dequantized weight and stored in the compute dtype) and trainable coefficients
c [k], the layer computes

    y = base(x) + ((x·V) ⊙ d)·Uᵀ,     d = φ(s, c) − s = s⊙(c − 1)  ("scale", c₀ = 1)
                                                    = c           ("shift", c₀ = 0)

The base (its quantized weight and its bias) is called as is and never modified; the spectral term
is the op's pure low-rank path (weight None, bias None), so the bias is added once, by the base. At
initialisation d = 0 exactly, the spectral term is exactly zero and the layer's output is bit for
bit the base's output.

Overhead per layer: U and V in the compute dtype, (in + out)·k values, plus s and c (k each).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from spectral_kernels.nn.spectral_linear import SpectralLinear, _check_choice, check_rank, MODES
from spectral_kernels.ops.spectral_linear import spectral_linear


class QuantizedSpectralLinear(SpectralLinear):
    """``y = base(x) + ((x·V) ⊙ d)·Uᵀ`` with ``base`` a frozen quantized linear layer.

    A :class:`SpectralLinear` in delta form without a dense ``weight`` (the quantized ``base``
    stands for it) and without its own ``bias`` (the base adds its bias).

    Attributes:
        base: the quantized module, kept as given (frozen, never written to).
        quant_kind: what the base is (e.g. ``"bnb-4bit"``, ``"bnb-8bit"``, ``"torchao"``).
        U: buffer ``[out, k]``, s: buffer ``[k]``, V: buffer ``[in, k]``, in the compute dtype.
        coeffs: parameter ``[k]``, the trainable coefficients c.
        weight: always None.  bias: always None (the base's bias is used, once).
    """

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        mode: str = "scale",
        backend: str = "auto",
        quant_kind: str = "quantized",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_rank(rank, in_features, out_features)
        _check_choice("mode", mode, MODES)
        # built in pure form so that no dense [out, in] weight is allocated, then switched to delta
        super().__init__(in_features, out_features, rank, bias=False, mode=mode, form="pure",
                         backend=backend, device=device, dtype=dtype)
        self.form = "delta"
        self.base = base
        self.quant_kind = quant_kind

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.U.dtype

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        xc = x.to(self.U.dtype)
        d = self.coefficient_delta().to(xc.dtype)
        delta = spectral_linear(xc, self.U, d, self.V, None, None, backend=self.backend)
        return y + delta.to(y.dtype)

    @torch.no_grad()
    def delta_weight(self, adapter: str | None = None) -> Tensor:
        """The update ΔW = U·diag(d)·Vᵀ ``[out, in]`` in float32 (what merging adds to Ŵ), with the
        coefficients of ``adapter`` (None: the active one)."""
        d = self.coefficient_delta(adapter).float()
        return (self.U.float() * d) @ self.V.float().t()

    def merged_weight(self, adapter: str | None = None) -> Tensor:
        raise TypeError(
            f"QuantizedSpectralLinear ({self.quant_kind}): the merged weight needs the base dequantized and "
            "re-quantized; use spectral_kernels.merge_adapter(model), which does so and reports the error")

    def merge(self, adapter: str | None = None) -> nn.Linear:
        return self.merged_weight()  # raises, with the message above

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"mode={self.mode}, base={self.quant_kind}, compute_dtype={self.U.dtype}, backend={self.backend}")
