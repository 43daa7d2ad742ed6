"""The tag router and the config model: routing, coalescing, and order-independence."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.envelope import CONFIG_DELETED, CONFIG_SET, StoredEvent
from projections.errors import InvalidConfigEvent, InvalidConfigKey, UnknownTag
from projections.model import ConfigChange, ConfigKey
from projections.router import EventOutcome, TagRouter
from projections.stores.base import Outcome
from projections.stores.memory import MemoryConfigStore, StoredEntry

SAMPLES = Path(__file__).parent.parent / "fixtures" / "sample_events"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
TENANTS = ("acme", "globex")
KEYS = ("tenantconfig:a", "tenantconfig:b/c", "paramconfig:p/q")


def sample(name: str) -> StoredEvent:
    return StoredEvent.from_cloudevent(orjson.loads((SAMPLES / f"{name}.json").read_bytes()))


def config_event(tenant: str, key: str, version: int, value: Any = None, *, deleted: bool = False) -> StoredEvent:
    data: dict[str, Any] = {"key": key} if deleted else {"key": key, "value": value}
    return StoredEvent(
        id=f"{tenant}/{key}/{version}",
        tenant=tenant,
        stream=key,
        version=version,
        type=CONFIG_DELETED if deleted else CONFIG_SET,
        source="/tests",
        recorded_at=T0 + timedelta(seconds=version),
        data=data,
        position=version * 10,
    )


def make_router() -> tuple[TagRouter, MemoryConfigStore, MemoryConfigStore]:
    tenantconfig, paramconfig = MemoryConfigStore(), MemoryConfigStore()
    router = TagRouter()
    router.register("tenantconfig", tenantconfig)
    router.register("paramconfig", paramconfig)
    return router, tenantconfig, paramconfig


def state(*stores: MemoryConfigStore) -> list[dict[str, dict[str, StoredEntry]]]:
    return [{tenant: store.entries(tenant) for tenant in TENANTS} for store in stores]


# -- model ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["tenantconfig:a", "paramconfig:app/db.url", "t:A-b_c/./x-1"])
def test_config_key_round_trips(key: str) -> None:
    assert str(ConfigKey.parse(key)) == key


@pytest.mark.parametrize(
    "key",
    ["", "tenantconfig", "tenantconfig:", ":path", "t:a//b", "t:/a", "t:a/", "t:a b", "t:ä", "1t:a", "t:a:b"],
)
def test_invalid_config_keys_are_rejected(key: str) -> None:
    with pytest.raises(InvalidConfigKey):
        ConfigKey.parse(key)


def test_change_from_events() -> None:
    change = ConfigChange.from_event(sample("config_set_v1"))
    assert change is not None
    assert (change.tenant, str(change.key), change.value, change.version, change.position) == (
        "acme",
        "tenantconfig:billing/currency",
        "EUR",
        1,
        23861488,
    )
    assert change.updated_at == datetime(2024, 5, 1, 12, 0, tzinfo=UTC) and not change.deleted
    deleted = ConfigChange.from_event(sample("config_deleted_v3"))
    assert deleted is not None and deleted.deleted and deleted.value is None and deleted.version == 3
    assert ConfigChange.from_event(sample("domain_event")) is None
    with pytest.raises(InvalidConfigKey):
        ConfigChange.from_event(sample("poison_bad_key"))


@pytest.mark.parametrize(
    ("stream", "data"),
    [
        ("tenantconfig:a", {"value": 1}),
        ("tenantconfig:a", {"key": "tenantconfig:a"}),
        ("tenantconfig:other", {"key": "tenantconfig:a", "value": 1}),
        ("tenantconfig:a", ["not", "an", "object"]),
    ],
)
def test_malformed_config_events_are_invalid(stream: str, data: Any) -> None:
    event = StoredEvent("e", "acme", stream, 1, CONFIG_SET, "/s", T0, data=data)
    with pytest.raises(InvalidConfigEvent):
        ConfigChange.from_event(event)


# -- router --------------------------------------------------------------------------


def test_registry() -> None:
    router, tenantconfig, _ = make_router()
    assert router.registered_tags == frozenset({"tenantconfig", "paramconfig"})
    assert router.store_for("tenantconfig") is tenantconfig
    with pytest.raises(ValueError, match="already registered"):
        router.register("tenantconfig", MemoryConfigStore())
    with pytest.raises(UnknownTag, match="vaultconfig"):
        router.store_for("vaultconfig")


def test_route_groups_by_tag() -> None:
    router, _, _ = make_router()
    changes = [
        c
        for c in (
            ConfigChange.from_event(config_event("acme", key, 1, "v"))
            for key in ("tenantconfig:x", "paramconfig:y", "tenantconfig:z")
        )
        if c is not None
    ]
    groups = router.route(changes)
    assert {tag: [str(c.key) for c in cs] for tag, cs in groups.items()} == {
        "tenantconfig": ["tenantconfig:x", "tenantconfig:z"],
        "paramconfig": ["paramconfig:y"],
    }
    unknown = ConfigChange.from_event(config_event("acme", "vaultconfig:s", 1, "v"))
    assert unknown is not None
    with pytest.raises(UnknownTag):
        router.route([unknown])


def test_apply_reports_per_event_and_routes_reads() -> None:
    router, tenantconfig, paramconfig = make_router()
    events = [
        sample("config_set_v2"),
        sample("domain_event"),
        sample("config_set_v1"),
        sample("paramconfig_set"),
        sample("poison_unknown_tag"),
        sample("poison_bad_key"),
    ]
    result = router.apply(events)
    assert [r.event for r in result.results] == events
    assert [r.outcome for r in result.results] == [
        EventOutcome.APPLIED,
        EventOutcome.IGNORED,
        EventOutcome.SUPERSEDED,
        EventOutcome.APPLIED,
        EventOutcome.FAILED,
        EventOutcome.FAILED,
    ]
    assert isinstance(result.results[4].error, UnknownTag)
    assert isinstance(result.results[5].error, InvalidConfigKey)
    assert [r.event.id for r in result.failed] == ["evt-0300", "evt-0301"]

    currency = router.get("acme", "tenantconfig:billing/currency")
    assert currency is not None and (currency.value, currency.version) == ("USD", 2)
    limits = router.get("globex", "paramconfig:orders/limits")
    assert limits is not None and limits.value == {"max_items": 50, "ratio": 0.75, "regions": ["eu", "us"]}
    assert paramconfig.entries("acme") == {} and tenantconfig.entries("globex") == {}
    assert [str(i.key) for i in router.list("acme", "tenantconfig:billing/").items] == ["tenantconfig:billing/currency"]

    again = router.apply([sample("config_set_v1"), sample("config_deleted_v3")])
    assert [r.outcome for r in again.results] == [EventOutcome.SUPERSEDED, EventOutcome.APPLIED]
    assert router.get("acme", "tenantconfig:billing/currency") is None
    late = router.apply([sample("config_set_v2")])
    assert late.results[0].outcome is EventOutcome.STALE


def test_reads_need_a_known_tag() -> None:
    router, _, _ = make_router()
    with pytest.raises(UnknownTag):
        router.get("acme", "vaultconfig:x")
    with pytest.raises(InvalidConfigKey):
        router.get("acme", "no-tag")
    with pytest.raises(InvalidConfigKey):
        router.list("acme", "tenantconfig")
    with pytest.raises(UnknownTag):
        router.list("acme", "vaultconfig:")


def test_a_store_failure_fails_only_its_events() -> None:
    class BrokenStore(MemoryConfigStore):
        def apply(self, changes: Sequence[ConfigChange]) -> Any:
            from projections.errors import StoreUnavailable

            raise StoreUnavailable("down", store="broken")

    router = TagRouter({"tenantconfig": MemoryConfigStore(), "paramconfig": BrokenStore()})
    result = router.apply([config_event("acme", "paramconfig:x", 1, 1), config_event("acme", "tenantconfig:y", 1, 1)])
    assert [r.outcome for r in result.results] == [EventOutcome.FAILED, EventOutcome.APPLIED]
    error = result.results[0].error
    assert error is not None and error.retryable


# -- property: order and duplication never change the outcome ------------------------

operations = st.lists(
    st.tuples(
        st.sampled_from(TENANTS),
        st.sampled_from(KEYS),
        st.booleans(),  # delete?
        st.integers(min_value=-5, max_value=5),
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(ops=operations, data=st.data())
def test_any_permutation_with_duplicates_reaches_the_in_order_state(
    ops: list[tuple[str, str, bool, int]], data: st.DataObject
) -> None:
    versions: dict[tuple[str, str], int] = {}
    events = []
    for tenant, key, deleted, value in ops:
        version = versions[(tenant, key)] = versions.get((tenant, key), 0) + 1
        events.append(config_event(tenant, key, version, value, deleted=deleted))

    reference, *ref_stores = make_router()
    for event in events:
        assert reference.apply([event]).ok

    duplicates = data.draw(st.lists(st.sampled_from(events), max_size=10)) if events else []
    delivery = data.draw(st.permutations(events + duplicates))
    router, *stores = make_router()
    position = 0
    while position < len(delivery):
        size = data.draw(st.integers(min_value=1, max_value=len(delivery) - position))
        batch = delivery[position : position + size]
        result = router.apply(batch)
        assert result.ok
        assert len(result.results) == len(batch)
        position += size

    assert state(*stores) == state(*ref_stores)


def test_stale_store_outcome_maps_to_stale() -> None:
    store = MemoryConfigStore()
    change = ConfigChange.from_event(config_event("acme", "tenantconfig:k", 2, "v"))
    assert change is not None
    store.apply([change])
    assert store.apply([change]).results[0].outcome is Outcome.STALE


def test_scan_chains_the_stores_once_each_and_keeps_only_routed_tags() -> None:
    router, _, paramconfig = make_router()
    shared = MemoryConfigStore()
    router.register("shared", shared)
    router.register("alsoshared", shared)
    router.apply(
        [
            config_event("acme", "tenantconfig:a", 1, "x"),
            config_event("acme", "tenantconfig:a", 2, deleted=True),
            config_event("globex", "paramconfig:p/q", 3, [1]),
            config_event("acme", "shared:s", 1, "s"),
            config_event("acme", "alsoshared:t", 1, "t"),
        ]
    )
    # An item of a tag the router sends elsewhere is not this store's to report.
    paramconfig.apply([ConfigChange("acme", ConfigKey("tenantconfig", "stray"), "no", 9, 90, T0)])
    scanned = sorted(router.scan(), key=lambda c: (c.tenant, str(c.key)))
    assert [(c.tenant, str(c.key), c.version, c.value, c.deleted) for c in scanned] == [
        ("acme", "alsoshared:t", 1, "t", False),
        ("acme", "shared:s", 1, "s", False),
        ("acme", "tenantconfig:a", 2, None, True),
        ("globex", "paramconfig:p/q", 3, [1], False),
    ]
    assert scanned[2].position == 20 and scanned[2].updated_at == T0 + timedelta(seconds=2)
