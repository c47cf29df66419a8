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


def prefers_cuda(tokens: int, in_features: int, out_features: int, k: int) -> bool:
    """Forward only: the compiled decode plan measured faster than the torch chain."""
    del in_features, out_features, k  # one threshold on T until measured otherwise
    return 1 <= tokens <= DECODE_AUTO_MAX_TOKENS


def prefers_triton(phase: str, shape: tuple[int, int, int, int] | None) -> bool:
    """Whether a Triton plan measured faster than torch's cuBLAS chain for this call: no shape
    measured so far (see the module docstring)."""
    del phase, shape
    return False
