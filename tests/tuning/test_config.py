"""SpectralConfig validation and the rank rules."""
import pytest

from spectral_kernels.tuning import SpectralConfig


def test_defaults_and_roundtrip():
    cfg = SpectralConfig(target_modules=["query", "value"], rank=0.25, mode="speclora", modules_to_save="classifier")
    assert cfg.modules_to_save == ["classifier"]
    assert SpectralConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("rank, shape, k", [
    (8, (32, 48), 8), ("full", (32, 48), 32), ("full", (96, 32), 32),
    (0.25, (32, 48), 8), (0.01, (32, 48), 1), (1.0, (13, 24), 13), (0.5, (13, 24), 6),
])
def test_rank_for(rank, shape, k):
    assert SpectralConfig(target_modules=["x"], rank=rank).rank_for(*shape) == k


def test_form_auto():
    assert SpectralConfig(target_modules=["x"], rank="full").form_for(32, 32, 48) == "pure"
    assert SpectralConfig(target_modules=["x"], rank="full", mode="shift").form_for(32, 32, 48) == "delta"
    assert SpectralConfig(target_modules=["x"], rank=4).form_for(4, 32, 48) == "delta"


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "lora"}, "mode must be one of"),
    ({"form": "dense"}, "form must be one of"),
    ({"rank": 0}, "integer rank must be >= 1"),
    ({"rank": -3}, "integer rank must be >= 1"),
    ({"rank": 1.5}, r"fractional rank must lie in \(0, 1\]"),
    ({"rank": 0.0}, r"fractional rank must lie in \(0, 1\]"),
    ({"rank": "half"}, "rank must be an int, 'full' or a fraction"),
    ({"rank": True}, "rank must be an int, 'full' or a fraction"),
    ({"mode": "speclora", "lora_rank": 0}, "lora_rank must be an int >= 1"),
    ({"mode": "speclora", "form": "pure"}, "speclora' needs form='delta'"),
    ({"svd_method": "qr"}, "svd_method must be one of"),
    ({"backend": "tpu"}, "backend must be one of"),
    ({"target_modules": "(unclosed"}, "not a valid regular expression"),
    ({"target_modules": None}, "target_modules is required"),
    ({"target_modules": []}, "target_modules is empty"),
])
def test_bad_config(kwargs, match):
    kwargs = {"target_modules": ["query"], **kwargs}
    with pytest.raises(ValueError, match=match):
        SpectralConfig(**kwargs)


def test_bad_pattern_type():
    with pytest.raises(TypeError, match="target_modules must be a regex string or a list"):
        SpectralConfig(target_modules=3)


def test_unknown_field_in_dict():
    with pytest.raises(ValueError, match="unknown fields"):
        SpectralConfig.from_dict({"target_modules": ["q"], "lora_dropout": 0.1})
