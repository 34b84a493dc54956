"""The layers of server/ as the folders show them: the engine, the model and the LoRA code know
nothing of the network faces, and the adapter registry knows nothing of the server."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FACE_LIBRARIES = ("grpc", "grpc_health", "grpc_reflection", "fastapi", "starlette", "uvicorn",
                  "prometheus_client")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def python_files(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}"
    return files


def imports_any(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("folder", ["server/engine", "server/model", "server/lora"])
def test_the_engine_layers_import_no_network_face(folder):
    found = {f"{path.relative_to(ROOT)}: {module}" for path in python_files(folder)
             for module in imported_modules(path)
             if imports_any(module, FACE_LIBRARIES + ("server.api", "server.app",
                                                      "server.serving", "server.cli"))}
    assert not found


def test_the_registry_imports_nothing_from_the_server():
    found = {f"{path.relative_to(ROOT)}: {module}" for path in python_files("adapters_registry")
             for module in imported_modules(path) if imports_any(module, ("server",))}
    assert not found


def test_the_check_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from prometheus_client import Counter\n")
    assert imports_any(next(iter(imported_modules(sample))), FACE_LIBRARIES)
