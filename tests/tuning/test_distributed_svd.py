"""adapt() under an initialised process group: each matrix decomposed on one rank, factors broadcast,
every rank bit-identical (2 gloo ranks on CPU); different models on the ranks are refused."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spectral_kernels.tuning import SpectralConfig, adapt, spectral_layers
from spectral_kernels.tuning.distributed import assign
from tests.tuning.test_ddp import WORLD, _free_port

CFG = dict(target_modules="all-linear", rank=2, progress=False)


def _worker(rank: int, port: int, out_dir: str, same_model: bool) -> None:
    import spectral_kernels.ops.truncated_svd as tsvd
    from tests.tuning.models import tiny_bert

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    decomposed = []
    real = tsvd.batched_truncated_svd

    def counting(mats, *a, **kw):
        decomposed.extend(mats)
        return real(mats, *a, **kw)

    tsvd.batched_truncated_svd = counting
    try:
        model = tiny_bert(num_labels=2 if same_model or rank == 0 else 3)
        try:
            adapt(model, SpectralConfig(**CFG))
        except ValueError as exc:
            torch.save({"error": str(exc)}, os.path.join(out_dir, f"rank{rank}.pt"))
            return
        factors = {n: (l.U.clone(), l.s.clone(), l.V.clone()) for n, l in spectral_layers(model).items()}
        torch.save({"factors": factors, "decomposed": decomposed}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(same_model: bool):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), out_dir, same_model), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@needs_gloo
def test_each_matrix_once_and_bit_identical_factors():
    from tests.tuning.models import tiny_bert

    results = _run(same_model=True)
    shares = [set(r["decomposed"]) for r in results]
    assert shares[0] and shares[1] and not shares[0] & shares[1]  # split, each matrix once
    assert shares[0] | shares[1] == set(results[0]["factors"])
    for name, (U, s, V) in results[0]["factors"].items():
        U1, s1, V1 = results[1]["factors"][name]
        assert torch.equal(U, U1) and torch.equal(s, s1) and torch.equal(V, V1), name
    single = adapt(tiny_bert(num_labels=2), SpectralConfig(**CFG))
    for name, layer in spectral_layers(single).items():
        U, s, V = results[0]["factors"][name]
        torch.testing.assert_close(s, layer.s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((U * s) @ V.t(), (layer.U * layer.s) @ layer.V.t(), rtol=1e-4, atol=1e-5)


@needs_gloo
def test_ranks_with_different_models_are_refused():
    results = _run(same_model=False)
    for r in results:
        assert "hold different models" in r["error"] and "classifier" in r["error"]


def test_assignment_is_balanced_and_deterministic():
    shapes = {f"l{i}": (64 * (1 + i % 3), 64) for i in range(9)}
    owner = assign(shapes, 4, 2)
    assert owner == assign(dict(reversed(list(shapes.items()))), 4, 2)
    load = [sum(shapes[n][0] * shapes[n][1] for n in shapes if owner[n] == r) for r in range(2)]
    assert max(load) - min(load) <= 64 * 64 * 3
