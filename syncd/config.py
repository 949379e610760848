"""syncd's configuration: one frozen dataclass per TOML section, every key declared once.

A key is a field of its section's dataclass, declared with :func:`setting`: its default, its kind
(number, duration, size, choice ...) and its bounds. From that one declaration come the TOML
reader, the list of allowed keys, the validation and the defaults. A section validates itself when
it is made (``__post_init__``), so a ``Config`` built in code is checked as a file is; the reader
collects every problem of a file before it raises. A new key is one line in its dataclass.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import InitVar, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, cast
from urllib.parse import urlsplit

from syncd.errors import ConfigError
from syncd.vocab import EditAction

MAX_PAGE_SIZE = 200
MIB = 1024 * 1024
AuthHeader = Literal["x-api-key", "bearer"]
LogFormat = Literal["auto", "console", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
_NUMBER = r"(\d+(?:\.\d+)?)"
_DURATION = re.compile(rf"^\s*(?:{_NUMBER}d)?\s*(?:{_NUMBER}h)?\s*(?:{_NUMBER}m)?\s*(?:{_NUMBER}s?)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": MIB, "GB": 1000**3, "GiB": 1024**3}
# Org ids go into the X-Org header and VARCHAR(64) columns: letters, digits and - _ . : only.
ORG_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
KEY_SOURCES = ("api_key", "api_key_env", "api_key_file", "api_key_credential")


class Secret:
    """A string that never shows itself in reprs, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: pass it straight to where it is needed, never to a log."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


Kind = Literal["int", "number", "duration", "size", "bool", "choice", "choices", "string"]


def setting(
    default: Any,
    kind: Kind,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] = (),
    note: str = "",
) -> Any:
    """Declare one configuration key: its default, its kind and its bounds (``note``: why, in messages)."""
    meta = {"kind": kind, "minimum": minimum, "maximum": maximum, "choices": choices, "note": note}
    return field(default=default, metadata=meta)


class Section:
    """A section of the configuration: checks each of its settings, and its own cross-field rules."""

    PREFIX: ClassVar[str]

    def __post_init__(self) -> None:
        self.check()

    def check(self, prefix: str | None = None) -> None:
        """ConfigError listing every problem of this section (``prefix`` names it in messages)."""
        where = prefix or self.PREFIX
        declared = [f for f in fields(cast(Any, self)) if "kind" in f.metadata]
        problems = [p for f in declared for p in _value_problems(self, f, where)]
        problems += list(self.rules(where))
        if problems:
            raise ConfigError("; ".join(problems), problems=problems)

    def rules(self, where: str) -> Iterator[str]:
        """Problems of the section beyond its single settings."""
        return iter(())


def _value_problems(section: Section, f: Any, where: str) -> Iterator[str]:
    value = getattr(section, f.name)
    if value is None and f.default is None:
        return iter(())
    return _KIND_CHECKS[f.metadata["kind"]](f"{where}.{f.name}", value, f.metadata)


def _bool_problems(name: str, value: Any, meta: Mapping[str, Any]) -> Iterator[str]:
    if not isinstance(value, bool):
        yield f"{name} must be true or false, got {value!r}"


def _choice_problems(name: str, value: Any, meta: Mapping[str, Any]) -> Iterator[str]:
    if value not in meta["choices"]:
        yield f"{name} must be one of {', '.join(meta['choices'])}, got {value!r}"


def _choices_problems(name: str, value: Any, meta: Mapping[str, Any]) -> Iterator[str]:
    if not isinstance(value, tuple):
        yield f"{name} must be a list of {', '.join(meta['choices'])}, got {value!r}"
        return
    unknown = [v for v in value if v not in meta["choices"]]
    if unknown:
        which = "which is not" if len(unknown) == 1 else "which are not"
        yield f"{name} lists {', '.join(repr(v) for v in unknown)}, {which} one of {', '.join(meta['choices'])}"


def _string_problems(name: str, value: Any, meta: Mapping[str, Any]) -> Iterator[str]:
    if not isinstance(value, str) or not value.strip():
        yield f"{name} must be a non-empty string, got {value!r}"


