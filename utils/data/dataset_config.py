"""Dataset YAML files: parsing, path resolution, and making the data exist (generate, download, convert).

Path rule: a relative `path` is resolved against the repository root, so `datasets/shapes` lives inside the repo
(git-ignored) and YOLOv5-style `../datasets/coco128` lands beside it. Without `path`, the YAML file's folder is used.
`train`/`val`/`test` are folders, *.txt image lists or lists of those, relative to `path`.
`download` is an http(s) URL, a {url, to} mapping (`to` relative to `path`) or a list of those; bare URLs are unzipped
into the parent of `path`, the YOLOv5 layout of the official zips. Every write (download target, `to` folder, each
zip member) must resolve inside that allowed root, existing files are never replaced, and a refused or failed
download removes everything it created.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import shutil
import socket
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PureWindowsPath
from typing import Any, Union
from xml.etree import ElementTree

from utils.files import UnsafePathError, ensure_inside, read_yaml_mapping, resolve_path
from utils.paths import ROOT

LOGGER = logging.getLogger("mobile_yolo")
DEFAULT_DATA = ROOT / "data" / "shapes.yaml"
DOWNLOAD_TIMEOUT = 15.0  # seconds; offline machines fail fast
GENERATORS = ("shapes", "shapes-seg", "shapes-cls")  # `generator:` values: the shapes dataset with box or polygon labels, or class folders
ALLOWED_URL_SCHEMES = ("http", "https")  # file://, ftp:// and the like are refused (also as redirect targets)


class DatasetError(ValueError):
    """A dataset YAML or dataset folder problem; one-line message naming the file."""


def _read_yaml(data: Union[str, Path, dict, None]) -> tuple[dict, str, Path | None]:
    """Return (config dict copy, display name, yaml path or None)."""
    if isinstance(data, dict):
        return dict(data), "<dataset dict>", None
    file = Path(data) if data is not None else DEFAULT_DATA
    if not file.is_file() and not file.is_absolute() and (ROOT / "data" / file).is_file():
        file = ROOT / "data" / file
    if not file.is_file():
        raise DatasetError(f"{file}: dataset YAML not found")
    cfg = read_yaml_mapping(file, DatasetError, "keys (path, train, val, names)")
    return cfg, str(file), resolve_path(file, DatasetError, str(file), "dataset YAML")


def _names_list(names: Any, nc: Any, where: str) -> list[str]:
    """Normalise `names` (list or {index: name}) and check it against `nc`."""
    if isinstance(names, dict):
        keys = sorted(names)
        if not all(isinstance(k, int) for k in keys) or keys != list(range(len(keys))):
            raise DatasetError(f"{where}: 'names' dict keys must be the integers 0..{len(keys) - 1}")
        names = [names[k] for k in keys]
    if not isinstance(names, (list, tuple)) or not names:
        raise DatasetError(f"{where}: 'names' must be a non-empty list or {{index: name}} mapping")
    names = [str(n) for n in names]
    if nc is not None and (not isinstance(nc, int) or nc != len(names)):
        raise DatasetError(f"{where}: nc={nc} does not match the {len(names)} entries in 'names'")
    return names


def _resolve_split(value: Any, root: Path, key: str, where: str) -> Union[str, list[str], None]:
    """Resolve one split entry (str or list) against the dataset root."""
    if value is None or value == "":
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, str) and v for v in items):
        raise DatasetError(f"{where}: '{key}' must be a path string or a list of path strings")
    out = [str(p if (p := Path(v).expanduser()).is_absolute() else resolve_path(root / p, DatasetError, where, f"'{key}'"))
           for v in items]
    return out if isinstance(value, (list, tuple)) else out[0]


def _split_paths(cfg: dict) -> list[Path]:
    """All train/val paths of a resolved config."""
    out = []
    for key in ("train", "val"):
        v = cfg[key]
        out += [Path(p) for p in (v if isinstance(v, list) else [v])]
    return out


def load_dataset_config(data: Union[str, Path, dict, None] = None, autodownload: bool = True) -> dict:
    """Load and validate a dataset YAML, generating or downloading the data if it is missing; returns a resolved dict."""
    cfg, where, file = _read_yaml(data)
    for key in ("train", "val", "names"):
        if key not in cfg:
            raise DatasetError(f"{where}: missing required key '{key}'")
    names = _names_list(cfg["names"], cfg.get("nc"), where)
    base = file.parent if file is not None else Path.cwd()
    root = Path(str(cfg["path"])).expanduser() if cfg.get("path") else base
    root = resolve_path(root if root.is_absolute() else ROOT / root, DatasetError, where, "'path'")
    out = {**cfg, "path": str(root), "names": names, "nc": len(names), "yaml_file": str(file) if file else None}
    for key in ("train", "val", "test"):
        out[key] = _resolve_split(cfg.get(key), root, key, where)
    if out["train"] is None or out["val"] is None:
        raise DatasetError(f"{where}: 'train' and 'val' must not be empty")
    missing = [p for p in _split_paths(out) if not p.exists()]
    if missing:
        _make_available(out, where, autodownload)
        missing = [p for p in _split_paths(out) if not p.exists()]
        if missing:
            raise DatasetError(f"{where}: dataset path {missing[0]} still missing after preparing the dataset")
    return out


def _make_available(cfg: dict, where: str, autodownload: bool) -> None:
    """Generate, or download (and convert) a dataset whose split folders are missing."""
    root = Path(cfg["path"])
    if cfg.get("generator"):
        if cfg["generator"] not in GENERATORS:
            raise DatasetError(f"{where}: unknown generator '{cfg['generator']}' (supported: {', '.join(GENERATORS)})")
        from utils.data.shapes_classify import generate_shapes_classify
        from utils.data.shapes_dataset import generate_shapes

        LOGGER.info(f"Dataset not found at {root}, generating it from {where} ...")
        sizes = {k: cfg[k] for k in ("n_train", "n_val", "seed") if k in cfg}
        try:
            if cfg["generator"] == "shapes-cls":
                generate_shapes_classify(root, names=cfg["names"], **sizes)
            else:
                generate_shapes(root, names=cfg["names"], polygons=cfg["generator"] == "shapes-seg", **sizes)
        except (FileExistsError, ValueError) as e:
            raise DatasetError(f"{where}: {e}") from None
        return
    url = cfg.get("download")
    if not url:
        raise DatasetError(f"{where}: dataset not found at {root} and the YAML has no 'download' source")
    if not autodownload:
        raise DatasetError(f"{where}: dataset not found at {root}; re-run with autodownload enabled or download it manually")
    items = url if isinstance(url, list) else [url]
    for item in items:
        if isinstance(item, dict):  # {url, to}: `to` is relative to the dataset root and must stay inside it
            src, to = item.get("url"), item.get("to", "")
            if not isinstance(to, str):
                raise DatasetError(f"{where}: 'download' entry 'to' must be a folder path string, got {to!r}")
            dest, allowed = root / to, root
        else:  # bare URL: the YOLOv5 zips hold the dataset folder itself, so they unzip beside it
            src, dest, allowed = item, root.parent, root.parent
        if not isinstance(src, str):
            raise DatasetError(f"{where}: 'download' entries must be URL strings or {{url, to}} mappings")
        download_and_unzip(src, dest, where, root, allowed_root=allowed)
    if cfg.get("convert") == "voc":
        n = convert_voc(root, cfg["names"])
        LOGGER.info(f"Converted {n} VOC annotations to YOLO labels in {root}")
    elif cfg.get("convert"):
        raise DatasetError(f"{where}: unknown converter '{cfg['convert']}' (supported: voc)")


class _Refused(ValueError):
    """A download refused for safety: URL scheme, destination outside the allowed root, unsafe archive member, overwrite."""


def _url_file_name(url: str) -> str:
    """The plain file name an http(s) URL downloads to; _Refused for other schemes or names that are not a plain name."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ALLOWED_URL_SCHEMES or not parts.netloc:
        raise _Refused("only http:// and https:// URLs are allowed")
    name = posixpath.basename(parts.path)
    if name in ("", ".", "..") or "\\" in name or "\0" in name:
        raise _Refused(f"the URL does not end in a usable file name ({name!r})")
    return name


