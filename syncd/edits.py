"""The kinds of local edit, each in one class: what its payload may hold (parsed once, into the
kind's own frozen dataclass), what it reads of OpenApp before pushing, how to tell it is already
done there, what counts as a conflicting remote change, when a send is held, how it is pushed, and
how it is described (README, "Write-back").

Creating and purging devices are not edits, on purpose: a mirror does not invent or destroy devices.

Conflicts are decided field by field: when an edit is queued its ``base`` records the mirror's
values of the fields it sets; at push time it conflicts only where OpenApp's value differs from
both the base and the edit's own value (so a change of another field, or OpenApp already showing
this very edit, is no conflict).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, ClassVar, Final, Generic, TypeVar

import orjson

from syncd.api import OpenAppClient
from syncd.config import WritebackSettings
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
from syncd.store.details import DefinitionAnswer, MetadataDefinitions, PortalRestrictions, RestrictionsAnswer
from syncd.store.edits import Edit, EditQueue, Held, SendCap
from syncd.vocab import DeviceState, EditAction, EditSource, RestrictionStatus

EDITABLE_FIELDS = ("name", "zone_id", "external_id", "device_metadata")
MAX_EDIT_BYTES = 1024 * 1024  # an edit larger than this is a mistake, not a device
# Entities one door-restrictions edit may name, and a portal's list syncd may PUT: 20,000 ULIDs are
# about 600 KB of JSON, inside MAX_EDIT_BYTES. (syncd mirrors up to 100,000 per portal.)
MAX_EDIT_ENTITIES = 20_000
DEFINITION_MAX_AGE = timedelta(days=1)  # an older mirrored schema is asked again before a metadata edit
CAP_WINDOW = timedelta(hours=1)  # the window of an edit kind's cap on sends


class Unset(Enum):
    """A field an update does not set (its value may be None: ``zone_id: null`` clears the zone)."""

    UNSET = "unset"


UNSET: Final = Unset.UNSET


@dataclass(frozen=True, slots=True)
class NoPayload:
    """The payload of a kind that takes none (restore, delete)."""


@dataclass(frozen=True, slots=True)
class UpdatePayload:
    """An update's payload, checked: the fields it sets (UNSET: left as they are) and the stored
    credentials it clears (field names or JSON Pointers, as given)."""

    name: str | dict[str, Any] | Unset = UNSET  # a LocalizedString as given: pushed as is, compared normalised
    zone_id: str | Unset | None = UNSET
    external_id: str | Unset | None = UNSET
    device_metadata: dict[str, Any] | Unset = UNSET
    clear_credentials: tuple[str, ...] = ()

    def settable(self) -> dict[str, Any]:
        """The fields it sets, by name, with the values given."""
        fields = {name: getattr(self, name) for name in EDITABLE_FIELDS}
        return {name: value for name, value in fields.items() if value is not UNSET}

    @property
    def metadata(self) -> dict[str, Any] | None:
        """The ``device_metadata`` it sets, or None."""
        return None if self.device_metadata is UNSET else self.device_metadata

    @property
    def cleared(self) -> set[str]:
        """The JSON Pointers of the credentials it clears."""
        return {_pointer(name) for name in self.clear_credentials}

    def as_json(self) -> dict[str, Any]:
        """The payload as ``device_edits`` keeps it."""
        shown = self.settable()
        if self.clear_credentials:
            shown["clear_credentials"] = list(self.clear_credentials)
        return shown


@dataclass(frozen=True, slots=True)
class DoorRestrictionsPayload:
    """A door-restrictions edit's payload, checked: the whole list (``entity_ids``), or entities
    added and removed against OpenApp's list when it is pushed (``entity_ids`` None)."""

    entity_ids: tuple[str, ...] | None = None
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Mirrored:
    """A device as the mirror holds it: OpenApp's last answer, parsed, and the mirror's ``state``
    (``purged`` once syncd confirmed the device gone, which no answer says)."""

    device: Device
    state: DeviceState


def read_mirrored(store: Store, device_id: str) -> Mirrored | None:
    """The mirrored device, or None when the mirror has no such device."""
    row = store.device(device_id)
    return None if row is None else Mirrored(parse_device(row["raw"]), DeviceState(row["state"]))


