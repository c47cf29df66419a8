"""Spectral comparison of a base and fine-tuned weights (DESIGN.md §7).

For every 2-D floating weight present in both state_dicts with the same shape, W = U·diag(s)·Vᵀ and
W' = U'·diag(s')·V'ᵀ (top k, from :func:`spectral_kernels.batched_truncated_svd`, one batched pass
over base and tuned weights grouped by shape):

- ``sv_ratio[i]`` = s'ᵢ / sᵢ (NaN where sᵢ = 0): > 1 is amplification of the i-th singular value;
- ``alignment[i]`` = |uᵢ·u'ᵢ| (and ``alignment_v`` with the right vectors): 1 = the i-th direction
  did not move, compared index by index. Two things make that figure contradict an unchanged
  subspace, and ``matched_alignment`` corrects both:

  * reordering: training that rescales singular values ("scale" mode) can lift s₂ above s₁, so the
    tuned model's first vector is the base's second: |u₁·u'₁| = 0 while nothing rotated. The
    matched figure compares uᵢ with the tuned vector closest to it, u'ⱼ (j = ``matched_index[i]``);
  * near-equal singular values: where sᵢ is within ``gap_tol`` (relative) of a neighbour's, in the
    base or in the tuned model, the single vectors are not well defined — any rotation within the
    group of near-equal values is an equally valid SVD. There the matched figure is the norm of uᵢ's
    projection onto the span of the tuned group it belongs to (1 = uᵢ stayed in that group's
    subspace), and ``group_size[i]`` > 1 says so (1: a well-defined single vector);
- ``subspace_similarity`` = ‖U_kᵀU'_k‖²_F / k ∈ [0, 1], the mean squared cosine of the principal
  angles between the two top-k subspaces (``subspace_similarity_v`` for V), and the same for every
  j ≤ k (``similarity_by_k``). Two random k-dimensional subspaces of R^m give k/m on average
  (``chance_u``, ``chance_v``), the baseline to read them against.

:func:`shared_basis` asks the cross-task question for several fine-tunes of one base: how much of
each tuned model's top-k basis is the base's, and how much two tuned models share, both of their
bases and of the top-k subspaces of their updates ΔW = W' − W.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from spectral_kernels.ops.truncated_svd import SVDResult, batched_truncated_svd

__all__ = ["GAP_TOL", "LayerReport", "SharedBasisReport", "compare", "layer_type", "matched_alignment",
           "matching_weights", "near_equal_groups", "shared_basis", "similarity_curve", "subspace_similarity"]


# --- small numerical pieces ------------------------------------------------------------------------
def subspace_similarity(A: Tensor, B: Tensor) -> float:
    """‖AᵀB‖²_F / k for orthonormal A, B [n, k]: 1 = same subspace, k/n on average for random ones."""
    k = A.shape[-1]
    M = A.transpose(-2, -1).to(torch.float64) @ B.to(torch.float64)
    return float((M * M).sum() / k)


def similarity_curve(A: Tensor, B: Tensor) -> Tensor:
    """‖A_jᵀB_j‖²_F / j for j = 1..k (A_j: the first j columns), float64 [k]."""
    M = A.transpose(-2, -1).to(torch.float64) @ B.to(torch.float64)
    P = (M * M).cumsum(0).cumsum(1)
    j = torch.arange(1, M.shape[0] + 1, dtype=torch.float64)
    return P.diagonal() / j


def near_equal_groups(S: Tensor, gap_tol: float) -> Tensor:
    """Group id per index of descending singular values S [k]: neighbours whose gap is at most
    ``gap_tol`` times the larger of the two share a group (chained: 1.00, 0.995, 0.99 is one group)."""
    ids = torch.zeros(S.shape[0], dtype=torch.long)
    for i in range(1, S.shape[0]):
        larger, gap = float(S[i - 1]), float(S[i - 1] - S[i])
        ids[i] = ids[i - 1] + (0 if gap <= gap_tol * abs(larger) else 1)
    return ids


def matched_alignment(A: Tensor, SA: Tensor, B: Tensor, SB: Tensor, gap_tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """(alignment [k], matched index [k], group size [k]) of the columns of A (base vectors, singular
    values SA) against B (tuned, SB); A, B orthonormal [n, k].

    For column i: j = argmaxⱼ |aᵢ·bⱼ| (the tuned vector aᵢ became). Let G be the base group of i
    (near-equal SA, :func:`near_equal_groups`) and J the union of the tuned groups (near-equal SB)
    of the matched indices of G's members. The alignment is ‖B_Jᵀ aᵢ‖ — |aᵢ·bⱼ| when G and J are
    single vectors — and the group size max(|G|, |J|) (1: a well-defined single vector)."""
    M = (A.transpose(-2, -1).to(torch.float64) @ B.to(torch.float64)).abs()
    best = M.argmax(1)
    ga, gb = near_equal_groups(SA, gap_tol), near_equal_groups(SB, gap_tol)
    k = M.shape[0]
    align = torch.empty(k, dtype=torch.float64)
    size = torch.empty(k, dtype=torch.long)
    for i in range(k):
        members = ga == ga[i]
        J = torch.isin(gb, gb[best[members]])
        align[i] = M[i, J].square().sum().sqrt().clamp(max=1.0)
        size[i] = max(int(members.sum()), int(J.sum()))
    return align, best, size


def layer_type(name: str) -> str:
    """A layer's name with its block index replaced by ``*``: "encoder.layer.3.attention.self.query.weight"
    → "encoder.layer.*.attention.self.query.weight" (the group the plots average over)."""
    return re.sub(r"\.\d+\.", ".*.", name)


# --- reports -----------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """The comparison of one weight: all vectors are float64 tensors of length k."""

    name: str
    shape: tuple[int, int]
    k: int
    s_base: Tensor
    s_tuned: Tensor
    sv_ratio: Tensor
    alignment_u: Tensor
    alignment_v: Tensor
    similarity_by_k_u: Tensor
    similarity_by_k_v: Tensor
    relative_change: float  # ‖W' − W‖_F / ‖W‖_F
    #: alignment of each base vector with the tuned vector (or group of near-equal ones) it became;
    #: see the module docstring. float64 [k], long [k], long [k]; empty when not computed.
    matched_alignment_u: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    matched_alignment_v: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    matched_index_u: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    matched_index_v: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    group_size_u: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    group_size_v: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    gap_tol: float = 0.0

    @property
    def alignment(self) -> Tensor:
        """|uᵢ·u'ᵢ|, the left singular vectors (``alignment_v`` for the right ones)."""
        return self.alignment_u

    @property
    def subspace_similarity(self) -> float:
        """‖U_kᵀU'_k‖²_F / k."""
        return float(self.similarity_by_k_u[-1])

    @property
    def subspace_similarity_v(self) -> float:
        """‖V_kᵀV'_k‖²_F / k."""
        return float(self.similarity_by_k_v[-1])

    @property
    def chance_u(self) -> float:
        """Expected subspace similarity of two random k-dim subspaces of R^out: k / out."""
        return self.k / self.shape[0]

    @property
    def chance_v(self) -> float:
        return self.k / self.shape[1]

    def to_dict(self) -> dict[str, Any]:
        lst = lambda t: [None if math.isnan(x) else x for x in t.tolist()]  # noqa: E731 (JSON has no NaN)
        return {
            "name": self.name, "layer_type": layer_type(self.name), "shape": list(self.shape), "k": self.k,
            "relative_change": self.relative_change,
            "subspace_similarity": self.subspace_similarity, "subspace_similarity_v": self.subspace_similarity_v,
            "chance_u": self.chance_u, "chance_v": self.chance_v,
            "s_base": lst(self.s_base), "s_tuned": lst(self.s_tuned), "sv_ratio": lst(self.sv_ratio),
            "alignment": lst(self.alignment_u), "alignment_v": lst(self.alignment_v),
            "matched_alignment": lst(self.matched_alignment_u), "matched_alignment_v": lst(self.matched_alignment_v),
            "matched_index": self.matched_index_u.tolist(), "matched_index_v": self.matched_index_v.tolist(),
            "group_size": self.group_size_u.tolist(), "group_size_v": self.group_size_v.tolist(),
            "gap_tol": self.gap_tol,
            "similarity_by_k": lst(self.similarity_by_k_u), "similarity_by_k_v": lst(self.similarity_by_k_v),
        }


