"""The rules of issue 17 one by one, in this process, with property-based tests where the input
space is large: Retry-After that cannot break anything, secrets masked in every form and at every
cut, entity ids, add / remove that never change whether a door is restricted, credentials found
wherever a schema puts them, schemas that are unusable rather than dangerous, and a bug in one
edit that costs that edit only (SQLite and PostgreSQL)."""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.api import OpenAppClient, parse_retry_after
from syncd.edits import KINDS, DoorRestrictionsEdit, EditProblem, Remote, Update, queue_edit
from syncd.models import (
    DEVICE_ID,
    REDACTED,
    DoorRestrictions,
    is_entity_id,
    masked,
    one_line,
    parse_device,
)
from syncd.schemas import SchemaUnusable, index_of, schema_problem, validate
from syncd.simulator import World
from syncd.store import Store

from .test_writeback import ORGS, active, edit, reconciler

ULIDS = [f"01HENT0000000000000000000{c}" for c in "ABCDEF"]
DEVICE = parse_device({"id": "01HK153X0038NZ3ZA2MABNBN61", "org_id": "01HORG00000000000000000000"})
QUICK = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- Retry-After --------------------------------------------------------------------------------------


@QUICK
@given(
    st.one_of(
        st.text(max_size=60),
        st.integers(min_value=-(10**30), max_value=10**30).map(str),
        st.builds(
            lambda year, zone: f"Wed, 21 Oct {year} 07:28:00 {zone}",
            st.integers(min_value=0, max_value=10**25),
            st.sampled_from(["GMT", "+2359", "-2359", "UT", "+9999"]),
        ),
    )
)
def test_any_retry_after_is_a_bounded_wait_or_no_hint(value: str) -> None:
    seconds = parse_retry_after(value, 60.0, now=datetime(2026, 12, 5, tzinfo=UTC))
    assert seconds is None or 0 < seconds <= 60.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 60.0),
        ("1.5", 1.5),
        ("0", None),
        ("Wed, 21 Oct 99999999999999999999 07:28:00 GMT", None),  # a 20-digit year
        ("1e3", None),  # not delta-seconds
        ("inf", None),
        ("-5", None),
        ("9" * 400, 60.0),
    ],
)
def test_retry_after_examples(value: str, expected: float | None) -> None:
    assert parse_retry_after(value, 60.0) == expected


# -- secrets in messages ------------------------------------------------------------------------------

secrets = st.text(
    st.characters(blacklist_characters="*", blacklist_categories=("Cs",)), min_size=6, max_size=60
).filter(lambda s: s.strip() == s and len(set(s)) > 2)
surroundings = st.text(" .:=-#", max_size=30)


def forms(secret: str) -> list[str]:
    return [
        secret,
        json.dumps(secret)[1:-1],
        orjson.dumps(secret).decode()[1:-1],
        repr(secret)[1:-1],
        secret.encode("unicode_escape").decode("ascii"),
        quote(secret, safe=""),
    ]


@QUICK
@given(secrets, surroundings, surroundings, st.integers(min_value=0, max_value=5), st.integers(10, 200))
def test_a_secret_is_masked_in_every_form_and_at_any_cut(
    secret: str, before: str, after: str, form: int, limit: int
) -> None:
    text = f"{before}{forms(secret)[form]}{after}"
    for shown in (
        masked(text, [secret]),
        one_line(masked(text, [secret]), limit),
        masked(one_line(text, limit), [secret]),
    ):
        for quoted in forms(secret):
            assert quoted not in shown
            # What a cut may leave of it: at most its first few characters.
            assert quoted[: min(len(quoted) - 1, 8) + 1] + "..." not in shown or len(quoted) <= 8


def test_a_422_quoting_a_long_key_keeps_none_of_it() -> None:
    key = "k" + "0123456789" * 40
    from syncd.api.client import read_problem

    problem = read_problem(422, orjson.dumps({"message": f"value {key} rejected", "error_code": "bad"}), [key])
    assert problem.message is not None and key[:20] not in problem.message and REDACTED in problem.message


# -- entity ids and door restrictions -----------------------------------------------------------------