@dataclass
class Remote:
    """What OpenApp has now, as far as an edit needs it."""

    device: Device
    restrictions: DoorRestrictions | None = None  # door_restrictions edits
    schema: dict[str, Any] | bool | None = None  # update edits that set device_metadata
    # JSON Pointers of the edit's credential values: found by the schema, recorded when queued,
    # named by OpenApp's credentials_set, or named in clear_credentials (the union is masked).
    credentials: frozenset[str] = frozenset()

    def took(self, outcome: Outcome) -> None:
        """OpenApp's answer is ``outcome``: the credentials it says it now holds are masked too."""
        self.credentials |= credentials_named(outcome.device)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the mirror takes once an edit is done: the device as OpenApp has it, and what else the
    kind's answer changes (a portal's door restrictions)."""

    device: Device
    restrictions: RestrictionsAnswer | None = None


@dataclass
class Reading:
    """What a kind may use to read OpenApp and the mirror before a push."""

    client: OpenAppClient
    store: Store
    org_id: str
    device_id: str
    settings: WritebackSettings
    recorded: frozenset[str] = frozenset()  # credential pointers recorded with the edit


@dataclass(frozen=True, slots=True)
class HoldRule:
    """A kind's cap on sends: at most ``cap.limit`` of its writes within ``cap.window`` (every one
    sent counts, answered or not). A send beyond it is held: it waits unsent, its attempt not
    counted, until a slot frees. ``setting``: the writeback setting that says the limit;
    ``capped``: what the held edits are called."""

    cap: SendCap
    setting: str
    capped: str

    def reason(self, held: Held, until: datetime) -> str:
        """Why the edit waits, and until when (its last error, one line)."""
        return (
            f"held: {held.count} {self.capped} sent in the last hour reach writeback.{self.setting} "
            f"({self.cap.limit}); it is pushed after {until.isoformat(timespec='seconds')} (raise the cap to push "
            "sooner, or `syncd edits cancel ID`)"
        )


class EditProblem(Exception):
    """The edit cannot be pushed as it is: it fails, nothing is sent (the message says why, one line)."""


P = TypeVar("P")


class EditKind(Generic[P]):
    """One kind of edit, its payload a ``P``; subclasses are stateless."""

    action: ClassVar[str]
    usage: ClassVar[str]  # the payload, for messages
    reads_device: ClassVar[bool] = True  # False: the kind's own read says whether the device exists

    def parse(self, raw: object) -> P:
        """The payload as a row or the CLI gives it, checked and typed; EditProblem naming what is
        wrong (one line): the rules every kind shares (at most :data:`MAX_EDIT_BYTES` of JSON, no
        NUL), then the kind's own. Parsed when an edit is queued and again when the reconciler
        claims it."""
        if raw is not None and not isinstance(raw, str):
            problem = _size_problem(raw)
            if problem:
                raise EditProblem(problem)
        return self.validate(raw)

    def validate(self, raw: object) -> P:
        """The payload by this kind's rules (EditProblem: what is wrong, one line)."""
        raise NotImplementedError

    def mirror_problem(self, mirrored: Mirrored, payload: P, store: Store) -> str | None:
        """Why the mirrored device cannot take this edit (checked when it is queued)."""
        return None

    def base(self, payload: P, mirrored: Mirrored, store: Store) -> dict[str, Any] | None:
        """The mirror's values of the fields the edit sets (recorded when it is queued)."""
        return None

    def recorded_credentials(self, payload: P, mirrored: Mirrored, store: Store) -> list[str]:
        """Where the edit's credential values are, recorded with it when queued (ConfigError: the
        mirrored metadata schema refuses the payload)."""
        return []

    def read(self, payload: P, remote: Remote, reading: Reading) -> Remote:
        """Read what else the edit needs of OpenApp (EditProblem: the edit cannot be pushed)."""
        return remote

    def applied(self, payload: P, remote: Remote) -> bool:
        """Whether OpenApp already shows the edit."""
        raise NotImplementedError

    def found(self, payload: P, remote: Remote) -> Outcome:
        """What the mirror takes when OpenApp already shows the edit."""
        return Outcome(remote.device)

    def conflicts(self, payload: P, base: Any, remote: Remote) -> dict[str, dict[str, Any]]:
        """Per field that OpenApp changed away from both the base and the edit: base, remote, queued."""
        return {}

    def unsendable(self, payload: P, remote: Remote) -> str | None:
        """Why the edit, not yet applied and not in conflict, must not be sent now that OpenApp's
        state is known (it fails unsent), or None."""
        return None

    def hold_rule(self, settings: WritebackSettings) -> HoldRule | None:
        """The kind's cap on sends, which holds a send beyond it (None: a send is never held)."""
        return None

    def push(self, payload: P, remote: Remote, reading: Reading) -> Outcome:
        """Send the edit; OpenApp's answer."""
        raise NotImplementedError

    def rebase(self, payload: P, base: Any, remote: Remote) -> dict[str, tuple[Any, Any]]:
        """``{field: (value before, value now)}`` once the edit is applied, for later edits' bases."""
        return {}

    def stored(self, payload: P, remote: Remote) -> dict[str, Any] | None:
        """What device_edits keeps of the payload once its write went out (None: the payload as it is)."""
        return None

    def secrets(self, payload: P, pointers: Collection[str]) -> list[str]:
        """The credential values the payload carries under ``pointers``: what no message may quote."""
        return []

    def describe(self, payload: P) -> str:
        """The edit in a few words, for the CLI and the log (never a credential value)."""
        return self.action

    def summary(self, raw: object) -> str:
        """A row's payload in a few words, for listings: described when it parses, else the action
        alone (a row SQL wrote may hold anything)."""
        try:
            return self.describe(self.parse(raw))
        except EditProblem:
            return self.action


