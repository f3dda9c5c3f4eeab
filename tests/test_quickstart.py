"""The README's first command (made small) and its quick start run in order in a temporary copy of the repository.

Each line must exit 0. Small: `--epochs N` becomes 1 and `--img N` 64, so the whole walk takes minutes on 2 CPU cores;
everything runs from a copy (its own datasets/ and runs/), so nothing is written into this checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_docs_commands import ROOT, code_blocks, command_target, shell_lines, split_commands

SMALL = {"--epochs": "1", "--img": "64", "--imgsz": "64", "--img-size": "64"}
COPY_IGNORE = shutil.ignore_patterns(".git", "runs", "datasets", "__pycache__", ".*_cache", ".hypothesis")


def small(words: list[str]) -> list[str]:
    """The command with --epochs set to 1 and the image size to 64 wherever the line gives them."""
    out = list(words)
    for i, word in enumerate(out[:-1]):
        if word in SMALL:
            out[i + 1] = SMALL[word]
    return out


def readme_commands() -> tuple[list[list[str]], list[list[str]]]:
    """(the first code block's first line split at &&, the Quick start block's commands), pip commands left out."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    _, first, body = next(code_blocks(text))
    setup = [c for c in split_commands(next(shell_lines(body, first))[1]) if command_target(c).kind == "script"]
    section = text.split("\n## Quick start", 1)[1]
    lang, first, body = next(code_blocks(section))
    assert lang == "bash", "the Quick start section's first code block is not a bash block"
    quick = [c for _, line in shell_lines(body, first) for c in split_commands(line)]
    return setup, quick


def test_readme_commands_are_found() -> None:
    """The first command trains the demo run that the quick start reads, and no quick-start line needs the internet."""
    setup, quick = readme_commands()
    assert setup[0][1] == "train.py" and "demo" in setup[0] and len(quick) >= 5
    assert all("runs/train/exp" not in " ".join(c) and "coco" not in " ".join(c) for c in quick)
    assert all(command_target(c).kind == "script" for c in quick), "every quick-start line is one of this repository's scripts"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_readme_quick_start_runs_in_order(tmp_path: Path) -> None:
    """Train as the first command does (1 epoch at 64 px), detect, then every quick-start line in order: each exits 0."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=COPY_IGNORE)
    setup, quick = readme_commands()
    for words in [*setup, *quick]:
        cmd = [sys.executable, *small(words)[1:]]
        run = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=1800)
        assert run.returncode == 0, f"{' '.join(words)} exited {run.returncode}:\n{(run.stdout + run.stderr)[-3000:]}"
    weights = repo / "runs" / "train" / "demo" / "weights"
    assert (weights / "best.pt").is_file() and (weights / "best.onnx").is_file() and (weights / "best.torchscript").is_file()
