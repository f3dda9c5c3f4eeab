"""NMS appended to the onnx2tf SavedModel in TF ops TFLite has as builtins (export.py --include tflite --nms).

Imported only inside the TFLiteConverter subprocess (utils/export/tflite.py `_converter_main`): TensorFlow must never be
loaded into the exporting process. The plain model is converted as without --nms; its serving signature is then
wrapped in a tf.function that decodes the head output, keeps each box's best class (anchor-based: objectness x class,
as utils/nms.py), and runs NonMaxSuppressionV5 (TFLite NON_MAX_SUPPRESSION_V5) with its output padded to --topk-all
rows; the rows past the returned valid count are zeroed, so the file returns the end-to-end layout of the ONNX --nms
export: (B, topk_all, 6 + nm) rows [x1, y1, x2, y2, confidence, class, mask coefficients...], best first, boxes
normalised to [0, 1] like the plain file's (the runner multiplies them by the metadata's box_scale), then the model's
further outputs (a segmentation model's prototypes) unchanged. Per-class NMS shifts each box by its class times an
offset larger than any box (utils/nms.py's max_wh, 7680 pixels), so boxes of different classes never overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from utils.runtime.tflite import box_channel_axis, match_outputs

MAX_WH = 7680.0  # pixels: the class offset of utils/nms.py's per-class NMS, larger than any box


def head_layout(meta: dict[str, Any]) -> tuple[int, int, int]:
    """(objectness columns, nc, nm) of the head output, from its ONNX shapes (metadata "output_shapes") and class names.

    nm (mask coefficients per box) is the prototypes' channel count of a model with a second output; what is left of
    the head's channels after the box, the nc class scores and nm must be 0 or 1 objectness column.
    """
    shapes = meta["output_shapes"]
    nc = len(meta.get("names") or [])
    nm = int(shapes[1][1]) if len(shapes) > 1 else 0
    obj = int(shapes[0][box_channel_axis(meta)]) - 4 - nc - nm
    if nc < 1 or obj not in (0, 1):
        raise ValueError(f"head output {shapes[0]} does not hold 4 box + {nc} class + {nm} mask values (+ objectness)")
    return obj, nc, nm


def _image_rows(tf: Any, x: Any, layout: tuple[int, int, int], settings: dict[str, Any], imgsz: list[int]) -> Any:
    """One image's (N, C) head rows (normalised xywh, [objectness], class scores, extras) -> (topk_all, 6 + nm) NMS rows."""
    obj, nc, nm = layout
    k = int(settings["topk_all"])
    xy, half = x[:, :2], x[:, 2:4] / 2
    boxes = tf.concat([xy - half, xy + half], 1)
    scores = x[:, 4 + obj : 4 + obj + nc]
    if obj:
        scores = scores * x[:, 4:5]
    best = tf.reduce_max(scores, 1)
    label = tf.cast(tf.argmax(scores, 1), tf.float32)
    shifted = boxes
    if not settings["agnostic"]:  # normalised boxes: the pixel offset divided by the width / height per coordinate
        h, w = imgsz
        shifted = boxes + label[:, None] * tf.constant([[MAX_WH / w, MAX_WH / h, MAX_WH / w, MAX_WH / h]], tf.float32)
    index, _, valid = tf.raw_ops.NonMaxSuppressionV5(
        boxes=shifted, scores=best, max_output_size=tf.constant(k, tf.int32),
        iou_threshold=tf.constant(settings["iou_thres"], tf.float32),
        score_threshold=tf.constant(settings["conf_thres"], tf.float32),
        soft_nms_sigma=tf.constant(0.0, tf.float32), pad_to_max_output_size=True,
    )  # fmt: skip
    columns = [tf.gather(boxes, index), tf.gather(best, index)[:, None], tf.gather(label, index)[:, None]]
    if nm:
        columns.append(tf.gather(x[:, 4 + obj + nc :], index))
    rows = tf.concat(columns, 1)
    real = (tf.range(k) < valid)[:, None]  # index pads with 0 (box 0) past the valid count: zero those rows
    return tf.where(real, rows, tf.zeros_like(rows))


def _head_rows(tf: Any, outputs: list[Any], meta: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The signature's outputs -> the head output as (B, N, C) rows and the further outputs as onnx2tf gave them."""
    details = [{"shape": [int(d) for d in t.shape], "i": i} for i, t in enumerate(outputs)]
    matched = match_outputs(details, meta["output_shapes"])
    (head, perm), rest = matched[0], matched[1:]
    y = outputs[head["i"]]
    if perm is not None:
        y = tf.transpose(y, perm)
    if box_channel_axis(meta) == 1:  # (B, C, N) anchor-free layout
        y = tf.transpose(y, (0, 2, 1))
    return y, [outputs[d["i"]] for d, _ in rest]


def nms_converter(saved_model: Path, meta: dict[str, Any]) -> tuple[Any, list[list[int]]]:
    """A TFLiteConverter of the SavedModel followed by NMS (meta["nms"] settings) and the wrapped outputs' shapes."""
    import tensorflow as tf

    settings, imgsz = meta["nms"], [int(v) for v in meta["imgsz"]]
    layout = head_layout(meta)
    loaded = tf.saved_model.load(str(saved_model))
    signature = loaded.signatures["serving_default"]
    ((name, spec),) = signature.structured_input_signature[1].items()
    batch = int(spec.shape[0])

    @tf.function(input_signature=[tf.TensorSpec(spec.shape, tf.float32, name=name)])
    def serve(images: Any) -> list[Any]:
        out = signature(**{name: images})
        head, rest = _head_rows(tf, [out[key] for key in sorted(out)], meta)
        rows = tf.stack([_image_rows(tf, head[b], layout, settings, imgsz) for b in range(batch)])  # static batch
        return [rows, *rest]

    concrete = serve.get_concrete_function()
    shapes = [[batch, int(settings["topk_all"]), 6 + layout[2]], *meta["output_shapes"][1:]]
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete], loaded), shapes
