"""The kinds of local edit, each in one class: what its payload may hold, what it reads of
OpenApp before pushing, how to tell it is already done there, what counts as a conflicting remote
change, how it is pushed, and how it is described (README, "Write-back").

Creating and purging devices are not edits, on purpose: a mirror does not invent or destroy devices.

Conflicts are decided field by field: when an edit is queued its ``base`` records the mirror's
values of the fields it sets; at push time it conflicts only where OpenApp's value differs from
both the base and the edit's own value (so a change of another field, or OpenApp already showing
this very edit, is no conflict).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from syncd.api import OpenAppClient
from syncd.errors import ConfigError, InvalidResponseError, RejectedError
from syncd.models import (
    ID_LENGTH,
    MAX_NESTING,
    MAX_RESTRICTED_ENTITIES,
    PORTAL_KIND,
    Device,
    DoorRestrictions,
    check_device_id,
    normalise_name,
    nul_path,
    parse_device,
    preview,
    same_json,
    utcnow,
)
from syncd.store import Store
from syncd.store.details import DefinitionAnswer, MetadataDefinitions, PortalRestrictions
from syncd.store.edits import EditQueue

EDITABLE_FIELDS = ("name", "zone_id", "external_id", "device_metadata")
MAX_EDIT_BYTES = 1024 * 1024  # an edit larger than this is a mistake, not a device
REDACTED = "********"  # what a credential value becomes in device_edits once pushed, and in any output
DEFINITION_MAX_AGE = timedelta(days=1)  # an older mirrored schema is asked again before a metadata edit


@dataclass
class Remote:
    """What OpenApp has now, as far as an edit needs it."""

    device: Device
    restrictions: DoorRestrictions | None = None  # door_restrictions edits
    schema: dict[str, Any] | bool | None = None  # update edits that set device_metadata
    credentials: frozenset[str] = frozenset()  # JSON Pointers of the schema's write-only fields


@dataclass
class Outcome:
    """What a push left in OpenApp, for the mirror."""

    device: Device
    restrictions: DoorRestrictions | None = None


@dataclass
class Reading:
    """What a kind may use to read OpenApp and the mirror before a push."""

    client: OpenAppClient
    store: Store
    org_id: str
    device_id: str
    restrictions_key: str = "auto"
    notes: list[str] = field(default_factory=list)


class EditProblem(Exception):
    """The edit cannot be pushed as it is: it fails, nothing is sent (the message says why)."""


class EditKind:
    """One kind of edit; subclasses are stateless."""

    action: ClassVar[str]
    usage: ClassVar[str]  # the payload, for messages
    reads_device: ClassVar[bool] = True  # False: the kind's own read says whether the device exists

    def validate(self, payload: Any) -> str | None:
        """What is wrong with the payload (one line), or None."""
        if payload not in (None, {}):
            return f"a {self.action} takes no payload"
        return None

    def mirror_problem(self, device: Mapping[str, Any]) -> str | None:
        """Why the mirrored device cannot take this edit (checked when queued and before a push)."""
        return None

    def base(self, payload: Any, device: Mapping[str, Any], store: Store) -> dict[str, Any] | None:
        """The mirror's values of the fields the edit sets (recorded when it is queued)."""
        return None

    def read(self, payload: Any, remote: Remote, reading: Reading) -> Remote:
        """Read what else the edit needs of OpenApp (EditProblem: the edit cannot be pushed)."""
        return remote

    def applied(self, payload: Any, remote: Remote) -> bool:
        """Whether OpenApp already shows the edit."""
        raise NotImplementedError

    def conflicts(self, payload: Any, base: Any, remote: Remote) -> dict[str, dict[str, Any]]:
        """Per field that OpenApp changed away from both the base and the edit: base, remote, queued."""
        return {}

    def push(self, payload: Any, remote: Remote, reading: Reading) -> Outcome:
        """Send the edit; OpenApp's answer."""
        raise NotImplementedError

    def rebase(self, payload: Any, base: Any, remote: Remote) -> dict[str, tuple[Any, Any]]:
        """``{field: (value before, value now)}`` once the edit is applied, for later edits' bases."""
        return {}

    def stored(self, payload: Any, remote: Remote) -> Any:
        """What device_edits keeps of the payload once pushed (None: the payload as it is)."""
        return None

    def describe(self, payload: Any) -> str:
        """The edit in a few words, for the CLI and the log (never a credential value)."""
        return self.action