def _number_problems(name: str, value: Any, meta: Mapping[str, Any]) -> Iterator[str]:
    """A number of its kind (int and size: whole), within the setting's bounds."""
    kind = meta["kind"]
    whole = kind in ("int", "size")
    if isinstance(value, bool) or not isinstance(value, int if whole else int | float) or not math.isfinite(value):
        yield f"{name} must be {'a whole number' if whole else 'a finite number'}, got {value!r}"
        return
    low, high = meta["minimum"], meta["maximum"]
    note = f" {meta['note']}" if meta["note"] else ""
    if low is not None and value < low:
        yield f"{name} must be at least {_amount(kind, low)}{note}, got {_amount(kind, value)}"
    elif high is not None and value > high:
        yield f"{name} must be at most {_amount(kind, high)}{note}, got {_amount(kind, value)}"


_KIND_CHECKS: dict[Kind, Callable[[str, Any, Mapping[str, Any]], Iterator[str]]] = {
    "bool": _bool_problems,
    "choice": _choice_problems,
    "choices": _choices_problems,
    "string": _string_problems,
    "int": _number_problems,
    "number": _number_problems,
    "duration": _number_problems,
    "size": _number_problems,
}


def _amount(kind: str, value: float) -> str:
    if kind == "duration":
        return f"{value:g} second{'' if value == 1 else 's'}"
    if kind == "size":
        return f"{value / 1024:g}KiB" if value >= 1024 and value % 1024 == 0 else f"{value:g} bytes"
    return f"{value:g}"


@dataclass(frozen=True)
class RetryPolicy(Section):
    """How the API client retries what is safe to repeat."""

    PREFIX = "api.retry"
    max_attempts: int = setting(5, "int", minimum=1)
    base_delay: float = setting(0.25, "duration", minimum=0)
    max_delay: float = setting(8.0, "duration", minimum=0)
    max_retry_after: float = setting(60.0, "duration", minimum=0)
    deadline: float = setting(120.0, "duration", minimum=0)


@dataclass(frozen=True)
class ApiSettings(Section):
    """Where OpenApp is and how to talk to it."""

    PREFIX = "api"
    base_url: str
    api_key: Secret | None = field(repr=False)  # None for commands that never call the API
    auth_header: AuthHeader = setting("x-api-key", "choice", choices=("x-api-key", "bearer"))
    connect_timeout: float = setting(5.0, "duration", minimum=0)
    read_timeout: float = setting(30.0, "duration", minimum=0)
    request_timeout: float = setting(60.0, "duration", minimum=1)  # a whole request, however it trickles
    max_response_size: int = setting(16 * MIB, "size", minimum=64 * 1024)  # decompressed
    page_size: int = setting(MAX_PAGE_SIZE, "int", minimum=1, maximum=MAX_PAGE_SIZE, note="(the API's maximum)")
    page_concurrency: int = setting(32, "int", minimum=1, maximum=64)  # list pages of one org fetched at once
    max_concurrency: int = setting(32, "int", minimum=1, maximum=256)  # requests in flight, the whole process
    max_requests_per_second: float = setting(0.0, "number", minimum=0)  # the whole process; 0: no limit
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def rules(self, where: str) -> Iterator[str]:
        if not isinstance(self.base_url, str):
            yield f"{where}.base_url must be a URL, got {self.base_url!r}"
        else:
            yield from _base_url_problems(f"{where}.base_url", self.base_url)
        if not isinstance(self.retry, RetryPolicy):
            yield f"{where}.retry must be a RetryPolicy, got {type(self.retry).__name__}"
        if self.api_key is not None and not isinstance(self.api_key, Secret):
            yield f"{where}.api_key must be a Secret (never a plain string)"
        elif self.api_key is not None:
            trouble = key_problem(self.api_key.reveal())
            if trouble:
                yield f"{where}.api_key: the API key {trouble}"


@dataclass(frozen=True)
class DatabaseSettings(Section):
    """The mirror database."""

    PREFIX = "database"
    url: str = setting("sqlite:///syncd.db", "string")  # when absent from a file: see default_database_url
    auto_upgrade: bool = setting(True, "bool")

    def rules(self, where: str) -> Iterator[str]:
        if isinstance(self.url, str) and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", self.url):
            yield f"{where}.url must be a sqlite:/// or postgresql:// URL, got {_redact_url(self.url)!r}"


