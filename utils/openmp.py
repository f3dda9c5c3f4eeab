"""Imported first by the command-line scripts, before torch loads: on a busy CPU, OpenMP's idle threads sleep.

torch runs CPU kernels on OpenMP threads that spin while they wait for each other. When other processes keep every core
busy, a spinning thread burns the time slice that the thread it waits for needs: one training epoch of yolov5n took
13x its quiet time under 4 CPU-bound processes on 2 cores, and 4.4x with waiting threads asleep
(OMP_WAIT_POLICY=PASSIVE), which on a quiet machine costs ~20% instead (docs/training.md#a-busy-machine). So the
policy is PASSIVE only when, at start, other runnable tasks already fill every core. OpenMP reads it once, when torch
loads, hence this module's import-time effect, made only in a process that has not loaded torch yet (a script's start);
a value the user set (OMP_WAIT_POLICY, GOMP_SPINCOUNT) wins.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Collection
from pathlib import Path

POLICY = "OMP_WAIT_POLICY"
SAMPLES, INTERVAL = 5, 0.01  # reads of the instantaneous run queue, seconds apart: 40 ms at start


def runnable_others() -> int | None:
    """Tasks runnable right now besides this one (median of a few reads of /proc/loadavg); None where it is unreadable.

    The instantaneous count, not the load average: a minute's average still counts the command that just finished."""
    counts = []
    for i in range(SAMPLES):
        try:
            running = Path("/proc/loadavg").read_text(encoding="ascii").split()[3].split("/")[0]
            counts.append(int(running) - 1)
        except (OSError, IndexError, ValueError):  # not Linux, or an unexpected format
            return None
        if i + 1 < SAMPLES:
            time.sleep(INTERVAL)
    return int(statistics.median(counts))


def busy_cpu() -> bool:
    """Whether other runnable tasks already fill every core."""
    others = runnable_others()
    return others is not None and others >= (os.cpu_count() or 1)


def choose_wait_policy(environ: dict[str, str] | os._Environ[str]) -> str | None:
    """PASSIVE into `environ` on a busy CPU unless the user chose OpenMP's waiting; returns what was set."""
    if POLICY in environ or "GOMP_SPINCOUNT" in environ or not busy_cpu():
        return None
    environ[POLICY] = "PASSIVE"
    return "PASSIVE"


def at_start(environ: dict[str, str] | os._Environ[str], loaded: Collection[str]) -> str | None:
    """choose_wait_policy, only in a process that has not loaded torch (`loaded`: its module names): in a running program
    torch's OpenMP has its policy already, and the environment its children inherit is not ours to change."""
    return None if "torch" in loaded else choose_wait_policy(environ)


at_start(os.environ, sys.modules)
