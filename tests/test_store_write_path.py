"""The store writes one way (issue 20, item 4): SQL of one database only in the dialect classes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

STORE = Path(__file__).resolve().parent.parent / "syncd" / "store"

# SQL, settings or checks of one database. schema.py's column types may adapt to the database they
# are bound for (SQLAlchemy hands them its dialect), and say nothing else of one database.
ONE_DATABASE = re.compile(
    r"on_conflict|ON CONFLICT|\bpg_|SKIP LOCKED|with_for_update|\bCOPY\b|::jsonb|"
    r"clock_timestamp|EXTRACT\(EPOCH|SET LOCAL|PRAGMA|json_group_object|\bANY\(|BEGIN IMMEDIATE|"
    r"dialect\.name\s*[!=]=|\.dialect\s*[!=]=|with_variant",
)
TYPE_ADAPTATIONS = {"schema.py": {"dialect.name ==", "dialect.name !=", "with_variant"}}


def test_sql_of_one_database_lives_in_the_dialect_classes() -> None:
    found = []
    for path in sorted(STORE.glob("*.py")):
        if path.name == "dialect.py":
            continue
        allowed = TYPE_ADAPTATIONS.get(path.name, set())
        source = path.read_text()
        prose = {  # docstrings name the databases
            number
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            for number in range(node.lineno, (node.end_lineno or node.lineno) + 1)
        }
        for number, line in enumerate(source.splitlines(), 1):
            code = line.split("#", 1)[0]
            if number not in prose:
                found += [f"{path.name}:{number}: {m.group()}" for m in ONE_DATABASE.finditer(code)]
        found = [f for f in found if f.rpartition(": ")[2] not in allowed or not f.startswith(path.name)]
    assert found == [], "\n".join(found)
