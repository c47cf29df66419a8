"""Markdown tables of results/tasks.json (for docs/FINDINGS.md): python benchmarks/adaptation/make_tables.py"""
import json
import sys
from pathlib import Path

path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "tasks.json")
data = json.loads(path.read_text())
print(f"`{data['command']}` — {data['device']}, torch {data['torch']}, commit {data.get('commit', '?')}\n")
print("| task | method | held-out acc | trainable params | % of model | step time (ms, median) "
      "| peak RSS (MB) | RSS increase over loaded model (MB) | train loss first→last 10 steps | lr |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in data["rows"]:
    if "error" in r:
        print(f"| {r['task']} | {r['method']} | failed | | | | | | | |")
        continue
    print(f"| {r['task']} | {r['method']} | {r['accuracy']:.3f} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.3f} "
          f"| {1e3 * r['step_time_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['rss_after_load_mb']:.0f} "
          f"| {r['train_loss_first10']:.3f} → {r['train_loss_last10']:.3f} | {r['lr']:g} |")
