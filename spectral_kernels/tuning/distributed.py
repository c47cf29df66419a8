"""adapt()'s SVDs split across the ranks of an initialised process group.

Under ``torch.distributed`` with world size N > 1, every rank runs adapt() on the same model; the
matrices are assigned to ranks by a deterministic greedy balance of their cost m·n·k (every rank
computes the same assignment from the same names and shapes), each rank decomposes only its own
share (one batched call, so same-shape matrices still run as one batch), and each result is then
broadcast from its owner. Every matrix is decomposed once and every rank ends with bit-identical
factors. Ranks holding different models (other names or shapes) are refused before any work.
``SPECTRAL_KERNELS_SVD_DISTRIBUTED=0`` turns the split off (each rank then decomposes everything).
The factors live on each weight's device, which must suit the group's backend (CPU for gloo, the
current CUDA device for NCCL).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor

ENV_VAR = "SPECTRAL_KERNELS_SVD_DISTRIBUTED"

Factors = tuple[Tensor, Tensor, Tensor]


def split_across_ranks() -> bool:
    """Whether adapt() should split its SVDs: an initialised group of several ranks, not opted out."""
    if os.environ.get(ENV_VAR, "1").strip() in ("0", "false", "no", "off"):
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def assign(shapes: dict[str, tuple[int, int]], k: int, world: int) -> dict[str, int]:
    """name → owning rank: the largest matrices first, each to the least loaded rank (ties: the
    lowest rank), so every rank computes the same assignment."""
    load = [0.0] * world
    owner = {}
    for name in sorted(shapes, key=lambda n: (-shapes[n][0] * shapes[n][1], n)):
        m, n = shapes[name]
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += float(m) * n * k
    return owner


def distributed_svd(mats: dict[str, Tensor], k: int,
                    svd: Callable[[dict[str, Tensor]], dict[str, Factors]]) -> dict[str, Factors]:
    """Run ``svd`` on this rank's share of ``mats`` and broadcast every result from its owner."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = {n: tuple(W.shape) for n, W in mats.items()}
    layout = sorted(shapes.items())
    gathered: list = [None] * world
    dist.all_gather_object(gathered, layout)
    for r, other in enumerate(gathered):
        if other != layout:
            diff = next((f"{a} vs {b}" for a, b in zip(layout, other) if a != b), f"{len(layout)} vs {len(other)} layers")
            raise ValueError(f"adapt: rank {rank} and rank {r} hold different models ({diff}); every rank must "
                             f"adapt the same model (or set {ENV_VAR}=0)")
    owner = assign(shapes, k, world)
    mine = svd({n: mats[n] for n in mats if owner[n] == rank})
    meta = {n: (str(f[0].dtype), str(f[1].dtype)) for n, f in mine.items()}
    metas: list = [None] * world
    dist.all_gather_object(metas, meta)
    out: dict[str, Factors] = {}
    for name in sorted(mats):
        src = owner[name]
        if src == rank:
            U, S, V = (t.contiguous() for t in mine[name])
        else:
            dtype, sdtype = (getattr(torch, s.removeprefix("torch.")) for s in metas[src][name])
            m, n = shapes[name]
            device = mats[name].device
            U = torch.empty(m, k, dtype=dtype, device=device)
            S = torch.empty(k, dtype=sdtype, device=device)
            V = torch.empty(n, k, dtype=dtype, device=device)
        for t in (U, S, V):
            dist.broadcast(t, src=src)
        out[name] = (U, S, V)
    return {n: out[n] for n in mats}