def _make_dirs(folder: Path, created: list[Path]) -> None:
    """mkdir -p that records the folders it created (so a failed download can remove them again)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        d.mkdir()
        created.append(d)


def _undo(created: list[Path]) -> None:
    """Remove what a failed download created (files, then their now-empty folders), newest first."""
    for p in reversed(created):
        with contextlib.suppress(OSError):  # a folder that meanwhile holds other files stays
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()


def _fresh_temp(folder: Path, name: str) -> Path:
    """A new, empty, uniquely named hidden temp file in folder, created exclusively (never an existing file)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    os.close(fd)
    return Path(tmp)


def _move_new(tmp: Path, target: Path, created: list[Path]) -> None:
    """Move tmp to target only if nothing exists there (a file the download did not create is never replaced)."""
    if os.path.lexists(target):
        raise _Refused(f"{target} already exists, not overwriting it")
    os.replace(tmp, target)
    created.append(target)


def _fetch(url: str, dest: Path, allowed_root: Path, created: list[Path]) -> None:
    """Download url into dest (inside allowed_root) through a fresh temp file; unzip .zip files, else move into place."""
    name = _url_file_name(url)
    dest = ensure_inside(dest, allowed_root, "destination folder")
    target = ensure_inside(dest / name, dest, "download target")
    is_zip = name.lower().endswith(".zip")
    if not is_zip and os.path.lexists(target):
        raise _Refused(f"{target} already exists, not overwriting it")
    _make_dirs(dest, created)
    tmp = _fresh_temp(dest, name)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as r, open(tmp, "wb") as f:
            final = getattr(r, "url", None) or url
            if urllib.parse.urlsplit(final).scheme.lower() not in ALLOWED_URL_SCHEMES:
                raise _Refused(f"redirected to {final}; only http:// and https:// URLs are allowed")
            shutil.copyfileobj(r, f, length=1 << 20)
        if is_zip:
            _safe_unzip(tmp, dest, name, created)
        else:
            _move_new(tmp, target, created)
    finally:
        tmp.unlink(missing_ok=True)


