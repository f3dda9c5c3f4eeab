"""Core ML: read an exported .mlpackage's metadata (any OS) and tell whether predictions can run here (macOS only).

export.py (utils/export/coreml.py) stores its metadata dict in the model's user-defined metadata, strings as they are
and everything else as JSON; coreml_metadata decodes it back.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

from utils.runtime.packages import MissingPackageError, import_optional

INSTALL_HINT = "pip install coremltools==9.0"


@contextlib.contextmanager
def _tensorflow_hidden() -> Iterator[None]:
    """Keep coremltools from importing TensorFlow (unused here; TF then a triton import abort the process on LLVM options)."""
    hide = "tensorflow" not in sys.modules
    if hide:
        sys.modules["tensorflow"] = None  # type: ignore[assignment]  # import tensorflow -> ImportError
    try:
        yield
    finally:
        if hide and sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]


def import_coremltools(purpose: str = "Reading a Core ML model", error: type[Exception] = MissingPackageError) -> Any:
    """The coremltools package (imported without TensorFlow), or one `error` line naming the pip command."""
    with _tensorflow_hidden():
        return import_optional("coremltools", purpose, INSTALL_HINT, error)


def coreml_metadata(path: Union[str, Path]) -> dict[str, Any]:
    """The user-defined metadata of a saved .mlpackage, JSON values decoded (readable on any OS)."""
    ct = import_coremltools()
    spec = ct.utils.load_spec(str(path))
    meta: dict[str, Any] = {}
    for k, v in spec.description.metadata.userDefined.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:
            meta[k] = v
    return meta


def coreml_can_predict() -> tuple[bool, str]:
    """Whether this machine can run Core ML predictions, and why not (the runtime exists on macOS only)."""
    if sys.platform != "darwin":
        return False, f"Core ML predictions need macOS (the Core ML runtime); this is {sys.platform}"
    return True, ""
