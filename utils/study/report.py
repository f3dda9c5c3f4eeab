"""The study's rows and what it writes from them: the Pareto front, study.md, study.csv and study.png."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.files import atomic_write, atomic_write_text

TITLE = "# Comparison study"  # study.md's first line: a study.md without it is not ours and is never replaced
COLUMNS = ("model", "head", "params", "GFLOPs", "float ms", "INT8 ms", "INT8/float", "P", "R", "mAP50", "mAP50-95",
           "INT8 mAP50-95", "Pareto", "status")  # fmt: skip


@dataclass
class StudyRow:
    """One model of the study: what it is, its size, accuracy and latency, and whether it got that far."""

    model: str
    source: str = ""  # the config (or the peer's model name) it was built from
    head: str = ""
    status: str = "ok"  # "ok" or "failed: <one line>"
    params: int | None = None
    gflops: float | None = None
    precision: float | None = None
    recall: float | None = None
    map50: float | None = None
    map50_95: float | None = None
    int8_map50_95: float | None = None
    float_onnx: str | None = None  # file names relative to the model's folder
    int8_onnx: str | None = None
    float_ms: float | None = None
    int8_ms: float | None = None
    int8_ratio: float | None = None
    pareto: bool | None = None  # None: not on the plot (failed, or not timed)
    note: str = ""

    @property
    def ok(self) -> bool:
        """Whether the model trained, validated and exported."""
        return self.status == "ok"

    def as_dict(self) -> dict[str, Any]:
        """The row as plain JSON-ready data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyRow:
        """A row back from as_dict() (unknown keys ignored, so older files still read)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (latency, accuracy) points: True where no other point is as fast and as accurate and strictly better in one."""
    flags = []
    for i, (t, a) in enumerate(points):
        dominated = any(t2 <= t and a2 >= a and (t2 < t or a2 > a) for j, (t2, a2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def mark_pareto(rows: Sequence[StudyRow]) -> None:
    """Set each row's `pareto`: the front of mAP50-95 (higher) against float latency (lower); None where either is missing."""
    placed = [r for r in rows if r.ok and _finite(r.float_ms) and _finite(r.map50_95)]
    for r in rows:
        r.pareto = None
    for r, on in zip(placed, pareto_front([(float(r.float_ms or 0), float(r.map50_95 or 0)) for r in placed])):
        r.pareto = on


def _num(x: float | None, digits: int) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "-"


def _pareto(on: bool | None, missing: str) -> str:
    return missing if on is None else "yes" if on else "no"


def _status(r: StudyRow) -> str:
    return r.status + (f" ({r.note})" if r.note else "")


def cells(r: StudyRow) -> list[str]:
    """The row as table cells, in COLUMNS order ('-' where there is no figure)."""
    params = f"{r.params / 1e6:.2f}M" if r.params else "-"
    return [r.model, r.head or "-", params, _num(r.gflops, 2), _num(r.float_ms, 2), _num(r.int8_ms, 2), _num(r.int8_ratio, 2),
            _num(r.precision, 3), _num(r.recall, 3), _num(r.map50, 4), _num(r.map50_95, 4), _num(r.int8_map50_95, 4),
            _pareto(r.pareto, "-"), _status(r)]  # fmt: skip


def table(rows: Sequence[StudyRow]) -> list[str]:
    """The Markdown table of the rows."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return lines + ["| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |" for r in rows]


def csv_text(rows: Sequence[StudyRow]) -> str:
    """study.csv: the table's columns with unrounded figures (empty where there is none)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        raw = [r.model, r.head, r.params, r.gflops, r.float_ms, r.int8_ms, r.int8_ratio, r.precision, r.recall, r.map50, r.map50_95,
               r.int8_map50_95, _pareto(r.pareto, ""), _status(r)]  # fmt: skip
        writer.writerow(["" if v is None else v for v in raw])
    return buf.getvalue()


def plot(rows: Sequence[StudyRow], path: Path) -> Path | None:
    """study.png: mAP50-95 against float latency, every point labelled, the Pareto front as a step line with its points
    marked; None (and nothing written) when there is no timed point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    placed = [r for r in rows if r.pareto is not None]
    if not placed:
        return None
    fig = Figure(figsize=(8, 5.5), tight_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xy = {r.model: (float(r.float_ms or 0.0), float(r.map50_95 or 0.0)) for r in placed}
    ax.scatter([x for x, _ in xy.values()], [y for _, y in xy.values()], s=30, color="tab:blue", zorder=2, label="model")
    front = sorted(xy[r.model] for r in placed if r.pareto)
    ax.step([x for x, _ in front], [y for _, y in front], where="post", color="tab:red", zorder=1, label="Pareto front")
    ax.scatter([x for x, _ in front], [y for _, y in front], s=90, facecolors="none", edgecolors="tab:red", linewidths=1.5, zorder=3)
    for name, point in xy.items():
        ax.annotate(name, point, textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("ONNX Runtime float32 latency (ms, batch 1)")
    ax.set_ylabel("mAP50-95")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    ax.margins(0.12)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=150)
    return path


def check_writable(folder: Path) -> None:
    """Refuse (ValueError naming the file) a study.md or study.csv in `folder` that this study did not write."""
    md, table_csv = folder / "study.md", folder / "study.csv"
    if md.is_file() and not md.read_text(encoding="utf-8", errors="replace").startswith(TITLE):
        raise ValueError(f"{md}: exists and was not written by study.py; refusing to replace it (choose another --name)")
    if table_csv.is_file() and not table_csv.read_text(encoding="utf-8", errors="replace").startswith(",".join(COLUMNS[:3])):
        raise ValueError(f"{table_csv}: exists and was not written by study.py; refusing to replace it (choose another --name)")


def write_report(rows: Sequence[StudyRow], folder: Path, header: list[str]) -> list[Path]:
    """study.md (header lines, the table, the plot), study.csv and study.png (when matplotlib imports) in `folder`."""
    check_writable(folder)
    written = [folder / "study.csv"]
    atomic_write_text(written[0], csv_text(rows))
    try:
        png = plot(rows, folder / "study.png")
    except ImportError:
        png = None
        print("study.png skipped: matplotlib is not installed (pip install matplotlib)")
    figure = ["", "![mAP50-95 against float latency, Pareto front in red](study.png)"] if png else []
    atomic_write_text(folder / "study.md", "\n".join([TITLE, "", *header, "", *table(rows), *figure]) + "\n")
    return [folder / "study.md", *written, *([png] if png else [])]
