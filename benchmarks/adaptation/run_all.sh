#!/usr/bin/env bash
# The whole adaptation study with one command (docs/FINDINGS.md): the mode-and-learning-rate sweep
# (resumable), its tables, the SpecLoRA diagnosis, and the spectral analysis of the large-update
# full fine-tuning against its equal-norm null model. ~2 h on 2 CPU cores.
#   bash benchmarks/adaptation/run_all.sh [WEIGHTS_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
weights=${1:-/tmp/repro/weights}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python benchmarks/adaptation/sweep.py --phases lr,large,seeds,long --long-steps 600 --weights "$weights"
# a larger update still: tweets (movies' full fine-tuning at lr 5e-4 already fails to train)
python benchmarks/adaptation/sweep.py --phases large --tasks tweets --large-steps 600 --weights "$weights"
python benchmarks/adaptation/report.py
python benchmarks/adaptation/diagnose_speclora.py
python benchmarks/adaptation/analyze_full_ft.py --weights "$weights" --suffix full_large \
    --out benchmarks/adaptation/results/analysis_large
python benchmarks/adaptation/analyze_full_ft.py --weights "$weights" --suffix full_large600 --tasks tweets \
    --out benchmarks/adaptation/results/analysis_large600
