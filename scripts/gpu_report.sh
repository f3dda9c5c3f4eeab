#!/usr/bin/env bash
# GPU measurements for the README (run on a CUDA machine): AMP training speed and memory, fp16 latency/throughput.
# usage: OUT=results_dir bash scripts/gpu_report.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_report}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "from utils.data.dataset_config import load_dataset_config as f; f(None)"
python3 benchmarks.py --train-throughput --cfg models/yolov5s.yaml models/yolov5_mobilenetv4.yaml --imgsz 640 \
  --train-batch 64 --train-batches 4 --workers 8 --device 0 --out "$OUT/train_throughput"
for cfg in yolov5_mobilenetv4 yolov5s; do
  python3 train.py --cfg models/$cfg.yaml --imgsz 640 --batch-size 64 --epochs 2 --device 0 --workers 8 \
    --project /tmp/runs --name amp_$cfg --noplots > "$OUT/train_amp_$cfg.log" 2>&1
  grep -a -E "GPU_mem|[0-9]/2 " "$OUT/train_amp_$cfg.log" | tr '\r' '\n' | grep -E "^ +2/2" | tail -1 >> "$OUT/train_amp_summary.txt"
done
CFGS=$(ls models/yolov5[nsm].yaml models/yolov5*_mobile*.yaml | tr '\n' ' ')
python3 benchmarks.py --cfg $CFGS --imgsz 640 --backends pytorch --no-cpu --unfused --runs 50 --warmup 10 --out "$OUT/gpu640"