class Update(EditKind):
    """update_device: any of name, zone_id, external_id, device_metadata. ``device_metadata`` is
    checked against the provider's JSON Schema first; its write-only credential fields are kept
    when left out, and cleared only when named in ``clear_credentials``."""

    action = "update"
    usage = "any of name, zone_id, external_id, device_metadata (and clear_credentials)"

    def validate(self, payload: Any) -> str | None:
        if isinstance(payload, str):
            return f"payload is not a JSON object: {preview(payload)}"
        if isinstance(payload, dict) and "credentials_redacted" in payload:
            return "its credential values were redacted after it was pushed; queue a new edit instead"
        if isinstance(payload, dict):
            unknown = sorted(set(payload) - {*EDITABLE_FIELDS, "clear_credentials"})
            if unknown:
                names = ", ".join(preview(f) for f in unknown)
                return f"unknown field(s) {names} (editable: {', '.join(EDITABLE_FIELDS)})"
        if not isinstance(payload, dict) or not payload:
            return "an update needs a payload object with at least one of: " + ", ".join(EDITABLE_FIELDS)
        problem = _size_problem(payload)
        if problem:
            return problem
        if "name" in payload:
            try:
                if not normalise_name(payload["name"]):
                    return "name must not be empty"
            except ValueError as exc:
                return f"name {exc}"
        for name in ("zone_id", "external_id"):
            if name in payload and payload[name] is not None and not isinstance(payload[name], str):
                return f"{name} must be a string or null, got {preview(payload[name])}"
        if "zone_id" in payload and isinstance(payload["zone_id"], str) and len(payload["zone_id"]) > ID_LENGTH:
            return f"zone_id is longer than an id can be ({ID_LENGTH})"
        if "device_metadata" in payload and not isinstance(payload["device_metadata"], dict):
            return f"device_metadata must be a JSON object, got {preview(payload['device_metadata'])}"
        clear = payload.get("clear_credentials", [])
        if not isinstance(clear, list) or not all(isinstance(c, str) and c for c in clear):
            return "clear_credentials must be a list of credential field names (or JSON Pointers)"
        return None

    def base(self, payload: Any, device: Mapping[str, Any], store: Store) -> dict[str, Any] | None:
        return {name: device.get(name) for name in EDITABLE_FIELDS if name in payload}

    def read(self, payload: Any, remote: Remote, reading: Reading) -> Remote:
        if "device_metadata" not in payload and not payload.get("clear_credentials"):
            return remote
        schema = _schema(remote.device, reading)
        remote.schema = schema
        remote.credentials = frozenset(credential_pointers(schema))
        cleared = {_pointer(c) for c in payload.get("clear_credentials", [])}
        unknown = sorted(cleared - remote.credentials)
        if unknown:
            raise EditProblem(f"clear_credentials names {', '.join(unknown)}, not a credential field of this provider")
        metadata = payload.get("device_metadata")
        if metadata is not None:
            for pointer in sorted(remote.credentials):
                if _get(metadata, pointer) is None and _has(metadata, pointer) and pointer not in cleared:
                    raise EditProblem(
                        f"device_metadata{pointer} is null, which would clear a stored credential; "
                        "name it in clear_credentials (syncd edit --clear-credential) to mean it"
                    )
            problem = schema_problem(schema, _without(metadata, cleared), remote, cleared)
            if problem:
                raise EditProblem(problem)
        return remote

    def applied(self, payload: Any, remote: Remote) -> bool:
        device = remote.device
        for name, wanted in _settable(payload).items():
            if name == "device_metadata":
                if not same_json(device.device_metadata, _visible(wanted, remote.credentials)):
                    return False
                set_now = set(device.credentials_set) if isinstance(device.credentials_set, list) else set()
                given = {p for p in remote.credentials if _has(wanted, p) and _get(wanted, p) is not None}
                if not given <= set_now:
                    return False  # a credential value cannot be read back: only "set" can be seen
            elif not same_json(_field(device, name), _normal(name, wanted)):
                return False
        cleared = {_pointer(c) for c in payload.get("clear_credentials", [])}
        still_set = set(device.credentials_set) if isinstance(device.credentials_set, list) else set()
        return not cleared & still_set

    def conflicts(self, payload: Any, base: Any, remote: Remote) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for name, wanted in _settable(payload).items():
            if not isinstance(base, dict) or name not in base:
                continue
            queued = _visible(wanted, remote.credentials) if name == "device_metadata" else _normal(name, wanted)
            now, before = _field(remote.device, name), _normal(name, base[name])
            if not same_json(now, before) and not same_json(now, queued):
                found[name] = {"base": before, "remote": now, "queued": queued}
        return found

    def push(self, payload: Any, remote: Remote, reading: Reading) -> Outcome:
        body = {name: value for name, value in payload.items() if name in EDITABLE_FIELDS}
        cleared = [_pointer(c) for c in payload.get("clear_credentials", [])]
        if cleared:
            metadata = copy.deepcopy(body.get("device_metadata", remote.device.device_metadata or {}))
            for pointer in cleared:
                _put(metadata, pointer, None)
            body["device_metadata"] = metadata
        answer = reading.client.update_device(reading.org_id, reading.device_id, body)
        return Outcome(parse_device(answer))

    def rebase(self, payload: Any, base: Any, remote: Remote) -> dict[str, tuple[Any, Any]]:
        if not isinstance(base, dict):
            return {}
        moved = {}
        for name, wanted in _settable(payload).items():
            if name in base:
                moved[name] = (
                    base[name],
                    _visible(wanted, remote.credentials) if name == "device_metadata" else wanted,
                )
        return moved

    def stored(self, payload: Any, remote: Remote) -> Any:
        metadata = payload.get("device_metadata")
        if not isinstance(metadata, dict):
            return None
        present = sorted(p for p in remote.credentials if _has(metadata, p) and _get(metadata, p) is not None)
        if not present:
            return None
        kept = copy.deepcopy(metadata)
        for pointer in present:
            _put(kept, pointer, REDACTED)
        return {**payload, "device_metadata": kept, "credentials_redacted": present}

    def describe(self, payload: Any) -> str:
        if not isinstance(payload, dict):
            return "update"
        parts = [name for name in EDITABLE_FIELDS if name in payload]
        if payload.get("clear_credentials"):
            parts.append("clear " + ", ".join(map(str, payload["clear_credentials"])))
        return "update " + ", ".join(parts)


