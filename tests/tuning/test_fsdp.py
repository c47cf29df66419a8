"""FSDP2: `fully_shard` on an adapted model, 2 gloo ranks on CPU, trains like one process on the
whole batch, and save_adapter on the sharded model writes the adapter of the unsharded one."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spectral_kernels.tuning import read_adapter, save_adapter, spectral_layers
from tests.tuning.test_ddp import WORLD, _batch, _free_port, _model, _train, _trainable_state


def _worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model = _model()
        for layer in spectral_layers(model).values():  # one FSDP unit per spectral layer, then the root
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        x, y = _batch()
        per = x.shape[0] // WORLD
        _train(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        state = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
        save_adapter(model, os.path.join(out_dir, f"adapter{rank}.safetensors"))  # every rank joins the gathers
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_fully_shard_matches_single_process(tmp_path):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
        states = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
        files = [read_adapter(os.path.join(out_dir, f"adapter{r}.safetensors")) for r in range(WORLD)]
    model = _model()
    before = _trainable_state(model)
    _train(model, *_batch())
    single = _trainable_state(model)
    assert set(states[0]) == set(single)
    for n, want in single.items():
        assert not torch.equal(want, before[n]) or n.endswith("lora_A"), f"{n} did not train"
        for r, state in enumerate(states):
            torch.testing.assert_close(state[n], want, rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {r}, {n}: {m}")
    save_adapter(model, tmp_path / "single.safetensors")
    _, want_layers, want_tensors = read_adapter(tmp_path / "single.safetensors")
    for _, layers, tensors in files:
        assert layers == want_layers  # the same base fingerprints: the sharded weights were gathered
        assert set(tensors) == set(want_tensors)
        for n, t in tensors.items():
            torch.testing.assert_close(t, want_tensors[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
