"""pgoutput messages → committed transactions of :class:`~kernel.envelope.StoredEvent`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Final

import orjson

from kernel.envelope import StoredEvent
from tailer.errors import EventDecodeError
from tailer.metrics import TailerMetrics
from tailer.pgoutput import (
    Begin,
    Commit,
    LogicalMessage,
    PgOutputError,
    Relation,
    decode_message,
    insert_relation_id,
    insert_text_values,
)

#: Prefix of the transactional logical message the tailer emits when idle.
HEARTBEAT_PREFIX: Final = "tagbus.heartbeat"


@dataclass(frozen=True, slots=True)
class DecodedTransaction:
    """One committed transaction as the slot returned it."""

    commit_lsn: int
    end_lsn: int
    commit_time: datetime
    events: tuple[StoredEvent, ...]
    heartbeat: bool


_EVENT_COLUMNS: Final = (
    "event_id",
    "tenant_id",
    "stream_id",
    "version",
    "type",
    "source",
    "subject",
    "occurred_at",
    "recorded_at",
    "data",
    "metadata",
)


class ChangeDecoder:
    """Assembles pgoutput messages into committed transactions of events.

    Relation messages are remembered by id (each decoding session sends them before
    first use). Inserts into other tables are ignored without
    decoding their tuples.

    Inserts are the bulk of the stream, so they take a short path: the message kind is
    read off the first byte, and only the event columns of the tuple become strings
    (:func:`~tailer.pgoutput.insert_text_values`), picked by one ``itemgetter``.
    Every other kind goes through :func:`~tailer.pgoutput.decode_message`.
    """

    def __init__(self, *, table: str = "events", metrics: TailerMetrics | None = None) -> None:
        self._table = table
        self._metrics = metrics
        self._relations: dict[int, _EventColumns | None] = {}
        self._begin: Begin | None = None
        self._events: list[StoredEvent] = []
        self._heartbeat = False

    def feed(self, data: bytes) -> DecodedTransaction | None:
        """Take one message; return the transaction it completes, if any."""
        if data[:1] == b"I":
            self._on_insert(data)
            return None
        message = decode_message(data)
        if isinstance(message, Begin):
            self._begin, self._events, self._heartbeat = message, [], False
        elif isinstance(message, Commit):
            return self._on_commit(message)
        elif isinstance(message, Relation):
            self._on_relation(message)
        elif isinstance(message, LogicalMessage) and message.transactional:
            self._heartbeat = self._heartbeat or message.prefix == HEARTBEAT_PREFIX
        return None

    def decode(self, rows: Iterable[bytes]) -> list[DecodedTransaction]:
        """All transactions completed by ``rows``; an unfinished tail is dropped (re-read next time)."""
        done = []
        for data in rows:
            transaction = self.feed(data)
            if transaction is not None:
                done.append(transaction)
        self.reset()
        return done

    @property
    def in_transaction(self) -> bool:
        """Whether a Begin was fed whose Commit was not."""
        return self._begin is not None

    def reset(self) -> None:
        """Forget an unfinished transaction (its rows will be read again from the slot)."""
        self._begin, self._events, self._heartbeat = None, [], False

    def _on_relation(self, relation: Relation) -> None:
        if relation.name != self._table:
            self._relations[relation.relation_id] = None
            return
        positions = {column.name: i for i, column in enumerate(relation.columns)}
        missing = [name for name in _EVENT_COLUMNS if name not in positions]
        if missing:
            raise EventDecodeError(
                f"relation {relation.namespace}.{relation.name} lacks columns {missing}",
                position=self._begin.final_lsn if self._begin else 0,
            )
        wanted = tuple(positions[name] for name in _EVENT_COLUMNS)
        self._relations[relation.relation_id] = _EventColumns(width=max(wanted) + 1, pick=itemgetter(*wanted))

    def _on_insert(self, data: bytes) -> None:
        begin = self._begin
        if begin is None:
            raise EventDecodeError("insert outside a transaction", position=0)
        relation_id = insert_relation_id(data)
        try:
            columns = self._relations[relation_id]
        except KeyError:
            raise EventDecodeError(f"insert into unknown relation {relation_id}", position=begin.final_lsn) from None
        if columns is None:
            return
        try:
            values = insert_text_values(data, columns.width)
        except PgOutputError as exc:
            raise EventDecodeError(str(exc), position=begin.final_lsn) from exc
        self._events.append(_event_from_row(columns.pick(values), begin.final_lsn))

    def _on_commit(self, commit: Commit) -> DecodedTransaction | None:
        begin = self._begin
        if begin is None:
            raise EventDecodeError("commit without begin", position=commit.commit_lsn)
        transaction = DecodedTransaction(
            commit_lsn=commit.commit_lsn,
            end_lsn=commit.end_lsn,
            commit_time=commit.commit_time,
            events=tuple(self._events),
            heartbeat=self._heartbeat,
        )
        self._begin, self._events, self._heartbeat = None, [], False
        if self._metrics is not None and transaction.events:
            self._metrics.events_decoded.inc(len(transaction.events))
        return transaction


@dataclass(frozen=True, slots=True)
class _EventColumns:
    """Where the event columns sit in a relation's tuples."""

    #: Columns to decode: up to the last event column.
    width: int
    #: ``values`` → the event columns in ``_EVENT_COLUMNS`` order.
    pick: Callable[[list[str | None]], tuple[str | None, ...]]


def _event_from_row(text: tuple[str | None, ...], position: int) -> StoredEvent:
    event_id, tenant, stream, version, type_, source, subject, occurred_at, recorded_at, data, metadata = text
    if event_id is None or tenant is None or stream is None or version is None or recorded_at is None:
        raise EventDecodeError("insert lacks a required column value", position=position)
    try:
        meta = orjson.loads(metadata) if metadata is not None else {}
        if type(meta) is not dict:
            raise ValueError(f"metadata is {type(meta).__name__}, expected an object")
        content_type = meta.get("datacontenttype")
        payload = orjson.loads(data) if data is not None else None
        return StoredEvent(
            id=event_id,
            tenant=tenant,
            stream=stream,
            version=int(version),
            type=str(type_),
            source=str(source),
            recorded_at=_timestamp(recorded_at),
            data=payload,
            subject=subject,
            time=_timestamp(occurred_at) if occurred_at is not None else None,
            datacontenttype=content_type if isinstance(content_type, str) else None,
            metadata=meta,
            position=position,
            # The column's text "null" (a null payload) is not a NULL column (no payload).
            null_data=data is not None and payload is None,
        )
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise EventDecodeError(f"event {event_id!r}: {exc}", position=position) from exc


def _timestamp(text: str) -> datetime:
    # The reader session pins DateStyle=ISO and TimeZone=UTC, so values look like
    # '2024-05-06 07:08:09.123456+00', which fromisoformat reads on Python ≥ 3.11.
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone")
    return moment
