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
    restrictions = f"{sim.url}/devices/{portal['id']}/door-restrictions"
    assert set(httpx.get(restrictions).json()) == {"listing_entity_ids"}  # by default the SDK's key
    world.restrictions_key = "apartment_entity_ids"  # the public spec's, on request
    assert_valid(httpx.get(restrictions).json(), "DoorRestrictionsResponse")
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


def test_missing_query_booleans_take_their_defaults_unless_strict(world: World, org: str) -> None:
    headers = {"X-API-Key": API_KEY, "X-Org": org}
    with Simulator(world) as lenient:  # the default: what the SDK's newer revision expects
        page = httpx.get(f"{lenient.url}/devices", params={"limit": 200}, headers=headers).json()
        assert page and all(d["deleted_at"] is None for d in page) and "metadata" not in page[0]
        one = httpx.get(f"{lenient.url}/devices/{page[0]['id']}", headers=headers)
        assert one.status_code == 200
    with Simulator(world, strict_query=True) as strict:
        assert httpx.get(f"{strict.url}/devices", params={"limit": 1}, headers=headers).status_code == 400


def test_create_does_what_the_request_says(http: httpx.Client, world: World, org: str) -> None:
    integration = next(i for i, p in world.orgs[org].providers.items() if p == "shelly_cloud")
    zone = world.orgs[org].zones[2]
    body = {"org_id": org, "integration_id": integration, "name": {"value": {"en": "Bare"}}}
    bare = http.post("/devices", json=body).json()
    nothing_invented = (None, None, None, [])
    assert (bare["external_id"], bare["zone_id"], bare["device_metadata"], bare["credentials_set"]) == nothing_invented
    zoned = http.post("/devices", json={**body, "zone_id": zone, "external_id": "e-1"}).json()
    assert (zoned["zone_id"], zoned["external_id"]) == (zone, "e-1")
    rejected = [
        {**body, "integration_id": make_ulid(0, world.rng)},
        {**body, "device_metadata": "not an object"},
        {**body, "device_metadata": {"kind": "gate"}},  # the provider's schema requires "provider"
        {**body, "device_metadata": {"kind": "gate", "provider": "shelly_cloud", "relay": 9}},  # relay 0..3
        {**body, "device_metadata": {"kind": "gate", "provider": "shelly_cloud", "colour": "red"}},  # unknown field
        {**body, "device_metadata": {"kind": "gate", "provider": "akuvox"}},  # not this integration's provider
        {**body, "zone_id": make_ulid(0, world.rng)},
        {**body, "external_id": 7},
        {k: v for k, v in body.items() if k != "name"},
    ]
    for request in rejected:
        answer = http.post("/devices", json=request)
        assert answer.status_code == 422, request
        assert_valid(answer.json(), "ApiErrorResponse")


def test_updates_change_only_what_they_name(http: httpx.Client, world: World, org: str) -> None:
    device_id = world.ids(org)[5]
    before = world.device(org, device_id)
    unchanged = http.put(f"/devices/{device_id}", json={"no_such_field": 1}).json()
    assert unchanged["updated_at"] == before["updated_at"]  # a no-op is not a change
    assert http.put(f"/devices/{device_id}", json={"device_metadata": [1]}).status_code == 422
    assert http.put(f"/devices/{device_id}", json={"external_id": "x"}).json()["updated_at"] > before["updated_at"]


def test_metadata_definitions_describe_their_data_and_hide_credentials(
    http: httpx.Client, world: World, org: str
) -> None:
    seen = set()
    for device in world.ground_truth(org)[:120]:
        definition = http.get(f"/devices/{device['id']}/metadata-definition").json()
        assert_valid(definition, "DeviceMetadataDefinitionResponse")
        schema = definition["schema"]
        Draft202012Validator.check_schema(schema)
        assert not list(Draft202012Validator(schema).iter_errors(definition["data"]))
        secrets = [k for k, v in schema["properties"].items() if v.get("format") == "password"]
        assert secrets and not set(secrets) & set(definition["data"])  # write-only: never returned
        assert set(definition["credentials_set"]) <= {f"/{k}" for k in secrets}
        assert definition["credentials_set"] == device["credentials_set"]
        seen.add(definition["provider_type"])
    assert seen == {"shelly_cloud", "akuvox", "go2rtc", "openapp_virtual"}


def test_credentials_are_write_only(http: httpx.Client, world: World, org: str) -> None:
    device = next(d for d in world.ground_truth(org) if d["device_metadata"]["provider"] == "akuvox")
    metadata = {**device["device_metadata"], "sip_password": "hunter2"}
    stored = http.put(f"/devices/{device['id']}", json={"device_metadata": metadata}).json()
    assert stored["credentials_set"] == ["/sip_password"] and "hunter2" not in json.dumps(stored)
    kept = http.put(f"/devices/{device['id']}", json={"device_metadata": device["device_metadata"]}).json()
    assert kept["credentials_set"] == ["/sip_password"]  # left out: kept
    cleared = {**device["device_metadata"], "sip_password": None}
    assert http.put(f"/devices/{device['id']}", json={"device_metadata": cleared}).json()["credentials_set"] == []


def test_set_door_restrictions(sim: Simulator, http: httpx.Client, world: World, org: str) -> None:
    devices = world.ground_truth(org)
    portal = next(d for d in devices if d["device_metadata"]["kind"] == "virtual_access_portal")
    gate = next(d for d in devices if d["device_metadata"]["kind"] == "gate")
    entities = [make_ulid(1, world.rng), make_ulid(2, world.rng)]
    world.restrictions_key = "apartment_entity_ids"  # the public spec's key; either is taken
    answer = http.put(f"/devices/{portal['id']}/door-restrictions", json={"apartment_entity_ids": entities})
    assert answer.json() == {"apartment_entity_ids": entities}
    assert httpx.get(f"{sim.url}/devices/{portal['id']}/door-restrictions").json() == answer.json()
    world.restrictions_key = "listing_entity_ids"  # the SDK's newer models' key (the default)
    answer = http.put(f"/devices/{portal['id']}/door-restrictions", json={"listing_entity_ids": entities[:1]})
    assert answer.json() == {"listing_entity_ids": entities[:1]}
    assert http.put(f"/devices/{gate['id']}/door-restrictions", json={"listing_entity_ids": []}).status_code == 400
    assert http.put(f"/devices/{portal['id']}/door-restrictions", json={"listing_entity_ids": "x"}).status_code == 422


def test_credentials_set_as_an_older_boolean() -> None:
    world = World(seed=3, credentials_style="bool")
    org = world.seed(1, 50)[0]
    assert {type(d["credentials_set"]) for d in world.ground_truth(org)} == {bool}
    assert {d["credentials_set"] for d in world.ground_truth(org)} == {True, False}


def test_status_probe_needs_no_key(sim: Simulator) -> None:
    assert httpx.get(f"{sim.url}/status").json()["status"] == "ok"


def test_a_path_outside_the_devices_api_is_a_json_404_naming_the_scope(sim: Simulator, http: httpx.Client) -> None:
    for method, path in (("GET", "/auth/whoami"), ("GET", "/orgs"), ("POST", "/api-keys"), ("GET", "/nothing/here")):
        answer = http.request(method, path)
        assert answer.status_code == 404 and answer.headers["content-type"] == "application/json"
        body = answer.json()
        assert body["error_code"] == "outside_simulator_scope"
        assert f"{method} /api/v1{path} is outside what this simulator serves" in body["message"]
        assert "Devices API (/api/v1/devices and below) and GET /api/v1/status" in body["message"]
    assert http.request("DELETE", "/devices").status_code == 405  # a path it serves, another method
