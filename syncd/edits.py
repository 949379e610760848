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
from datetime import datetime, timedelta
from typing import Any, ClassVar

import orjson

from syncd.api import OpenAppClient
from syncd.errors import ConfigError, InvalidResponseError, RejectedError, TransientError
from syncd.models import (
    ID_LENGTH,
    MAX_NESTING,
    PORTAL_KIND,
    REDACTED,
    Device,
    DoorRestrictions,
    check_device_id,
    entity_id_problem,
    masked,
    normalise_name,
    nul_path,
    one_line,
    parse_device,
    preview,
    same_json,
    utcnow,
)
from syncd.schemas import (
    CheckFailed,
    SchemaIndex,
    SchemaUnusable,
    escape,
    index_of,
    pointer_parts,
    resolve_pointer,
    schema_problem,
    validate,
)
from syncd.store import Store
from syncd.store.details import DefinitionAnswer, MetadataDefinitions, PortalRestrictions
from syncd.store.edits import Edit, EditQueue

EDITABLE_FIELDS = ("name", "zone_id", "external_id", "device_metadata")
MAX_EDIT_BYTES = 1024 * 1024  # an edit larger than this is a mistake, not a device
# Entities one door-restrictions edit may name, and a portal's list syncd may PUT: 20,000 ULIDs are
# about 600 KB of JSON, inside MAX_EDIT_BYTES. (syncd mirrors up to 100,000 per portal.)
MAX_EDIT_ENTITIES = 20_000
DEFINITION_MAX_AGE = timedelta(days=1)  # an older mirrored schema is asked again before a metadata edit


@dataclass
class Remote:
    """What OpenApp has now, as far as an edit needs it."""

    device: Device
    restrictions: DoorRestrictions | None = None  # door_restrictions edits
    schema: dict[str, Any] | bool | None = None  # update edits that set device_metadata
    # JSON Pointers of the edit's credential values: found by the schema, recorded when queued,
    # named by OpenApp's credentials_set, or named in clear_credentials (the union is masked).
    credentials: frozenset[str] = frozenset()


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
    recorded: frozenset[str] = frozenset()  # credential pointers recorded with the edit
    notes: list[str] = field(default_factory=list)


class EditProblem(Exception):
    """The edit cannot be pushed as it is: it fails, nothing is sent (the message says why)."""


