"""The GPU goals of spectral_linear, each a ratio measured in one run (issue: GPU verification).

    python benchmarks/gpu/bench_goals.py --out OUTDIR [--sections main,pure,decode,parts,sweep,candidates]
        [--ranks 16,64] [--tag NAME] [--summary FILE.md]

Sections (bf16 unless said otherwise):

- ``main``: T=8192, in=out=4096, delta form, k ∈ {16, 64, 256}; forward and forward+backward (x and
  d require grad) of the op on each backend against a frozen nn.Linear, peft LoRA at equal rank,
  the eager torch chain and torch.compile of it. Goal: ≤ 1.05× linear, ≥ 1.3× faster than LoRA,
  eager and compiled (k = 16, 64).
- ``pure``: pure form at full rank (k = in = out = 4096) against two cuBLAS GEMMs
  ((x·V) ⊙ d)·Uᵀ and materialise-then-dense (W' = (U ⊙ d)·Vᵀ, x·W'ᵀ). Goal: ≤ 1.1× the best.
- ``decode``: T ∈ {1, 4, 16} on 4096×4096 and 11008×4096 (out × in), k ∈ {16, 64}: the bytes the
  plan must read and write over the time, against the device-to-device copy bandwidth measured
  here. Timed as CUDA-graph replays over enough weight sets to overflow L2. Goal: ≥ 80 %.
- ``parts``: the pieces a plan is made of (cuBLAS dense GEMMs, thin GEMMs, the weight fold, the
  Triton kernels alone), to see where the time goes.
- ``sweep``: time vs T (1 … 16384) for the op (auto), nn.Linear and LoRA, k = 16; a PNG.
- ``candidates``: the fused-plan candidates of benchmarks/gpu/candidates.py (fold once per step
  reused by the backward, with and without z and g as extra GEMM columns; extra columns without
  the fold) beside nn.Linear, the op on each backend and the eager chain, T = 8192, 4096².

``--ranks`` replaces the k values of main, decode, parts and candidates. Ceilings measured in the
same run: an 8192³ bf16 GEMM on random data and a 1 GiB device copy. Writes goals.json (goals_TAG.json
with ``--tag``), the summary table (summary_bench.md, or ``--summary``) and time_vs_tokens.png
(sweep) into OUTDIR.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import spectral_kernels as sk  # noqa: E402
from spectral_kernels.backends import backend_status  # noqa: E402
from spectral_kernels.benchmarking import _peft_lora, environment  # noqa: E402

DEV = "cuda"


# --- timing ---------------------------------------------------------------------------------------
def bench(fn, *, rep: int = 100) -> dict:
    """Median and 20/80 % quantiles in ms (triton do_bench: events, L2 flushed before each call)."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}


