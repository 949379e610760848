from __future__ import annotations

import json
from pathlib import Path

import pytest

from syncd.config import Secret, load_config, parse_duration
from syncd.errors import ConfigError

MINIMAL = """
[api]
base_url = "http://127.0.0.1:8765/api/v1"
api_key_env = "SYNCD_API_KEY"        # or: api_key_file = "/etc/syncd/api-key"
auth_header = "x-api-key"            # or "bearer"

[database]
url = "sqlite:///syncd.db"

[[orgs]]
id = "01HORG00000000000000000000"
"""


def write(tmp_path: Path, text: str, mode: int = 0o644) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_minimal_config_from_the_docs_works_as_written(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), {"SYNCD_API_KEY": "s3cret"})
    assert config.api.base_url == "http://127.0.0.1:8765/api/v1"
    assert config.api.api_key == Secret("s3cret")
    assert config.api.auth_header == "x-api-key"
    assert config.api.page_size == 200
    assert config.database.url == f"sqlite:///{tmp_path}/syncd.db"  # beside the file, wherever syncd runs
    assert [o.id for o in config.orgs] == ["01HORG00000000000000000000"]
    assert "s3cret" not in repr(config)


def test_the_example_config_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "config.example.toml"
    config = load_config(example, {"SYNCD_API_KEY": "k"})
    assert config.orgs


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    bad = """
[api]
base_url = "ftp://nope"
api_key_env = "UNSET_VARIABLE"
auth_header = "basic"
page_size = 500
colour = "blue"

[database]
url = "mysql://x"

[sync]
max_purge_fraction = 2
interval = "soon"

[[orgs]]
id = "A"
device_kind = "gate"

[[orgs]]
id = "A"
"""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, bad), {})
    problems = "\n".join(caught.value.problems)
    for expected in [
        "api.base_url",
        "UNSET_VARIABLE",
        "api.auth_header",
        "api.page_size must be at most 200",
        "unknown key 'api.colour'",
        "database.url",
        "sync.max_purge_fraction",
        "sync.interval",
        "orgs[0].device_kind needs orgs[0].integration_id",
        "orgs[1].id 'A' is configured twice",
    ]:
        assert expected in problems
    assert len(caught.value.problems) == 10
    assert "\n" not in str(caught.value)  # one line


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"missing \[api\] section"),
        ("[api\n", "is not valid TOML"),
        ('[api]\nbase_url = "http://x"\napi_key_env = "K"\n', r"no \[\[orgs\]\] configured"),
        ('[api]\nbase_url = "http://x"\n[[orgs]]\nid = "o"\n', "set one of api_key_env"),
        (
            '[api]\nbase_url = "http://x"\napi_key_env = "K"\napi_key_file = "/k"\n[[orgs]]\nid = "o"\n',
            "set only one API key source",
        ),
    ],
)
def test_bad_configs_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), {"K": "key"})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("page_concurrency = 0", "api.page_concurrency must be at least 1"),
        ("page_concurrency = 65", "api.page_concurrency must be at most 64"),
        ('page_concurrency = "4"', "api.page_concurrency must be"),
        ("max_concurrency = 0", "api.max_concurrency must be at least 1"),
        ("max_concurrency = 1000", "api.max_concurrency must be at most 256"),
        ("max_requests_per_second = -1", "api.max_requests_per_second must be at least 0"),
        ("max_requests_per_second = nan", "api.max_requests_per_second"),
        ("max_requests_per_second = true", "api.max_requests_per_second must be"),
    ],
)
def test_request_budget_settings_are_checked(tmp_path: Path, line: str, message: str) -> None:
    text = f'[api]\nbase_url = "http://x"\napi_key_env = "K"\n{line}\n[[orgs]]\nid = "o"\n'
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(write(tmp_path, text), {"K": "key"})
    assert "\n" not in str(caught.value)


def test_request_budget_settings_are_read(tmp_path: Path) -> None:
    text = (
        '[api]\nbase_url = "http://x"\napi_key_env = "K"\npage_concurrency = 2\nmax_concurrency = 5\n'
        'max_requests_per_second = 2.5\n[[orgs]]\nid = "o"\n'
    )
    api = load_config(write(tmp_path, text), {"K": "key"}).api
    assert (api.page_concurrency, api.max_concurrency, api.max_requests_per_second) == (2, 5, 2.5)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def inline(key: str) -> str:
    return f'[api]\nbase_url = "http://x"\napi_key = "{key}"\n[[orgs]]\nid = "o"\n'


