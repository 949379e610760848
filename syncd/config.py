"""Load and validate syncd's TOML configuration, reporting every problem at once."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from syncd.errors import ConfigError

MAX_PAGE_SIZE = 200
MIB = 1024 * 1024
AuthHeader = Literal["x-api-key", "bearer"]
LogFormat = Literal["auto", "console", "json"]
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": MIB, "GB": 1000**3, "GiB": 1024**3}
# Org ids go into the X-Org header and VARCHAR(64) columns: letters, digits and - _ . : only.
ORG_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


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


@dataclass(frozen=True)
class RetryPolicy:
    """How the API client retries what is safe to repeat."""

    max_attempts: int = 5
    base_delay: float = 0.25
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    deadline: float = 120.0


@dataclass(frozen=True)
class ApiSettings:
    """Where OpenApp is and how to talk to it."""

    base_url: str
    api_key: Secret | None = field(repr=False)  # None for commands that never call the API
    auth_header: AuthHeader = "x-api-key"
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    request_timeout: float = 60.0  # a whole request, however slowly the answer trickles in
    max_response_size: int = 16 * MIB  # decompressed
    page_size: int = MAX_PAGE_SIZE
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True)
class OrgSettings:
    """One organisation to mirror, with optional list filters."""

    id: str
    name: str | None = None
    integration_id: str | None = None
    device_kind: str | None = None
    interval: float | None = None


@dataclass(frozen=True)
class SyncSettings:
    """How passes behave, and how the daemon schedules them."""

    concurrency: int = 4
    interval: float = 900.0
    max_purge_fraction: float = 0.10
    last_seen_resolution: float = 86400.0
    failure_backoff_max: float = 3600.0
    shutdown_timeout: float = 30.0
    pass_timeout: float = 3600.0
    max_pages: int = 10_000  # 2,000,000 devices at 200 a page


@dataclass(frozen=True)
class WritebackSettings:
    """How queued local edits are pushed to OpenApp."""

    interval: float = 5.0
    max_attempts: int = 8
    base_delay: float = 1.0
    max_delay: float = 300.0
    lease_timeout: float = 120.0
    conflict_policy: str = "detect"  # or "force": push even over a newer remote change
    batch_size: int = 50


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    api: ApiSettings
    database_url: str
    orgs: tuple[OrgSettings, ...]
    auto_upgrade: bool = True
    sync: SyncSettings = field(default_factory=SyncSettings)
    writeback: WritebackSettings = field(default_factory=WritebackSettings)
    log_format: LogFormat = "auto"
    log_level: str = "info"
    metrics_listen: tuple[str, int] | None = None
    source: Path | None = None

    def interval(self, org: OrgSettings) -> float:
        """Seconds between passes of ``org``."""
        return org.interval if org.interval is not None else self.sync.interval

    def org(self, org_id: str) -> OrgSettings:
        """The configured org with this id (ConfigError if it is not configured)."""
        for org in self.orgs:
            if org.id == org_id:
                return org
        raise ConfigError(f"org {org_id!r} is not in the configuration")


def default_database_url(environ: Mapping[str, str]) -> str:
    """A SQLite file in systemd's StateDirectory when there is one, else in the working directory."""
    state_dir = environ.get("STATE_DIRECTORY", "").split(":")[0]
    return f"sqlite:///{Path(state_dir) / 'syncd.db'}" if state_dir else "sqlite:///syncd.db"


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like ``90``, ``90s``, ``15m``, ``1h30m``."""
    if isinstance(value, bool):
        raise ValueError(f"is not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip() and (match := _DURATION.match(value)):
        h, m, s = (float(g) if g else 0.0 for g in match.groups())
        seconds = h * 3600 + m * 60 + s
    else:
        raise ValueError(f"is not a duration (use seconds or e.g. '15m', '1h30m'): {value!r}")
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
    r.only_keys("", data, {"api", "database", "orgs", "sync", "writeback", "logging", "metrics"})
    api = r.table(data, "api", required=True)
    database = r.table(data, "database")
    sync = r.table(data, "sync")
    logging_ = r.table(data, "logging")

    r.only_keys(
        "api",
        api,
        {
            "base_url",
            "api_key",
            "api_key_env",
            "api_key_file",
            "api_key_credential",
            "auth_header",
            "connect_timeout",
            "read_timeout",
            "request_timeout",
            "max_response_size",
            "page_size",
            "retry",
        },
    )
    base_url = r.string(api, "api.base_url", required=True) or ""
    if base_url:
        _check_base_url(r, base_url)
    auth_header = r.choice(api, "api.auth_header", ("x-api-key", "bearer"), "x-api-key")
    api_key = _resolve_api_key(r, api, environ) if with_key else None
    retry_table = r.table(api, "retry", prefix="api.")
    r.only_keys("api.retry", retry_table, {"max_attempts", "base_delay", "max_delay", "max_retry_after", "deadline"})
    retry = RetryPolicy(
        max_attempts=r.integer(retry_table, "api.retry.max_attempts", 5, minimum=1),
        base_delay=r.duration(retry_table, "api.retry.base_delay", 0.25),
        max_delay=r.duration(retry_table, "api.retry.max_delay", 8.0),
        max_retry_after=r.duration(retry_table, "api.retry.max_retry_after", 60.0),
        deadline=r.duration(retry_table, "api.retry.deadline", 120.0),
    )
    page_size = r.integer(api, "api.page_size", MAX_PAGE_SIZE, minimum=1)
    if page_size > MAX_PAGE_SIZE:
        r.problem(f"api.page_size must be at most {MAX_PAGE_SIZE} (the API's maximum), got {page_size}")

    r.only_keys("database", database, {"url", "auto_upgrade"})
    database_url = r.string(database, "database.url") or default_database_url(environ)
    if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", database_url):
        r.problem(f"database.url must be a sqlite:/// or postgresql:// URL, got {_redact_url(database_url)!r}")

    r.only_keys(
        "sync",
        sync,
        {
            "concurrency",
            "interval",
            "max_purge_fraction",
            "last_seen_resolution",
            "failure_backoff_max",
            "shutdown_timeout",
            "pass_timeout",
            "max_pages",
        },
    )
    fraction = r.number(sync, "sync.max_purge_fraction", 0.10)
    if not 0.0 <= fraction <= 1.0:
        r.problem(f"sync.max_purge_fraction must be between 0 and 1, got {fraction}")
    sync_settings = SyncSettings(
        concurrency=r.integer(sync, "sync.concurrency", 4, minimum=1),
        interval=r.duration(sync, "sync.interval", 900.0),
        max_purge_fraction=fraction,
        last_seen_resolution=r.duration(sync, "sync.last_seen_resolution", 86400.0),
        failure_backoff_max=r.duration(sync, "sync.failure_backoff_max", 3600.0),
        shutdown_timeout=r.duration(sync, "sync.shutdown_timeout", 30.0),
        pass_timeout=r.duration(sync, "sync.pass_timeout", 3600.0),
        max_pages=r.integer(sync, "sync.max_pages", 10_000, minimum=1),
    )
    if sync_settings.interval < 1:
        r.problem(f"sync.interval must be at least 1 second, got {sync_settings.interval}")
    if sync_settings.pass_timeout < 1:
        r.problem(f"sync.pass_timeout must be at least 1 second, got {sync_settings.pass_timeout}")
    wb = r.table(data, "writeback")
    r.only_keys(
        "writeback",
        wb,
        {"interval", "max_attempts", "base_delay", "max_delay", "lease_timeout", "conflict_policy", "batch_size"},
    )
    writeback = WritebackSettings(
        interval=r.duration(wb, "writeback.interval", 5.0),
        max_attempts=r.integer(wb, "writeback.max_attempts", 8, minimum=1),
        base_delay=r.duration(wb, "writeback.base_delay", 1.0),
        max_delay=r.duration(wb, "writeback.max_delay", 300.0),
        lease_timeout=r.duration(wb, "writeback.lease_timeout", 120.0),
        conflict_policy=r.choice(wb, "writeback.conflict_policy", ("detect", "force"), "detect"),
        batch_size=r.integer(wb, "writeback.batch_size", 50, minimum=1),
    )
    if writeback.interval < 0.1:
        r.problem(f"writeback.interval must be at least 0.1 seconds, got {writeback.interval}")
    metrics = r.table(data, "metrics")
    r.only_keys("metrics", metrics, {"listen"})
    metrics_listen = _listen_address(r, r.string(metrics, "metrics.listen"))

    r.only_keys("logging", logging_, {"format", "level"})
    log_format = r.choice(logging_, "logging.format", ("auto", "console", "json"), "auto")
    log_level = r.choice(logging_, "logging.level", ("debug", "info", "warning", "error"), "info")

    orgs = _read_orgs(r, data.get("orgs"))
    connect_timeout = r.duration(api, "api.connect_timeout", 5.0)
    read_timeout = r.duration(api, "api.read_timeout", 30.0)
    request_timeout = r.duration(api, "api.request_timeout", 60.0)
    if request_timeout < 1:
        r.problem(f"api.request_timeout must be at least 1 second, got {request_timeout}")
    max_response_size = r.size(api, "api.max_response_size", 16 * MIB)
    if max_response_size < 64 * 1024:
        r.problem(f"api.max_response_size must be at least 64KiB, got {max_response_size} bytes")
    auto_upgrade = r.boolean(database, "database.auto_upgrade", True)
    r.raise_if_any()
    return Config(
        api=ApiSettings(
            base_url=base_url.rstrip("/"),
            api_key=api_key,
            auth_header=auth_header,  # type: ignore[arg-type]
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            request_timeout=request_timeout,
            max_response_size=max_response_size,
            page_size=page_size,
            retry=retry,
        ),
        database_url=database_url,
        orgs=tuple(orgs),
        auto_upgrade=auto_upgrade,
        sync=sync_settings,
        writeback=writeback,
        log_format=log_format,  # type: ignore[arg-type]
        log_level=log_level,
        metrics_listen=metrics_listen,
        source=source,
    )


def _check_base_url(r: _Reader, base_url: str) -> None:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in base_url):
        r.problem(f"api.base_url must be an http:// or https:// URL, got {base_url!r}")
    elif parts.username is not None or parts.password is not None:
        r.problem("api.base_url must not hold credentials (user:password@); the key has its own settings")
    elif parts.query or parts.fragment:
        r.problem(f"api.base_url must not have a query or fragment, got {base_url!r}")
    elif not base_url.isascii() or any(ord(c) < 32 or ord(c) == 127 for c in base_url):
        r.problem(f"api.base_url must be plain ASCII without control characters, got {base_url!r}")


def _listen_address(r: _Reader, value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        r.problem(f"metrics.listen must be HOST:PORT (e.g. 127.0.0.1:9464), got {value!r}")
        return None
    return host, int(port)


def _read_orgs(r: _Reader, raw: object) -> list[OrgSettings]:
    if raw is None:
        r.problem("no [[orgs]] configured: add at least one org with an id")
        return []
    if not isinstance(raw, list):
        r.problem("orgs must be an array of tables ([[orgs]])")
        return []
    orgs: list[OrgSettings] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"orgs[{i}]"
        if not isinstance(entry, dict):
            r.problem(f"{where} must be a table")
            continue
        r.only_keys(where, entry, {"id", "name", "integration_id", "device_kind", "interval"})
        org_id = r.string(entry, f"{where}.id", required=True)
        if org_id is not None and not ORG_ID.fullmatch(org_id):
            r.problem(
                f"{where}.id {org_id!r} is not an org id (1-64 letters, digits, '-', '_', '.' or ':', "
                "starting with a letter or digit)"
            )
            org_id = None
        if org_id in seen:
            r.problem(f"{where}.id {org_id!r} is configured twice")
        integration_id = r.string(entry, f"{where}.integration_id")
        device_kind = r.string(entry, f"{where}.device_kind")
        if device_kind and not integration_id:
            r.problem(f"{where}.device_kind needs {where}.integration_id (the API requires both)")
        interval = r.duration(entry, f"{where}.interval", None) if "interval" in entry else None
        if interval is not None and interval < 1:
            r.problem(f"{where}.interval must be at least 1 second, got {interval}")
        if org_id:
            seen.add(org_id)
            orgs.append(OrgSettings(org_id, r.string(entry, f"{where}.name"), integration_id, device_kind, interval))
    return orgs


def _resolve_api_key(r: _Reader, api: Mapping[str, Any], environ: Mapping[str, str]) -> Secret | None:
    sources = [k for k in ("api_key", "api_key_env", "api_key_file", "api_key_credential") if k in api]
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
    if kind == "api_key":
        if r.source is not None and r.source.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            r.problem(
                f"api.api_key: an inline key is refused because {r.source} is readable by others; "
                "use api_key_env / api_key_file, or chmod 600 the file"
            )
            return None
        return _checked_key(r, raw, "api.api_key (inline)")
    name = raw.strip()
    if kind == "api_key_env":
        value = environ.get(name, "")
        if not value.strip():
            r.problem(f"api.api_key_env: environment variable {name} is not set or empty")
            return None
        return _checked_key(r, value, f"api.api_key_env (environment variable {name})")
    if kind == "api_key_credential":
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            r.problem(
                "api.api_key_credential: $CREDENTIALS_DIRECTORY is not set (run under systemd with LoadCredential=)"
            )
            return None
        key_path = Path(directory) / name
    else:
        key_path = Path(name)
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
    if "\n" in value or "\r" in value:
        r.problem(f"{source}: the API key spans several lines; it must be one line holding only the key")
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        r.problem(f"{source}: the API key holds a control character; it must hold only the key")
    elif not value.isascii() or not value.isprintable() or " " in value:
        r.problem(f"{source}: the API key holds spaces or non-ASCII characters; it must hold only the key")
    else:
        return Secret(value)
    return None


def _redact_url(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


class _Reader:
    """Typed lookups that record problems instead of stopping at the first one."""

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
            raise ConfigError(where + summary, problems=list(self.problems))

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

    def string(self, t: Mapping[str, Any], name: str, required: bool = False) -> str | None:
        value = t.get(name.rsplit(".", 1)[-1])
        if value is None:
            if required:
                self.problem(f"{name} is required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.problem(f"{name} must be a non-empty string, got {value!r}")
            return None
        return value.strip()

    def choice(self, t: Mapping[str, Any], name: str, options: tuple[str, ...], default: str) -> str:
        value = t.get(name.rsplit(".", 1)[-1], default)
        if not isinstance(value, str) or value.lower() not in options:
            self.problem(f"{name} must be one of {', '.join(options)}, got {value!r}")
            return default
        return value.lower()

    def integer(self, t: Mapping[str, Any], name: str, default: int, minimum: int) -> int:
        value = t.get(name.rsplit(".", 1)[-1], default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(f"{name} must be a whole number, got {value!r}")
            return default
        if value < minimum:
            self.problem(f"{name} must be at least {minimum}, got {value}")
            return default
        return value

    def number(self, t: Mapping[str, Any], name: str, default: float) -> float:
        value = t.get(name.rsplit(".", 1)[-1], default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(f"{name} must be a number, got {value!r}")
            return default
        return float(value)

    def boolean(self, t: Mapping[str, Any], name: str, default: bool) -> bool:
        value = t.get(name.rsplit(".", 1)[-1], default)
        if not isinstance(value, bool):
            self.problem(f"{name} must be true or false, got {value!r}")
            return default
        return value

    def size(self, t: Mapping[str, Any], name: str, default: int) -> int:
        return int(self._parsed(t, name, default, parse_size))

    def duration(self, t: Mapping[str, Any], name: str, default: Any) -> Any:
        return self._parsed(t, name, default, parse_duration)

    def _parsed(self, t: Mapping[str, Any], name: str, default: Any, parse: Callable[[object], Any]) -> Any:
        key = name.rsplit(".", 1)[-1]
        if key not in t:
            return default
        try:
            return parse(t[key])
        except ValueError as exc:
            self.problem(f"{name} {exc}")
            return default
