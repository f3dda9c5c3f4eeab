"""Where and how the project writes files: atomic replacement, temp clean-up, containment and safe path components."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Union

import yaml

PathLike = Union[str, Path]
# mkstemp/mkdtemp names used by atomic_write: .<target name>.<random>.tmp
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{6,}\.tmp$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


class UnsafePathError(ValueError):
    """A path built from input that would land outside the folder it belongs in; one-line message."""


def safe_component(name: object, fallback: str = "_") -> str:
    """Turn any text (a class name, an image stem) into one harmless path component: no separators, no '..', no controls."""
    text = unicodedata.normalize("NFKC", str(name))
    text = "".join("_" if (c in '/\\:*?"<>|' or unicodedata.category(c)[0] == "C") else c for c in text)
    text = text.strip(" .")  # '..', '.', ' ' and hidden-file dots
    if not text:
        return fallback
    if text.split(".")[0].lower() in _WINDOWS_RESERVED:
        text = f"_{text}"
    return text[:200]


def resolve_path(path: PathLike, error: type[ValueError], where: str, what: str = "path") -> Path:
    """Path(path).resolve(), with a symbolic-link loop (RuntimeError before Python 3.13, OSError after) raised as
    `error`: one line '<where>: <what> <path>: symbolic link loop ...' instead of a traceback."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:
        reason = "symbolic link loop" if isinstance(e, RuntimeError) or e.errno == errno.ELOOP else (e.strerror or str(e))
        raise error(f"{where}: {what} {path}: {reason}, cannot resolve it") from None


def ensure_inside(path: PathLike, root: PathLike, what: str = "path") -> Path:
    """Resolve `path` (symlinks included) and raise UnsafePathError unless it lies inside `root` (or cannot resolve)."""
    resolved, base = resolve_path(path, UnsafePathError, what), resolve_path(root, UnsafePathError, what, "root")
    if resolved != base and not resolved.is_relative_to(base):
        raise UnsafePathError(f"{what} {path} resolves to {resolved}, outside {base}; refusing to write there")
    return resolved


def _umask() -> int:
    """The process umask, read from /proc on Linux (os.umask can only read it by setting it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on success fsync and rename it over `path`, on any error delete it. The file gets
    the permissions an ordinary new file would (0666 less the umask), or those of the file it replaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp's 0600 would hide weights and logs from the user's group (POSIX only)
            os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Replace a text file in one step, so readers see the old or the new content, never half of it."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def claim_new_files(base: PathLike, suffixes: Sequence[str], sep: str = "-") -> list[Path]:
    """Create empty files `base` + each suffix (appended, so exp.v1 gives exp.v1.md: a dot in the name stays), all new:
    where any of them exists, the first free numbered set instead (exp.v1-2.md, ...; the run-folder rule of
    utils.paths.increment_path). Each is created exclusively, so an existing file is never opened, let alone replaced."""
    base = Path(base)
    for n in itertools.count(1):
        stem = base.name if n == 1 else f"{base.name}{sep}{n}"
        paths = [base.with_name(stem + s) for s in suffixes]
        created: list[Path] = []
        try:
            for p in paths:
                p.open("x").close()  # FileExistsError if taken (or taken meanwhile)
                created.append(p)
        except FileExistsError:
            for p in created:
                p.unlink(missing_ok=True)
            continue
        return paths
    raise AssertionError("unreachable")


def remove_stale_temps(folder: PathLike, target_glob: str = "*") -> list[Path]:
    """Delete what interrupted atomic writes left in `folder` (.<target>.<random>.tmp files or folders); returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(f".{target_glob}.*.tmp"):
        if not _TEMP_RE.match(p.name) or p.is_symlink():
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception message (at most `limit` characters), or its type name: one-line error text."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def describe_os_error(e: OSError) -> str:
    """'<path>: <reason>' for an OSError, so the user learns which file failed and why."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.filename is not None:
        return f"{e.filename}: {reason}" + (f" (-> {e.filename2})" if e.filename2 is not None else "")
    return str(e) or reason


def read_yaml_mapping(path: Path, error: type[ValueError], expected: str) -> dict:
    """A yaml file that must hold a mapping; unreadable yaml or another type raise `error` with one line naming the file."""
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))  # -sig: a leading BOM is not text
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise error(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of {expected}, got {type(data).__name__}")
    return data
