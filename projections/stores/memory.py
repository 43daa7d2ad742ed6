"""The in-memory config store: the reference implementation of the ports, and the test double.

It is :class:`~projections.stores.base.Rebuildable` too: a :class:`MemoryGeneration` is a
fresh dict that the store swaps in at the switch, so a replay's rebuild runs without DynamoDB.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from projections.errors import StoreError
from projections.model import ConfigChange, ConfigItem, ConfigKey
from projections.stores.base import ApplyResult, ChangeResult, ConfigPage, GenerationSwitch, Outcome


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """One key's state, tombstones included (``deleted`` with the delete's version)."""

    value: Any
    version: int
    position: int
    updated_at: datetime
    deleted: bool


class _Copy:
    """One generation of a memory store: its entries, and the lock that guards them."""

    def __init__(self, name: str, generation: int) -> None:
        self.name = name
        self.generation = generation
        self.entries: dict[tuple[str, str], StoredEntry] = {}
        self.lock = threading.Lock()


class MemoryConfigStore:
    """Keeps every tenant's keys in a dict, with the same version rule as the real stores.

    ``name`` names its copies in a rebuild's :class:`~projections.stores.base.GenerationSwitch`.
    """

    def __init__(self, *, name: str = "memory") -> None:
        self.name = name
        # Replaced as a whole by a switch: each call reads it once and works on that copy.
        self._copy = _Copy(name, 0)
        self._switch_lock = threading.Lock()
        self._last_generation = 0

    def apply(self, changes: Sequence[ConfigChange]) -> ApplyResult:
        results: list[ChangeResult] = []
        copy = self._copy
        with copy.lock:
            for change in changes:
                slot = (change.tenant, str(change.key))
                current = copy.entries.get(slot)
                if current is not None and current.version >= change.version:
                    results.append(ChangeResult(change, Outcome.STALE))
                    continue
                copy.entries[slot] = _entry(change)
                results.append(ChangeResult(change, Outcome.APPLIED))
        return ApplyResult(tuple(results))

    def get(self, tenant: str, key: ConfigKey) -> ConfigItem | None:
        copy = self._copy
        with copy.lock:
            entry = copy.entries.get((tenant, str(key)))
        if entry is None or entry.deleted:
            return None
        return ConfigItem(key=key, value=entry.value, version=entry.version, updated_at=entry.updated_at)

    def list(self, tenant: str, prefix: str, *, limit: int = 100, start_after: str | None = None) -> ConfigPage:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        copy = self._copy
        with copy.lock:
            matching = sorted(
                (key, entry)
                for (owner, key), entry in copy.entries.items()
                if owner == tenant
                and key.startswith(prefix)
                and not entry.deleted
                and (start_after is None or key > start_after)
            )
        page = matching[:limit]
        items = tuple(
            ConfigItem(key=ConfigKey.parse(key), value=e.value, version=e.version, updated_at=e.updated_at)
            for key, e in page
        )
        next_token = page[-1][0] if len(matching) > limit else None
        return ConfigPage(items, next_token)

    def scan(self) -> Iterator[ConfigChange]:
        copy = self._copy
        with copy.lock:
            entries = list(copy.entries.items())
        for (tenant, key), e in entries:
            yield ConfigChange(
                tenant=tenant,
                key=ConfigKey.parse(key),
                value=e.value,
                version=e.version,
                position=e.position,
                updated_at=e.updated_at,
                deleted=e.deleted,
            )

    def entries(self, tenant: str) -> dict[str, StoredEntry]:
        """Every key of a tenant, tombstones included (for tests and debugging)."""
        copy = self._copy
        with copy.lock:
            return {key: e for (owner, key), e in copy.entries.items() if owner == tenant}

    # -- rebuilds (the Rebuildable port) -----------------------------------------------

    @property
    def can_rebuild(self) -> bool:
        return True

    def new_generation(self) -> MemoryGeneration:
        with self._switch_lock:
            self._last_generation += 1
            generation = self._last_generation
        return MemoryGeneration(self, self._copy, _Copy(f"{self.name}-{generation}", generation))

    def _switch(self, expected: _Copy, fresh: _Copy) -> None:
        with self._switch_lock:
            if self._copy is not expected:
                raise StoreError(
                    f"{self.name} no longer uses {expected.name}: another rebuild switched it",
                    store="memory",
                    operation="switch",
                )
            self._copy = fresh

    def _writer_of(self, copy: _Copy) -> MemoryConfigStore:
        """A store over ``copy`` alone (a generation's writer)."""
        writer = MemoryConfigStore(name=copy.name)
        writer._copy = copy
        return writer


class MemoryGeneration:
    """A fresh dict the store swaps in at the switch (a :class:`~projections.stores.base.Generation`)."""

    def __init__(self, store: MemoryConfigStore, previous: _Copy, fresh: _Copy) -> None:
        self._store = store
        self._previous = previous
        self._fresh = fresh
        self._writer = store._writer_of(fresh)
        self._switched = False

    @property
    def generation(self) -> int:
        return self._fresh.generation

    @property
    def writer(self) -> MemoryConfigStore:
        return self._writer

    @property
    def request_size(self) -> int:
        return 1

    @property
    def settle_seconds(self) -> float:
        return 0.0  # every caller reads the store's current copy at each call

    def bulk_put(self, changes: Sequence[ConfigChange]) -> int:
        with self._fresh.lock:
            for change in changes:
                self._fresh.entries[(change.tenant, str(change.key))] = _entry(change)
        return len(changes)

    def switch(self) -> GenerationSwitch:
        self._store._switch(self._previous, self._fresh)
        self._switched = True
        return GenerationSwitch(self._store.name, self._previous.name, self._fresh.name, self._fresh.generation)

    def discard(self) -> None:
        if self._switched:
            raise StoreError(f"{self._fresh.name} is the current copy of {self._store.name}", store="memory")
        with self._fresh.lock:
            self._fresh.entries.clear()

    def drop_previous(self) -> None:
        if not self._switched:
            raise StoreError(f"{self._fresh.name} was not switched to: the previous copy is current", store="memory")
        with self._previous.lock:
            self._previous.entries.clear()


def _entry(change: ConfigChange) -> StoredEntry:
    return StoredEntry(
        value=change.value,
        version=change.version,
        position=change.position,
        updated_at=change.updated_at,
        deleted=change.deleted,
    )
