"""The package's import graph: no cycle among its modules, and product code never imports training."""

from __future__ import annotations

import ast
from pathlib import Path

import napari_sam2unet

PACKAGE = Path(napari_sam2unet.__file__).parent
NAME = "napari_sam2unet"
# Product modules that may import training code, and why (issue 24 leaves these for later).
TRAINING_USERS = {
    f"{NAME}._finetune_widget": "the fine-tune widget is training's GUI",
    f"{NAME}._adapt": "Adapt to this scan, the segment widget's button, runs training's fine-tuning",
    f"{NAME}.convert.qnn_slices": "the NPU check scores corrective clicks with training.prompt_sim.error_click",
}
# Cycles closed only by imports inside functions, allowed for now, and why (issue 24 leaves these
# for later): the modules of each cycle.
LAZY_CYCLES: dict[frozenset[str], str] = {}


# Public module-level names (classes, type aliases, constants) that two modules define, allowed for
# now, and why; any other name defined twice is a collision (rename one) or a fact written twice.
SHARED_NAMES = {
    "INSTALL_HINT": "each module's own missing-package message",
    "MIN_VOXELS": "different thresholds: structures eval scores, structures the NPU check boxes",
    "TOLERANCE": "different checks that happen to share 1e-4 (weights into a graph, QNN rewrites)",
}

MODULE_LINE_LIMIT = 450
CLASS_LINE_LIMIT = 300
# Modules and classes over their limit, allowed for now, and why; a split removes its entry.
LONG_MODULES: dict[str, str] = {}
LONG_CLASSES: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The package modules a file imports (relative imports resolved); functions' lazy imports
    count unless top_level_only."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # `if TYPE_CHECKING:` and try/except blocks at module level count too
        nodes = [n for top in tree.body for n in ast.walk(top) if not isinstance(top, ast.FunctionDef | ast.ClassDef)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == NAME or name.startswith(NAME + ".")}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        graph[module] = {name for name in _imports(path, top_level_only) if name in files and name != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                return path[path.index(other):] + [other]
            if other not in state and (found := visit(other)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def _is_package_of(module: str, other: str) -> bool:
    return other.startswith(module + ".")


def test_no_import_cycle_among_the_package_modules():
    graph = _graph(top_level_only=True)
    # A package importing its own submodules (backends/__init__ -> backends.base) is how packages
    # expose them, not a cycle between two jobs; drop those edges.
    graph = {m: {o for o in deps if not _is_package_of(m, o)} for m, deps in graph.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_even_through_imports_inside_functions():
    graph = _graph(top_level_only=False)
    graph = {m: {o for o in deps if not _is_package_of(m, o)} for m, deps in graph.items()}
    for modules in LAZY_CYCLES:
        graph = {m: deps - modules if m in modules else deps for m, deps in graph.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle (through imports inside functions): " + " -> ".join(cycle)


def test_product_code_never_imports_training():
    training = f"{NAME}.training"
    upward = {module: sorted(o for o in deps if o == training or o.startswith(training + "."))
              for module, deps in _graph(top_level_only=False).items()
              if not (module == training or module.startswith(training + ".")) and module not in TRAINING_USERS}
    upward = {module: deps for module, deps in upward.items() if deps}
    assert not upward, f"product modules import training code: {upward}"


def test_backends_import_only_errors_models_and_each_other():
    backends = f"{NAME}.backends"
    allowed = {NAME, backends, f"{NAME}.errors", f"{NAME}.models"}
    upward = {module: sorted(o for o in deps if o not in allowed and not _is_package_of(backends, o))
              for module, deps in _graph(top_level_only=False).items()
              if module == backends or _is_package_of(backends, module)}
    upward = {module: deps for module, deps in upward.items() if deps}
    assert not upward, f"backends import modules above them: {upward}"


def test_no_public_name_is_defined_in_two_modules():
    defined: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name) and t.id[0].isupper()]
            else:
                continue
            for name in names:
                defined.setdefault(name, []).append(_module_name(path))
    twice = {name: modules for name, modules in defined.items()
             if len(set(modules)) > 1 and name not in SHARED_NAMES}
    assert not twice, f"names defined in more than one module: {twice}"


def test_modules_and_classes_stay_short_enough_to_read():
    long_modules, long_classes = {}, {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        module = _module_name(path)
        if (lines := len(text.splitlines())) > MODULE_LINE_LIMIT and module not in LONG_MODULES:
            long_modules[module] = lines
        for node in ast.walk(ast.parse(text)):
            name = f"{module}.{getattr(node, 'name', '')}"
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= CLASS_LINE_LIMIT \
                    and name not in LONG_CLASSES:
                long_classes[name] = node.end_lineno - node.lineno + 1
    assert not long_modules, f"modules over {MODULE_LINE_LIMIT} lines (split them by job): {long_modules}"
    assert not long_classes, f"classes over {CLASS_LINE_LIMIT} lines (split them by job): {long_classes}"
    stale = [name for name in LONG_MODULES if not _module_path(name).exists()
             or len(_module_path(name).read_text(encoding="utf-8").splitlines()) <= MODULE_LINE_LIMIT]
    assert not stale, f"LONG_MODULES lists modules no longer over the limit (remove them): {stale}"


def _module_path(module: str) -> Path:
    return PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")
