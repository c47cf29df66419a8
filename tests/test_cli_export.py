"""spectral-kernels export BASE ADAPTER OUT, and analyze BASE ADAPTER, on tiny saved models."""
import copy
import json
import re
import warnings

import pytest
import torch

import spectral_kernels as sk
from spectral_kernels.cli import main
from tests.tuning.models import tiny_gpt2, tiny_llama, tokens

peft = pytest.importorskip("peft")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _trained(make, targets, mode="scale", seed=0):
    model = make()
    base = copy.deepcopy(model)
    sk.adapt(model, sk.SpectralConfig(target_modules=targets, rank=5, mode=mode, lora_rank=2))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return base, model


@pytest.fixture
def llama_run(tmp_path):
    base, model = _trained(tiny_llama, ["q_proj", "v_proj", "up_proj"], mode="speclora")
    base.save_pretrained(tmp_path / "base")
    sk.save_pretrained(model, tmp_path / "adapter")
    return tmp_path, model


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _peft_model(base_dir, folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder).eval()


def test_export_peft_folder_from_the_command_line(llama_run, capsys):
    tmp, model = llama_run
    out = tmp / "lora"
    assert main(["export", str(tmp / "base"), str(tmp / "adapter"), str(out), "--no-progress"]) == 0
    assert "wrote peft 'default'" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8
    x = tokens(seed=3)
    assert _rel(_logits(_peft_model(tmp / "base", out), x), _logits(model, x)) < 1e-5
    # an existing folder is refused, then replaced with --overwrite; options reach the export
    assert main(["export", str(tmp / "base"), str(tmp / "adapter"), str(out), "--no-progress"]) == 2
    assert "already holds an adapter" in capsys.readouterr().err
    assert main(["export", str(tmp / "base"), str(tmp / "adapter"), str(out), "--no-progress", "--overwrite",
                 "--rank", "own", "--dtype", "bfloat16"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 7
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_export_merged_from_an_adapter_file(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base, model = _trained(tiny_gpt2, ["c_attn", "c_fc"], mode="shift")
    base.save_pretrained(tmp_path / "base")
    sk.save_adapter(model, tmp_path / "task.safetensors")
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "base"), str(tmp_path / "task.safetensors"), str(out),
                 "--format", "merged", "--no-progress"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = tokens(seed=4)
    assert _rel(_logits(loaded, x), _logits(model, x)) < 1e-5
    assert main(["export", str(tmp_path / "base"), str(tmp_path / "task.safetensors"), str(out),
                 "--format", "merged", "--no-progress"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_export_bad_input(llama_run, capsys):
    tmp, _ = llama_run
    base, adapter = str(tmp / "base"), str(tmp / "adapter")
    assert main(["export", base, str(tmp / "nope"), str(tmp / "o"), "--no-progress"]) == 2
    assert "'" + str(tmp / "nope") + "' does not exist" in capsys.readouterr().err
    assert main(["export", base, base, str(tmp / "o"), "--no-progress"]) == 2  # a model, not an adapter
    assert "is not a spectral adapter" in capsys.readouterr().err
    assert main(["export", str(tmp / "no-base"), adapter, str(tmp / "o"), "--no-progress"]) == 2
    assert "cannot load BASE" in capsys.readouterr().err
    assert main(["export", base, adapter, str(tmp / "o"), "--no-progress", "--adapter-name", "x"]) == 2
    assert "no adapter 'x'" in capsys.readouterr().err
    other = tiny_llama(seed=5)
    other.save_pretrained(tmp / "other")
    assert main(["export", str(tmp / "other"), adapter, str(tmp / "o"), "--no-progress"]) == 2
    assert "layer 'model.layers.0.self_attn.q_proj'" in capsys.readouterr().err
    assert not (tmp / "o").exists()
    for bad in ("0", "big"):
        with pytest.raises(SystemExit):
            main(["export", base, adapter, str(tmp / "o"), "--rank", bad])


@pytest.mark.parametrize("as_file", [False, True])
def test_analyze_takes_a_base_and_an_adapter(llama_run, capsys, as_file):
    tmp, model = llama_run
    adapter = tmp / "adapter"
    if as_file:
        adapter = tmp / "task.safetensors"
        sk.save_adapter(model, adapter)
    out = tmp / f"analysis{as_file}"
    assert main(["analyze", str(tmp / "base"), str(adapter), "--k", "4", "--out", str(out), "--no-plots",
                 "--no-progress"]) == 0
    layers = json.loads((out / "analysis.json").read_text())["tuned"][adapter.stem if as_file else "adapter"]["layers"]
    q = model.model.layers[0].self_attn.q_proj
    want = (q.merged_weight() - q.weight).norm() / q.weight.norm()
    assert layers["model.layers.0.self_attn.q_proj.weight"]["relative_change"] == pytest.approx(want.item(), rel=1e-4)
    assert layers["model.layers.0.self_attn.k_proj.weight"]["relative_change"] == 0


def test_analyze_refuses_an_adapter_on_another_base_or_as_the_base(llama_run, capsys):
    tmp, _ = llama_run
    tiny_llama(seed=5).save_pretrained(tmp / "other")
    assert main(["analyze", str(tmp / "other"), str(tmp / "adapter"), "--out", str(tmp / "o"), "--no-plots",
                 "--no-progress"]) == 2
    assert re.search(r"layer 'model.layers.0.[a-z_.]+': base weight differs", capsys.readouterr().err)
    assert main(["analyze", str(tmp / "adapter"), str(tmp / "base"), "--out", str(tmp / "o"), "--no-plots",
                 "--no-progress"]) == 2
    assert "is a spectral adapter folder, not a model" in capsys.readouterr().err


def test_export_loads_the_base_as_the_class_the_adapter_was_trained_on(tmp_path, capsys):
    """A base whose config names no architecture (AutoModel would build the bare LlamaModel): the
    adapter folder's class, LlamaForCausalLM, is used."""
    from transformers import AutoModelForCausalLM

    base, model = _trained(tiny_llama, ["q_proj", "v_proj"])
    base.save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config.pop("architectures", None)
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    sk.save_pretrained(model, tmp_path / "adapter")
    assert main(["export", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged"),
                 "--format", "merged", "--no-progress"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    x = tokens(seed=6)
    assert _rel(_logits(loaded, x), _logits(model, x)) < 1e-5
