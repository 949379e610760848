import re
from datetime import UTC, datetime

import orjson
import pytest

from syncd.errors import InvalidDeviceError
from syncd.models import (
    Inventory,
    encode,
    identify,
    normalise_name,
    parse_device,
    parse_door_restrictions,
    parse_metadata_definition,
    parse_timestamp,
    utc_text,
)

DEVICE_ID = "01HK153X0038NZ3ZA2MABNBN61"
BASE = {"id": DEVICE_ID, "org_id": "01HORG", "integration_id": "01HINT", "name": {"en": "Door"}}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"en": "Front door"}, {"en": "Front door"}),
        ({"value": {"en": "Front door", "de": "Vordertür"}}, {"en": "Front door", "de": "Vordertür"}),
        ("Front door", {"und": "Front door"}),
        (None, {}),
        ({}, {}),
        ({"value": {"en": 1}}, None),
        (["list"], None),
        ({"en": 5}, None),
    ],
)
def test_names_in_every_shape_normalise_to_a_locale_map(raw: object, expected: dict[str, str] | None) -> None:
    if expected is None:
        with pytest.raises(ValueError, match="not a localized string"):
            normalise_name(raw)
    else:
        assert normalise_name(raw) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T10:00:00Z", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01T12:00:00+02:00", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01T10:00:00.123456Z", datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)),
        ("2024-05-01T10:00:00", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        (None, None),
        ("", None),
    ],
)
def test_timestamps_become_aware_utc(text: str | None, expected: datetime | None) -> None:
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T10:00:00.123456Z", "2024-05-01 10:00:00.123456"),
        ("2024-05-01T10:00:00Z", "2024-05-01 10:00:00.000000"),
        ("2024-05-01T10:00:00.5Z", "2024-05-01 10:00:00.500000"),
        ("2024-05-01T12:00:00.123456+02:00", "2024-05-01 10:00:00.123456"),
        ("2024-05-01T00:30:00-01:00", "2024-05-01 01:30:00.000000"),
        ("2024-05-01T10:00:00", "2024-05-01 10:00:00.000000"),
        ("2024-05-01 10:00:00.123456", "2024-05-01 10:00:00.123456"),
        ("2024-W18-3T10:00:00.000000Z", "2024-05-01 10:00:00.000000"),  # an ISO week date, same length
        (None, None),
        ("", None),
    ],
)
def test_timestamps_become_canonical_utc_text(text: str | None, expected: str | None) -> None:
    assert utc_text(text) == expected
    if expected is not None:
        assert parse_timestamp(text) == datetime.fromisoformat(expected).replace(tzinfo=UTC)


@pytest.mark.parametrize("text", ["yesterday", "2024-13-01T00:00:00.000000Z", "2024-05-01T10:00:00.123456X", 5])
def test_a_bad_timestamp_is_refused(text: object) -> None:
    with pytest.raises(ValueError, match="is not a timestamp"):
        utc_text(text)


def test_lifecycle_timestamps_fall_back_to_the_metadata_map() -> None:
    raw = {**BASE, "metadata": {"created_at": "2024-01-01T00:00:00Z", "deleted_at": "2024-02-01T00:00:00Z"}}
    device = parse_device(raw)
    assert device.created_at == datetime(2024, 1, 1, tzinfo=UTC)
    assert device.deleted_at == datetime(2024, 2, 1, tzinfo=UTC)
    assert device.state == "deleted"


def test_top_level_timestamps_win_over_the_metadata_map() -> None:
    raw = {**BASE, "updated_at": "2024-03-01T00:00:00Z", "metadata": {"updated_at": "2020-01-01T00:00:00Z"}}
    assert parse_device(raw).updated_at == datetime(2024, 3, 1, tzinfo=UTC)


def test_unknown_fields_are_kept_in_raw() -> None:
    raw = {**BASE, "credentials_set": True, "zone_id": "01HZONE", "future_field": {"x": 1}}
    device = parse_device(raw)
    assert device.raw["future_field"] == {"x": 1}
    assert device.zone_id == "01HZONE"


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"org_id": "o"}, "missing or empty 'id'"),
        ({"id": "", "org_id": "o"}, "missing or empty 'id'"),
        ({"id": DEVICE_ID}, f"id {DEVICE_ID}: missing or empty 'org_id'"),
        ("just a string", "expected a JSON object"),
        ({**BASE, "deleted_at": "yesterday"}, "'deleted_at' is not a timestamp"),
        ({**BASE, "name": 42}, "'name' is not a localized string"),
    ],
)
def test_unusable_devices_are_reported_with_their_position(item: object, message: str) -> None:
    with pytest.raises(InvalidDeviceError, match=message) as caught:
        parse_device(item, position=417)
    assert caught.value.position == 417
    assert "position 417" in str(caught.value)


def test_identify_returns_id_and_org() -> None:
    assert identify(BASE) == (DEVICE_ID, "01HORG")


