"""The contract every :class:`~projections.stores.base.ConfigStore` keeps, as one test suite.

A backend's test module subclasses :class:`ConfigStoreSuite` and provides two fixtures:
``store`` (a ready store) and ``tag`` (a tag the store accepts). Every test works in fresh
tenants, so a suite can run against a shared, long-lived emulator. A backend that implements
:class:`~projections.stores.base.Rebuildable` also provides ``rebuildable``: a store of its
own (its generations are switched and dropped), which the rebuild tests run against.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from projections.errors import StoreError
from projections.model import ConfigChange, ConfigKey
from projections.stores.base import ConfigStore, Outcome, Rebuildable

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def new_tenant(label: str = "t") -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def change(
    tenant: str,
    key: str,
    version: int,
    value: Any = None,
    *,
    deleted: bool = False,
    position: int | None = None,
) -> ConfigChange:
    return ConfigChange(
        tenant=tenant,
        key=ConfigKey.parse(key),
        value=None if deleted else value,
        version=version,
        position=version * 100 if position is None else position,
        updated_at=T0 + timedelta(seconds=version),
        deleted=deleted,
    )


class ConfigStoreSuite:
    """Subclass with fixtures ``store`` and ``tag``; every test here runs for that backend."""

    @pytest.fixture
    def tenant(self) -> str:
        return new_tenant()

    @pytest.fixture
    def rebuildable(self) -> ConfigStore:
        pytest.skip("this backend cannot be rebuilt into a fresh generation")

    def test_set_then_get(self, store: ConfigStore, tag: str, tenant: str) -> None:
        result = store.apply([change(tenant, f"{tag}:app/color", 1, "blue")])
        assert [r.outcome for r in result.results] == [Outcome.APPLIED]
        item = store.get(tenant, ConfigKey(tag, "app/color"))
        assert item is not None
        assert (item.key, item.value, item.version) == (ConfigKey(tag, "app/color"), "blue", 1)
        assert item.updated_at == T0 + timedelta(seconds=1)

    def test_get_missing_is_none(self, store: ConfigStore, tag: str, tenant: str) -> None:
        assert store.get(tenant, ConfigKey(tag, "nothing/here")) is None

    def test_json_values_round_trip(self, store: ConfigStore, tag: str, tenant: str) -> None:
        values: list[Any] = [
            {"nested": {"list": [1, 2.5, None, True], "s": "ünïcødé ✓"}},
            0.1,
            None,
            [],
            "",
            -(2**62),
        ]
        changes = [change(tenant, f"{tag}:v/{i}", 1, v) for i, v in enumerate(values)]
        assert store.apply(changes).ok
        for i, value in enumerate(values):
            item = store.get(tenant, ConfigKey(tag, f"v/{i}"))
            assert item is not None
            assert item.value == value

    def test_newer_version_replaces(self, store: ConfigStore, tag: str, tenant: str) -> None:
        store.apply([change(tenant, f"{tag}:k", 1, "one")])
        result = store.apply([change(tenant, f"{tag}:k", 2, "two")])
        assert result.results[0].outcome is Outcome.APPLIED
        item = store.get(tenant, ConfigKey(tag, "k"))
        assert item is not None and (item.value, item.version) == ("two", 2)

    def test_older_after_newer_is_a_no_op(self, store: ConfigStore, tag: str, tenant: str) -> None:
        store.apply([change(tenant, f"{tag}:k", 5, "five")])
        result = store.apply([change(tenant, f"{tag}:k", 3, "three")])
        assert result.results[0].outcome is Outcome.STALE
        assert result.ok
        item = store.get(tenant, ConfigKey(tag, "k"))
        assert item is not None and (item.value, item.version) == ("five", 5)

    def test_repeat_is_a_no_op(self, store: ConfigStore, tag: str, tenant: str) -> None:
        first = change(tenant, f"{tag}:k", 1, "v")
        store.apply([first])
        result = store.apply([first])
        assert result.results[0].outcome is Outcome.STALE
        item = store.get(tenant, ConfigKey(tag, "k"))
        assert item is not None and (item.value, item.version) == ("v", 1)

    def test_delete_leaves_a_tombstone(self, store: ConfigStore, tag: str, tenant: str) -> None:
        store.apply([change(tenant, f"{tag}:k", 1, "v")])
        deleted = store.apply([change(tenant, f"{tag}:k", 3, deleted=True)])
        assert deleted.results[0].outcome is Outcome.APPLIED
        assert store.get(tenant, ConfigKey(tag, "k")) is None
        late = store.apply([change(tenant, f"{tag}:k", 2, "late")])
        assert late.results[0].outcome is Outcome.STALE
        assert store.get(tenant, ConfigKey(tag, "k")) is None
        assert store.list(tenant, f"{tag}:").items == ()

    def test_delete_of_unknown_key_blocks_older_sets(self, store: ConfigStore, tag: str, tenant: str) -> None:
        store.apply([change(tenant, f"{tag}:k", 2, deleted=True)])
        assert store.apply([change(tenant, f"{tag}:k", 1, "v")]).results[0].outcome is Outcome.STALE
        assert store.get(tenant, ConfigKey(tag, "k")) is None

    def test_newer_set_after_delete_revives(self, store: ConfigStore, tag: str, tenant: str) -> None:
        store.apply([change(tenant, f"{tag}:k", 1, "v"), change(tenant, f"{tag}:k", 2, deleted=True)])
        store.apply([change(tenant, f"{tag}:k", 3, "back")])
        item = store.get(tenant, ConfigKey(tag, "k"))
        assert item is not None and (item.value, item.version) == ("back", 3)

    def test_one_call_with_many_versions_keeps_the_highest(self, store: ConfigStore, tag: str, tenant: str) -> None:
        changes = [change(tenant, f"{tag}:k", v, f"v{v}") for v in (2, 4, 1, 3)]
        result = store.apply(changes)
        assert result.ok
        assert [r.change for r in result.results] == changes
        item = store.get(tenant, ConfigKey(tag, "k"))
        assert item is not None and (item.value, item.version) == ("v4", 4)

    def test_list_by_prefix_with_paging(self, store: ConfigStore, tag: str, tenant: str) -> None:
        paths = [f"app/k{i:02d}" for i in range(7)] + ["app/sub/deep", "apple", "other/x"]
        store.apply([change(tenant, f"{tag}:{p}", 1, p) for p in paths])
        store.apply([change(tenant, f"{tag}:app/k03", 2, deleted=True)])

        seen: list[str] = []
        token: str | None = None
        pages = 0
        while True:
            page = store.list(tenant, f"{tag}:app/", limit=3, start_after=token)
            pages += 1
            assert len(page.items) <= 3
            seen.extend(str(item.key) for item in page.items)
            token = page.next_token
            if token is None:
                break
        expected = sorted(f"{tag}:{p}" for p in paths if p.startswith("app/") and p != "app/k03")
        assert seen == expected
        assert pages == 3  # 7 live items, 3 per page

        everything = store.list(tenant, f"{tag}:", limit=100)
        assert everything.next_token is None
        assert [str(i.key) for i in everything.items] == sorted(f"{tag}:{p}" for p in paths if p != "app/k03")
        partial_segment = store.list(tenant, f"{tag}:app", limit=100)
        assert f"{tag}:apple" in [str(i.key) for i in partial_segment.items]
        first = everything.items[0]
        assert (first.value, first.version) == (paths[0], 1)

    def test_list_exact_limit_has_no_next_page(self, store: ConfigStore, tag: str, tenant: str) -> None:
        store.apply([change(tenant, f"{tag}:p/{i}", 1, i) for i in range(3)])
        page = store.list(tenant, f"{tag}:p/", limit=3)
        assert len(page.items) == 3 and page.next_token is None

    def test_tenant_isolation(self, store: ConfigStore, tag: str) -> None:
        a = new_tenant("a")
        b = a + "-b"  # shares a's name as a string prefix
        store.apply([change(a, f"{tag}:shared/k", 1, "from a")])
        store.apply([change(b, f"{tag}:shared/k", 1, "from b"), change(b, f"{tag}:only/b", 1, "b")])
        item_a = store.get(a, ConfigKey(tag, "shared/k"))
        assert item_a is not None and item_a.value == "from a"
        assert store.get(a, ConfigKey(tag, "only/b")) is None
        assert [str(i.key) for i in store.list(a, f"{tag}:").items] == [f"{tag}:shared/k"]
        assert [i.value for i in store.list(b, f"{tag}:").items] == ["b", "from b"]
        # b's newer version of the same key never affects a
        store.apply([change(b, f"{tag}:shared/k", 9, deleted=True)])
        assert store.get(a, ConfigKey(tag, "shared/k")) is not None

    def test_scan_holds_every_key_with_its_latest_state_and_tombstones(self, store: ConfigStore, tag: str) -> None:
        a, b = new_tenant("a"), new_tenant("b")
        store.apply([change(a, f"{tag}:x/one", 1, {"n": 1}), change(a, f"{tag}:gone", 1, "v")])
        store.apply(
            [
                change(a, f"{tag}:x/one", 2, [2.5, None, {"deep": True}]),
                change(a, f"{tag}:gone", 3, deleted=True),
                change(a, f"{tag}:never/set", 4, deleted=True),
                change(b, f"{tag}:x/one", 7, "b's", position=9),
            ]
        )
        store.apply([change(a, f"{tag}:x/one", 1, "late")])  # older: changes nothing
        found: dict[tuple[str, str], ConfigChange] = {}
        for scanned in store.scan():
            if scanned.tenant in (a, b):
                slot = (scanned.tenant, str(scanned.key))
                assert slot not in found, f"{slot} scanned twice"
                found[slot] = scanned
        assert found == {
            (a, f"{tag}:x/one"): change(a, f"{tag}:x/one", 2, [2.5, None, {"deep": True}]),
            (a, f"{tag}:gone"): change(a, f"{tag}:gone", 3, deleted=True),
            (a, f"{tag}:never/set"): change(a, f"{tag}:never/set", 4, deleted=True),
            (b, f"{tag}:x/one"): change(b, f"{tag}:x/one", 7, "b's", position=9),
        }

    def test_generation_is_filled_apart_then_switched_to(self, rebuildable: ConfigStore, tag: str, tenant: str) -> None:
        store = rebuildable
        assert isinstance(store, Rebuildable) and store.can_rebuild
        key = ConfigKey(tag, "k")
        store.apply([change(tenant, f"{tag}:k", 2, "live"), change(tenant, f"{tag}:only/live", 1, "x")])

        generation = store.new_generation()
        loaded = [change(tenant, f"{tag}:k", 5, "rebuilt"), change(tenant, f"{tag}:gone", 3, deleted=True)]
        assert generation.bulk_put(loaded) == 2
        writer = generation.writer
        assert writer.apply([change(tenant, f"{tag}:k", 4, "older")]).results[0].outcome is Outcome.STALE
        assert writer.apply([change(tenant, f"{tag}:k", 6, "caught up")]).results[0].outcome is Outcome.APPLIED
        # Until the switch, the store reads and writes its current copy only.
        live = store.get(tenant, key)
        assert live is not None and (live.value, live.version) == ("live", 2)
        assert writer.get(tenant, ConfigKey(tag, "only/live")) is None

        switched = generation.switch()
        assert switched.previous != switched.current and switched.generation >= 1
        item = store.get(tenant, key)
        assert item is not None and (item.value, item.version) == ("caught up", 6)
        assert store.get(tenant, ConfigKey(tag, "only/live")) is None
        assert {(str(c.key), c.version, c.deleted) for c in store.scan() if c.tenant == tenant} == {
            (f"{tag}:k", 6, False),
            (f"{tag}:gone", 3, True),
        }
        generation.drop_previous()
        generation.drop_previous()  # already gone: fine
        assert store.apply([change(tenant, f"{tag}:k", 7, "after")]).ok
        item = store.get(tenant, key)
        assert item is not None and item.value == "after"

    def test_only_one_of_two_racing_generations_switches(self, rebuildable: ConfigStore, tag: str, tenant: str) -> None:
        store = rebuildable
        assert isinstance(store, Rebuildable)
        first, second = store.new_generation(), store.new_generation()
        first.bulk_put([change(tenant, f"{tag}:k", 1, "first")])
        second.bulk_put([change(tenant, f"{tag}:k", 1, "second")])
        winner = second.switch()
        with pytest.raises(StoreError):
            first.switch()
        first.discard()
        item = store.get(tenant, ConfigKey(tag, "k"))
        assert item is not None and item.value == "second"
        with pytest.raises(StoreError):
            second.discard()  # the store's current copy is never discarded
        assert store.new_generation().switch().previous == winner.current