@dataclass(frozen=True)
class SyncSettings(Section):
    """How passes behave, and how the daemon schedules them."""

    PREFIX = "sync"
    concurrency: int = setting(4, "int", minimum=1)
    interval: float = setting(900.0, "duration", minimum=1)
    max_purge_fraction: float = setting(0.10, "number", minimum=0, maximum=1)
    last_seen_resolution: float = setting(86400.0, "duration", minimum=0)
    failure_backoff_max: float = setting(3600.0, "duration", minimum=0)
    shutdown_timeout: float = setting(30.0, "duration", minimum=0)
    pass_timeout: float = setting(3600.0, "duration", minimum=1)
    max_pages: int = setting(10_000, "int", minimum=1)  # 2,000,000 devices at 200 a page
    # After the scan: each portal's door restrictions (one request per portal, when it is new or
    # changed, else once per interval) and each integration's metadata definition (once per interval).
    door_restrictions: bool = setting(True, "bool")
    door_restrictions_interval: float = setting(3600.0, "duration", minimum=60)
    metadata_definitions: bool = setting(True, "bool")
    metadata_definitions_interval: float = setting(86400.0, "duration", minimum=3600)


@dataclass(frozen=True)
class WritebackSettings(Section):
    """How queued local edits are pushed to OpenApp."""

    PREFIX = "writeback"
    interval: float = setting(5.0, "duration", minimum=0.1)
    max_attempts: int = setting(8, "int", minimum=1)
    base_delay: float = setting(1.0, "duration", minimum=0)
    max_delay: float = setting(300.0, "duration", minimum=0)
    lease_timeout: float = setting(120.0, "duration", minimum=0)
    conflict_policy: str = setting("detect", "choice", choices=("detect", "force"))  # force: push anyway
    batch_size: int = setting(50, "int", minimum=1)
    max_deletes_per_hour: int = setting(20, "int", minimum=1)  # more soft deletes wait: bad SQL is not a mass delete
    # The door-restrictions body key to send: "auto" (the key OpenApp itself answered with), or one forced.
    door_restrictions_key: str = setting(
        "auto", "choice", choices=("auto", "apartment_entity_ids", "listing_entity_ids")
    )
    # Kinds of edit pushed only once a second person approved them (`syncd edits approve ID`).
    require_approval: tuple[str, ...] = setting((), "choices", choices=tuple(EditAction))
    approval_ttl: float = setting(7 * 86400.0, "duration", minimum=60)  # unapproved this long: cancelled


@dataclass(frozen=True)
class MetricsSettings(Section):
    """The Prometheus endpoint of ``syncd run`` (off when ``listen`` is None)."""

    PREFIX = "metrics"
    listen: tuple[str, int] | None = None  # "HOST:PORT" in the file

    def rules(self, where: str) -> Iterator[str]:
        if self.listen is None:
            return
        host, port = self.listen if isinstance(self.listen, tuple) and len(self.listen) == 2 else ("", -1)
        if not isinstance(host, str) or not host or isinstance(port, bool) or not isinstance(port, int):
            yield f"{where}.listen must be (HOST, PORT), got {self.listen!r}"
        elif not 0 <= port <= 65535:
            yield f"{where}.listen must be HOST:PORT (e.g. 127.0.0.1:9464), got {host}:{port}"


