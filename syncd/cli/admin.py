"""``syncd check-config`` and ``syncd db upgrade`` / ``syncd db current``."""

from __future__ import annotations

import argparse
import sys

from syncd.cli.args import (
    EXIT_FAILED,
    EXIT_OK,
    Commands,
    config_option,
    config_path,
    load,
    prepared_store,
)
from syncd.errors import ConfigError, StoreError
from syncd.store import Store, redact_url


def add_commands(commands: Commands) -> None:
    """``check-config`` and ``db``."""
    p = commands.add_parser("check-config", help="validate the configuration and report every problem")
    config_option(p)
    p.set_defaults(handler=cmd_check_config)

    p = commands.add_parser("db", help="database maintenance")
    actions = p.add_subparsers(metavar="ACTION")
    q = actions.add_parser("upgrade", help="apply schema migrations")
    config_option(q)
    q.set_defaults(handler=cmd_db_upgrade)
    q = actions.add_parser("current", help="show the schema revision of the database")
    config_option(q)
    q.set_defaults(handler=cmd_db_current)
    p.set_defaults(handler=None)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the file and resolve the key; check that the mirror's location can be used."""
    path = config_path(args)
    config = load(args)
    try:
        Store.check_access(config.database.url)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}", where=str(path)) from None
    except StoreError as exc:  # the database is down or refuses us: not a problem of the file (exit 1)
        print(f"{path}: the configuration is valid, but the database cannot be used now: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{path}: OK")
    api = config.api
    print(f"  api       {api.base_url} (auth header: {api.auth_header}, page size {api.page_size})")
    print(f"  database  {redact_url(config.database.url)}")
    print(f"  orgs      {len(config.orgs)}: {', '.join(o.id for o in config.orgs)}")
    return EXIT_OK


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