class EditKind:
    """One kind of edit; subclasses are stateless."""

    action: ClassVar[str]
    usage: ClassVar[str]  # the payload, for messages
    reads_device: ClassVar[bool] = True  # False: the kind's own read says whether the device exists
    # The writeback setting that caps how many edits of this kind are sent per hour (every one sent
    # counts, answered or not), and what they are called in messages; None: no cap.
    cap_setting: ClassVar[str | None] = None
    capped: ClassVar[str] = "edits"

    def check(self, payload: Any) -> str | None:
        """What is wrong with the payload (one line), or None: the rules every kind shares (at most
        :data:`MAX_EDIT_BYTES` of JSON, no NUL), then the kind's own. Checked when an edit is
        queued and again when the reconciler claims it."""
        if payload is not None and not isinstance(payload, str):
            problem = _size_problem(payload)
            if problem:
                return problem
        return self.validate(payload)

    def validate(self, payload: Any) -> str | None:
        """What is wrong with the payload by this kind's rules (one line), or None."""
        if payload not in (None, {}):
            return f"a {self.action} takes no payload"
        return None

    def mirror_problem(self, device: Mapping[str, Any], payload: Any, store: Store) -> str | None:
        """Why the mirrored device cannot take this edit (checked when it is queued)."""
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

    def unsendable(self, payload: Any, remote: Remote) -> str | None:
        """Why the edit, not yet applied and not in conflict, must not be sent now that OpenApp's
        state is known (it fails unsent), or None."""
        return None

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
    checked against the provider's JSON Schema first (see :mod:`syncd.schemas`: never fetched from,
    bounded in time); its write-only credential fields are kept when left out, and cleared only
    when named in ``clear_credentials``."""

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
        cleared = _cleared(payload)
        metadata = payload.get("device_metadata")
        set_now = credentials_named(remote.device)
        remote.credentials = frozenset(reading.recorded | set_now | cleared)
        if metadata is None and not cleared:
            return remote
        schema = _schema(remote.device, reading)
        remote.schema = schema
        index = _usable(schema)
        try:
            found = index.credentials_in(metadata) if metadata is not None else set()
            unknown = sorted(p for p in cleared if p not in set_now and not index.is_credential(p))
        except SchemaUnusable as exc:
            raise EditProblem(f"the provider's metadata schema cannot be used: {exc}") from None
        if unknown:
            raise EditProblem(
                f"clear_credentials names {', '.join(map(preview, unknown))}, not a credential field of this provider"
            )
        remote.credentials |= found
        target = metadata if metadata is not None else remote.device.device_metadata
        for pointer in sorted(cleared):
            if not _settable_at(target, pointer):
                raise EditProblem(
                    f"clear_credentials names {preview(pointer)}, but device_metadata has no object there "
                    "to clear it in"
                )
        if metadata is not None:
            for pointer in sorted(remote.credentials):
                if _has(metadata, pointer) and _get(metadata, pointer) is None and pointer not in cleared:
                    raise EditProblem(
                        f"device_metadata{pointer} is null, which would clear a stored credential; "
                        "name it in clear_credentials (syncd edit --clear-credential) to mean it"
                    )
            problem = metadata_problem(schema, _without(metadata, cleared), remote, cleared)
            if problem:
                raise EditProblem(problem)
        return remote

    def applied(self, payload: Any, remote: Remote) -> bool:
        device = remote.device
        for name, wanted in _settable(payload).items():
            if name == "device_metadata":
                if not same_json(device.device_metadata, _visible(wanted, remote.credentials)):
                    return False
                set_now = credentials_named(device)
                given = {p for p in remote.credentials if _has(wanted, p) and _get(wanted, p) is not None}
                if not given <= set_now:
                    return False  # a credential value cannot be read back: only "set" can be seen
            elif not same_json(_field(device, name), _normal(name, wanted)):
                return False
        return not _cleared(payload) & credentials_named(device)

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
        cleared = sorted(_cleared(payload))
        if cleared:
            metadata = copy.deepcopy(body.get("device_metadata", remote.device.device_metadata or {}))
            for pointer in cleared:
                _put(metadata, pointer, None)
            body["device_metadata"] = metadata
        secrets = credential_values(payload.get("device_metadata"), remote.credentials)
        answer = reading.client.update_device(reading.org_id, reading.device_id, body, secrets=secrets)
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
        return {**redacted(payload, present), "credentials_redacted": present}

    def describe(self, payload: Any) -> str:
        if not isinstance(payload, dict):
            return "update"
        parts = [name for name in EDITABLE_FIELDS if name in payload]
        if isinstance(payload.get("clear_credentials"), list) and payload["clear_credentials"]:
            parts.append("clear " + ", ".join(map(str, payload["clear_credentials"])))
        return "update " + ", ".join(parts)


class Restore(EditKind):
    """restore_device: undo a soft delete. Already active counts as done."""

    action = "restore"
    usage = "no payload"

    def mirror_problem(self, device: Mapping[str, Any], payload: Any, store: Store) -> str | None:
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
    the reconciler holds deletes beyond ``writeback.max_deletes_per_hour`` (every DELETE sent
    counts, answered or not)."""

    action = "delete"
    usage = "no payload"
    cap_setting = "max_deletes_per_hour"
    capped = "soft deletes"

    def mirror_problem(self, device: Mapping[str, Any], payload: Any, store: Store) -> str | None:
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
    OpenApp answered with, unless ``writeback.door_restrictions_key`` forces one.

    An empty list means "not restricted": anyone may open the door. So ``add`` / ``remove`` never
    change whether a portal is restricted: removing its last entities, or adding entities to a
    portal that is not restricted (which would lock everyone else out), fails unsent, whether the
    mirror's list or OpenApp's live one says so. Only a whole list does that (``entity_ids: []``,
    ``syncd door-restrictions ID --unrestrict``; ``--set E1 ...``)."""

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
        named = 0
        for name in ("entity_ids", "add", "remove"):
            ids = payload.get(name, [])
            if not isinstance(ids, list):
                return f"{name} must be a list of entity ids"
            named += len(ids)
            if named > MAX_EDIT_ENTITIES:
                return f"it names more than {MAX_EDIT_ENTITIES} entities, more than one edit may"
            for entity_id in ids:
                problem = entity_id_problem(entity_id)
                if problem:
                    return f"{name} holds {problem}"
        if "entity_ids" not in payload and not payload.get("add") and not payload.get("remove"):
            return "add / remove name no entity"
        if set(payload.get("add", [])) & set(payload.get("remove", [])):
            return "an entity id is both added and removed"
        return None

    def mirror_problem(self, device: Mapping[str, Any], payload: Any, store: Store) -> str | None:
        metadata = device.get("device_metadata")
        kind = metadata.get("kind") if isinstance(metadata, dict) else None
        if kind != PORTAL_KIND:
            return f"door restrictions exist only for {PORTAL_KIND} devices; this one is {preview(kind)}"
        if device["state"] != "active":
            return f"the portal is {device['state']}"
        mirrored = PortalRestrictions(store).mirrored_list(str(device["id"]))
        if mirrored is not None and "entity_ids" not in payload:
            return _meaning_problem(payload, mirrored, "the mirror")
        return None

    def base(self, payload: Any, device: Mapping[str, Any], store: Store) -> dict[str, Any] | None:
        if "entity_ids" not in payload:
            return None  # add / remove are computed against OpenApp's list when pushed
        mirrored = PortalRestrictions(store).mirrored_list(str(device["id"]))
        return None if mirrored is None else {"entity_ids": mirrored}  # unknown is not "unrestricted"

    def read(self, payload: Any, remote: Remote, reading: Reading) -> Remote:
        metadata = remote.device.device_metadata
        kind = metadata.get("kind") if isinstance(metadata, dict) else None
        if kind != PORTAL_KIND:
            raise EditProblem(f"door restrictions exist only for {PORTAL_KIND} devices; OpenApp says {preview(kind)}")
        remote.restrictions = reading.client.get_door_restrictions(reading.org_id, reading.device_id)
        return remote

    def applied(self, payload: Any, remote: Remote) -> bool:
        assert remote.restrictions is not None
        current = list(remote.restrictions.entity_ids)
        if "entity_ids" not in payload and _meaning_problem(payload, current, "OpenApp"):
            return False  # e.g. a remove on a door anyone may open: not done, whatever the arithmetic says
        return current == self.target(payload, remote)

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

    def unsendable(self, payload: Any, remote: Remote) -> str | None:
        assert remote.restrictions is not None
        if "entity_ids" not in payload:
            problem = _meaning_problem(payload, list(remote.restrictions.entity_ids), "OpenApp")
            if problem:
                return problem
        target = self.target(payload, remote)
        if len(target) > MAX_EDIT_ENTITIES:
            return f"the portal would list {len(target)} entities, more than one edit sends ({MAX_EDIT_ENTITIES})"
        return None

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
        return _added_and_removed(payload, remote.restrictions.entity_ids)

    def describe(self, payload: Any) -> str:
        if not isinstance(payload, dict):
            return "door_restrictions"
        if "entity_ids" in payload:
            if not payload["entity_ids"]:
                return "door_restrictions unrestrict (anyone may pass)"
            return f"door_restrictions set {len(payload['entity_ids'])} entities"
        return f"door_restrictions +{len(payload.get('add', []))} -{len(payload.get('remove', []))}"


def _added_and_removed(payload: Mapping[str, Any], current: Collection[str]) -> list[str]:
    return sorted((set(current) | set(payload.get("add", []))) - set(payload.get("remove", [])))


def _meaning_problem(payload: Mapping[str, Any], current: list[str], whose: str) -> str | None:
    """Why an add / remove edit may not go against ``current`` (``whose`` list it is): it would
    make a restricted portal unrestricted, or the reverse. None when it may."""
    target = _added_and_removed(payload, current)
    if current and not target:
        return (
            f"removing {_entities(len(payload.get('remove', [])))} would leave the portal with none, which OpenApp "
            f"reads as not restricted: anyone could open it ({whose} lists {len(current)}). An add / remove edit "
            "never does that; to let everyone through on purpose, queue the whole list: "
            "`syncd door-restrictions ID --unrestrict` (entity_ids: [])"
        )
    if not current and not target and payload.get("remove"):
        return (
            f"the portal is not restricted ({whose} lists no entity): anyone may open it, the "
            f"{_entities(len(payload['remove']))} to remove included. Removing cannot shut them out; to "
            "restrict the door on purpose, queue the whole list: `syncd door-restrictions ID --set ENTITY_ID ...`"
        )
    if not current and target:
        return (
            f"the portal is not restricted ({whose} lists no entity): anyone may open it. Adding "
            f"{_entities(len(target))} would let only them through and lock everyone else out. An add / remove "
            "edit never does that; to restrict the door on purpose, queue the whole list: "
            "`syncd door-restrictions ID --set ENTITY_ID ...` (entity_ids: [...])"
        )
    return None


def _entities(n: int) -> str:
    return f"{n} entity" if n == 1 else f"{n} entities"


KINDS: dict[str, EditKind] = {k.action: k for k in (Update(), Restore(), Delete(), DoorRestrictionsEdit())}


def queue_edit(
    store: Store,
    device_id: str,
    action: str,
    payload: dict[str, Any] | None,
    requested_by: str,
    orgs: Collection[str],
    needs_approval: Collection[str] = (),
) -> int:
    """Check an edit against the mirror and the configured ``orgs`` and queue it (``requested_via``
    the CLI), with its base and where its credentials are; ConfigError names what is wrong. A
    metadata edit is checked against the mirrored schema of the device's provider when there is one
    (the reconciler checks it again, against a fresh one). An edit of a kind in ``needs_approval``
    awaits a second person's approval."""
    try:
        check_device_id(device_id)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    kind = KINDS.get(action)
    if kind is None:
        raise ConfigError(f"unknown action {action!r} (use {', '.join(KINDS)})")
    problem = kind.check(payload)
    if problem:
        raise ConfigError(f"{action} of {device_id}: {problem}")
    device = store.device(device_id)
    if device is None:
        raise ConfigError(f"device {device_id} is not in the mirror (run `syncd run-once` first, or check the id)")
    if device["org_id"] not in orgs:
        raise ConfigError(f"device {device_id} belongs to org {preview(device['org_id'])}, which is not configured")
    if device["state"] == "purged":
        raise ConfigError(f"device {device_id} was purged from OpenApp; it cannot be edited")
    problem = kind.mirror_problem(device, payload or {}, store)
    if problem:
        raise ConfigError(f"{action} of {device_id}: {problem}")
    credentials: list[str] = []
    if isinstance(payload, dict) and isinstance(payload.get("device_metadata"), dict):
        credentials = _check_against_mirrored_schema(store, device, payload)
    return EditQueue(store).add(
        {
            "device_id": device_id,
            "org_id": device["org_id"],
            "action": action,
            "payload": payload if payload else None,
            "base": kind.base(payload, device, store),
            "base_updated_at": device["updated_at"],
            "requested_by": requested_by,
            "requested_via": "cli",
            "credential_pointers": credentials or None,
        },
        awaiting_approval=action in needs_approval,
    )


