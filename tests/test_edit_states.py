"""The edit state machine is one table (``syncd.store.edits.TRANSITIONS``): every transition from
every status, allowed or refused, on both databases; and the statuses the table, the enum and the
CHECK constraint know agree."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from syncd.store import Store
from syncd.store.edits import TRANSITIONS, EditQueue, EditStatus, _move
from syncd.store.schema import EDIT_STATUSES, device_edits

DEVICE = "01HK153X0038NZ3ZA2MABNBN61"
# Statuses an edit never leaves: the outcome is recorded for good.
TERMINAL = {EditStatus.SUCCEEDED, EditStatus.REJECTED}


def test_the_table_the_enum_and_the_check_constraint_know_the_same_statuses() -> None:
    assert {s.value for s in EditStatus} == set(EDIT_STATUSES)
    targets = {target for _, target in TRANSITIONS.values()}
    sources = {s for allowed, _ in TRANSITIONS.values() for s in allowed}
    assert targets | sources == set(EditStatus)  # every status is reached or left by some transition
    assert sources == set(EditStatus) - TERMINAL  # only succeeded and rejected are for good
    assert EditStatus.AWAITING_APPROVAL not in TRANSITIONS["claim"][0]  # never pushed before an approval
    assert TRANSITIONS["approve"][1] is EditStatus.PENDING
    assert EditStatus.REJECTED not in TRANSITIONS["retry"][0]  # a rejection is not undone by a retry


@pytest.mark.parametrize("event", sorted(TRANSITIONS))
def test_each_transition_moves_exactly_the_statuses_it_allows(store: Store, event: str) -> None:
    """From each status: the allowed ones move to the target, the others are refused and untouched."""
    allowed, target = TRANSITIONS[event]
    queue = EditQueue(store)
    rows = {
        status: queue.add({"device_id": DEVICE, "action": "delete", "status": status.value}) for status in EditStatus
    }
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        moved = {status: _move(conn, edit_id, event, now, {}) for status, edit_id in rows.items()}
    with store.engine.connect() as conn:
        after = dict(conn.execute(select(device_edits.c.id, device_edits.c.status)).all())
    for status, edit_id in rows.items():
        if status in allowed:
            assert moved[status], f"{event} refused an edit {status}"
            assert after[edit_id] == target.value, f"{event} from {status}"
        else:
            assert not moved[status], f"{event} moved an edit {status}"
            assert after[edit_id] == status.value, f"{event} changed an edit {status}"


@pytest.mark.parametrize("status", [s for s in EditStatus if s not in TRANSITIONS["cancel"][0]])
def test_an_operator_is_told_why_a_transition_is_refused(store: Store, status: EditStatus) -> None:
    from syncd.errors import ConfigError

    queue = EditQueue(store)
    edit_id = queue.add({"device_id": DEVICE, "action": "delete", "status": status.value})
    with pytest.raises(ConfigError, match=f"edit {edit_id} is {status.value}; cancel works on pending"):
        queue.cancel(edit_id, datetime.now(UTC))
    edit = queue.get(edit_id)
    assert edit is not None and edit.status is status
