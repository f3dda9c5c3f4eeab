"""torch.hub entry points: torch.hub.load('path/to/this/repo', 'custom', path='best.pt', source='local').

`custom` loads any trained or exported model; every config in models/ is an entry of its own (yolov5s,
yolov5_mobilenetv4, yolov8s_mobileone_s0, ...). `python hubconf.py --model NAME` prints a model's summary.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any
from typing import Callable as _Callable

if _TYPE_CHECKING:
    from torch import nn

dependencies = ["torch", "torchvision", "numpy", "cv2", "PIL", "yaml", "pandas"]  # checked by torch.hub before loading
_ROOT = _Path(__file__).resolve().parent


def _api() -> _Any:
    """This repository's hub module, refusing a foreign 'utils' or 'models' package already imported under the same name."""
    for package in ("utils", "models"):
        loaded = _sys.modules.get(package)
        where = getattr(loaded, "__file__", None) or next(iter(getattr(loaded, "__path__", [])), None)
        if loaded is not None and where is not None and _ROOT not in _Path(where).resolve().parents:
            raise ImportError(f"another package named '{package}' is already imported (from {where}); load this "
                              f"repository's models in a fresh process, or run from {_ROOT}")
    from utils.inference import hub

    return hub


def custom(path: str, autoshape: bool = True, _verbose: bool = True, device: str | int | None = None) -> nn.Module:
    """A trained or exported model: .pt checkpoint, .torchscript, .onnx, or OpenVINO folder/.xml (YOLOv5's 'custom')."""
    return _api().load_custom(path, autoshape=autoshape, device=device, verbose=_verbose)


def _config_entry(name: str) -> _Callable[..., nn.Module]:
    """torch.hub entry for models/<name>.yaml; the builder is imported only when the entry is called."""

    def entry(pretrained: bool = True, channels: int = 3, classes: int | None = None, autoshape: bool = True,
              _verbose: bool = True, device: str | int | None = None, path: str | None = None) -> nn.Module:
        return _api().load_config(name, pretrained, channels, classes, autoshape, device, path, _verbose)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"models/{name}.yaml as a detector: path='best.pt' loads weights trained from it, pretrained=False "
                     "builds it untrained (no pretrained detector weights are bundled).")
    return entry


for _cfg in sorted((_ROOT / "models").glob("*.yaml")):
    globals()[_cfg.stem] = _config_entry(_cfg.stem)


def _entries() -> list[str]:
    """The entry names torch.hub.list would give: this module's public callables."""
    module = _sys.modules[__name__]
    return sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))


def _main(argv: list[str] | None = None) -> None:
    """python hubconf.py --model NAME [--path best.pt] [--imgsz 640]: build through the hub entry and print a summary."""
    import argparse

    parser = argparse.ArgumentParser(description="Build a torch.hub entry and print its summary")
    parser.add_argument("--model", default="yolov5_mobilenetv4", help="an entry name (see torch.hub.list) or 'custom'")
    parser.add_argument("--path", default=None, help="weights: required for 'custom', optional for a config entry")
    parser.add_argument("--imgsz", type=int, default=640, help="image size for the GFLOPs figure")
    parser.add_argument("--list", action="store_true", help="print the entry names (torch.hub.list reads GitHub repos only)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(_entries()))
        return
    hub = _api()
    from utils.cli import error_boundary

    with error_boundary("hubconf"):
        if args.model == "custom":
            if args.path is None:
                raise ValueError("--model custom needs --path (a .pt, .torchscript, .onnx or OpenVINO model)")
            model = hub.load_custom(args.path, autoshape=False, device="cpu", verbose=False)
        else:
            model = hub.load_config(args.model, pretrained=args.path is not None, autoshape=False, device="cpu",
                                    path=args.path, verbose=False)
        print(hub.describe_model(model, args.imgsz))


if __name__ == "__main__":
    _main()
