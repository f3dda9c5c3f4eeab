"""ONNX rewrites that let onnx2tf 1.28.8 convert the top-k heads (end-to-end, RT-DETR); pure onnx, no TensorFlow.

They are applied only to the copy of the model that utils/export/tflite.py hands to onnx2tf, never to the .onnx the user
gets, and each keeps the ONNX model valid and its ONNX Runtime output unchanged:

- TopK's K (ONNX: a 1-element 1-D tensor) is routed through an Identity: onnx2tf calls int() on a constant K, which NumPy 2
  refuses for a 1-element array, but casts and squeezes a computed one.
- The end-to-end head's ranking tail (top-k positions, gather their rows, top-k pairs, gather the pairs' boxes) is rebuilt
  on 2-D (rows, channels) tensors, pair // C and pair % C looked up in tables (no division). onnx2tf treats every 3-D
  tensor as channel-last and permutes 3-D constants and axes to match, but keeps the 3-D tensors that Unsqueeze/Gather
  make from 2-D ones in the ONNX layout, so the exported Expand/GatherElements chain fails (shape mismatch); 2-D
  tensors have no layout to guess. RT-DETR gets past its TopK but still fails later (see models/heads/rtdetr.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np

TAIL = "onnx2tf_end2end"  # name prefix of the rebuilt end-to-end tail's nodes and tensors


def prepare_for_onnx2tf(src: Union[str, Path], dst: Union[str, Path, None] = None) -> list[str]:
    """Rewrite the ONNX file `src` (into `dst`, default in place) for onnx2tf; returns the names of the fixes applied."""
    import onnx

    proto = onnx.load(str(src))
    applied = []
    if rebuild_end2end_tail(proto):
        applied.append("end2end_tail")
    if route_topk_k(proto):
        applied.append("topk_k")
    if applied:
        onnx.checker.check_model(proto)
    onnx.save(proto, str(dst if dst is not None else src))
    return applied


def route_topk_k(proto: Any) -> int:
    """Feed every TopK's K through an Identity node (K stays a 1-element 1-D tensor); returns how many were changed."""
    from onnx import helper

    computed = {o for n in proto.graph.node if n.op_type != "Constant" for o in n.output}
    changed = 0
    for node in [n for n in proto.graph.node if n.op_type == "TopK"]:
        if node.input[1] in computed:
            continue  # already computed by a node: onnx2tf takes it as a tensor
        out = f"{node.output[0]}_k_for_onnx2tf"
        index = list(proto.graph.node).index(node)
        proto.graph.node.insert(index, helper.make_node("Identity", [node.input[1]], [out], name=f"{out}_identity"))
        node.input[1] = out
        changed += 1
    return changed


def _constant_values(proto: Any) -> dict[str, np.ndarray]:
    """Values of the graph's initializers and Constant nodes, by tensor name."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return values


def _static_shapes(proto: Any) -> dict[str, list[int]]:
    """Shape-inferred static shapes of the graph's tensors."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in infos}


def _find_end2end_tail(proto: Any) -> dict[str, Any] | None:
    """The end-to-end head's tail, if the graph ends in one: scores (B, N, C), boxes (B, N, 4), K and the box scale.

    Recognised by its structure: output (B, k, 6) from a Concat whose first input is the boxes (a GatherElements, maybe
    times a box-scale constant), and a TopK over ReduceMax(scores, last axis) whose rows the boxes are gathered from.
    """
    producers = {o: n for n in proto.graph.node for o in n.output}
    consts, shapes = _constant_values(proto), _static_shapes(proto)
    out = proto.graph.output[0].name
    concat = producers.get(out)
    out_shape = shapes.get(out, [])
    if concat is None or concat.op_type != "Concat" or len(out_shape) != 3 or out_shape[2] != 6 or len(concat.input) != 3:
        return None
    box, scale = producers.get(concat.input[0]), np.ones(4, np.float32)
    if box is not None and box.op_type == "Mul" and any(i in consts for i in box.input):
        scale = next(consts[i] for i in box.input if i in consts).astype(np.float32).reshape(-1)[-4:]
        box = producers.get(next(i for i in box.input if i not in consts))
    topk = next((n for n in proto.graph.node if n.op_type == "TopK"), None)
    reduce = producers.get(topk.input[0]) if topk is not None else None
    if topk is None or box is None or box.op_type != "GatherElements" or reduce is None or reduce.op_type != "ReduceMax":
        return None
    scores, k = reduce.input[0], consts.get(topk.input[1])
    s_shape = shapes.get(scores, [])
    gathers = [n for n in proto.graph.node if n.op_type == "GatherElements" and shapes.get(n.input[0], [])[-1:] == [4]]
    boxes = next((g.input[0] for g in gathers if shapes.get(g.input[0], [])[:2] == s_shape[:2]), None)
    if k is None or len(s_shape) != 3 or min(s_shape) <= 0 or boxes is None or scale.size != 4:
        return None
    return {"scores": scores, "boxes": boxes, "k": int(k.reshape(-1)[0]), "scale": scale, "shape": s_shape, "out": out}


