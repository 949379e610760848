"""The simulator is faithful to the vendored OpenAPI subset (tests/contract/openapi-devices.json)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from syncd.simulator import Fault, Simulator, World
from syncd.simulator.world import make_ulid

from .conftest import API_KEY

SPEC = json.loads((Path(__file__).parent / "contract" / "openapi-devices.json").read_text())
REGISTRY = Registry().with_resource("urn:openapp", Resource.from_contents(SPEC, default_specification=DRAFT202012))
LIST_QUERY = {"include_deleted": "true", "only_deleted": "false", "include_metadata": "true"}


def validator(schema_name: str, array: bool = False) -> Draft202012Validator:
    ref = {"$ref": f"urn:openapp#/components/schemas/{schema_name}"}
    return Draft202012Validator({"type": "array", "items": ref} if array else ref, registry=REGISTRY)


def assert_valid(instance: Any, schema_name: str, array: bool = False) -> None:
    errors = list(validator(schema_name, array).iter_errors(instance))
    assert not errors, [e.message for e in errors[:3]]


@pytest.fixture
def http(sim: Simulator, org: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, headers={"X-API-Key": API_KEY, "X-Org": org}) as c:
        yield c


def test_list_pages_validate_against_the_spec(http: httpx.Client) -> None:
    response = http.get("/devices", params={**LIST_QUERY, "limit": 200, "offset": 0})
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body, list) and len(body) == 200  # a bare array, no envelope
    assert_valid(body, "DeviceResponse", array=True)
    assert [d["id"] for d in body] == sorted(d["id"] for d in body)


def test_every_operation_validates_against_the_spec(sim: Simulator, http: httpx.Client, org: str) -> None:
    world = sim.world
    device_id = world.ids(org)[0]
    q = {"include_deleted": "true", "include_metadata": "true"}
    assert_valid(http.get(f"/devices/{device_id}", params=q).json(), "DeviceResponse")
    assert_valid(http.put(f"/devices/{device_id}", json={"name": {"value": {"en": "X"}}}).json(), "DeviceResponse")
    assert_valid(http.delete(f"/devices/{device_id}").json(), "DeviceResponse")
    assert_valid(http.post(f"/devices/{device_id}/restore").json(), "DeviceResponse")
    created = http.post(
        "/devices", json={"org_id": org, "integration_id": world.orgs[org].integrations[0], "name": {"en": "New"}}
    )
    assert created.status_code == 200  # the spec says 200, not 201
    assert_valid(created.json(), "DeviceResponse")
    assert_valid(http.get(f"/devices/{device_id}/metadata-definition").json(), "DeviceMetadataDefinitionResponse")
    portal = next(d for d in world.ground_truth(org) if d["device_metadata"]["kind"] == "virtual_access_portal")
    assert_valid(httpx.get(f"{sim.url}/devices/{portal['id']}/door-restrictions").json(), "DoorRestrictionsResponse")
    assert_valid(http.delete(f"/devices/{device_id}/purge").json(), "DeviceResponse")
    missing = http.get(f"/devices/{device_id}", params=q)
    assert missing.status_code == 404
    assert_valid(missing.json(), "ApiErrorResponse")


def test_auth_and_org_context(sim: Simulator, world: World, org: str) -> None:
    url = f"{sim.url}/devices"
    params = {**LIST_QUERY, "limit": 1}
    assert httpx.get(url, params=params, headers={"X-Org": org}).status_code == 401
    assert httpx.get(url, params=params, headers={"X-API-Key": "wrong", "X-Org": org}).status_code == 401
    assert httpx.get(url, params=params, headers={"X-API-Key": API_KEY}).status_code == 400
    world.add_key("narrow", orgs=[org])
    other = next(o for o in world.orgs if o != org)
    assert httpx.get(url, params=params, headers={"X-API-Key": "narrow", "X-Org": other}).status_code == 403
    foreign = world.ids(other)[0]
    r = httpx.get(
        f"{url}/{foreign}",
        params={"include_deleted": "true", "include_metadata": "true"},
        headers={"X-API-Key": API_KEY, "X-Org": org},
    )
    assert r.status_code == 404  # another org's device is invisible


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({**LIST_QUERY, "limit": 201}, 400),
        ({**LIST_QUERY, "limit": -1}, 400),
        ({**LIST_QUERY, "offset": "x"}, 400),
        ({"include_deleted": "true", "only_deleted": "false"}, 400),  # include_metadata is required
        ({**LIST_QUERY, "include_deleted": "yes"}, 400),
        ({**LIST_QUERY, "device_kind": "gate"}, 400),  # requires integration_id
        ({**LIST_QUERY, "limit": 200}, 200),
    ],
)
def test_list_query_validation(http: httpx.Client, params: dict[str, Any], status: int) -> None:
    assert http.get("/devices", params=params).status_code == status


def test_soft_delete_restore_and_purge_semantics(http: httpx.Client, world: World, org: str) -> None:
    device_id = world.ids(org)[3]
    before = world.device(org, device_id)["updated_at"]
    http.delete(f"/devices/{device_id}")
    hidden = {**LIST_QUERY, "include_deleted": "false", "limit": 200}
    visible_ids = [
        d["id"] for offset in (0, 200, 400) for d in http.get("/devices", params={**hidden, "offset": offset}).json()
    ]
    assert device_id not in visible_ids
    only = http.get("/devices", params={**LIST_QUERY, "only_deleted": "true", "limit": 200}).json()
    assert device_id in [d["id"] for d in only] and all(d["deleted_at"] for d in only)
    after = world.device(org, device_id)["updated_at"]
    assert after > before  # updated_at moves on every change
    assert http.post(f"/devices/{device_id}/restore").json()["deleted_at"] is None
    assert http.post(f"/devices/{device_id}/restore").status_code == 422
    http.delete(f"/devices/{device_id}/purge")
    assert device_id not in world.ids(org)
    assert (
        http.get(f"/devices/{device_id}", params={"include_deleted": "true", "include_metadata": "true"}).status_code
        == 404
    )


def test_seeded_data_is_deterministic_and_varied() -> None:
    a, b = World(seed=3), World(seed=3)
    a.seed(2, 300)
    b.seed(2, 300)
    org = next(iter(a.orgs))
    assert a.ground_truth(org) == b.ground_truth(org)
    devices = a.ground_truth(org)
    assert {d["device_metadata"]["kind"] for d in devices} >= {"virtual_access_portal", "gate", "camera"}
    assert len({d["integration_id"] for d in devices}) >= 2
    assert any(d["deleted_at"] for d in devices) and any(not d["deleted_at"] for d in devices)
    assert any(d["zone_id"] for d in devices) and any(d["external_id"] for d in devices)
    assert any(len(d["name"]["value"]) > 1 for d in devices)  # several locales


def test_door_restrictions_only_for_portals(sim: Simulator, world: World, org: str) -> None:
    gate = next(d for d in world.ground_truth(org) if d["device_metadata"]["kind"] == "gate")
    assert httpx.get(f"{sim.url}/devices/{gate['id']}/door-restrictions").status_code == 400
    assert httpx.get(f"{sim.url}/devices/{make_ulid(0, world.rng)}/door-restrictions").status_code == 404


def test_faults(sim: Simulator, http: httpx.Client) -> None:
    sim.inject(Fault(status=429, retry_after="7", times=1))
    r = http.get("/devices", params={**LIST_QUERY, "limit": 1})
    assert (r.status_code, r.headers["Retry-After"]) == (429, "7")
    sim.inject(Fault(kind="reset", times=1))
    with pytest.raises(httpx.TransportError):
        http.get("/devices", params={**LIST_QUERY, "limit": 1})
    assert http.get("/devices", params={**LIST_QUERY, "limit": 1}).status_code == 200
    assert [r.status for r in sim.requests("list_devices")] == [429, 0, 200]


def test_mutation_during_a_scan_shifts_offsets(sim: Simulator, http: httpx.Client, world: World, org: str) -> None:
    first_page = http.get("/devices", params={**LIST_QUERY, "limit": 200, "offset": 0}).json()
    world.during_scan(org, 200, lambda w: w.purge_device(org, first_page[0]["id"]))
    second_page = http.get("/devices", params={**LIST_QUERY, "limit": 200, "offset": 200}).json()
    assert second_page[0]["id"] == world.ids(org)[200]  # everything moved one place up
    assert second_page[0]["id"] not in {d["id"] for d in first_page}
    skipped = world.ids(org)[199]
    assert skipped not in {d["id"] for d in first_page + second_page}


def test_simulator_binds_loopback_only(world: World) -> None:
    with pytest.raises(ValueError, match="loopback"):
        Simulator(world, host="0.0.0.0")