@dataclass
class SharedBasisReport:
    """Cross-task basis sharing for one weight and T tuned models (matrices are float64 [T, T])."""

    name: str
    shape: tuple[int, int]
    k: int
    base_similarity_u: Tensor   # [T]: ‖U_kᵀU^(t)_k‖²_F / k
    base_similarity_v: Tensor
    pairwise_u: Tensor          # [T, T]: between tuned models' top-k U
    pairwise_v: Tensor
    delta_pairwise_u: Tensor    # [T, T]: between the top-k left subspaces of the updates ΔW_t
    delta_pairwise_v: Tensor
    delta_norms: Tensor = field(default_factory=lambda: torch.zeros(0))  # [T]: ‖ΔW_t‖_F / ‖W‖_F

    @property
    def chance_u(self) -> float:
        return self.k / self.shape[0]

    @property
    def chance_v(self) -> float:
        return self.k / self.shape[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "layer_type": layer_type(self.name), "shape": list(self.shape), "k": self.k,
            "chance_u": self.chance_u, "chance_v": self.chance_v,
            "base_similarity_u": self.base_similarity_u.tolist(), "base_similarity_v": self.base_similarity_v.tolist(),
            "pairwise_u": self.pairwise_u.tolist(), "pairwise_v": self.pairwise_v.tolist(),
            "delta_pairwise_u": self.delta_pairwise_u.tolist(), "delta_pairwise_v": self.delta_pairwise_v.tolist(),
            "delta_norms": self.delta_norms.tolist(),
        }


