"""Instance-mask geometry shared by validation, prediction and the inference API: letterbox -> original image, index
masks -> one mask per instance, and masks -> polygons (YOLO segmentation label rows)."""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MASK_THRESHOLD = 0.5  # a pixel belongs to the instance when its mask probability exceeds this


def letterbox_crop(img_hw: tuple[int, int], shape0: tuple[int, int], ratio_pad: tuple | None = None) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the image content inside a letterboxed (img_hw) input of an original `shape0` image."""
    if ratio_pad is None:
        gain = min(img_hw[0] / shape0[0], img_hw[1] / shape0[1])
        pad = ((img_hw[1] - shape0[1] * gain) / 2, (img_hw[0] - shape0[0] * gain) / 2)
    else:
        pad = ratio_pad[1]
    top, left = int(round(pad[1] - 0.1)), int(round(pad[0] - 0.1))
    bottom, right = int(round(img_hw[0] - pad[1] + 0.1)), int(round(img_hw[1] - pad[0] + 0.1))
    return max(top, 0), max(left, 0), max(min(bottom, img_hw[0]), top + 1), max(min(right, img_hw[1]), left + 1)


def scale_masks(masks: torch.Tensor, img_hw: tuple[int, int], shape0: tuple[int, int], ratio_pad: tuple | None = None) -> torch.Tensor:
    """(n, h, w) masks over a letterboxed input of size img_hw (any h, w: proto or input resolution) -> (n, h0, w0) float
    masks over the original image: the padding is cut off and the rest resized bilinearly."""
    h, w = masks.shape[-2:]
    top, left, bottom, right = letterbox_crop(img_hw, shape0, ratio_pad)
    sy, sx = h / img_hw[0], w / img_hw[1]
    y0, x0 = int(top * sy), int(left * sx)
    crop = masks[:, y0 : max(int(round(bottom * sy)), y0 + 1), x0 : max(int(round(right * sx)), x0 + 1)]
    if crop.shape[0] == 0:
        return masks.new_zeros((0, *shape0), dtype=torch.float32)
    return F.interpolate(crop[None].float(), size=tuple(shape0), mode="bilinear", align_corners=False)[0]


def index_to_binary(index_mask: torch.Tensor, n: int) -> torch.Tensor:
    """(h, w) index mask (k + 1 marks instance k, 0 background) -> (n, h, w) bool masks."""
    ids = torch.arange(1, n + 1, device=index_mask.device).view(-1, 1, 1)
    return index_mask[None].long() == ids


def mask_to_polygon(mask: np.ndarray) -> np.ndarray:
    """The outline of a binary mask's largest region as (k, 2) float32 pixel points ((0, 2) for an empty mask)."""
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.zeros((0, 2), np.float32)
    return max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float32)