def bench_graph(fn, *, rep: int = 100) -> float:
    """Median ms of CUDA-graph replays of fn (no launch gaps, no host overhead)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def measure_ceilings() -> dict:
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    gemm = bench(lambda: a @ b)["median_ms"]
    src = torch.randn(2**28, device=DEV)  # 1 GiB
    dst = torch.empty_like(src)
    copy = bench(lambda: dst.copy_(src))["median_ms"]
    del a, b, src, dst
    return {"bf16_gemm_tflops": 2 * n**3 / (gemm * 1e-3) / 1e12,
            "copy_gbps": 2 * 2**30 / (copy * 1e-3) / 1e9, "gemm_n": n, "copy_bytes": 2**30}


def roofline_ms(flops: float, moved: float, ceil: dict) -> float:
    return 1e3 * max(flops / (ceil["bf16_gemm_tflops"] * 1e12), moved / (ceil["copy_gbps"] * 1e9))


# --- partial results --------------------------------------------------------------------------------
class _TimeUp(Exception):
    """SIGTERM (run.sh's ``timeout``) inside a section: keep what it measured."""


#: The row lists of the running section (main, decode and candidates append as they measure), so
#: that a section stopped by the time limit or an error still reports the rows it has.
_PARTIAL: list[list[dict]] = []


def _section_rows() -> list[dict]:
    rows: list[dict] = []
    _PARTIAL.append(rows)
    return rows


def _on_sigterm(signum, frame):
    raise _TimeUp()


# --- operands ----------------------------------------------------------------------------------------
def operands(T, n_in, n_out, k, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=DEV, dtype=torch.float32, generator=g)  # noqa: E731
    x = r(T, n_in).to(dtype).requires_grad_(True)
    W = (r(n_out, n_in) / n_in**0.5).to(dtype)
    b = r(n_out).to(dtype)
    U = (r(n_out, k) / k**0.5).to(dtype)
    V = (r(n_in, k) / n_in**0.5).to(dtype)
    d = (0.1 * r(k)).to(dtype).requires_grad_(True)
    dy = r(T, n_out).to(dtype)
    return x, W, b, U, V, d, dy


def step(fwd, tensors, dy):
    """forward + backward from a fixed dy, gradients cleared first."""
    def run():
        for t in tensors:
            t.grad = None
        fwd().backward(dy)
    return run


def no_grad(fwd):
    def run():
        with torch.no_grad():
            fwd()
    return run


def spectral_backends() -> list[str]:
    return [n for n in ("triton", "cuda") if backend_status(n, torch.device(DEV)).available]


# --- sections --------------------------------------------------------------------------------------------
def section_main(ceil: dict, ranks=(16, 64, 256), T=8192, n=4096) -> list[dict]:
    rows = _section_rows()
    for k in ranks:
        x, W, b, U, V, d, dy = operands(T, n, n, k)
        eager = lambda: F.linear(x, W, b) + ((x @ V) * d) @ U.t()  # noqa: E731
        compiled = torch.compile(lambda x, d: F.linear(x, W, b) + ((x @ V) * d) @ U.t())
        linear = torch.nn.Linear(n, n, device=DEV, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(W)
            linear.bias.copy_(b)
        linear.requires_grad_(False)
        lora = _peft_lora(linear, k)
        lora_params = [p for p in lora.parameters() if p.requires_grad] if not isinstance(lora, str) else []
        providers = {"linear": (lambda: F.linear(x, W, b), [x])}
        for name in ["torch"] + spectral_backends() + ["auto"]:
            providers[f"spectral[{name}]"] = (lambda name=name: sk.spectral_linear(x, U, d, V, b, W, backend=name), [x, d])
        providers["eager"] = (eager, [x, d])
        if not isinstance(lora, str):
            # peft keeps the adapter in fp32 over a bf16 base by default (autocast_adapter_dtype);
            # "lora[bf16]" is the same adapter cast to the base's dtype.
            lora16 = copy.deepcopy(lora).to(torch.bfloat16)
            providers["lora"] = (lambda: lora(x), [x, *lora_params])
            providers["lora[bf16]"] = (lambda: lora16(x), [x, *[p for p in lora16.parameters() if p.requires_grad]])
        # last: its first call in each phase compiles (tens of seconds on a fresh machine)
        providers["compiled"] = (lambda: compiled(x, d), [x, d])
        flops_dense = 2.0 * T * n * n
        for phase in ("forward", "forward+backward"):
            times = {}
            for name, (fwd, grads) in providers.items():
                fn = no_grad(fwd) if phase == "forward" else step(fwd, grads, dy)
                times[name] = bench(fn)
            times["linear (again)"] = bench(no_grad(providers["linear"][0]) if phase == "forward"
                                            else step(providers["linear"][0], [x], dy))
            mult = 1 if phase == "forward" else 2
            floor = roofline_ms(mult * flops_dense, mult * 2 * (T * n * 2 + n * n), ceil)
            base = times["linear"]["median_ms"]
            for name, t in times.items():
                rows.append({"section": "main", "k": k, "phase": phase, "provider": name, **t,
                             "ratio_vs_linear": t["median_ms"] / base,
                             "dense_floor_ms": floor,
                             "dense_tflops": mult * flops_dense / (t["median_ms"] * 1e-3) / 1e12})
        del x, W, b, U, V, d, dy, lora, linear, compiled, providers
        torch.cuda.empty_cache()
    return rows


def section_pure(ceil: dict, T=8192, n=4096) -> list[dict]:
    x, W, b, U, V, d, dy = operands(T, n, n, n)
    providers = {
        "spectral[auto]": lambda: sk.spectral_linear(x, U, d, V, b, None),
        "two_gemms": lambda: torch.addmm(b, (x @ V) * d, U.t()),
        "materialise": lambda: F.linear(x, (U * d) @ V.t(), b),
    }
    for name in ["torch"] + spectral_backends():
        providers[f"spectral[{name}]"] = lambda name=name: sk.spectral_linear(x, U, d, V, b, None, backend=name)
    rows = []
    for phase in ("forward", "forward+backward"):
        for name, fwd in providers.items():
            t = bench(no_grad(fwd) if phase == "forward" else step(fwd, [x, d], dy))
            rows.append({"section": "pure", "k": n, "phase": phase, "provider": name, **t})
    return rows


def section_decode(ceil: dict, shapes=((4096, 4096), (11008, 4096)), tokens=(1, 4, 16), ranks=(16, 64)) -> list[dict]:
    """Graph replays over enough weight sets that the weights come from HBM, not L2."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = _section_rows()
    for n_out, n_in in shapes:
        w_bytes = n_out * n_in * 2
        sets = max(2, -(-3 * l2 // w_bytes))
        for k in ranks:
            ops = [operands(16, n_in, n_out, k, seed=s) for s in range(sets)]
            for T in tokens:
                providers = {"linear": lambda o, T=T: F.linear(o[0][:T], o[1], o[2]),
                             "eager": lambda o, T=T: F.linear(o[0][:T], o[1], o[2]) + ((o[0][:T] @ o[4]) * o[5]) @ o[3].t()}
                for name in ["torch"] + spectral_backends() + ["auto"]:
                    providers[f"spectral[{name}]"] = lambda o, T=T, name=name: sk.spectral_linear(
                        o[0][:T], o[3], o[5], o[4], o[2], o[1], backend=name)
                moved = 2 * (n_out * n_in + (n_out + n_in) * k + T * (n_in + n_out + k) + n_out + k)
                for name, fwd in providers.items():
                    def run_all(fwd=fwd):
                        with torch.no_grad():
                            for o in ops:
                                fwd(o)
                    try:
                        ms = bench_graph(run_all) / sets
                        eager_ms = bench(run_all)["median_ms"] / sets
                    except Exception as exc:  # a provider that cannot be captured is reported, not fatal
                        rows.append({"section": "decode", "provider": name, "error": repr(exc)[:300]})
                        continue
                    gbps = moved / (ms * 1e-3) / 1e9
                    rows.append({"section": "decode", "out": n_out, "in": n_in, "k": k, "tokens": T,
                                 "provider": name, "graph_ms": ms, "eager_ms": eager_ms, "bytes": moved,
                                 "gbps": gbps, "fraction_of_copy": gbps / ceil["copy_gbps"]})
            del ops
            torch.cuda.empty_cache()
    return rows


def section_parts(ceil: dict, T=8192, n=4096, ranks=(16, 64, 256)) -> list[dict]:
    from spectral_kernels.ops import spectral_linear_triton as tri

    rows = []
    for k in ranks:
        x, W, b, U, V, d, dy = operands(T, n, n, k)
        x = x.detach()
        d = d.detach()
        z = x @ V
        Wcat = torch.cat([W, V.t()], 0)
        parts = {
            "cublas x·Wᵀ": lambda: x @ W.t(),
            "cublas dy·W": lambda: dy @ W,
            "cublas x·[W;Vᵀ]ᵀ": lambda: x @ Wcat.t(),
            "cublas x·V": lambda: x @ V,
            "cublas fold W+(U⊙d)Vᵀ": lambda: torch.addmm(W, U * d, V.t()),
            "cublas y += (z⊙d)Uᵀ": lambda: torch.addmm(b, z * d, U.t()),
            "triton project x·V": lambda: tri.lowrank_project(x, V),
            "triton project dy·U + dd": lambda: tri.lowrank_project(dy, U, aux=z),
            "triton dense+lowrank fwd": lambda: tri.dense_plus_lowrank(x, W, z, d, U, b),
            "triton dense+lowrank bwd": lambda: tri.dense_plus_lowrank(dy, W, z, d, V, None, w_transposed=True),
        }
        if "cuda" in spectral_backends():
            from spectral_kernels.ops import spectral_linear_cuda as cu

            parts["cuda mma fwd"] = lambda: cu._cuda_lowrank_gemm(x, W.t(), z, U.t(), d, b)
        for name, fn in parts.items():
            t = bench(fn)
            rows.append({"section": "parts", "k": k, "provider": name, **t})
        del x, W, b, U, V, d, dy, z, Wcat
        torch.cuda.empty_cache()
    return rows


def section_candidates(ceil: dict, T=8192, n=4096, ranks=(16, 64)) -> list[dict]:
    """The candidates of candidates.py against nn.Linear, the op and the eager chain; each
    candidate's y, z, dx and dd are first checked against the torch chain in float32 arithmetic."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from candidates import candidates

    rows = _section_rows()
    for k in ranks:
        x, W, b, U, V, d, dy = operands(T, n, n, k)
        providers = {"linear": (lambda: F.linear(x, W, b), [x])}
        for name in ["torch"] + spectral_backends() + ["auto"]:
            providers[f"spectral[{name}]"] = (lambda name=name: sk.spectral_linear(x, U, d, V, b, W, backend=name), [x, d])
        providers["eager"] = (lambda: F.linear(x, W, b) + ((x @ V) * d) @ U.t(), [x, d])
        for name, fn in candidates(W, U, V).items():
            err = _candidate_error(fn, x, W, U, d, V, b, dy)
            rows.append({"section": "candidates", "k": k, "phase": "check", "provider": name, **err})
            providers[name] = (lambda fn=fn: fn(x, W, U, d, V, b)[0], [x, d])
        for phase in ("forward", "forward+backward"):
            times = {name: bench(no_grad(fwd) if phase == "forward" else step(fwd, grads, dy))
                     for name, (fwd, grads) in providers.items()}
            base = times["linear"]["median_ms"]
            rows += [{"section": "candidates", "k": k, "phase": phase, "provider": name, **t,
                      "ratio_vs_linear": t["median_ms"] / base} for name, t in times.items()]
        del x, W, b, U, V, d, dy, providers
        torch.cuda.empty_cache()
    return rows


def _candidate_error(fn, x, W, U, d, V, b, dy) -> dict:
    """Relative errors of a candidate's y, dx and dd against the eager chain computed in float32
    from the same bf16 operands (a wrong candidate must not get timed as if it were right)."""
    def run(f, *args):
        xs, ds = x.detach().clone().requires_grad_(True), d.detach().clone().requires_grad_(True)
        y = f(xs, ds, *args)
        y.backward(dy.to(y.dtype))
        return y.detach().float(), xs.grad.float(), ds.grad.float()

    ours = run(lambda xs, ds: fn(xs, W, U, ds, V, b)[0])
    f32 = lambda t: t.float()  # noqa: E731
    ref = run(lambda xs, ds: F.linear(f32(xs), f32(W), f32(b)) + ((f32(xs) @ f32(V)) * f32(ds)) @ f32(U).t())
    return {f"rel_err_{key}": float((a - r).norm() / r.norm()) for key, a, r in zip(("y", "dx", "dd"), ours, ref)}


def section_sweep(ceil: dict, out_dir: Path, n=4096, k=16) -> list[dict]:
    rows = []
    linear = torch.nn.Linear(n, n, device=DEV, dtype=torch.bfloat16).requires_grad_(False)
    lora = _peft_lora(linear, k)
    for T in [2**i for i in range(15)]:
        x, W, b, U, V, d, dy = operands(T, n, n, k)
        with torch.no_grad():
            linear.weight.copy_(W)
            linear.bias.copy_(b)
        providers = {"spectral[auto]": (lambda: sk.spectral_linear(x, U, d, V, b, W), [x, d]),
                     "linear": (lambda: linear(x), [x])}
        if not isinstance(lora, str):
            providers["lora"] = (lambda: lora(x), [x] + [p for p in lora.parameters() if p.requires_grad])
        for phase in ("forward", "forward+backward"):
            for name, (fwd, grads) in providers.items():
                t = bench(no_grad(fwd) if phase == "forward" else step(fwd, grads, dy), rep=50)
                rows.append({"section": "sweep", "tokens": T, "k": k, "phase": phase, "provider": name, **t})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, phase in zip(axes, ("forward", "forward+backward")):
            for name in ("spectral[auto]", "linear", "lora"):
                pts = [(r["tokens"], r["median_ms"]) for r in rows if r["phase"] == phase and r["provider"] == name]
                if pts:
                    ax.loglog(*zip(*pts), marker="o", label=name)
            ax.set_xlabel("tokens T")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{phase}, bf16, {n}×{n}, k={k}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "time_vs_tokens.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no PNG")
    return rows


# --- report ---------------------------------------------------------------------------------------------
def summarize(rows: list[dict], ceil: dict) -> str:
    lines = [f"ceilings: bf16 GEMM {ceil['bf16_gemm_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} GB/s", ""]
    main = [r for r in rows if r["section"] == "main"]
    if main:
        lines += ["| k | phase | provider | median ms | × linear |", "|---|---|---|---|---|"]
        lines += [f"| {r['k']} | {r['phase']} | {r['provider']} | {r['median_ms']:.3f} | {r['ratio_vs_linear']:.3f} |" for r in main]
        lines.append("")
    pure = [r for r in rows if r["section"] == "pure"]
    if pure:
        lines += ["| pure k=4096 | provider | median ms |", "|---|---|---|"]
        lines += [f"| {r['phase']} | {r['provider']} | {r['median_ms']:.3f} |" for r in pure]
        lines.append("")
    dec = [r for r in rows if r["section"] == "decode" and "gbps" in r]
    if dec:
        lines += ["| out×in | k | T | provider | graph µs | eager µs | GB/s | of copy |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['out']}×{r['in']} | {r['k']} | {r['tokens']} | {r['provider']} | {1e3 * r['graph_ms']:.1f} | "
                  f"{1e3 * r['eager_ms']:.1f} | {r['gbps']:.0f} | {r['fraction_of_copy']:.2f} |" for r in dec]
        lines.append("")
    lines += [f"- decode error {r['provider']}: {r['error']}" for r in rows if r.get("error")]
    parts = [r for r in rows if r["section"] == "parts"]
    if parts:
        lines += ["| k | part | median ms |", "|---|---|---|"]
        lines += [f"| {r['k']} | {r['provider']} | {r['median_ms']:.4f} |" for r in parts]
        lines.append("")
    cand = [r for r in rows if r["section"] == "candidates" and r["phase"] != "check"]
    if cand:
        lines += ["| candidates k | phase | provider | median ms | × linear |", "|---|---|---|---|---|"]
        lines += [f"| {r['k']} | {r['phase']} | {r['provider']} | {r['median_ms']:.3f} | {r['ratio_vs_linear']:.3f} |"
                  for r in cand]
        lines.append("")
    checks = [r for r in rows if r["section"] == "candidates" and r["phase"] == "check"]
    if checks:
        lines += ["| candidate k | rel. error y | dx | dd (vs the fp32 chain) |", "|---|---|---|---|"]
        lines += [f"| {r['provider']} {r['k']} | {r['rel_err_y']:.1e} | {r['rel_err_dx']:.1e} | {r['rel_err_dd']:.1e} |"
                  for r in checks]
        lines.append("")
    sweep = [r for r in rows if r["section"] == "sweep"]
    if sweep:
        lines += ["| T | phase | provider | median ms |", "|---|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['phase']} | {r['provider']} | {r['median_ms']:.4f} |" for r in sweep]
    return "\n".join(lines) + "\n"


SECTIONS = {"main": section_main, "parts": section_parts, "decode": section_decode, "pure": section_pure,
            "candidates": section_candidates}
RANKED = {"main", "parts", "decode", "candidates"}  # sections whose k values --ranks replaces


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default="main,parts,decode,pure,sweep")
    ap.add_argument("--ranks", default=None, help="comma-separated k values for main, parts, decode, candidates")
    ap.add_argument("--tag", default=None, help="write goals_TAG.json instead of goals.json")
    ap.add_argument("--summary", default=None, help="summary table path (default OUTDIR/summary_bench.md)")
    args = ap.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS) - {"sweep"}
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join([*SECTIONS, 'sweep'])}")
    if not torch.cuda.is_available():
        print("bench_goals: no CUDA device is visible; nothing measured")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment("cuda")
    env["commit"] = os.environ.get("SK_COMMIT") or env.get("commit")
    env["cuda"] = torch.version.cuda
    ceil = measure_ceilings()
    print(f"ceilings: {ceil}", flush=True)
    rows: list[dict] = []
    timings = {}
    ranks = {"ranks": tuple(int(k) for k in args.ranks.split(","))} if args.ranks else {}
    results = out / (f"goals_{args.tag}.json" if args.tag else "goals.json")
    signal.signal(signal.SIGTERM, _on_sigterm)
    stopped = False
    for name in args.sections.split(","):
        t0 = time.time()
        _PARTIAL.clear()
        try:
            rows += section_sweep(ceil, out) if name == "sweep" else SECTIONS[name](ceil, **(ranks if name in RANKED else {}))
        except _TimeUp:
            rows += [r for part in _PARTIAL for r in part]
            rows.append({"section": name, "provider": "-",
                         "error": "stopped by the time limit (SIGTERM); the rows measured before are kept"})
            stopped = True
        except Exception as exc:  # one broken section must not lose the others' numbers
            import traceback

            traceback.print_exc()
            rows += [r for part in _PARTIAL for r in part]
            rows.append({"section": name, "provider": "-", "error": repr(exc)[:500]})
        timings[name] = time.time() - t0
        print(f"section {name}: {timings[name]:.0f} s", flush=True)
        results.write_text(json.dumps({"environment": env, "ceilings": ceil, "rows": rows,
                                       "section_seconds": timings}, indent=1) + "\n")
        if stopped:
            break
    summary = summarize([r for r in rows if "error" not in r or r["section"] == "decode"], ceil)
    summary += "".join(f"- section {r['section']} error: {r['error']}\n" for r in rows if r.get("error") and r["section"] != "decode")
    Path(args.summary or out / "summary_bench.md").write_text(summary)
    print(summary)
    return 124 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
