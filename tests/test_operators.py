"""What operators get in deploy/: the Grafana dashboard, the Prometheus alert rules and their unit tests.

promtool (Debian's ``prometheus`` package) checks and unit-tests the rules; without it those tests skip.
The last test starts the real daemon against the simulator and scrapes it: every metric the dashboard
and the rules use must be served, with the labels (and label values) they select on, so that renaming
a metric or a label breaks this test instead of a dashboard in production.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from syncd.simulator import Fault, Simulator, World

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
ALERTS = DEPLOY / "prometheus-alerts.yml"
ALERT_TESTS = sorted(DEPLOY.glob("prometheus-alerts*.test.yml"))  # promtool unit tests, one file per theme

API_KEY = "oa_ops_" + "k3y" * 8
KEY_ENV = "SYNCD_OPS_TEST_API_KEY"
DEADLINE = 60.0  # seconds for the daemon to show every series
TARGET_LABELS = frozenset({"instance", "job"})  # added by Prometheus when it scrapes, never in the exposition
NOT_SERVED = frozenset({"up"})  # Prometheus's own series about the scrape
GRAFANA_RANGES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1d"}


# -- where the expressions are -------------------------------------------------------------------------


VALUE = "__value__"  # where scrape() keeps a sample's value beside its labels


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana would import it."""
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    """The PromQL of every panel target and of every query variable (``label_values(SELECTOR, LABEL)``
    becomes ``sum by (LABEL) (SELECTOR)``: it needs the same series and label)."""
    board = dashboard()
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", []) if t.get("expr")]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        found = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", text)
        if found:
            exprs.append(f"sum by ({found.group(2)}) ({found.group(1)})")
        elif variable.get("type") == "query":
            exprs.append(text)
    return exprs


