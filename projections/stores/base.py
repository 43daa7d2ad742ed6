"""The ports of the config read models, and the per-change results they return.

:class:`ConfigStore` is what every read model implements; :class:`Rebuildable` is what a
store implements when a replay can rebuild it into a fresh copy and switch readers over to
it without downtime (DynamoDB through its table alias, the in-memory store).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from projections.errors import ProjectionError
from projections.model import ConfigChange, ConfigItem, ConfigKey


class Outcome(enum.Enum):
    """What applying one change did."""

    #: The change is now the key's state.
    APPLIED = "applied"
    #: The store already held this or a newer version: a no-op, not an error.
    STALE = "stale"
    #: The change could not be applied; ``error`` says why and whether to retry.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ChangeResult:
    """The outcome of one change; ``error`` is set exactly when it ``FAILED``."""

    change: ConfigChange
    outcome: Outcome
    error: ProjectionError | None = None


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """Per-change outcomes of one :meth:`ConfigStore.apply` call, in the order given.

    Like a partial batch failure report: failures are listed, never swallowed, and never
    fail the changes that did succeed.
    """

    results: tuple[ChangeResult, ...]

    @property
    def failed(self) -> tuple[ChangeResult, ...]:
        return tuple(r for r in self.results if r.outcome is Outcome.FAILED)

    @property
    def ok(self) -> bool:
        return not self.failed


class ConfigPage(NamedTuple):
    """One page of a listing; pass ``next_token`` as ``start_after`` for the next one."""

    items: tuple[ConfigItem, ...]
    next_token: str | None


class ConfigStore(Protocol):
    """A read model of config keys that never goes backwards.

    Every key keeps the highest ``version`` applied to it, so replays, duplicates and
    reorders are no-ops; deletes leave a versioned tombstone that hides the key from reads
    but still stops an older ``set`` from resurrecting it.
    """

    def apply(self, changes: Sequence[ConfigChange]) -> ApplyResult:
        """Apply changes (in any order); one result per change, in the order given.

        Per-change failures are reported in the result, not raised.
        """
        ...

    def get(self, tenant: str, key: ConfigKey) -> ConfigItem | None:
        """The key's current item (strongly consistent), or ``None`` if absent or deleted."""
        ...

    def list(self, tenant: str, prefix: str, *, limit: int = 100, start_after: str | None = None) -> ConfigPage:
        """Live items of ``tenant`` whose key string starts with ``prefix``, ordered by key.

        ``prefix`` includes the tag (``"tenantconfig:app/"``). ``start_after`` is exclusive;
        ``next_token`` is ``None`` on the last page.
        """
        ...

    def scan(self) -> Iterator[ConfigChange]:
        """Every key of every tenant with its latest state, tombstones included, in no set order.

        What a config server loads as its snapshot: each key as the change that put it in its
        current state (``version``, ``position``, ``updated_at``, ``deleted``; ``value`` is
        ``None`` on a tombstone). Lazy, page by page; not a point-in-time snapshot, but every
        key is at least as new as it was when the scan started, since keys never go backwards.
        Raises :class:`~projections.errors.StoreError` when the store cannot be read; items
        the store did not write (or cannot parse) are logged and passed over.
        """
        ...


@dataclass(frozen=True, slots=True)
class GenerationSwitch:
    """A store switched over to a rebuilt generation: the copy it used before, and the one it uses now."""

    #: The store's logical name (what readers and writers are configured with).
    name: str
    previous: str
    current: str
    generation: int


class Generation(Protocol):
    """A fresh copy of a store, filled by a rebuild beside the live copy until it is switched to.

    Its life: :meth:`bulk_put` the final states (nobody else writes the copy yet), catch up
    conditionally through :attr:`writer`, :meth:`switch`, wait :attr:`settle_seconds`, and
    after the readers' grace period :meth:`drop_previous`. A rebuild abandoned before its
    switch calls :meth:`discard` instead.
    """

    @property
    def writer(self) -> ConfigStore:
        """The copy as a store of its own: conditional writes into it (the catch-ups), and reads."""
        ...

    @property
    def request_size(self) -> int:
        """Changes one bulk request takes: :meth:`bulk_put` is best given whole multiples of it."""
        ...

    @property
    def settle_seconds(self) -> float:
        """Seconds after :meth:`switch` until every reader and writer of the store uses this copy."""
        ...

    def bulk_put(self, changes: Sequence[ConfigChange]) -> int:
        """Put final states of distinct keys, unconditionally; returns how many were written.

        Safe from several threads at once. Raises :class:`~projections.errors.StoreError`
        (``ChangeRejected`` for a value the store cannot hold): a rebuild stops on it.
        """
        ...

    def switch(self) -> GenerationSwitch:
        """Make this copy the store's current one, atomically.

        Only if the store still uses the copy it used when this generation was made: raises
        :class:`~projections.errors.StoreError` otherwise (another rebuild switched first).
        """
        ...

    def discard(self) -> None:
        """Remove this copy, which was never switched to (a rebuild abandoned half-way)."""
        ...

    def drop_previous(self) -> None:
        """Remove the copy the store used before :meth:`switch`; one already gone is fine."""
        ...


@runtime_checkable
class Rebuildable(Protocol):
    """A store a replay can rebuild into a fresh generation and switch to, with no downtime."""

    @property
    def can_rebuild(self) -> bool:
        """Whether this store, as configured, can make generations (a DynamoDB table needs an alias)."""
        ...

    def new_generation(self) -> Generation:
        """An empty fresh copy beside the current one; readers and writers keep the current one."""
        ...
