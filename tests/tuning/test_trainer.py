"""transformers' Trainer with an adapted model and no extra arguments: checkpoints hold the adapter,
resume continues the same run, save_model reloads with sk.from_pretrained, and a plain
from_pretrained of the architecture on its output is refused naming the fix."""
import os

import pytest
import torch

import spectral_kernels as sk
from spectral_kernels.tuning.folder import ADAPTER_NAME, CONFIG_NAME, HF_WEIGHTS_NAME
from tests.tuning.models import VOCAB, tiny_bert

pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")

CFG = dict(target_modules=["query", "value", "dense"], rank=4, modules_to_save=["classifier"])


class _Task(torch.utils.data.Dataset):
    """Sequences labelled by whether token 5 occurs."""

    def __init__(self, n: int = 64, length: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(6, VOCAB, (n, length), generator=g)
        self.y = torch.arange(n) % 2
        self.x[self.y == 1, 3] = 5

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def _trainer(model, out, max_steps=6, save_steps=3):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, save_steps=save_steps,
                             save_strategy="steps", per_device_train_batch_size=8, learning_rate=5e-2,
                             logging_steps=1, report_to=[], seed=0, data_seed=0, dataloader_num_workers=0,
                             use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=_Task())


def _adapted():
    return sk.adapt(tiny_bert(num_labels=2), sk.SpectralConfig(**CFG))


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    model = _adapted()
    _trainer(model, out).train()
    return out, model


def test_checkpoints_hold_the_adapter_not_the_model(uninterrupted):
    out, model = uninterrupted
    ckpt = out / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {ADAPTER_NAME, CONFIG_NAME, HF_WEIGHTS_NAME, "optimizer.pt", "trainer_state.json"} <= files
    assert "model.safetensors" not in files
    held = torch.load(ckpt / HF_WEIGHTS_NAME, weights_only=True)
    assert set(held) == set(_trainable(model))  # coefficients and the classifier head, no W / U / s / V
    assert all(".coeffs" in n or n.startswith("classifier.") for n in held)
    from safetensors import safe_open

    with safe_open(str(ckpt / ADAPTER_NAME), framework="pt") as f:  # tensor data; the metadata holds fingerprints
        adapter_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert adapter_bytes < 0.1 * sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_training_moved_the_adapter(uninterrupted):
    _, model = uninterrupted
    fresh = _adapted()
    moved = [n for n, p in _trainable(model).items() if not torch.equal(p, _trainable(fresh)[n])]
    assert any(".coeffs" in n for n in moved) and any(n.startswith("classifier.") for n in moved)


def test_resume_continues_the_same_run(uninterrupted, tmp_path):
    out, done = uninterrupted
    model = _adapted()
    _trainer(model, tmp_path).train(resume_from_checkpoint=str(out / "checkpoint-3"))
    want, got = _trainable(done), _trainable(model)
    assert set(want) == set(got)
    for n in want:
        assert torch.equal(got[n], want[n]), n  # bit for bit: same data order, RNG and optimizer state


def test_save_model_reloads_with_from_pretrained_and_refuses_a_plain_load(uninterrupted, tmp_path):
    from transformers import BertForSequenceClassification

    out, model = uninterrupted
    trainer = _trainer(model, out)
    trainer.save_model(str(tmp_path))
    x = _Task(n=8, seed=3).x
    with torch.no_grad():
        want = model.eval()(x).logits
        got = sk.from_pretrained(tiny_bert(num_labels=2), tmp_path).eval()(x).logits
    assert torch.equal(got, want)
    with pytest.raises(Exception, match=r"spectral_kernels\.from_pretrained"):
        BertForSequenceClassification.from_pretrained(tmp_path)


def test_checkpoints_hold_every_adapter_of_a_bank(tmp_path):
    """A model with several adapters, "topic" active and trained: the checkpoint restores all of them."""
    model = _adapted()
    sk.add_adapter(model, "sentiment")
    sk.add_adapter(model, "topic")
    with torch.no_grad():
        for p in sk.adapter_parameters(model, "sentiment"):
            p.fill_(0.75)  # untrained but not the identity: must survive the checkpoint
    sk.set_adapter(model, "topic")
    _trainer(model, tmp_path, max_steps=2, save_steps=2).train()
    rebuilt = sk.from_pretrained(tiny_bert(num_labels=2), tmp_path / "checkpoint-2")
    assert sk.list_adapters(rebuilt) == ["default", "sentiment", "topic"] and sk.active_adapter(rebuilt) == "topic"
    for name in ("default", "sentiment", "topic"):
        for want, got in zip(sk.adapter_parameters(model, name), sk.adapter_parameters(rebuilt, name)):
            assert torch.equal(want, got), name
    assert not torch.equal(sk.adapter_parameters(model, "topic")[0], torch.ones(4))  # it trained