def alert_exprs(text: str | None = None) -> list[str]:
    """The ``expr`` of every rule: a plain one-line value or a ``|``/``>`` block (PyYAML is not a dependency)."""
    lines = (ALERTS.read_text() if text is None else text).splitlines()
    exprs = []
    for number, line in enumerate(lines):
        found = re.match(r"^(\s*(?:- )?)expr:\s*(.*?)\s*$", line)
        if not found:
            continue
        indent, value = len(found.group(1)), found.group(2)
        if value[:1] in "|>":
            block = []
            for following in lines[number + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = " ".join(part for part in block if part)
        elif value[:1] in "'\"":
            value = value[1:-1]
        exprs.append(value)
    return exprs


def alert_blocks() -> dict[str, str]:
    """Each alerting rule's text, by alert name."""
    parts = re.split(r"^\s*- alert:\s*", ALERTS.read_text(), flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


# -- which series and labels an expression needs ---------------------------------------------------------

TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
      | (?P<range>\[[^\]]*\])
      | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?[a-zA-Z]*)
      | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
      | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}])
      | (?P<var>\$\{?\w+\}?)""",
    re.VERBOSE,
)
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end"})
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})


@dataclass
class Use:
    """One metric selector in an expression: the label names it needs and the literal values it selects."""

    metric: str
    labels: set[str] = field(default_factory=set)
    values: set[tuple[str, str]] = field(default_factory=set)


@dataclass
class Selector:
    """``{label op "value", ...}``."""

    matchers: list[tuple[str, str, str]]


@dataclass
class Parens:
    """A parenthesised part: a function's or aggregation's arguments, a label list or a subexpression."""

    items: list[Any]


def tokenize(expr: str) -> list[tuple[str, str]]:
    """PromQL tokens as (kind, text); whitespace dropped."""
    tokens, position = [], 0
    while position < len(expr):
        found = TOKEN.match(expr, position)
        if not found:
            raise ValueError(f"cannot read {expr[position:]!r} in {expr!r}")
        position = found.end()
        kind = found.lastgroup or ""
        if kind != "space":
            tokens.append((kind, found.group()))
    return tokens


def nest(tokens: list[tuple[str, str]]) -> list[Any]:
    """Tokens into nested :class:`Parens`, with label matchers folded into :class:`Selector`."""
    stack: list[list[Any]] = [[]]
    position = 0
    while position < len(tokens):
        kind, text = tokens[position]
        if text == "(":
            stack.append([])
        elif text == ")":
            done = stack.pop()
            stack[-1].append(Parens(done))
        elif text == "{":
            matchers = []
            position += 1
            while tokens[position][1] != "}":
                if tokens[position][1] == ",":
                    position += 1
                    continue
                (_, label), (_, op), (_, value) = tokens[position : position + 3]
                matchers.append((label, op, json.loads(value) if value.startswith('"') else value[1:-1]))
                position += 3
            stack[-1].append(Selector(matchers))
        else:
            stack[-1].append((kind, text))
        position += 1
    assert len(stack) == 1, "unbalanced parentheses"
    return stack[0]


@dataclass
class Level:
    """What one parenthesised level yields: every selector in it, and those whose labels reach its result."""

    uses: list[Use]
    carriers: list[Use]


def analyse(items: list[Any]) -> Level:
    """The metric selectors of one level (and the levels below), with the labels this level's clauses ask
    of them: ``by (...)`` of the selectors whose labels reach the aggregated result (not the right side of
    ``and``/``unless``/``group_left``), ``on (...)`` of both sides, ``group_left (...)`` of the right side.
    ``without`` and ``ignoring`` ask for nothing."""
    uses: list[Use] = []
    carriers: list[Use] = []
    segment = 0  # where the operand of the last `or` starts in `uses`
    on_labels: set[str] = set()
    one_side: list[tuple[int, set[str]]] = []  # group_left (...): from this index on
    carrying = True
    pending_by: set[str] = set()  # `sum by (x) (...)`: for the group that follows
    previous: Level | None = None  # the group just read, for `sum (...) by (x)`

    def end_segment() -> None:
        for use in uses[segment:]:
            use.labels |= on_labels
        for start, labels in one_side:
            for use in uses[start:]:
                use.labels |= labels

    position = 0
    while position < len(items):
        item = items[position]
        after = items[position + 1] if position + 1 < len(items) else None
        group = None
        if isinstance(item, Parens):
            group = analyse(item.items)
            for use in group.carriers:
                use.labels |= pending_by
            pending_by = set()
            uses += group.uses
            carriers += group.carriers if carrying else []
        elif isinstance(item, tuple) and item[0] == "name":
            word = item[1]
            if word in GROUPING and isinstance(after, Parens):
                labels = {text for kind, text in after.items if kind == "name"}
                position += 1
                if word == "on":
                    on_labels |= labels
                elif word == "group_left":
                    carrying = False
                    one_side.append((len(uses), labels))
                elif word == "group_right":
                    for use in uses[segment:]:
                        use.labels |= labels
                    carriers = [use for use in carriers if use not in uses[segment:]]
                elif word == "by" and previous is not None:  # `sum (...) by (x)`
                    for use in previous.carriers:
                        use.labels |= labels
                elif word == "by":
                    pending_by = labels
            elif word.lower() in ("and", "unless"):
                carrying = False
            elif word.lower() == "or":
                end_segment()
                segment, on_labels, one_side, carrying = len(uses), set(), [], True
            elif isinstance(after, Parens) or word.lower() in KEYWORDS or word in GROUPING:
                pass  # a function, an aggregation or an operator
            elif isinstance(after, tuple) and after[0] == "name" and after[1] in ("by", "without"):
                pass  # `sum by (...)`
            else:
                use = Use(word)
                if isinstance(after, Selector):
                    position += 1
                    for label, op, value in after.matchers:
                        use.labels.add(label)
                        if "$" in value:
                            continue  # a Grafana variable
                        if op == "=" and value:
                            use.values.add((label, value))
                        elif op == "=~" and re.fullmatch(r"\w+(\|\w+)*", value):
                            use.values.update((label, alternative) for alternative in value.split("|"))
                uses.append(use)
                if carrying:
                    carriers.append(use)
        previous = group
        position += 1
    end_segment()
    return Level(uses, carriers)


def needs(exprs: list[str]) -> dict[str, Use]:
    """Every metric the expressions use, with all the labels and literal label values they need of it."""
    merged: dict[str, Use] = {}
    for expr in exprs:
        for use in analyse(nest(tokenize(expr))).uses:
            into = merged.setdefault(use.metric, Use(use.metric))
            into.labels |= use.labels - TARGET_LABELS - {"__name__"}
            into.values |= {(label, value) for label, value in use.values if label not in TARGET_LABELS}
    for metric in NOT_SERVED:
        merged.pop(metric, None)
    return merged


def test_the_expression_reader_finds_metrics_labels_and_values() -> None:
    """The small PromQL reader behind the scrape test sees what an expression needs."""
    found = needs(
        [
            'histogram_quantile(0.95, sum by (org_id, le) (increase(a_bucket{instance=~"$instance"}[$__range])))',
            'sum(rate(b_total{status="429", kind=~"x|y", op!="z"}[5m])) by (operation) or vector(0)',
            "time() - max by (org_id) (c) > on (org_id) group_left (name) d",
            "max by (org_id) ((e unless on (org_id) f offset 1h) < on (instance, job) group_left () (time() - g))",
            "sum by (x) (h and i) or sum by (y) (j * on (z) group_right () k)",
            'up{job="syncd"} == 0 or absent(up{job="syncd"})',
        ]
    )
    assert {m: u.labels for m, u in found.items()} == {
        "a_bucket": {"org_id", "le"},
        "b_total": {"status", "kind", "op", "operation"},
        "c": {"org_id"},
        "d": {"org_id", "name"},
        "e": {"org_id"},
        "f": {"org_id"},
        "g": set(),
        "h": {"x"},
        "i": set(),
        "j": {"z"},
        "k": {"y", "z"},
    }
    assert found["b_total"].values == {("status", "429"), ("kind", "x"), ("kind", "y")}
    assert alert_exprs("      - expr: |\n          a\n            > b\n        for: 5m\n      - expr: 'c'\n") == [
        "a > b",
        "c",
    ]


# -- the files on their own ------------------------------------------------------------------------------


PROMETHEUS = {"type": "prometheus", "uid": "${datasource}"}  # the dashboard's datasource variable


def test_dashboard_is_importable() -> None:
    """Grafana dashboard JSON that works both imported (UI, API) and provisioned from a file: the
    Prometheus is a datasource template variable every panel, query and variable uses, not an
    import-time `__inputs` placeholder (a provisioned file keeps `${DS_...}` as it is: no data)."""
    board = dashboard()
    assert board["uid"] and board["title"] and board["id"] is None and board["schemaVersion"] >= 36
    assert "__inputs" not in board and "${DS_" not in json.dumps(board)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert board["templating"]["list"][0]["name"] == "datasource"  # first: the others query it
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    for name in ("instance", "org_id"):
        assert variables[name]["multi"] and variables[name]["includeAll"], name
        assert "label_values(" in json.dumps(variables[name]["query"]), name
        assert variables[name]["datasource"] == PROMETHEUS, name
    ids, graphs = set(), 0
    for panel in panels(board):
        assert panel["id"] not in ids and panel["title"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        ids.add(panel["id"])
        if panel["type"] == "row":
            continue
        graphs += 1
        assert panel["datasource"] == PROMETHEUS, panel["title"]
        assert all(t.get("datasource", PROMETHEUS) == PROMETHEUS for t in panel["targets"]), panel["title"]
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    assert graphs >= 15
    text = json.dumps(board)
    for metric in (
        "syncd_org_last_success_timestamp_seconds",
        "syncd_org_max_age_seconds",
        "syncd_pass_duration_seconds_bucket",
        "syncd_devices",
        "syncd_device_changes_total",
        "syncd_http_requests_total",
        "syncd_http_retries_total",
        "syncd_retry_after_wait_seconds_total",
        "syncd_edit_queue",
        "syncd_edit_queue_oldest_pending_seconds",
        "syncd_org_failing",
        "syncd_auth_paused",
        "syncd_purges_refused_total",
    ):
        assert metric in text, metric


def test_every_alert_has_a_duration_severity_and_runbook() -> None:
    """Each rule waits (``for:``), says how bad it is, and tells what to look at; each is tested firing."""
    blocks = alert_blocks()
    assert set(blocks) >= {
        "SyncdOrgStale",
        "SyncdOrgNeverSynced",
        "SyncdEditQueueStuck",
        "SyncdEditQueueGrowing",
        "SyncdEditsNeedAttention",
        "SyncdPurgesRefused",
        "SyncdApiKeyRefused",
        "SyncdDown",
        "SyncdEditAwaitingApproval",
    }
    assert re.search(r"^\s*- name: syncd\s*$", ALERTS.read_text(), re.MULTILINE)
    assert len(alert_exprs()) == len(blocks)  # the scrape test reads every rule's expression
    assert len(ALERT_TESTS) >= 2, ALERT_TESTS
    tests = "\n".join(path.read_text() for path in ALERT_TESTS)
    for name, block in blocks.items():
        assert re.search(r"^\s*for: \d+[smh]\s*$", block, re.MULTILINE), name
        assert re.search(r"^\s*severity: (critical|warning)\s*$", block, re.MULTILINE), name
        assert re.search(r"^\s*summary:", block, re.MULTILINE), name
        assert re.search(r"^\s*description:", block, re.MULTILINE), name
        assert re.search(r"`(syncd|journalctl|systemctl|sudo) [^`]+`", block), f"{name} names no command to run"
        if "org_id" in block.split("annotations:")[0]:
            assert "{{ $labels.org_id }}" in block, f"{name} does not name the org"
        firing = re.search(rf"alertname: {name}\n\s*exp_alerts:\n\s*- exp_labels:", tests)
        assert firing, f"{name} is never tested firing in {', '.join(p.name for p in ALERT_TESTS)}"


def promtool() -> str:
    """promtool's path, or skip."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not on PATH: install Debian's prometheus package (apt-get install prometheus)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


