"""utils/signal_stack.py: a native call that swaps the thread's alternate signal stack leaves one that stays valid."""

from __future__ import annotations

import ctypes
import sys
import threading

import pytest

from utils.signal_stack import SS_DISABLE, _sigaltstack, _StackT, current_signal_stack, keep_signal_stack

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="alternate signal stacks are handled on Linux")


def _in_thread(before: _StackT | None) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """In a fresh thread (its own signal stack state): optionally install `before`, then run a block that installs a
    'foreign' stack the way OpenVINO's CPU plugin does; returns (the foreign stack, the stack after the block)."""
    result = {}

    def body() -> None:
        if before is not None:
            _sigaltstack(before)
        foreign = ctypes.create_string_buffer(40_000)
        with keep_signal_stack():
            _sigaltstack(_StackT(ctypes.addressof(foreign), 0, 40_000))
            result["foreign"] = current_signal_stack()
        result["after"] = current_signal_stack()

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return result["foreign"], result["after"]


def test_a_thread_without_a_signal_stack_gets_none_back() -> None:
    foreign, after = _in_thread(None)
    assert foreign[2] == 40_000 and after[1] & SS_DISABLE


def test_a_thread_with_a_signal_stack_gets_one_of_its_own_at_least_as_large() -> None:
    mine = ctypes.create_string_buffer(16_384)
    foreign, after = _in_thread(_StackT(ctypes.addressof(mine), 0, 16_384))
    assert after[0] not in (foreign[0], ctypes.addressof(mine)) and not after[1] & SS_DISABLE and after[2] >= 40_000


def test_an_untouched_stack_is_left_alone() -> None:
    before = current_signal_stack()
    with keep_signal_stack():
        pass
    assert current_signal_stack() == before
