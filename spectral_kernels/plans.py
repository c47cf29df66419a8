"""Which backend "auto" runs a call of spectral_linear on, and the triton backend's plan, from
measured data.

Imported by ``backends.resolve_backend`` for CUDA tensors in float32 / float16 / bfloat16 (other
calls run on torch). Nothing here imports triton or the compiled extension: the rules are plain
thresholds, each with the measurement it comes from.

Measured on an H100 80GB HBM3 (torch 2.11, triton 3.6, CUDA 13.0, bf16, in = out = 4096,
2026-11-24; benchmarks/results/gpu_h100_*.json, reproduced by ``bash benchmarks/gpu/run.sh bench``):

* T = 8192, forward + backward through autograd, x and d requiring grad (gpu_h100_main.json):
  k = 16: torch 0.931 ms, triton 0.904 ms (fold plan), frozen nn.Linear 0.805 ms;
  k = 64: torch 0.955 ms, triton 0.896 ms;  k = 256: torch 1.056 ms, triton 1.060 ms.
* T = 2048 and 512, backend functions alone (gpu_h100_tune.json): torch 0.27 / 0.17-0.25 ms,
  the Triton plans 0.33-0.46 / 0.21-0.37 ms: torch.
* T <= 16, forward, CUDA-graph replays with the weights coming from HBM (gpu_h100_goals.json):
  the torch chain 28-48 µs; the decode plan of ``_C`` 41-51 µs at T = 1, 53-67 µs at T = 4 and
  111-210 µs at T = 16 (4096×4096 and 11008×4096, k = 16 and 64): it is never chosen.
"""
from __future__ import annotations

#: Largest token count whose forward "auto" sends to the compiled decode plan (when built); 0: the
#: decode plan measured slower than the torch chain at every T <= 16 (module docstring).
DECODE_AUTO_MAX_TOKENS = 0

#: Largest k for the triton backend's fused low-rank plan (DESIGN.md §3: "k ≤ ~256"); past it the
#: two-GEMM plan. The design's estimate, not measured against the two-GEMM plan on a GPU.
FUSED_MAX_RANK = 256

#: Fewest tokens for which the triton backend folds the update into the weight (delta form):
#: fold kernel + one cuBLAS GEMM per direction. Measured (H100, bf16, 4096², k = 16, forward +
#: backward, backend functions): 0.894 ms against 1.08 ms for the fused plan at T = 8192; 0.436 ms
#: against 0.333 ms at T = 2048.
FOLD_MIN_TOKENS = 8192

#: Largest k for which "auto" prefers the triton backend's fold plan over torch at T >= FOLD_MIN_TOKENS
#: (measured 3-6 % faster at k = 16 and 64, equal at k = 256).
FOLD_AUTO_MAX_RANK = 64


def prefers_cuda(tokens: int, in_features: int, out_features: int, k: int) -> bool:
    """Forward only: the compiled decode plan measured faster than the torch chain."""
    del in_features, out_features, k  # one threshold on T until measured otherwise
    return 1 <= tokens <= DECODE_AUTO_MAX_TOKENS


def triton_plan(tokens: int, k: int, has_weight: bool, bank: bool = False) -> str:
    """The triton backend's plan for a call: "fold", "fused" or "two_gemm". Adapter banks (a
    per-token d) always take "fused": the only plan whose kernel gathers each row's coefficients."""
    if bank:
        return "fused"
    if has_weight and tokens >= FOLD_MIN_TOKENS:
        return "fold"
    return "fused" if k <= FUSED_MAX_RANK else "two_gemm"


def prefers_triton(phase: str, shape: tuple[int, int, int, int] | None, has_weight: bool = True) -> bool:
    """Whether the triton backend measured faster than torch's cuBLAS chain for this call: the
    delta form's fold plan at T >= FOLD_MIN_TOKENS and k <= FOLD_AUTO_MAX_RANK, both directions."""
    del phase  # measured on forward + backward together; both directions take the same plan
    if shape is None or not has_weight:
        return False
    tokens, _, _, k = shape
    return tokens >= FOLD_MIN_TOKENS and k <= FOLD_AUTO_MAX_RANK
