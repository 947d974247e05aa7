"""The package structure: imports go one way between layers, modules import in no circle, and
source files stay a readable size. Read from the sources (``ast``); nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("tvm_sparse", "relay_passes", "schedules")

# Lowest first: a module imports modules of its own layer or of a layer listed before it.
# A module belongs to the layer of the longest prefix below that names it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # Usable by all. The package's own __init__ imports only ``errors``: its public names
    # (compile, tune, ...) are resolved on first use, since relay_passes / schedules importing
    # tvm_sparse.formats run it first.
    (
        "base",
        (
            "tvm_sparse",
            "tvm_sparse.errors",
            "tvm_sparse.validation",
            "tvm_sparse.targets",
            "tvm_sparse.report",
            "tvm_sparse.toolchain",
            "tvm_sparse.profiling",
            "tvm_sparse.rpc",
            "tvm_sparse.models",
        ),
    ),
    ("formats", ("tvm_sparse.formats", "tvm_sparse.prune")),  # packed weights; pruning to them
    ("schedules", ("schedules",)),
    ("relay_passes", ("relay_passes",)),
    # The frontend runs FoldBatchNorm (a relay pass) on every imported model.
    (
        "pipeline",
        (
            "tvm_sparse.frontend",
            "tvm_sparse.onnx_rnn",
            "tvm_sparse.torch_rnn",
            "tvm_sparse.pipeline",
        ),
    ),
    ("tuning", ("tvm_sparse.tuning",)),
    (
        "compiler",
        (
            "tvm_sparse.compiler",
            "tvm_sparse.compiled_model",
            "tvm_sparse.kernel_bounds",
            "tvm_sparse.benchmarking",
            "tvm_sparse.cost_model",
            "tvm_sparse.testing",
            "tvm_sparse.sequence_models",
        ),
    ),
    (
        "cli",
        ("tvm_sparse.cli", "tvm_sparse.demo", "tvm_sparse.demo_sequence", "tvm_sparse.fuzzing"),
    ),
]

MAX_LINES = 700
# Files over MAX_LINES that are being split; this set only shrinks.
OVERSIZED: set[str] = set()


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every .py in FOLDERS (packages by __init__)."""
    found = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The project module a dotted import name lands in (a submodule, else its package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, module level or in a function, except under ``if TYPE_CHECKING``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _imported(module: str, path: Path) -> set[str]:
    """The project modules that importing ``module`` (or calling its functions) imports: each
    named module and the packages above it that are not ``module``'s own (Python runs a
    package's __init__ before its submodules)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parts, *([node.module] if node.module else [])])
        names += [f"{base}.{alias.name}" for alias in node.names]
    own = {module, *_ancestors(module)}
    targets = set()
    for name in names:
        owner = _owner(name)
        if owner is not None:
            targets |= {m for m in (owner, *_ancestors(owner)) if m in MODULES} - own
    return targets


GRAPH = {module: _imported(module, path) for module, path in MODULES.items()}


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer of LAYERS: place it there"
    return rank


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a path that starts and ends at the same module), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_graph_sees_known_imports() -> None:
    """The parser finds relative, absolute and implied-package imports (a sanity check)."""
    assert "tvm_sparse.pipeline" in GRAPH["tvm_sparse.compiler"]
    assert "tvm_sparse.tuning.apply" in GRAPH["tvm_sparse.compiler"]
    assert {"tvm_sparse.formats", "tvm_sparse"} <= GRAPH["relay_passes.conv_plan"]
    assert "tvm_sparse" not in GRAPH["tvm_sparse.compiler"]  # its own package: already running


def test_no_import_cycle() -> None:
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_layers_import_only_their_own_or_lower_layers() -> None:
    names = [name for name, _ in LAYERS]
    upward = [
        f"{module} ({names[_layer(module)]}) imports {target} ({names[_layer(target)]})"
        for module, targets in sorted(GRAPH.items())
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_source_file_over_the_line_budget() -> None:
    over = {
        path.relative_to(ROOT).as_posix()
        for path in MODULES.values()
        if len(path.read_text(encoding="utf-8").splitlines()) > MAX_LINES
    }
    assert over <= OVERSIZED, f"over {MAX_LINES} lines: {sorted(over - OVERSIZED)}"
