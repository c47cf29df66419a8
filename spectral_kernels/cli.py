"""The ``spectral-kernels`` command.

    spectral-kernels info                  versions, backends (and why each is or is not available), device
    spectral-kernels bench [--json PATH]   SpectralLinear vs frozen nn.Linear vs eager chain vs peft LoRA
    spectral-kernels analyze BASE TUNED [TUNED ...] --k K --out DIR
                                           how fine-tuning moved each weight's spectrum (markdown, JSON, PNGs);
                                           a TUNED may be a spectral adapter (folder or file), merged into BASE
    spectral-kernels export BASE ADAPTER OUT [--format peft|merged]
                                           a peft LoRA folder (peft, vLLM, SGLang) or a merged checkpoint
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

# The parser is built from argparse alone: torch and the package's modules are imported inside each
# subcommand's function, when its work starts, so that --help answers at once (tests/test_cli.py
# checks it). One function per subcommand, registered in build_parser().


def _info(_: argparse.Namespace) -> int:
    import torch

    import spectral_kernels
    from spectral_kernels import _ext
    from spectral_kernels.backends import BACKENDS, backend_status, requested_backend
    from spectral_kernels.benchmarking import environment

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(device)
    print(f"spectral-kernels {spectral_kernels.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {env['triton'] or 'not installed'}")
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    print(f"torch build: {cuda}")
    print(f"GPU: {_ext.gpu_summary()}")
    print(f"device: {env['device']} ({device})")
    print(f"compiled extension: {_extension_summary(_ext)}")
    print(f"requested backend (argument default, context, SPECTRAL_KERNELS_BACKEND): {requested_backend()}")
    print("backends on this device:")
    for name in BACKENDS:
        if name == "auto":
            continue
        status = backend_status(name, torch.device(device))
        print(f"  {name:<7} {'available' if status.available else 'unavailable'}: {status.reason}")
    return 0


def _extension_summary(ext) -> str:
    # built or not (and how to rebuild), compiled architectures, CUDA runtime, visible devices
    return ext.extension_summary()


def _bench(args: argparse.Namespace) -> int:
    import torch

    from spectral_kernels.benchmarking import PHASES, PROVIDERS, BenchConfig, format_table, run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = BenchConfig(tokens=args.tokens, in_features=args.in_features, out_features=args.out_features,
                      rank=args.rank, dtype=args.dtype, device=device, warmup=args.warmup, reps=args.reps)
    providers = tuple(args.providers.split(",")) if args.providers else PROVIDERS
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        print(f"error: unknown provider(s) {unknown}; expected a comma list of {PROVIDERS}", file=sys.stderr)
        return 2
    start = time.perf_counter()

    def progress(message: str) -> None:  # a line per step on stderr, so that a long run is never silent
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)

    report = run(cfg, providers, PHASES, progress=None if args.quiet else progress)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
        print(f"saved {args.json}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    import importlib.util
    import json
    from pathlib import Path

    from spectral_kernels.analysis import (compare, load_state_dict, load_tuned, shared_basis, shared_summary,
                                           summarize, to_json)
    from spectral_kernels.analysis.report import MATPLOTLIB_HINT, plot_all, plot_shared

    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        print(f"error: {MATPLOTLIB_HINT} (or pass --no-plots)", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = False if args.no_progress else None
    paths = [args.base, *args.tuned]
    labels = _labels(args.tuned)
    states = {}
    for i, path in enumerate(tqdm(paths, desc="loading", unit="model", disable=args.no_progress)):
        try:  # a tuned path may be a spectral adapter (folder or file): merged into the base
            states[path] = load_state_dict(path) if i == 0 else load_tuned(path, states[args.base])
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    base = states[args.base]
    md = [f"# spectral analysis\n\nbase: `{args.base}`, k = {args.k}\n"]
    result: dict = {"base": str(args.base), "k": args.k, "tuned": {}}
    plots = []
    for label, path in tqdm(list(zip(labels, args.tuned)), desc="comparing", unit="model", disable=args.no_progress):
        reports = compare(base, states[path], k=args.k, include=args.include, exclude=args.exclude,
                          gap_tol=args.gap_tol, progress=progress)
        md.append(summarize(reports, title=f"{label} (`{path}`) vs base"))
        result["tuned"][label] = {"path": str(path), "layers": reports}
        if not args.no_plots:
            plots += plot_all(reports, out, prefix=f"{label}_")
    if len(args.tuned) > 1:
        shared = shared_basis(base, [states[p] for p in args.tuned], k=args.k, include=args.include,
                              exclude=args.exclude, progress=progress)
        md.append(shared_summary(shared, labels))
        result["shared_basis"] = {"labels": labels, "layers": shared}
        if not args.no_plots:
            plots.append(plot_shared(shared, labels, out))
    if plots:
        md.append("## plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n")
    (out / "summary.md").write_text("\n".join(md))
    (out / "analysis.json").write_text(to_json(result))
    json.loads((out / "analysis.json").read_text())  # valid JSON, no NaN
    print(f"wrote {out / 'summary.md'}, {out / 'analysis.json'} and {len(plots)} plot(s) to {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import os

    from tqdm.auto import tqdm

    import spectral_kernels as sk
    from spectral_kernels.tuning.merged_checkpoint import adapter_file

    if adapter_file(args.adapter) is None:
        what = "does not exist" if not os.path.exists(args.adapter) else "is not a spectral adapter"
        print(f"error: ADAPTER {args.adapter!r} {what}: expected a folder written by spectral_kernels.save_pretrained "
              "(with spectral_config.json) or a .safetensors file written by spectral_kernels.save_adapter",
              file=sys.stderr)
        return 2
    progress = False if args.no_progress else None
    steps = tqdm(total=3, desc="export", unit="step", disable=progress is False)
    steps.set_postfix_str("loading the base")
    trained_on = None  # the model class the adapter was trained on, when its folder says
    if os.path.isdir(args.adapter):
        from spectral_kernels.tuning.folder import read_folder

        trained_on = read_folder(args.adapter).get("base_model_class")
    try:
        model = _load_base(args.base, trained_on)
    except (OSError, ValueError) as exc:
        print(f"error: cannot load BASE {args.base!r} with transformers: {exc}", file=sys.stderr)
        return 2
    steps.update()
    steps.set_postfix_str("loading the adapter")
    if os.path.isdir(args.adapter):
        sk.from_pretrained(model, args.adapter)
    else:
        sk.load_adapter(model, args.adapter)
    steps.update()
    steps.set_postfix_str(f"writing {args.format}")
    try:
        if args.format == "peft":
            rank = None if args.rank == "own" else int(args.rank) if args.rank.isdigit() else args.rank
            written = sk.export_peft(model, args.out, adapter=args.adapter_name, rank=rank, dtype=args.dtype,
                                     max_lora_rank=args.max_lora_rank, overwrite=args.overwrite, progress=progress)
        else:
            written = {args.adapter_name or "merged": sk.save_merged(model, args.out, adapter=args.adapter_name,
                                                                     overwrite=args.overwrite)}
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    steps.update()
    steps.close()
    for name, folder in written.items():
        print(f"wrote {args.format} {name!r} to {folder}")
    return 0


def _load_base(base: str, class_name: str | None = None):
    """The base model of a transformers folder or name, in the dtype it was saved in, as
    ``class_name`` (the class an adapter folder was trained on) when transformers has it, else as
    the class its config names, else AutoModel."""
    import transformers

    cls = getattr(transformers, class_name, None) if class_name else None
    if cls is None:
        config = transformers.AutoConfig.from_pretrained(base)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModel
    return cls.from_pretrained(base, dtype="auto").eval()


def _rank(text: str) -> str:
    if text in ("vllm", "max", "own") or (text.isdigit() and int(text) > 0):
        return text
    raise argparse.ArgumentTypeError(f"must be vllm, max, own or a positive integer, got {text!r}")


def _labels(paths: list[str]) -> list[str]:
    """Short unique labels for the tuned models: the file or folder stem, numbered on collisions."""
    from pathlib import Path

    stems = [Path(p).stem if Path(p).suffix else Path(p).name for p in paths]
    out = []
    for i, s in enumerate(stems):
        s = "".join(c if c.isalnum() or c in "-_" else "_" for c in s) or "tuned"
        out.append(s if stems.count(stems[i]) == 1 else f"{i}_{s}")
    return out


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectral-kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends and device").set_defaults(func=_info)
    bench = sub.add_parser("bench", help="time SpectralLinear against nn.Linear, the eager chain and peft LoRA")
    bench.add_argument("--tokens", type=_positive, default=2048, help="T, rows of x (default 2048)")
    bench.add_argument("--in-features", type=_positive, default=1024)
    bench.add_argument("--out-features", type=_positive, default=1024)
    bench.add_argument("--rank", type=_positive, default=16, help="k of SpectralLinear and r of LoRA")
    bench.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    bench.add_argument("--providers", default=None, help="comma list of spectral,linear,eager,lora")
    bench.add_argument("--warmup", type=_positive, default=3)
    bench.add_argument("--reps", type=_positive, default=15, help="timed calls per provider and phase")
    bench.add_argument("--json", metavar="PATH", help="also save the report as JSON")
    bench.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    bench.set_defaults(func=_bench)
    analyze = sub.add_parser("analyze", help="spectral comparison of fine-tuned weights with their base")
    analyze.add_argument("base", help="safetensors file, torch state_dict file or Hugging Face model folder")
    analyze.add_argument("tuned", nargs="+", help="one or more fine-tuned models (same formats), or spectral adapters "
                         "(a folder from sk.save_pretrained, a file from sk.save_adapter), merged into BASE")
    analyze.add_argument("--k", type=_positive, default=16, help="leading singular triplets per weight (default 16)")
    analyze.add_argument("--out", required=True, help="folder for summary.md, analysis.json and the PNG plots")
    analyze.add_argument("--include", default=None, help="regex: only weights whose name matches")
    analyze.add_argument("--exclude", default=None, help="regex: skip weights whose name matches")
    analyze.add_argument("--gap-tol", type=float, default=0.01, help="singular values within this fraction of a "
                         "neighbour's are near-equal: their vectors are aligned as a group (default 0.01)")
    analyze.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
    analyze.add_argument("--no-progress", action="store_true", help="no progress bars")
    analyze.set_defaults(func=_analyze)
    export = sub.add_parser("export", help="write an adapter as a peft LoRA folder (peft, vLLM, SGLang) or a merged "
                            "checkpoint")
    export.add_argument("base", help="the base model: a transformers model folder or hub name (loaded as the class the "
                        "adapter folder records, else its config's architecture)")
    export.add_argument("adapter", help="adapter folder (sk.save_pretrained) or file (sk.save_adapter)")
    export.add_argument("out", help="output folder")
    export.add_argument("--format", choices=["peft", "merged"], default="peft",
                        help="peft: adapter_config.json + adapter_model.safetensors (default); merged: a full "
                        "checkpoint for AutoModel.from_pretrained")
    export.add_argument("--adapter-name", default=None, help="the named adapter to export (default: all for peft, "
                        "the active one for merged)")
    export.add_argument("--rank", type=_rank, default="vllm", help="peft rank: vllm (pad to vLLM's next rank, "
                        "default), max (the largest layer rank), own (each layer's, with rank_pattern) or an integer")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="dtype of the saved LoRA tensors (default: the model's)")
    export.add_argument("--max-lora-rank", type=_positive, default=None,
                        help="warn where a layer's rank exceeds this serving limit")
    export.add_argument("--overwrite", action="store_true", help="replace an adapter or checkpoint already in OUT")
    export.add_argument("--no-progress", action="store_true", help="no progress bars")
    export.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