def rebuild_end2end_tail(proto: Any) -> bool:
    """Replace the end-to-end head's ranking tail by the same computation on 2-D tensors; False if there is none.

    Scores S (B, N, C) and boxes (B, N, 4) become (B*N, .) rows; the top-k positions index them with a per-image offset
    (b*N), the top-k pairs over the k gathered positions' scores (B, k*C) give the class (pair % C) and the position
    (pair // C, offset b*k) whose box they take, both read from (k*C, 1) tables: onnx2tf's integer Div went through a
    float reciprocal in float16 and took a neighbour's box. Output: (B*k, 6) rows reshaped to (B, k, 6), as the original.
    """
    from onnx import helper, numpy_helper

    tail = _find_end2end_tail(proto)
    if tail is None:
        return False
    (b, n, c), k = tail["shape"], tail["k"]
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    consts = {
        "rows_nc": [b * n, c], "rows_n4": [b * n, 4], "bn": [b, n], "flat_k": [b * k], "bkc": [b, k * c], "col": [b * k, 1],
        "out_shape": [b, k, 6], "k": [k], "axes": [1],
    }  # fmt: skip
    inits = [numpy_helper.from_array(np.asarray(v, np.int64), f"{TAIL}/{name}") for name, v in consts.items()]
    inits.append(numpy_helper.from_array(np.arange(b, dtype=np.int64)[:, None] * n, f"{TAIL}/offset_n"))  # image b's rows start at b*N
    inits += [numpy_helper.from_array(tail["scale"].reshape(1, 4), f"{TAIL}/box_scale"),
              numpy_helper.from_array((np.arange(k * c) // c).astype(np.int64)[:, None], f"{TAIL}/pair_pos_table"),
              numpy_helper.from_array((np.arange(k * c) % c).astype(np.float32)[:, None], f"{TAIL}/pair_cls_table"),
              numpy_helper.from_array(np.repeat(np.arange(b, dtype=np.int64) * k, k)[:, None], f"{TAIL}/offset_pairs")]  # fmt: skip

    def t(name: str) -> str:
        return f"{TAIL}/{name}"

    def node(op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> Any:
        return helper.make_node(op, inputs, outputs, name=t(outputs[0].rsplit("/", 1)[-1]), **attrs)

    reduce = (node("ReduceMax", [t("scores"), t("axes")], [t("best")], keepdims=0) if opset >= 18
              else node("ReduceMax", [t("scores")], [t("best")], axes=[1], keepdims=0))  # fmt: skip
    nodes = [
        node("Reshape", [tail["scores"], t("rows_nc")], [t("scores")]),
        node("Reshape", [tail["boxes"], t("rows_n4")], [t("boxes")]),
        reduce,
        node("Reshape", [t("best"), t("bn")], [t("best_bn")]),
        node("TopK", [t("best_bn"), t("k")], [t("pos_score"), t("pos")], axis=1),
        node("Add", [t("pos"), t("offset_n")], [t("pos_rows_bk")]),
        node("Reshape", [t("pos_rows_bk"), t("flat_k")], [t("pos_rows")]),
        node("Gather", [t("scores"), t("pos_rows")], [t("top_scores")], axis=0),
        node("Gather", [t("boxes"), t("pos_rows")], [t("top_boxes")], axis=0),
        node("Reshape", [t("top_scores"), t("bkc")], [t("pair_scores")]),
        node("TopK", [t("pair_scores"), t("k")], [t("score"), t("pair")], axis=1),
        node("Reshape", [t("pair"), t("flat_k")], [t("pair_flat")]),
        node("Gather", [t("pair_pos_table"), t("pair_flat")], [t("pair_pos")], axis=0),  # pair // C, looked up: no division
        node("Add", [t("pair_pos"), t("offset_pairs")], [t("pair_rows_col")]),
        node("Reshape", [t("pair_rows_col"), t("flat_k")], [t("pair_rows")]),
        node("Gather", [t("top_boxes"), t("pair_rows")], [t("pair_boxes")], axis=0),
        node("Mul", [t("pair_boxes"), t("box_scale")], [t("boxes_out")]),
        node("Reshape", [t("score"), t("col")], [t("score_col")]),
        node("Gather", [t("pair_cls_table"), t("pair_flat")], [t("cls_col")], axis=0),  # pair % C as float
        node("Concat", [t("boxes_out"), t("score_col"), t("cls_col")], [t("rows")], axis=1),
        node("Reshape", [t("rows"), t("out_shape")], [tail["out"]]),
    ]
    old = [x for x in proto.graph.node if tail["out"] not in x.output]
    del proto.graph.node[:]
    proto.graph.node.extend(old + nodes)
    proto.graph.initializer.extend(inits)
    _drop_dead_nodes(proto)
    return True


def _drop_dead_nodes(proto: Any) -> None:
    """Remove the nodes (and initializers) no graph output depends on."""
    needed = {o.name for o in proto.graph.output}
    keep = []
    for node in reversed(list(proto.graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(keep))
    inits = [i for i in proto.graph.initializer if i.name in needed]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(inits)
    values = [v for v in proto.graph.value_info if v.name in needed]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(values)
