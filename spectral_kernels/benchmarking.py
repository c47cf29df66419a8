"""Benchmark providers and timing shared by ``spectral-kernels bench`` and benchmarks/.

A provider is a layer computing out = f(x) for x [T, in] with frozen dense weight W [out, in]:

    linear    frozen nn.Linear:                      y = x·Wᵀ + b
    spectral  SpectralLinear, delta form, rank k:    y = x·Wᵀ + ((x·V) ⊙ d)·Uᵀ + b   (d ≠ 0)
    eager     the same math as a chain of torch ops (what a user would write by hand)
    lora      peft LoRA at rank k, B ≠ 0:            y = x·Wᵀ + b + (α/r)·(x·Aᵀ)·Bᵀ

Phases: ``forward`` (y = f(x)), ``backward`` (autograd from a fixed dy, forward excluded) and
``step`` (forward + backward, gradients to x and the trainable parameters).
"""
from __future__ import annotations

import copy
import json
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from spectral_kernels.nn.spectral_linear import SpectralLinear

PHASES = ("forward", "backward", "step")
PROVIDERS = ("spectral", "linear", "eager", "lora")


@dataclass(frozen=True)
class BenchConfig:
    tokens: int = 2048
    in_features: int = 1024
    out_features: int = 1024
    rank: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    warmup: int = 3
    reps: int = 15


@dataclass
class BenchRow:
    provider: str
    phase: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    ratio_vs_linear: float | None = None
    note: str = ""


@dataclass
class BenchReport:
    config: BenchConfig
    environment: dict
    rows: list[BenchRow] = field(default_factory=list)
    saved_activation_numel: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"config": asdict(self.config), "environment": self.environment,
             "rows": [asdict(r) for r in self.rows], "saved_activation_numel": self.saved_activation_numel},
            indent=2,
        )


class EagerSpectral(nn.Module):
    """The spectral layer written as the plain chain of torch ops, for comparison."""

    def __init__(self, layer: SpectralLinear) -> None:
        super().__init__()
        self.register_buffer("weight", layer.weight.detach().clone())
        self.register_buffer("bias", layer.bias.detach().clone() if layer.bias is not None else None)
        self.register_buffer("U", layer.U.clone())
        self.register_buffer("V", layer.V.clone())
        self.d = nn.Parameter(layer.coefficient_delta().detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias) + ((x @ self.V) * self.d) @ self.U.t()


