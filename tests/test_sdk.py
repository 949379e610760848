"""The official Python SDK (openapp-sdk 2.0.0) drives the built-in simulator.

Every Devices operation the SDK exposes runs against the simulator over loopback HTTP, and each
answer is parsed by the SDK's own pydantic models where it has one. Where the SDK itself departs
from the public contract (CONTRACT.md section 8), the test pins the quirk down instead of bending
the simulator to it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openapp_sdk import Client
from openapp_sdk.errors import ApiError, AuthError, ResourceNotFoundError
from openapp_sdk.models._generated import (
    CreateDeviceRequest,
    DeviceMetadataDefinitionResponse,
    DeviceResponse,
    DoorRestrictionsResponse,
    SetDoorRestrictionsPayload,
    UpdateDeviceRequest,
)
from openapp_sdk.token import ApiKey
from pydantic import ValidationError

from syncd.simulator import Simulator, World


@pytest.fixture
def sdk_world() -> World:
    world = World(seed=8)  # as `syncd simulate` starts: door restrictions in the key the SDK's models read
    world.seed(orgs=2, devices_per_org=450)
    return world


@pytest.fixture
def served(sdk_world: World) -> Iterator[tuple[Simulator, str]]:
    """The simulator with its default (lenient) settings, and a key in the SDK's format."""
    with Simulator(sdk_world) as sim:
        key = f"http://127.0.0.1:{sim.port}_openapp_sdk-test-secret"  # the SDK derives the base URL from it
        sdk_world.add_key(key)
        yield sim, key


@pytest.fixture
def client(served: tuple[Simulator, str], sdk_world: World) -> Iterator[Client]:
    _, key = served
    c = Client.connect(api_key=key, org_id=next(iter(sdk_world.orgs)), max_retries=0)
    yield c
    c.close()


def org_of(world: World, index: int = 0) -> str:
    return list(world.orgs)[index]


def test_connect_probes_status(served: tuple[Simulator, str], sdk_world: World) -> None:
    sim, key = served
    Client.connect(api_key=key, org_id=org_of(sdk_world)).close()  # no skip_status_probe needed
    assert [r.operation for r in sim.log] == ["status"]


def test_list_with_an_org(client: Client, sdk_world: World, served: tuple[Simulator, str]) -> None:
    sim, _ = served
    page = client.devices.list(limit=200)
    devices = [DeviceResponse.model_validate(d) for d in page]
    assert len(devices) == 200 and {d.org_id for d in devices} == {org_of(sdk_world)}
    assert all(isinstance(d.credentials_set, list) for d in devices)
    # Quirk: the SDK sends camelCase keys (orgId, includeDeleted) the API does not know. The org
    # comes only from the client's X-Org header, and soft-deleted devices stay hidden.
    other = client.devices.list(limit=200, org_id=org_of(sdk_world, 1), include_deleted=True)
    assert {d["org_id"] for d in other} == {org_of(sdk_world)}
    assert not any(d["deleted_at"] for d in other)
    assert {r.org_id for r in sim.requests("list_devices")} == {org_of(sdk_world)}


def test_get_and_get_by_name(client: Client, sdk_world: World) -> None:
    org = org_of(sdk_world)
    live = [d for d in sdk_world.ground_truth(org) if not d["deleted_at"]]
    wanted = live[300]
    got = DeviceResponse.model_validate(client.devices.get(wanted["id"]))
    assert got.id == wanted["id"] and got.name.value == wanted["name"]["value"]
    by_name = client.devices.get_by_name(wanted["name"]["value"]["en"])
    assert by_name["id"] == wanted["id"]


def test_get_by_name_searches_the_first_page_only(client: Client, sdk_world: World) -> None:
    """Quirk: the SDK's pagination loop stops after one page of a bare array, so a device that
    sorts after 200 others matching the same search text is not found."""
    org = org_of(sdk_world)
    integration = sdk_world.orgs[org].integrations[0]
    for n in range(210):
        sdk_world.create_device(org, {"org_id": org, "integration_id": integration, "name": f"Annex {n}"})
    time.sleep(0.005)  # a later millisecond: its ULID sorts after all of them
    target = sdk_world.create_device(org, {"org_id": org, "integration_id": integration, "name": "Annex"})
    assert sdk_world.ids(org)[-1] == target
    with pytest.raises(ResourceNotFoundError):
        client.devices.get_by_name("Annex")


def test_create_update_delete_restore_purge(client: Client, sdk_world: World) -> None:
    org = org_of(sdk_world)
    zone = sdk_world.orgs[org].zones[0]
    virtual = next(i for i, provider in sdk_world.orgs[org].providers.items() if provider == "openapp_virtual")
    request = CreateDeviceRequest(
        org_id=org,
        integration_id=virtual,
        name={"value": {"en": "SDK portal"}},
        zone_id=zone,
        device_metadata={"kind": "virtual_access_portal", "provider": "openapp_virtual", "webhook_secret": "s"},
    )
    created = DeviceResponse.model_validate(client.devices.create(**request.model_dump(exclude_none=True)))
    assert (created.zone_id, created.external_id, created.credentials_set) == (zone, None, ["/webhook_secret"])
    assert "webhook_secret" not in created.device_metadata  # write-only

    patch = UpdateDeviceRequest(name={"value": {"en": "SDK portal, renamed"}}, external_id="ext-sdk")
    updated = DeviceResponse.model_validate(client.devices.update(created.id, **patch.model_dump(exclude_unset=True)))
    assert (updated.name.value["en"], updated.external_id) == ("SDK portal, renamed", "ext-sdk")
    assert updated.credentials_set == ["/webhook_secret"]  # credential left out of the update: kept

    # Quirk: delete and purge return None; the API answers 200 with the device body.
    assert client.devices.delete(created.id) is None
    assert sdk_world.device(org, created.id)["deleted_at"] is not None
    restored = DeviceResponse.model_validate(client.devices.restore(created.id))
    assert restored.deleted_at is None
    assert client.devices.purge(created.id) is None
    with pytest.raises(ApiError) as missing:
        client.devices.get(created.id)
    assert missing.value.status == 404