def test_inline_key_refused_in_a_world_readable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="readable by others") as caught:
        load_config(write(tmp_path, inline("hunter2"), 0o644), {})
    assert "hunter2" not in str(caught.value)


def test_inline_key_accepted_in_a_private_file(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, inline("hunter2"), 0o600), {}).api.api_key.reveal() == "hunter2"


def test_key_from_file_and_from_systemd_credentials(tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("from-file\n")
    text = f'[api]\nbase_url = "http://x"\napi_key_file = "{key_file}"\n[[orgs]]\nid = "o"\n'
    assert load_config(write(tmp_path, text), {}).api.api_key.reveal() == "from-file"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "openapp-api-key").write_text("from-credential")
    text = '[api]\nbase_url = "http://x"\napi_key_credential = "openapp-api-key"\n[[orgs]]\nid = "o"\n'
    config = load_config(write(tmp_path, text), {"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.api.api_key.reveal() == "from-credential"
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set"):
        load_config(write(tmp_path, text), {})


def test_default_database_is_sqlite_in_the_state_directory(tmp_path: Path) -> None:
    text = MINIMAL.replace('[database]\nurl = "sqlite:///syncd.db"\n', "")
    config = load_config(write(tmp_path, text), {"SYNCD_API_KEY": "k", "STATE_DIRECTORY": "/var/lib/syncd"})
    assert config.database.url == "sqlite:////var/lib/syncd/syncd.db"
    assert load_config(write(tmp_path, text), {"SYNCD_API_KEY": "k"}).database.url == f"sqlite:///{tmp_path}/syncd.db"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///syncd.db", "sqlite:///{folder}/syncd.db"),
        ("sqlite:///data/m.db?timeout=5", "sqlite:///{folder}/data/m.db?timeout=5"),
        ("sqlite+pysqlite:///m.db", "sqlite+pysqlite:///{folder}/m.db"),
        ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_a_relative_sqlite_path_is_anchored_at_the_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, expected: str
) -> None:
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc", MINIMAL.replace("sqlite:///syncd.db", url))
    monkeypatch.chdir(tmp_path)
    config = load_config("etc/../etc/config.toml", {"SYNCD_API_KEY": "k"})
    assert config.database.url == expected.format(folder=tmp_path / "etc")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90", 90.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("1h30m", 5400.0),
        ("7d", 604800.0),
        ("1d12h", 129600.0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "", -1, True, "1w", "1h1d"])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_secret_never_shows_itself() -> None:
    secret = Secret("abc123")
    assert "abc123" not in repr(secret) and "abc123" not in str(secret) and "abc123" not in f"{secret}"
    assert secret.reveal() == "abc123"


# -- what crosses into HTTP headers and URLs ------------------------------------------------------

KEY = "oa_live_" + "s3cr3t" * 4
OLD_KEY = "oa_live_" + "0ld" * 6


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (f"{KEY}\n# previous key: {OLD_KEY}\n", "spans several lines"),
        (f"{KEY}\r\n{OLD_KEY}", "spans several lines"),
        (f"{KEY}\n\n", "spans several lines"),
        (f"{KEY}\t", "control character"),
        (f"{KEY}\x00", "control character"),
        (f"{KEY}\x7f", "control character"),
        (f"{KEY} {OLD_KEY}", "spaces or non-ASCII"),
        (f"{KEY}é", "spaces or non-ASCII"),
        (f" {KEY}", "spaces or non-ASCII"),
    ],
)
def test_a_key_http_cannot_carry_is_refused_naming_the_source_never_the_value(
    tmp_path: Path, content: str, problem: str
) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(content, encoding="utf-8")
    sources = [
        (f'api_key_file = "{key_file}"', {}, str(key_file)),
        ('api_key_env = "K"', {"K": content}, "environment variable K"),
    ]
    for source, environ, named in sources:
        text = f'[api]\nbase_url = "http://x"\n{source}\n[[orgs]]\nid = "o"\n'
        with pytest.raises(ConfigError, match=problem) as caught:
            load_config(write(tmp_path, text), environ)
        message = " ".join([str(caught.value), *caught.value.problems])
        assert named in message
        assert "s3cr3t" not in message and "0ld0ld" not in message
    with pytest.raises(ConfigError, match=problem):  # json.dumps writes a valid TOML basic string
        load_config(write(tmp_path, inline(content).replace(f'"{content}"', json.dumps(content)), 0o600), {})


