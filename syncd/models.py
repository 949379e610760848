"""The device as syncd understands it, parsed tolerantly from OpenApp's DeviceResponse.

The public spec and the live server disagree in places (CONTRACT.md §4): ``name`` arrives as
``{"en": ...}``, ``{"value": {...}}`` or a bare string; lifecycle timestamps arrive top-level,
inside the ``metadata`` string map, or both. Unknown fields are kept in ``raw``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from xxhash import xxh3_128_hexdigest

from syncd.errors import InvalidDeviceError

DeviceState = Literal["active", "deleted", "purged"]
LIFECYCLE_FIELDS = ("created_at", "updated_at", "deleted_at", "purge_at", "hard_delete_at")
# Per-request cache annotations: they change between identical reads, so they are not content.
VOLATILE_FIELDS = frozenset({"cache_hit", "cache_ttl"})
UNDETERMINED_LOCALE = "und"


def _lifecycle(index: int, doc: str) -> property:
    def get(device: Device) -> datetime | None:
        text = device.lifecycle[index]
        return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)

    return property(get, doc=doc)


@dataclass(slots=True)  # not frozen: frozen dataclasses are several times slower to build
class Device:
    """One device as mirrored: normalised columns plus the payload as received."""

    id: str
    org_id: str
    integration_id: str | None
    zone_id: str | None
    external_id: str | None
    name: dict[str, str]
    device_metadata: Any
    # The LIFECYCLE_FIELDS as canonical UTC text (see utc_text): the form SQLite stores, kept as
    # text because formatting a datetime costs more than the rest of a device's parsing.
    lifecycle: tuple[str | None, ...]
    raw: dict[str, Any]
    raw_json: str  # ``raw`` serialised once; what the mirror stores
    fingerprint: str

    created_at = _lifecycle(0, "OpenApp's created_at, aware UTC.")
    updated_at = _lifecycle(1, "OpenApp's updated_at, aware UTC.")
    deleted_at = _lifecycle(2, "When OpenApp soft-deleted the device (None when it is not deleted).")
    purge_at = _lifecycle(3, "When OpenApp plans to purge the soft-deleted device.")
    hard_delete_at = _lifecycle(4, "When OpenApp plans to delete the device for good.")

    @property
    def state(self) -> DeviceState:
        """``deleted`` when OpenApp reports a soft delete, else ``active``."""
        return "deleted" if self.lifecycle[2] is not None else "active"


def encode(raw: dict[str, Any]) -> tuple[bytes, str]:
    """``(json, fingerprint)`` of a payload: its JSON, keys in the order received, and a 128-bit
    digest of that JSON without per-request cache annotations. One serialisation serves both when
    it can. The same content in another key order digests differently; a pass that meets such a
    device compares contents and renews the stored payload without recording a change."""
    encoded = orjson.dumps(raw)
    content = encoded
    if "cache_hit" in raw or "cache_ttl" in raw:  # VOLATILE_FIELDS, spelled out: this runs per device
        content = orjson.dumps({k: v for k, v in raw.items() if k not in VOLATILE_FIELDS})
    return encoded, xxh3_128_hexdigest(content)


def utcnow() -> datetime:
    """Aware UTC now."""
    return datetime.now(UTC)


def identify(item: object, position: int | None = None) -> tuple[str, str]:
    """Return ``(id, org_id)`` of a raw list item, or raise InvalidDeviceError naming the problem."""
    if not isinstance(item, dict):
        raise InvalidDeviceError(f"expected a JSON object, got {type(item).__name__}", position=position)
    device_id = item.get("id")
    if not isinstance(device_id, str) or not device_id:
        raise InvalidDeviceError("missing or empty 'id'", position=position)
    org_id = item.get("org_id")
    if not isinstance(org_id, str) or not org_id:
        raise InvalidDeviceError(f"device {device_id}: missing or empty 'org_id'", position=position)
    return device_id, org_id


def parse_device(raw: object, position: int | None = None, encoded: tuple[bytes, str] | None = None) -> Device:
    """Parse one DeviceResponse; raise InvalidDeviceError (with its position) if it is unusable.

    ``encoded``: :func:`encode` of ``raw`` when the caller already has it.
    """
    device_id, org_id = identify(raw, position)
    assert isinstance(raw, dict)
    storage = raw.get("metadata")
    if not isinstance(storage, dict):
        storage = {}
    lifecycle = []
    for field in LIFECYCLE_FIELDS:
        value = raw.get(field)
        if value is None:
            value = storage.get(field)
        try:
            lifecycle.append(None if value is None else utc_text(value))
        except ValueError as exc:
            raise InvalidDeviceError(f"device {device_id}: '{field}' {exc}", position=position) from None
    try:
        name = normalise_name(raw.get("name"))
    except ValueError as exc:
        raise InvalidDeviceError(f"device {device_id}: 'name' {exc}", position=position) from None
    payload, digest = encoded or encode(raw)
    return Device(
        id=device_id,
        org_id=org_id,
        integration_id=_optional_str(raw.get("integration_id")),
        zone_id=_optional_str(raw.get("zone_id")),
        external_id=_optional_str(raw.get("external_id")),
        name=name,
        device_metadata=raw.get("device_metadata"),
        lifecycle=tuple(lifecycle),
        raw=raw,
        raw_json=payload.decode(),
        fingerprint=digest,
    )


def normalise_name(value: object) -> dict[str, str]:
    """Turn any accepted LocalizedString shape into a plain ``{locale: text}`` map."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {UNDETERMINED_LOCALE: value}
    if isinstance(value, dict):
        inner = value.get("value")
        if isinstance(inner, dict) and len(value) == 1:
            value = inner
        for locale, text in value.items():
            if not (isinstance(locale, str) and isinstance(text, str)):
                break
        else:
            return dict(value)
    raise ValueError(f"is not a localized string: {_preview(value)}")