def download_and_unzip(url: str, dest: Path, where: str = "", root: Path | None = None, allowed_root: Path | None = None) -> None:
    """Fetch an http(s) url into dest (inside allowed_root, default dest), unzip .zip files; one-line DatasetError on failure."""
    # The download goes to a fresh temp file inside dest; archives are extracted from it member by member, other files
    # are moved to their URL name only when nothing exists there. On any failure everything this call created is removed.
    created: list[Path] = []
    try:
        _fetch(url, Path(dest), Path(allowed_root if allowed_root is not None else dest), created)
    except (_Refused, UnsafePathError) as e:
        _undo(created)
        raise DatasetError(f"{where or url}: download {url} refused: {e}") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
        _undo(created)
        reason = str(getattr(e, "reason", e)).splitlines()[0] if str(getattr(e, "reason", e)) else type(e).__name__
        raise DatasetError(f"{where or url}: dataset not found at {root or dest} and download from {url} failed ({reason}); "
                           f"download it manually") from None
    except BaseException:
        _undo(created)
        raise


def _zip_plan(z: zipfile.ZipFile, dest: Path, name: str) -> list[tuple[zipfile.ZipInfo, Path]]:
    """Check every member before anything is written -> (member, target) pairs still to extract; _Refused if unsafe."""
    plan = []
    for info in z.infolist():
        m = info.filename
        if stat.S_ISLNK(info.external_attr >> 16):
            raise _Refused(f"unsafe path {m!r} in {name}: symbolic link member")
        if m.startswith(("/", "\\")) or PureWindowsPath(m).drive or ".." in re.split(r"[\\/]", m):
            raise _Refused(f"unsafe path {m!r} in {name}: absolute or parent-relative member")
        try:
            target = ensure_inside(dest / m, dest, "member")
        except UnsafePathError:
            raise _Refused(f"unsafe path {m!r} in {name}: it would be written outside {dest}") from None
        if not info.is_dir() and os.path.lexists(target):
            if target.is_file() and not target.is_symlink() and target.stat().st_size == info.file_size:
                continue  # already extracted by an earlier, interrupted run: keep it
            raise _Refused(f"member {m!r} of {name} would overwrite the existing {target}")
        plan.append((info, target))
    return plan


