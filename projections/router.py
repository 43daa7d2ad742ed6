"""The tag router: which read model a config key lives in, chosen by the key's tag.

Adding a tag is one adapter module plus one line at the composition root::

    router.register("tenantconfig", DynamoDBConfigStore(dynamodb))
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from kernel.envelope import StoredEvent
from projections.errors import InvalidConfigKey, ProjectionError, UnknownTag
from projections.model import ConfigChange, ConfigItem, ConfigKey
from projections.stores.base import ConfigPage, ConfigStore, Outcome


class EventOutcome(enum.Enum):
    """What projecting one event did."""

    APPLIED = "applied"
    #: The read model already held this or a newer version of the key.
    STALE = "stale"
    #: A newer version of the same key in the same batch was applied instead.
    SUPERSEDED = "superseded"
    #: Not a config event: no config read model projects it.
    IGNORED = "ignored"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class EventResult:
    """The outcome of one event; ``error`` is set exactly when it ``FAILED``."""

    event: StoredEvent
    outcome: EventOutcome
    error: ProjectionError | None = None


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One result per event given to :meth:`TagRouter.apply`, in the same order."""

    results: tuple[EventResult, ...]

    @property
    def failed(self) -> tuple[EventResult, ...]:
        return tuple(r for r in self.results if r.outcome is EventOutcome.FAILED)

    @property
    def ok(self) -> bool:
        return not self.failed


class TagRouter:
    """A registry of config stores by tag, routing changes and reads to them."""

    def __init__(self, stores: Mapping[str, ConfigStore] | None = None) -> None:
        self._stores: dict[str, ConfigStore] = {}
        for tag, store in (stores or {}).items():
            self.register(tag, store)

    def register(self, tag: str, store: ConfigStore) -> None:
        """Route keys tagged ``tag`` to ``store``; a tag is registered once."""
        ConfigKey(tag, "x")  # validates the tag's syntax
        if tag in self._stores:
            raise ValueError(f"tag {tag!r} is already registered")
        self._stores[tag] = store

    @property
    def registered_tags(self) -> frozenset[str]:
        return frozenset(self._stores)

    def store_for(self, tag: str) -> ConfigStore:
        try:
            return self._stores[tag]
        except KeyError:
            raise UnknownTag(tag, self.registered_tags) from None

    def route(self, changes: Iterable[ConfigChange]) -> dict[str, list[ConfigChange]]:
        """Changes grouped by tag, each group in the order given; :class:`UnknownTag` if unroutable."""
        groups: dict[str, list[ConfigChange]] = {}
        for change in changes:
            self.store_for(change.key.tag)
            groups.setdefault(change.key.tag, []).append(change)
        return groups

    def apply(self, events: Sequence[StoredEvent]) -> BatchResult:
        """Project a batch of events; one result per event, failures reported, not raised.

        Within the batch only the highest version of each ``(tenant, key)`` is written: the
        others would be overwritten by it anyway (``SUPERSEDED``).
        """
        results: list[EventResult | None] = [None] * len(events)
        winners: dict[tuple[str, str], int] = {}
        changes: dict[int, ConfigChange] = {}
        for index, event in enumerate(events):
            try:
                change = ConfigChange.from_event(event)
                if change is not None:
                    self.store_for(change.key.tag)
            except ProjectionError as e:
                results[index] = EventResult(event, EventOutcome.FAILED, e)
                continue
            if change is None:
                results[index] = EventResult(event, EventOutcome.IGNORED)
                continue
            changes[index] = change
            slot = (change.tenant, str(change.key))
            best = winners.get(slot)
            if best is None or changes[best].version < change.version:
                if best is not None:
                    results[best] = EventResult(events[best], EventOutcome.SUPERSEDED)
                winners[slot] = index
            else:
                results[index] = EventResult(event, EventOutcome.SUPERSEDED)

        by_tag: dict[str, list[int]] = {}
        for index in winners.values():
            by_tag.setdefault(changes[index].key.tag, []).append(index)
        for tag, indexes in by_tag.items():
            store = self._stores[tag]
            try:
                applied = store.apply([changes[i] for i in indexes])
            except ProjectionError as e:
                # A store that fails the whole call fails each of its changes, visibly.
                for i in indexes:
                    results[i] = EventResult(events[i], EventOutcome.FAILED, e)
                continue
            for i, change_result in zip(indexes, applied.results, strict=True):
                results[i] = EventResult(events[i], _OUTCOMES[change_result.outcome], change_result.error)
        return BatchResult(tuple(r for r in results if r is not None))

    def get(self, tenant: str, key: str) -> ConfigItem | None:
        """The current item of ``"<tag>:<path>"`` from its tag's read model."""
        parsed = ConfigKey.parse(key)
        return self.store_for(parsed.tag).get(tenant, parsed)

    def list(self, tenant: str, prefix: str, *, limit: int = 100, start_after: str | None = None) -> ConfigPage:
        """Items under a key prefix; the prefix must name its tag (``"paramconfig:app/"``)."""
        tag, sep, _ = prefix.partition(":")
        if not sep:
            raise InvalidConfigKey(prefix, "a prefix starts with '<tag>:'")
        return self.store_for(tag).list(tenant, prefix, limit=limit, start_after=start_after)

    def scan(self) -> Iterator[ConfigChange]:
        """Every key of every tenant in every registered store, tombstones included (a snapshot).

        The stores one after another, each once even when it serves several tags; a store's
        item whose tag is routed elsewhere (or nowhere) is not its to report and is left out.
        """
        seen: list[ConfigStore] = []
        for tag in sorted(self._stores):
            store = self._stores[tag]
            if any(store is other for other in seen):
                continue
            seen.append(store)
            for change in store.scan():
                if self._stores.get(change.key.tag) is store:
                    yield change


_OUTCOMES = {
    Outcome.APPLIED: EventOutcome.APPLIED,
    Outcome.STALE: EventOutcome.STALE,
    Outcome.FAILED: EventOutcome.FAILED,
}
