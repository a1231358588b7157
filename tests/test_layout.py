"""The package's layout rules: short modules, no import cycles, carried files self-contained.

Carried files (the flat `modeling_segcompass/*.py` that a saved model or processor takes
along as remote code) may import only torch, transformers, numpy, PIL, safetensors, the
standard library and each other; the library lives in rooms (subpackages) and imports them,
never the other way round.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "modeling_segcompass"
MAX_LINES = 700
ALLOWED_THIRD_PARTY = {"torch", "transformers", "numpy", "PIL", "safetensors"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def runtime_imports(tree: ast.AST, optional: bool = True) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run (lazy ones inside functions included), without those under
    ``if TYPE_CHECKING:`` and, unless `optional`, without those in a ``try`` that catches
    ImportError (an optional dependency the file works without)."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
            return
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            children = node.orelse
        elif (
            isinstance(node, ast.Try)
            and not optional
            and any(
                "ImportError" in ast.unparse(h.type or ast.Name("BaseException"))
                for h in node.handlers
            )
        ):
            children = [*node.handlers, *node.orelse, *node.finalbody]
        else:
            children = list(ast.iter_child_nodes(node))
        for child in children:
            visit(child)

    visit(tree)
    return found


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Package modules that `name` imports anywhere in its file (lazy imports included)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from x import y` imports x.y when y is a submodule, else x
            targets = [
                f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem
                for alias in node.names
            ]
        found |= {t for t in targets if t in known and t != name}
    return found


def test_no_module_is_longer_than_700_lines():
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules (lines): {long}"


def test_no_import_cycles():
    known = modules()
    graph = {name: imported_modules(name, path, known) for name, path in known.items()}
    # a package's __init__ re-exporting its own modules is not a cycle of concerns
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    cycles = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def carried_files() -> list[Path]:
    return sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")


def foreign_imports(path: Path, siblings: set[str]) -> list[str]:
    """What `path` imports besides torch, transformers, numpy, PIL, safetensors, the standard
    library and the flat `siblings` (optional imports in a try / except ImportError aside)."""
    bad = []
    for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8")), optional=False):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        else:
            if node.level:
                if node.level != 1 or (node.module or "").split(".")[0] not in siblings:
                    bad.append(f"from {'.' * node.level}{node.module or ''} import ...")
                continue
            roots = [(node.module or "").split(".")[0]]
        bad += [r for r in roots if r not in ALLOWED_THIRD_PARTY | set(sys.stdlib_module_names)]
    return bad


@pytest.mark.parametrize("path", carried_files(), ids=lambda p: p.name)
def test_carried_files_import_only_torch_transformers_stdlib_and_siblings(path):
    siblings = {p.stem for p in carried_files()}
    assert not foreign_imports(path, siblings), (
        f"{path.name} imports {foreign_imports(path, siblings)}"
    )


def test_what_a_saved_model_and_processor_carry_imports_only_what_is_allowed(tmp_path):
    from tests.helpers import build_tiny_model, build_tiny_tokenizer_and_processor

    build_tiny_model().save_pretrained(tmp_path)
    build_tiny_tokenizer_and_processor()[1].save_pretrained(tmp_path)
    carried = sorted(tmp_path.glob("*.py"))
    names = {p.stem for p in carried}
    assert {"modeling_segcompass", "processing_segcompass", "sam_frame"} <= names
    for path in carried:
        assert not foreign_imports(path, names), (
            f"{path.name} imports {foreign_imports(path, names)}"
        )


def test_the_rules_above_can_fail(tmp_path):
    """The checkers see a lazy import cycle and a foreign import."""
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "b.py").write_text(
        "from typing import TYPE_CHECKING\nfrom .a import f\n"
        "if TYPE_CHECKING:\n    from .c import h\n"
        "try:\n    import scipy\nexcept ImportError:\n    scipy = None\n"
    )
    known = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py"}
    assert imported_modules("p.a", known["p.a"], known) == {"p.b"}
    known["p.c"] = tmp_path / "b.py"
    assert imported_modules("p.b", known["p.b"], known) == {"p.a"}  # not p.c: type checking only
    tree = ast.parse(known["p.b"].read_text())
    assert [n.names[0].name for n in runtime_imports(tree, optional=False)] == [
        "TYPE_CHECKING",
        "f",
    ]


def test_foreign_imports_are_found(tmp_path):
    path = tmp_path / "carried.py"
    path.write_text(
        "import torch\nfrom .sibling import x\nfrom ..room import y\n"
        "def f():\n    import modeling_segcompass.assembly\n"
        "try:\n    import scipy\nexcept ImportError:\n    scipy = None\n"
    )
    assert foreign_imports(path, {"sibling"}) == ["from ..room import ...", "modeling_segcompass"]