class Restore(EditKind):
    """restore_device: undo a soft delete. Already active counts as done."""

    action = "restore"
    usage = "no payload"

    def mirror_problem(self, device: Mapping[str, Any]) -> str | None:
        if device["state"] != "deleted":
            return f"it is not soft-deleted (state {device['state']}); nothing to restore"
        return None

    def applied(self, payload: Any, remote: Remote) -> bool:
        return remote.device.deleted_at is None

    def push(self, payload: Any, remote: Remote, reading: Reading) -> Outcome:
        try:
            answer = reading.client.restore_device(reading.org_id, reading.device_id)
        except RejectedError as exc:
            if exc.status != 422:
                raise
            confirmed = parse_device(reading.client.get_device(reading.org_id, reading.device_id))
            if confirmed.deleted_at is None:  # 422 "not soft-deleted": a retried restore that had landed
                return Outcome(confirmed)
            raise
        return Outcome(parse_device(answer))


class Delete(EditKind):
    """delete_device: a soft delete (OpenApp can restore it). Already soft-deleted counts as done;
    the reconciler holds deletes beyond ``writeback.max_deletes_per_hour``."""

    action = "delete"
    usage = "no payload"

    def mirror_problem(self, device: Mapping[str, Any]) -> str | None:
        if device["state"] == "deleted":
            return "it is already soft-deleted"
        return None

    def applied(self, payload: Any, remote: Remote) -> bool:
        return remote.device.deleted_at is not None

    def push(self, payload: Any, remote: Remote, reading: Reading) -> Outcome:
        return Outcome(parse_device(reading.client.delete_device(reading.org_id, reading.device_id)))