def cancel_edit(store: Store, edit_id: int, now: datetime) -> str:
    """Drop an edit (:meth:`EditQueue.cancel`); returns the status it had. An edit whose write
    went out keeps no credential value once cancelled: they are redacted as after a push."""
    queue = EditQueue(store)
    edit = queue.get(edit_id)
    kept = None
    if edit is not None and edit.sent_at is not None and isinstance(edit.payload, dict):
        present = [p for p in edit_credentials(store, edit) if _has(edit.payload.get("device_metadata"), p)]
        if present:
            kept = {**redacted(edit.payload, present), "credentials_redacted": sorted(present)}
    return queue.cancel(edit_id, now, kept)


def metadata_problem(schema: Any, metadata: Any, remote: Remote, cleared: Collection[str] = ()) -> str | None:
    """What keeps ``metadata`` from the provider's schema (one line, the first problem by path),
    or None. The check runs in a worker process with a deadline (:func:`syncd.schemas.validate`).
    A credential OpenApp holds may be left out even where the schema requires it (it is kept). No
    message quotes a credential, nor a value that holds one. TransientError when the check could
    not run at all (not the schema's fault: tried again later)."""
    try:
        errors = validate(schema, metadata)
    except SchemaUnusable as exc:
        return f"the provider's metadata schema cannot be used: {exc}"
    except CheckFailed as exc:
        raise TransientError(str(exc)) from None
    kept = credentials_named(remote.device) - set(cleared)
    present = {p for p in remote.credentials if _has(metadata, p)}
    secrets = credential_values(metadata, remote.credentials)
    for error in errors:
        pointer = error.pointer
        if error.validator == "required":
            missing = [f"{pointer}/{escape(name)}" for name in error.missing]
            if missing and set(missing) <= kept:
                continue  # a stored credential left out: OpenApp keeps it
        if any(_around(pointer, p) for p in present):
            return f"device_metadata{pointer}: does not satisfy the schema's {preview(error.validator)} rule"
        return one_line(masked(f"device_metadata{pointer}: {error.message}", secrets), 300)
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
    """The credential values an edit's ``device_metadata`` carries under ``pointers``, as text:
    what no message may quote (every string and number within a credential's value)."""
    values: list[str] = []
    for pointer in pointers:
        if not _has(metadata, pointer):
            continue
        pending = [_get(metadata, pointer)]
        while pending:
            value = pending.pop()
            if isinstance(value, dict):
                pending.extend(value.values())
            elif isinstance(value, list):
                pending.extend(value)
            elif isinstance(value, str | int | float) and not isinstance(value, bool) and str(value):
                values.append(str(value))
    return values


