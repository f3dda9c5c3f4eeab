"""Write the sample images of data/images/: shapes scenes like the embedded training data, at photo sizes.

python -m scripts.make_sample_images [--out data/images] [--force]   (from the repository root)
The scenes are deterministic (fixed seeds); an existing file with different bytes is refused unless --force is given.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from utils.data.shapes_dataset import SHAPE_NAMES, draw_scene

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "data" / "images"
JPEG_QUALITY = 85  # keeps each file near 150 KB despite the background's pixel noise
# Object sides as fractions of the image's short side: the training images (96-192 px) hold objects of ~10-45% of theirs,
# so at any inference size the detector sees these objects at the scale it learned.
MIN_OBJECT_FRACTION, MAX_OBJECT_FRACTION = 0.15, 0.40


class Sample(NamedTuple):
    """One sample image: file name, size in pixels, RNG seed and number of objects."""

    name: str
    width: int
    height: int
    seed: int
    n_objects: int


# Each seed is the first (from 0) whose objects are all placed, all three classes appear, and no two boxes come closer
# than 2% of the short side: a sample that shows every class, with no touching pair. Chosen from the labels alone.
SAMPLES = (
    Sample("shapes_street.jpg", 1280, 720, seed=7, n_objects=5),  # landscape, like YOLOv5's zidane.jpg
    Sample("shapes_tall.jpg", 810, 1080, seed=10, n_objects=4),  # portrait, like YOLOv5's bus.jpg
)


def draw_sample(sample: Sample) -> tuple[np.ndarray, list[str]]:
    """Draw one sample's scene (BGR image, YOLO label lines); raises if its seed no longer places every object."""
    short = min(sample.width, sample.height)
    img, lines = draw_scene(np.random.default_rng(sample.seed), sample.height, sample.width, len(SHAPE_NAMES),
                            n_objects=sample.n_objects, min_object=int(MIN_OBJECT_FRACTION * short),
                            max_fraction=MAX_OBJECT_FRACTION)
    if len(lines) != sample.n_objects:
        raise RuntimeError(f"{sample.name}: seed {sample.seed} placed {len(lines)} of {sample.n_objects} objects")
    return img, lines


def sample_scenes() -> list[tuple[str, np.ndarray]]:
    """(file name, BGR image) of every sample, drawn in memory so that tests can compare them with the shipped files."""
    return [(s.name, draw_sample(s)[0]) for s in SAMPLES]


def encode_jpeg(img: np.ndarray) -> bytes:
    """JPEG bytes of a BGR image at JPEG_QUALITY."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def write_samples(out_dir: Path, force: bool = False) -> list[str]:
    """Write every sample into out_dir; refuses (FileExistsError, nothing written) to replace a different file unless force."""
    encoded = [(out_dir / name, encode_jpeg(img)) for name, img in sample_scenes()]
    clashes = [p for p, data in encoded if p.exists() and (not p.is_file() or p.read_bytes() != data)]
    if clashes and not force:
        raise FileExistsError(f"{', '.join(map(str, clashes))}: exists with different content; pass --force to overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = []
    for path, data in encoded:
        if path.is_file() and path.read_bytes() == data:
            report.append(f"{path}: unchanged")
            continue
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # never a half-written image under the real name
        report.append(f"{path}: {len(data)} bytes")
    return report


def main(argv: list[str] | None = None) -> None:
    """Command line: write the sample images, one line per file; a refusal is one `error:` line and exit code 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    parser.add_argument("--force", action="store_true", help="overwrite existing files whose content differs")
    args = parser.parse_args(argv)
    try:
        report = write_samples(args.out, args.force)
    except (FileExistsError, RuntimeError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print("\n".join(report))


if __name__ == "__main__":
    main()