def environment(device: str) -> dict:
    """Device, versions and commit, stored with every result."""
    import spectral_kernels

    env = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else _cpu_name(),
        "device_type": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "spectral_kernels": spectral_kernels.__version__,
        "python": platform.python_version(),
        "commit": _git_commit(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def build_providers(cfg: BenchConfig, seed: int = 0) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(providers by name, notes on the providers that could not be built)."""
    torch.manual_seed(seed)
    dtype = getattr(torch, cfg.dtype)
    linear = nn.Linear(cfg.in_features, cfg.out_features, device=cfg.device, dtype=dtype)
    linear.requires_grad_(False)
    spectral = SpectralLinear.from_linear(linear, rank=cfg.rank)
    with torch.no_grad():  # away from the identity: d ≠ 0, as after some training
        spectral.coeffs.add_(0.1 * torch.randn_like(spectral.coeffs))
    providers: dict[str, nn.Module] = {"spectral": spectral, "linear": linear, "eager": EagerSpectral(spectral)}
    notes: dict[str, str] = {}
    lora = _peft_lora(linear, cfg.rank)
    if isinstance(lora, str):
        notes["lora"] = lora
    else:
        providers["lora"] = lora
    return providers, notes


def _peft_lora(linear: nn.Linear, rank: int) -> nn.Module | str:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return "peft is not installed (pip install peft)"

    class Holder(nn.Module):
        def __init__(self, proj: nn.Linear) -> None:
            super().__init__()
            self.proj = proj

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    model = get_peft_model(Holder(copy.deepcopy(linear)), LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"]))
    with torch.no_grad():  # B = 0 would let autograd skip work; a trained adapter has B ≠ 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def phase_fn(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, phase: str) -> Callable[[], None]:
    """A closure running one phase once. ``backward`` re-runs a retained graph."""
    params = [p for p in module.parameters() if p.requires_grad]

    def clear() -> None:
        x.grad = None
        for p in params:
            p.grad = None

    if phase == "forward":
        def run() -> None:
            with torch.no_grad():
                module(x)
        return run
    if phase == "step":
        def run() -> None:
            clear()
            module(x).backward(dy)
        return run
    if phase == "backward":
        y = module(x)

        def run() -> None:
            clear()
            y.backward(dy, retain_graph=True)
        return run
    raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


def time_ms(fn: Callable[[], None], device: str, warmup: int, reps: int) -> list[float]:
    """Wall times of ``reps`` calls in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def saved_activation_numel(module: nn.Module, x: torch.Tensor) -> int:
    """Elements of the tensors autograd saves for backward that are not the module's own
    parameters or buffers (i.e. activations)."""
    own = {t.data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    seen: dict[int, int] = {}  # data_ptr -> numel, so a tensor saved twice counts once

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in own:
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(cfg: BenchConfig, providers: tuple[str, ...] = PROVIDERS, phases: tuple[str, ...] = PHASES,
        progress: Callable[[str], None] | None = None) -> BenchReport:
    """Time every provider and phase, interleaving providers round by round so that machine
    drift hits all of them alike; ratios are against the frozen nn.Linear of the same run.
    ``progress`` (e.g. print) is called with one line per step: building, each phase's rounds, the end."""
    say = progress or (lambda message: None)
    say(f"building the layers (truncated SVD of a {cfg.out_features}×{cfg.in_features} weight, rank {cfg.rank})")
    built, notes = build_providers(cfg)
    dtype = getattr(torch, cfg.dtype)
    x = torch.randn(cfg.tokens, cfg.in_features, device=cfg.device, dtype=dtype, requires_grad=True)
    dy = torch.randn(cfg.tokens, cfg.out_features, device=cfg.device, dtype=dtype)
    report = BenchReport(cfg, environment(cfg.device))
    names = [p for p in providers if p in built]
    rounds = 3
    for phase in phases:
        fns = {p: phase_fn(built[p], x, dy, phase) for p in names}
        times: dict[str, list[float]] = {p: [] for p in names}
        for r in range(rounds):
            for p in names:
                times[p] += time_ms(fns[p], cfg.device, cfg.warmup if r == 0 else 1, max(1, cfg.reps // rounds))
            say(f"{phase}: round {r + 1}/{rounds} timed ({', '.join(names)})")
        base = statistics.median(times["linear"]) if "linear" in times else None
        for p in names:
            med = statistics.median(times[p])
            report.rows.append(BenchRow(p, phase, med, quantile(times[p], 0.2), quantile(times[p], 0.8),
                                        med / base if base else None))
    for p in providers:
        if p in notes:
            report.rows.append(BenchRow(p, "-", float("nan"), float("nan"), float("nan"), None, notes[p]))
    say("counting the activations each provider saves for backward")
    report.saved_activation_numel = {p: saved_activation_numel(built[p], x) for p in names}
    return report


def format_table(report: BenchReport) -> str:
    """A plain-text table of the report, one row per provider and phase."""
    cfg = report.config
    lines = [
        f"T={cfg.tokens} in={cfg.in_features} out={cfg.out_features} k={cfg.rank} {cfg.dtype} "
        f"on {report.environment['device']} ({cfg.device})",
        f"{'provider':<10} {'phase':<9} {'median ms':>10} {'p20 ms':>9} {'p80 ms':>9} {'× linear':>9}",
    ]
    for r in report.rows:
        if r.note:
            lines.append(f"{r.provider:<10} skipped: {r.note}")
            continue
        ratio = f"{r.ratio_vs_linear:.3f}" if r.ratio_vs_linear is not None else "-"
        lines.append(f"{r.provider:<10} {r.phase:<9} {r.median_ms:>10.3f} {r.p20_ms:>9.3f} {r.p80_ms:>9.3f} {ratio:>9}")
    if report.saved_activation_numel:
        saved = ", ".join(f"{p}={n}" for p, n in report.saved_activation_numel.items())
        lines.append(f"activations saved for backward (elements): {saved}; T·k = {cfg.tokens * cfg.rank}")
    return "\n".join(lines)
