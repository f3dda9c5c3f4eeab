"""python -m utils.tracking GT TRACKS: score a tracker's MOT file against ground truth (MOTA, IDF1, ...)."""

from __future__ import annotations

from utils.tracking.mot import mot_metrics, read_mot


def main(argv: list[str] | None = None) -> None:
    """python -m utils.tracking GT TRACKS [--iou 0.5]: MOTA, IDF1 and the other metrics of a MOT results file."""
    import argparse

    p = argparse.ArgumentParser(description="Score MOTChallenge tracker output (detect.py --track's tracks/*.txt) against ground truth")
    p.add_argument("gt", help="ground-truth MOT file (frame,id,x,y,w,h,...)")
    p.add_argument("tracks", help="tracker output MOT file")
    p.add_argument("--iou", type=float, default=0.5, help="IoU a match needs")
    opt = p.parse_args(argv)
    try:
        scores = mot_metrics(read_mot(opt.gt), read_mot(opt.tracks), opt.iou)
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"mot: error: {e}") from None
    print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) and not v.is_integer() else f"{k} {int(v)}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
