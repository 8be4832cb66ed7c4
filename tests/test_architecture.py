"""The package's shape: layered rooms, no import cycles, one owner per concern (read from the code, not by eye)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "metrics" / "promfork"


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        found[str(path.relative_to(PACKAGE.parent))] = ast.parse(path.read_text(), str(path))
    return found


def strings(tree: ast.Module) -> list[str]:
    """Every string constant that is not a docstring."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_the_rooms_are_layered_as_pyproject_declares():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("promfork")  # function-level imports included
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain is not None:
                cycles.append((module, *chain))
    assert not cycles, cycles


def test_a_gunicorn_config_can_import_promfork_before_the_multiprocess_directory_is_set():
    # prometheus_client picks in-memory or file storage at its first import: a
    # gunicorn.conf.py that imported it (through promfork) too early would pick wrong.
    code = (
        "import sys\n"
        "import promfork, promfork.gunicorn, promfork.config, promfork.client, promfork.forks\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prometheus_client'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_only_forks_registers_at_fork_handlers():
    callers = [
        name
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "register_at_fork"
    ]
    assert callers == ["promfork/forks.py"]


# prometheus-client attributes and modules that are not its public API.
_PRIVATE = {
    "ValueClass",
    "_collector_to_names",
    "_upper_bounds",
    "_labelnames",
    "_labelvalues",
    "_multiprocess_mode",
    "_buckets",
}
_PRIVATE_MODULES = {"prometheus_client.values", "prometheus_client.mmap_dict"}


def test_only_client_reads_prometheus_client_internals():
    readers = set()
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in _PRIVATE:
                readers.add(name)
            if isinstance(node, ast.ImportFrom) and node.module in _PRIVATE_MODULES:
                readers.add(name)
            internal = isinstance(node, ast.ImportFrom) and node.module == "prometheus_client"
            if internal and {alias.name for alias in node.names} & {"values", "mmap_dict"}:
                readers.add(name)
        readers.update(name for s in strings(tree) if s in _PRIVATE)
    # fileformat reads archives with MmapedDict's own reader (a static method of its file format).
    assert readers <= {"promfork/client.py", "promfork/directory/fileformat.py"}, readers


_FILE_NAME = re.compile(r"^[\w.-]*\.(db|bin|slot|exit|journal|lock|new)$|^\.promfork|^quarantine$")


def test_only_filenames_spells_a_file_name_of_the_directory():
    spelled = {
        (name, s)
        for name, tree in modules().items()
        if name != "promfork/directory/filenames.py"
        for s in strings(tree)
        if _FILE_NAME.search(s)
    }
    assert not spelled, spelled
