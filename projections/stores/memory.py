"""The in-memory config store: the reference implementation of the port, and the test double."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from projections.model import ConfigChange, ConfigItem, ConfigKey
from projections.stores.base import ApplyResult, ChangeResult, ConfigPage, Outcome


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """One key's state, tombstones included (``deleted`` with the delete's version)."""

    value: Any
    version: int
    position: int
    updated_at: datetime
    deleted: bool


class MemoryConfigStore:
    """Keeps every tenant's keys in a dict, with the same version rule as the real stores."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], StoredEntry] = {}
        self._lock = threading.Lock()

    def apply(self, changes: Sequence[ConfigChange]) -> ApplyResult:
        results: list[ChangeResult] = []
        with self._lock:
            for change in changes:
                slot = (change.tenant, str(change.key))
                current = self._entries.get(slot)
                if current is not None and current.version >= change.version:
                    results.append(ChangeResult(change, Outcome.STALE))
                    continue
                self._entries[slot] = StoredEntry(
                    value=change.value,
                    version=change.version,
                    position=change.position,
                    updated_at=change.updated_at,
                    deleted=change.deleted,
                )
                results.append(ChangeResult(change, Outcome.APPLIED))
        return ApplyResult(tuple(results))

    def get(self, tenant: str, key: ConfigKey) -> ConfigItem | None:
        with self._lock:
            entry = self._entries.get((tenant, str(key)))
        if entry is None or entry.deleted:
            return None
        return ConfigItem(key=key, value=entry.value, version=entry.version, updated_at=entry.updated_at)

    def list(self, tenant: str, prefix: str, *, limit: int = 100, start_after: str | None = None) -> ConfigPage:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        with self._lock:
            matching = sorted(
                (key, entry)
                for (owner, key), entry in self._entries.items()
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
        with self._lock:
            entries = list(self._entries.items())
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
        with self._lock:
            return {key: e for (owner, key), e in self._entries.items() if owner == tenant}