class Update(EditKind[UpdatePayload]):
    """update_device: any of name, zone_id, external_id, device_metadata. ``device_metadata`` is
    checked against the provider's JSON Schema first (see :mod:`syncd.schemas`: never fetched from,
    bounded in time); its write-only credential fields are kept when left out, and cleared only
    when named in ``clear_credentials``."""

    action = EditAction.UPDATE
    usage = "any of name, zone_id, external_id, device_metadata (and clear_credentials)"

    def validate(self, raw: object) -> UpdatePayload:
        given = _update_fields(raw)
        name = _name(given)
        zone_id, external_id = (_text_or_null(given, field) for field in ("zone_id", "external_id"))
        if isinstance(zone_id, str) and len(zone_id) > ID_LENGTH:
            raise EditProblem(f"zone_id is longer than an id can be ({ID_LENGTH})")
        metadata = given.get("device_metadata", UNSET)
        if metadata is not UNSET and not isinstance(metadata, dict):
            raise EditProblem(f"device_metadata must be a JSON object, got {preview(metadata)}")
        return UpdatePayload(name, zone_id, external_id, metadata, _clear_credentials(given))

    def base(self, payload: UpdatePayload, mirrored: Mirrored, store: Store) -> dict[str, Any] | None:
        return {name: _field(mirrored.device, name) for name in payload.settable()}

    def recorded_credentials(self, payload: UpdatePayload, mirrored: Mirrored, store: Store) -> list[str]:
        if payload.metadata is None:
            return []
        return _check_against_mirrored_schema(store, mirrored.device, payload, payload.metadata)

    def read(self, payload: UpdatePayload, remote: Remote, reading: Reading) -> Remote:
        cleared = payload.cleared
        remote.credentials = frozenset(reading.recorded | credentials_named(remote.device) | cleared)
        if payload.metadata is None and not cleared:
            return remote
        remote.schema = _schema(remote.device, reading)
        remote.credentials |= _schema_credentials(payload, remote)
        target = payload.metadata if payload.metadata is not None else remote.device.device_metadata
        for pointer in sorted(cleared):
            if not _settable_at(target, pointer):
                raise EditProblem(
                    f"clear_credentials names {preview(pointer)}, but device_metadata has no object there "
                    "to clear it in"
                )
        if payload.metadata is not None:
            _check_metadata(payload.metadata, remote, cleared)
        return remote

    def applied(self, payload: UpdatePayload, remote: Remote) -> bool:
        device = remote.device
        for name, wanted in payload.settable().items():
            if name == "device_metadata":
                if not same_json(device.device_metadata, _visible(wanted, remote.credentials)):
                    return False
                given = {p for p in remote.credentials if _has(wanted, p) and _get(wanted, p) is not None}
                if not given <= credentials_named(device):
                    return False  # a credential value cannot be read back: only "set" can be seen
            elif not same_json(_field(device, name), _normal(name, wanted)):
                return False
        return not payload.cleared & credentials_named(device)

    def conflicts(self, payload: UpdatePayload, base: Any, remote: Remote) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for name, wanted in payload.settable().items():
            if not isinstance(base, dict) or name not in base:
                continue
            queued = _visible(wanted, remote.credentials) if name == "device_metadata" else _normal(name, wanted)
            now, before = _field(remote.device, name), _normal(name, base[name])
            if not same_json(now, before) and not same_json(now, queued):
                found[name] = {"base": before, "remote": now, "queued": queued}
        return found

    def push(self, payload: UpdatePayload, remote: Remote, reading: Reading) -> Outcome:
        body = payload.settable()
        cleared = sorted(payload.cleared)
        if cleared:
            metadata = copy.deepcopy(body.get("device_metadata", remote.device.device_metadata or {}))
            for pointer in cleared:
                _put(metadata, pointer, None)
            body["device_metadata"] = metadata
        secrets = credential_values(payload.metadata, remote.credentials)
        answer = reading.client.update_device(reading.org_id, reading.device_id, body, secrets=secrets)
        return Outcome(parse_device(answer))

    def rebase(self, payload: UpdatePayload, base: Any, remote: Remote) -> dict[str, tuple[Any, Any]]:
        if not isinstance(base, dict):
            return {}
        moved = {}
        for name, wanted in payload.settable().items():
            if name in base:
                moved[name] = (
                    base[name],
                    _visible(wanted, remote.credentials) if name == "device_metadata" else wanted,
                )
        return moved

    def stored(self, payload: UpdatePayload, remote: Remote) -> dict[str, Any] | None:
        metadata = payload.metadata
        if metadata is None:
            return None
        present = sorted(p for p in remote.credentials if _has(metadata, p) and _get(metadata, p) is not None)
        if not present:
            return None
        return {**redacted(payload.as_json(), present), "credentials_redacted": present}

    def secrets(self, payload: UpdatePayload, pointers: Collection[str]) -> list[str]:
        return credential_values(payload.metadata, pointers)

    def describe(self, payload: UpdatePayload) -> str:
        parts = list(payload.settable())
        if payload.clear_credentials:
            parts.append("clear " + ", ".join(payload.clear_credentials))
        return "update " + ", ".join(parts)

    def summary(self, raw: object) -> str:
        if isinstance(raw, dict):  # one pushed with credentials keeps them redacted, and says so
            raw = {name: value for name, value in raw.items() if name != "credentials_redacted"}
        return super().summary(raw)


