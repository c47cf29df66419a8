"""Tables (markdown, JSON) and matplotlib plots of the comparisons."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from spectral_kernels.analysis.comparison import LayerReport, SharedBasisReport, layer_type

__all__ = ["MATPLOTLIB_HINT", "require_matplotlib", "summarize", "shared_summary", "to_json", "plot_all",
           "plot_shared"]

MATPLOTLIB_HINT = "the analysis plots need matplotlib: pip install spectral-kernels[analysis]"


def require_matplotlib():
    """Import matplotlib with the Agg backend, or raise ImportError naming the extra to install."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - exercised through a monkeypatched import
        raise ImportError(MATPLOTLIB_HINT) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _by_type(reports: Mapping[str, LayerReport]) -> dict[str, list[LayerReport]]:
    groups: dict[str, list[LayerReport]] = {}
    for r in reports.values():
        groups.setdefault(layer_type(r.name), []).append(r)
    return groups


def _head(t: torch.Tensor, n: int) -> torch.Tensor:
    return t[: min(n, t.shape[0])]


def summarize(reports: Mapping[str, LayerReport], title: str = "spectral comparison", top: int = 4) -> str:
    """A markdown summary: one row per layer type (means over its layers), then one row per layer."""
    lines = [f"## {title}", "",
             f"sv ratio = s'ᵢ/sᵢ; align = |uᵢ·u'ⱼ| with u'ⱼ the tuned vector uᵢ became (matched, not index by "
             f"index; grouped where singular values are near-equal, see the footnotes below the per-layer "
             f"table); sim = ‖U_kᵀU'_k‖²_F/k (chance k/out); top = mean over i < {top}; rest = mean over "
             f"{top} ≤ i < k.", "",
             "| layer type | n | k | ΔW/W | sv ratio top | sv ratio rest | align U top | align V top "
             "| sim U | sim V | chance U |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for lt, rs in _by_type(reports).items():
        mean = lambda f: sum(f(r) for r in rs) / len(rs)  # noqa: E731
        lines.append(
            f"| {lt} | {len(rs)} | {rs[0].k} | {_fmt(mean(lambda r: r.relative_change))} "
            f"| {_fmt(mean(lambda r: float(torch.nanmean(_head(r.sv_ratio, top)))))} "
            f"| {_fmt(mean(lambda r: float(torch.nanmean(r.sv_ratio[top:])) if r.k > top else math.nan))} "
            f"| {_fmt(mean(lambda r: float(_head(_matched(r, 'u'), top).mean())))} "
            f"| {_fmt(mean(lambda r: float(_head(_matched(r, 'v'), top).mean())))} "
            f"| {_fmt(mean(lambda r: r.subspace_similarity))} | {_fmt(mean(lambda r: r.subspace_similarity_v))} "
            f"| {_fmt(mean(lambda r: r.chance_u))} |")
    lines += ["", "<details><summary>per layer</summary>", "",
              "| layer | shape | ΔW/W | s₁'/s₁ | max sv ratio (i) | align u₁ | sim U | sim V |",
              "|---|---|---|---|---|---|---|---|"]
    marks: set[str] = set()
    for r in reports.values():
        i = int(torch.nan_to_num(r.sv_ratio, nan=-1.0).argmax())
        align, mark = _first_alignment(r)
        marks.update(mark)
        lines.append(f"| {r.name} | {r.shape[0]}×{r.shape[1]} | {_fmt(r.relative_change)} "
                     f"| {_fmt(float(r.sv_ratio[0]))} | {_fmt(float(r.sv_ratio[i]))} ({i}) "
                     f"| {align} | {_fmt(r.subspace_similarity)} | {_fmt(r.subspace_similarity_v)} |")
    lines.append("")
    gap = next((r.gap_tol for r in reports.values()), 0.0)
    if "→" in marks:
        lines.append("→u'ⱼ: training reordered the singular values: u₁ became the tuned model's j-th vector "
                     "(the figure is |u₁·u'ⱼ|; the index-wise |u₁·u'₁| is `alignment` in analysis.json).  ")
    if "†" in marks:
        lines.append(f"†: s₁ is within {gap:.0%} of a neighbouring singular value (in the base or the tuned "
                     "model), so u₁ alone is not well defined: any rotation within the group of near-equal "
                     "values is an equally valid SVD. The figure is the norm of u₁'s projection onto the "
                     "tuned group's span (1 = u₁ stayed in it); read sim U for the subspace.  ")
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def _matched(r: LayerReport, side: str) -> torch.Tensor:
    """The matched alignment (the index-wise one for reports made without it)."""
    matched = r.matched_alignment_u if side == "u" else r.matched_alignment_v
    return matched if matched.numel() else (r.alignment_u if side == "u" else r.alignment_v)


def _first_alignment(r: LayerReport) -> tuple[str, set[str]]:
    """The per-layer table's "align u₁" cell and the footnote marks it uses."""
    if not r.matched_alignment_u.numel():
        return _fmt(float(r.alignment_u[0])), set()
    text, marks = _fmt(float(r.matched_alignment_u[0])), set()
    j = int(r.matched_index_u[0])
    if j != 0:
        text += f" →u'{j + 1}"
        marks.add("→")
    if int(r.group_size_u[0]) > 1:
        text += "†"
        marks.add("†")
    return text, marks


def shared_summary(reports: Mapping[str, SharedBasisReport], labels: Sequence[str]) -> str:
    """A markdown table of cross-task sharing per layer type (means over its layers, off-diagonal pairs)."""
    T = len(labels)
    lines = ["## shared basis across tuned models", "",
             f"models: {', '.join(f'{i}={l}' for i, l in enumerate(labels))}. base sim: ‖U_kᵀU^(t)_k‖²_F/k "
             "averaged over models; pair sim: between two tuned models' top-k bases; Δ pair sim: between the "
             "top-k subspaces of their updates ΔW; chance = k/out.", "",
             "| layer type | n | k | base sim U | base sim V | pair sim U | pair sim V | Δ pair sim U "
             "| Δ pair sim V | chance U | chance V |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    off = ~torch.eye(T, dtype=torch.bool)
    groups: dict[str, list[SharedBasisReport]] = {}
    for r in reports.values():
        groups.setdefault(layer_type(r.name), []).append(r)
    for lt, rs in groups.items():
        def mean(f):
            vals = [f(r) for r in rs]
            vals = [v for v in vals if not math.isnan(v)]
            return sum(vals) / len(vals) if vals else math.nan
        pair = lambda M: float(torch.nanmean(M[off])) if T > 1 else math.nan  # noqa: E731
        lines.append(
            f"| {lt} | {len(rs)} | {rs[0].k} | {_fmt(mean(lambda r: float(r.base_similarity_u.mean())))} "
            f"| {_fmt(mean(lambda r: float(r.base_similarity_v.mean())))} "
            f"| {_fmt(mean(lambda r: pair(r.pairwise_u)))} | {_fmt(mean(lambda r: pair(r.pairwise_v)))} "
            f"| {_fmt(mean(lambda r: pair(r.delta_pairwise_u)))} | {_fmt(mean(lambda r: pair(r.delta_pairwise_v)))} "
            f"| {_fmt(mean(lambda r: r.chance_u))} | {_fmt(mean(lambda r: r.chance_v))} |")
    lines.append("")
    return "\n".join(lines)


def to_json(obj) -> str:
    """JSON of reports (dicts of LayerReport / SharedBasisReport, nested in dicts and lists)."""
    def conv(o):
        if isinstance(o, (LayerReport, SharedBasisReport)):
            return o.to_dict()
        if isinstance(o, Mapping):
            return {str(k): conv(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(v) for v in o]
        if isinstance(o, float) and math.isnan(o):
            return None
        return o
    return json.dumps(conv(obj), indent=1, allow_nan=False)


def _short(lt: str) -> str:
    parts = [p for p in lt.split(".") if p not in ("weight", "*", "encoder", "layer", "bert", "model")]
    return ".".join(parts[-3:]) or lt


def plot_all(reports: Mapping[str, LayerReport], out_dir: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Three PNGs: sv ratio by index per layer type, alignment heatmap (layer × index, U and V),
    subspace similarity vs k per layer type. Returns their paths."""
    plt = require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = _by_type(reports)
    paths = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for lt, rs in groups.items():
        kk = min(r.k for r in rs)
        M = torch.stack([r.sv_ratio[:kk] for r in rs])
        ax.plot(range(kk), torch.nanmean(M, 0).tolist(), marker=".", label=f"{_short(lt)} ({len(rs)})")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("singular index i"); ax.set_ylabel("s'ᵢ / sᵢ (mean over layers of the type)")
    ax.set_title("singular value ratio by index"); ax.legend(fontsize=7)
    paths.append(out / f"{prefix}sv_ratio.png"); fig.tight_layout(); fig.savefig(paths[-1], dpi=110); plt.close(fig)

    names = list(reports)
    kk = max(r.k for r in reports.values())
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3, 0.18 * len(names) + 1.5)))
    for ax, side, label in zip(axes, ("u", "v"), ("|uᵢ·u'ⱼ| (matched)", "|vᵢ·v'ⱼ| (matched)")):
        M = torch.full((len(names), kk), math.nan)
        for j, n in enumerate(names):
            a = _matched(reports[n], side)
            M[j, : a.shape[0]] = a.float()
        im = ax.imshow(M.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_xlabel("singular index i"); ax.set_title(label)
        ax.set_yticks(range(len(names))); ax.set_yticklabels([n.removesuffix(".weight") for n in names], fontsize=5)
        fig.colorbar(im, ax=ax)
    paths.append(out / f"{prefix}alignment.png"); fig.tight_layout(); fig.savefig(paths[-1], dpi=110); plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, attr, side in zip(axes, ("similarity_by_k_u", "similarity_by_k_v"), ("U", "V")):
        for lt, rs in groups.items():
            kk = min(r.k for r in rs)
            M = torch.stack([getattr(r, attr)[:kk] for r in rs])
            line, = ax.plot(range(1, kk + 1), M.mean(0).tolist(), label=_short(lt))
            dim = rs[0].shape[0 if side == "U" else 1]
            ax.plot(range(1, kk + 1), [j / dim for j in range(1, kk + 1)], ls=":", color=line.get_color(), lw=0.8)
        ax.set_xlabel("k"); ax.set_title(f"‖{side}_kᵀ{side}'_k‖²_F / k (dotted: chance k/dim)")
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    paths.append(out / f"{prefix}similarity_vs_k.png"); fig.tight_layout(); fig.savefig(paths[-1], dpi=110); plt.close(fig)
    return paths


def plot_shared(reports: Mapping[str, SharedBasisReport], labels: Sequence[str], out_dir: str | os.PathLike) -> Path:
    """Bar plot per layer: base similarity of each tuned model and the mean pairwise Δ similarity."""
    plt = require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(reports)
    T = len(labels)
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 4.5))
    x = torch.arange(len(names), dtype=torch.float64)
    w = 0.8 / (T + 1)
    for t in range(T):
        ax.bar((x + t * w).tolist(), [float(reports[n].base_similarity_u[t]) for n in names], w,
               label=f"base vs {labels[t]} (U)")
    if T > 1:
        off = ~torch.eye(T, dtype=torch.bool)
        ax.bar((x + T * w).tolist(), [float(torch.nanmean(reports[n].delta_pairwise_u[off])) for n in names], w,
               label="ΔW top-k, task vs task (U)")
    ax.plot((x + 0.4).tolist(), [reports[n].chance_u for n in names], "k_", label="chance k/out")
    ax.set_xticks((x + 0.4).tolist())
    ax.set_xticklabels([n.removesuffix(".weight") for n in names], rotation=90, fontsize=5)
    ax.set_ylim(0, 1.02); ax.set_ylabel("‖AᵀB‖²_F / k"); ax.legend(fontsize=7)
    path = out / "shared_basis.png"
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)
    return path
