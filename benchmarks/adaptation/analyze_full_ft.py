"""Spectral analysis of full fine-tuning vs the pretrained MiniLM-L6 (after run_tasks.py --save-full DIR).

Runs ``spectral-kernels analyze`` on the 36 encoder linears of the base and of the fully fine-tuned
encoders of the two tasks, and the same against a null model: for each task, the base plus a Gaussian
perturbation of the same Frobenius norm as that task's update, layer by layer (seeded). Fine-tuning
"keeps the top singular vectors" only means something when compared with what an update of that size
does when it has no structure; "amplifies the top singular values" likewise.

    python benchmarks/adaptation/run_tasks.py --methods full --save-full /tmp/repro/weights
    python benchmarks/adaptation/analyze_full_ft.py --weights /tmp/repro/weights

    # the large-update fine-tunings of sweep.py --phases large (<task>_full_large.safetensors)
    python benchmarks/adaptation/analyze_full_ft.py --weights /tmp/repro/weights --suffix full_large \
        --out benchmarks/adaptation/results/analysis_large
    python benchmarks/adaptation/analyze_full_ft.py --weights /tmp/repro/weights --suffix full_large600 \
        --tasks tweets --out benchmarks/adaptation/results/analysis_large600
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import model_dir  # noqa: E402

from spectral_kernels.analysis import load_state_dict  # noqa: E402
from spectral_kernels.cli import main as cli  # noqa: E402

INCLUDE = r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)\.weight"


def null_model(base: dict, tuned: dict, seed: int) -> dict:
    """base + G_l·‖ΔW_l‖/‖G_l‖ for every 2-D weight (G_l Gaussian), other entries copied from base."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in base.items():
        if w.dim() == 2 and w.dtype.is_floating_point and k in tuned and tuned[k].shape == w.shape:
            d = (tuned[k].float() - w.float()).norm()
            G = torch.randn(w.shape, generator=g)
            out[k] = (w.float() + G * (d / G.norm())).contiguous()
        else:
            out[k] = w
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="/tmp/repro/weights", help="folder with <task>_full.safetensors")
    ap.add_argument("--suffix", default="full", help="the weights are <task>_<suffix>.safetensors")
    ap.add_argument("--tasks", default="movies,tweets", help="comma-separated; the shared-basis section needs two")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--out", default=str(HERE / "results" / "analysis"))
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    base_path = model_dir() / "model.safetensors"
    w = Path(args.weights)
    tuned = [w / f"{task}_{args.suffix}.safetensors" for task in args.tasks.split(",")]
    base = load_state_dict(base_path)
    nulls = []
    for i, t in enumerate(tuned):
        p = w / f"{t.stem.split('_')[0]}_{args.suffix}_null.safetensors"
        save_file(null_model(base, load_state_dict(t), seed=i), str(p))
        nulls.append(p)
    common = ["--k", str(args.k), "--include", INCLUDE, "--no-progress"]
    rc = cli(["analyze", str(base_path), *map(str, tuned), "--out", args.out, *common])
    rc |= cli(["analyze", str(base_path), *map(str, nulls), "--out", args.out + "_null", *common])
    # headline numbers across the 36 matrices, fine-tuned and null side by side
    head = {}
    for tag, folder in (("full_ft", args.out), ("null", args.out + "_null")):
        data = json.loads((Path(folder) / "analysis.json").read_text())
        for label, t in data["tuned"].items():
            L = list(t["layers"].values())
            mean = lambda f: sum(f(x) for x in L) / len(L)  # noqa: E731
            head[f"{tag}:{label}"] = {
                "n_layers": len(L),
                "rel_change_mean": mean(lambda x: x["relative_change"]),
                "rel_change_min": min(x["relative_change"] for x in L),
                "rel_change_max": max(x["relative_change"] for x in L),
                "sv_ratio_1_mean": mean(lambda x: x["sv_ratio"][0]),
                "sv_ratio_top4_mean": mean(lambda x: sum(x["sv_ratio"][:4]) / 4),
                "sv_ratio_rest_mean": mean(lambda x: sum(x["sv_ratio"][4:]) / len(x["sv_ratio"][4:])),
                "align_u1_mean": mean(lambda x: x["alignment"][0]),
                "align_top4_mean": mean(lambda x: sum(x["alignment"][:4]) / 4),
                "sim_u_mean": mean(lambda x: x["subspace_similarity"]),
                "sim_v_mean": mean(lambda x: x["subspace_similarity_v"]),
                "sim_u_min": min(x["subspace_similarity"] for x in L),
            }
        sb = data.get("shared_basis")
        if sb:
            L = list(sb["layers"].values())
            head[f"{tag}:shared"] = {
                "pair_sim_u_mean": sum(x["pairwise_u"][0][1] for x in L) / len(L),
                "delta_pair_sim_u_mean": sum(x["delta_pairwise_u"][0][1] for x in L) / len(L),
                "delta_pair_sim_v_mean": sum(x["delta_pairwise_v"][0][1] for x in L) / len(L),
                "chance_u_mean": sum(x["chance_u"] for x in L) / len(L),
                "chance_v_mean": sum(x["chance_v"] for x in L) / len(L),
            }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "headline.json").write_text(json.dumps(head, indent=1))
    for k, v in head.items():
        print(k, {a: round(b, 4) for a, b in v.items()})
    return rc


if __name__ == "__main__":
    sys.exit(main())
