"""The API client against the simulator over loopback HTTP (plus a fake transport for odd bodies)."""

from __future__ import annotations

import threading
import time
import zlib
from dataclasses import replace
from typing import Any

import httpx
import orjson
import pytest

from syncd.api import OpenAppClient
from syncd.api.ahead import in_order
from syncd.api.client import error_for_status, read_problem
from syncd.config import Secret
from syncd.errors import (
    ApiProblem,
    AuthError,
    ConfigError,
    ForbiddenError,
    InvalidRequestError,
    InvalidResponseError,
    NotFoundError,
    PermanentError,
    RejectedError,
    RequestTimeoutError,
    ResponseTooLargeError,
    ServerBusyError,
    StoppedError,
    TransientError,
    TransportError,
    UnreachableError,
)
from syncd.models import PageShape, UnreadableItem
from syncd.simulator import Fault, Simulator, World

from .conftest import API_KEY, FAST_RETRY, api_settings


@pytest.mark.parametrize(
    ("status", "exception", "retryable"),
    [
        (400, RejectedError, False),
        (401, AuthError, False),
        (403, ForbiddenError, False),
        (404, NotFoundError, False),
        (405, RejectedError, False),
        (409, RejectedError, False),
        (422, RejectedError, False),
        (408, ServerBusyError, True),
        (425, ServerBusyError, True),
        (429, ServerBusyError, True),
        (500, ServerBusyError, True),
        (502, ServerBusyError, True),
        (503, ServerBusyError, True),
        (504, ServerBusyError, True),
        (507, ServerBusyError, True),
    ],
)
def test_status_to_exception(status: int, exception: type[Exception], retryable: bool) -> None:
    error = error_for_status(status, ApiProblem(status, "boom", "code_x"), "get_device", retry_after=None)
    assert type(error) is exception
    assert isinstance(error, TransientError) is retryable
    assert error.status == status
    assert f"HTTP {status} (code_x): boom" in str(error)
    if status == 401:
        assert isinstance(error, ConfigError)


def test_error_body_fields_are_kept() -> None:
    body = orjson.dumps({"message": "Device has entities", "error_code": "has_entities", "correlationId": "c-1"})
    assert read_problem(422, body) == ApiProblem(422, "Device has entities", "has_entities", "c-1")


@pytest.mark.parametrize("key", ["error_code", "errorCode", "code"])  # the contract's, camelCase, the SDK's
def test_error_code_is_read_under_any_of_its_names(key: str) -> None:
    body = orjson.dumps({"message": "Device has entities", key: "has_entities"})
    assert read_problem(422, body).error_code == "has_entities"


def test_non_json_error_body_is_tolerated() -> None:
    problem = read_problem(502, b"<html><body>Bad gateway\n</body></html>")
    assert problem.status == 502
    assert problem.message == "Bad gateway"  # the text of the page, not its markup
    assert read_problem(500, b"").message is None


def record_sleep() -> tuple[list[float], Any]:
    waits: list[float] = []
    return waits, waits.append


def test_lists_every_page_with_the_spec_query(sim: Simulator, client: OpenAppClient, org: str) -> None:
    pages = list(client.list_device_pages(org))
    assert [p.offset for p in pages] == [0, 200, 400]
    assert [len(p.items) for p in pages] == [200, 200, 50]
    ids = [d["id"] for p in pages for d in p.items]
    assert ids == sim.world.ids(org)  # soft-deleted included, in id order
    assert any(d.get("deleted_at") for p in pages for d in p.items)
    assert {r.org_id for r in sim.requests("list_devices")} == {org}


def test_exact_multiple_of_page_size_ends_on_an_empty_page(world: World, sim: Simulator, org: str) -> None:
    for device_id in world.ids(org)[400:450]:
        world.purge_device(org, device_id)
    with OpenAppClient(api_settings(sim)) as client:
        pages = list(client.list_device_pages(org))
    assert [len(p.items) for p in pages] == [200, 200, 0]


def test_page_size_and_filters_are_sent(sim: Simulator, org: str) -> None:
    integration = sim.world.orgs[org].integrations[0]
    with OpenAppClient(api_settings(sim, page_size=50)) as client:
        items = [d for p in client.list_device_pages(org, integration_id=integration) for d in p.items]
    assert items and all(d["integration_id"] == integration for d in items)
    assert all(r.offset is not None and r.offset % 50 == 0 for r in sim.requests("list_devices"))


