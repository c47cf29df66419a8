"""SpecLoRALinear: LoRA plus a learnable rescaling of the top-k singular directions, in one fused call.

With the frozen pretrained weight W = U·diag(s)·Vᵀ (top-k factors kept: U [out, k], s [k], V [in, k]),
trainable coefficients c [k] (c₀ = 1) and a LoRA pair A [r, in], B [out, r] (B₀ = 0) with scale α/r,

    y = x·Wᵀ + ((x·V) ⊙ s⊙(c − 1))·Uᵀ + (α/r)·((x·Aᵀ)·Bᵀ) + b

Both low-rank terms are one rank-(k + r) chain of :func:`spectral_kernels.spectral_linear`:

    U' = [U | B]  [out, k + r],   V' = [V | Aᵀ]  [in, k + r],   d = [s⊙(c − 1) | (α/r)·1_r]  [k + r]

U' and V' are concatenations of a frozen buffer and a trainable parameter, rebuilt every forward;
the op's dU = dyᵀ·(z ⊙ d) and dV = xᵀ·(g ⊙ d) then reach only the LoRA columns (autograd slices the
concatenation), and dd reaches only c. At initialisation c = 1 and B = 0, so d's spectral part and
the LoRA term are exactly zero: the layer is exactly the pretrained one.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from spectral_kernels.nn.spectral_linear import SpectralLinear
from spectral_kernels.ops.spectral_linear import spectral_linear


class SpecLoRALinear(SpectralLinear):
    """SpectralLinear in delta form, mode "scale", plus a LoRA pair fused into the same op call.

    Attributes (beyond SpectralLinear's):
        lora_A: parameter ``[r, in]`` (peft's ``lora_A.weight`` layout), kaiming-uniform at start.
        lora_B: parameter ``[out, r]``, zero at start.
        lora_rank: r.  lora_alpha: α.  The LoRA term is scaled by α / r.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        *,
        bias: bool = True,
        train_bias: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, rank, bias=bias, mode="scale", form="delta",
                         train_bias=train_bias, backend=backend, device=device, dtype=dtype)
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"lora_rank must be an int >= 1, got {lora_rank!r}")
        self.mode = "speclora"
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_alpha)
        factory = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(lora_rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, lora_rank, **factory))
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A as peft initialises lora_A (kaiming-uniform, a = √5), B = 0: the LoRA term starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()

    @classmethod
    @torch.no_grad()
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        rank: int,
        svd: tuple[Tensor, Tensor, Tensor],
        *,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        train_bias: bool = False,
        backend: str = "auto",
    ) -> "SpecLoRALinear":
        """Layer equal to ``x·weightᵀ + bias`` at start, from ``weight [out, in]`` and its factors
        ``svd = (U [out, r], s [r], V [in, r])``, r ≥ rank (the top ``rank`` are used)."""
        from spectral_kernels.nn.spectral_linear import _check_factors

        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, rank, lora_rank, lora_alpha, bias=bias is not None, train_bias=train_bias,
                    backend=backend, device=weight.device, dtype=weight.dtype)
        U, s, V = _check_factors(svd, weight, rank)
        layer.U.copy_(U)
        layer.s.copy_(s)
        layer.V.copy_(V)
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    # --- named adapters: not for SpecLoRA (its LoRA pair would have to be banked too) ------------
    def add_adapter(self, name: str) -> None:
        raise NotImplementedError(
            "adapter banks are not implemented for mode 'speclora' (each task would need its own LoRA pair "
            "A, B, not only coefficients); use mode 'scale' or 'shift'")

    # --- math ----------------------------------------------------------------------------------
    def spectrum(self, adapter: str | None = None) -> Tensor:
        return self.s * self.coefficients(adapter)

    def coefficient_delta(self, adapter: str | None = None) -> Tensor:
        """The spectral part of d: s ⊙ (c − 1) [k] (the LoRA part is appended in :meth:`chain`)."""
        return self.s * (self.coefficients(adapter) - 1.0)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.lora_rank

    def chain(self) -> tuple[Tensor, Tensor, Tensor]:
        """(U' [out, k + r], d [k + r], V' [in, k + r]) of the fused rank-(k + r) chain."""
        U = torch.cat([self.U, self.lora_B], dim=1)
        V = torch.cat([self.V, self.lora_A.t()], dim=1)
        d = torch.cat([self.coefficient_delta(), self.coeffs.new_full((self.lora_rank,), self.scaling)])
        return U, d, V

    def forward(self, x: Tensor) -> Tensor:
        U, d, V = self.chain()
        return spectral_linear(x, U, d.to(x.dtype), V, self.bias, self.weight, backend=self.backend)

    @torch.no_grad()
    def merged_weight(self, adapter: str | None = None) -> Tensor:
        """W + U·diag(s⊙(c − 1))·Vᵀ + (α/r)·B·A ``[out, in]``, accumulated in float32 (float64 for
        float64 layers), returned in the layer's dtype."""
        self.coefficients(adapter)  # only "default" exists
        acc = torch.promote_types(self.U.dtype, torch.float32)
        U, d, V = (t.to(acc) for t in self.chain())
        return (self.weight.to(acc) + (U * d) @ V.t()).to(self.U.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha:g}"
