"""Every vocabulary has one home, ``syncd.vocab``: each CHECK constraint of the schema (the models
and the databases the migrations build, both kinds) lists exactly its enum's values, and the copies
kept elsewhere are the enum's."""

from __future__ import annotations

import re
from dataclasses import fields
from enum import StrEnum

from sqlalchemy import CheckConstraint, text

from syncd.config import WritebackSettings
from syncd.edits import KINDS
from syncd.metrics import PASS_STATUSES
from syncd.store import Store
from syncd.store.schema import metadata
from syncd.vocab import (
    ChangeKind,
    DeviceState,
    EditAction,
    EditSource,
    EditStatus,
    HoldReason,
    PassStatus,
    RestrictionStatus,
    RunStatus,
    RunTrigger,
)

# (table, column) -> the enum its CHECK constraint holds it to.
VOCABULARIES: dict[tuple[str, str], type[StrEnum]] = {
    ("devices", "state"): DeviceState,
    ("sync_runs", "status"): RunStatus,
    ("sync_runs", "trigger"): RunTrigger,
    ("device_changes", "change"): ChangeKind,
    ("device_edits", "action"): EditAction,
    ("device_edits", "status"): EditStatus,
    ("device_edits", "requested_via"): EditSource,
    ("device_edits", "held_by"): HoldReason,
    ("portal_restrictions", "status"): RestrictionStatus,
}
# CHECK constraints that hold no vocabulary: (table, the condition without blanks, brackets, quotes).
OTHER_CHECKS = {("door_access_intervals", "anyone=entity_idisnull")}

Checks = dict[tuple[str, str], set[str]]


def _one_of(condition: str) -> tuple[str, set[str]] | None:
    """``(column, values)`` of ``column IN ('a', 'b')`` (SQLite, the models) or of PostgreSQL's
    ``((column)::text = ANY ((ARRAY['a'::character varying, ...])::text[]))``, or its
    ``((column)::text = 'a'::text)`` for a list of one; None for another condition."""
    plain = re.fullmatch(r"\s*\(?\s*\"?(\w+)\"?\s+IN\s*\((.*)\)\s*\)?\s*", condition, re.S | re.I)
    pg = re.fullmatch(r"\(+\"?(\w+)\"?\)?(?:::text)?\s*=\s*ANY\s*\(+ARRAY\[(.*)\].*", condition, re.S)
    pg_one = re.fullmatch(r"\(+\"?(\w+)\"?\)?(?:::text)?\s*=\s*('(?:[^']|'')*')(?:::[\w ]+)?\)*", condition, re.S)
    found = plain or pg or pg_one
    if found is None:
        return None
    return found[1], {v.replace("''", "'") for v in re.findall(r"'((?:[^']|'')*)'", found[2])}


def _sorted(table: str, conditions: list[str]) -> tuple[Checks, set[tuple[str, str]]]:
    """The conditions of a table's CHECK constraints: vocabularies by column, and the others."""
    vocabularies: Checks = {}
    others = set()
    for condition in conditions:
        one_of = _one_of(condition)
        if one_of is None:
            normalised = re.sub(r"[\s()\"]", "", condition).lower()
            others.add((table, normalised))
        else:
            column, values = one_of
            assert (table, column) not in vocabularies, f"two CHECKs of {table}.{column}"
            vocabularies[(table, column)] = values
    return vocabularies, others


def _check_clauses(create_table: str) -> list[str]:
    """The conditions of the CHECK constraints in SQLite's CREATE TABLE text (brackets matched)."""
    conditions = []
    for found in re.finditer(r"\bCHECK\s*\(", create_table, re.I):
        depth, start = 1, found.end()
        for i in range(start, len(create_table)):
            depth += {"(": 1, ")": -1}.get(create_table[i], 0)
            if depth == 0:
                conditions.append(create_table[start:i])
                break
    return conditions


