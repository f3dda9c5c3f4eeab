#!/usr/bin/env bash
# Same short recipe for every config, trained side by side on one GPU; writes a mAP table.
# usage: OUT=dir EPOCHS=40 IMGSZ=320 bash scripts/train_compare.sh models/yolov5s.yaml models/yolov5_mobilenetv4.yaml ...
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/compare}; EPOCHS=${EPOCHS:-40}; IMGSZ=${IMGSZ:-320}; BATCH=${BATCH:-32}; DEVICE=${DEVICE:-0}
mkdir -p "$OUT"
python3 -c "from utils.data.dataset_config import load_dataset_config as f; f(None)"
for cfg in "$@"; do
  name=$(basename "$cfg" .yaml)
  python3 train.py --cfg "$cfg" --imgsz "$IMGSZ" --epochs "$EPOCHS" --batch-size "$BATCH" --device "$DEVICE" --workers 1 \
    --project /tmp/compare --name "$name" --exist-ok --noplots --seed 0 > "$OUT/$name.log" 2>&1 &
done
wait
python3 scripts/collect_results.py /tmp/compare --out "$OUT/map_${IMGSZ}_${EPOCHS}ep.md"
