"""Operator tasks behind ``tagbus replay`` and ``tagbus dlq``: they return data, the CLI prints it.

Every function takes the settings read once at the entry point; the parts it builds from
them (the tag router, the dead-letter table) can be passed in instead, for tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from consumers.deadletters import DeadLetter, DynamoDBDeadLetterSink
from kernel.envelope import StoredEvent
from projections.replay import ProgressCallback, ReplayRunner, ReplaySummary
from projections.router import EventOutcome, TagRouter
from tagbus import aws, compose
from tagbus.settings import Settings


def replay(
    settings: Settings,
    *,
    tenant: str | None = None,
    tag: str | None = None,
    since: datetime | None = None,
    progress: ProgressCallback | None = None,
    rebuild: bool | None = None,
    drop_after: float | None = 30.0,
    router: TagRouter | None = None,
) -> ReplaySummary:
    """Rebuild the read models from the events table (see :mod:`projections.replay`).

    A full replay rebuilds the DynamoDB table into a fresh generation and switches to it;
    ``tenant``/``since`` (or ``rebuild=False``) apply in place, conditionally.
    ``drop_after``: seconds after the switch before the old table is dropped (``None`` keeps it).
    """
    runner = ReplayRunner(
        settings.database_url, router or compose.build_router(settings), rebuild=rebuild, drop_after=drop_after
    )
    return runner.run(tenant=tenant, tag=tag, since=since, progress=progress)


def dead_letter_sink(settings: Settings) -> DynamoDBDeadLetterSink:
    return DynamoDBDeadLetterSink(aws.client(settings, "dynamodb"))


def dlq_list(
    settings: Settings,
    tenant: str | None = None,
    *,
    event_id: str | None = None,
    limit: int = 100,
    sink: DynamoDBDeadLetterSink | None = None,
) -> list[DeadLetter]:
    """Dead letters of one tenant (by event id), or of every tenant; at most ``limit``."""
    sink = sink or dead_letter_sink(settings)
    return list(_select(sink, tenant=tenant, event_id=event_id, limit=limit))


@dataclass(frozen=True, slots=True)
class RetryResult:
    """What retrying one dead letter did.

    ``outcome`` is an :class:`EventOutcome` value (``applied``, ``stale``, ``superseded``,
    ``ignored``, ``failed``) or ``undecodable``; the letter is ``deleted`` exactly when the
    event went through.
    """

    tenant: str
    event_id: str
    outcome: str
    deleted: bool
    error: str | None = None


def dlq_retry(
    settings: Settings,
    *,
    event_id: str | None = None,
    tenant: str | None = None,
    everything: bool = False,
    limit: int = 1000,
    router: TagRouter | None = None,
    sink: DynamoDBDeadLetterSink | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> list[RetryResult]:
    """Apply dead-lettered events again through the tag router, once their cause is fixed.

    Selects one event (``event_id``, with ``tenant`` if ids repeat across tenants), a
    tenant's letters, or ``everything``. A letter whose event now goes through (applied, or
    already stale: a newer version got there meanwhile) is deleted; one that fails again is
    kept with its attempt count raised and the new error.
    """
    if event_id is None and tenant is None and not everything:
        raise ValueError("say which dead letters to retry: an event id, a tenant, or everything")
    sink = sink or dead_letter_sink(settings)
    router = router or compose.build_router(settings)
    results: list[RetryResult] = []
    for letter in _select(sink, tenant=tenant, event_id=event_id, limit=limit):
        try:
            event = StoredEvent.from_record_data(letter.data)
        except (ValueError, KeyError, TypeError) as e:
            error = f"undecodable record: {type(e).__name__}: {e}"
            sink.put(_failed_again(letter, "DecodeError", error, clock()))
            results.append(RetryResult(letter.tenant, letter.event_id, "undecodable", deleted=False, error=error))
            continue
        outcome = router.apply([event]).results[0]
        if outcome.outcome is EventOutcome.FAILED:
            failure = outcome.error
            error = str(failure) if failure is not None else "failed without an error"
            kind = type(failure).__name__ if failure is not None else "ProjectionError"
            sink.put(_failed_again(letter, kind, error, clock()))
            results.append(RetryResult(letter.tenant, letter.event_id, outcome.outcome.value, False, error))
            continue
        sink.delete(letter.tenant, letter.event_id)
        results.append(RetryResult(letter.tenant, letter.event_id, outcome.outcome.value, deleted=True))
    return results


def _select(
    sink: DynamoDBDeadLetterSink, *, tenant: str | None, event_id: str | None, limit: int
) -> Sequence[DeadLetter]:
    if tenant is not None and event_id is not None:
        letter = sink.get(tenant, event_id)
        return [letter] if letter else []
    if tenant is not None:
        return sink.list(tenant, limit=limit)
    return sink.scan(limit=limit, event_id=event_id)


def _failed_again(letter: DeadLetter, error_type: str, error: str, now: datetime) -> DeadLetter:
    return dataclasses.replace(letter, error_type=error_type, error=error, attempts=letter.attempts + 1, failed_at=now)
