"""The documentation's commands and links hold: README.md and docs/*.md against the scripts and files they name.

Every `python X.py ...` / `python -m pkg.mod ...` line of a ```bash/```shell block names a script of this repository, and
every flag on it is one that script's argparse parser declares. Parsers are captured, not run: the script executes as
__main__ with ArgumentParser.parse_known_args patched to hand back the parser, so nothing heavy starts. Every relative
link resolves to a file of the repository and every #anchor to a heading of its target (GitHub's anchor rules).
"""

from __future__ import annotations

import argparse
import functools
import re
import runpy
import shlex
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "shell", "sh"}
SEPARATORS = {"&&", "||", ";", "|", "&", "|&", ";;"}
WRAPPERS = {"nice": 2, "timeout": 1, "time": 0, "env": 0}  # wrapper -> number of its own arguments to skip after it
EXTERNAL_MODULES = {"pip", "pytest", "ruff", "mypy"}  # `python -m` tools that are not this repository's scripts
README_MAX_CHARS = 12_000


class Command(NamedTuple):
    """One simple command of a documented shell line: where it is written and its words."""

    doc: Path
    line: int
    words: list[str]


def code_blocks(text: str) -> Iterator[tuple[str, int, list[str]]]:
    """(language, 1-based line of the first body line, body lines) of each fenced code block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i + 1
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        yield lang, start + 1, lines[start:i]
        i += 1


def shell_lines(body: list[str], first: int) -> Iterator[tuple[int, str]]:
    """(line number, logical line) with backslash continuations joined onto the line they start on."""
    pending, start = "", first
    for n, raw in enumerate(body, first):
        if not pending:
            start = n
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        yield start, pending + raw
        pending = ""
    if pending:
        yield start, pending


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line: comments dropped, split at &&, ||, ;, | and &."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#"
    commands: list[list[str]] = [[]]
    for word in lex:
        if word in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def documented_commands(doc: Path) -> list[Command]:
    """Every simple command in the shell code blocks of one Markdown file."""
    out: list[Command] = []
    for lang, first, body in code_blocks(doc.read_text(encoding="utf-8")):
        if lang in SHELL_LANGS:
            for n, line in shell_lines(body, first):
                out.extend(Command(doc, n, words) for words in split_commands(line))
    return out


def strip_prefix(words: list[str]) -> list[str]:
    """The command without leading VAR=value assignments and wrappers such as `nice -n 19` or `timeout 60`."""
    while words:
        if re.match(r"^[A-Za-z_]\w*=", words[0]):
            words = words[1:]
        elif words[0] in WRAPPERS:
            words = words[1 + WRAPPERS[words[0]]:]
        else:
            return words
    return words


class Target(NamedTuple):
    """What a command runs: ('script', repo path, its arguments), ('pytest', '', args), or ('other', '', [])."""

    kind: str
    path: str
    args: list[str]


def module_file(module: str) -> Path | None:
    """The repository file `python -m module` runs, or None when it is not part of the repository."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def python_target(args: list[str]) -> Target:
    """What `python ARGS` runs: a repository script or module, an external `-m` tool, or an unknown name."""
    while args and args[0].startswith("-") and args[0] not in ("-m", "-c"):
        args = args[1:]  # interpreter options (-u, -B, -O ...)
    if not args or args[0] == "-c":
        return Target("other", "", [])
    if args[0] == "-m":
        module, rest = (args[1], args[2:]) if len(args) > 1 else ("", [])
        if module.split(".")[0] in EXTERNAL_MODULES:
            return Target("pytest" if module == "pytest" else "other", "", rest)
        file = module_file(module)
        return Target("script", str(file.relative_to(ROOT)) if file else f"-m {module}", rest)
    return Target("script", args[0], args[1:])


def command_target(words: list[str]) -> Target:
    """Classify a documented command; only Python (and torchrun/bash scripts) of this repository are checked."""
    words = strip_prefix(words)
    if not words:
        return Target("other", "", [])
    tool = Path(words[0]).name
    if re.fullmatch(r"python(3(\.\d+)?)?", tool):
        return python_target(words[1:])
    if tool == "torchrun":  # torchrun's own options come first, then the script and its arguments
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        return Target("script", words[scripts[0]], words[scripts[0] + 1:]) if scripts else Target("other", "", [])
    if tool in ("bash", "sh") and len(words) > 1 and words[1].endswith(".sh"):
        return Target("file", words[1], [])
    return Target("other", "", [])  # pip, cd, git, shell builtins and other tools (tensorboard, yolo, adb ...)