@QUICK
@given(st.one_of(st.text(max_size=30), st.sampled_from(ULIDS), st.sampled_from([u.lower() for u in ULIDS])))
def test_an_entity_id_is_a_ulid_in_answers_and_edits(value: str) -> None:
    ulid = DEVICE_ID.fullmatch(value) is not None
    assert is_entity_id(value) == ulid
    assert (payload_problem("door_restrictions", {"add": [value]}) is None) == ulid


def test_door_edits_are_capped_in_count_and_bytes() -> None:
    many = [f"01HENT{i:020d}" for i in range(20_001)]
    assert "more than 20000 entities" in (payload_problem("door_restrictions", {"entity_ids": many}) or "")
    assert payload_problem("door_restrictions", {"entity_ids": many[:20_000]}) is None
    assert "more than an edit may be" in (payload_problem("door_restrictions", {"entity_ids": many * 2}) or "")


def payload_problem(action: str, raw: object) -> str | None:
    """What the kind's parse says is wrong with ``raw``, or None."""
    try:
        KINDS[action].parse(raw)
    except EditProblem as exc:
        return str(exc)
    return None


@QUICK
@given(
    st.sets(st.sampled_from(ULIDS)),
    st.sets(st.sampled_from(ULIDS)),
    st.sets(st.sampled_from(ULIDS)),
)
def test_add_and_remove_never_change_whether_a_door_is_restricted(
    current: set[str], add: set[str], remove: set[str]
) -> None:
    add -= remove
    if not add and not remove:
        return
    kind = DoorRestrictionsEdit()
    payload = kind.parse({"add": sorted(add), "remove": sorted(remove)})
    remote = Remote(DEVICE, restrictions=DoorRestrictions(tuple(sorted(current)), "apartment_entity_ids", {}))
    target = sorted((current | add) - remove)
    problem = kind.unsendable(payload, remote)
    changes_meaning = bool(current) != bool(target) or (not current and bool(remove))
    assert (problem is None) == (not changes_meaning), (current, payload, problem)
    if changes_meaning:
        assert not kind.applied(payload, remote)  # never "succeeded" on a door it left open to anyone
    if problem is None:
        assert kind.target(payload, remote) == target
    # A whole list says what it means: it may change either way.
    assert kind.unsendable(kind.parse({"entity_ids": sorted(add)}), remote) is None


# -- schemas --------------------------------------------------------------------------------------------

SECRET_LEAF = {"type": "string", "format": "password"}


@st.composite
def placed_credentials(draw: st.DrawFn) -> tuple[dict[str, Any], Any, str]:
    """A schema that reaches a credential through random keywords, an instance with a value there,
    and that value's pointer."""
    steps = draw(
        st.lists(
            st.sampled_from(
                ["properties", "items", "prefixItems", "additional", "pattern", "ref", "allOf", "anyOf", "if"]
            ),
            min_size=1,
            max_size=6,
        )
    )
    defs: dict[str, Any] = {}
    schema: Any = dict(SECRET_LEAF)
    value: Any = "hunter2-secret"
    pointer: list[str] = []
    for n, step in enumerate(reversed(steps)):
        if step == "properties":
            schema, value, pointer = (
                {"type": "object", "properties": {f"p{n}": schema}},
                {f"p{n}": value},
                [f"p{n}", *pointer],
            )
        elif step == "items":
            schema, value, pointer = {"type": "array", "items": schema}, [None, value], ["1", *pointer]
        elif step == "prefixItems":
            schema, value, pointer = {"prefixItems": [{}, schema]}, [0, value], ["1", *pointer]
        elif step == "additional":
            schema, value, pointer = {"additionalProperties": schema}, {f"any{n}": value}, [f"any{n}", *pointer]
        elif step == "pattern":
            schema, value, pointer = {"patternProperties": {"^x": schema}}, {f"x{n}": value}, [f"x{n}", *pointer]
        elif step == "ref":
            defs[f"d{n}"] = schema
            schema = {"$ref": f"#/$defs/d{n}"}
        elif step == "allOf":
            schema = {"allOf": [{"type": ["object", "array", "string"]}, schema]}
        elif step == "anyOf":
            schema = {"anyOf": [{"type": "null"}, schema]}
        else:
            schema = {"if": {"type": "string"}, "then": schema}
    root = {**schema, "$defs": defs} if isinstance(schema, dict) else schema
    return root, value, "".join(f"/{p}" for p in pointer)