# --- selecting the weights ----------------------------------------------------------------------
def _is_matrix(t: object) -> bool:
    return isinstance(t, Tensor) and t.dim() == 2 and t.dtype.is_floating_point and min(t.shape) >= 1


def matching_weights(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], *,
                     include: str | None = None, exclude: str | None = None) -> dict[str, tuple[str, str]]:
    """Name → (base key, tuned key) for the 2-D floating weights present in both with the same shape.

    Keys are matched as they are, or, when that matches nothing for a key, after adding or removing
    one leading component common to one side (a ``BertModel`` base "encoder.layer.0..." against a
    ``BertForSequenceClassification`` fine-tune "bert.encoder.layer.0..."). ``include`` / ``exclude``
    are regular expressions searched in the (base) name.
    """
    base_m = {k: v for k, v in base.items() if _is_matrix(v)}
    tuned_m = {k: v for k, v in tuned.items() if _is_matrix(v)}

    def prefixes(keys):
        return {k.split(".", 1)[0] + "." for k in keys if "." in k}

    candidates = [("", "")] + [(p, "") for p in prefixes(base_m)] + [("", p) for p in prefixes(tuned_m)]
    best: dict[str, tuple[str, str]] = {}
    for strip_base, strip_tuned in candidates:
        found = {}
        for bk, bv in base_m.items():
            if strip_base and not bk.startswith(strip_base):
                continue
            core = bk[len(strip_base):]
            tk = strip_tuned + core
            tv = tuned_m.get(tk)
            if tv is not None and tv.shape == bv.shape:
                found[bk] = (bk, tk)
        if len(found) > len(best):
            best = found
    out = {}
    for name, pair in best.items():
        if include is not None and not re.search(include, name):
            continue
        if exclude is not None and re.search(exclude, name):
            continue
        out[name] = pair
    return out


def _layer_k(k: int, shape: Sequence[int]) -> int:
    return min(k, min(shape))


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return k