def test_alert_rules_pass_promtool_check() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_blocks())} rules found" in result.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    result = run_promtool("test", "rules", *(str(path) for path in ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query, its Grafana variables filled in, parses as a recording rule."""
    rules = []
    for number, expr in enumerate(dashboard_exprs()):
        filled = expr
        for variable, value in GRAFANA_RANGES.items():
            filled = filled.replace(variable, value)
        rules.append({"record": f"dashboard:query_{number}", "expr": filled})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- against the real daemon ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(url: str) -> dict[str, list[dict[str, str]]] | None:
    """Sample name -> the label sets served, or None while the endpoint does not answer."""
    try:
        body = httpx.get(url, timeout=2.0).text
    except httpx.TransportError:
        return None
    served: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            served.setdefault(sample.name, []).append({**sample.labels, VALUE: repr(sample.value)})
    return served


def has(served: dict[str, list[dict[str, str]]], metric: str, **labels: str) -> bool:
    """Whether ``metric`` is served with these label values."""
    return any(all(sample.get(k) == v for k, v in labels.items()) for sample in served.get(metric, []))


def positive(served: dict[str, list[dict[str, str]]], metric: str, **labels: str) -> bool:
    """Whether ``metric`` is served with these label values and a value above 0 (series start at 0)."""
    return any(
        all(sample.get(k) == v for k, v in labels.items()) and float(sample[VALUE]) > 0
        for sample in served.get(metric, [])
    )