def edit_credentials(store: Store, edit: Edit) -> list[str]:
    """Where an edit's credential values are, for output: the pointers recorded with it, those
    the mirrored schema of its provider marks in its metadata, and those the mirrored device says
    are set. When the schema is too complex to search, all of its metadata counts."""
    pointers = set(edit.credential_pointers)
    payload = edit.payload
    metadata = payload.get("device_metadata") if isinstance(payload, dict) else None
    if not isinstance(metadata, dict):
        return sorted(pointers)
    device = store.device(edit.device_id)
    if device is None:
        return sorted(pointers)
    pointers |= _pointers_in(device.get("credentials_set"))
    schema = _mirrored_schema(store, device)
    if schema is not None:
        try:
            pointers |= index_of(schema).credentials_in(metadata)
        except SchemaUnusable:
            pointers.update(f"/{escape(str(name))}" for name in metadata)
    return sorted(pointers)


# -- helpers ---------------------------------------------------------------------------------------


def _usable(schema: Any) -> SchemaIndex:
    """The index of a schema that may be used, or EditProblem saying why it may not."""
    problem = schema_problem(schema)
    if problem:
        raise EditProblem(f"the provider's metadata schema cannot be used: {problem}")
    return index_of(schema)


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
        answer = DefinitionAnswer(
            device.integration_id, device.id, later, definition, schema_problem=schema_problem(definition.schema)
        )
        definitions.record(device.org_id, utcnow(), [answer])
    return definition.schema


