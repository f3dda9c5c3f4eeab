"""Core ML export (utils/export/coreml.py): conversion, input/output spec and metadata (read back by utils/runtime/coreml.py);
predictions only on macOS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.test_export import make_checkpoint
from utils.checkpoint import load_model
from utils.export.formats import ExportError, export_metadata
from utils.runtime.coreml import coreml_can_predict, coreml_metadata

coreml = pytest.importorskip("utils.export.coreml")
IMGSZ = (64, 96)



@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, ct: object) -> dict:
    """A yolov5n checkpoint's fused model exported to best.mlpackage (float32)."""
    root = tmp_path_factory.mktemp("coreml")
    ckpt = make_checkpoint(root / "best.pt")
    model = load_model(ckpt).fuse()
    meta = export_metadata(model, IMGSZ, 1, False, False)
    path = coreml.export_coreml(model, root / "best.mlpackage", IMGSZ, meta)
    x = torch.rand(1, 3, *IMGSZ, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)[0].numpy()
    return {"path": path, "meta": meta, "model": model, "x": x, "ref": ref, "root": root}


def test_spec_has_image_input_output_and_metadata(exported: dict, ct: object) -> None:
    spec = ct.utils.load_spec(str(exported["path"]))  # type: ignore[attr-defined]
    (inp,) = spec.description.input
    assert inp.name == "images" and inp.type.WhichOneof("Type") == "imageType"
    assert (inp.type.imageType.height, inp.type.imageType.width) == IMGSZ
    assert inp.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB  # type: ignore[attr-defined]
    (out,) = spec.description.output
    assert out.name == "output0" and list(out.type.multiArrayType.shape) == list(exported["ref"].shape)
    meta = coreml_metadata(exported["path"])
    assert meta["names"] == ["a", "b", "c"] and meta["imgsz"] == list(IMGSZ) and meta["head"] == "anchor_based"
    assert meta["stride"] == exported["meta"]["stride"] and meta["half"] is False


def test_image_scale_is_one_over_255(exported: dict, ct: object) -> None:
    """The ImageType preprocessing (a mul by float32(1/255) in the ML Program) turns 0-255 pixels into [0, 1] inputs."""
    spec = ct.utils.load_spec(str(exported["path"]))  # type: ignore[attr-defined]
    assert f"values: {np.float32(1 / 255):.9g}" in str(spec.mlProgram)


@pytest.mark.parametrize("kw", [{"half": True}, {"int8": True}])
def test_half_and_int8_weights_convert(exported: dict, kw: dict) -> None:
    name = "best_half.mlpackage" if kw.get("half") else "best_int8.mlpackage"
    path = coreml.export_coreml(exported["model"], exported["root"] / name, IMGSZ, exported["meta"], **kw)
    assert path.is_dir()
    meta = coreml_metadata(path)
    assert meta["half"] is bool(kw.get("half")) and meta["int8"] is bool(kw.get("int8"))


def test_nms_without_settings_is_one_line(exported: dict) -> None:
    """export_coreml's nms takes the NMSSettings export.py builds from its flags; anything else is one ExportError line
    (the pipeline itself is tested in tests/test_coreml_nms.py)."""
    with pytest.raises(ExportError, match="nms") as e:
        coreml.export_coreml(exported["model"], exported["root"] / "nms.mlpackage", IMGSZ, exported["meta"], nms=True)
    assert "\n" not in str(e.value)


def test_predictions_match_pytorch(exported: dict, ct: object) -> None:
    """Only where the Core ML runtime exists (macOS): float32 predictions close to PyTorch."""
    ok, why = coreml_can_predict()
    if not ok:
        pytest.skip(why)
    from PIL import Image

    from tests.test_export import assert_close_predictions, checkpoint_tol  # noqa: F401

    x = (exported["x"][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    mlmodel = ct.models.MLModel(str(exported["path"]))  # type: ignore[attr-defined]
    y = mlmodel.predict({"images": Image.fromarray(x)})["output0"]
    ref_x = torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        ref = exported["model"](ref_x)[0].numpy()
    assert np.abs(y - ref).max() < 1e-2 * max(1.0, np.abs(ref).max())


def test_missing_coremltools_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "coremltools", None)
    with pytest.raises(ExportError, match="pip install coremltools") as e:
        coreml.import_coremltools()
    assert "\n" not in str(e.value)


def test_export_py_writes_mlpackage_and_backend_refuses_in_one_line(tmp_path: Path, ct: object) -> None:
    """export.py --include coreml writes best.mlpackage; detect/val on Linux get one line naming the Apple-only runtime."""
    from utils.export.exporter import export_model
    from utils.runtime.backend import DetectBackend

    ckpt = make_checkpoint(tmp_path / "best.pt")
    (path,) = export_model(weights=ckpt, include=["coreml"], imgsz=64)
    assert path == tmp_path / "best.mlpackage" and coreml_metadata(path)["names"] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="Core ML models run only on Apple systems") as e:
        DetectBackend(path)
    assert "\n" not in str(e.value)


