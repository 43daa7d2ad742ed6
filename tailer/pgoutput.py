"""Decoder of the pgoutput logical replication protocol (version 1), the messages tagbus reads.

Pure functions over ``bytes``: no database, no I/O. Each row returned by
``pg_logical_slot_peek_binary_changes(slot, …, 'proto_version', '1', …)`` carries one
message; :func:`decode_message` turns it into one of the frozen records below, or
``None`` for message kinds tagbus does not use (Type, Origin, Truncate, Update, Delete).

Layout reference: PostgreSQL docs, "Logical Replication Message Formats". Integers are
big-endian; LSNs are unsigned 64-bit; timestamps are microseconds since 2000-01-01 UTC;
strings are NUL-terminated; tuple data is text format unless the ``binary`` option is on.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = [
    "UNCHANGED_TOAST",
    "Begin",
    "Column",
    "Commit",
    "Insert",
    "LogicalMessage",
    "Message",
    "PgOutputError",
    "Relation",
    "TupleValue",
    "UnchangedToast",
    "decode_message",
    "format_lsn",
    "insert_relation_id",
    "insert_text_values",
    "parse_lsn",
]

POSTGRES_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)

_BEGIN = struct.Struct(">QqI")  # final (commit) LSN, commit timestamp, xid
_COMMIT = struct.Struct(">BQQq")  # flags, commit LSN, end LSN, commit timestamp
_RELATION_HEAD = struct.Struct(">I")
_RELATION_TAIL = struct.Struct(">BH")  # replica identity, number of columns
_COLUMN_TAIL = struct.Struct(">Ii")  # type oid, type modifier
_INSERT_HEAD = struct.Struct(">IcH")  # relation id, 'N', number of columns
_MESSAGE_HEAD = struct.Struct(">BQ")  # flags, LSN
_I32 = struct.Struct(">i")
_I32_UNSIGNED = struct.Struct(">I")
# Tuple column kinds followed by a length: 't' text, 'b' binary (only with the 'binary' option).
_LENGTH_PREFIXED: Final = frozenset(b"tb")


class PgOutputError(ValueError):
    """A pgoutput message is malformed or uses a feature tagbus did not ask for."""


class UnchangedToast:
    """Marker of an unchanged TOASTed value ('u'): the value was not sent."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Final = UnchangedToast()

#: One column of a tuple: text (``str``), binary (``bytes``), SQL NULL (``None``), or unchanged TOAST.
TupleValue = str | bytes | None | UnchangedToast


@dataclass(frozen=True, slots=True)
class Begin:
    """Start of a transaction; ``final_lsn`` is the LSN of its commit record."""

    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """End of a transaction; ``end_lsn`` is where the next transaction can start decoding."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Column:
    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def part_of_key(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    """A table's description; sent before its first change in every decoding session."""

    relation_id: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Insert:
    relation_id: int
    values: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A ``pg_logical_emit_message`` payload; transactional ones sit between Begin and Commit."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = Begin | Commit | Relation | Insert | LogicalMessage


def decode_message(data: bytes | bytearray | memoryview) -> Message | None:
    """Decode one pgoutput message; ``None`` for kinds tagbus ignores."""
    buf = bytes(data)
    if not buf:
        raise PgOutputError("empty pgoutput message")
    kind = buf[0]
    try:
        decoder = _DECODERS.get(kind)
        if decoder is not None:
            return decoder(buf)
    except PgOutputError:
        raise
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        raise PgOutputError(f"malformed pgoutput message {chr(kind)!r}: {exc}") from exc
    if kind in _IGNORED:
        return None
    raise PgOutputError(f"unknown pgoutput message kind {chr(kind)!r}")