def _svds(mats: dict[Any, Tensor], k: int, *, method: str, progress: bool | None) -> dict[Any, SVDResult]:
    """Top-k SVDs of all mats, each clamped to its min(shape); one batched call per distinct k."""
    by_k: dict[int, dict[Any, Tensor]] = {}
    for key, A in mats.items():
        by_k.setdefault(_layer_k(k, A.shape), {})[key] = A
    out: dict[Any, SVDResult] = {}
    for kk, group in by_k.items():
        out.update(batched_truncated_svd(group, kk, method=method, progress=progress))
    return out


# --- the public functions -----------------------------------------------------------------------
#: default relative gap under which neighbouring singular values count as near-equal (see compare)
GAP_TOL = 1e-2


def compare(base_state_dict: Mapping[str, Tensor], tuned_state_dict: Mapping[str, Tensor], k: int = 16, *,
            include: str | None = None, exclude: str | None = None, method: str = "auto",
            progress: bool | None = None, gap_tol: float = GAP_TOL) -> dict[str, LayerReport]:
    """Compare every 2-D weight present in both state_dicts (same shape): {name: LayerReport}.

    Args:
        base_state_dict, tuned_state_dict: name → tensor (other entries are ignored; see
            :func:`matching_weights` for how names are matched).
        k: leading singular triplets compared per weight (clamped to min(out, in) of each).
        include, exclude: regular expressions selecting weights by name.
        method: the truncated SVD's method ("auto", "exact", "gram", "randomized").
        progress: tqdm bar of the SVDs (None: when stderr is a terminal).
        gap_tol: neighbouring singular values within this fraction of the larger one are near-equal:
            their single vectors are not well defined and ``matched_alignment`` compares groups.

    Raises:
        ValueError: k is not a positive integer, gap_tol is negative, or no weight is shared.
    """
    k = _check_k(k)
    if not isinstance(gap_tol, (int, float)) or isinstance(gap_tol, bool) or not gap_tol >= 0:
        raise ValueError(f"gap_tol must be a number >= 0, got {gap_tol!r}")
    pairs = matching_weights(base_state_dict, tuned_state_dict, include=include, exclude=exclude)
    if not pairs:
        raise ValueError("no 2-D weight with the same name and shape in both state_dicts"
                         + (" (after include/exclude)" if include or exclude else ""))
    mats: dict[Any, Tensor] = {}
    for name, (bk, tk) in pairs.items():
        mats[("base", name)] = base_state_dict[bk].detach()
        mats[("tuned", name)] = tuned_state_dict[tk].detach()
    svd = _svds(mats, k, method=method, progress=progress)
    reports = {}
    for name, (bk, tk) in pairs.items():
        W = base_state_dict[bk].detach().to(torch.float64).cpu()
        W2 = tuned_state_dict[tk].detach().to(torch.float64).cpu()
        a, b = svd[("base", name)], svd[("tuned", name)]
        reports[name] = _report(name, W, W2, a, b, float(gap_tol))
    return reports


def _report(name: str, W: Tensor, W2: Tensor, a: SVDResult, b: SVDResult, gap_tol: float) -> LayerReport:
    f64 = lambda t: t.detach().to(torch.float64).cpu()  # noqa: E731
    Ua, Sa, Va, Ub, Sb, Vb = map(f64, (a.U, a.S, a.V, b.U, b.S, b.V))
    ratio = torch.where(Sa > 0, Sb / torch.where(Sa > 0, Sa, torch.ones_like(Sa)), torch.full_like(Sa, math.nan))
    norm = float(W.norm())
    mu, ju, gu = matched_alignment(Ua, Sa, Ub, Sb, gap_tol)
    mv, jv, gv = matched_alignment(Va, Sa, Vb, Sb, gap_tol)
    return LayerReport(
        name=name, shape=(W.shape[0], W.shape[1]), k=Sa.shape[-1], s_base=Sa, s_tuned=Sb, sv_ratio=ratio,
        alignment_u=(Ua * Ub).sum(0).abs(), alignment_v=(Va * Vb).sum(0).abs(),
        similarity_by_k_u=similarity_curve(Ua, Ub), similarity_by_k_v=similarity_curve(Va, Vb),
        relative_change=float((W2 - W).norm()) / norm if norm > 0 else math.nan,
        matched_alignment_u=mu, matched_alignment_v=mv, matched_index_u=ju, matched_index_v=jv,
        group_size_u=gu, group_size_v=gv, gap_tol=gap_tol,
    )