def _safe_unzip(file: Path, dest: Path, name: str = "", created: list[Path] | None = None) -> None:
    """Extract a zip into dest, refusing escaping/absolute/symlink members and never replacing existing files."""
    created = [] if created is None else created
    dest = dest.resolve()
    with zipfile.ZipFile(file) as z:
        for info, target in _zip_plan(z, dest, name or file.name):
            if info.is_dir():
                _make_dirs(target, created)
                continue
            _make_dirs(target.parent, created)
            tmp = _fresh_temp(target.parent, target.name)
            try:
                with z.open(info) as src, open(tmp, "wb") as f:
                    shutil.copyfileobj(src, f, length=1 << 20)
                _move_new(tmp, target, created)
            finally:
                tmp.unlink(missing_ok=True)


def _xml_float(parent: ElementTree.Element | None, key: str) -> float:
    """A required numeric child of a VOC element; ValueError when it is missing."""
    text = parent.findtext(key) if parent is not None else None
    if text is None:
        raise ValueError(f"missing <{key}>")
    return float(text)


def _voc_xml_to_lines(xml_file: Path, names: list[str]) -> list[str]:
    """YOLO label lines for one VOC annotation (difficult objects skipped, as YOLOv5 does)."""
    tree = ElementTree.parse(xml_file).getroot()
    size = tree.find("size")
    w, h = _xml_float(size, "width"), _xml_float(size, "height")
    lines = []
    for obj in tree.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in names or int(float(obj.findtext("difficult") or 0)) == 1:
            continue
        bb = obj.find("bndbox")
        x1, x2, y1, y2 = (_xml_float(bb, k) for k in ("xmin", "xmax", "ymin", "ymax"))
        cx, cy = ((x1 + x2) / 2 - 1) / w, ((y1 + y2) / 2 - 1) / h  # VOC pixel indices start at 1
        lines.append(f"{names.index(name)} {cx:.6f} {cy:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
    return lines


def convert_voc(root: Union[str, Path], names: list[str]) -> int:
    """Convert VOCdevkit XML annotations under root into YOLO images/<set><year> + labels/<set><year>; returns count."""
    root = Path(root)
    devkits = [d for d in (root / "images" / "VOCdevkit", root / "VOCdevkit") if d.is_dir()]
    if not devkits:
        raise DatasetError(f"{root}: no VOCdevkit folder found to convert")
    count = 0
    for year_dir in sorted(devkits[0].glob("VOC*")):
        year = year_dir.name[3:]
        for list_file in sorted((year_dir / "ImageSets" / "Main").glob("*.txt")):
            if list_file.stem not in ("train", "val", "test"):
                continue
            img_out, lb_out = root / "images" / f"{list_file.stem}{year}", root / "labels" / f"{list_file.stem}{year}"
            img_out.mkdir(parents=True, exist_ok=True)
            lb_out.mkdir(parents=True, exist_ok=True)
            for stem in list_file.read_text(encoding="utf-8-sig").split():
                try:
                    lines = _voc_xml_to_lines(year_dir / "Annotations" / f"{stem}.xml", names)
                except (ElementTree.ParseError, OSError, AttributeError, TypeError, ValueError) as e:
                    LOGGER.warning(f"{year_dir / 'Annotations' / stem}.xml: skipped unreadable VOC annotation ({e})")
                    continue
                (lb_out / f"{stem}.txt").write_text("".join(f"{ln}\n" for ln in lines))
                src = year_dir / "JPEGImages" / f"{stem}.jpg"
                if src.is_file():
                    shutil.copy2(src, img_out / src.name)
                count += 1
    return count
