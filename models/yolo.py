"""YOLOv5's `python models/yolo.py --cfg yolov5s.yaml` and import path: DetectionModel (models/model.py) and Detect
(models/heads/detect.py) are re-exported for `from models.yolo import DetectionModel, Detect`."""

from __future__ import annotations

if __name__ == "__main__":  # `python models/yolo.py --cfg yolov5s.yaml` as in YOLOv5: layer table, summary, one forward pass
    # Fixes sys.path before any `models.*` import, runs models.info and exits.
    import sys
    from pathlib import Path as _Path

    _models_dir = _Path(__file__).resolve().parent
    _root = str(_models_dir.parent)  # on sys.path instead of models/ (the script's folder), so `models.*` imports resolve
    if sys.path and _Path(sys.path[0] or ".").resolve() == _models_dir:
        sys.path[0] = _root
    else:  # e.g. python -P, which does not prepend the script's folder
        sys.path.insert(0, _root)
    from models.info import main as _info_main

    raise SystemExit(_info_main(layer_table=True))

from models.heads.detect import Detect  # noqa: F401  (YOLOv5's import path)
from models.model import DetectionModel, Model, load_model_config  # noqa: F401  (YOLOv5's import path)
