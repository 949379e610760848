"""Comparing a pass's devices with the mirror, and the history rows (``device_changes``) that
record what changed: devices new to the mirror, rewritten devices (diffed field by field), purges."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from syncd.models import Device, HistoryRow, change_kind, describe_change, history_row
from syncd.vocab import ChangeKind, DeviceState


@dataclass(slots=True)
class Compared:
    """The devices of a page whose payload differs from the mirror's, compared field by field."""

    changed: list[Device]  # their content changed: rewritten, each with a history row
    refreshes: list[Device]  # the same content serialised differently: payload and fingerprint only
    rows: list[HistoryRow]


class History:
    """The history rows of one pass (its run) of one org."""

    def __init__(self, org_id: str, run_id: int, baseline: bool) -> None:
        """``baseline``: no pass of the org has succeeded yet, so the pass cannot tell a new device
        from one that existed: it records what it saw as ``observed``, not ``created``."""
        self.org_id = org_id
        self.run_id = run_id
        self.first = ChangeKind.OBSERVED if baseline else ChangeKind.CREATED

    def created(self, inserts: Sequence[Device], now: datetime) -> list[HistoryRow]:
        """The rows of devices new to the mirror."""
        org_id, first, run_id = self.org_id, self.first, self.run_id
        return [history_row(d.id, org_id, now, first, None, d, run_id=run_id) for d in inserts]

    def compare(
        self,
        updates: Sequence[Device],
        previous: Mapping[str, tuple[dict[str, Any], str]],
        now: datetime,
        counts: Counter[str],
    ) -> Compared:
        """Diff each device against its ``previous`` ``(raw, state)`` in the mirror; ``counts`` gets
        each change's kind, and ``unchanged`` for a device whose content is the same."""
        compared = Compared([], [], [])
        for device in updates:
            old_raw, old_state = previous[device.id]
            diff = describe_change(old_raw, device.raw, old_state, device.state)
            if not diff:
                # The same content serialised differently (another key order, say): only the
                # stored payload and fingerprint are renewed; nothing changed.
                compared.refreshes.append(device)
                counts["unchanged"] += 1
                continue
            kind = change_kind(old_state, device.state)
            counts[kind] += 1
            compared.changed.append(device)
            compared.rows.append(history_row(device.id, self.org_id, now, kind, diff, device, run_id=self.run_id))
        return compared

    def purged(self, device_id: str, mirrored: Mapping[str, Any], now: datetime) -> HistoryRow:
        """The row of a device found purged; ``mirrored``: its history fields as the mirror has them."""
        gone = DeviceState.PURGED
        diff = {"state": {"old": mirrored["state"], "new": gone}}
        return history_row(
            device_id, self.org_id, now, ChangeKind.PURGED, diff, {**mirrored, "state": gone}, run_id=self.run_id
        )
