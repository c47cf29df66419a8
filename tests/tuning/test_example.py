"""The example script runs end to end (a few steps)."""
import runpy
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "spectral_finetune_bert.py"


def test_example_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--steps", "3", "--rank", "0.25"])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "trainable params" in out and "accuracy of the reloaded, merged model" in out and "KiB" in out