def _update_fields(raw: object) -> dict[str, Any]:
    """An update's payload as a JSON object of known fields, at least one (EditProblem: why not)."""
    if isinstance(raw, str):
        raise EditProblem(f"payload is not a JSON object: {preview(raw)}")
    if isinstance(raw, dict) and "credentials_redacted" in raw:
        raise EditProblem("its credential values were redacted after it was pushed; queue a new edit instead")
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - {*EDITABLE_FIELDS, "clear_credentials"})
        if unknown:
            names = ", ".join(preview(f) for f in unknown)
            raise EditProblem(f"unknown field(s) {names} (editable: {', '.join(EDITABLE_FIELDS)})")
    if not isinstance(raw, dict) or not raw:
        raise EditProblem("an update needs a payload object with at least one of: " + ", ".join(EDITABLE_FIELDS))
    return raw


def _name(given: Mapping[str, Any]) -> str | dict[str, Any] | Unset:
    if "name" not in given:
        return UNSET
    try:
        normal = normalise_name(given["name"])
    except ValueError as exc:
        raise EditProblem(f"name {exc}") from None
    if not normal:
        raise EditProblem("name must not be empty")
    name: str | dict[str, Any] = given["name"]
    return name


def _text_or_null(given: Mapping[str, Any], name: str) -> str | Unset | None:
    value = given.get(name, UNSET)
    if value is not UNSET and value is not None and not isinstance(value, str):
        raise EditProblem(f"{name} must be a string or null, got {preview(value)}")
    text: str | Unset | None = value
    return text


