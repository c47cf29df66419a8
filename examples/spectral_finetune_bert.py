"""Spectral fine-tuning of a transformers model on a small task, end to end.

    python examples/spectral_finetune_bert.py [--mode scale|shift|speclora] [--rank 8] [--steps 150]
    python examples/spectral_finetune_bert.py --model bert-base-uncased   # a real checkpoint, if cached

By default the model is a small BERT built from a config with random weights (no download), so the
script runs anywhere in seconds; with --model it loads a pretrained checkpoint through
transformers instead. The task is synthetic: does the sequence contain the token MARKER? The
spectral layers learn it together with the classifier head (``modules_to_save``).

The default mode is "speclora": a random base has no pretrained spectral basis worth tuning, so
"scale" / "shift" (coefficients only) barely move its accuracy here; on a pretrained checkpoint
(--model) they are the ~0.1-0.3% trainable-parameter option.

Steps: adapt → train only the spectral coefficients (+ LoRA in "speclora" mode, + the head) →
save the adapter folder → rebuild it on a fresh copy of the base → merge into plain nn.Linear layers.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

import spectral_kernels as sk

VOCAB, LENGTH, MARKER = 200, 16, 7


def build_model(name: str | None, seed: int = 0):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    if name:
        return AutoModelForSequenceClassification.from_pretrained(name, num_labels=2)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=LENGTH, num_labels=2)
    return BertForSequenceClassification(cfg)


def make_task(n: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the sequences contain MARKER once, at a random position; label = 1 for those."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(MARKER + 1, vocab, (n, LENGTH), generator=g)
    y = torch.arange(n) % 2
    pos = torch.randint(0, LENGTH, (n,), generator=g)
    x[y == 1, pos[y == 1]] = MARKER
    return x, y


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).logits.argmax(-1) == y).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a transformers checkpoint (default: a small random BERT)")
    ap.add_argument("--mode", default="speclora", choices=["scale", "shift", "speclora"])
    ap.add_argument("--rank", default="8", help="int, 'full' or a fraction in (0, 1]")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    rank = args.rank if args.rank == "full" else (float(args.rank) if "." in args.rank else int(args.rank))

    model = build_model(args.model)
    vocab = model.config.vocab_size
    x_train, y_train = make_task(512, vocab, seed=1)
    x_test, y_test = make_task(256, vocab, seed=2)

    # 1. adapt: every linear layer of the encoder becomes spectral; the classifier head stays trainable
    config = sk.SpectralConfig(target_modules="all-linear", rank=rank, mode=args.mode, lora_rank=8,
                               lora_alpha=16, modules_to_save=["classifier"])
    sk.adapt(model, config)
    sk.print_trainable_parameters(model)
    print(f"accuracy before: {accuracy(model, x_test, y_test):.3f}")

    # 2. train only what requires grad
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        model.train()
        idx = torch.randint(0, len(x_train), (32,), generator=g)
        loss = model(x_train[idx], labels=y_train[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    acc = accuracy(model, x_test, y_test)
    print(f"accuracy after:  {acc:.3f}")

    # 3. save the adapter folder, rebuild the model from a fresh copy of the base, merge into dense layers
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "adapter")
        print(sk.save_pretrained(model, folder))
        fresh = sk.from_pretrained(build_model(args.model), folder)
    sk.merge_adapter(fresh)
    merged_acc = accuracy(fresh, x_test, y_test)
    print(f"accuracy of the reloaded, merged model: {merged_acc:.3f}")
    assert abs(merged_acc - acc) < 1e-6, "the reloaded, merged model should predict as the trained one"


if __name__ == "__main__":
    main()
