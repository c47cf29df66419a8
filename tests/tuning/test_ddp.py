"""DistributedDataParallel: 2 gloo ranks on CPU train an adapted model like one process on the whole batch."""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spectral_kernels.tuning import SpectralConfig, adapt

STEPS = 3
WORLD = 2
CFG = dict(target_modules=["query", "value", "intermediate.dense"], rank=4, mode="speclora", lora_rank=2,
           modules_to_save=["classifier"], progress=False)


def _batch():
    from tests.tuning.models import tokens

    return tokens(4, 6, seed=5), torch.tensor([0, 1, 2, 0])


def _model():
    from tests.tuning.models import tiny_bert

    model = adapt(tiny_bert(), SpectralConfig(**CFG), verbose=False)
    model.train()
    return model


def _train(model, x, y):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(STEPS):
        loss = model(x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    ddp = None
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, y = _batch()
        per = x.shape[0] // WORLD
        # the mean loss over each half, averaged over ranks by DDP, is the mean over the whole batch
        _train(ddp, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        torch.save(_trainable_state(model), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        # drop DDP (its reducer holds the process group) before destroying the group: a group whose
        # last reference dies with DDP at function exit is torn down holding the GIL while a gloo
        # thread waits for it (seen once as a hung CI run, torch 2.13)
        del ddp
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_matches_single_process():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
        states = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    model = _model()
    before = _trainable_state(model)
    _train(model, *_batch())
    single = _trainable_state(model)
    assert set(states[0]) == set(single)
    for n, want in single.items():
        assert not torch.equal(want, before[n]) or n.endswith("lora_A"), f"{n} did not train"
        for r, state in enumerate(states):
            torch.testing.assert_close(state[n], want, rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {r}, {n}: {m}")
