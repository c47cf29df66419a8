"""adapt() under an initialised process group: with the opt-in (distributed=True, or the environment
variable) each matrix is decomposed on one rank, factors broadcast, every rank bit-identical (2 gloo
ranks on CPU); different models on the ranks are refused. Without it a call on one rank only never
waits on the others."""
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


def _worker(rank: int, port: int, out_dir: str, same_model: bool, opt_in: str = "argument") -> None:
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
            if opt_in == "argument":
                adapt(model, SpectralConfig(**CFG), distributed=True)
            else:  # the environment variable, for calls that do not pass distributed=
                os.environ["SPECTRAL_KERNELS_SVD_DISTRIBUTED"] = "1"
                adapt(model, SpectralConfig(**CFG))
        except ValueError as exc:
            torch.save({"error": str(exc)}, os.path.join(out_dir, f"rank{rank}.pt"))
            return
        factors = {n: (l.U.clone(), l.s.clone(), l.V.clone()) for n, l in spectral_layers(model).items()}
        torch.save({"factors": factors, "decomposed": decomposed}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(same_model: bool, opt_in: str = "argument"):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), out_dir, same_model, opt_in), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@needs_gloo
@pytest.mark.parametrize("opt_in", ["argument", "environment"])
def test_each_matrix_once_and_bit_identical_factors(opt_in):
    from tests.tuning.models import tiny_bert

    results = _run(same_model=True, opt_in=opt_in)
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


def _rank0_only_worker(rank: int, port: int, folder: str, out_dir: str, env_opt_in: bool) -> None:
    """Rank 0 alone reloads the adapter (as after a DDP job) while rank 1 already waits in a barrier;
    with ``env_opt_in`` the job opted in through the variable and the load says distributed=False."""
    import datetime

    import spectral_kernels as sk
    from tests.tuning.models import tiny_bert, tokens

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.pop("SPECTRAL_KERNELS_SVD_DISTRIBUTED", None)
    if env_opt_in:
        os.environ["SPECTRAL_KERNELS_SVD_DISTRIBUTED"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        if rank == 0:
            model = sk.from_pretrained(tiny_bert(), folder, distributed=False if env_opt_in else None)
            with torch.no_grad():
                torch.save(model(tokens()).logits, os.path.join(out_dir, "logits.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@needs_gloo
@pytest.mark.parametrize("env_opt_in", [False, True], ids=["default", "variable-set-distributed-False"])
def test_a_load_on_one_rank_does_not_wait_on_the_others(tmp_path, env_opt_in):
    import time

    import spectral_kernels as sk
    from tests.tuning.models import tiny_bert, tokens

    model = adapt(tiny_bert(), SpectralConfig(**CFG))
    with torch.no_grad():
        for layer in spectral_layers(model).values():
            layer.coeffs.add_(0.1)
        want = model(tokens()).logits
    sk.save_pretrained(model, tmp_path / "run")
    start = time.monotonic()
    mp.spawn(_rank0_only_worker, args=(_free_port(), str(tmp_path / "run"), str(tmp_path), env_opt_in), nprocs=WORLD,
             join=True)
    assert time.monotonic() - start < 60  # a collective on rank 0 alone would have waited out the timeout
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, rtol=1e-4, atol=1e-5)


def test_the_split_is_opt_in(monkeypatch):
    from spectral_kernels.tuning.distributed import ENV_VAR, split_across_ranks

    monkeypatch.delenv(ENV_VAR, raising=False)
    assert not split_across_ranks() and not split_across_ranks(False)
    with pytest.raises(ValueError, match="init_process_group"):
        split_across_ranks(True)  # no process group here
    monkeypatch.setenv(ENV_VAR, "maybe")
    with pytest.raises(ValueError, match=ENV_VAR):
        split_across_ranks()
    with pytest.raises(ValueError, match="init_process_group"):
        adapt(torch.nn.Sequential(torch.nn.Linear(4, 4)), SpectralConfig(**CFG), distributed=True)
