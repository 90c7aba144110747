"""The house rules, read from the code: which package may import which, no import cycles, a lean service.

Imports are read with ``ast`` from every module of the project, function-local ones and those
under ``if TYPE_CHECKING:`` included: a cycle held together by imports inside functions, or by
the types one module needs from another, is still a cycle of modules that cannot be read apart.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers.code import PACKAGES, project_modules

# What each package may import of the others (itself always).
ALLOWED = {
    "core": set(),
    "training": {"core"},
    "index": {"core"},
    "service": {"core", "index"},
    "benchmarks": {"core", "training", "index", "service"},
    "mrl": {"core", "training", "index", "service", "benchmarks"},
}


def module_imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports: module-level, inside functions, and for type checking."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: module_imports(path, name, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_for_type_checking_count(tmp_path: Path):
    module = tmp_path / "typed.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from training import train\n")
    assert module_imports(module, "typed", {"training.train"}) == {"training.train"}


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_in_a_circle():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_what_the_layering_allows(package: str):
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if module.split(".")[0] == package
        for target in targets
        if target.split(".")[0] not in ALLOWED[package] | {package}
    )
    assert wrong == []


def test_importing_the_service_app_imports_no_training_machinery():
    code = (
        "import sys, service.app, service.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('peft', 'datasets', 'training')"
        " or 'trainer' in m.split('.')[-1])\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_no_test_module_imports_another():
    """What tests share lives in ``tests/helpers`` (or ``conftest.py``): a test module is never a library."""
    wrong = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            wrong += [f"{path.name} imports {name}" for name in names if is_test_module(name)]
    assert wrong == []


def is_test_module(name: str) -> bool:
    """``tests.test_x`` (or a sibling's ``test_x``), not a library's own module that happens to be called test_*."""
    parts = name.split(".")
    return parts[0].startswith("test_") or (parts[0] == "tests" and len(parts) > 1 and parts[1].startswith("test_"))


def test_the_test_module_rule_tells_test_modules_from_libraries_test_utilities():
    assert is_test_module("tests.test_service") and is_test_module("tests.test_service.helper")
    assert is_test_module("test_service")
    assert not is_test_module("aiohttp.test_utils") and not is_test_module("tests.helpers.servers")


def test_the_client_package_stands_alone():
    """``client/`` installs alone (httpx and pydantic): it imports nothing of the service or the project."""
    standard = {"__future__", "base64", "struct", "collections", "dataclasses", "typing"}
    allowed = standard | {"httpx", "pydantic", "mrl_client", "langchain_core", "llama_index"}  # the last two: extras
    for path in (REPO / "client" / "mrl_client").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert {name.split(".")[0] for name in names} <= allowed, f"{path.name} imports {names}"


# --- the engine is chosen in one place ------------------------------------------------------------

# Where an index's engine may be named: the store contract (the registry), the locator (which parses it), and each
# engine's own modules. Everyone else asks the store (index.stores.IndexStore) and never which engine it is.
ENGINE_MODULES = {
    "index.stores",
    "index.locator",
    *("index.folder_store", "index.layout", "index.live", "index.compaction", "index.wal"),  # FAISS folders
}
ENGINE_PREFIXES = ("index.milvus",)  # index/milvus*.py: Milvus
# Modules that name an engine for a reason of their own.
ENGINE_EXCEPTIONS = {
    "benchmarks.backends": "measures FAISS against Milvus: it builds both and starts a Milvus server",
    "benchmarks.peers": "reads the corpus files of a folder index, and says so for another engine",
    "benchmarks.writes": "writes a scratch copy of an index: a folder's files, or a new index in Milvus, dropped after",
}


def engine_namings(path: Path) -> list[str]:
    """Where ``path`` compares an ``.engine`` (``==``, ``!=``, ``in``, ``not in``, ``match``) or imports a Milvus
    module, as ``line: what``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(side, ast.Attribute) and side.attr == "engine" for side in sides):
                found.append((node.lineno, "compares .engine"))
        elif isinstance(node, ast.Match):
            if isinstance(node.subject, ast.Attribute) and node.subject.attr == "engine":
                found.append((node.lineno, "matches .engine"))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(f"{node.module}.{alias.name}" for alias in node.names)]
            milvus = [name for name in names if name.startswith(ENGINE_PREFIXES)]
            if milvus:
                found.append((node.lineno, f"imports {milvus[0]}"))
    return [f"{line}: {what}" for line, what in sorted(found)]


def test_engine_namings_are_found(tmp_path: Path):
    module = tmp_path / "m.py"
    module.write_text(
        "def f(locator, store):\n"
        "    from index.milvus_live import open_milvus_live\n"
        "    if locator.engine == 'faiss' or store.locator.engine in ('milvus',):\n"
        "        match locator.engine:\n"
        "            case _:\n"
        "                pass\n"
        "    return engine == 'optimum'\n"  # another kind of engine (a name, not an index's .engine): allowed
    )
    assert engine_namings(module) == [
        "2: imports index.milvus_live", "3: compares .engine", "3: compares .engine", "4: matches .engine"
    ]  # fmt: skip


def test_the_engine_is_named_only_in_the_store_registry_the_locator_and_its_own_modules():
    """A third engine is its store, its backend and a registration: no caller branches on the engine or reaches
    into Milvus modules (the gap this closes: build, index info, compact and the writable server did)."""
    wrong = []
    for name, path in sorted(project_modules().items()):
        if name in ENGINE_MODULES or name.startswith(ENGINE_PREFIXES) or name in ENGINE_EXCEPTIONS:
            continue
        wrong += [f"{name}:{where}" for where in engine_namings(path)]
    assert wrong == []


def test_every_exception_still_names_an_engine():
    """An exception that no longer needs to be one is removed from the list."""
    modules = project_modules()
    assert [name for name in ENGINE_EXCEPTIONS if not engine_namings(modules[name])] == []
