"""The pgoutput decoder, on bytes captured from PostgreSQL 15 and on generated messages."""

from __future__ import annotations

import contextlib
import struct
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tailer import ChangeDecoder
from tailer.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Column,
    Commit,
    Insert,
    LogicalMessage,
    PgOutputError,
    Relation,
    TupleValue,
    decode_message,
    format_lsn,
    insert_relation_id,
    insert_text_values,
    parse_lsn,
)

# Captured with pg_logical_slot_peek_binary_changes(slot, NULL, NULL, 'proto_version', '1',
# 'publication_names', 'tagbus_events', 'messages', 'true') from PostgreSQL 15.
# Transaction 741: two inserts into events; transaction 742: a tagbus heartbeat.
CAPTURED = [
    "4200000000029cf528000303f110be4487000002e5",
    "52000040077075626c6963006576656e74730064000d0169640000000014ffffffff006576656e745f69640000000019"
    "ffffffff0074656e616e745f69640000000019ffffffff0073747265616d5f69640000000019ffffffff007665727369"
    "6f6e0000000014ffffffff00747970650000000019ffffffff00736f757263650000000019ffffffff007375626a6563"
    "740000000019ffffffff006f636375727265645f617400000004a0ffffffff007265636f726465645f617400000004a0"
    "ffffffff00646174610000000edaffffffff006d657461646174610000000edaffffffff006469676573740000000019"
    "ffffffff",
    "49000040074e000d74000000013374000000026531740000000461636d65740000001674656e616e74636f6e6669673a"
    "666561747572652f78740000000131740000000a636f6e6669672e73657474000000042f737663740000001674656e61"
    "6e74636f6e6669673a666561747572652f78740000001d323032342d30352d30362030373a30383a30392e3132333435"
    "362b3030740000001d323032362d31312d32332031343a32303a33332e3033373431382b303074000000427b226b6579"
    "223a202274656e616e74636f6e6669673a666561747572652f78222c202276616c7565223a207b226e223a20312e352c"
    "20226f6e223a20747275657d7d74000000617b22737562223a2022737663222c2022636175736174696f6e6964223a20"
    "226b31222c2022636f7272656c6174696f6e6964223a20226331222c202264617461636f6e74656e7474797065223a20"
    "226170706c69636174696f6e2f6a736f6e227d74000000026431",
    "49000040074e000d74000000013474000000026532740000000461636d6574000000027332740000000131740000000e"
    "7468696e672e68617070656e656474000000042f7376636e6e740000001d323032362d31312d32332031343a32303a33"
    "332e3033373431382b30306e74000000027b7d74000000026432",
    "430000000000029cf52800000000029cf558000303f110be4487",
    "4200000000029cf5a0000303f110be4553000002e6",
    "4d0100000000029cf5a07461676275732e6865617274626561740000000000",
    "430000000000029cf5a000000000029cf5d0000303f110be4553",
]
ROWS = [bytes.fromhex(h) for h in CAPTURED]
COMMIT_TIME = datetime(2026, 11, 23, 14, 20, 33, 37511, tzinfo=UTC)


def test_begin_carries_commit_lsn_time_and_xid() -> None:
    begin = decode_message(ROWS[0])
    assert isinstance(begin, Begin)
    assert format_lsn(begin.final_lsn) == "0/29CF528"
    assert begin.xid == 741
    assert begin.commit_time.tzinfo is not None
    assert abs(begin.commit_time - COMMIT_TIME) < timedelta(seconds=1)


def test_relation_lists_the_events_columns() -> None:
    relation = decode_message(ROWS[1])
    assert isinstance(relation, Relation)
    assert (relation.namespace, relation.name, relation.replica_identity) == ("public", "events", "d")
    assert [c.name for c in relation.columns][:4] == ["id", "event_id", "tenant_id", "stream_id"]
    assert len(relation.columns) == 13
    assert relation.columns[0].part_of_key and relation.columns[0].type_oid == 20  # bigint
    assert relation.columns[10].name == "data" and relation.columns[10].type_oid == 3802  # jsonb


