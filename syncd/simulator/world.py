"""The simulator's in-memory OpenApp: organisations, devices and the Devices operations.

Everything here is plain Python guarded by one lock; :mod:`syncd.simulator.server` puts HTTP in
front of it. Tests call these methods directly to change the world between (or during) passes.
"""

from __future__ import annotations

import bisect
import random
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

NameStyle = Literal["value", "map", "string", "mixed"]
TimestampStyle = Literal["top", "metadata", "both"]
CredentialsStyle = Literal["list", "bool"]  # credentials_set: the SDK's JSON Pointers, or an older boolean
RestrictionsKey = Literal["apartment_entity_ids", "listing_entity_ids"]  # public spec / the SDK's newer models
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
KINDS = ("door_controller", "gate", "intercom", "camera", "virtual_access_portal", "lock")
PROVIDERS = ("shelly_cloud", "akuvox", "go2rtc", "openapp_virtual")
WORDS = ("Front", "Back", "North", "South", "East", "West", "Main", "Side", "Garage", "Lobby", "Roof", "Yard")
# Each provider's JSON Schema of device_metadata (what get_device_metadata_definition serves). Fields
# with "format": "password" are write-only credentials: stored, never returned, named in credentials_set.
_KIND = {"type": "string", "enum": list(KINDS)}
PROVIDER_SCHEMAS: dict[str, dict[str, Any]] = {
    "shelly_cloud": {
        "type": "object",
        "properties": {
            "kind": _KIND,
            "provider": {"const": "shelly_cloud"},
            "relay": {"type": "integer", "minimum": 0, "maximum": 3},
            "auth_key": {"type": "string", "format": "password", "writeOnly": True},
        },
        "required": ["kind", "provider"],
        "additionalProperties": False,
    },
    "akuvox": {
        "type": "object",
        "properties": {
            "kind": _KIND,
            "provider": {"const": "akuvox"},
            "room": {"type": "string", "maxLength": 32},
            "sip_password": {"type": "string", "format": "password", "writeOnly": True},
        },
        "required": ["kind", "provider"],
        "additionalProperties": False,
    },
    "go2rtc": {
        "type": "object",
        "properties": {
            "kind": _KIND,
            "provider": {"const": "go2rtc"},
            "channel": {"type": "string", "pattern": "^cam[0-9]+$"},
            "stream_password": {"type": "string", "format": "password", "writeOnly": True},
        },
        "required": ["kind", "provider"],
        "additionalProperties": False,
    },
    "openapp_virtual": {
        "type": "object",
        "properties": {
            "kind": _KIND,
            "provider": {"const": "openapp_virtual"},
            "label": {"type": "string"},
            "webhook_secret": {"type": "string", "format": "password", "writeOnly": True},
        },
        "required": ["kind", "provider"],
        "additionalProperties": False,
    },
}
# What each provider's integrations hold (the shape of device_metadata depends on the provider).
PROVIDER_KINDS = {
    "shelly_cloud": ("door_controller", "gate", "lock"),
    "akuvox": ("intercom", "door_controller"),
    "go2rtc": ("camera",),
    "openapp_virtual": ("virtual_access_portal",),
}
CREDENTIAL_FIELDS = {
    provider: tuple(k for k, v in schema["properties"].items() if v.get("format") == "password")
    for provider, schema in PROVIDER_SCHEMAS.items()
}
THINGS = {
    "door_controller": "door",
    "gate": "gate",
    "intercom": "intercom",
    "camera": "camera",
    "virtual_access_portal": "portal",
    "lock": "lock",
}


