"""adapt()'s SVDs split across the ranks of an initialised process group, on request.

The split is opt-in: ``adapt(model, config, distributed=True)``, or ``SPECTRAL_KERNELS_SVD_DISTRIBUTED=1``
for calls that do not pass ``distributed`` (``sk.from_pretrained``, ``sk.load_adapter``). It uses
collectives, so every rank must then make the same call; without the opt-in (the default) each
rank computes its own SVDs and a call made on one rank only (reload and evaluate on rank 0 after a
DDP job) never waits on the others.

With the split on and world size N > 1, every rank runs adapt() on the same model; the
matrices are assigned to ranks by a deterministic greedy balance of their cost m·n·k (every rank
computes the same assignment from the same names and shapes), each rank decomposes only its own
share (one batched call, so same-shape matrices still run as one batch), and each result is then
broadcast from its owner. Every matrix is decomposed once and every rank ends with bit-identical
factors. Ranks holding different models (other names or shapes) are refused before any work.
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


_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def split_across_ranks(distributed: bool | None = None) -> bool:
    """Whether adapt() splits its SVDs across ranks.

    ``distributed``: True (split; needs an initialised process group), False (never), None (the
    environment variable ``SPECTRAL_KERNELS_SVD_DISTRIBUTED``: "1" splits when a group of several
    ranks is initialised; unset or "0": no split). Never a collective without an explicit opt-in.

    Raises:
        ValueError: ``distributed=True`` without an initialised process group, or an unreadable
            value of the environment variable.
    """
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        value = os.environ.get(ENV_VAR, "").strip().lower()
        if value not in _ON + _OFF:
            raise ValueError(f"{ENV_VAR} must be 1 (split adapt()'s SVDs across ranks) or 0 (each rank computes "
                             f"its own), got {value!r}")
        return value in _ON and initialised and dist.get_world_size() > 1
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True, False or None, got {distributed!r}")
    if distributed and not initialised:
        raise ValueError("adapt(distributed=True) needs an initialised torch.distributed process group "
                         "(call torch.distributed.init_process_group first), or pass distributed=False")
    return distributed and dist.get_world_size() > 1


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
                             f"adapt the same model (or let each rank compute its own: distributed=False)")
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