def test_insert_values_are_text_with_nulls() -> None:
    first = decode_message(ROWS[2])
    second = decode_message(ROWS[3])
    assert isinstance(first, Insert) and isinstance(second, Insert)
    assert first.values[:5] == ("3", "e1", "acme", "tenantconfig:feature/x", "1")
    assert first.values[8] == "2024-05-06 07:08:09.123456+00"
    assert orjson.loads(str(first.values[10])) == {
        "key": "tenantconfig:feature/x",
        "value": {"on": True, "n": 1.5},
    }
    assert second.values[7] is None and second.values[8] is None and second.values[10] is None


def test_commit_and_heartbeat_message() -> None:
    commit = decode_message(ROWS[4])
    assert isinstance(commit, Commit)
    assert (format_lsn(commit.commit_lsn), format_lsn(commit.end_lsn)) == ("0/29CF528", "0/29CF558")
    message = decode_message(ROWS[6])
    assert message == LogicalMessage(
        transactional=True, lsn=parse_lsn("0/29CF5A0"), prefix="tagbus.heartbeat", content=b""
    )


def test_change_decoder_builds_stored_events_in_order() -> None:
    transactions = ChangeDecoder().decode(ROWS)
    assert [len(t.events) for t in transactions] == [2, 0]
    assert [t.heartbeat for t in transactions] == [False, True]
    first, second = transactions[0].events
    assert first.id == "e1" and second.id == "e2"
    assert first.position == second.position == parse_lsn("0/29CF528")
    assert first.version == 1 and first.type == "config.set" and first.subject == "tenantconfig:feature/x"
    assert first.time == datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    assert first.recorded_at.tzinfo is not None
    assert first.data == {"key": "tenantconfig:feature/x", "value": {"on": True, "n": 1.5}}
    assert first.datacontenttype == "application/json"
    assert first.metadata["correlationid"] == "c1" and first.metadata["causationid"] == "k1"
    assert second.data is None and second.time is None and second.subject is None and second.metadata == {}
    assert transactions[1].end_lsn == parse_lsn("0/29CF5D0")


def test_unfinished_transaction_is_dropped() -> None:
    assert ChangeDecoder().decode(ROWS[:4]) == []


def test_ignored_and_unknown_kinds() -> None:
    assert decode_message(b"Y" + struct.pack(">I", 1) + b"public\x00t\x00") is None
    assert decode_message(b"O" + struct.pack(">Q", 1) + b"origin\x00") is None
    with pytest.raises(PgOutputError):
        decode_message(b"Z")
    with pytest.raises(PgOutputError):
        decode_message(b"")
    with pytest.raises(PgOutputError):
        decode_message(ROWS[2][:-3])  # truncated insert


def test_lsn_text_round_trip() -> None:
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"


# ---------------------------------------------------------------- property: encode → decode


def _cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def encode_relation(relation: Relation) -> bytes:
    out = b"R" + struct.pack(">I", relation.relation_id) + _cstr(relation.namespace) + _cstr(relation.name)
    out += struct.pack(">BH", ord(relation.replica_identity), len(relation.columns))
    for column in relation.columns:
        out += bytes([column.flags]) + _cstr(column.name) + struct.pack(">Ii", column.type_oid, column.type_modifier)
    return out


def encode_insert(insert: Insert) -> bytes:
    out = b"I" + struct.pack(">IcH", insert.relation_id, b"N", len(insert.values))
    for value in insert.values:
        if value is None:
            out += b"n"
        elif value is UNCHANGED_TOAST:
            out += b"u"
        elif isinstance(value, str):
            raw = value.encode()
            out += b"t" + struct.pack(">i", len(raw)) + raw
        elif isinstance(value, bytes):
            out += b"b" + struct.pack(">i", len(value)) + value
    return out