def _mirrored_schema(store: Store, device: Mapping[str, Any]) -> Any:
    if not device.get("integration_id"):
        return None
    row = MetadataDefinitions(store).for_integration(device["org_id"], device["integration_id"])
    return row["json_schema"] if row else None


def _check_against_mirrored_schema(store: Store, device: Mapping[str, Any], payload: dict[str, Any]) -> list[str]:
    """Check a metadata edit against the mirrored schema (ConfigError naming the problem); the
    pointers of its credentials, to record with it."""
    cleared = _cleared(payload)
    pointers = _pointers_in(device.get("credentials_set")) | cleared
    schema = _mirrored_schema(store, device)
    if schema is None:
        return sorted(pointers)
    parsed = parse_device(device["raw"])
    try:
        index = _usable(schema)
        pointers |= index.credentials_in(payload["device_metadata"])
    except SchemaUnusable as exc:
        raise ConfigError(f"update of {device['id']}: the provider's metadata schema cannot be used: {exc}") from None
    except EditProblem as exc:
        raise ConfigError(f"update of {device['id']}: {exc}") from None
    remote = Remote(parsed, credentials=frozenset(pointers))
    problem = metadata_problem(schema, _without(payload["device_metadata"], cleared), remote, cleared)
    if problem:
        raise ConfigError(f"update of {device['id']}: {problem}")
    return sorted(pointers)