def parse_timestamp(value: object) -> datetime | None:
    """Parse an RFC 3339 timestamp to an aware UTC datetime (naive input is taken as UTC)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"is not a timestamp: {_preview(value)}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"is not a timestamp: {_preview(value)}") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def utc_text(value: object) -> str | None:
    """An RFC 3339 timestamp as canonical UTC text, ``YYYY-MM-DD HH:MM:SS.ffffff`` (naive input is
    taken as UTC). This is how SQLite stores timestamps, and it sorts in time order."""
    # "YYYY-MM-DDTHH:MM:SS.ffffffZ", UTC with microseconds already (OpenApp's own form): check it,
    # then only swap the separator. (Cheaper than a regular expression; this runs twice a device.)
    if isinstance(value, str) and len(value) == 27 and value[26] == "Z" and value[4:20:3] == "--T::.":
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"is not a timestamp: {_preview(value)}") from None
        return value.replace("T", " ", 1)[:26]
    moment = parse_timestamp(value)
    return None if moment is None else moment.replace(tzinfo=None).isoformat(" ", "microseconds")


def _optional_str(value: object) -> str | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else str(value)


def _preview(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


EDITABLE_FIELDS = ("name", "zone_id", "external_id", "device_metadata")


def validate_edit(action: object, payload: object) -> str | None:
    """What is wrong with a queued edit (one line), or None when it can be pushed as it is."""
    if action == "restore":
        if payload not in (None, {}):
            return "a restore takes no payload"
        return None
    if action != "update":
        return f"unknown action {action!r} (use 'update' or 'restore')"
    if isinstance(payload, str):
        return f"payload is not a JSON object: {_preview(payload)}"
    if not isinstance(payload, dict) or not payload:
        return "an update needs a payload object with at least one of: " + ", ".join(EDITABLE_FIELDS)
    unknown = sorted(set(payload) - set(EDITABLE_FIELDS))
    if unknown:
        return f"unknown field(s) {', '.join(unknown)} (editable: {', '.join(EDITABLE_FIELDS)})"
    if "name" in payload:
        try:
            if not normalise_name(payload["name"]):
                return "name must not be empty"
        except ValueError as exc:
            return f"name {exc}"
    for field in ("zone_id", "external_id"):
        if field in payload and payload[field] is not None and not isinstance(payload[field], str):
            return f"{field} must be a string or null, got {_preview(payload[field])}"
    return None


def edit_applied(device: Device, action: str, payload: dict[str, Any] | None) -> bool:
    """Whether ``device`` (as OpenApp has it now) already shows the edit."""
    if action == "restore":
        return device.deleted_at is None
    for field, wanted in (payload or {}).items():
        if field == "name":
            if device.name != normalise_name(wanted):
                return False
        elif getattr(device, field) != wanted:
            return False
    return True


def remote_values(device: Device, payload: dict[str, Any] | None) -> dict[str, Any]:
    """OpenApp's current values of the fields an edit sets (shown next to the edit on a conflict)."""
    values: dict[str, Any] = {field: getattr(device, field) for field in (payload or {})}
    values["updated_at"] = device.updated_at.isoformat() if device.updated_at else None
    return values


def change_kind(old_state: str, new_state: str) -> str:
    """The device_changes kind for a rewrite from ``old_state`` to ``new_state``."""
    if old_state == new_state:
        return "updated"
    return "deleted" if new_state == "deleted" else "restored"


def describe_change(old: dict[str, Any], new: dict[str, Any], old_state: str, new_state: str) -> dict[str, Any]:
    """``{field: {"old": ..., "new": ...}}`` for every top-level payload field that changed."""
    diff = {
        key: {"old": old.get(key), "new": new.get(key)}
        for key in sorted((old.keys() | new.keys()) - VOLATILE_FIELDS)
        if old.get(key) != new.get(key)
    }
    if old_state != new_state:
        diff["state"] = {"old": old_state, "new": new_state}
    return diff