@pytest.mark.parametrize("content", [f"{KEY}\n", f"{KEY}\r\n", KEY])
def test_one_trailing_newline_is_trimmed(tmp_path: Path, content: str) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_bytes(content.encode())
    text = f'[api]\nbase_url = "http://x"\napi_key_file = "{key_file}"\n[[orgs]]\nid = "o"\n'
    assert load_config(write(tmp_path, text), {}).api.api_key.reveal() == KEY  # type: ignore[union-attr]


def test_check_config_reports_a_two_line_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from syncd.cli import main

    key_file = tmp_path / "api-key"
    key_file.write_text(f"{KEY}\n# previous key: {OLD_KEY}\n")
    config = write(tmp_path, f'[api]\nbase_url = "http://x"\napi_key_file = "{key_file}"\n[[orgs]]\nid = "o"\n')
    assert main(["check-config", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert "spans several lines" in captured.err and str(key_file) in captured.err
    assert "s3cr3t" not in captured.out + captured.err and "0ld0ld" not in captured.out + captured.err


@pytest.mark.parametrize(
    ("org_id", "ok"),
    [
        ("01HORG00000000000000000000", True),
        ("acme-prod_1.eu:2", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("a b", False),
        ("org\nX-Evil: 1", False),
        ("../org", False),
        ("-leading", False),
    ],
)
def test_org_ids_are_checked(tmp_path: Path, org_id: str, ok: bool) -> None:
    text = f'[api]\nbase_url = "http://x"\napi_key_env = "K"\n[[orgs]]\nid = {json.dumps(org_id)}\n'
    if ok:
        assert load_config(write(tmp_path, text), {"K": "k"}).orgs[0].id == org_id
    else:
        with pytest.raises(ConfigError, match=r"orgs\[0\]\.id .* is not an org id"):
            load_config(write(tmp_path, text), {"K": "k"})


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://x/api/v1", "must be an http:// or https:// URL"),
        ("http://user:pw@x/api/v1", "must not hold credentials"),
        ("http://x/api/v1?debug=1", "must not have a query"),
        ("http://x/api/v1#frag", "must not have a query"),
        ("http://x/api v1", "must be an http:// or https:// URL"),
        ("http://x/api/v1/\u00e9", "plain ASCII"),
    ],
)
def test_base_url_is_checked(tmp_path: Path, url: str, problem: str) -> None:
    text = f'[api]\nbase_url = "{url}"\napi_key_env = "K"\n[[orgs]]\nid = "o"\n'
    with pytest.raises(ConfigError, match=problem) as caught:
        load_config(write(tmp_path, text), {"K": "k"})
    assert "pw@" not in str(caught.value)


def test_request_bounds_are_configurable(tmp_path: Path) -> None:
    text = (
        MINIMAL.replace('auth_header = "x-api-key"', 'request_timeout = "90s"\nmax_response_size = "32MiB"')
        + '[sync]\npass_timeout = "2h"\nmax_pages = 500\n'
    )
    config = load_config(write(tmp_path, text), {"SYNCD_API_KEY": "k"})
    assert (config.api.request_timeout, config.api.max_response_size) == (90.0, 32 * 1024 * 1024)
    assert (config.sync.pass_timeout, config.sync.max_pages) == (7200.0, 500)
    for bad, problem in [
        ('max_response_size = "lots"', "is not a size"),
        ("max_response_size = 10", "at least 64KiB"),
        ("request_timeout = 0", "at least 1 second"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            load_config(write(tmp_path, MINIMAL.replace('auth_header = "x-api-key"', bad)), {"SYNCD_API_KEY": "k"})


def test_commands_that_never_call_the_api_need_no_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), {}, with_key=False)
    assert config.api.api_key is None
    with pytest.raises(ConfigError, match="SYNCD_API_KEY"):
        load_config(write(tmp_path, MINIMAL), {})


def test_a_config_built_in_code_is_checked_like_a_file() -> None:
    from syncd.config import ApiSettings, Config, OrgSettings, SyncSettings, WritebackSettings

    with pytest.raises(ConfigError, match=r"sync\.concurrency must be at least 1, got 0"):
        SyncSettings(concurrency=0)
    with pytest.raises(ConfigError, match=r"writeback\.conflict_policy must be one of detect, force"):
        WritebackSettings(conflict_policy="maybe")
    with pytest.raises(ConfigError, match="is not an org id"):
        OrgSettings("no spaces please")
    with pytest.raises(ConfigError, match="must be an http"):
        ApiSettings(base_url="ftp://x", api_key=None)
    api = ApiSettings(base_url="http://x/api/v1", api_key=Secret("k"))
    with pytest.raises(ConfigError, match="configured twice"):
        Config(api=api, orgs=(OrgSettings("a"), OrgSettings("a")))
    with pytest.raises(ConfigError, match="no \\[\\[orgs\\]\\] configured"):
        Config(api=api, orgs=())
    from syncd.config import MetricsSettings

    for make, message in [
        (lambda: Config(api=api, orgs=(OrgSettings("a"),), sync=None), "sync must be SyncSettings"),  # type: ignore[arg-type]
        (lambda: Config(api=api, orgs=[OrgSettings("a")]), "orgs must be a tuple"),  # type: ignore[arg-type]
        (lambda: MetricsSettings(listen="127.0.0.1:9464"), r"metrics\.listen must be \(HOST, PORT\)"),  # type: ignore[arg-type]
        (lambda: ApiSettings(base_url="http://x", api_key="k"), "must be a Secret"),  # type: ignore[arg-type]
        (lambda: SyncSettings(interval=float("nan")), "must be a finite number"),
    ]:
        with pytest.raises(ConfigError, match=message):
            make()


@pytest.mark.parametrize(
    ("orgs", "message"),
    [
        ('id = ["a"]', r"orgs\[0\]\.id must be a non-empty string, got \['a'\]"),
        ('id = "a"\nwhere = "x"', r"unknown key 'orgs\[0\]\.where'"),
        ('id = "a"\ninterval = nan', r"orgs\[0\]\.interval must be a finite number"),
    ],
)
def test_odd_org_tables_are_problems_not_crashes(tmp_path: Path, orgs: str, message: str) -> None:
    text = f'[api]\nbase_url = "http://x/api/v1"\napi_key_env = "K"\n[[orgs]]\n{orgs}\n'
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), {"K": "k"})


