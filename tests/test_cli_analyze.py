"""spectral-kernels analyze: files in, markdown + JSON + PNGs out."""
import importlib.util
import json

import pytest
import torch

from spectral_kernels.cli import main


def _write(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"enc.0.w": torch.randn(20, 14, generator=g), "enc.1.w": torch.randn(20, 14, generator=g),
            "b": torch.randn(20, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    torch.save({k: v * 2 for k, v in base.items()}, tmp_path / "task_a.pt")
    (tmp_path / "task_b").mkdir()
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()},
              str(tmp_path / "task_b" / "model.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "task_a.pt", tmp_path / "task_b"


def test_analyze_writes_summary_json_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    base, a, b = _write(tmp_path)
    out = tmp_path / "out"
    assert main(["analyze", str(base), str(a), str(b), "--k", "4", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert data["k"] == 4 and set(data["tuned"]) == {"task_a", "task_b"}
    assert data["tuned"]["task_a"]["layers"]["enc.0.w"]["sv_ratio"] == pytest.approx([2.0] * 4, abs=1e-5)
    assert data["shared_basis"]["labels"] == ["task_a", "task_b"]
    md = (out / "summary.md").read_text()
    assert "task_a" in md and "shared basis" in md and "![task_a_sv_ratio](task_a_sv_ratio.png)" in md
    for name in ("task_a_sv_ratio", "task_a_alignment", "task_a_similarity_vs_k", "task_b_sv_ratio", "shared_basis"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_analyze_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    base, a, _ = _write(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *r: None if name == "matplotlib" else real(name, *r))
    assert main(["analyze", str(base), str(a), "--out", str(tmp_path / "o")]) == 2
    assert "pip install spectral-kernels[analysis]" in capsys.readouterr().err
    # --no-plots works without it
    assert main(["analyze", str(base), str(a), "--out", str(tmp_path / "o"), "--no-plots", "--no-progress"]) == 0
    assert (tmp_path / "o" / "analysis.json").exists() and not list((tmp_path / "o").glob("*.png"))


def test_analyze_reports_bad_inputs(tmp_path, capsys):
    base, a, _ = _write(tmp_path)
    assert main(["analyze", str(base), str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o"), "--no-plots"]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", str(base), str(a), "--k", "0", "--out", str(tmp_path / "o")])