@pytest.mark.parametrize("style", ["x-api-key", "bearer"])
def test_auth_header_styles(world: World, style: str, org: str) -> None:
    with Simulator(world, auth_header=style) as strict, OpenAppClient(api_settings(strict, auth_header=style)) as c:
        assert c.get_device(org, world.ids(org)[0])["id"] == world.ids(org)[0]
    other = "bearer" if style == "x-api-key" else "x-api-key"
    with Simulator(world, auth_header=style) as strict, OpenAppClient(api_settings(strict, auth_header=other)) as c:
        with pytest.raises(AuthError):
            c.get_device(org, world.ids(org)[0])


def test_transient_errors_are_retried_then_succeed(sim: Simulator, org: str) -> None:
    sim.inject(Fault(status=503, times=2, operation="list_devices"))
    sim.inject(Fault(kind="reset", times=1, operation="list_devices"))
    sim.inject(Fault(status=502, times=1, operation="list_devices", body=b"<html>bad gateway</html>"))
    waits, sleep = record_sleep()
    with OpenAppClient(api_settings(sim), sleep=sleep) as client:
        items = [d for p in client.list_device_pages(org) for d in p.items]
    assert len(items) == 450
    assert len(waits) == 4
    assert client.retries == 4


def test_retry_after_is_honoured(sim: Simulator, org: str) -> None:
    sim.inject(Fault(status=429, retry_after="1", times=1))
    sim.inject(Fault(status=503, retry_after="0", times=1))  # 0 = no hint: our own (small) backoff
    waits, sleep = record_sleep()
    with OpenAppClient(api_settings(sim), sleep=sleep) as client:
        client.get_device(org, sim.world.ids(org)[0])
    assert waits[0] == 1.0
    assert waits[1] <= FAST_RETRY.base_delay * 2


def test_retry_after_is_clamped(sim: Simulator, org: str) -> None:
    sim.inject(Fault(status=429, retry_after="86400", times=1))
    waits, sleep = record_sleep()
    with OpenAppClient(api_settings(sim), sleep=sleep) as client:
        client.get_device(org, sim.world.ids(org)[0])
    assert waits == [FAST_RETRY.max_retry_after]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_permanent_errors_are_never_retried(sim: Simulator, org: str, status: int) -> None:
    sim.inject(Fault(status=status, times=None, body=orjson.dumps({"message": "no", "error_code": "nope"})))
    with OpenAppClient(api_settings(sim)) as client, pytest.raises((PermanentError, AuthError)) as caught:
        client.get_device(org, sim.world.ids(org)[0])
    assert caught.value.problem == ApiProblem(status, "no", "nope")
    assert len(sim.requests("get_device")) == 1


def test_gives_up_after_max_attempts(sim: Simulator, org: str) -> None:
    sim.inject(Fault(status=503, times=None))
    with OpenAppClient(api_settings(sim), sleep=lambda s: None) as client, pytest.raises(ServerBusyError) as caught:
        client.get_device(org, sim.world.ids(org)[0])
    assert len(sim.requests("get_device")) == FAST_RETRY.max_attempts
    assert f"gave up after {FAST_RETRY.max_attempts} attempts" in str(caught.value)


def test_deadline_bounds_retrying(sim: Simulator, org: str) -> None:
    sim.inject(Fault(status=429, retry_after="2", times=None))
    policy = replace(FAST_RETRY, max_attempts=100, deadline=5.0)
    waits, sleep = record_sleep()
    with OpenAppClient(api_settings(sim, retry=policy), sleep=sleep) as client, pytest.raises(ServerBusyError):
        client.get_device(org, sim.world.ids(org)[0])
    # Waits are only recorded, not slept, so the deadline never passes: the attempt cap ends it.
    assert len(waits) == 99
    real = replace(FAST_RETRY, max_attempts=100, deadline=0.5)
    with OpenAppClient(api_settings(sim, retry=real)) as client, pytest.raises(ServerBusyError) as caught:
        client.get_device(org, sim.world.ids(org)[0])
    assert "gave up after 1 attempts" in str(caught.value)  # the 2 s hint does not fit in 0.5 s


