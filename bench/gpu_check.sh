#!/usr/bin/env bash
# GPU check on a GPU machine: (1) bench/gpu_check.py: finetune=full runs (both backbones trained per
# batch, bf16 autocast) alone and two sharing the GPU, with epoch times, peak GPU memory and
# validation scores; (2) a short finetune=full search, two trials sharing the GPU (gpu: 0.5 each),
# each trial's epoch times and peak GPU memory read back from the MLflow record (skipped where Ray
# is not installed); (3) mmsa.final --register and mmsa.predict on the GPU, from a trial run
# written straight into a local MLflow store (no Ray needed), timed, predictions compared.
# Usage: bash bench/gpu_check.sh [DATASET_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/mvsa}"
OUT="${OUT:-$(mktemp -d)}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0))"
python bench/gpu_check.py --data "$DATA" --out "$OUT/gpu_check.md"
# (3) final + predict on the GPU: the default head config (frozen features), 5 seeds + probe.
STORE="sqlite:///$OUT/final.db"
TRIAL=$(python - "$STORE" "$OUT" <<'PY'
import sys
from mlflow.tracking import MlflowClient
c = MlflowClient(sys.argv[1])
exp = c.create_experiment("gpu-check", artifact_location=f"{sys.argv[2]}/artifacts")
run = c.create_run(exp, tags={"mmsa.kind": "trial"}).info.run_id
for k, v in {"device": "cuda", "max_epochs": 6}.items():
    c.log_param(run, k, v)
c.log_metric(run, "best_epoch", 3)
c.set_terminated(run)
print(run)
PY
)
start=$SECONDS
python -m mmsa.final --run-id "$TRIAL" --data "$DATA" --tracking-uri "$STORE" --out "$OUT/final.txt" \
    --register gpu-check | tail -n 4
echo "final: $((SECONDS - start)) s wall"
start=$SECONDS
python -m mmsa.predict --model models:/gpu-check/1 --data "$DATA" --tracking-uri "$STORE" \
    --out "$OUT/predict.txt" | tail -n 2
echo "predict: $((SECONDS - start)) s wall (no training)"
cmp "$OUT/final.txt" "$OUT/predict.txt" && echo "predict == final: identical predictions"
if ! python -c "import ray" 2>/dev/null; then echo "no Ray here: the search part is skipped"; exit 0; fi
cat > "$OUT/gpu.yaml" <<YAML
data_dir: $DATA
num_samples: 2
max_concurrent: 2
cv_folds: 1
resources: {cpu: 4, gpu: 0.5}
scheduler: {type: fifo, max_epochs: 2}
searcher: {type: random}
fixed: {finetune: full, batch_size: 32, max_text_len: 64, device: cuda}
params:
  lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}
  backbone_lr_scale: {type: loguniform, low: 0.03, high: 0.3}
YAML
python -m search.run --space "$OUT/gpu.yaml" --tracking-uri "sqlite:///$OUT/mlflow.db" --storage "$OUT/ray" | tee "$OUT/search.log"
PARENT=$(tail -n 1 "$OUT/search.log" | cut -d= -f2)
python - "$OUT" "$PARENT" <<'PY'
import sys
from mlflow.tracking import MlflowClient
out, parent = sys.argv[1], sys.argv[2]
c = MlflowClient(f"sqlite:///{out}/mlflow.db")
exp = c.get_run(parent).info.experiment_id
for run in c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'"):
    secs = [m.value for m in c.get_metric_history(run.info.run_id, "fold1_epoch_seconds")]
    mem = [m.value for m in c.get_metric_history(run.info.run_id, "fold1_gpu_peak_mb")]
    acc = [m.value for m in c.get_metric_history(run.info.run_id, "fold1_val_acc")]
    print(f"trial {run.data.tags.get('mmsa.trial_id')}: lr {float(run.data.params['lr']):.2e}  "
          f"epoch seconds {[round(s, 1) for s in secs]}  peak GPU MiB {max(mem) if mem else 'n/a'}  "
          f"val_acc {[round(a, 4) for a in acc]}")
PY
