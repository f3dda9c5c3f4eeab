"""Summarise runs/train-style folders: best-fitness epoch's P, R, mAP50, mAP50-95 from each results.csv."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def best_row(path: Path) -> dict[str, float]:
    """The results.csv row with the highest fitness (0.1 mAP50 + 0.9 mAP50-95)."""
    with path.open() as f:
        rows = [{k.strip(): float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return max(rows, key=lambda r: 0.1 * r["metrics/mAP_0.5"] + 0.9 * r["metrics/mAP_0.5:0.95"]) | {"epochs": len(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, required=True)
    opt = p.parse_args()
    lines = ["| run | epochs | best epoch | P | R | mAP50 | mAP50-95 |", "|---|---|---|---|---|---|---|"]
    for csv_path in sorted(opt.root.glob("*/results.csv")):
        r = best_row(csv_path)
        lines.append(f"| {csv_path.parent.name} | {r['epochs']:.0f} | {r['epoch'] + 1:.0f} | {r['metrics/precision']:.3f} | "
                     f"{r['metrics/recall']:.3f} | {r['metrics/mAP_0.5']:.3f} | {r['metrics/mAP_0.5:0.95']:.3f} |")
    opt.out.parent.mkdir(parents=True, exist_ok=True)
    opt.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
