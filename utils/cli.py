"""Command-line values checked in one place, and the error boundary every script's entry point shares.

Scripts call these checks from `run()` as well as from the command line, so `train.run(epochs=0)` and
`python train.py --epochs 0` fail the same way: one line naming the flag.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shlex
from collections.abc import Iterator, Sequence
from typing import Any, Union

from models.limits import MAX_IMGSZ_ENV, max_img_size
from utils.files import describe_os_error, first_line

LOGGER = logging.getLogger("mobile_yolo")
ImgSize = Union[int, Sequence[int]]


def shell_command(*words: object) -> str:
    """A command (or flags) printed for the user to paste: every word quoted for a POSIX shell where it needs it, so a
    path with a space, a quote or a newline pastes as that one path."""
    return shlex.join(str(w) for w in words)


class OptionError(ValueError):
    """A command-line value that cannot work; the message names the flag."""


def check_int(flag: str, value: Any, minimum: int = 1, allow: Sequence[int] = ()) -> int:
    """An integer >= minimum (or one of `allow`, e.g. -1 for autobatch); OptionError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or (value < minimum and value not in allow):
        extra = f" (or {', '.join(map(str, allow))})" if allow else ""
        raise OptionError(f"{flag} must be an integer >= {minimum}{extra}, got {value!r}")
    return value


def check_fraction(flag: str, value: Any) -> float:
    """A number in [0, 1] (confidence and IoU thresholds)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise OptionError(f"{flag} must be a number between 0 and 1, got {value!r}")
    return float(value)


def check_img_size(imgsz: ImgSize, stride: int = 1, flag: str = "--imgsz") -> Any:
    """Positive size(s) rounded up to a multiple of `stride`, with a warning when rounding changed them (YOLOv5's rule)."""
    sizes = [imgsz] if isinstance(imgsz, int) and not isinstance(imgsz, bool) else list(imgsz) if isinstance(imgsz, (list, tuple)) else None
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise OptionError(f"{flag} must be one or more positive integers (pixels), got {imgsz!r}")
    limit = max_img_size()
    if max(sizes) > limit:
        raise OptionError(f"{flag} {max(sizes)} exceeds the limit of {limit} pixels (raise it with {MAX_IMGSZ_ENV}={max(sizes)})")
    new = [int(math.ceil(s / stride) * stride) for s in sizes]
    if new != sizes:
        shown = new[0] if isinstance(imgsz, int) else new
        LOGGER.warning(f"WARNING: {flag} {imgsz} must be a multiple of the max stride {stride}, using {shown}")
    return new[0] if isinstance(imgsz, int) else (tuple(new) if isinstance(imgsz, tuple) else new)


@contextlib.contextmanager
def error_boundary(prog: str, extra: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Turn the expected failures of a script (bad values, bad files, full disks) into one 'prog: error: ...' line."""
    expected: tuple[type[Exception], ...] = (ValueError, ImportError, *extra)  # project errors derive from ValueError
    try:
        yield
    except OSError as e:  # before ValueError: FileNotFoundError etc. carry the path
        raise SystemExit(f"{prog}: error: {describe_os_error(e)}") from None
    except expected as e:
        raise SystemExit(f"{prog}: error: {first_line(e, limit=1000)}") from None