def test_reexport_replaces_our_package_but_never_a_users_folder(tmp_path: Path, ct: object) -> None:
    """A second export over best.mlpackage replaces it; an --output naming a user's folder is refused and left as it was."""
    from utils.export.exporter import export_model

    ckpt = make_checkpoint(tmp_path / "best.pt")
    (first,) = export_model(weights=ckpt, include=["coreml"], imgsz=64)
    (again,) = export_model(weights=ckpt, include=["coreml"], imgsz=64)
    assert first == again and coreml.is_coreml_export(again)
    (weight_only,) = export_model(weights=ckpt, include=["coreml"], imgsz=64, int8=True)  # int8 weights need no --data
    assert coreml_metadata(weight_only)["int8"] is True
    user = tmp_path / "mine.mlpackage"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="did not create; refusing to replace it"):
        export_model(weights=ckpt, include=["coreml"], imgsz=64, output=user)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]


def _calibrated(cfg: str) -> torch.nn.Module:
    """A 3-class model from `cfg`: fixed seed, BN calibrated on [0, 1] images of the test size, fused, eval."""
    from models.model import DetectionModel
    from tests.conftest import calibrate_bn

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DetectionModel(cfg, nc=3)
    model.names = ["a", "b", "c"]
    calibrate_bn(model, (6, 3, *IMGSZ), steps=1, normalise=False)
    return model.fuse()


def _program_matches_model(model: torch.nn.Module, seeds: tuple[int, ...] = (1, 2)) -> torch.export.ExportedProgram:
    """The torch.export program that coremltools converts gives the model's first output on calibrated inputs."""
    from tests.conftest import random_images, rounding_tol
    from utils.export.formats import ExportModel

    program = coreml.export_program(ExportModel(model), torch.zeros(1, 3, *IMGSZ))
    assert not [n for n in program.graph.nodes if n.target is torch.ops.aten.__and__.Tensor]  # coremltools 9.0 stops at it
    for seed in seeds:
        x = random_images((1, 3, *IMGSZ), seed=seed, normalise=False)
        with torch.no_grad():
            got, ref = program.module()(x), model(x)[0]
        # the same ATen ops on the same values (measured: bit-identical); float32 rounding bounds any kernel difference
        assert float((got - ref).abs().max()) <= rounding_tol(model) * float(ref.abs().max())
    return program


@pytest.fixture(scope="module")
def rtdetr(tmp_path_factory: pytest.TempPathFactory, ct: object) -> dict:
    """rtdetr_csp_small exported by export_coreml (float32) at 64x96."""
    model = _calibrated("rtdetr_csp_small.yaml")
    meta = export_metadata(model, IMGSZ, 1, False, False)
    path = coreml.export_coreml(model, tmp_path_factory.mktemp("coreml_rtdetr") / "rtdetr.mlpackage", IMGSZ, meta)
    return {"path": path, "model": model, "spec": ct.utils.load_spec(str(path))}  # type: ignore[attr-defined]


def _const_values(ops: list) -> dict[str, object]:
    """Name -> value of the ML Program's scalar constants (bools, strings, numbers)."""
    values: dict[str, object] = {}
    for op in ops:
        if op.type == "const" and "val" in op.attributes:
            tensor = op.attributes["val"].immediateValue.tensor
            kind = tensor.WhichOneof("value")
            if kind is not None and len(getattr(tensor, kind).values) == 1:
                values[op.outputs[0].name] = getattr(tensor, kind).values[0]
    return values


def test_rtdetr_spec_has_its_queries_and_metadata(rtdetr: dict, ct: object) -> None:
    """RT-DETR converts (query selection by topk + gather, deformable attention by resample): output0 is
    (1, queries, 4 + nc) float32, and the metadata names the head."""
    spec, model = rtdetr["spec"], rtdetr["model"]
    with torch.no_grad():
        ref = model(torch.zeros(1, 3, *IMGSZ))[0]
    (out,) = spec.description.output
    assert out.name == "output0" and tuple(out.type.multiArrayType.shape) == tuple(ref.shape) == (1, ref.shape[1], 4 + 3)
    assert out.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32  # type: ignore[attr-defined]
    meta = coreml_metadata(rtdetr["path"])
    assert meta["head"] == "rtdetr" and meta["names"] == ["a", "b", "c"] and meta["imgsz"] == list(IMGSZ)