def test_every_metric_the_dashboard_and_alerts_use_is_served(tmp_path: Path) -> None:
    """The daemon, after one pass per org, a refused mass purge, a 429 and one pushed edit, serves every
    series the dashboard and the alert rules use, with the labels and label values they select on."""
    wanted = needs(dashboard_exprs() + alert_exprs())
    assert len(wanted) >= 15 and all(m.startswith(("syncd_", "process_")) for m in wanted), sorted(wanted)

    world = World(seed=11)
    healthy, refusing = world.seed(orgs=2, devices_per_org=300)
    world.add_key(API_KEY)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    log_path = tmp_path / "daemon.log"
    deadline = time.monotonic() + DEADLINE
    served: dict[str, list[dict[str, str]]] | None = None
    with Simulator(world) as sim:
        sim.inject(Fault(status=429, retry_after="1", operation="list_devices", org_id=healthy, times=1))
        config = tmp_path / "syncd.toml"
        config.write_text(
            f'[api]\nbase_url = "{sim.url}"\napi_key_env = "{KEY_ENV}"\n'
            "[api.retry]\nbase_delay = 0.01\nmax_delay = 0.05\n"
            f'[database]\nurl = "sqlite:///{tmp_path / "mirror.db"}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
            '[sync]\ninterval = "2s"\n[writeback]\ninterval = "1s"\n[logging]\nformat = "json"\n'
            f'[[orgs]]\nid = "{healthy}"\n[[orgs]]\nid = "{refusing}"\n'
        )
        env = {**os.environ, KEY_ENV: API_KEY}
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "syncd", "run", "--config", str(config)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        try:

            def wait_for(condition: Callable[[dict[str, list[dict[str, str]]]], bool], what: str) -> None:
                while time.monotonic() < deadline:
                    assert proc.poll() is None, f"the daemon exited ({proc.returncode}):\n{log_path.read_text()}"
                    served = scrape(url)
                    if served is not None and condition(served):
                        return
                    time.sleep(0.2)
                pytest.fail(f"no {what} within {DEADLINE:.0f}s:\n{log_path.read_text()[-4000:]}")

            last_success = "syncd_org_last_success_timestamp_seconds"
            wait_for(
                lambda s: has(s, last_success, org_id=healthy) and has(s, last_success, org_id=refusing),
                what="successful pass of both orgs",
            )
            for device_id in world.ids(refusing)[:75]:  # a quarter of the org: the mass-purge guard refuses
                world.purge_device(refusing, device_id)
            device_id = next(i for i in world.ids(healthy) if world.device(healthy, i)["deleted_at"] is None)
            edit = subprocess.run(
                [sys.executable, "-m", "syncd", "edit", device_id, "--external-id", "ops-1", "--config", str(config)],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert edit.returncode == 0, edit.stdout + edit.stderr
            wait_for(
                lambda s: (
                    positive(s, "syncd_purges_refused_total", org_id=refusing)
                    and positive(s, "syncd_org_failing", org_id=refusing)
                    and has(s, "syncd_edit_attempts_total", result="succeeded")
                    and has(s, "syncd_http_requests_total", status="429")
                ),
                what="refused purge, failing org, pushed edit and 429",
            )
            served = scrape(url)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    assert proc.returncode == 0, log_path.read_text()[-4000:]

    assert served is not None
    problems = []
    for metric, use in sorted(wanted.items()):
        samples = served.get(metric)
        if not samples:
            problems.append(f"{metric}: not served")
            continue
        for label in sorted(use.labels):
            if not all(label in sample for sample in samples):
                problems.append(f"{metric}: no label {label!r} (served: {sorted(samples[0])})")
        for label, value in sorted(use.values):
            if not any(sample.get(label) == value for sample in samples):
                problems.append(f"{metric}: no series with {label}={value!r}")
    assert not problems, "the dashboard or the alert rules use what syncd does not serve:\n" + "\n".join(problems)
