"""Run directories (runs/train/exp, exp2, ...) and the repository root."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Union

ROOT = Path(__file__).resolve().parents[1]


def increment_path(path: Union[str, Path], exist_ok: bool = False, sep: str = "", mkdir: bool = False) -> Path:
    """runs/exp -> runs/exp2, runs/exp3, ... unless exist_ok; the YOLOv5 run-folder rule."""
    path = Path(path)
    if path.exists() and not exist_ok:
        stem, suffix = (path.with_suffix(""), path.suffix) if path.is_file() else (path, "")
        pattern = re.compile(rf"^{re.escape(stem.name)}{re.escape(sep)}(\d+)$")
        taken = [int(m.group(1)) for p in stem.parent.glob(f"{stem.name}{sep}*") if (m := pattern.match(p.with_suffix('').name))]
        n = max(taken, default=1) + 1
        path = stem.parent / f"{stem.name}{sep}{n}{suffix}"
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path