def shared_basis(base: Mapping[str, Tensor], tuned: Sequence[Mapping[str, Tensor]], k: int = 16, *,
                 include: str | None = None, exclude: str | None = None, method: str = "auto",
                 progress: bool | None = None) -> dict[str, SharedBasisReport]:
    """Cross-task basis sharing: {name: SharedBasisReport} over the weights present in the base and
    in every tuned state_dict. For each weight, with T = len(tuned):

    - ``base_similarity_u[t]``: ‖U_kᵀU^(t)_k‖²_F / k, how much of tuned model t's top-k left basis
      is the base's (``_v``: right);
    - ``pairwise_u[s, t]``: the same between tuned models s and t;
    - ``delta_pairwise_u[s, t]``: the same between the top-k subspaces of the updates ΔW_s, ΔW_t
      (do two tasks change the weight along the same directions?); an update that is exactly zero
      gives NaN;
    - ``delta_norms[t]``: ‖ΔW_t‖_F / ‖W‖_F.

    Compare each number with ``chance_u`` = k / out (``chance_v`` = k / in).
    """
    k = _check_k(k)
    if isinstance(tuned, Mapping) or len(tuned) < 1:
        raise ValueError("tuned must be a sequence of one or more state_dicts")
    per_model = [matching_weights(base, t, include=include, exclude=exclude) for t in tuned]
    names = [n for n in per_model[0] if all(n in p for p in per_model[1:])]
    if not names:
        raise ValueError("no 2-D weight with the same name and shape in the base and every tuned state_dict")
    mats: dict[Any, Tensor] = {}
    deltas: dict[Any, Tensor] = {}
    for name in names:
        W = base[name].detach()
        mats[("base", name)] = W
        for t, (sd, pairs) in enumerate(zip(tuned, per_model)):
            W2 = sd[pairs[name][1]].detach()
            mats[(t, name)] = W2
            D = W2.to(torch.float32) - W.to(torch.float32)
            if bool((D != 0).any()):
                deltas[(t, name)] = D
    svd = _svds(mats, k, method=method, progress=progress)
    dsvd = _svds(deltas, k, method=method, progress=progress) if deltas else {}
    T = len(tuned)
    reports = {}
    for name in names:
        W = base[name].detach().to(torch.float64).cpu()
        Ub, Vb = svd[("base", name)].U.double().cpu(), svd[("base", name)].V.double().cpu()
        Us = [svd[(t, name)].U.double().cpu() for t in range(T)]
        Vs = [svd[(t, name)].V.double().cpu() for t in range(T)]
        pu, pv, du, dv = (torch.full((T, T), math.nan, dtype=torch.float64) for _ in range(4))
        for s in range(T):
            for t in range(T):
                pu[s, t] = subspace_similarity(Us[s], Us[t])
                pv[s, t] = subspace_similarity(Vs[s], Vs[t])
                if (s, name) in dsvd and (t, name) in dsvd:
                    du[s, t] = subspace_similarity(dsvd[(s, name)].U, dsvd[(t, name)].U)
                    dv[s, t] = subspace_similarity(dsvd[(s, name)].V, dsvd[(t, name)].V)
        wn = float(W.norm())
        dn = torch.tensor([float((tuned[t][per_model[t][name][1]].detach().double().cpu() - W).norm()) / wn
                           if wn > 0 else math.nan for t in range(T)], dtype=torch.float64)
        reports[name] = SharedBasisReport(
            name=name, shape=(W.shape[0], W.shape[1]), k=Ub.shape[-1],
            base_similarity_u=torch.tensor([subspace_similarity(Ub, U) for U in Us], dtype=torch.float64),
            base_similarity_v=torch.tensor([subspace_similarity(Vb, V) for V in Vs], dtype=torch.float64),
            pairwise_u=pu, pairwise_v=pv, delta_pairwise_u=du, delta_pairwise_v=dv, delta_norms=dn,
        )
    return reports