def _clear_credentials(given: Mapping[str, Any]) -> tuple[str, ...]:
    clear = given.get("clear_credentials", [])
    if not isinstance(clear, list) or not all(isinstance(c, str) and c for c in clear):
        raise EditProblem("clear_credentials must be a list of credential field names (or JSON Pointers)")
    return tuple(clear)


def _schema_credentials(payload: UpdatePayload, remote: Remote) -> set[str]:
    """The credentials the provider's schema finds in the payload's metadata; EditProblem when the
    schema cannot be used, or ``clear_credentials`` names what is no credential of the provider."""
    index = _usable(remote.schema)
    set_now = credentials_named(remote.device)
    try:
        found = index.credentials_in(payload.metadata) if payload.metadata is not None else set()
        unknown = sorted(p for p in payload.cleared if p not in set_now and not index.is_credential(p))
    except SchemaUnusable as exc:
        raise EditProblem(f"the provider's metadata schema cannot be used: {exc}") from None
    if unknown:
        raise EditProblem(
            f"clear_credentials names {', '.join(map(preview, unknown))}, not a credential field of this provider"
        )
    return found


def _check_metadata(metadata: dict[str, Any], remote: Remote, cleared: set[str]) -> None:
    """EditProblem when the metadata would clear a credential unasked, or the schema refuses it."""
    for pointer in sorted(remote.credentials):
        if _has(metadata, pointer) and _get(metadata, pointer) is None and pointer not in cleared:
            raise EditProblem(
                f"device_metadata{pointer} is null, which would clear a stored credential; "
                "name it in clear_credentials (syncd edit --clear-credential) to mean it"
            )
    problem = metadata_problem(remote.schema, _without(metadata, cleared), remote, cleared)
    if problem:
        raise EditProblem(problem)


class Restore(EditKind[NoPayload]):
    """restore_device: undo a soft delete. Already active counts as done."""

    action = EditAction.RESTORE
    usage = "no payload"

    def validate(self, raw: object) -> NoPayload:
        return _no_payload(self.action, raw)

    def mirror_problem(self, mirrored: Mirrored, payload: NoPayload, store: Store) -> str | None:
        if mirrored.state != DeviceState.DELETED:
            return f"it is not soft-deleted (state {mirrored.state}); nothing to restore"
        return None

    def applied(self, payload: NoPayload, remote: Remote) -> bool:
        return remote.device.deleted_at is None

    def push(self, payload: NoPayload, remote: Remote, reading: Reading) -> Outcome:
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


class Delete(EditKind[NoPayload]):
    """delete_device: a soft delete (OpenApp can restore it). Already soft-deleted counts as done.
    Its hold rule: at most ``writeback.max_deletes_per_hour`` DELETEs are sent per hour (every one
    sent counts, answered or not); more wait."""

    action = EditAction.DELETE
    usage = "no payload"

    def validate(self, raw: object) -> NoPayload:
        return _no_payload(self.action, raw)

    def mirror_problem(self, mirrored: Mirrored, payload: NoPayload, store: Store) -> str | None:
        if mirrored.state == DeviceState.DELETED:
            return "it is already soft-deleted"
        return None

    def applied(self, payload: NoPayload, remote: Remote) -> bool:
        return remote.device.deleted_at is not None

    def hold_rule(self, settings: WritebackSettings) -> HoldRule:
        cap = SendCap(self.action, settings.max_deletes_per_hour, CAP_WINDOW)
        return HoldRule(cap, "max_deletes_per_hour", "soft deletes")

    def push(self, payload: NoPayload, remote: Remote, reading: Reading) -> Outcome:
        return Outcome(parse_device(reading.client.delete_device(reading.org_id, reading.device_id)))


def _no_payload(action: str, raw: object) -> NoPayload:
    if raw not in (None, {}):
        raise EditProblem(f"a {action} takes no payload")
    return NoPayload()


