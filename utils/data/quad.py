"""--quad: YOLOv5's four-image collate, which trains on half as many pixels per object at twice the image size.

Each group of four consecutive images of a batch becomes one image of twice the height and width: with probability
0.5 the group's first image upsampled 2x (bilinear; its labels kept, the other three dropped), otherwise the four
tiled 2x2 (first top-left, second bottom-left, third top-right, fourth bottom-right, as YOLOv5) with their normalised
labels moved into their quadrant. A batch of B images thus becomes ceil(B / 4) images of 2H x 2W.
Divergences from YOLOv5: a last group of 1-3 images (B not a multiple of 4) is kept, its missing tiles filled with the
letterbox grey (114) and no labels, where YOLOv5 drops those images (and fails on a batch under 4); each output image
carries the path and shapes of its group's first image (YOLOv5 returns the first B / 4 paths of the batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

PAD_VALUE = 114  # the letterbox grey
# (x offset, y offset) of each of the four tiles, in tiles
TILE_OFFSETS = ((0, 0), (0, 1), (1, 0), (1, 1))


def _upsample(img: torch.Tensor) -> torch.Tensor:
    """One CHW uint8 image at 2x size (bilinear), as uint8."""
    big = F.interpolate(img.unsqueeze(0).float(), scale_factor=2.0, mode="bilinear", align_corners=False)[0]
    return big.round().clamp(0, 255).to(img.dtype)


def _tile(imgs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to four CHW images tiled 2x2 (missing tiles grey) and their labels moved into their quadrant."""
    blank = torch.full_like(imgs[0], PAD_VALUE)
    tiles = [imgs[k] if k < len(imgs) else blank for k in range(4)]
    left, right = torch.cat((tiles[0], tiles[1]), 1), torch.cat((tiles[2], tiles[3]), 1)
    moved = []
    for lb, (dx, dy) in zip(labels, TILE_OFFSETS):
        lb = lb.clone()
        lb[:, 2] = (lb[:, 2] + dx) / 2
        lb[:, 3] = (lb[:, 3] + dy) / 2
        lb[:, 4:6] = lb[:, 4:6] / 2
        moved.append(lb)
    return torch.cat((left, right), 2), torch.cat(moved, 0)


def collate_quad(
    batch: list[tuple], draw: Callable[[], float] | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], tuple]:
    """Collate a batch into ceil(B/4) images of 2x size (LoadImagesAndLabels.collate_fn's contract); `draw` gives U(0, 1)."""
    draw = draw or np.random.random  # the loader seeds numpy in each worker (seed_worker)
    imgs, labels, paths, shapes = zip(*batch)
    out_imgs: list[torch.Tensor] = []
    out_labels: list[torch.Tensor] = []
    for start in range(0, len(imgs), 4):
        group, group_labels = imgs[start:start + 4], labels[start:start + 4]
        if float(draw()) < 0.5:
            img, lb = _upsample(group[0]), group_labels[0].clone()
        else:
            img, lb = _tile(group, group_labels)
        lb[:, 0] = len(out_imgs)
        out_imgs.append(img)
        out_labels.append(lb)
    return torch.stack(out_imgs, 0), torch.cat(out_labels, 0), tuple(paths[::4]), tuple(shapes[::4])