def test_door_restrictions(client: Client, sdk_world: World) -> None:
    org = org_of(sdk_world)
    devices = sdk_world.ground_truth(org)
    portal = next(d for d in devices if d["device_metadata"]["kind"] == "virtual_access_portal")
    gate = next(d for d in devices if d["device_metadata"]["kind"] == "gate")
    payload = SetDoorRestrictionsPayload(listing_entity_ids=["01HENT00000000000000000001"])
    answer = DoorRestrictionsResponse.model_validate(
        client.devices.set_door_restrictions(portal["id"], **payload.model_dump())
    )
    assert answer.listing_entity_ids == payload.listing_entity_ids
    read = DoorRestrictionsResponse.model_validate(client.devices.door_restrictions(portal["id"]))
    assert read == answer
    with pytest.raises(ApiError) as wrong_kind:
        client.devices.door_restrictions(gate["id"])
    assert wrong_kind.value.status == 400


def test_door_restrictions_in_the_public_specs_shape(served: tuple[Simulator, str], sdk_world: World) -> None:
    """With the public spec's key (`--restrictions-key apartment_entity_ids`) the SDK's newer model
    does not parse: why the simulator's default is the SDK's key (syncd reads either)."""
    _, key = served
    sdk_world.restrictions_key = "apartment_entity_ids"
    portal = next(
        d for d in sdk_world.ground_truth(org_of(sdk_world)) if d["device_metadata"]["kind"] == "virtual_access_portal"
    )
    with Client.connect(api_key=key, org_id=org_of(sdk_world), skip_status_probe=True) as client:
        body = client.devices.door_restrictions(portal["id"])
    assert set(body) == {"apartment_entity_ids"}
    with pytest.raises(ValidationError):
        DoorRestrictionsResponse.model_validate(body)


def test_metadata_definition(client: Client, sdk_world: World) -> None:
    org = org_of(sdk_world)
    for device in sdk_world.ground_truth(org)[:40]:
        definition = DeviceMetadataDefinitionResponse.model_validate(client.devices.metadata_definition(device["id"]))
        assert definition.provider_type == device["device_metadata"]["provider"]
        assert definition.data == device["device_metadata"]
        assert definition.credentials_set == device["credentials_set"]
        assert definition.schema_["type"] == "object"


def test_credentials_set_as_a_boolean_fails_the_sdks_model() -> None:
    """Why the simulator serves the list form by default: the SDK's DeviceResponse rejects a boolean."""
    world = World(seed=8, credentials_style="bool")
    org = world.seed(1, 5)[0]
    with pytest.raises(ValidationError):
        DeviceResponse.model_validate(world.ground_truth(org)[0])


def test_auth_and_missing_device_errors(served: tuple[Simulator, str], sdk_world: World) -> None:
    sim, key = served
    org = org_of(sdk_world)
    device_id = sdk_world.ids(org)[0]
    wrong_key = key.replace("sdk-test-secret", "wrong")
    with Client.connect(api_key=wrong_key, org_id=org, skip_status_probe=True, max_retries=0) as client:
        with pytest.raises(AuthError):  # 401
            client.devices.get(device_id)
    sdk_world.add_key(key, orgs=[org])  # narrowed to the first org
    with Client.connect(api_key=key, org_id=org_of(sdk_world, 1), skip_status_probe=True, max_retries=0) as client:
        with pytest.raises(AuthError):  # 403
            client.devices.get(device_id)
    with Client.connect(api_key=key, org_id=org, skip_status_probe=True, max_retries=0) as client:
        with pytest.raises(ApiError) as missing:
            client.devices.get("01HZZZZZZZZZZZZZZZZZZZZZZZ")
    assert missing.value.status == 404
    # Quirk: the SDK reads the code from `code`; the contract (and the simulator) send `error_code`.
    assert missing.value.code is None
    assert [r.status for r in sim.requests("get_device")] == [401, 403, 404]


def test_calls_outside_the_devices_contract_get_a_json_404_naming_the_simulators_scope(client: Client) -> None:
    for call in (client.auth.whoami, client.orgs.list, client.me.profile):
        with pytest.raises(ApiError) as outside:
            call()
        assert outside.value.status == 404, call
        assert "outside what this simulator serves" in outside.value.message
        assert "Devices API" in outside.value.message


def test_the_readmes_example_key_is_one_the_sdk_accepts() -> None:
    """The README's `syncd simulate` example: its key is of the SDK's form, and the SDK finds the
    simulator from it (here on a free port instead of 8765)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    keys = set(re.findall(r"SYNCD_API_KEY=(\S+)", readme))
    assert keys, "the README shows no `SYNCD_API_KEY=...` example"
    for key in keys:
        assert ApiKey.parse(key).api_base_url == "http://127.0.0.1:8765/api/v1"
        world = World(seed=3)
        org = world.seed(1, 10)[0]
        with Simulator(world) as sim:
            served = key.replace(":8765_", f":{sim.port}_")
            world.add_key(served)
            with Client.connect(api_key=served, org_id=org, max_retries=0) as sdk:
                assert len(sdk.devices.list(limit=200)) == 10