class DoorRestrictionsEdit(EditKind):
    """PUT door-restrictions of a virtual_access_portal: the whole list (``entity_ids``), or
    ``add`` / ``remove``, computed against OpenApp's own list at push time. Sent under the body key
    OpenApp answered with, unless ``writeback.door_restrictions_key`` forces one."""

    action = "door_restrictions"
    usage = '{"entity_ids": [...]} or {"add": [...], "remove": [...]}'
    # OpenApp's restrictions answer is 404 for a device that is gone and 400 for one that is no
    # portal, so the device is not read first: two requests per edit, not three.
    reads_device = False

    def validate(self, payload: Any) -> str | None:
        if not isinstance(payload, dict) or not payload:
            return f"door restrictions need a payload: {self.usage}"
        unknown = sorted(set(payload) - {"entity_ids", "add", "remove"})
        if unknown:
            return f"unknown field(s) {', '.join(preview(f) for f in unknown)} (use {self.usage})"
        if "entity_ids" in payload and ("add" in payload or "remove" in payload):
            return "give either entity_ids (the whole list) or add / remove, not both"
        for name in ("entity_ids", "add", "remove"):
            ids = payload.get(name, [])
            if not isinstance(ids, list):
                return f"{name} must be a list of entity ids"
            if len(ids) > MAX_RESTRICTED_ENTITIES:
                return f"{name} lists {len(ids)} entities, more than a portal may have ({MAX_RESTRICTED_ENTITIES})"
            for entity_id in ids:
                if not (isinstance(entity_id, str) and 0 < len(entity_id) <= ID_LENGTH and entity_id.isprintable()):
                    return f"{name} holds {preview(entity_id)}, which is not an entity id"
        if set(payload.get("add", [])) & set(payload.get("remove", [])):
            return "an entity id is both added and removed"
        return None

    def mirror_problem(self, device: Mapping[str, Any]) -> str | None:
        metadata = device.get("device_metadata")
        kind = metadata.get("kind") if isinstance(metadata, dict) else None
        if kind != PORTAL_KIND:
            return f"door restrictions exist only for {PORTAL_KIND} devices; this one is {preview(kind)}"
        if device["state"] != "active":
            return f"the portal is {device['state']}"
        return None

    def base(self, payload: Any, device: Mapping[str, Any], store: Store) -> dict[str, Any] | None:
        if "entity_ids" not in payload:
            return None  # add / remove are computed against OpenApp's list when pushed
        return {"entity_ids": PortalRestrictions(store).entities(str(device["id"]))}

    def read(self, payload: Any, remote: Remote, reading: Reading) -> Remote:
        metadata = remote.device.device_metadata
        kind = metadata.get("kind") if isinstance(metadata, dict) else None
        if kind != PORTAL_KIND:
            raise EditProblem(f"door restrictions exist only for {PORTAL_KIND} devices; OpenApp says {preview(kind)}")
        remote.restrictions = reading.client.get_door_restrictions(reading.org_id, reading.device_id)
        return remote

    def applied(self, payload: Any, remote: Remote) -> bool:
        assert remote.restrictions is not None
        return list(remote.restrictions.entity_ids) == self.target(payload, remote)

    def conflicts(self, payload: Any, base: Any, remote: Remote) -> dict[str, dict[str, Any]]:
        if "entity_ids" not in payload or not isinstance(base, dict) or "entity_ids" not in base:
            return {}
        assert remote.restrictions is not None
        now, before, queued = (
            list(remote.restrictions.entity_ids),
            sorted(base["entity_ids"]),
            self.target(payload, remote),
        )
        if now not in (before, queued):
            return {"entity_ids": {"base": before, "remote": now, "queued": queued}}
        return {}

    def push(self, payload: Any, remote: Remote, reading: Reading) -> Outcome:
        assert remote.restrictions is not None
        target = self.target(payload, remote)
        key = remote.restrictions.key if reading.restrictions_key == "auto" else reading.restrictions_key
        answer = reading.client.set_door_restrictions(reading.org_id, reading.device_id, key, target)
        if list(answer.entity_ids) != target:
            raise InvalidResponseError(
                f"set_door_restrictions: asked for {len(target)} entities, the answer lists {len(answer.entity_ids)}; "
                "it was not believed"
            )
        return Outcome(remote.device, answer)

    def rebase(self, payload: Any, base: Any, remote: Remote) -> dict[str, tuple[Any, Any]]:
        if "entity_ids" not in payload or not isinstance(base, dict) or "entity_ids" not in base:
            return {}
        return {"entity_ids": (base["entity_ids"], self.target(payload, remote))}

    @staticmethod
    def target(payload: Any, remote: Remote) -> list[str]:
        """The list the edit wants, against OpenApp's current one."""
        if "entity_ids" in payload:
            return sorted(set(payload["entity_ids"]))
        assert remote.restrictions is not None
        current = set(remote.restrictions.entity_ids)
        return sorted((current | set(payload.get("add", []))) - set(payload.get("remove", [])))

    def describe(self, payload: Any) -> str:
        if not isinstance(payload, dict):
            return "door_restrictions"
        if "entity_ids" in payload:
            return f"door_restrictions set {len(payload['entity_ids'])} entities"
        return f"door_restrictions +{len(payload.get('add', []))} -{len(payload.get('remove', []))}"