@QUICK
@given(placed_credentials())
def test_credentials_are_found_wherever_the_schema_puts_them(case: tuple[dict[str, Any], Any, str]) -> None:
    schema, instance, pointer = case
    assert schema_problem(schema) is None
    index = index_of(schema)
    assert pointer in index.credentials_in(instance)
    assert index.is_credential(pointer)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["$ref", "allOf", "anyOf", "items", "properties", "$defs", "a", "#", "format", "writeOnly"]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@QUICK
@given(json_values, json_values)
def test_any_schema_is_usable_or_unusable_never_a_crash(schema: Any, instance: Any) -> None:
    problem = schema_problem(schema)
    assert problem is None or isinstance(problem, str)
    if problem is None and isinstance(schema, dict | bool):
        with contextlib.suppress(SchemaUnusable):
            index_of(schema).credentials_in(instance)


def test_a_schema_check_that_would_run_for_ever_is_stopped() -> None:
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^(a+)+$"}}}
    with pytest.raises(SchemaUnusable, match=r"took longer than 0\.5s"):
        validate(schema, {"code": "a" * 40 + "!"}, seconds=0.5)
    assert validate(schema, {"code": "aaa"}) == []  # the next check gets a fresh worker


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"$ref": "https://example.com/s.json"}, "outside the schema"),
        ({"$ref": "file:///etc/passwd"}, "outside the schema"),
        ({"$ref": "#/$defs/nope"}, "points to nothing"),
        ({"$ref": "#nowhere"}, "names no anchor"),
        ({"allOf": [{"$ref": "#"}]}, "cycle"),
        ({"$schema": "https://example.com/mine"}, "dialect syncd does not know"),
        ({"description": "x" * 300_000}, "more than syncd checks metadata against"),
        ({"not": {"not": {"not": {}}}} | {"properties": {"a": {"items": [{}] * 2}}}, None),
        ({"properties": {"child": {"$ref": "#"}}}, None),  # recursion through the instance ends
        ({"$defs": {"a b": {"type": "object"}}, "$ref": "#/$defs/a%20b"}, None),  # a URI fragment, decoded
        (  # a chain of 1,200 references: long, not too complex, and no recursion in syncd's own stack
            {
                "$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(1200)} | {"d1200": {}},
                "$ref": "#/$defs/d0",
            },
            None,
        ),
        (  # up to draft 7 an $id beside a $ref is ignored (as jsonschema does): no new base to resolve against
            {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "properties": {"a": {"$id": "http://example.com/x.json", "$ref": "#/definitions/c"}},
                "definitions": {"c": {}},
            },
            None,
        ),
    ],
)
def test_unusable_schemas_say_why(schema: Any, problem: str | None) -> None:
    found = schema_problem(schema)
    assert (found is None) if problem is None else (problem in (found or "")), found


# -- one edit never stops the others --------------------------------------------------------------------


