"""The package stays ruff-clean and mypy-clean (the project's own rules, in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def test_ruff() -> None:
    result = run("ruff", "check", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_package_is_shipped() -> None:
    # A package missing from [tool.setuptools] packages works in the editable install of the tests
    # and is absent from `pip install .` (the README's first command).
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "syncd").rglob("__init__.py")}
    assert found <= listed, found - listed


# The rooms of ARCHITECTURE.md, top floor first: a module imports only rooms on lower floors (or its own).
FLOORS = {
    "syncd.program": 11,
    "syncd.cli": 10,
    "syncd.daemon": 9,
    "syncd.passes": 8,
    "syncd.sync": 7,
    "syncd.reconcile": 7,
    "syncd.details": 6,
    "syncd.edits": 6,
    "syncd.api": 5,
    "syncd.store": 5,
    "syncd.health": 5,
    "syncd.metrics": 4,
    "syncd.schemas": 4,
    "syncd.migrations": 4,  # migrations/, installed as syncd.migrations (Alembic scripts)
    "syncd.models": 3,
    "syncd.config": 3,
    "syncd.errors": 1,
    "syncd.vocab": 1,
    "syncd.backoff": 1,
    "syncd.logs": 1,
    "syncd.notify": 1,
    "syncd.simulator": 1,
    "syncd": 0,  # the package's face: __version__
    "syncd.__version__": 0,
}
ONLY_IN = {"httpx": "syncd.api", "httpcore": "syncd.api", "sqlalchemy": "syncd.store", "apscheduler": "syncd.daemon"}


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_imports_point_down() -> None:
    import ast

    wrong = []
    for path in (ROOT / "syncd").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if module.endswith(".__main__"):  # `python -m`: the program itself, above every room
            continue
        room = _room(module)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    wrong.append(f"{module}: a relative import (the floors are checked on absolute ones)")
                    continue
                # `from syncd import health` imports the room syncd.health, not the package's face.
                names = [f"{node.module}.{a.name}" if node.module == "syncd" else str(node.module) for a in node.names]
            for name in names:
                top = name.split(".")[0]
                if top in ONLY_IN and room != ONLY_IN[top]:
                    wrong.append(f"{module} imports {name} (only {ONLY_IN[top]} may)")
                if top == "syncd":
                    target = _room(name)
                    if room not in FLOORS or target not in FLOORS:
                        wrong.append(f"{module} -> {name}: give the new room a floor in FLOORS (and ARCHITECTURE.md)")
                    elif target != room and FLOORS[target] >= FLOORS[room]:
                        wrong.append(f"{module} (floor {FLOORS[room]}) imports {name} (floor {FLOORS[target]})")
    assert wrong == []
