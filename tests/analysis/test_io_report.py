"""Loading weights (safetensors, torch files, Hugging Face folders) and writing tables and plots."""
import json

import pytest
import torch

from spectral_kernels.analysis import compare, load_state_dict, shared_basis, shared_summary, summarize, to_json


def _sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"enc.0.q.weight": torch.randn(16, 12, generator=g), "enc.1.q.weight": torch.randn(16, 12, generator=g),
            "enc.0.q.bias": torch.randn(16, generator=g)}


def test_load_safetensors_torch_and_folders(tmp_path):
    from safetensors.torch import save_file

    sd = _sd()
    save_file(sd, str(tmp_path / "a.safetensors"))
    torch.save(sd, tmp_path / "b.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "c.ckpt")
    (tmp_path / "hf").mkdir()
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hfbin").mkdir()
    torch.save(sd, tmp_path / "hfbin" / "pytorch_model.bin")
    shards = tmp_path / "sharded"
    shards.mkdir()
    save_file({"enc.0.q.weight": sd["enc.0.q.weight"]}, str(shards / "model-1.safetensors"))
    save_file({k: v for k, v in sd.items() if k != "enc.0.q.weight"}, str(shards / "model-2.safetensors"))
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: ("model-1.safetensors" if k == "enc.0.q.weight" else "model-2.safetensors") for k in sd}}))
    for p in ("a.safetensors", "b.pt", "c.ckpt", "hf", "hfbin", "sharded"):
        got = load_state_dict(tmp_path / p)
        assert set(got) == set(sd), p
        for k in sd:
            torch.testing.assert_close(got[k], sd[k])
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_state_dict(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without model weights"):
        load_state_dict(tmp_path / "empty")
    torch.save([1, 2], tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="holds no state_dict"):
        load_state_dict(tmp_path / "junk.pt")


def test_hugging_face_folder_of_a_real_architecture(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=20)
    torch.manual_seed(0)
    base = transformers.BertModel(cfg)
    base.save_pretrained(tmp_path / "base")
    tuned = transformers.BertForSequenceClassification(cfg)
    tuned.bert.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned.bert.encoder.layer[0].attention.self.query.weight.mul_(3.0)
    tuned.save_pretrained(tmp_path / "tuned")
    reps = compare(load_state_dict(tmp_path / "base"), load_state_dict(tmp_path / "tuned"), k=4)
    q = "encoder.layer.0.attention.self.query.weight"
    assert q in reps and "classifier.weight" not in reps
    torch.testing.assert_close(reps[q].sv_ratio, torch.full((4,), 3.0, dtype=torch.float64), atol=1e-5, rtol=0)
    k = "encoder.layer.0.attention.self.key.weight"
    assert reps[k].relative_change == 0


def test_summary_json_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from spectral_kernels.analysis.report import plot_all, plot_shared

    base = _sd()
    tuned = {k: v * 1.5 for k, v in base.items()}
    reps = compare(base, tuned, k=4)
    md = summarize(reps, title="t")
    assert "| enc.*.q.weight | 2 | 4 |" in md and "1.500" in md
    data = json.loads(to_json({"layers": reps}))
    assert data["layers"]["enc.0.q.weight"]["sv_ratio"] == pytest.approx([1.5] * 4, abs=1e-5)
    assert data["layers"]["enc.0.q.weight"]["alignment"] == pytest.approx([1.0] * 4, abs=1e-5)
    paths = plot_all(reps, tmp_path, prefix="x_")
    assert [p.name for p in paths] == ["x_sv_ratio.png", "x_alignment.png", "x_similarity_vs_k.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    shared = shared_basis(base, [tuned, _sd(1)], k=3)
    assert "| enc.*.q.weight | 2 | 3 |" in shared_summary(shared, ["a", "b"])
    assert plot_shared(shared, ["a", "b"], tmp_path).read_bytes()[:4] == b"\x89PNG"
    json.loads(to_json({"s": shared}))  # NaN-free JSON