names = st.text(st.characters(categories=("L", "N", "P", "S", "Zs"), blacklist_characters="\x00"), max_size=20)
values: st.SearchStrategy[TupleValue] = st.one_of(
    st.none(), st.just(UNCHANGED_TOAST), st.text(max_size=50), st.binary(max_size=50)
)


@given(
    relation_id=st.integers(0, 2**32 - 1),
    namespace=names,
    name=names,
    columns=st.lists(
        st.builds(
            Column,
            flags=st.integers(0, 1),
            name=names,
            type_oid=st.integers(0, 2**32 - 1),
            type_modifier=st.integers(-(2**31), 2**31 - 1),
        ),
        max_size=8,
    ),
)
def test_relation_round_trip(relation_id: int, namespace: str, name: str, columns: list[Column]) -> None:
    relation = Relation(relation_id, namespace, name, "d", tuple(columns))
    assert decode_message(encode_relation(relation)) == relation


@given(relation_id=st.integers(0, 2**32 - 1), row=st.lists(values, max_size=20))
def test_insert_round_trip(relation_id: int, row: list[TupleValue]) -> None:
    insert = Insert(relation_id, tuple(row))
    assert decode_message(encode_insert(insert)) == insert


@given(
    lsn=st.integers(0, 2**64 - 1),
    micros=st.integers(-(2**50), 2**50),
    xid=st.integers(0, 2**32 - 1),
    end=st.integers(0, 2**64 - 1),
)
def test_begin_commit_round_trip(lsn: int, micros: int, xid: int, end: int) -> None:
    begin = decode_message(b"B" + struct.pack(">QqI", lsn, micros, xid))
    assert isinstance(begin, Begin) and (begin.final_lsn, begin.xid) == (lsn, xid)
    commit = decode_message(b"C" + struct.pack(">BQQq", 0, lsn, end, micros))
    assert isinstance(commit, Commit) and (commit.commit_lsn, commit.end_lsn) == (lsn, end)
    assert begin.commit_time == commit.commit_time


@given(st.binary(max_size=64))
def test_garbage_never_crashes_with_anything_but_pgoutput_error(data: bytes) -> None:
    with contextlib.suppress(PgOutputError):
        decode_message(data)


# ---------------------------------------------------------------- the tailer's insert fast path

text_values: st.SearchStrategy[str | None] = st.one_of(st.none(), st.text(max_size=50))


@given(relation_id=st.integers(0, 2**32 - 1), row=st.lists(text_values, max_size=20), data=st.data())
def test_insert_fast_path_agrees_with_decode_message(
    relation_id: int, row: list[str | None], data: st.DataObject
) -> None:
    encoded = encode_insert(Insert(relation_id, tuple(row)))
    count = data.draw(st.integers(0, len(row)))
    assert insert_relation_id(encoded) == relation_id
    assert insert_text_values(encoded, count) == row[:count]


def test_insert_fast_path_refuses_what_it_does_not_read() -> None:
    binary = encode_insert(Insert(7, ("a", b"\x00\x01")))
    with pytest.raises(PgOutputError, match="kind 'b'"):
        insert_text_values(binary, 2)
    toast = encode_insert(Insert(7, ("a", UNCHANGED_TOAST)))
    with pytest.raises(PgOutputError, match="kind 'u'"):
        insert_text_values(toast, 1)  # columns past ``count`` are still checked
    with pytest.raises(PgOutputError, match="fewer"):
        insert_text_values(encode_insert(Insert(7, ("a",))), 2)
    with pytest.raises(PgOutputError, match="ends at"):
        insert_text_values(encode_insert(Insert(7, ("a",))) + b"x", 1)


@given(st.binary(max_size=64))
def test_insert_fast_path_garbage_raises_pgoutput_error(data: bytes) -> None:
    with contextlib.suppress(PgOutputError):
        insert_text_values(b"I" + data, 3)
