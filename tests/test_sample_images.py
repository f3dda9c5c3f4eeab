"""The shipped sample images (data/images/): readable, the expected sizes, and reproducible from the script's seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scripts.make_sample_images import JPEG_QUALITY, SAMPLES, main, sample_scenes
from utils.data.images import IMG_FORMATS, load_image

IMAGES = Path(__file__).resolve().parents[1] / "data" / "images"
MCU = 16  # a 4:2:0 JPEG's minimum coded unit: four 8x8 luma blocks and one 8x8 block of each chroma plane


def _dc_step(quality: int) -> int:
    """DC quantisation step at `quality` (>= 50): the larger IJG table entry (chroma 17, luma 16) scaled as libjpeg does."""
    return max(1, round(17 * (200 - 2 * quality) / 100))


# Mean of each 16x16 MCU depends only on the DC terms (DC = 8 x block mean for the orthonormal 8x8 DCT), so JPEG moves it by
# at most step / 2 / 8 in Y, Cb and Cr; B = Y + 1.772 (Cb - 128) is the channel that amplifies it most, and rounding of the
# colour conversions adds up to 0.5. The pixel noise, the high frequencies JPEG drops and the chroma upsampling's blending
# across MCU borders average out within the MCU.
# At quality 85 that is 5 / 16 x 2.772 + 0.5 = 1.37 grey levels; a scene drawn from another seed is ~35-50 away.
MCU_MEAN_TOLERANCE = _dc_step(JPEG_QUALITY) / 16 * (1 + 1.772) + 0.5


def _mcu_means(img: np.ndarray) -> np.ndarray:
    """Per-channel means of the image's complete 16x16 MCUs."""
    h, w = img.shape[0] // MCU * MCU, img.shape[1] // MCU * MCU
    return img[:h, :w].astype(np.float64).reshape(h // MCU, MCU, w // MCU, MCU, 3).mean(axis=(1, 3))


def test_data_images_holds_only_the_samples_and_they_load() -> None:
    files = sorted(p.name for p in IMAGES.iterdir())
    assert files == sorted(s.name for s in SAMPLES)
    for s in SAMPLES:
        assert Path(s.name).suffix[1:].lower() in IMG_FORMATS
        img = load_image(IMAGES / s.name)
        assert img.shape == (s.height, s.width, 3) and img.dtype == np.uint8


@pytest.mark.parametrize("name,drawn", sample_scenes(), ids=[s.name for s in SAMPLES])
def test_shipped_pixels_match_the_drawing_code(name: str, drawn: np.ndarray) -> None:
    shipped = load_image(IMAGES / name)
    assert shipped.shape == drawn.shape
    mad = float(np.abs(_mcu_means(shipped) - _mcu_means(drawn)).mean())
    assert mad < MCU_MEAN_TOLERANCE, f"{name}: MCU-mean difference {mad:.2f} >= {MCU_MEAN_TOLERANCE:.2f}; rerun the script"


def test_script_refuses_to_overwrite_a_different_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--out", str(tmp_path)])
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(written) == {s.name for s in SAMPLES}
    main(["--out", str(tmp_path)])  # same bytes: nothing to refuse
    assert "unchanged" in capsys.readouterr().out
    mine = tmp_path / SAMPLES[0].name
    mine.write_bytes(b"the user's own file")
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path)])
    assert str(exc.value).startswith("error: ") and "--force" in str(exc.value)
    assert mine.read_bytes() == b"the user's own file"
    main(["--out", str(tmp_path), "--force"])
    assert mine.read_bytes() == written[SAMPLES[0].name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)  # no temporary files left behind