class SimError(Exception):
    """An error answer: HTTP status plus an ApiErrorResponse body."""

    def __init__(self, status: int, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


def make_ulid(millis: int, rng: random.Random) -> str:
    """A ULID from a millisecond timestamp and 80 random bits."""
    value = (millis << 80) | rng.getrandbits(80)
    return "".join(CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def org_id_for(index: int) -> str:
    """Deterministic org ids: 01HORG00000000000000000000, ...01, ..."""
    return f"01HORG{index:020d}"


def is_seeded_org(org_id: str) -> bool:
    """Whether ``org_id`` is one :meth:`World.seed` gives (:func:`org_id_for`)."""
    return len(org_id) == 26 and org_id.startswith("01HORG") and org_id[6:].isdigit()


def iso(moment: datetime | None) -> str | None:
    """RFC 3339 with microseconds and Z, as the server sends it."""
    return None if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class SimDevice:
    """One device as OpenApp holds it."""

    id: str
    org_id: str
    integration_id: str
    kind: str
    name: dict[str, str]
    external_id: str | None
    zone_id: str | None
    device_metadata: dict[str, Any] | None  # what is returned (None: none): write-only credentials kept apart
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None
    credentials: dict[str, str] = field(default_factory=dict)  # write-only: never returned
    restrictions: list[str] = field(default_factory=list)  # door restrictions (virtual_access_portal only)


@dataclass
class SimOrg:
    """One organisation: its devices and their ids in sorted (list) order."""

    id: str
    integrations: list[str]
    zones: list[str]
    providers: dict[str, str] = field(default_factory=dict)  # integration id -> provider type
    ids: list[str] = field(default_factory=list)
    devices: dict[str, SimDevice] = field(default_factory=dict)


class World:
    """All organisations, the API keys that may see them, and the Devices operations."""

    def __init__(
        self,
        seed: int = 0,
        name_style: NameStyle = "value",
        timestamps: TimestampStyle = "both",
        credentials_style: CredentialsStyle = "list",
        restrictions_key: RestrictionsKey = "listing_entity_ids",
    ) -> None:
        self.lock = threading.RLock()
        self.rng = random.Random(seed)
        self.name_style = name_style
        self.timestamps = timestamps
        self.credentials_style = credentials_style
        self.restrictions_key = restrictions_key
        self.orgs: dict[str, SimOrg] = {}
        self.keys: dict[str, frozenset[str] | None] = {}  # key -> orgs it may use (None: all)
        self._cache: dict[str, bytes] = {}
        self._last_change = EPOCH
        self._scan_hooks: list[tuple[str, int, Callable[[World], None]]] = []

    # -- setup -----------------------------------------------------------------------------

    def add_key(self, key: str, orgs: Iterable[str] | None = None) -> None:
        """Accept ``key``; limited to ``orgs`` when given."""
        self.keys[key] = frozenset(orgs) if orgs is not None else None

    def add_org(self, org_id: str, integrations: int = 4, zones: int = 5) -> SimOrg:
        """Create an empty organisation with some integrations (of the providers in turn) and zones."""
        with self.lock:
            integration_ids = [make_ulid(self._millis(EPOCH), self.rng) for _ in range(integrations)]
            org = SimOrg(
                org_id,
                integrations=integration_ids,
                zones=[make_ulid(self._millis(EPOCH), self.rng) for _ in range(zones)],
                providers={i: PROVIDERS[n % len(PROVIDERS)] for n, i in enumerate(integration_ids)},
            )
            self.orgs[org_id] = org
            return org

    def seed(
        self, orgs: int, devices_per_org: int, deleted_fraction: float = 0.05, portal_fraction: float | None = None
    ) -> list[str]:
        """Fill the world with deterministic data; returns the org ids. ``portal_fraction``: the share
        of devices that are portals, exactly, evenly spread (default: as many as of each other provider)."""
        ids = []
        for o in range(orgs):
            org = self.add_org(org_id_for(o))
            for i in range(devices_per_org):
                created = EPOCH + timedelta(seconds=i * 37 + o)
                portal = None if portal_fraction is None else int((i + 1) * portal_fraction) > int(i * portal_fraction)
                device = self._new_device(org, created, index=i, portal=portal)
                if self.rng.random() < deleted_fraction:
                    device.deleted_at = created + timedelta(days=30)
                    device.updated_at = device.deleted_at
                self._store(org, device)
            ids.append(org.id)
            for device in org.devices.values():  # render once now, so serving measures serving
                self._bytes(device, True)
        return ids

    def _new_device(
        self, org: SimOrg, created: datetime, index: int | None = None, portal: bool | None = None
    ) -> SimDevice:
        """A random device; ``portal``: whether it is a portal (None: any integration, at random)."""
        rng = self.rng
        pool = [i for i in org.integrations if portal is None or (org.providers[i] == "openapp_virtual") == portal]
        pool = pool or org.integrations
        integration = pool[rng.randrange(len(pool))]
        provider = org.providers[integration]
        kinds = PROVIDER_KINDS[provider]
        kind = kinds[rng.randrange(len(kinds))]
        number = index if index is not None else rng.randrange(10**6)
        label = f"{WORDS[rng.randrange(len(WORDS))]} {THINGS[kind]} {number}"
        name = {"en": label}
        if rng.random() < 0.3:
            name["de"] = label.replace("door", "Tür").replace("gate", "Tor")
        metadata: dict[str, Any] = {"kind": kind, "provider": provider}
        if provider == "go2rtc":
            metadata["channel"] = f"cam{rng.randrange(64)}"
        restrictions = []
        if kind == "virtual_access_portal":
            restrictions = [make_ulid(self._millis(created), rng) for _ in range(rng.randrange(3))]
        credentials = {}
        if rng.random() < 0.5:
            credentials[CREDENTIAL_FIELDS[provider][0]] = f"secret-{rng.getrandbits(32):08x}"
        return SimDevice(
            id=make_ulid(self._millis(created), rng),
            org_id=org.id,
            integration_id=integration,
            kind=kind,
            name=name,
            external_id=f"ext-{rng.getrandbits(40):010x}" if rng.random() < 0.7 else None,
            zone_id=org.zones[rng.randrange(len(org.zones))] if rng.random() < 0.8 else None,
            device_metadata=metadata,
            created_at=created,
            updated_at=created,
            credentials=credentials,
            restrictions=restrictions,
        )

    @staticmethod
    def _millis(moment: datetime) -> int:
        return int(moment.timestamp() * 1000)

    # -- reading -----------------------------------------------------------------------------

    def authorise(self, key: str | None, org_id: str | None) -> None:
        """401 for an unknown key, 403 for an org the key may not use, 400 without X-Org."""
        if not key or key not in self.keys:
            raise SimError(401, "Missing or invalid API key", "unauthorized")
        if org_id is None:
            raise SimError(400, "X-Org header is required", "missing_org")
        allowed = self.keys[key]
        if org_id not in self.orgs or (allowed is not None and org_id not in allowed):
            raise SimError(403, f"API key has no access to organization {org_id}", "forbidden")

    def list_devices(
        self,
        org_id: str,
        *,
        include_deleted: bool,
        only_deleted: bool,
        include_metadata: bool,
        limit: int,
        offset: int,
        filters: dict[str, Any] | None = None,
    ) -> bytes:
        """One page of list_devices as a JSON array, ordered by id."""
        with self.lock:
            self._run_scan_hooks(org_id, offset)
            org = self.orgs[org_id]
            if only_deleted:
                include_deleted = True
            if include_deleted and not only_deleted and not filters:
                ids = org.ids[offset : offset + limit]
            else:
                matching = (
                    i
                    for i in org.ids
                    if self._visible(org.devices[i], include_deleted, only_deleted)
                    and self._matches(org.devices[i], filters or {})
                )
                ids = [i for n, i in enumerate(matching) if offset <= n < offset + limit]
            return b"[" + b",".join(self._bytes(org.devices[i], include_metadata) for i in ids) + b"]"

    def get_device(self, org_id: str, device_id: str, include_deleted: bool, include_metadata: bool) -> bytes:
        """get_device; a device of another org is as unknown as a purged one (404)."""
        with self.lock:
            device = self._find(org_id, device_id)
            if device.deleted_at is not None and not include_deleted:
                raise SimError(404, f"Device {device_id} not found", "not_found")
            return self._bytes(device, include_metadata)

    def device(self, org_id: str, device_id: str) -> dict[str, Any]:
        """The device as the API would render it (include_metadata=true), for test assertions."""
        with self.lock:
            return dict(orjson.loads(self._bytes(self._find(org_id, device_id), True)))

    def ground_truth(self, org_id: str) -> list[dict[str, Any]]:
        """Every device of an org, soft-deleted ones included, rendered as the API sends them."""
        with self.lock:
            org = self.orgs[org_id]
            return [orjson.loads(self._bytes(org.devices[i], True)) for i in org.ids]

    def ids(self, org_id: str) -> list[str]:
        """Current device ids of an org, sorted."""
        with self.lock:
            return list(self.orgs[org_id].ids)

    # -- changing ----------------------------------------------------------------------------

    def create_device(self, org_id: str, body: dict[str, Any] | None = None, *, before: str | None = None) -> str:
        """Create a device; returns its id. Without ``body`` (tests, the demo) its content is random;
        with one (create_device over HTTP) it is what the request says, checked as OpenApp would.

        ``before``: give it an id that sorts before that id, so it lands ahead of a running scan.
        """
        with self.lock:
            org = self.orgs[org_id]
            now = self._tick()
            device = self._new_device(org, now) if body is None else self._device_from_request(org, body, now)
            if before is not None:
                floor = self._millis(EPOCH)
                ceiling = max(floor, _ulid_millis(before) - 1)
                device.id = make_ulid(self.rng.randint(floor, ceiling), self.rng)
            self._store(org, device)
            return device.id

    def _device_from_request(self, org: SimOrg, body: dict[str, Any], now: datetime) -> SimDevice:
        missing = [k for k in ("org_id", "name", "integration_id") if k not in body]
        if missing:
            raise SimError(422, f"missing required field(s): {', '.join(missing)}", "invalid_body")
        if body["integration_id"] not in org.integrations:
            raise SimError(422, f"Unknown integration {body['integration_id']}", "unknown_integration")
        external_id = body.get("external_id")
        if external_id is not None and not isinstance(external_id, str):
            raise SimError(422, "external_id must be a string or null", "invalid_field")
        zone_id = body.get("zone_id")
        if zone_id is not None and zone_id not in org.zones:
            raise SimError(422, f"Unknown zone {zone_id}", "unknown_zone")
        metadata = body.get("device_metadata")
        visible: dict[str, Any] | None = None
        credentials: dict[str, str] = {}
        if metadata is not None:
            visible, credentials = _split_credentials(metadata, {}, org.providers[body["integration_id"]])
        return SimDevice(
            id=make_ulid(self._millis(now), self.rng),
            org_id=org.id,
            integration_id=body["integration_id"],
            kind=str((visible or {}).get("kind", "unknown")),
            name=_localized(body["name"]),
            external_id=external_id,
            zone_id=zone_id,
            device_metadata=visible,
            created_at=now,
            updated_at=now,
            credentials=credentials,
        )

    def update_device(self, org_id: str, device_id: str, changes: dict[str, Any]) -> bytes:
        """update_device: apply the given UpdateDeviceRequest fields (plus zone_id, as the live API does).

        Unknown fields are ignored; ``updated_at`` moves only when something changed. In
        ``device_metadata`` a credential field (``format: password``) left out keeps its value and
        ``null`` clears it.
        """
        with self.lock:
            device = self._find(org_id, device_id)
            if not isinstance(changes, dict):
                raise SimError(400, "Request body must be a JSON object", "invalid_body")
            before = (device.name, device.external_id, device.zone_id, device.device_metadata, device.credentials)
            if "name" in changes and changes["name"] is not None:
                device.name = _localized(changes["name"])
            if "external_id" in changes:
                value = changes["external_id"]
                if value is not None and not isinstance(value, str):
                    raise SimError(422, "external_id must be a string or null", "invalid_field")
                device.external_id = value
            if "zone_id" in changes:
                value = changes["zone_id"]
                if value is not None and value not in self.orgs[org_id].zones:
                    raise SimError(422, f"Unknown zone {value}", "unknown_zone")
                device.zone_id = value
            if "device_metadata" in changes:
                device.device_metadata, device.credentials = _split_credentials(
                    changes["device_metadata"], device.credentials, self.orgs[org_id].providers[device.integration_id]
                )
                device.kind = str(device.device_metadata.get("kind", device.kind))  # checked: it has one
            if (device.name, device.external_id, device.zone_id, device.device_metadata, device.credentials) != before:
                self._changed(device)
            return self._bytes(device, True)

    def delete_device(self, org_id: str, device_id: str) -> bytes:
        """Soft delete (repeating it changes nothing)."""
        with self.lock:
            device = self._find(org_id, device_id)
            if device.deleted_at is None:
                device.deleted_at = self._tick()
                self._changed(device, device.deleted_at)
            return self._bytes(device, True)

    def restore_device(self, org_id: str, device_id: str) -> bytes:
        """Undo a soft delete; 422 if the device is not soft-deleted."""
        with self.lock:
            device = self._find(org_id, device_id)
            if device.deleted_at is None:
                raise SimError(422, f"Device {device_id} is not soft-deleted", "not_soft_deleted")
            device.deleted_at = None
            self._changed(device)
            return self._bytes(device, True)

    def purge_device(self, org_id: str, device_id: str) -> bytes:
        """Hard delete: the device vanishes from lists and GET answers 404."""
        with self.lock:
            device = self._find(org_id, device_id)
            body = self._bytes(device, True)
            org = self.orgs[org_id]
            del org.devices[device_id]
            org.ids.pop(bisect.bisect_left(org.ids, device_id))
            self._cache.pop(device_id, None)
            return body

    def door_restrictions(self, device_id: str) -> bytes:
        """get_door_restrictions: only for virtual_access_portal devices (the spec asks for no org)."""
        with self.lock:
            device = self._portal(next((o.id for o in self.orgs.values() if device_id in o.devices), None), device_id)
            return orjson.dumps({self.restrictions_key: list(device.restrictions)})

    def set_door_restrictions(self, org_id: str, device_id: str, body: Any) -> bytes:
        """PUT door-restrictions (the SDK's set_door_restrictions; not in the public spec). Either body key
        is taken; the answer uses this world's. The device itself does not change."""
        with self.lock:
            device = self._portal(org_id, device_id)
            ids = body.get("listing_entity_ids", body.get("apartment_entity_ids")) if isinstance(body, dict) else None
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise SimError(422, f"{self.restrictions_key} must be a list of entity ids", "invalid_body")
            device.restrictions = list(dict.fromkeys(ids))
            return orjson.dumps({self.restrictions_key: list(device.restrictions)})

    def _portal(self, org_id: str | None, device_id: str) -> SimDevice:
        device = self.orgs[org_id].devices.get(device_id) if org_id in self.orgs else None
        if device is None:
            raise SimError(404, f"Device {device_id} not found", "not_found")
        if device.kind != "virtual_access_portal":
            raise SimError(400, "Door restrictions exist only for virtual_access_portal devices", "wrong_kind")
        return device

    def metadata_definition(self, org_id: str, device_id: str) -> bytes:
        """get_device_metadata_definition: the provider's JSON Schema of device_metadata, the data
        (without write-only fields) and which credentials are set."""
        with self.lock:
            device = self._find(org_id, device_id)
            provider = self.orgs[org_id].providers[device.integration_id]
            schema = PROVIDER_SCHEMAS[provider]
            return orjson.dumps(
                {
                    "provider_type": provider,
                    "schema": schema,
                    "data": device.device_metadata,
                    "credentials_set": self._credentials_set(device),
                }
            )

    def during_scan(self, org_id: str, at_offset: int, action: Callable[[World], None]) -> None:
        """Run ``action`` once, just before serving the list page of ``org_id`` at ``at_offset``."""
        with self.lock:
            self._scan_hooks.append((org_id, at_offset, action))

    # -- internals ---------------------------------------------------------------------------

    def _run_scan_hooks(self, org_id: str, offset: int) -> None:
        due = [h for h in self._scan_hooks if h[0] == org_id and h[1] == offset]
        for hook in due:
            self._scan_hooks.remove(hook)
            hook[2](self)

    def _find(self, org_id: str, device_id: str) -> SimDevice:
        device = self.orgs[org_id].devices.get(device_id)
        if device is None:
            raise SimError(404, f"Device {device_id} not found", "not_found")
        return device

    def _store(self, org: SimOrg, device: SimDevice) -> None:
        if device.id in org.devices:
            raise SimError(409, f"Device {device.id} exists", "conflict")
        org.devices[device.id] = device
        bisect.insort(org.ids, device.id)

    def _tick(self) -> datetime:
        """Now, but strictly later than the previous change, so updated_at always moves."""
        now = datetime.now(UTC)
        if now <= self._last_change:
            now = self._last_change + timedelta(microseconds=1)
        self._last_change = now
        return now

    def _changed(self, device: SimDevice, at: datetime | None = None) -> None:
        device.updated_at = at or self._tick()
        self._cache.pop(device.id, None)

    @staticmethod
    def _visible(device: SimDevice, include_deleted: bool, only_deleted: bool) -> bool:
        if only_deleted:
            return device.deleted_at is not None
        return include_deleted or device.deleted_at is None

    @staticmethod
    def _matches(device: SimDevice, filters: dict[str, Any]) -> bool:
        if filters.get("integration_id") and device.integration_id != filters["integration_id"]:
            return False
        if filters.get("device_kind") and device.kind != filters["device_kind"]:
            return False
        if filters.get("external_id") and device.external_id != filters["external_id"]:
            return False
        if filters.get("q"):
            needle = str(filters["q"]).lower()
            if not any(needle in text.lower() for text in device.name.values()):
                return False
        if filters.get("has_external_id") and not device.external_id:
            return False
        return not (filters.get("has_go2rtc_channel") and not (device.device_metadata or {}).get("channel"))

    def _bytes(self, device: SimDevice, include_metadata: bool) -> bytes:
        if include_metadata:
            cached = self._cache.get(device.id)
            if cached is None:
                cached = self._cache[device.id] = orjson.dumps(self._render(device, True))
            return cached
        return orjson.dumps(self._render(device, False))

    def _render(self, device: SimDevice, include_metadata: bool) -> dict[str, Any]:
        stamps = {
            "created_at": iso(device.created_at),
            "updated_at": iso(device.updated_at),
            "deleted_at": iso(device.deleted_at),
            "purge_at": None,
            "hard_delete_at": None,
        }
        body: dict[str, Any] = {
            "id": device.id,
            "org_id": device.org_id,
            "integration_id": device.integration_id,
            "name": self._render_name(device),
            "external_id": device.external_id,
            "device_metadata": device.device_metadata,
            # Fields the live server sends ahead of the public spec (CONTRACT.md §8).
            "zone_id": device.zone_id,
            "credentials_set": self._credentials_set(device),
            "is_primary_instance": True,
        }
        if self.timestamps in ("top", "both"):
            body.update(stamps)
        if include_metadata and self.timestamps in ("metadata", "both"):
            body["metadata"] = {k: v for k, v in stamps.items() if v is not None}
        return body

    def _credentials_set(self, device: SimDevice) -> Any:
        """JSON Pointers to the credential fields holding a value (the SDK's form), or an older boolean."""
        if self.credentials_style == "bool":
            return bool(device.credentials)
        return [f"/{name}" for name in sorted(device.credentials)]

    def _render_name(self, device: SimDevice) -> Any:
        style: str = self.name_style
        if style == "mixed":
            style = ("value", "map", "string")[sum(map(ord, device.id[-3:])) % 3]
        if style == "string":
            return device.name.get("en") or next(iter(device.name.values()), "")
        if style == "map":
            return dict(device.name)
        return {"value": dict(device.name)}


def _localized(value: Any) -> dict[str, str]:
    if isinstance(value, str):
        return {"en": value}
    if isinstance(value, dict):
        inner = value.get("value", value)
        if isinstance(inner, dict) and inner and all(isinstance(v, str) for v in inner.values()):
            return {str(k): v for k, v in inner.items()}
    raise SimError(422, "name must be a localized string map", "invalid_field")


def _split_credentials(
    metadata: object, stored: dict[str, str], provider: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """``(visible metadata, credentials)`` after a write, checked against the provider's schema
    (422 naming the problem): the credential fields leave the metadata; a string sets one,
    ``null`` clears it, and one left out keeps its stored value."""
    if not isinstance(metadata, dict):
        raise SimError(422, "device_metadata must be a JSON object", "invalid_field")
    fields = CREDENTIAL_FIELDS[provider]
    given = {k: v for k, v in metadata.items() if not (k in fields and v is None)}  # null: clear it
    problem = _schema_problem(PROVIDER_SCHEMAS[provider], given, "device_metadata")
    if problem:
        raise SimError(422, problem, "invalid_metadata")
    credentials = dict(stored)
    for name in fields:
        if name in metadata:
            value = metadata[name]
            if value is None:
                credentials.pop(name, None)
            elif isinstance(value, str):
                credentials[name] = value
            else:
                raise SimError(422, f"device_metadata.{name} must be a string or null", "invalid_field")
    return {k: v for k, v in metadata.items() if k not in fields}, credentials


def _schema_problem(schema: dict[str, Any], value: Any, where: str) -> str | None:
    """What keeps ``value`` from the JSON Schema ``schema``, or None. The keywords the providers'
    schemas use: type (object, string, integer), properties, required, additionalProperties
    false, enum, const, minimum, maximum, maxLength, pattern."""
    if "const" in schema and value != schema["const"]:
        return f"{where} must be {schema['const']!r}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {', '.join(map(str, schema['enum']))}"
    check = _TYPE_PROBLEMS.get(schema.get("type"))
    return check(schema, value, where) if check is not None else None


def _object_problem(schema: dict[str, Any], value: Any, where: str) -> str | None:
    if not isinstance(value, dict):
        return f"{where} must be an object"
    missing = [k for k in schema.get("required", ()) if k not in value]
    if missing:
        return f"{where} lacks {', '.join(missing)}"
    properties = schema.get("properties", {})
    for key, item in value.items():
        if key in properties:
            problem = _schema_problem(properties[key], item, f"{where}.{key}")
            if problem:
                return problem
        elif schema.get("additionalProperties") is False:
            return f"{where}.{key} is not a field of this provider"
    return None


def _string_problem(schema: dict[str, Any], value: Any, where: str) -> str | None:
    if not isinstance(value, str):
        return f"{where} must be a string"
    if len(value) > schema.get("maxLength", len(value)):
        return f"{where} is longer than {schema['maxLength']}"
    if "pattern" in schema and not re.search(schema["pattern"], value):
        return f"{where} must match {schema['pattern']}"
    return None


def _integer_problem(schema: dict[str, Any], value: Any, where: str) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{where} must be an integer"
    if not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        return f"{where} must be within {schema.get('minimum')}..{schema.get('maximum')}"
    return None


_TYPE_PROBLEMS: dict[Any, Callable[[dict[str, Any], Any, str], str | None]] = {
    "object": _object_problem,
    "string": _string_problem,
    "integer": _integer_problem,
}


def _ulid_millis(ulid: str) -> int:
    value = 0
    for char in ulid[:10]:
        value = value * 32 + CROCKFORD.index(char)
    return value