KINDS: dict[str, EditKind] = {k.action: k for k in (Update(), Restore(), Delete(), DoorRestrictionsEdit())}


def queue_edit(
    store: Store,
    device_id: str,
    action: str,
    payload: dict[str, Any] | None,
    requested_by: str,
    orgs: Collection[str],
) -> int:
    """Check an edit against the mirror and the configured ``orgs`` and queue it, with its base;
    ConfigError names what is wrong. A metadata edit is checked against the mirrored schema of the
    device's provider when there is one (the reconciler checks it again, against a fresh one)."""
    try:
        check_device_id(device_id)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    kind = KINDS.get(action)
    if kind is None:
        raise ConfigError(f"unknown action {action!r} (use {', '.join(KINDS)})")
    problem = kind.validate(payload)
    if problem:
        raise ConfigError(f"{action} of {device_id}: {problem}")
    device = store.device(device_id)
    if device is None:
        raise ConfigError(f"device {device_id} is not in the mirror (run `syncd run-once` first, or check the id)")
    if device["org_id"] not in orgs:
        raise ConfigError(f"device {device_id} belongs to org {preview(device['org_id'])}, which is not configured")
    if device["state"] == "purged":
        raise ConfigError(f"device {device_id} was purged from OpenApp; it cannot be edited")
    problem = kind.mirror_problem(device)
    if problem:
        raise ConfigError(f"{action} of {device_id}: {problem}")
    if isinstance(payload, dict) and isinstance(payload.get("device_metadata"), dict):
        _check_against_mirrored_schema(store, device, payload)
    return EditQueue(store).add(
        {
            "device_id": device_id,
            "org_id": device["org_id"],
            "action": action,
            "payload": payload if payload else None,
            "base": kind.base(payload, device, store),
            "base_updated_at": device["updated_at"],
            "requested_by": requested_by,
        }
    )


def credential_pointers(schema: Any, prefix: str = "") -> list[str]:
    """JSON Pointers of the write-only credential fields of a schema (``format: password`` or
    ``writeOnly``), nested objects included."""
    found: list[str] = []
    if not isinstance(schema, dict):
        return found
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return found
    for name, sub in properties.items():
        if not isinstance(sub, dict):
            continue
        pointer = f"{prefix}/{_escape(str(name))}"
        if sub.get("format") == "password" or sub.get("writeOnly") is True:
            found.append(pointer)
        else:
            found += credential_pointers(sub, pointer)
    return found


def schema_problem(schema: Any, metadata: Any, remote: Remote, cleared: Collection[str] = ()) -> str | None:
    """What keeps ``metadata`` from the provider's schema (one line, the first problem by path),
    or None. The schema's ``$schema`` picks the dialect (2020-12 when it names none). A credential
    OpenApp holds may be left out even where the schema requires it (it is kept); a credential's
    value never appears in the message."""
    try:
        cls = validator_for(schema, default=Draft202012Validator)
        cls.check_schema(schema)
    except SchemaError as exc:
        return f"the provider's metadata schema is not a valid JSON Schema ({exc.message[:100]}); nothing was sent"
    set_now = set(remote.device.credentials_set) if isinstance(remote.device.credentials_set, list) else set()
    kept = set_now - set(cleared)
    for error in sorted(cls(schema).iter_errors(metadata), key=lambda e: [str(p) for p in e.absolute_path]):
        pointer = "".join(f"/{_escape(str(p))}" for p in error.absolute_path)
        if error.validator == "required" and isinstance(error.instance, dict):
            required: Any = error.validator_value
            missing = [f"{pointer}/{_escape(str(name))}" for name in required if name not in error.instance]
            if missing and set(missing) <= kept:
                continue  # a stored credential left out: OpenApp keeps it
        if pointer in remote.credentials:
            return f"device_metadata{pointer}: a credential value that does not fit the schema ({error.validator})"
        return f"device_metadata{pointer or ''}: {error.message[:200]}"
    return None


def redacted(payload: Any, pointers: Collection[str]) -> Any:
    """``payload`` with the credential values under ``pointers`` masked, for output."""
    if not isinstance(payload, dict) or not isinstance(payload.get("device_metadata"), dict):
        return payload
    metadata = copy.deepcopy(payload["device_metadata"])
    for pointer in pointers:
        if _has(metadata, pointer) and _get(metadata, pointer) is not None:
            _put(metadata, pointer, REDACTED)
    return {**payload, "device_metadata": metadata}


