"""``syncd check-config`` and ``syncd db upgrade`` / ``syncd db current``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import TextIO

from syncd.api import OpenAppClient
from syncd.cli.args import (
    EXIT_FAILED,
    EXIT_OK,
    Commands,
    add_command,
    config_option,
    config_path,
    load,
    prepared_store,
)
from syncd.config import Config
from syncd.errors import (
    AuthError,
    ConfigError,
    ForbiddenError,
    NotFoundError,
    StoppedError,
    StoreError,
    SyncdError,
    TransientError,
    UnreachableError,
)
from syncd.store import Store, redact_url
from syncd.vocab import DeviceState


def add_commands(commands: Commands) -> None:
    """``check-config`` and ``db``."""
    p = add_command(
        commands,
        "check-config",
        "validate the configuration and report every problem",
        "Read the configuration file, resolve the API key and check that the mirror can be used where "
        "database.url says (SQLite: the folder and file permissions; PostgreSQL: a connection), listing every "
        "problem at once (exit 2). With --online it also asks OpenApp: GET /status, then one list page of one "
        "device per org with the real key and X-Org, a verdict per org (exit 1 if any fails).",
        "syncd check-config --config /etc/syncd/config.toml",
        "syncd check-config --online",
    )
    config_option(p)
    p.add_argument(
        "--online",
        action="store_true",
        help="also ask OpenApp: GET /status, then one list page of one device per org, with the real key and X-Org",
    )
    p.set_defaults(handler=cmd_check_config)

    p = add_command(
        commands,
        "db",
        "database maintenance: upgrade, current",
        "The mirror's schema: `db upgrade` applies pending migrations (making the mirror if there is none), "
        "`db current` prints the revision the database is at.",
        "syncd db upgrade --config /etc/syncd/config.toml",
        "syncd db current",
    )
    actions = p.add_subparsers(metavar="ACTION")
    q = add_command(
        actions,
        "upgrade",
        "apply schema migrations",
        "Apply the schema migrations the database lacks, making the mirror if there is none. Safe to run on "
        "every deploy; concurrent upgrades of one PostgreSQL database are serialised.",
        "syncd db upgrade --config /etc/syncd/config.toml",
    )
    config_option(q)
    q.set_defaults(handler=cmd_db_upgrade)
    q = add_command(
        actions,
        "current",
        "show the schema revision of the database",
        "Print the schema revision the mirror is at (`empty` for a PostgreSQL database without one). It only "
        "reads, and makes no mirror.",
        "syncd db current --config /etc/syncd/config.toml",
    )
    config_option(q)
    q.set_defaults(handler=cmd_db_current)
    p.set_defaults(handler=None)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the file and resolve the key; check that the mirror's location can be used; with
    ``--online``, that OpenApp answers at api.base_url and lets the key read each org."""
    path = config_path(args)
    config = load(args)
    usable = True
    try:
        Store.check_access(config.database.url)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}", where=str(path)) from None
    except StoreError as exc:  # the database is down or refuses us: not a problem of the file (exit 1)
        print(f"{path}: the configuration is valid, but the database cannot be used now: {exc}", file=sys.stderr)
        usable = False
    if usable:
        print(f"{path}: OK")
        api = config.api
        print(f"  api       {api.base_url} (auth header: {api.auth_header}, page size {api.page_size})")
        print(f"  database  {redact_url(config.database.url)}")
        print(f"  orgs      {len(config.orgs)}: {', '.join(o.id for o in config.orgs)}")
    if args.online:
        usable = check_online(config, sys.stdout) and usable
    return EXIT_OK if usable else EXIT_FAILED


# What each error means for an operator checking the configuration, by its class (the first that matches).
VERDICTS: tuple[tuple[type[SyncdError], str], ...] = (
    (AuthError, "key refused"),
    (ForbiddenError, "org not accessible"),
    (NotFoundError, "base URL wrong"),
    (StoppedError, "stopped"),
    (TransientError, "unavailable now"),
    (SyncdError, "failed"),
)
UNREACHABLE = {"dns": "DNS failure", "tls": "TLS failure", "refused": "base URL wrong"}


def verdict(error: SyncdError) -> str:
    """A short name for what went wrong: key refused, org not accessible, base URL wrong, ..."""
    if isinstance(error, UnreachableError):
        return UNREACHABLE.get(error.reason, "unreachable")
    return next(name for cls, name in VERDICTS if isinstance(error, cls))


def check_online(config: Config, out: TextIO) -> bool:
    """``GET /status``, then one list page of one device per configured org, each asked once
    (no retries: this reports how things are now); a line per check. Whether all succeeded."""
    api = replace(config.api, retry=replace(config.api.retry, max_attempts=1))
    mirrored = _mirrored_devices(config)
    print(f"online check of {api.base_url}:", file=out)
    rows: list[tuple[str, str, str]] = []
    with OpenAppClient(api) as client:
        try:
            client.probe_status()
        except SyncdError as exc:
            rows.append(("GET /status", verdict(exc), str(exc)))
        else:
            rows.append(("GET /status", "ok", "OpenApp answers at api.base_url"))
            for org in config.orgs:
                try:
                    seen, total = client.probe_org(org.id)
                except SyncdError as exc:
                    rows.append((org.id, verdict(exc), str(exc)))
                    continue
                rows.append((org.id, "ok", _devices(seen, total, mirrored.get(org.id))))
    width = max(len(what) for what, _, _ in rows)
    for what, result, detail in rows:
        print(f"  {what:<{width}}  {result}: {detail}", file=out)
    if rows[0][1] != "ok":
        print("  the orgs were not asked: OpenApp cannot be reached at api.base_url", file=out)
    return all(result == "ok" for _, result, _ in rows)


def _devices(seen: int, total: int | None, mirrored: int | None) -> str:
    """What one page of at most one device says about an org's devices."""
    if total is not None:
        text = f"key accepted, org readable, {total:,} devices"
    elif seen:
        text = "key accepted, org readable, it has devices (OpenApp's list gives no total)"
    else:
        text = "key accepted, org readable, but it has no devices"
    return text + (f"; the mirror holds {mirrored:,}" if mirrored is not None else "")


def _mirrored_devices(config: Config) -> dict[str, int]:
    """Devices per org in the mirror (soft-deleted included, purged not), if there is a mirror yet."""
    try:
        store = Store(config.database.url, read_only=True)
    except SyncdError:
        return {}
    try:
        counts = store.state_counts()
    except SyncdError:
        return {}
    finally:
        store.close()
    return {
        org: sum(n for state, n in by_state.items() if state != DeviceState.PURGED) for org, by_state in counts.items()
    }


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Apply pending migrations."""
    config = load(args, with_key=False)
    with prepared_store(config, prepare=False, create=True) as store:
        before = store.schema_revision()
        store.upgrade()
        after = store.schema_revision()
    print(f"schema: {before or 'empty'} -> {after}" if before != after else f"schema already at {after}")
    return EXIT_OK


def cmd_db_current(args: argparse.Namespace) -> int:
    """Print the schema revision."""
    config = load(args, with_key=False)
    with prepared_store(config, read_only=True, prepare=False) as store:
        print(store.schema_revision() or "empty (run `syncd db upgrade`)")
    return EXIT_OK