@dataclass(frozen=True)
class LoggingSettings(Section):
    """Where log lines go and how much."""

    PREFIX = "logging"
    format: LogFormat = setting("auto", "choice", choices=("auto", "console", "json"))
    level: LogLevel = setting("info", "choice", choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class OrgSettings(Section):
    """One organisation to mirror, with optional list filters."""

    PREFIX = "orgs[]"
    id: str
    name: str | None = setting(None, "string")
    integration_id: str | None = setting(None, "string")
    device_kind: str | None = setting(None, "string")
    interval: float | None = setting(None, "duration", minimum=1)
    where: InitVar[str | None] = None  # how messages name it ("orgs[2]" in a file)

    def __post_init__(self, where: str | None) -> None:
        self.check(where or f"orgs[{self.id!r}]")

    def rules(self, where: str) -> Iterator[str]:
        if not isinstance(self.id, str) or not ORG_ID.fullmatch(self.id):
            yield (
                f"{where}.id {self.id!r} is not an org id (1-64 letters, digits, '-', '_', '.' or ':', "
                "starting with a letter or digit)"
            )
        if self.device_kind and not self.integration_id:
            yield f"{where}.device_kind needs {where}.integration_id (the API requires both)"


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    api: ApiSettings
    orgs: tuple[OrgSettings, ...]
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    writeback: WritebackSettings = field(default_factory=WritebackSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    def __post_init__(self) -> None:
        problems = [
            f"{f.name} must be {f.type}, got {type(getattr(self, f.name)).__name__}"
            for f in fields(self)
            if f.name != "orgs" and not isinstance(getattr(self, f.name), SECTION_TYPES[f.name])
        ]
        if not isinstance(self.orgs, tuple) or not all(isinstance(o, OrgSettings) for o in self.orgs):
            problems.append("orgs must be a tuple of OrgSettings")
        else:
            problems += _org_list_problems(self.orgs)
        if problems:
            raise ConfigError("; ".join(problems), problems=problems)

    def interval(self, org: OrgSettings) -> float:
        """Seconds between passes of ``org``."""
        return org.interval if org.interval is not None else self.sync.interval

    def with_logging(self, overrides: Mapping[str, Any]) -> Config:
        """This configuration with some [logging] settings replaced (the command line's, which win
        over the file's, at start and at every reload)."""
        return replace(self, logging=replace(self.logging, **overrides)) if overrides else self

    def org(self, org_id: str) -> OrgSettings:
        """The configured org with this id (ConfigError if it is not configured)."""
        for org in self.orgs:
            if org.id == org_id:
                return org
        raise ConfigError(f"org {org_id!r} is not in the configuration")


SECTION_TYPES: dict[str, type] = {
    "api": ApiSettings,
    "database": DatabaseSettings,
    "sync": SyncSettings,
    "writeback": WritebackSettings,
    "metrics": MetricsSettings,
    "logging": LoggingSettings,
}


def _org_list_problems(orgs: tuple[OrgSettings, ...]) -> Iterator[str]:
    if not orgs:
        yield "no [[orgs]] configured: add at least one org with an id"
    seen: set[str] = set()
    for i, org in enumerate(orgs):
        if org.id in seen:
            yield f"orgs[{i}].id {org.id!r} is configured twice"
        seen.add(org.id)


@dataclass(frozen=True)
class ConfigDiff:
    """What a reload changes (see :func:`diff_config`)."""

    added: tuple[OrgSettings, ...]
    removed: tuple[str, ...]
    interval_changed: tuple[OrgSettings, ...]
    api: bool
    writeback: bool
    logging: bool
    database: bool
    concurrency: bool
    writeback_interval: bool


def diff_config(old: Config, new: Config) -> ConfigDiff:
    """What changes from ``old`` to ``new``, for the daemon's reload."""
    before = {o.id: o for o in old.orgs}
    after = {o.id: o for o in new.orgs}
    return ConfigDiff(
        added=tuple(o for i, o in after.items() if i not in before),
        removed=tuple(sorted(before.keys() - after.keys())),
        interval_changed=tuple(
            o for i, o in after.items() if i in before and old.interval(before[i]) != new.interval(o)
        ),
        api=new.api != old.api,
        writeback=new.writeback != old.writeback,
        logging=new.logging != old.logging,
        database=new.database.url != old.database.url,
        concurrency=new.sync.concurrency != old.sync.concurrency,
        writeback_interval=new.writeback.interval != old.writeback.interval,
    )


# -- durations and sizes --------------------------------------------------------------------------


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like ``90``, ``90s``, ``15m``, ``1h30m``, ``7d``."""
    if isinstance(value, bool):
        raise ValueError(f"is not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip() and (match := _DURATION.match(value)):
        d, h, m, s = (float(g) if g else 0.0 for g in match.groups())
        seconds = d * 86400 + h * 3600 + m * 60 + s
    else:
        raise ValueError(f"is not a duration (use seconds or e.g. '15m', '1h30m', '7d'): {value!r}")
    if seconds < 0:
        raise ValueError(f"must not be negative: {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from a whole number or a string like ``"16MiB"``, ``"500KB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"is not a size (use bytes or e.g. '16MiB', '500KB'): {value!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


# -- reading a file -------------------------------------------------------------------------------


def default_database_url(environ: Mapping[str, str]) -> str:
    """A SQLite file in systemd's StateDirectory when there is one, else in the working directory."""
    state_dir = environ.get("STATE_DIRECTORY", "").split(":")[0]
    return f"sqlite:///{Path(state_dir) / 'syncd.db'}" if state_dir else "sqlite:///syncd.db"


def anchored_sqlite_url(url: str, folder: Path) -> str:
    """A SQLite URL whose file is a relative path, made absolute against ``folder`` (the
    configuration file's): the mirror a file names does not depend on the working directory."""
    found = re.fullmatch(r"(sqlite(?:\+\w+)?:///)([^?]*)(\?.*)?", url)
    if not found:
        return url
    scheme, path, query = found.group(1), found.group(2), found.group(3) or ""
    if not path or path == ":memory:" or path.startswith("file:") or Path(path).is_absolute():
        return url
    return f"{scheme}{folder / path}{query}"


def load_config(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, *, with_key: bool = True
) -> Config:
    """Read, validate and resolve a configuration file; ConfigError lists every problem.

    ``with_key=False`` (commands that never call the API) leaves the API key unread: ``api.api_key``
    is then None and a missing or broken key source is no problem.
    """
    environ = os.environ if environ is None else environ
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return build_config(data, environ, source=path, with_key=with_key)


def build_config(
    data: Mapping[str, Any], environ: Mapping[str, str], source: Path | None = None, *, with_key: bool = True
) -> Config:
    """Validate parsed TOML; ConfigError carries every problem found, not just the first."""
    r = _Reader(source)
    r.only_keys("", data, {"api", "orgs", *(f.name for f in fields(Config))})
    api_table = r.table(data, "api", required=True)
    retry = r.section(RetryPolicy, r.table(api_table, "retry", prefix="api."), "api.retry")
    base_url = api_table.get("base_url")
    if isinstance(base_url, str) and base_url.strip():
        base_url = base_url.strip().rstrip("/")
    else:
        if api_table:
            r.problem(
                "api.base_url is required" if base_url is None else f"api.base_url must be a URL, got {base_url!r}"
            )
        base_url = "http://base-url.invalid"  # stands in: the problem is recorded, no Config will be made
    api = r.section(
        ApiSettings,
        api_table,
        "api",
        extra_keys={"base_url", "retry", *KEY_SOURCES},
        base_url=base_url,
        api_key=_resolve_api_key(r, api_table, environ) if with_key else None,
        retry=retry or RetryPolicy(),
    )
    database_table = r.table(data, "database")
    url = database_table.get("url", default_database_url(environ))
    if source is not None and isinstance(url, str):
        url = anchored_sqlite_url(url.strip(), Path(os.path.abspath(source)).parent)
    database = r.section(DatabaseSettings, database_table, "database", url=url)
    metrics_table = r.table(data, "metrics")
    metrics = r.section(
        MetricsSettings, metrics_table, "metrics", extra_keys={"listen"}, listen=_listen(r, metrics_table)
    )
    sections = {
        "sync": r.section(SyncSettings, r.table(data, "sync"), "sync"),
        "writeback": r.section(WritebackSettings, r.table(data, "writeback"), "writeback"),
        "logging": r.section(LoggingSettings, r.table(data, "logging"), "logging"),
    }
    orgs = _read_orgs(r, data.get("orgs"))
    r.raise_if_any()
    assert api is not None and database is not None and metrics is not None
    return Config(api=api, orgs=orgs, database=database, metrics=metrics, **sections)


def _read_orgs(r: _Reader, raw: object) -> tuple[OrgSettings, ...]:
    if raw is None:
        r.problem("no [[orgs]] configured: add at least one org with an id")
        return ()
    if not isinstance(raw, list):
        r.problem("orgs must be an array of tables ([[orgs]])")
        return ()
    orgs = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"orgs[{i}]"
        if not isinstance(entry, dict):
            r.problem(f"{where} must be a table")
            continue
        org_id = entry.get("id")
        if org_id is None:
            r.problem(f"{where}.id is required")
            r.only_keys(where, entry, {f.name for f in fields(OrgSettings)})
            continue
        if not isinstance(org_id, str):
            r.problem(f"{where}.id must be a non-empty string, got {org_id!r}")
            continue
        org_id = org_id.strip()
        if org_id in seen:
            r.problem(f"{where}.id {org_id!r} is configured twice")
            continue
        seen.add(org_id)
        org = r.section(OrgSettings, entry, where, extra_keys={"id"}, id=org_id, where=where)
        if org is not None:
            orgs.append(org)
    return tuple(orgs)


def _listen(r: _Reader, table: Mapping[str, Any]) -> tuple[str, int] | None:
    value = table.get("listen")
    if value is None:
        return None
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        r.problem(f"metrics.listen must be HOST:PORT (e.g. 127.0.0.1:9464), got {value!r}")
        return None
    return host, int(port)


def _base_url_problems(name: str, base_url: str) -> Iterator[str]:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in base_url):
        yield f"{name} must be an http:// or https:// URL, got {base_url!r}"
    elif parts.username is not None or parts.password is not None:
        yield f"{name} must not hold credentials (user:password@); the key has its own settings"
    elif parts.query or parts.fragment:
        yield f"{name} must not have a query or fragment, got {base_url!r}"
    elif not base_url.isascii() or any(ord(c) < 32 or ord(c) == 127 for c in base_url):
        yield f"{name} must be plain ASCII without control characters, got {base_url!r}"


def _resolve_api_key(r: _Reader, api: Mapping[str, Any], environ: Mapping[str, str]) -> Secret | None:
    if not api:
        return None  # the missing [api] section is the problem already reported
    sources = [k for k in KEY_SOURCES if k in api]
    if not sources:
        r.problem("api: set one of api_key_env, api_key_file or api_key_credential to supply the API key")
        return None
    if len(sources) > 1:
        r.problem(f"api: set only one API key source, found {', '.join(sources)}")
        return None
    kind = sources[0]
    raw = api.get(kind)
    if not isinstance(raw, str) or not raw.strip():
        r.problem(f"api.{kind} must be a non-empty string")
        return None
    return _KEY_READERS[kind](r, raw, environ)


def _inline_key(r: _Reader, raw: str, environ: Mapping[str, str]) -> Secret | None:
    """``api_key``: the key in the file itself, which only its owner may read then."""
    if r.source is not None and r.source.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        r.problem(
            f"api.api_key: an inline key is refused because {r.source} is readable by others; "
            "use api_key_env / api_key_file, or chmod 600 the file"
        )
        return None
    return _checked_key(r, raw, "api.api_key (inline)")


def _env_key(r: _Reader, raw: str, environ: Mapping[str, str]) -> Secret | None:
    """``api_key_env``: the name of the environment variable holding the key."""
    name = raw.strip()
    value = environ.get(name, "")
    if not value.strip():
        r.problem(f"api.api_key_env: environment variable {name} is not set or empty")
        return None
    return _checked_key(r, value, f"api.api_key_env (environment variable {name})")


def _credential_key(r: _Reader, raw: str, environ: Mapping[str, str]) -> Secret | None:
    """``api_key_credential``: the name of a systemd credential (LoadCredential=) holding the key."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        r.problem("api.api_key_credential: $CREDENTIALS_DIRECTORY is not set (run under systemd with LoadCredential=)")
        return None
    return _key_from_file(r, "api_key_credential", Path(directory) / raw.strip())


def _file_key(r: _Reader, raw: str, environ: Mapping[str, str]) -> Secret | None:
    """``api_key_file``: the path of a file holding the key."""
    return _key_from_file(r, "api_key_file", Path(raw.strip()))


def _key_from_file(r: _Reader, kind: str, key_path: Path) -> Secret | None:
    try:
        value = key_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        r.problem(f"api.{kind}: {key_path} is not UTF-8 text; it must hold only the key")
        return None
    except OSError as exc:
        r.problem(f"api.{kind}: cannot read the API key from {key_path}: {exc.strerror}")
        return None
    if not value.strip():
        r.problem(f"api.{kind}: {key_path} is empty")
        return None
    return _checked_key(r, value, f"api.{kind} ({key_path})")


_KEY_READERS: dict[str, Callable[[_Reader, str, Mapping[str, str]], Secret | None]] = {
    "api_key": _inline_key,
    "api_key_env": _env_key,
    "api_key_file": _file_key,
    "api_key_credential": _credential_key,
}


def key_problem(value: str) -> str | None:
    """What makes ``value`` unfit to be sent as the API key in an HTTP header (never quoting it)."""
    if "\n" in value or "\r" in value:
        return "spans several lines; it must be one line holding only the key"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "holds a control character; it must hold only the key"
    if not value.isascii() or not value.isprintable() or " " in value:
        return "holds spaces or non-ASCII characters; it must hold only the key"
    return None


def _checked_key(r: _Reader, value: str, source: str) -> Secret | None:
    """The key from ``source`` as a Secret, or a problem naming the source and never the value.

    One trailing newline (what ``echo`` and editors leave) is trimmed; anything else that is not a
    visible ASCII character would end up in an HTTP header, where it is refused or, worse, quoted
    back in an error message.
    """
    if value.endswith("\r\n"):
        value = value[:-2]
    elif value.endswith("\n"):
        value = value[:-1]
    trouble = key_problem(value)
    if trouble:
        r.problem(f"{source}: the API key {trouble}")
        return None
    return Secret(value)


def _redact_url(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


class _Reader:
    """Reads TOML tables into sections, recording problems instead of stopping at the first one."""

    def __init__(self, source: Path | None) -> None:
        self.source = source
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def raise_if_any(self) -> None:
        if self.problems:
            where = f"{self.source}: " if self.source else ""
            count = len(self.problems)
            summary = self.problems[0] if count == 1 else f"{count} problems: " + "; ".join(self.problems)
            raise ConfigError(
                where + summary,
                problems=list(self.problems),
                where=str(self.source) if self.source else None,
            )

    def only_keys(self, where: str, table: Mapping[str, Any], allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                name = f"{where}.{key}" if where else key
                self.problem(f"unknown key {name!r} (allowed: {', '.join(sorted(allowed))})")

    def table(self, data: Mapping[str, Any], key: str, required: bool = False, prefix: str = "") -> Mapping[str, Any]:
        value = data.get(key)
        if value is None:
            if required:
                self.problem(f"missing [{prefix}{key}] section")
            return {}
        if not isinstance(value, dict):
            self.problem(f"{prefix}{key} must be a table")
            return {}
        return value

    def section(
        self,
        cls: type[Any],
        table: Mapping[str, Any],
        prefix: str,
        *,
        extra_keys: set[str] | frozenset[str] = frozenset(),
        **given: Any,
    ) -> Any:
        """``cls`` made from its declared settings in ``table`` and the ``given`` values; None (and
        the problems recorded) when it cannot be made."""
        declared = {f.name: f for f in fields(cls) if "kind" in f.metadata}
        self.only_keys(prefix, table, set(declared) | set(extra_keys))
        values: dict[str, Any] = dict(given)
        for name, f in declared.items():
            if name in table and name not in values:
                try:
                    values[name] = _from_toml(table[name], f.metadata)
                except ValueError as exc:
                    self.problem(f"{prefix}.{name} {exc}")
        try:
            return cls(**values)
        except ConfigError as exc:
            self.problems.extend(exc.problems)
            return None


def _from_toml(value: Any, meta: Mapping[str, Any]) -> Any:
    """A TOML value as the kind of its setting: durations and sizes parsed, choices lower-cased.
    Type and bound problems are left to the section's own check."""
    kind = meta["kind"]
    if kind == "duration":
        return parse_duration(value)
    if kind == "size":
        return parse_size(value)
    if kind == "choice" and isinstance(value, str):
        return value.lower()
    if kind == "choices" and isinstance(value, list):
        return tuple(dict.fromkeys(v.lower() if isinstance(v, str) else v for v in value))
    if kind == "string" and isinstance(value, str):
        return value.strip()
    if kind == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
