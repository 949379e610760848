"""The edit state machine is one table (``syncd.store.edits.TRANSITIONS``): every transition from
every status, allowed or refused, on both databases; the table knows every status (the enum and
the CHECK constraint: tests/test_vocab.py); and a hold (``held_by``) is data that lasts as long as its message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import select, text

from syncd.store import Store, migrate
from syncd.store.edits import TRANSITIONS, EditQueue, _move
from syncd.store.schema import device_edits
from syncd.vocab import EditStatus, HoldReason

DEVICE = "01HK153X0038NZ3ZA2MABNBN61"
# Statuses an edit never leaves: the outcome is recorded for good.
TERMINAL = {EditStatus.SUCCEEDED, EditStatus.REJECTED}


def test_the_table_knows_every_status() -> None:
    # (tests/test_vocab.py ties EditStatus to the CHECK constraint.)
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


@pytest.mark.parametrize("then", ["release", "claim", "retry_later", "fail", "succeed"])
def test_a_hold_is_data_that_lasts_until_another_message_replaces_its_own(store: Store, then: str) -> None:
    """``held_by`` is set with a hold's message and cleared with the next message written, so that
    `syncd edits` says "held" exactly while the edit's last error is its hold's."""
    queue = EditQueue(store)
    edit_id = queue.add({"device_id": DEVICE, "action": "delete"})
    now = datetime.now(UTC)
    [claimed] = queue.claim(now, timedelta(minutes=2), 10, "test")
    queue.hold(claimed, now, now, "held: 20 soft deletes sent in the last hour")
    held = queue.get(edit_id)
    assert held is not None and held.status is EditStatus.PENDING and held.held_by is HoldReason.SEND_CAP
    [claimed] = queue.claim(now, timedelta(minutes=2), 10, "test")
    if then == "release":
        queue.release([edit_id], now)
    elif then == "retry_later":
        queue.retry_later(claimed, now, now, "HTTP 503", 503)
    elif then == "fail":
        queue.fail(claimed, now, "refused")
    elif then == "succeed":
        queue.succeed(claimed, now)
    after = queue.get(edit_id)
    assert after is not None
    kept = then in ("release", "claim")  # the hold's message is still the last error
    assert after.held_by is (HoldReason.SEND_CAP if kept else None), then
    assert (after.last_error or "").startswith("held:") == kept


def test_migration_0011_records_the_holds_made_before_it(database_url: str) -> None:
    """Edits held before ``held_by`` existed (their last error starts with 'held:') are held by data
    after the upgrade; no other edit is."""
    store = Store(database_url)
    store.upgrade()
    with store.engine.begin() as conn:
        command.downgrade(migrate.alembic_config(conn), "0010")
        for n, error in enumerate(("held: 20 soft deletes sent in the last hour ...", "HTTP 503: held: no", None)):
            conn.execute(
                text("INSERT INTO device_edits (id, device_id, action, last_error) VALUES (:i, :d, 'delete', :e)"),
                {"i": n + 1, "d": DEVICE, "e": error},
            )
    store.upgrade()
    assert [e.held_by for e in EditQueue(store).find()] == [HoldReason.SEND_CAP, None, None]
    store.close()