def test_read_timeout_is_a_transport_error(sim: Simulator, org: str) -> None:
    sim.inject(Fault(kind="slow", delay=1.0, times=None))
    policy = replace(FAST_RETRY, max_attempts=2)
    with OpenAppClient(api_settings(sim, read_timeout=0.2, retry=policy)) as client:
        with pytest.raises(TransportError, match="ReadTimeout"):
            client.get_device(org, sim.world.ids(org)[0])


def test_connection_refused_is_a_transport_error(sim: Simulator) -> None:
    settings = replace(
        api_settings(sim), base_url="http://127.0.0.1:9/api/v1", retry=replace(FAST_RETRY, max_attempts=2)
    )
    with OpenAppClient(settings) as client, pytest.raises(TransportError) as caught:  # retried as any transport error
        client.get_device("org", "01HK153X0038NZ3ZA2MABNBN61")
    assert isinstance(caught.value, UnreachableError) and caught.value.reason == "refused"
    assert "nothing listens on 127.0.0.1:9 (connection refused); check api.base_url" in str(caught.value)
    assert "gave up after 2 attempts" in str(caught.value)


def test_x_org_is_enforced(sim: Simulator, world: World) -> None:
    org_a, org_b = list(world.orgs)
    with OpenAppClient(api_settings(sim)) as client, pytest.raises(NotFoundError):
        client.get_device(org_a, world.ids(org_b)[0])


def test_update_restore_delete_round_trip(sim: Simulator, client: OpenAppClient, org: str) -> None:
    device_id = sim.world.ids(org)[5]
    updated = client.update_device(org, device_id, {"name": {"en": "Renamed"}})
    assert updated["name"] == {"value": {"en": "Renamed"}}
    assert client.delete_device(org, device_id)["deleted_at"]
    assert client.restore_device(org, device_id)["deleted_at"] is None
    with pytest.raises(RejectedError, match="not_soft_deleted"):
        client.restore_device(org, device_id)


def fake_list(bodies: list[bytes]) -> httpx.MockTransport:
    """A transport answering list requests with canned bodies, for shapes the simulator never sends:
    the n-th body for the n-th page (by offset, as pages are asked several at once), then ``[]``."""

    def answer(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["offset"]) // int(request.url.params["limit"])
        return httpx.Response(200, stream=httpx.ByteStream(bodies[page] if page < len(bodies) else b"[]"))

    return httpx.MockTransport(answer)


def device(i: int) -> dict[str, Any]:
    return {"id": f"01HK153X0038NZ3ZA2MAB{i:05d}", "org_id": "O", "integration_id": "I", "name": {"en": str(i)}}


def test_items_total_envelope_is_accepted(sim: Simulator) -> None:
    bodies = [
        orjson.dumps({"items": [device(i) for i in range(2)], "total": 3}),
        orjson.dumps({"items": [device(2)], "total": 3}),
    ]
    with OpenAppClient(api_settings(sim, page_size=2), transport=fake_list(bodies)) as client:
        assert [len(p.items) for p in client.list_device_pages("O")] == [2, 1]


def test_devices_added_during_the_scan_are_paged_past_the_first_total(sim: Simulator) -> None:
    # The first answer says 4 devices; two more are added while the later pages are asked.
    bodies = [
        orjson.dumps({"items": [device(0), device(1)], "total": 4}),
        orjson.dumps({"items": [device(2), device(3)], "total": 6}),
        orjson.dumps({"items": [device(4), device(5)], "total": 6}),
    ]
    with OpenAppClient(api_settings(sim, page_size=2), transport=fake_list(bodies)) as client:
        pages = list(client.list_device_pages("O", concurrency=4))
    assert [page.offset for page in pages] == [0, 2, 4]
    assert [item["id"] for page in pages for item in page.items] == [device(i)["id"] for i in range(6)]


def test_no_offset_past_the_total_is_asked(sim: Simulator) -> None:
    bodies = [orjson.dumps({"items": [device(2 * p), device(2 * p + 1)], "total": 6}) for p in range(3)]
    asked: list[int] = []
    inner = fake_list(bodies)

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(int(request.url.params["offset"]))
        return inner.handle_request(request)

    transport = httpx.MockTransport(answer)
    with OpenAppClient(api_settings(sim, page_size=2), transport=transport) as client:
        assert len(list(client.list_device_pages("O", concurrency=8))) == 3
    assert sorted(asked) == [0, 2, 4]