def timestamp_from_micros(micros: int) -> datetime:
    """A pgoutput timestamp (µs since 2000-01-01 UTC) as an aware datetime."""
    return POSTGRES_EPOCH + timedelta(microseconds=micros)


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` → integer LSN."""
    high, _, low = text.partition("/")
    if not low:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    """Integer LSN → PostgreSQL's ``pg_lsn`` text form."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _decode_begin(buf: bytes) -> Begin:
    final_lsn, micros, xid = _BEGIN.unpack_from(buf, 1)
    return Begin(final_lsn=final_lsn, commit_time=timestamp_from_micros(micros), xid=xid)


def _decode_commit(buf: bytes) -> Commit:
    flags, commit_lsn, end_lsn, micros = _COMMIT.unpack_from(buf, 1)
    return Commit(flags=flags, commit_lsn=commit_lsn, end_lsn=end_lsn, commit_time=timestamp_from_micros(micros))


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(0, pos)
    return buf[pos:end].decode(), end + 1


def _decode_relation(buf: bytes) -> Relation:
    (relation_id,) = _RELATION_HEAD.unpack_from(buf, 1)
    namespace, pos = _cstring(buf, 5)
    name, pos = _cstring(buf, pos)
    identity, ncols = _RELATION_TAIL.unpack_from(buf, pos)
    pos += _RELATION_TAIL.size
    columns = []
    for _ in range(ncols):
        flags = buf[pos]
        column_name, pos = _cstring(buf, pos + 1)
        type_oid, type_modifier = _COLUMN_TAIL.unpack_from(buf, pos)
        pos += _COLUMN_TAIL.size
        columns.append(Column(flags=flags, name=column_name, type_oid=type_oid, type_modifier=type_modifier))
    return Relation(
        relation_id=relation_id,
        namespace=namespace,
        name=name,
        replica_identity=chr(identity),
        columns=tuple(columns),
    )


def _decode_insert(buf: bytes) -> Insert:
    relation_id, marker, ncols = _INSERT_HEAD.unpack_from(buf, 1)
    if marker != b"N":
        raise PgOutputError(f"insert without a new tuple (marker {marker!r})")
    values, end = _decode_tuple(buf, 1 + _INSERT_HEAD.size, ncols)
    if end != len(buf):
        raise PgOutputError(f"insert has {len(buf) - end} trailing bytes")
    return Insert(relation_id=relation_id, values=values)


def _decode_tuple(buf: bytes, pos: int, ncols: int) -> tuple[tuple[TupleValue, ...], int]:
    values: list[TupleValue] = []
    append = values.append
    unpack_i32 = _I32.unpack_from
    size = len(buf)
    for _ in range(ncols):
        kind = buf[pos]
        if kind in _LENGTH_PREFIXED:
            (length,) = unpack_i32(buf, pos + 1)
            start = pos + 5
            pos = start + length
            if length < 0 or pos > size:
                raise PgOutputError(f"column value of {length} bytes overruns the message")
            append(buf[start:pos].decode() if kind == 0x74 else buf[start:pos])
        elif kind == 0x6E:  # 'n': null
            append(None)
            pos += 1
        elif kind == 0x75:  # 'u': unchanged TOAST
            append(UNCHANGED_TOAST)
            pos += 1
        else:
            raise PgOutputError(f"unknown tuple column kind {chr(kind)!r}")
    return tuple(values), pos


def insert_relation_id(buf: bytes) -> int:
    """The relation id of an Insert message (``buf[0] == ord('I')``), read without decoding its tuple."""
    try:
        (relation_id,) = _I32_UNSIGNED.unpack_from(buf, 1)
    except struct.error as exc:
        raise PgOutputError(f"malformed pgoutput message 'I': {exc}") from exc
    return int(relation_id)


def insert_text_values(buf: bytes, count: int) -> list[str | None]:
    """The first ``count`` values of an Insert's new tuple: the tailer's hot path.

    Same checks as :func:`decode_message` on an Insert, but the values are text or NULL
    only (what pgoutput sends for a new row without the ``binary`` option) and the
    columns past ``count`` are stepped over without building strings for them. Each
    column costs one struct read, one slice and one UTF-8 decode, nothing else.
    """
    try:
        _, marker, ncols = _INSERT_HEAD.unpack_from(buf, 1)
        if marker != b"N":
            raise PgOutputError(f"insert without a new tuple (marker {marker!r})")
        if ncols < count:
            raise PgOutputError(f"insert has {ncols} columns, fewer than the {count} wanted")
        values: list[str | None] = []
        append = values.append
        unpack_i32 = _I32.unpack_from
        pos = 1 + _INSERT_HEAD.size
        for index in range(ncols):
            kind = buf[pos]
            if kind == 0x74:  # 't': text, the common case first
                (length,) = unpack_i32(buf, pos + 1)
                if length < 0:
                    raise PgOutputError(f"column value of {length} bytes")
                start = pos + 5
                pos = start + length
                if index < count:
                    append(buf[start:pos].decode())
            elif kind == 0x6E:  # 'n': null
                pos += 1
                if index < count:
                    append(None)
            else:
                raise PgOutputError(f"insert column of kind {chr(kind)!r}, expected text or null")
    except PgOutputError:
        raise
    except (struct.error, IndexError, ValueError) as exc:
        raise PgOutputError(f"malformed pgoutput message 'I': {exc}") from exc
    # A slice past the end is silently short: the end position is the overrun check.
    if pos != len(buf):
        raise PgOutputError(f"insert tuple ends at byte {pos} of a {len(buf)}-byte message")
    return values


def _decode_message(buf: bytes) -> LogicalMessage:
    flags, lsn = _MESSAGE_HEAD.unpack_from(buf, 1)
    prefix, pos = _cstring(buf, 1 + _MESSAGE_HEAD.size)
    (length,) = _I32.unpack_from(buf, pos)
    pos += 4
    if length < 0 or pos + length != len(buf):
        raise PgOutputError(f"logical message content of {length} bytes does not fit the message")
    return LogicalMessage(transactional=bool(flags & 1), lsn=lsn, prefix=prefix, content=buf[pos : pos + length])


_DECODERS: dict[int, Callable[[bytes], Message]] = {
    ord("B"): _decode_begin,
    ord("C"): _decode_commit,
    ord("R"): _decode_relation,
    ord("I"): _decode_insert,
    ord("M"): _decode_message,
}
# Type, Origin, Truncate, Update, Delete: tagbus publishes inserts only and needs none of them.
_IGNORED = frozenset(ord(k) for k in "YOTUD")