def test_rtdetr_grid_sample_becomes_resample_with_its_settings(rtdetr: dict) -> None:
    """Each decoder layer samples every level once: resample with grid_sample's settings (bilinear, zero padding,
    coordinates in [-1, 1] with align_corners False); the query selection is one topk."""
    (block,) = rtdetr["spec"].mlProgram.functions["main"].block_specializations.values()
    ops = list(block.operations)
    consts = _const_values(ops)
    head = rtdetr["model"].head
    resample = [op for op in ops if op.type == "resample"]
    assert len(resample) == head.nl * head.ndl and sum(op.type == "topk" for op in ops) == 1
    settings = {"sampling_mode": "bilinear", "padding_mode": "constant", "padding_value": 0.0,
                "coordinates_mode": "normalized_minus_one_to_one", "align_corners": False}  # fmt: skip
    for op in resample:
        assert {k: consts[op.inputs[k].arguments[0].name] for k in settings} == settings


def test_rtdetr_converted_program_gives_the_models_queries(rtdetr: dict) -> None:
    """Including the anchor validity, a logical_and in the model (coremltools 9.0 has no converter for aten.__and__)."""
    program = _program_matches_model(rtdetr["model"], seeds=(1,))
    assert [n for n in program.graph.nodes if n.target is torch.ops.aten.logical_and.default]


def test_end2end_converts_to_final_rows(tmp_path: Path, ct: object) -> None:
    """The end-to-end head (its policy lists coreml): output0 is its (1, k, 6) final rows, the program gives the model's rows."""
    model = _calibrated("yolo26n_mobilenetv4_conv_small_lite.yaml")
    meta = export_metadata(model, IMGSZ, 1, False, False)
    path = coreml.export_coreml(model, tmp_path / "e2e.mlpackage", IMGSZ, meta)
    with torch.no_grad():
        ref = model(torch.zeros(1, 3, *IMGSZ))[0]
    (out,) = ct.utils.load_spec(str(path)).description.output  # type: ignore[attr-defined]
    assert out.name == "output0" and tuple(out.type.multiArrayType.shape) == tuple(ref.shape) and ref.shape[2] == 6
    assert coreml_metadata(path)["head"] == model.head_kind == "end2end"
    _program_matches_model(model, seeds=(1,))


def test_rtdetr_int8_quantises_conv_and_linear_weights_only(tmp_path: Path, ct: Any) -> None:
    """export.py --int8 for RT-DETR to Core ML (the one INT8 format its policy allows): weights only, so exactly the conv
    and linear weights above coremltools' 2048-value threshold are stored as int8 and dequantised at load (most of
    them), and the queries' output stays float32 (ONNX/OpenVINO INT8 is refused: tests/test_rtdetr.py)."""
    from models.model import DetectionModel
    from tests.conftest import calibrate_bn
    from tests.test_coreml_seg import _main_ops
    from utils.checkpoint import save_checkpoint
    from utils.export.exporter import export_model

    model = calibrate_bn(DetectionModel("rtdetr_csp_small.yaml", nc=3), (6, 3, *IMGSZ), steps=1, normalise=False)
    weights = save_checkpoint(tmp_path / "best.pt", model, names=["a", "b", "c"])
    (path,) = export_model(weights=weights, include=["coreml"], imgsz=list(IMGSZ), int8=True)
    assert path.name == "best.mlpackage"  # as the detection int8 export: Core ML names carry no precision
    meta = coreml_metadata(path)
    assert (meta["int8"], meta["head"]) == (True, "rtdetr")
    spec = ct.utils.load_spec(str(path))  # type: ignore[attr-defined]
    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32  # type: ignore[attr-defined]
    assert [f.type.multiArrayType.dataType for f in spec.description.output] == [float32]
    ops = _main_ops(spec)
    int8 = ct.proto.MIL_pb2.DataType.Value("INT8")  # type: ignore[attr-defined]
    quantised = {o.outputs[0].name for o in ops
                 if o.type == "constexpr_affine_dequantize" and o.attributes["quantized_data"].type.tensorType.dataType == int8}
    size = {o.outputs[0].name: int(np.prod([d.constant.size for d in o.outputs[0].type.tensorType.dimensions]))
            for o in ops if o.outputs}  # fmt: skip
    layer_weights = [o.inputs["weight"].arguments[0].name for o in ops if o.type in ("conv", "linear")]
    assert all((name in quantised) == (size[name] > 2048) for name in layer_weights)
    assert sum(name in quantised for name in layer_weights) > len(layer_weights) // 2