class _Captured(BaseException):
    """Raised by the patched parse_known_args to carry the parser out of the script (BaseException: no handler eats it)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


@functools.cache
def script_options(script: str) -> frozenset[str]:
    """The option strings of the argparse parser a repository script (path or `-m module`) builds when run as __main__."""
    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Captured(self)

    saved_path, saved_argv = list(sys.path), list(sys.argv)
    patch = pytest.MonkeyPatch()
    patch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # runpy: "found in sys.modules ... prior to execution"
            if script.startswith("-m "):
                sys.argv = [script[3:], "--help"]
                runpy.run_module(script[3:], run_name="__main__", alter_sys=True)
            else:
                sys.argv = [str(ROOT / script), "--help"]
                runpy.run_path(str(ROOT / script), run_name="__main__")
    except _Captured as found:
        return frozenset(s for action in found.parser._actions for s in action.option_strings)
    finally:
        patch.undo()
        sys.path[:], sys.argv[:] = saved_path, saved_argv
    raise AssertionError(f"{script}: ran as __main__ without parsing a command line (no argparse parser to check flags against)")


def flag_name(word: str) -> str | None:
    """'--img' for '--img' or '--img=320'; None for values (including negative numbers)."""
    m = re.match(r"^(--?[A-Za-z][\w-]*)(=.*)?$", word)
    return m.group(1) if m else None


def problems(cmd: Command) -> list[str]:
    """What is wrong with one documented command: a missing script or file, or flags its parser does not declare."""
    target = command_target(cmd.words)
    if target.kind == "pytest":
        paths = [w.split("::")[0] for w in target.args if not w.startswith("-") and w.startswith("tests/")]
        return [f"pytest path {p} does not exist" for p in paths if not (ROOT / p).exists()]
    if target.kind == "file":
        return [] if (ROOT / target.path).is_file() else [f"{target.path} does not exist"]
    if target.kind != "script":
        return []
    if target.path.startswith("-m ") or not target.path.endswith(".py") or not (ROOT / target.path).is_file():
        return [f"{target.path}: no such script or module in this repository"]
    options = script_options(target.path)
    flags = [f for f in map(flag_name, target.args) if f]
    return [f"{target.path} has no option {f}" for f in flags if f not in options]


ALL_COMMANDS = [c for doc in DOCS for c in documented_commands(doc)]


def command_id(cmd: Command) -> str:
    """'README.md:30:detect.py': the doc line and what it runs, so a failure names both."""
    return f"{cmd.doc.relative_to(ROOT)}:{cmd.line}:{command_target(cmd.words).path or cmd.words[0]}"


@pytest.mark.parametrize("cmd", ALL_COMMANDS, ids=[command_id(c) for c in ALL_COMMANDS])
def test_documented_command_matches_its_script(cmd: Command) -> None:
    """A documented command runs a script that exists with flags that script accepts (named by doc file and line)."""
    found = problems(cmd)
    assert not found, f"{cmd.doc.relative_to(ROOT)}:{cmd.line}: {' '.join(cmd.words)}\n  " + "\n  ".join(found)


def test_docs_hold_commands_to_check() -> None:
    """The extraction finds the README's main scripts, so an empty parametrisation cannot pass silently."""
    scripts = {command_target(c.words).path for c in ALL_COMMANDS}
    assert {"train.py", "val.py", "detect.py", "export.py"} <= scripts