class DoorRestrictionsEdit(EditKind[DoorRestrictionsPayload]):
    """PUT door-restrictions of a virtual_access_portal: the whole list (``entity_ids``), or
    ``add`` / ``remove``, computed against OpenApp's own list at push time. Sent under the body key
    OpenApp answered with, unless ``writeback.door_restrictions_key`` forces one.

    An empty list means "not restricted": anyone may open the door. So ``add`` / ``remove`` never
    change whether a portal is restricted: removing its last entities, or adding entities to a
    portal that is not restricted (which would lock everyone else out), fails unsent, whether the
    mirror's list or OpenApp's live one says so. Only a whole list does that (``entity_ids: []``,
    ``syncd door-restrictions ID --unrestrict``; ``--set E1 ...``)."""

    action = EditAction.DOOR_RESTRICTIONS
    usage = '{"entity_ids": [...]} or {"add": [...], "remove": [...]}'
    # OpenApp's restrictions answer is 404 for a device that is gone and 400 for one that is no
    # portal, so the device is not read first: two requests per edit, not three.
    reads_device = False

    def validate(self, raw: object) -> DoorRestrictionsPayload:
        lists = _entity_lists(_door_fields(raw, self.usage))
        if "entity_ids" in lists:
            return DoorRestrictionsPayload(entity_ids=lists["entity_ids"])
        add, remove = lists.get("add", ()), lists.get("remove", ())
        if not add and not remove:
            raise EditProblem("add / remove name no entity")
        if set(add) & set(remove):
            raise EditProblem("an entity id is both added and removed")
        return DoorRestrictionsPayload(add=add, remove=remove)

    def mirror_problem(self, mirrored: Mirrored, payload: DoorRestrictionsPayload, store: Store) -> str | None:
        metadata = mirrored.device.device_metadata
        kind = metadata.get("kind") if isinstance(metadata, dict) else None
        if kind != PORTAL_KIND:
            return f"door restrictions exist only for {PORTAL_KIND} devices; this one is {preview(kind)}"
        if mirrored.state != DeviceState.ACTIVE:
            return f"the portal is {mirrored.state}"
        listed = PortalRestrictions(store).mirrored_list(mirrored.device.id)
        if listed is not None and payload.entity_ids is None:
            return _meaning_problem(payload, listed, "the mirror")
        return None

    def base(self, payload: DoorRestrictionsPayload, mirrored: Mirrored, store: Store) -> dict[str, Any] | None:
        if payload.entity_ids is None:
            return None  # add / remove are computed against OpenApp's list when pushed
        listed = PortalRestrictions(store).mirrored_list(mirrored.device.id)
        return None if listed is None else {"entity_ids": listed}  # unknown is not "unrestricted"

    def read(self, payload: DoorRestrictionsPayload, remote: Remote, reading: Reading) -> Remote:
        metadata = remote.device.device_metadata
        kind = metadata.get("kind") if isinstance(metadata, dict) else None
        if kind != PORTAL_KIND:
            raise EditProblem(f"door restrictions exist only for {PORTAL_KIND} devices; OpenApp says {preview(kind)}")
        remote.restrictions = reading.client.get_door_restrictions(reading.org_id, reading.device_id)
        return remote

    def applied(self, payload: DoorRestrictionsPayload, remote: Remote) -> bool:
        current = list(_restrictions(remote).entity_ids)
        if payload.entity_ids is None and _meaning_problem(payload, current, "OpenApp"):
            return False  # e.g. a remove on a door anyone may open: not done, whatever the arithmetic says
        return current == self.target(payload, remote)

    def found(self, payload: DoorRestrictionsPayload, remote: Remote) -> Outcome:
        return _portal_outcome(remote.device, _restrictions(remote))

    def conflicts(self, payload: DoorRestrictionsPayload, base: Any, remote: Remote) -> dict[str, dict[str, Any]]:
        if payload.entity_ids is None or not isinstance(base, dict) or "entity_ids" not in base:
            return {}
        now, before, queued = (
            list(_restrictions(remote).entity_ids),
            sorted(base["entity_ids"]),
            self.target(payload, remote),
        )
        if now not in (before, queued):
            return {"entity_ids": {"base": before, "remote": now, "queued": queued}}
        return {}

    def unsendable(self, payload: DoorRestrictionsPayload, remote: Remote) -> str | None:
        if payload.entity_ids is None:
            problem = _meaning_problem(payload, list(_restrictions(remote).entity_ids), "OpenApp")
            if problem:
                return problem
        target = self.target(payload, remote)
        if len(target) > MAX_EDIT_ENTITIES:
            return f"the portal would list {len(target)} entities, more than one edit sends ({MAX_EDIT_ENTITIES})"
        return None

    def push(self, payload: DoorRestrictionsPayload, remote: Remote, reading: Reading) -> Outcome:
        current = _restrictions(remote)
        target = self.target(payload, remote)
        forced = reading.settings.door_restrictions_key
        key = current.key if forced == "auto" else forced
        answer = reading.client.set_door_restrictions(reading.org_id, reading.device_id, key, target)
        if list(answer.entity_ids) != target:
            raise InvalidResponseError(
                f"set_door_restrictions: asked for {len(target)} entities, the answer lists {len(answer.entity_ids)}; "
                "it was not believed"
            )
        return _portal_outcome(remote.device, answer)

    def rebase(self, payload: DoorRestrictionsPayload, base: Any, remote: Remote) -> dict[str, tuple[Any, Any]]:
        if payload.entity_ids is None or not isinstance(base, dict) or "entity_ids" not in base:
            return {}
        return {"entity_ids": (base["entity_ids"], self.target(payload, remote))}

    @staticmethod
    def target(payload: DoorRestrictionsPayload, remote: Remote) -> list[str]:
        """The list the edit wants, against OpenApp's current one."""
        if payload.entity_ids is not None:
            return sorted(set(payload.entity_ids))
        return _added_and_removed(payload, _restrictions(remote).entity_ids)

    def describe(self, payload: DoorRestrictionsPayload) -> str:
        if payload.entity_ids is None:
            return f"door_restrictions +{len(payload.add)} -{len(payload.remove)}"
        if not payload.entity_ids:
            return "door_restrictions unrestrict (anyone may pass)"
        return f"door_restrictions set {len(payload.entity_ids)} entities"


