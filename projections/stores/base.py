"""The port every config read model implements, and the per-change results it returns."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

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
