"""No code outside a task module (utils/tasks/) or the model package (models/: heads and the builder) branches on a task
name or a head kind: those decisions belong to the task (utils.tasks.Task) or the head (HeadPolicy, its class attributes).

Read from the source with ast: a comparison (==, !=, in, not in) or a match case against a string literal that names a
registered task or head kind is a branch on it. Registrations (decorator arguments) and messages are not comparisons.
"""

from __future__ import annotations

import ast
from pathlib import Path

import models  # noqa: F401  (registers the built-in heads)
from models.heads.base import known_heads
from utils.tasks import known_tasks

ROOT = Path(__file__).resolve().parents[1]
OWNERS = ("models", "utils/tasks")  # where task- and head-specific code lives
SCRIPT_DIRS = ("segment", "classify")


def _sources() -> list[Path]:
    """Every module outside the owners: utils/, the top-level scripts and the task script folders."""
    files = sorted((ROOT / "utils").rglob("*.py")) + sorted(ROOT.glob("*.py"))
    files += [p for d in SCRIPT_DIRS for p in sorted((ROOT / d).glob("*.py"))]
    return [p for p in files if not any(p.is_relative_to(ROOT / o) for o in OWNERS)]


def _literals(node: ast.AST) -> list[str]:
    """String constants in an expression that a comparison tests against (directly or inside a tuple, list or set)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _literals(e)]
    return []


def branches_on(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every comparison or match case against one of `names`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                found += [(node.lineno, s) for s in _literals(side) if s in names]
        elif isinstance(node, ast.match_case) and isinstance(node.pattern, ast.MatchValue):
            found += [(node.pattern.lineno, s) for s in _literals(node.pattern.value) if s in names]
    return found


def test_the_checker_finds_branches() -> None:
    tree = ast.parse("if kind == 'segment': pass\nif t in ('detect', 'x'): pass\nif a != b: pass\nprint('segment')\n")
    assert branches_on(tree, {"segment", "detect"}) == [(1, "segment"), (2, "detect")]


def test_no_branch_on_a_task_name_or_head_kind_outside_tasks_and_heads() -> None:
    names = set(known_tasks()) | set(known_heads())
    offenders = [f"{p.relative_to(ROOT)}:{line}: {name!r}" for p in _sources()
                 for line, name in branches_on(ast.parse(p.read_text(encoding="utf-8")), names)]
    assert not offenders, "move these decisions into the task or the head's policy:\n" + "\n".join(offenders)
