"""Keep a thread's alternate signal stack across a native call that replaces it (OpenVINO's CPU plugin does).

OpenVINO's CPU plugin (seen with 2026.4) installs its own alternate signal stack on the thread that compiles a model
(sized for AMX state) and, when the plugin is released, puts back the one it found and unmaps its own, on whatever
thread releases it. Released on another thread (the garbage collector runs wherever Python allocates), the compiling
thread is left with an alternate stack that no longer exists. Python installs its signal handlers with SA_ONSTACK, so
the next signal with a Python handler on that thread (SIGCHLD when a subprocess exits, once a DataLoader with workers
has installed its handler) cannot be delivered: the kernel kills the process with SIGSEGV, or writes the signal frame
over memory that was reused. Reproduction: enable faulthandler, set a Python SIGCHLD handler, compile a model with
openvino.Core().compile_model(..., "CPU"), drop the core and model on a second thread, then run any subprocess.

`keep_signal_stack()` around such a call leaves the thread with a stack that outlives the library's: no alternate
stack if it had none, else one owned here (never freed) at least as large as both.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import threading
from collections.abc import Iterator

LOGGER = logging.getLogger("mobile_yolo")
SS_DISABLE = 2  # Linux
_OWN: list[ctypes.Array] = []  # stacks installed here; never freed, since a signal may be running on one


class _StackT(ctypes.Structure):
    """Linux's stack_t (x86-64 and aarch64 layout)."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _sigaltstack(new: _StackT | None) -> _StackT:
    """Set the calling thread's alternate signal stack (when `new` is given); returns the previous one."""
    old = _StackT()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.sigaltstack(ctypes.byref(new) if new is not None else None, ctypes.byref(old)) != 0:
        raise OSError(ctypes.get_errno(), "sigaltstack failed")
    return old


def current_signal_stack() -> tuple[int, int, int]:
    """(address, flags, size) of the calling thread's alternate signal stack (Linux; (0, SS_DISABLE, 0) elsewhere)."""
    if not sys.platform.startswith("linux"):
        return 0, SS_DISABLE, 0
    s = _sigaltstack(None)
    return s.ss_sp or 0, s.ss_flags, s.ss_size


def _own_stack(size: int) -> _StackT:
    """A new alternate signal stack of `size` bytes that this module keeps alive."""
    buffer = ctypes.create_string_buffer(size)
    _OWN.append(buffer)
    return _StackT(ctypes.addressof(buffer), 0, size)


@contextlib.contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Run a block; if it replaced this thread's alternate signal stack, replace it again with one that stays valid."""
    if not sys.platform.startswith("linux"):
        yield
        return
    before = current_signal_stack()
    try:
        yield
    finally:
        after = current_signal_stack()
        if after != before:
            disabled = bool(before[1] & SS_DISABLE)
            new = _StackT(None, SS_DISABLE, 0) if disabled else _own_stack(max(before[2], after[2]))
            try:
                _sigaltstack(new)
            except OSError as e:  # e.g. a stack too small for the AMX state the library enabled: keep the library's
                LOGGER.debug(f"alternate signal stack of thread {threading.get_ident()} left as set: {e}")
