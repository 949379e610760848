"""The API client against the simulator over loopback HTTP (plus a fake transport for odd bodies)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import httpx
import orjson
import pytest

from syncd.api import OpenAppClient
from syncd.api.client import error_for_status, read_problem
from syncd.errors import (
    ApiProblem,
    AuthError,
    ConfigError,
    ForbiddenError,
    InvalidResponseError,
    NotFoundError,
    PermanentError,
    RejectedError,
    ServerBusyError,
    TransientError,
    TransportError,
)
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


def test_non_json_error_body_is_tolerated() -> None:
    problem = read_problem(502, b"<html><body>Bad gateway\n</body></html>")
    assert problem.status == 502
    assert problem.message == "<html><body>Bad gateway </body></html>"
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
    with OpenAppClient(settings) as client, pytest.raises(TransportError, match="ConnectError"):
        client.get_device("org", "01HK153X0038NZ3ZA2MABNBN61")


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
    """A transport answering list requests with canned bodies, for shapes the simulator never sends."""
    answers = iter(bodies)
    return httpx.MockTransport(lambda request: httpx.Response(200, stream=httpx.ByteStream(next(answers))))


def device(i: int) -> dict[str, Any]:
    return {"id": f"01HK153X0038NZ3ZA2MAB{i:05d}", "org_id": "O", "integration_id": "I", "name": {"en": str(i)}}


def test_items_total_envelope_is_accepted(sim: Simulator) -> None:
    bodies = [
        orjson.dumps({"items": [device(i) for i in range(2)], "total": 3}),
        orjson.dumps({"items": [device(2)], "total": 3}),
    ]
    with OpenAppClient(api_settings(sim, page_size=2), transport=fake_list(bodies)) as client:
        assert [len(p.items) for p in client.list_device_pages("O")] == [2, 1]


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