def test_fingerprint_ignores_cache_annotations_and_keeps_the_payload_as_received() -> None:
    def fingerprint(raw: dict[str, object]) -> str:
        return encode(raw)[1]

    assert fingerprint({**BASE, "cache_hit": True, "cache_ttl": 30}) == fingerprint({**BASE, "cache_hit": False})
    assert fingerprint(BASE) == fingerprint(dict(BASE))
    assert fingerprint(BASE) != fingerprint({**BASE, "name": {"en": "Gate"}})
    assert len(fingerprint(BASE)) == 32  # fits devices.fingerprint
    reordered = dict(reversed(list({**BASE, "cache_ttl": 5}.items())))
    assert orjson.loads(encode(reordered)[0]) == reordered  # cache fields included: the payload as received
    assert list(orjson.loads(encode(reordered)[0])) == list(reordered)


A, B = "01HENT0000000000000000000A", "01HENT0000000000000000000B"  # entity ids are ULIDs, as device ids


@pytest.mark.parametrize(
    ("body", "entities", "key"),
    [
        ({"apartment_entity_ids": [B, A, B]}, (A, B), "apartment_entity_ids"),  # the public spec
        ({"listing_entity_ids": [A]}, (A,), "listing_entity_ids"),  # the SDK's newer models
        ({"apartment_entity_ids": [A], "listing_entity_ids": [A]}, (A,), "apartment_entity_ids"),
        ({"apartment_entity_ids": [], "extra": 1}, (), "apartment_entity_ids"),  # empty: not restricted
    ],
)
def test_door_restrictions_under_either_key(body: dict[str, object], entities: tuple[str, ...], key: str) -> None:
    restrictions = parse_door_restrictions(body)
    assert (restrictions.entity_ids, restrictions.key, restrictions.raw) == (entities, key, body)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ([], "expected a JSON object"),
        ({}, "has neither apartment_entity_ids nor listing_entity_ids"),
        ({"apartment_entity_ids": "A"}, "is not a list"),
        ({"listing_entity_ids": [1]}, "is not an entity id"),
        ({"listing_entity_ids": [""]}, "is not an entity id"),
        ({"listing_entity_ids": ["x" * 65]}, "is not an entity id"),
        ({"listing_entity_ids": ["a\u001b[31m"]}, "is not an entity id"),
        ({"listing_entity_ids": ["A"]}, "is not an entity id"),  # not a ULID
        ({"listing_entity_ids": [A.lower()]}, "is not an entity id"),  # not in canonical form
        ({"listing_entity_ids": ["../../x?y=1"]}, "is not an entity id"),
        ({"apartment_entity_ids": [A], "listing_entity_ids": [B]}, "disagree"),
        ({"apartment_entity_ids": [A], "note": "nul\u0000"}, "NUL character"),
        ({"apartment_entity_ids": [A] * 100_001}, "more than syncd believes"),
    ],
)
def test_door_restrictions_that_are_not_believed(body: object, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_door_restrictions(body)


def test_metadata_definitions() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"format": "password"}}}
    body = {"provider_type": "akuvox", "schema": schema, "data": {"a": "x"}, "credentials_set": ["/b"]}
    definition = parse_metadata_definition(body)
    assert (definition.provider_type, definition.schema, definition.raw) == ("akuvox", schema, body)
    reordered = {"properties": schema["properties"], "type": "object"}
    assert parse_metadata_definition({**body, "schema": reordered}).fingerprint == definition.fingerprint
    assert parse_metadata_definition({**body, "schema": True}).fingerprint != definition.fingerprint
    for bad, problem in [
        ({**body, "provider_type": ""}, "is not a provider type"),
        ({**body, "provider_type": None}, "is not a provider type"),
        ({**body, "schema": "object"}, "is not a JSON Schema"),
        ({k: v for k, v in body.items() if k != "schema"}, "is not a JSON Schema"),
        ({**body, "data": {"a": "\u0000"}}, "NUL character"),
    ]:
        with pytest.raises(ValueError, match=re.escape(problem)):
            parse_metadata_definition(bad)


@pytest.mark.parametrize(
    ("value", "kept", "has"),
    [
        (["/a"], ["/a"], True),
        ([], [], False),
        (True, True, True),
        (False, False, False),
        (None, None, None),
        ([1], None, None),
        ("yes", None, None),
    ],
)
def test_credentials_set_in_either_form(value: object, kept: object, has: bool | None) -> None:
    device = parse_device({**BASE, "credentials_set": value})
    assert (device.credentials_set, device.has_credentials) == (kept, has)
    assert device.raw["credentials_set"] == value  # as received


def test_the_inventory_notes_portals_and_the_lowest_device_of_each_integration() -> None:
    inventory = Inventory()
    portal = {"device_metadata": {"kind": "virtual_access_portal"}, "integration_id": "int-a"}
    inventory.note("01HK153X0038NZ3ZA2MABNBN62", portal, "f2")
    inventory.note("01HK153X0038NZ3ZA2MABNBN61", {"device_metadata": {"kind": "gate"}, "integration_id": "int-a"}, "f1")
    inventory.note("01HK153X0038NZ3ZA2MABNBN63", {"device_metadata": ["kind"], "integration_id": "i" * 65}, "f3")
    inventory.note("01HK153X0038NZ3ZA2MABNBN64", {"device_metadata": 5, "integration_id": 7}, "f4")
    assert inventory.portals == {"01HK153X0038NZ3ZA2MABNBN62": "f2"}
    assert inventory.integrations == {"int-a": "01HK153X0038NZ3ZA2MABNBN61"}
