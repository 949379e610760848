"""Write-back from the command line: ``edit``, ``restore``, ``delete``, ``door-restrictions``,
``edits`` (``retry``, ``cancel``, ``approve``, ``reject``), ``reconcile-once``. It parses and prints;
the edits' rules are in :mod:`syncd.edits`, the queue's in :mod:`syncd.store.edits`."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from syncd.cli.args import (
    EXIT_FAILED,
    EXIT_OK,
    Commands,
    add_command,
    config_option,
    edit_id,
    load,
    org_ids,
    prepared_store,
)
from syncd.cli.output import print_edits
from syncd.cli.signals import stop_on_signals
from syncd.config import Config
from syncd.edits import KINDS, EditProblem, cancel_edit, edit_credentials, queue_edit, read_mirrored, redacted
from syncd.errors import ConfigError
from syncd.passes import instance_name, writeback_client
from syncd.reconcile import Reconciler, requester
from syncd.store import Store
from syncd.store.details import PortalRestrictions
from syncd.store.edits import EditQueue
from syncd.vocab import EditAction, EditResult, EditStatus

EDITS_HELP = (
    "List the write-back queue, oldest first: per edit its kind, status, attempts, when and by whom it "
    "was requested (and how: cli or sql), what it sets, and approvals, rejections and errors."
)
APPROVE_HELP = """\
Approve an edit that awaits a second person's approval (its kind is listed in
writeback.require_approval). The approval is recorded as approved_by (your user@host) and
approved_at (the database's clock), and the edit becomes pending: the reconciler pushes it at its
next round, computed against OpenApp's state at that moment (a door-restrictions --add / --remove
against the portal's live list). Whoever requested the edit cannot approve it, from another host
either: syncd compares the user names (PostgreSQL also refuses such an approval made in SQL)."""
REJECT_HELP = """\
Reject an edit that awaits approval: it ends 'rejected' for good, with rejected_by (your
user@host), rejected_at and the reason; nothing is sent to OpenApp, and `syncd edits retry` cannot
revive it (queue a new edit instead). Rejecting is the second person's answer: the requester
withdraws an edit with `syncd edits cancel ID`."""


def add_commands(commands: Commands) -> None:
    """``edit``, ``restore``, ``edits`` and ``reconcile-once``."""
    p = add_command(
        commands,
        "edit",
        "queue a change of a device, to be pushed to OpenApp",
        "Queue an update of a mirrored device: its name in some locales, its zone, its external id, its "
        "device_metadata (credential fields left out keep their values) or clearing a stored credential. "
        "Nothing is sent now: `syncd reconcile-once` or the daemon pushes it, and `syncd edits` shows how it "
        "went. An unknown or purged device and malformed input are refused before anything is queued.",
        "syncd edit 01HDEV00000000000000000000 --name en='Front door' --name fr='Porte'",
        'syncd edit 01HDEV00000000000000000000 --metadata-json \'{"kind": "gate"}\'',
    )
    config_option(p)
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.add_argument(
        "--name",
        action="append",
        metavar="LOCALE=TEXT",
        help="set the name in one locale (repeatable); other locales are kept",
    )
    zone = p.add_mutually_exclusive_group()
    zone.add_argument("--zone-id", metavar="ZONE", help="move the device to this zone")
    zone.add_argument("--clear-zone", action="store_true", help="take the device out of its zone")
    p.add_argument("--external-id", metavar="ID", help="set the external id")
    p.add_argument(
        "--metadata-json",
        metavar="JSON",
        help="replace device_metadata with this JSON object (credential fields left out keep their values)",
    )
    p.add_argument(
        "--clear-credential",
        action="append",
        metavar="FIELD",
        help="clear this stored write-only credential field of device_metadata (repeatable)",
    )
    p.set_defaults(handler=cmd_edit)

    p = add_command(
        commands,
        "restore",
        "queue the restore of a soft-deleted device",
        "Queue the restore of a device that is soft-deleted in OpenApp (and so in the mirror). It is pushed by "
        "`syncd reconcile-once` or the daemon; `syncd edits` shows how it went.",
        "syncd restore 01HDEV00000000000000000000",
    )
    config_option(p)
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.set_defaults(handler=cmd_restore)

    p = add_command(
        commands,
        "delete",
        "queue the soft delete of a device (asks first on a terminal)",
        "Queue the soft delete of a device (it can be restored). On a terminal it asks first; elsewhere give "
        "--yes. At most writeback.max_deletes_per_hour are sent per hour; more wait in the queue, pending.",
        "syncd delete 01HDEV00000000000000000000",
        "syncd delete 01HDEV00000000000000000000 --yes",
    )
    config_option(p)
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(handler=cmd_delete)

    p = add_command(
        commands,
        "door-restrictions",
        "queue a change of which entities a virtual_access_portal lets through",
        "Queue a change of a portal's door restrictions: the whole list (--set), everyone (--unrestrict), or "
        "entities added or removed against OpenApp's list when the edit is pushed (--add, --remove; these never "
        "make a restricted portal unrestricted, nor the reverse). Entity ids are ULIDs.",
        "syncd door-restrictions 01HDEV00000000000000000000 --add 01HENT00000000000000000001",
        "syncd door-restrictions 01HDEV00000000000000000000 --unrestrict",
    )
    config_option(p)
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.add_argument("--set", nargs="*", metavar="ENTITY_ID", help="the whole list (at least one; see --unrestrict)")
    p.add_argument("--unrestrict", action="store_true", help="let everyone through: the whole list, empty")
    p.add_argument(
        "--add",
        nargs="+",
        metavar="ENTITY_ID",
        help="let these through too, against OpenApp's list; never on a portal that is not restricted",
    )
    p.add_argument(
        "--remove",
        nargs="+",
        metavar="ENTITY_ID",
        help="no longer let these through; never the portal's last ones (that would let everyone through)",
    )
    p.add_argument(
        "--yes",
        action="store_true",
        help="do not ask before letting through an entity never seen on a door of the org (a typo?)",
    )
    p.set_defaults(handler=cmd_door_restrictions)

    p = add_command(
        commands,
        "edits",
        "list queued edits; `edits retry|cancel|approve|reject ID`",
        EDITS_HELP,
        "syncd edits --status conflict",
        "syncd edits --status awaiting_approval",
        "syncd edits --device 01HDEV00000000000000000000",
        "syncd edits retry 42",
    )
    config_option(p)
    p.add_argument("--status", choices=[s.value for s in EditStatus], help="only edits with this status")
    p.add_argument("--device", metavar="DEVICE_ID", help="only edits of this device")
    p.set_defaults(handler=cmd_edits)
    actions = p.add_subparsers(metavar="ACTION")
    for name, helptext, description in (
        (
            "retry",
            "queue a failed, conflicting or cancelled edit again (one that needs approval awaits it again)",
            "Queue a failed, conflicting or cancelled edit again, as pending, due now: the next reconcile "
            "checks it against OpenApp afresh (a conflict is judged again against the device as it is then). "
            "An edit of a kind that needs approval awaits a new approval.",
        ),
        (
            "cancel",
            "drop a pending, failed, conflicting or awaiting edit",
            "Drop an edit that is pending, failed, conflicting or awaiting approval: it is never sent (an edit "
            "being sent cannot be cancelled). Credentials it carried are redacted.",
        ),
    ):
        q = add_command(actions, name, helptext, description, f"syncd edits {name} 42")
        config_option(q)
        q.add_argument("edit_id", type=edit_id, metavar="ID")
        q.set_defaults(handler=cmd_edits_change, change=name)
    q = add_command(
        actions,
        "approve",
        "approve an edit awaiting approval (not your own)",
        APPROVE_HELP,
        "syncd edits --status awaiting_approval      # what waits, and who asked",
        "syncd edits approve 42                      # as another user than the requester",
    )
    config_option(q)
    q.add_argument("edit_id", type=edit_id, metavar="ID", help="the edit's id (`syncd edits` lists them)")
    q.set_defaults(handler=cmd_edits_decide, change="approve")
    q = add_command(
        actions,
        "reject",
        "reject an edit awaiting approval, with the reason",
        REJECT_HELP,
        "syncd edits reject 42 --reason 'ticket SEC-118 asks for door 3, not door 2'",
    )
    config_option(q)
    q.add_argument("edit_id", type=edit_id, metavar="ID", help="the edit's id (`syncd edits` lists them)")
    q.add_argument("--reason", required=True, metavar="TEXT", help="why (kept with the edit, one line)")
    q.set_defaults(handler=cmd_edits_decide, change="reject")

    p = add_command(
        commands,
        "reconcile-once",
        "push every due queued edit once, then exit",
        "Push every queued edit that is due now, once, as the daemon does every writeback.interval: each is "
        "checked against OpenApp first (already done? changed there since it was queued?), then sent. Exit 1 "
        "if any failed or conflicted, or OpenApp refused the key (the edits stay pending).",
        "syncd reconcile-once --config /etc/syncd/config.toml",
    )
    config_option(p)
    p.set_defaults(handler=cmd_reconcile_once)


def cmd_edit(args: argparse.Namespace) -> int:
    """Queue an update of a device."""
    config = load(args, with_key=False)
    payload: dict[str, Any] = {}
    with prepared_store(config) as store:
        if args.name:
            mirrored = read_mirrored(store, args.device_id)
            current = mirrored.device.name if mirrored else {}
            payload["name"] = {**current, **dict(_locale_text(item) for item in args.name)}
        if args.zone_id is not None or args.clear_zone:
            payload["zone_id"] = None if args.clear_zone else args.zone_id
        if args.external_id is not None:
            payload["external_id"] = args.external_id
        if args.metadata_json is not None:
            try:
                payload["device_metadata"] = json.loads(args.metadata_json)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--metadata-json is not valid JSON: {exc}") from None
        if args.clear_credential:
            payload["clear_credentials"] = list(args.clear_credential)
        if not payload:
            raise ConfigError(
                "nothing to change: give --name, --zone-id/--clear-zone, --external-id, --metadata-json "
                "or --clear-credential"
            )
        queued = _queue(store, config, args.device_id, EditAction.UPDATE, payload)
        edit = EditQueue(store).get(queued)
        shown = redacted(payload, edit_credentials(store, edit) if edit else ())
    print(f"queued edit {queued}: update {args.device_id} {json.dumps(shown, ensure_ascii=False)}")
    _approval_note(config, EditAction.UPDATE, queued)
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    """Queue the restore of a soft-deleted device."""
    config = load(args, with_key=False)
    with prepared_store(config) as store:
        queued = _queue(store, config, args.device_id, EditAction.RESTORE, None)
    print(f"queued edit {queued}: restore {args.device_id}")
    _approval_note(config, EditAction.RESTORE, queued)
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    """Queue a soft delete, after a yes on a terminal (or --yes)."""
    config = load(args, with_key=False)
    with prepared_store(config) as store:
        mirrored = read_mirrored(store, args.device_id)
        if not args.yes:
            if not sys.stdin.isatty():
                raise ConfigError("delete asks for confirmation on a terminal; not on one, confirm with --yes")
            name = json.dumps(mirrored.device.name if mirrored else {}, ensure_ascii=False)
            answer = input(f"Soft-delete device {args.device_id} {name} in OpenApp? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing was queued")
                return EXIT_FAILED
        queued = _queue(store, config, args.device_id, EditAction.DELETE, None)
    print(f"queued edit {queued}: soft delete {args.device_id}")
    _approval_note(config, EditAction.DELETE, queued)
    return EXIT_OK


def cmd_door_restrictions(args: argparse.Namespace) -> int:
    """Queue a change of a portal's door restrictions."""
    config = load(args, with_key=False)
    whole = [name for name, given in (("--set", args.set is not None), ("--unrestrict", args.unrestrict)) if given]
    if len(whole) > 1 or (whole and (args.add or args.remove)):
        raise ConfigError(f"{whole[0]} gives the whole list: not with {', '.join(whole[1:]) or '--add or --remove'}")
    if args.set is not None and not args.set:  # an empty shell variable must not open a door to everyone
        raise ConfigError("--set names no entity; to let everyone through, say so: --unrestrict")
    if args.unrestrict:
        payload: dict[str, Any] = {"entity_ids": []}
    elif args.set is not None:
        payload = {"entity_ids": list(dict.fromkeys(args.set))}
    elif args.add or args.remove:
        payload = {"add": list(dict.fromkeys(args.add or [])), "remove": list(dict.fromkeys(args.remove or []))}
    else:
        raise ConfigError(
            "give --set ENTITY_ID ... (the whole list), --unrestrict (let everyone through), "
            "or --add / --remove ENTITY_ID ..."
        )
    with prepared_store(config) as store:
        if not args.yes and not _confirm_unseen(store, config, args.device_id, payload):
            print("nothing was queued")
            return EXIT_FAILED
        queued = _queue(store, config, args.device_id, EditAction.DOOR_RESTRICTIONS, payload)
    print(f"queued edit {queued}: {KINDS[EditAction.DOOR_RESTRICTIONS].summary(payload)} on {args.device_id}")
    _approval_note(config, EditAction.DOOR_RESTRICTIONS, queued)
    return EXIT_OK


def _confirm_unseen(store: Store, config: Config, device_id: str, payload: dict[str, Any]) -> bool:
    """Whether to queue a door-restrictions edit that lets through entities the mirror never saw on
    a portal of the device's org: a typo there locks someone out or lets someone in. Asks on a
    terminal; elsewhere ConfigError (``--yes`` says it is meant)."""
    granted = payload.get("entity_ids") or payload.get("add") or []
    kind = KINDS[EditAction.DOOR_RESTRICTIONS]
    mirrored = read_mirrored(store, device_id)
    if not granted or mirrored is None or mirrored.device.org_id not in org_ids(config):
        return True  # nothing to ask, or queue_edit names the problem
    try:
        if kind.mirror_problem(mirrored, kind.parse(payload), store):
            return True
    except EditProblem:
        return True
    org_id = mirrored.device.org_id
    unseen = PortalRestrictions(store).unseen_entities(org_id, granted)
    if not unseen:
        return True
    shown = ", ".join(unseen[:5]) + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
    what = f"entity id{'s' if len(unseen) > 1 else ''} {shown}"
    if not sys.stdin.isatty():
        raise ConfigError(
            f"door-restrictions: {what} never seen on a door of org {org_id} in the mirror "
            "(a typo?); not on a terminal, confirm with --yes"
        )
    print(
        f"{what} never seen on a door of org {org_id} in the mirror: a typo would let the wrong "
        "entity in, or leave the right one out."
    )
    answer = input("Queue the edit anyway? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _queue(store: Store, config: Config, device_id: str, action: str, payload: dict[str, Any] | None) -> int:
    """Queue an edit as the CLI's user; it awaits approval when its kind needs one."""
    needs = config.writeback.require_approval
    return queue_edit(store, device_id, action, payload, requester(), org_ids(config), needs)


def _approval_note(config: Config, action: str, queued: int) -> None:
    if action in config.writeback.require_approval:
        print(
            f"edit {queued} awaits approval (writeback.require_approval lists {action}): another person "
            f"approves it with `syncd edits approve {queued}`"
        )


def cmd_edits(args: argparse.Namespace) -> int:
    """List the queue."""
    config = load(args, with_key=False)
    with prepared_store(config) as store:
        edits = EditQueue(store).find(args.status, args.device)
        credentials = {e.id: edit_credentials(store, e) for e in edits}
    shown = [(e, redacted(e.payload, credentials[e.id]), KINDS[e.action].summary(e.payload)) for e in edits]
    print_edits(shown, sys.stdout)
    return EXIT_OK


def cmd_edits_change(args: argparse.Namespace) -> int:
    """``edits retry ID`` / ``edits cancel ID``: the queue's own rules say which edits may."""
    config = load(args, with_key=False)
    now = datetime.now(UTC)
    with prepared_store(config) as store:
        queue = EditQueue(store)
        if args.change == "retry":
            was = queue.retry(args.edit_id, now, config.writeback.require_approval)
        else:
            was = cancel_edit(store, args.edit_id, now)
        edit = queue.get(args.edit_id)
    print(f"edit {args.edit_id}: {was} -> {edit.status.value if edit else '?'}")
    return EXIT_OK


def cmd_edits_decide(args: argparse.Namespace) -> int:
    """``edits approve ID`` / ``edits reject ID --reason TEXT``, as the CLI's user."""
    config = load(args, with_key=False)
    now = datetime.now(UTC)
    needs = config.writeback.require_approval
    who = requester()
    with prepared_store(config) as store:
        queue = EditQueue(store)
        if args.change == "approve":
            was = queue.approve(args.edit_id, who, now, needs)
        else:
            if not args.reason.strip():
                raise ConfigError("--reason is empty: say why the edit is rejected")
            was = queue.reject(args.edit_id, who, args.reason, now, needs)
        edit = queue.get(args.edit_id)
    status = edit.status.value if edit else "?"
    print(f"edit {args.edit_id}: {was} -> {status} ({'approved' if args.change == 'approve' else 'rejected'} by {who})")
    if args.change == "approve":
        print("the reconciler pushes it at its next round (`syncd run`, or `syncd reconcile-once`)")
    return EXIT_OK


def cmd_reconcile_once(args: argparse.Namespace) -> int:
    """Push every edit due now, once."""
    config = load(args)
    with (
        prepared_store(config) as store,
        stop_on_signals("finishing the current edit, then stopping") as stop,
        writeback_client(config, stop) as client,
    ):
        reconciler = Reconciler(client, store, config.writeback, instance_name(), org_ids(config), stop)
        results = reconciler.run_once()
        counts = EditQueue(store).counts()
    done = ", ".join(f"{n} {kind}" for kind, n in sorted(results.items())) or "nothing was due"
    print(f"reconcile: {done}; queue now: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "empty"))
    if results[EditResult.PAUSED]:
        print("reconcile: OpenApp rejected the API key; the edits not attempted stay pending", file=sys.stderr)
    if results[EditResult.HELD]:
        for rule in filter(None, (kind.hold_rule(config.writeback) for kind in KINDS.values())):
            print(f"reconcile: {rule.capped} beyond writeback.{rule.setting} wait (see `syncd edits`)", file=sys.stderr)
    failed = results[EditResult.FAILED] or results[EditResult.CONFLICT] or results[EditResult.PAUSED]
    return EXIT_FAILED if failed else EXIT_OK


def _locale_text(item: str) -> tuple[str, str]:
    locale, sep, text = item.partition("=")
    if not sep or not locale.strip() or not text:
        raise ConfigError(f"--name {item!r}: use LOCALE=TEXT, e.g. --name en='Front door'")
    return locale.strip(), text