def _door_fields(raw: object, usage: str) -> dict[str, Any]:
    """A door-restrictions payload as a JSON object of known fields, one form only (EditProblem: why not)."""
    if not isinstance(raw, dict) or not raw:
        raise EditProblem(f"door restrictions need a payload: {usage}")
    unknown = sorted(set(raw) - {"entity_ids", "add", "remove"})
    if unknown:
        raise EditProblem(f"unknown field(s) {', '.join(preview(f) for f in unknown)} (use {usage})")
    if "entity_ids" in raw and ("add" in raw or "remove" in raw):
        raise EditProblem("give either entity_ids (the whole list) or add / remove, not both")
    return raw


def _entity_lists(given: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """The lists of entity ids given, each checked; at most :data:`MAX_EDIT_ENTITIES` in all."""
    lists: dict[str, tuple[str, ...]] = {}
    named = 0
    for name in ("entity_ids", "add", "remove"):
        if name not in given:
            continue
        ids = given[name]
        if not isinstance(ids, list):
            raise EditProblem(f"{name} must be a list of entity ids")
        named += len(ids)
        if named > MAX_EDIT_ENTITIES:
            raise EditProblem(f"it names more than {MAX_EDIT_ENTITIES} entities, more than one edit may")
        problem = next(filter(None, map(entity_id_problem, ids)), None)
        if problem:
            raise EditProblem(f"{name} holds {problem}")
        lists[name] = tuple(ids)
    return lists


def _restrictions(remote: Remote) -> DoorRestrictions:
    """The portal's list as read before the push (a door-restrictions edit's read always reads it)."""
    assert remote.restrictions is not None
    return remote.restrictions


def _portal_outcome(device: Device, restrictions: DoorRestrictions) -> Outcome:
    """The portal and its new list, as the mirror records an answer (asked again at the next pass)."""
    return Outcome(
        device, RestrictionsAnswer(device.id, device.fingerprint, RestrictionStatus.OK, utcnow(), restrictions)
    )


def _added_and_removed(payload: DoorRestrictionsPayload, current: Collection[str]) -> list[str]:
    return sorted((set(current) | set(payload.add)) - set(payload.remove))


def _meaning_problem(payload: DoorRestrictionsPayload, current: list[str], whose: str) -> str | None:
    """Why an add / remove edit may not go against ``current`` (``whose`` list it is): it would
    make a restricted portal unrestricted, or the reverse. None when it may."""
    target = _added_and_removed(payload, current)
    if current and not target:
        return (
            f"removing {_entities(len(payload.remove))} would leave the portal with none, which OpenApp "
            f"reads as not restricted: anyone could open it ({whose} lists {len(current)}). An add / remove edit "
            "never does that; to let everyone through on purpose, queue the whole list: "
            "`syncd door-restrictions ID --unrestrict` (entity_ids: [])"
        )
    if not current and not target and payload.remove:
        return (
            f"the portal is not restricted ({whose} lists no entity): anyone may open it, the "
            f"{_entities(len(payload.remove))} to remove included. Removing cannot shut them out; to "
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


KINDS: dict[str, EditKind[Any]] = {k.action: k for k in (Update(), Restore(), Delete(), DoorRestrictionsEdit())}


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
    try:
        parsed = kind.parse(payload)
        mirrored = _editable(store, device_id, orgs)
        problem = kind.mirror_problem(mirrored, parsed, store)
        if problem:
            raise EditProblem(problem)
        credentials = kind.recorded_credentials(parsed, mirrored, store)
    except EditProblem as exc:
        raise ConfigError(f"{action} of {device_id}: {exc}") from None
    return EditQueue(store).add(
        {
            "device_id": device_id,
            "org_id": mirrored.device.org_id,
            "action": action,
            "payload": payload if payload else None,
            "base": kind.base(parsed, mirrored, store),
            "base_updated_at": mirrored.device.updated_at,
            "requested_by": requested_by,
            "requested_via": EditSource.CLI,
            "credential_pointers": credentials or None,
        },
        awaiting_approval=action in needs_approval,
    )


def _editable(store: Store, device_id: str, orgs: Collection[str]) -> Mirrored:
    """The mirrored device, if an edit may be queued for it (ConfigError: why not)."""
    mirrored = read_mirrored(store, device_id)
    if mirrored is None:
        raise ConfigError(f"device {device_id} is not in the mirror (run `syncd run-once` first, or check the id)")
    if mirrored.device.org_id not in orgs:
        org = preview(mirrored.device.org_id)
        raise ConfigError(f"device {device_id} belongs to org {org}, which is not configured")
    if mirrored.state == DeviceState.PURGED:
        raise ConfigError(f"device {device_id} was purged from OpenApp; it cannot be edited")
    return mirrored


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
    """``payload`` (as a row holds it) with the credential values under ``pointers`` masked, for output."""
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
    mirrored = read_mirrored(store, edit.device_id)
    if mirrored is None:
        return sorted(pointers)
    pointers |= credentials_named(mirrored.device)
    schema = _mirrored_schema(store, mirrored.device)
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


def _mirrored_schema(store: Store, device: Device) -> Any:
    if not device.integration_id:
        return None
    row = MetadataDefinitions(store).for_integration(device.org_id, device.integration_id)
    return row["json_schema"] if row else None


def _check_against_mirrored_schema(
    store: Store, device: Device, payload: UpdatePayload, metadata: dict[str, Any]
) -> list[str]:
    """Check a metadata edit against the mirrored schema (EditProblem naming the problem); the
    pointers of its credentials, to record with it."""
    cleared = payload.cleared
    pointers = credentials_named(device) | cleared
    schema = _mirrored_schema(store, device)
    if schema is None:
        return sorted(pointers)
    try:
        pointers |= _usable(schema).credentials_in(metadata)
    except SchemaUnusable as exc:
        raise EditProblem(f"the provider's metadata schema cannot be used: {exc}") from None
    remote = Remote(device, credentials=frozenset(pointers))
    problem = metadata_problem(schema, _without(metadata, cleared), remote, cleared)
    if problem:
        raise EditProblem(problem)
    return sorted(pointers)


def _size_problem(raw: object) -> str | None:
    try:
        size = len(orjson.dumps(raw))
    except (orjson.JSONEncodeError, TypeError) as exc:
        if "recursion" in str(exc).lower():
            return f"payload is nested more than {MAX_NESTING} levels deep"
        return f"payload is not storable JSON ({one_line(str(exc), 80)})"
    if size > MAX_EDIT_BYTES:
        return f"payload is {size} bytes of JSON, more than an edit may be ({MAX_EDIT_BYTES})"
    where = nul_path(raw)
    if where is not None:
        return f"payload holds a NUL character (U+0000) at {where}, which the mirror cannot store"
    return None


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
