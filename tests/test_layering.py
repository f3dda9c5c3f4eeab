"""Import layering, read from the source with ast (nothing is imported): no module cycle and no package cycle anywhere in
models/, utils/ and the scripts, models/ imports nothing from utils/, each utils/ stage imports only the earlier stages,
and the top-level scripts are entry points that no library module or other script imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = (
    "train", "val", "detect", "export", "benchmarks", "hubconf", "segment.train", "segment.val", "segment.predict",
    "classify.train", "classify.val", "classify.predict", "study",
)  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    """Every module of models/ and utils/ plus the top-level scripts, by dotted name."""
    files = [p for pkg in ("models", "utils") for p in sorted((ROOT / pkg).rglob("*.py"))]
    files += [ROOT / f"{s.replace('.', '/')}.py" for s in SCRIPTS]
    return {_module_name(p): p for p in files}


def _imported_names(path: Path, name: str) -> set[str]:
    """Dotted names a module imports anywhere (function-level imports included); `from a import b` yields a and a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    mods = _modules()
    return {m: {d for d in _imported_names(p, m) if d in mods and d != m} for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph is acyclic (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return []


def test_find_cycle_detects_and_clears() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def package_of(module: str) -> str:
    """The package a module belongs to for the package graph: "utils" (its root modules), "utils.<stage>", "models", or
    the script itself."""
    parts = module.split(".")
    if parts[0] == "models":
        return "models"
    if parts[0] == "utils":
        return ".".join(parts[:2]) if len(parts) > 2 or (len(parts) == 2 and (ROOT / "utils" / parts[1]).is_dir()) else "utils"
    return module


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """package -> the other packages its modules import."""
    packages: dict[str, set[str]] = {}
    for module, deps in graph.items():
        own = package_of(module)
        packages.setdefault(own, set()).update(package_of(d) for d in deps)
    return {p: deps - {p} for p, deps in packages.items()}


def test_package_of() -> None:
    assert [package_of(m) for m in ("utils.boxes", "utils", "utils.runtime", "utils.runtime.backend", "models.yolo", "models")] == [
        "utils", "utils", "utils.runtime", "utils.runtime", "models", "models"
    ]  # fmt: skip
    assert package_of("segment.val") == "segment.val" and package_of("train") == "train"


def test_no_module_cycle() -> None:
    """No import cycle among all modules: models/, utils/ and the scripts (function-level and TYPE_CHECKING imports too)."""
    graph = import_graph()
    assert {"models.yolo", "models.model", "models.info", "utils.runtime.backend", "classify.val"} <= set(graph)
    assert find_cycle(graph) == []


def test_no_package_cycle() -> None:
    """No cycle among packages: models, the utils root modules ("utils"), each utils/ stage, and each script."""
    packages = package_graph(import_graph())
    assert {"models", "utils", "utils.runtime", "utils.export", "utils.engine", "val"} <= set(packages)
    assert find_cycle(packages) == []


def test_no_import_cycle_among_utils_modules() -> None:
    graph = import_graph()
    utils_graph = {m: {d for d in deps if d.startswith("utils")} for m, deps in graph.items() if m.startswith("utils")}
    assert "utils.evaluation.metrics" in utils_graph and "utils.plots" in utils_graph
    assert find_cycle(utils_graph) == []


def test_metrics_do_not_import_plotting() -> None:
    graph = import_graph()
    for m in ("utils.evaluation.metrics", "utils.evaluation.evaluator"):
        assert "utils.plots" not in graph[m], m
    assert not {d for d in graph["utils.plots"] if d.startswith("utils.evaluation")}


def test_models_import_nothing_from_utils() -> None:
    offenders = {m: sorted(d for d in deps if d.split(".")[0] == "utils") for m, deps in import_graph().items() if m.startswith("models")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_module_or_script_imports_a_script() -> None:
    offenders = {m: sorted(deps & set(SCRIPTS)) for m, deps in import_graph().items()}
    assert {m: d for m, d in offenders.items() if d} == {}


# The pipeline stages under utils/ and the earlier stages each may use (shared top-level utils/ modules are free).
# runtime runs the model files (DetectBackend and the format runners); export writes them and may check them with runtime.
STAGE_DEPENDENCIES = {
    "data": set(),
    "loss": set(),
    "evaluation": set(),
    "runtime": set(),
    "tasks": {"data", "evaluation"},
    "export": {"data", "tasks", "runtime"},
    "loggers": set(),  # experiment loggers: attached to the Trainer's callbacks, they know nothing of the stages
    "engine": {"data", "loss", "evaluation", "tasks", "runtime", "loggers"},
    "inference": {"data", "runtime", "tasks", "tracking"},
    "convert": set(),  # official YOLOv5/YOLOv8 checkpoints read without running their code, into our checkpoint format
    "study": {"data", "engine", "export"},  # study.py's comparison: trains, validates and exports through the stages above
    "tracking": set(),  # ByteTrack, its Kalman filter and matching, MOT files and metrics: numpy and scipy only
    "api": {"data", "engine", "export", "inference", "runtime", "tasks"},  # the YOLO model object: one front door to every stage
}


def test_utils_stages_import_only_earlier_stages() -> None:
    stages = {p.name for p in (ROOT / "utils").iterdir() if (p / "__init__.py").is_file()}
    assert stages == set(STAGE_DEPENDENCIES), "a new utils/ subpackage needs its place in STAGE_DEPENDENCIES"
    bad = []
    for module, deps in import_graph().items():
        parts = module.split(".")
        if parts[0] != "utils" or len(parts) < 3:
            continue
        for dep in deps:
            dparts = dep.split(".")
            if len(dparts) > 2 and dparts[0] == "utils" and dparts[1] != parts[1] and dparts[1] not in STAGE_DEPENDENCIES[parts[1]]:
                bad.append(f"{module} -> {dep}")
    assert not bad, bad


# What each part of models/ may import from models/: blocks build on the registry and BN folding only, backbones and
# heads on blocks, and none of them on the builder (parse, model, info, tta, pretrained, yolo) that assembles them.
MODEL_PARTS = {
    "models.blocks": {"models.registry", "models.reparam", "models.blocks"},
    "models.heads": {"models.registry", "models.reparam", "models.blocks", "models.heads"},
    "models.backbone": {"models.registry"},
    "models.mobilenetv4": {"models.registry", "models.reparam", "models.blocks", "models.backbone"},
    "models.mobileone": {"models.registry", "models.reparam", "models.blocks", "models.backbone"},
}


def test_models_blocks_heads_and_backbones_do_not_import_the_builder() -> None:
    graph = import_graph()
    assert {"models.blocks.conv", "models.heads.detect", "models.mobileone"} <= set(graph)
    offenders = {}
    for module, deps in graph.items():
        part = next((p for p in MODEL_PARTS if module == p or module.startswith(p + ".")), None)
        if part is None:
            continue
        allowed = MODEL_PARTS[part]
        bad = sorted(d for d in deps if d.startswith("models") and not any(d == a or d.startswith(a + ".") for a in allowed))
        if bad:
            offenders[module] = bad
    assert offenders == {}