def test_checker_catches_wrong_flags_and_unknown_scripts() -> None:
    """The checker itself: a misspelt flag, a missing script or module and a missing test file are each reported."""
    doc = ROOT / "README.md"

    def check(line: str) -> list[str]:
        return [p for words in split_commands(line) for p in problems(Command(doc, 1, words))]

    assert check("python train.py --img 64 --epochs 1 --name x --exist-ok") == []
    assert check("nice -n 19 python detect.py --weights a.pt --img=64   # --not-a-flag in a comment") == []
    assert check("python train.py --imgs 64") == ["train.py has no option --imgs"]
    assert check("cd x && python val.py --data d.yaml | python nosuch.py") == ["nosuch.py: no such script or module in this repository"]
    assert check("python -m models.nosuch --cfg x") == ["-m models.nosuch: no such script or module in this repository"]
    assert check("python -m models.info --cfg x --verbos") == ["models/info.py has no option --verbos"]
    assert check("python -m pytest -m slow tests/test_nosuch.py -k x") == ["pytest path tests/test_nosuch.py does not exist"]
    assert check("torchrun --nproc_per_node 2 train.py --batch 64") == ["train.py has no option --batch"]
    assert check("pip install -r requirements.txt; tensorboard --logdir runs; git status") == []


# ---- links -------------------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans removed."""
    fence = ""
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(`{3,}|~{3,})", line)
        if m and (not fence or m.group(1).startswith(fence)):
            fence = "" if fence else m.group(1)
            continue
        if not fence:
            yield n, re.sub(r"(`+)(?:(?!\1).)+?\1", "", line)


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*{1,3}|_{1,3})(\S(?:.*?\S)?)\1", r"\2", text)  # emphasis markers
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(doc: Path) -> frozenset[str]:
    """Every anchor GitHub gives a Markdown file: one per heading (duplicates get -1, -2, ...) plus explicit ids."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    text = doc.read_text(encoding="utf-8")
    for _, line in prose_lines(text):
        m = re.match(r"^\s{0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$", line)
        if m:
            base = github_anchor(m.group(1))
            out.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    out.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return frozenset(out)


def link_problems(doc: Path, root: Path = ROOT) -> list[str]:
    """Relative links of one Markdown file under root whose target file or #anchor does not exist."""
    found = []
    for n, line in prose_lines(doc.read_text(encoding="utf-8")):
        for target in LINK.findall(line) + REFERENCE.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # http:, https:, mailto: ...
            path_part, _, anchor = target.partition("#")
            dest = (doc.parent / path_part).resolve() if path_part else doc
            where = f"{doc.relative_to(root)}:{n}: {target}"
            if not dest.exists() or root not in (dest, *dest.parents):
                found.append(f"{where}: no such file in the repository")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                found.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_relative_links_resolve(doc: Path) -> None:
    """Every relative link target exists and every #anchor names a heading of the target file."""
    found = link_problems(doc)
    assert not found, "\n".join(found)


def test_anchor_rules_follow_github() -> None:
    """GitHub's rules on the headings this project writes: code, punctuation, parentheses and duplicates."""
    assert github_anchor("Python API and torch.hub") == "python-api-and-torchhub"
    assert github_anchor("Measured training on this 2-core CPU (no GPU)") == "measured-training-on-this-2-core-cpu-no-gpu"
    assert github_anchor("`export.py --int8`: INT8 that pays off") == "exportpy---int8-int8-that-pays-off"
    assert github_anchor("[Heads](heads.md) and *tasks*") == "heads-and-tasks"


def test_link_checker_catches_missing_files_and_anchors(tmp_path: Path) -> None:
    """The link checker reports a missing target and a missing anchor, and accepts a duplicate heading's -1 suffix."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# Title\n\n## Quick start\n", encoding="utf-8")
    doc = tmp_path / "docs" / "page.md"
    doc.write_text("# A\n## A\n[ok](#a-1) [bad](#b) [gone](nosuch.md) [up](../README.md#quick-start) `[x](nope.md)`\n"
                   "```bash\n[y](nope.md)\n```\n[out](../../outside.md)\n", encoding="utf-8")
    (tmp_path.parent / "outside.md").touch()
    found = link_problems(doc, root=tmp_path)
    assert len(found) == 3, found
    assert "#b" in found[0] and "nosuch.md" in found[1] and "outside.md" in found[2]


def test_readme_fits_a_few_screens() -> None:
    """README.md is a front door (everything else lives in docs/), and its first code block is the two set-up commands."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) <= README_MAX_CHARS, f"README.md has {len(text):,} characters; move detail to docs/ (limit {README_MAX_CHARS:,})"
    lang, _, body = next(code_blocks(text))
    assert lang == "bash" and body[0].startswith("pip install -r requirements.txt && python train.py")
    assert body[1] == "pip install -r requirements.txt -r requirements-dev.txt && python -m pytest"