def credential_values(metadata: Any, pointers: Collection[str]) -> list[str]:
    """The credential values (strings) an edit's ``device_metadata`` carries."""
    values = [_get(metadata, p) for p in pointers if _has(metadata, p)]
    return [v for v in values if isinstance(v, str) and v]


def mirrored_credentials(store: Store, device_id: str) -> list[str]:
    """The credential pointers of a device's provider, from the mirrored schema (for output)."""
    device = store.device(device_id)
    if device is None or not device.get("integration_id"):
        return []
    row = MetadataDefinitions(store).for_integration(device["org_id"], device["integration_id"])
    return credential_pointers(row["json_schema"]) if row else []


# -- helpers ---------------------------------------------------------------------------------------


def _schema(device: Device, reading: Reading) -> dict[str, Any] | bool:
    """The device's provider's schema: the mirrored one when it is younger than a day, else asked
    (and mirrored)."""
    definitions = MetadataDefinitions(reading.store)
    if device.integration_id:
        row = definitions.for_integration(device.org_id, device.integration_id)
        if row and row["json_schema"] is not None and row["fetched_at"] > utcnow() - DEFINITION_MAX_AGE:
            schema: dict[str, Any] | bool = row["json_schema"]
            return schema
    definition = reading.client.get_metadata_definition(reading.org_id, reading.device_id)
    if device.integration_id:
        later = utcnow() + DEFINITION_MAX_AGE
        definitions.record(
            device.org_id, utcnow(), [DefinitionAnswer(device.integration_id, device.id, later, definition)]
        )
    return definition.schema


def _check_against_mirrored_schema(store: Store, device: Mapping[str, Any], payload: dict[str, Any]) -> None:
    if not device.get("integration_id"):
        return
    row = MetadataDefinitions(store).for_integration(device["org_id"], device["integration_id"])
    if not row or row["json_schema"] is None:
        return
    schema = row["json_schema"]
    pointers = frozenset(credential_pointers(schema))
    parsed = parse_device(device["raw"])
    cleared = {_pointer(c) for c in payload.get("clear_credentials", [])}
    problem = schema_problem(
        schema, _without(payload["device_metadata"], cleared), Remote(parsed, credentials=pointers), cleared
    )
    if problem:
        raise ConfigError(f"update of {device['id']}: {problem}")


def _size_problem(payload: Any) -> str | None:
    try:
        size = len(orjson.dumps(payload))
    except orjson.JSONEncodeError:
        return f"payload is nested more than {MAX_NESTING} levels deep"
    if size > MAX_EDIT_BYTES:
        return f"payload is {size} bytes of JSON, more than an edit may be ({MAX_EDIT_BYTES})"
    where = nul_path(payload)
    if where is not None:
        return f"payload holds a NUL character (U+0000) at {where}, which the mirror cannot store"
    return None


def _settable(payload: Any) -> dict[str, Any]:
    return {name: value for name, value in payload.items() if name in EDITABLE_FIELDS}


def _field(device: Device, name: str) -> Any:
    return getattr(device, name)


def _normal(name: str, value: Any) -> Any:
    return normalise_name(value) if name == "name" and value is not None else value


def _visible(metadata: Any, credentials: Collection[str]) -> Any:
    """``device_metadata`` without its write-only fields: what OpenApp shows of it."""
    return _without(metadata, credentials)


def _without(metadata: Any, pointers: Collection[str]) -> Any:
    if not isinstance(metadata, dict) or not pointers:
        return metadata
    kept = copy.deepcopy(metadata)
    for pointer in pointers:
        parts = _parts(pointer)
        parent: Any = kept
        for part in parts[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(parts[-1], None)
    return kept


def _pointer(name: str) -> str:
    return name if name.startswith("/") else "/" + _escape(name)


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _parts(pointer: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]


def _has(doc: Any, pointer: str) -> bool:
    for part in _parts(pointer):
        if not isinstance(doc, dict) or part not in doc:
            return False
        doc = doc[part]
    return True


def _get(doc: Any, pointer: str) -> Any:
    for part in _parts(pointer):
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


def _put(doc: dict[str, Any], pointer: str, value: Any) -> None:
    parts = _parts(pointer)
    for part in parts[:-1]:
        doc = doc.setdefault(part, {})
    doc[parts[-1]] = value
