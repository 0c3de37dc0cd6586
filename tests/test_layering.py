"""The core's layers: every module imports only modules below it (at top level, inside functions and under
TYPE_CHECKING alike), there is no import cycle, and no module imports another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dropbp"

#: The core, lowest first. A module may import only modules listed before it.
LAYERS = [
    "errors", "validation", "callstack", "schedules", "masks", "config", "allocation", "flops", "architectures",
    "tensors", "sensitivity", "memory", "reference", "checkpointing", "distributed", "zero",
    "branches", "forwards", "hooks", "calibration", "handle", "tiny", "verify", "api",
]
#: Above the core: they may import any of it, and each other as listed.
ABOVE = ["testing", "integrations", "integrations.trainer", "integrations.axolotl", "__init__"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts == ("__init__",):
        return "__init__"
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def dropbp_imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported dropbp module, imported names, line) for every import in the file, wherever it is."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
                node.module == "dropbp" or node.module.startswith("dropbp.")):
            if node.module == "dropbp":  # from dropbp import hooks: each name is a module or a package name
                for alias in node.names:
                    found.append((alias.name, [], node.lineno))
            else:
                found.append((node.module.removeprefix("dropbp."), [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dropbp."):
                    found.append((alias.name.removeprefix("dropbp."), [], node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append(("." * node.level + (node.module or ""), [a.name for a in node.names], node.lineno))
    return found


def core_and_integration_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "app" not in p.relative_to(PACKAGE).parts)


def test_every_core_module_is_in_the_layer_list():
    names = {module_name(p) for p in core_and_integration_files()}
    assert names == set(LAYERS) | set(ABOVE), "add the new module to LAYERS (or ABOVE) at its place"


@pytest.mark.parametrize("path", core_and_integration_files(), ids=module_name)
def test_modules_import_only_what_lies_below_them(path):
    order = LAYERS + ABOVE
    me = module_name(path)
    for target, _, line in dropbp_imports(path):
        assert not target.startswith("."), f"{me}:{line} uses a relative import; import dropbp.<module>"
        if target.startswith("app"):
            pytest.fail(f"{me}:{line} imports the application (dropbp.{target}); the library never does")
        top = target if target in order else target.split(".")[0]
        if me in LAYERS:
            assert top in LAYERS, f"{me}:{line} imports dropbp.{target}, which lies above the core"
            assert LAYERS.index(top) < LAYERS.index(me), (
                f"{me}:{line} imports dropbp.{target}, which is not below it in the layers: {' < '.join(LAYERS)}")


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_crosses_modules(path):
    for target, names, line in dropbp_imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{path.relative_to(PACKAGE)}:{line} imports private {private} from dropbp.{target}"


def test_there_is_no_import_cycle():
    graph = {module_name(p): {t for t, _, _ in dropbp_imports(p)} for p in PACKAGE.rglob("*.py")}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join([*trail, node, target]))
            if target not in state:
                visit(target, [*trail, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state and node != "__init__":
            visit(node, [])
