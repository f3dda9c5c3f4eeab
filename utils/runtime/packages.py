"""Optional runtime packages (openvino, ncnn, ai-edge-litert, coremltools): import one, or fail in one line with its pip command."""

from __future__ import annotations

import importlib
from typing import Any


class MissingPackageError(ValueError):
    """An optional package a runtime needs is not installed; the message is one line naming the pip command."""


def import_optional(module: str, purpose: str, pip: str, error: type[Exception] = MissingPackageError) -> Any:
    """The module `module`, or one `error` line: "<purpose> needs the <module> package: <pip>"."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise error(f"{purpose} needs the {module} package: {pip}") from None