def _in_models() -> tuple[Checks, set[tuple[str, str]]]:
    vocabularies: Checks = {}
    others: set[tuple[str, str]] = set()
    for table in metadata.tables.values():
        checks = [str(c.sqltext) for c in table.constraints if isinstance(c, CheckConstraint)]
        found, other = _sorted(table.name, checks)
        vocabularies.update(found)
        others |= other
    return vocabularies, others


def _in_database(store: Store) -> tuple[Checks, set[tuple[str, str]]]:
    by_table: dict[str, list[str]] = {}
    with store.engine.connect() as conn:
        if store.engine.dialect.name == "sqlite":
            rows = conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
            for name, sql in rows:
                by_table[name] = _check_clauses(sql or "")
        else:
            rows = conn.execute(
                text(
                    "SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE contype = 'c' AND connamespace = current_schema()::regnamespace"
                )
            )
            for table, definition in rows:
                condition = re.fullmatch(r"CHECK\s*\((.*)\)", definition, re.S)
                assert condition is not None, definition
                by_table.setdefault(table.strip('"'), []).append(condition[1])
    vocabularies: Checks = {}
    others: set[tuple[str, str]] = set()
    for table, conditions in by_table.items():
        found, other = _sorted(table, conditions)
        vocabularies.update(found)
        others |= other
    return vocabularies, others


def _assert_tied(vocabularies: Checks, others: set[tuple[str, str]]) -> None:
    unnamed = set(vocabularies) - set(VOCABULARIES)
    assert not unnamed, f"CHECK constraints no enum is tied to (add them to VOCABULARIES): {sorted(unnamed)}"
    assert set(VOCABULARIES) <= set(vocabularies), f"no CHECK of {sorted(set(VOCABULARIES) - set(vocabularies))}"
    for (table, column), values in vocabularies.items():
        enum = VOCABULARIES[(table, column)]
        assert values == {m.value for m in enum}, (
            f"{table}.{column}: CHECK lists {sorted(values)}, {enum.__name__} differs"
        )
    assert others == OTHER_CHECKS, f"CHECK constraints that are no vocabulary: {sorted(others - OTHER_CHECKS)}"


def test_every_check_constraint_lists_its_enum_in_the_models() -> None:
    _assert_tied(*_in_models())


def test_every_check_constraint_lists_its_enum_in_the_migrated_database(database_url: str) -> None:
    store = Store(database_url)
    try:
        store.upgrade()
        _assert_tied(*_in_database(store))
    finally:
        store.close()


def test_the_parsers_read_each_form_of_a_check() -> None:
    assert _one_of("state IN ('active', 'deleted', 'purged')") == ("state", {"active", "deleted", "purged"})
    pg = "((action)::text = ANY ((ARRAY['update'::character varying, 'door_restrictions'::character varying])::text[]))"
    assert _one_of(pg) == ("action", {"update", "door_restrictions"})
    assert _one_of("anyone = (entity_id IS NULL)") is None
    assert _one_of("((held_by)::text = 'send_cap'::text)") == ("held_by", {"send_cap"})
    create = (
        "CREATE TABLE t (a TEXT, CONSTRAINT ck_a CHECK (a IN ('x', 'y')), CONSTRAINT ck_b CHECK ((b = (c IS NULL))))"
    )
    assert _check_clauses(create) == ["a IN ('x', 'y')", "(b = (c IS NULL))"]


def test_the_other_copies_are_the_enums() -> None:
    assert set(KINDS) == set(EditAction)  # one EditKind class per action
    assert all(KINDS[a].action is a for a in EditAction)  # the classes name their action by the enum
    meta = next(f.metadata for f in fields(WritebackSettings) if f.name == "require_approval")
    assert tuple(meta["choices"]) == tuple(EditAction)
    # A pass's outcome is how its run ended, or skipped (no run); the metrics count those that ran.
    assert set(PassStatus) - {PassStatus.SKIPPED} == set(RunStatus) - {RunStatus.RUNNING}
    assert set(PASS_STATUSES) == set(RunStatus) - {RunStatus.RUNNING}