def test_every_declared_setting_is_a_key_of_its_section(tmp_path: Path) -> None:
    # One declaration per key: a file setting each one to its default reads back as the defaults.
    from dataclasses import fields

    from syncd.config import LoggingSettings, RetryPolicy, SyncSettings, WritebackSettings

    def toml(section: str, cls: type) -> str:
        lines = [f"[{section}]"]
        for f in fields(cls):
            if "kind" in f.metadata and f.default is not None:
                value = f.default
                lines.append(f"{f.name} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"

    text = MINIMAL.replace("[database]", toml("api.retry", RetryPolicy) + "[database]")
    for section, cls in [("sync", SyncSettings), ("writeback", WritebackSettings), ("logging", LoggingSettings)]:
        text += toml(section, cls)
    config = load_config(write(tmp_path, text), {"SYNCD_API_KEY": "k"})
    assert (config.sync, config.writeback, config.logging, config.api.retry) == (
        SyncSettings(),
        WritebackSettings(),
        LoggingSettings(),
        RetryPolicy(),
    )


def test_a_reload_is_told_what_changed() -> None:
    from dataclasses import replace

    from syncd.config import ApiSettings, Config, DatabaseSettings, OrgSettings, SyncSettings, diff_config

    api = ApiSettings(base_url="http://x/api/v1", api_key=Secret("k"))
    old = Config(api=api, orgs=(OrgSettings("a"), OrgSettings("b"), OrgSettings("c", interval=60)))
    new = replace(
        old,
        orgs=(OrgSettings("b", interval=30), OrgSettings("c", interval=60), OrgSettings("d")),
        sync=SyncSettings(concurrency=8),
        api=replace(api, api_key=Secret("k2")),
    )
    change = diff_config(old, new)
    assert [o.id for o in change.added] == ["d"] and change.removed == ("a",)
    assert [o.id for o in change.interval_changed] == ["b"]
    assert change.api and change.concurrency and not change.writeback and not change.logging
    assert not change.database
    assert diff_config(old, replace(old, database=DatabaseSettings(url="sqlite:///other.db"))).database