def _size_problem(payload: Any) -> str | None:
    try:
        size = len(orjson.dumps(payload))
    except (orjson.JSONEncodeError, TypeError) as exc:
        if "recursion" in str(exc).lower():
            return f"payload is nested more than {MAX_NESTING} levels deep"
        return f"payload is not storable JSON ({one_line(str(exc), 80)})"
    if size > MAX_EDIT_BYTES:
        return f"payload is {size} bytes of JSON, more than an edit may be ({MAX_EDIT_BYTES})"
    where = nul_path(payload)
    if where is not None:
        return f"payload holds a NUL character (U+0000) at {where}, which the mirror cannot store"
    return None


def _cleared(payload: Any) -> set[str]:
    clear = payload.get("clear_credentials", []) if isinstance(payload, dict) else []
    return {_pointer(c) for c in clear if isinstance(c, str) and c} if isinstance(clear, list) else set()


def credentials_named(device: Device) -> set[str]:
    """The pointers OpenApp's ``credentials_set`` names (its list form; a boolean names none)."""
    return _pointers_in(device.credentials_set)


def _pointers_in(credentials_set: Any) -> set[str]:
    """The JSON Pointers a ``credentials_set`` as received (or as mirrored) names."""
    if not isinstance(credentials_set, list):
        return set()
    return {p for p in credentials_set if isinstance(p, str) and p.startswith("/")}


def _around(pointer: str, credential: str) -> bool:
    """Whether the value at ``pointer`` holds, or lies within, the credential at ``credential``."""
    return pointer == credential or credential.startswith(pointer + "/") or pointer.startswith(credential + "/")


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
        parts = pointer_parts(pointer)
        if not parts:
            continue
        parent: Any = kept
        for part in parts[:-1]:
            parent = _step(parent, part)
        if isinstance(parent, dict):
            parent.pop(parts[-1], None)
        elif isinstance(parent, list) and parts[-1].isdigit() and int(parts[-1]) < len(parent):
            parent[int(parts[-1])] = None  # an item cannot go without moving the others: it is blanked
    return kept


def _pointer(name: str) -> str:
    return name if name.startswith("/") else "/" + escape(name)


def _step(doc: Any, part: str) -> Any:
    if isinstance(doc, dict):
        return doc.get(part)
    if isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
        return doc[int(part)]
    return None


def _has(doc: Any, pointer: str) -> bool:
    try:
        resolve_pointer(doc, pointer)
    except LookupError:
        return False
    return True


def _get(doc: Any, pointer: str) -> Any:
    for part in pointer_parts(pointer):
        doc = _step(doc, part)
    return doc


def _settable_at(doc: Any, pointer: str) -> bool:
    """Whether :func:`_put` can write at ``pointer`` of ``doc``: every step an object (or missing)."""
    parts = pointer_parts(pointer)
    if not parts or not isinstance(doc, dict):
        return False
    for part in parts[:-1]:
        doc = doc.get(part, {})
        if not isinstance(doc, dict):
            return False
    return True


def _put(doc: Any, pointer: str, value: Any) -> None:
    """Write ``value`` at ``pointer``, making the objects on the way; a step through anything but
    an object or an existing list item is not taken (nothing is written)."""
    parts = pointer_parts(pointer)
    if not parts:
        return
    for part in parts[:-1]:
        doc = doc.setdefault(part, {}) if isinstance(doc, dict) else _step(doc, part)
    last = parts[-1]
    if isinstance(doc, dict):
        doc[last] = value
    elif isinstance(doc, list) and last.isdigit() and int(last) < len(doc):
        doc[int(last)] = value
