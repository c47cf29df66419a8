"""Which backend "auto" runs a call of spectral_linear on, from measured data.

Imported by ``backends.resolve_backend`` for CUDA tensors in float32 / float16 / bfloat16 (other
calls run on torch). Nothing here imports triton or the compiled extension: the rules are plain
thresholds, each with the measurement it comes from.

Measured on an H100 80GB HBM3 (torch 2.11, triton 3.6, bf16, in = out = 4096, 2026-11-24,
benchmarks/results/gpu_h100_goals.json):

* T = 8192, forward + backward: torch's cuBLAS chain 1.02 ms, the fused Triton plan 1.25-1.65 ms
  (its dense GEMM alone 0.50 ms against cuBLAS's 0.39-0.43 ms at these tile sizes): torch.
* T <= 16, forward (CUDA-graph replays, weights from HBM): the decode plan of ``_C`` 25.8 µs at
  T = 1 against the torch chain's 29.8 µs, but 35.6 / 75.5 µs at T = 4 / 16 against 29.6 / 31.0.
"""
from __future__ import annotations

#: Largest token count whose forward "auto" sends to the compiled decode plan (when built).
DECODE_AUTO_MAX_TOKENS = 1

#: Largest k for the triton backend's fused low-rank plan (DESIGN.md §3: "k ≤ ~256"); past it the
#: two-GEMM plan. The design's estimate, not measured against the two-GEMM plan on a GPU.
FUSED_MAX_RANK = 256

#: Fewest tokens for which the triton backend folds the update into the weight (delta form):
#: fold kernel + one cuBLAS GEMM per direction. Measured (H100, bf16, 4096², k = 16, forward +
#: backward): 0.894 ms against 1.08 ms for the fused plan (untuned tiles) at T = 8192; 0.436 ms
#: against 0.333 ms at T = 2048.
FOLD_MIN_TOKENS = 8192


def prefers_cuda(tokens: int, in_features: int, out_features: int, k: int) -> bool:
    """Forward only: the compiled decode plan measured faster than the torch chain."""
    del in_features, out_features, k  # one threshold on T until measured otherwise
    return 1 <= tokens <= DECODE_AUTO_MAX_TOKENS


def triton_plan(tokens: int, k: int, has_weight: bool) -> str:
    """The triton backend's plan for a call: "fold", "fused" or "two_gemm"."""
    if has_weight and tokens >= FOLD_MIN_TOKENS:
        return "fold"
    return "fused" if k <= FUSED_MAX_RANK else "two_gemm"


def prefers_triton(phase: str, shape: tuple[int, int, int, int] | None) -> bool:
    """Whether a Triton plan measured faster than torch's cuBLAS chain for this call: no shape
    measured so far (see the module docstring)."""
    del phase, shape
    return False