@pytest.mark.parametrize("body", [b"not json", b'{"data": []}', b'"a string"'])
def test_unreadable_list_bodies_are_invalid_responses(sim: Simulator, body: bytes) -> None:
    with OpenAppClient(api_settings(sim), transport=fake_list([body])) as client:
        with pytest.raises(InvalidResponseError, match="list_devices"):
            list(client.list_device_pages("O"))


def test_a_server_ignoring_offset_is_detected(sim: Simulator) -> None:
    page = orjson.dumps([device(i) for i in range(2)])
    with OpenAppClient(api_settings(sim, page_size=2), transport=fake_list([page] * 5)) as client:
        with pytest.raises(InvalidResponseError, match="ignores 'offset'"):
            list(client.list_device_pages("O"))


def test_client_repr_hides_the_key(client: OpenAppClient) -> None:
    assert API_KEY not in repr(client)
    assert API_KEY not in repr(client.settings)


# -- trust boundaries ---------------------------------------------------------------------------

DEVICE = "01HK153X0038NZ3ZA2MABNBN61"


def recording(answer: Any) -> tuple[list[httpx.Request], httpx.MockTransport]:
    """A transport that records requests and answers each with ``answer(request)``."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status, body, headers = answer(request)
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))

    return seen, httpx.MockTransport(handle)


@pytest.mark.parametrize(
    "device_id",
    [f"ok/../{DEVICE}", "../../admin", "a?x=1", f"01HK153X00%2F..%2F{DEVICE}", DEVICE.lower(), DEVICE + "\n", "", "."],
)
def test_ids_openapp_cannot_have_issued_are_never_requested(sim: Simulator, device_id: str) -> None:
    seen, transport = recording(lambda r: (200, b"{}", {}))
    with OpenAppClient(api_settings(sim), transport=transport) as client:
        for call in (
            lambda: client.get_device("O", device_id),
            lambda: client.update_device("O", device_id, {"external_id": "pwned"}),
            lambda: client.restore_device("O", device_id),
            lambda: client.delete_device("O", device_id),
        ):
            with pytest.raises(InvalidRequestError, match="not an OpenApp device id"):
                call()
    assert seen == []


def test_path_segments_are_percent_encoded_and_exact(sim: Simulator) -> None:
    body = orjson.dumps({"id": DEVICE, "org_id": "O"})
    seen, transport = recording(lambda r: (200, body, {}))
    with OpenAppClient(api_settings(sim), transport=transport) as client:
        client.get_device("O", DEVICE)
        client.restore_device("O", DEVICE)
    assert [r.url.raw_path.split(b"?")[0] for r in seen] == [
        b"/api/v1/devices/" + DEVICE.encode(),
        b"/api/v1/devices/" + DEVICE.encode() + b"/restore",
    ]


@pytest.mark.parametrize(
    "answer",
    [
        {"id": "01HK153X0038NZ3ZA2MABNBN62", "org_id": "O"},  # another device
        {"id": DEVICE, "org_id": "OTHER"},  # the device, seen through another org
        {"org_id": "O"},
        [],
    ],
)
def test_an_answer_about_something_else_is_not_believed(sim: Simulator, answer: Any) -> None:
    _, transport = recording(lambda r: (200, orjson.dumps(answer), {}))
    with OpenAppClient(api_settings(sim), transport=transport) as client:
        for call in (
            lambda: client.get_device("O", DEVICE),
            lambda: client.update_device("O", DEVICE, {"external_id": "x"}),
            lambda: client.restore_device("O", DEVICE),
            lambda: client.delete_device("O", DEVICE),
        ):
            with pytest.raises(InvalidResponseError):
                call()


def test_a_header_value_http_cannot_carry_is_a_config_error_that_quotes_nothing(sim: Simulator) -> None:
    leaky = Secret("KEY-NOW\r\n# previous key: KEY-BEFORE")  # as a two-line key file would have given it
    with pytest.raises(ConfigError, match="spans several lines"):
        api_settings(sim, api_key=leaky)  # settings refuse it, however they are made
    settings = api_settings(sim)
    object.__setattr__(settings, "api_key", leaky)  # and should one get past them, the client quotes nothing
    with OpenAppClient(settings) as client, pytest.raises(ConfigError) as caught:
        client.get_device(sim.world.orgs and next(iter(sim.world.orgs)), DEVICE)
    text = f"{caught.value} {caught.value!r} {caught.value.__cause__!r} {caught.value.__context__!r}"
    assert "KEY-NOW" not in text and "KEY-BEFORE" not in text
    assert not isinstance(caught.value, TransientError)
    assert sim.requests() == []  # nothing was sent, and nothing was retried


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate", "identity"])
def test_compressed_bodies_are_read(sim: Simulator, encoding: str) -> None:
    page = orjson.dumps([device(i) for i in range(3)])
    wbits = {"gzip": 31, "deflate": 15, "raw-deflate": -15, "identity": 0}[encoding]
    if wbits:
        packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
        page = packer.compress(page) + packer.flush()
    header = {"Content-Encoding": "deflate" if encoding == "raw-deflate" else encoding}
    seen, transport = recording(lambda r: (200, page, header))
    with OpenAppClient(api_settings(sim), transport=transport) as client:
        assert [len(p.items) for p in client.list_device_pages("O")] == [3]
    assert seen[0].headers["Accept-Encoding"] == "gzip, deflate"


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
def test_a_body_larger_than_the_cap_is_refused_before_it_is_held(sim: Simulator, encoding: str) -> None:
    zeros = b"[" + b" " * (8 * 1024 * 1024) + b"]"
    page = zeros
    if encoding == "gzip":
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)
        page = packer.compress(zeros) + packer.flush()
    _, transport = recording(lambda r: (200, page, {"Content-Encoding": encoding}))
    settings = api_settings(sim, max_response_size=1024 * 1024)
    with OpenAppClient(settings, transport=transport) as client, pytest.raises(ResponseTooLargeError) as caught:
        list(client.list_device_pages("O"))
    assert "api.max_response_size (1048576 bytes" in str(caught.value)


def test_an_unknown_content_encoding_is_refused(sim: Simulator) -> None:
    _, transport = recording(lambda r: (200, b"\x00\x01", {"Content-Encoding": "br"}))
    with OpenAppClient(api_settings(sim), transport=transport) as client:
        with pytest.raises(InvalidResponseError, match="Content-Encoding 'br' was not asked for"):
            list(client.list_device_pages("O"))


def test_a_page_with_unreadable_items_keeps_the_readable_ones(sim: Simulator) -> None:
    good = [orjson.dumps(device(i)) for i in range(3)]
    bad = b'{"id": "01HK153X0038NZ3ZA2MAB00009", "org_id": "O", "name": "\xff"}'
    body = b"[" + b",".join([good[0], bad, good[1], b"[" * 1100 + b"]" * 1100, good[2]]) + b"]"
    with OpenAppClient(api_settings(sim, page_size=10), transport=fake_list([body])) as client:
        (page,) = list(client.list_device_pages("O"))
    assert [i["id"] if isinstance(i, dict) else i.device_id for i in page.items] == [
        device(0)["id"],
        "01HK153X0038NZ3ZA2MAB00009",
        device(1)["id"],
        None,
        device(2)["id"],
    ]
    assert isinstance(page.items[1], UnreadableItem) and "not readable JSON" in page.items[1].reason


def test_a_read_in_flight_ends_when_the_request_deadline_passes(sim: Simulator, org: str) -> None:
    sim.inject(Fault(kind="slow_reply", delay=5.0, times=None))
    settings = api_settings(sim, request_timeout=1.0, read_timeout=30.0, retry=replace(FAST_RETRY, max_attempts=1))
    started = time.monotonic()
    with OpenAppClient(settings) as client, pytest.raises(RequestTimeoutError, match=r"api\.request_timeout"):
        client.get_device(org, sim.world.ids(org)[0])
    assert time.monotonic() - started < 3


def test_a_stop_interrupts_reads_in_flight_and_waits_between_retries(sim: Simulator, org: str) -> None:
    stop = threading.Event()
    sim.inject(Fault(kind="slow_reply", delay=5.0, times=1))
    with OpenAppClient(api_settings(sim), stop=stop) as client:
        threading.Timer(0.3, stop.set).start()
        started = time.monotonic()
        with pytest.raises(StoppedError, match="interrupted"):
            client.get_device(org, sim.world.ids(org)[0])
        assert time.monotonic() - started < 2
        with pytest.raises(StoppedError, match="not sent"):
            client.get_device(org, sim.world.ids(org)[0])
    stop = threading.Event()
    sim.inject(Fault(status=429, retry_after="30", times=1))
    policy = replace(FAST_RETRY, max_retry_after=60.0, deadline=60.0)
    with OpenAppClient(api_settings(sim, retry=policy), stop=stop) as client:
        threading.Timer(0.3, stop.set).start()
        started = time.monotonic()
        with pytest.raises(StoppedError, match="waiting to retry"):
            client.get_device(org, sim.world.ids(org)[0])
        assert time.monotonic() - started < 2


def test_a_stop_lets_a_write_in_flight_finish(sim: Simulator, org: str) -> None:
    stop = threading.Event()
    device_id = sim.world.ids(org)[0]
    sim.inject(Fault(kind="slow_reply", delay=1.0, times=1, operation="update_device"))
    with OpenAppClient(api_settings(sim), stop=stop) as client:
        threading.Timer(0.2, stop.set).start()
        answer = client.update_device(org, device_id, {"external_id": "finished"})
    assert answer["external_id"] == "finished"


def test_error_text_from_the_server_is_one_printable_line() -> None:
    body = (
        b'{"message": "boom\\nSECOND\\u0000 \\u001b[31m", "error_code": "x\\ny", "correlationId": "'
        + b"c" * 500
        + b'"}'
    )
    problem = read_problem(500, body)
    text = problem.describe()
    assert text.isprintable() and "boom\\nSECOND\\x00 \\x1b[31m" in text and len(text) < 500
    assert read_problem(502, b"<html>\x00\x1b[2J bad\ngateway</html>").describe().isprintable()


def test_a_compressed_body_cut_short_is_refused(sim: Simulator) -> None:
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    page = packer.compress(orjson.dumps([device(i) for i in range(50)])) + packer.flush()
    _, transport = recording(lambda r: (200, page[: len(page) // 2], {"Content-Encoding": "gzip"}))
    with OpenAppClient(api_settings(sim), transport=transport) as client:
        with pytest.raises(InvalidResponseError, match="ends before its compressed stream does"):
            list(client.list_device_pages("O"))


def test_an_html_error_page_is_kept_as_its_title() -> None:
    page = b"<!DOCTYPE html>\n<html><head><title>503 Service Unavailable</title></head><body>" + b"x" * 5000
    assert read_problem(503, page).message == "503 Service Unavailable"
    assert read_problem(502, b"upstream connect error\nor disconnect/reset before headers").message == (
        "upstream connect error"
    )


def max_in_flight(records: list[Any]) -> int:
    """The most requests the simulator was answering at one time."""
    events = sorted([(r.started, 1) for r in records] + [(r.finished, -1) for r in records])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def test_pages_are_asked_ahead_and_handed_over_in_order(sim: Simulator, world: World, org: str) -> None:
    sim.latency = 0.05
    with OpenAppClient(api_settings(sim, page_size=50, page_concurrency=4)) as client:
        pages = list(client.list_device_pages(org))
    assert [p.offset for p in pages] == list(range(0, 500, 50))  # 450 devices: 9 full pages and an empty one
    assert [d["id"] for p in pages for d in p.items] == world.ids(org)
    log = sim.requests("list_devices")
    assert max_in_flight(log) == 4
    assert len(log) <= 10 + 3  # past the end, at most the offsets already asked with the short page
    with OpenAppClient(api_settings(sim, page_size=50, page_concurrency=1)) as client:
        before = len(sim.log)
        assert [p.offset for p in client.list_device_pages(org)] == list(range(0, 500, 50))
    assert max_in_flight(sim.requests("list_devices")[before:]) == 1


def test_no_more_tasks_run_ahead_than_allowed_now() -> None:
    allowed = [2]
    running, peaks, lock = [0], [], threading.Lock()

    def task(i: int) -> int:
        with lock:
            running[0] += 1
            peaks.append((allowed[0], running[0]))
        time.sleep(0.005)
        with lock:
            running[0] -= 1
        return i

    tasks = (lambda i=i: task(i) for i in range(40))
    results = []
    for future in in_order(tasks, 8, "test", first_alone=False, allowed=lambda: allowed[0]):
        results.append(future.result())
        if len(results) == 20:
            allowed[0] = 5  # the budget grew: more may run from now on
    assert results == list(range(40))  # in order, each once
    assert max(running for limit, running in peaks if limit == 2) <= 2
    assert max(running for limit, running in peaks if limit == 5) > 2  # and more did
    assert max(running for _, running in peaks) <= 5


def test_each_page_carries_the_digest_of_its_body(sim: Simulator, world: World, org: str) -> None:
    with OpenAppClient(api_settings(sim, page_size=200)) as client:
        before = [p.digest for p in client.list_device_pages(org)]
        assert [p.digest for p in client.list_device_pages(org)] == before  # the same bodies
        world.update_device(org, world.ids(org)[250], {"external_id": "ext-moved"})
        after = [p.digest for p in client.list_device_pages(org)]
    assert len(set(before)) == 3 and [a == b for a, b in zip(before, after, strict=True)] == [True, False, True]


def test_a_failed_page_ends_the_list_in_order(sim: Simulator) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        offset = int(request.url.params["offset"])
        if offset == 4:
            return httpx.Response(400, stream=httpx.ByteStream(b'{"message": "bad offset"}'))
        body = orjson.dumps([device(offset + i) for i in range(2)])  # a list that never ends by itself
        return httpx.Response(200, stream=httpx.ByteStream(body))

    with OpenAppClient(api_settings(sim, page_size=2, page_concurrency=4), transport=httpx.MockTransport(answer)) as c:
        pages = c.list_device_pages("O")
        assert [next(pages).offset, next(pages).offset] == [0, 2]  # those before the failed one, in order
        with pytest.raises(RejectedError, match="bad offset"):
            next(pages)


def test_many_devices_are_confirmed_at_once(sim: Simulator, world: World, org: str) -> None:
    sim.latency = 0.05
    ids = world.ids(org)[:12]
    with OpenAppClient(api_settings(sim, max_concurrency=4)) as client:  # as many as the budget allows
        answers = [(device_id, answer.result()["id"]) for device_id, answer in client.get_devices(org, ids)]
    assert answers == [(i, i) for i in ids]
    assert max_in_flight(sim.requests("get_device")) == 4


def test_a_page_whose_body_is_known_is_handed_over_unread(sim: Simulator) -> None:
    bodies = [
        orjson.dumps({"items": [device(0), device(1)], "total": 5}),
        orjson.dumps({"items": [device(2), device(3)], "total": 5}),
        orjson.dumps({"items": [device(4)], "total": 5}),
    ]
    with OpenAppClient(api_settings(sim, page_size=2), transport=fake_list(bodies)) as client:
        first = list(client.list_device_pages("O"))
        assert not any(page.known for page in first)
        # What a pass recorded: the middle page as it was, the last one with a body since changed.
        known = {
            2: PageShape(first[1].digest, 2, 5, device(2)["id"]),
            4: PageShape("another body", 1, 5, device(4)["id"]),
        }
        pages = list(client.list_device_pages("O", known=known))
    shapes = [(p.offset, p.known, p.count, p.total) for p in pages]
    assert shapes == [(0, False, 2, 5), (2, True, 2, 5), (4, False, 1, 5)]
    middle = pages[1]
    assert middle._items is None and middle._body == bodies[1]  # not read when it arrived
    assert [item["id"] for item in middle.items] == [device(2)["id"], device(3)["id"]]  # read when asked
    assert middle._body is None


def test_a_known_page_is_paged_by_its_shape(sim: Simulator) -> None:
    bodies = [orjson.dumps([device(0), device(1)]), orjson.dumps([device(2)]), orjson.dumps([device(9)])]
    with OpenAppClient(api_settings(sim, page_size=2, page_concurrency=1), transport=fake_list(bodies)) as client:
        digests = [p.digest for p in client.list_device_pages("O")]
        known = {0: PageShape(digests[0], 2, None, device(0)["id"]), 2: PageShape(digests[1], 1, None, device(2)["id"])}
        assert [p.offset for p in client.list_device_pages("O", known=known)] == [0, 2]  # the short one ends it
        # The shape, not the body, is what paging goes by (the body is not read): a full page goes on.
        full = {2: PageShape(digests[1], 2, None, device(2)["id"])}
        assert [p.offset for p in client.list_device_pages("O", known=full)] == [0, 2, 4]
        # A known page that repeats the previous one's first device: the server ignores 'offset'.
        repeated = {2: PageShape(digests[1], 2, None, device(0)["id"])}
        with pytest.raises(InvalidResponseError, match="repeats the previous one"):
            list(client.list_device_pages("O", known=repeated))
