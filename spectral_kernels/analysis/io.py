"""Reading weights for the analysis: safetensors files, torch state_dict files, Hugging Face folders,
and spectral adapters (merged into their base)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["load_state_dict", "load_tuned"]

_HF_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
             "pytorch_model.bin.index.json", "adapter_model.safetensors")


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """name → tensor (on the CPU) from

    - a ``.safetensors`` file;
    - a torch file (``torch.save`` of a state_dict, or of a dict holding one under "state_dict" or
      "model"), loaded with ``weights_only=True``;
    - a Hugging Face model folder: model.safetensors, its sharded index, or pytorch_model.bin(.index.json).

    Raises:
        FileNotFoundError: the path does not exist, or a folder holds none of those files.
        ValueError: the file holds no tensors.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / "spectral_config.json").is_file():
            raise ValueError(f"{p} is a spectral adapter folder, not a model: pass the base model first and the adapter "
                             "after it (spectral-kernels analyze BASE ADAPTER)")
        for name in _HF_FILES:
            if (p / name).is_file():
                return load_state_dict(p / name)
        raise FileNotFoundError(f"{p} is a folder without model weights (looked for {', '.join(_HF_FILES)})")
    if p.name.endswith(".index.json"):
        index = json.loads(p.read_text())
        out: dict[str, Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(load_state_dict(p.parent / shard))
        return out
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(p), device="cpu"))
    obj = torch.load(str(p), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{p} holds no state_dict (a mapping of names to tensors)")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def load_tuned(path: str | os.PathLike, base: dict[str, Tensor]) -> dict[str, Tensor]:
    """The weights of a tuned model: :func:`load_state_dict` of ``path``, or, when ``path`` is a
    spectral adapter (a folder from ``save_pretrained``, a file from ``save_adapter``), ``base`` with
    the adapter merged in (checked against the adapter's base fingerprints).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the adapter does not fit ``base`` (the layer is named), or no tensors.
    """
    from spectral_kernels.tuning.merged_checkpoint import adapter_file, merged_state_dict

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if adapter_file(path) is not None:
        return merged_state_dict(base, path)
    return load_state_dict(path)