def test_a_bug_in_one_edit_costs_that_edit_only(
    wb_client: OpenAppClient,
    store: Store,
    world: World,
    mirrored: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broken, also_broken, fine, after_push = (active(world, mirrored, n) for n in range(4))
    ids = [
        queue_edit(store, d, "update", {"external_id": f"x-{d[-4:]}"}, "ops", ORGS)
        for d in (broken, also_broken, fine, after_push)
    ]
    real_applied, real_rebase = Update.applied, Update.rebase
    rebase_failures = Counter[str]()

    def applied(self: Update, payload: Any, remote: Remote) -> bool:
        if remote.device.id in (broken, also_broken):
            raise KeyError("a bug")
        return real_applied(self, payload, remote)

    def rebase(self: Update, payload: Any, base: Any, remote: Remote) -> Any:
        if remote.device.id == after_push and not rebase_failures[after_push]:
            rebase_failures[after_push] += 1
            raise ZeroDivisionError("a bug after the push")
        return real_rebase(self, payload, base, remote)

    monkeypatch.setattr(Update, "applied", applied)
    monkeypatch.setattr(Update, "rebase", rebase)
    rec = reconciler(wb_client, store)
    assert rec.run_once() == Counter(failed=2, succeeded=1, retrying=1)
    assert [edit(store, i).status for i in ids] == ["failed", "failed", "succeeded", "pending"]
    assert "internal error: KeyError" in (edit(store, ids[0]).last_error or "")
    assert "nothing was sent" in (edit(store, ids[0]).last_error or "")
    assert "may have gone out" in (edit(store, ids[3]).last_error or "")
    logged = capsys.readouterr().out
    assert logged.count("internal error while processing an edit") == 2  # one per kind of bug, not per edit
    assert logged.count("Traceback") == 2
    with store.engine.begin() as conn:  # due now, not after its backoff
        conn.exec_driver_sql(f"UPDATE device_edits SET next_attempt_at = NULL WHERE id = {ids[3]}")
    assert rec.run_once() == Counter(succeeded=1)  # found applied: not pushed twice
    assert world.device(mirrored, after_push)["external_id"] == f"x-{after_push[-4:]}"


def test_a_unusable_schema_is_recorded_on_its_definition(store: Store) -> None:
    from syncd.models import parse_metadata_definition
    from syncd.store.details import DefinitionAnswer, MetadataDefinitions

    schema = {"$ref": "http://169.254.169.254/latest/meta-data"}
    definition = parse_metadata_definition({"provider_type": "acme", "schema": schema, "data": {}})
    answer = DefinitionAnswer(
        "01HINT0000000000000000000A",
        "01HK153X0038NZ3ZA2MABNBN61",
        datetime.now(UTC),
        definition,
        schema_problem=schema_problem(schema),
    )
    MetadataDefinitions(store).record("01HORG00000000000000000000", datetime.now(UTC), [answer])
    row = MetadataDefinitions(store).for_integration("01HORG00000000000000000000", "01HINT0000000000000000000A")
    assert row is not None and "syncd never fetches a schema reference" in (row["schema_problem"] or "")
    assert re.search(r"outside the schema", row["schema_problem"] or "")


def test_a_bug_in_a_write_back_round_is_logged_with_its_traceback_once(
    tmp_path: Any, sim: Any, world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from syncd.config import Config, DatabaseSettings, OrgSettings
    from syncd.daemon import Daemon
    from syncd.notify import Notifier

    from .conftest import api_settings

    config = Config(
        api=api_settings(sim),
        database=DatabaseSettings(url=f"sqlite:///{tmp_path}/d.db"),
        orgs=tuple(OrgSettings(org) for org in sorted(ORGS)),
    )
    daemon = Daemon(config, notifier=Notifier({}))

    def broken() -> Counter[str]:
        raise RuntimeError("a bug in the round")

    monkeypatch.setattr(daemon.reconciler, "run_once", broken)
    for _ in range(3):
        daemon._reconcile_job()
    logged = capsys.readouterr().out
    assert logged.count("write-back round failed: internal error") == 3
    assert logged.count("Traceback") == 1


def test_the_checking_process_itself_never_fetches_a_reference() -> None:
    """Behind the static check, the worker's own resolver refuses every retrieval."""
    from syncd import schemas

    from .loopback import JsonHandler, LoopbackServer

    asked: list[str] = []

    class Handler(JsonHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send(200, {"type": "string"})

    with LoopbackServer(Handler) as server:
        schema = {"properties": {"x": {"$ref": f"{server.origin}/evil.json"}}}
        assert schema_problem(schema) is not None  # the static check already refuses it
        with pytest.raises(SchemaUnusable, match=r"Unresolvable|NoSuchResource|Unretrievable"):
            schemas._worker.ask(schema, {"x": 1}, 5.0)  # and the worker, asked directly, fetches nothing
    assert asked == []


def test_the_delete_cap_is_counted_and_taken_in_one_step(database_url: str, store: Store) -> None:
    """Two reconcilers reach the last slot at once: the second waits until the first has recorded
    its send, then finds the cap reached (deterministic: the first holds its step open)."""
    import threading
    from datetime import timedelta

    from syncd.store.dialect import dialect_for
    from syncd.store.edits import EditQueue, SendCap

    with store.engine.begin() as conn:
        for n in range(2):
            conn.exec_driver_sql(
                f"INSERT INTO device_edits (device_id, action) VALUES ('01HK153X0038NZ3ZA2MABNBN6{n}', 'delete')"
            )
    stores = [Store(database_url), Store(database_url)]  # two processes' worth of connections and locks
    first, second = (
        EditQueue(s).claim(datetime.now(UTC), timedelta(minutes=2), 1, f"r{i}")[0] for i, s in enumerate(stores)
    )
    dialect = dialect_for(store.dialect)
    real_now = dialect.database_now
    counting = threading.Event()

    def slow_now(conn: Any) -> datetime:
        if threading.current_thread().name == "first":
            counting.set()
            threading.Event().wait(1.0)  # inside the step: counted nothing yet, recorded nothing yet
        return real_now(conn)

    cap = SendCap("delete", 1, timedelta(hours=1))
    results: dict[str, Any] = {}

    def send(name: str, queue: EditQueue, edit: Any) -> None:
        results[name] = queue.sending(edit, cap)

    try:
        dialect.database_now = slow_now  # type: ignore[method-assign]
        thread = threading.Thread(target=send, args=("first", EditQueue(stores[0]), first), name="first")
        thread.start()
        assert counting.wait(10)
        send("second", EditQueue(stores[1]), second)
        thread.join(10)
    finally:
        dialect.database_now = real_now  # type: ignore[method-assign]
        for s in stores:
            s.close()
    assert results["first"] is None  # it sends
    assert results["second"] is not None and results["second"].count == 1  # it waits: no second delete


def test_leases_are_judged_on_the_databases_clock_and_a_lost_claim_sends_nothing(store: Store) -> None:
    from datetime import timedelta

    from syncd.errors import ClaimLostError
    from syncd.store.edits import EditQueue

    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO device_edits (device_id, action) VALUES ('01HK153X0038NZ3ZA2MABNBN61', 'delete')"
        )
    queue = EditQueue(store)
    now = datetime.now(UTC)
    (mine,) = queue.claim(now, timedelta(minutes=2), 1, "a")
    ahead = now + timedelta(hours=2)  # a host whose clock runs two hours ahead
    assert queue.claim(ahead, timedelta(minutes=2), 1, "b") == []  # the lease still holds
    (theirs,) = queue.claim(now, timedelta(0), 1, "b")  # a lease that has run out is taken over
    assert theirs.recheck
    with pytest.raises(ClaimLostError):
        queue.sending(mine)  # no longer a's: nothing is sent
    assert queue.sending(theirs) is None


def test_an_edit_cancelled_after_its_write_went_out_keeps_no_credential(
    sim: Any, wb_client: OpenAppClient, store: Store, world: World, mirrored: str
) -> None:
    from syncd.edits import cancel_edit
    from syncd.simulator import Fault

    from .test_edit_kinds import SECRET, of_provider

    device = of_provider(world, mirrored, "akuvox")
    visible = world.device(mirrored, device)["device_metadata"]
    edit_id = queue_edit(store, device, "update", {"device_metadata": {**visible, "sip_password": SECRET}}, "ops", ORGS)
    sim.inject(Fault(status=503, operation="update_device", times=1))
    assert reconciler(wb_client, store).run_once() == Counter(retrying=1)  # sent; its outcome: 503
    assert SECRET in orjson.dumps(edit(store, edit_id).payload).decode()  # kept: it will be pushed again
    assert cancel_edit(store, edit_id, datetime.now(UTC)) == "pending"
    cancelled = edit(store, edit_id)
    assert cancelled.status == "cancelled" and SECRET not in orjson.dumps(cancelled.payload).decode()
    assert cancelled.payload["credentials_redacted"] == ["/sip_password"]
