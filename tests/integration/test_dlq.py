"""Dead letters end to end: the consumer files a poison event, ``dlq retry`` applies it once fixed.

The record processor is the real one, fed with amazon-kclpy's own message classes; the
dead-letter table is a real DynamoDB Local table of this test's own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pytest

from consumers.deadletters import DeadLetter, DynamoDBDeadLetterSink
from consumers.processor import ConfigProjectionProcessor
from projections.router import TagRouter
from projections.stores.memory import MemoryConfigStore
from tagbus import aws, ops
from tagbus import settings as settings_mod
from tests.unit.test_processor import FakeCheckpointer, event_data, message, process_records

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def settings() -> settings_mod.Settings:
    s = settings_mod.load()
    if not s.environ.get("AWS_ENDPOINT_URL_DYNAMODB"):
        pytest.fail("no DynamoDB endpoint: run `tagbus up` (it writes .tagbus/env) or `make test`")
    return s


@pytest.fixture
def sink(settings: settings_mod.Settings) -> Iterator[DynamoDBDeadLetterSink]:
    client: DynamoDBClient = aws.client(settings, "dynamodb")
    sink = DynamoDBDeadLetterSink(client, table_name=f"tagbus-deadletters-test-{uuid.uuid4().hex[:8]}")
    sink.ensure_table()
    yield sink
    client.delete_table(TableName=sink.table_name)


def test_retry_applies_a_dead_letter_once_its_cause_is_fixed(
    settings: settings_mod.Settings, sink: DynamoDBDeadLetterSink
) -> None:
    tenant = f"dlq-{uuid.uuid4().hex[:8]}"
    tenantconfig = MemoryConfigStore()
    broken = TagRouter({"tenantconfig": tenantconfig})  # nobody registered the featureflags tag yet
    processor = ConfigProjectionProcessor(broken, dead_letters=sink, sleep=lambda _: None, max_attempts=2)
    message({"action": "initialize", "shardId": "shardId-000000000007", "sequenceNumber": None,
             "subSequenceNumber": None}).dispatch(None, processor)  # fmt: skip
    checkpointer = FakeCheckpointer()
    process_records(
        [
            event_data(tenant, "featureflags:dark-mode", 1, {"on": True}),
            event_data(tenant, "tenantconfig:after", 1, "applied anyway"),
        ]
    ).dispatch(checkpointer, processor)
    assert checkpointer.calls, "the shard moved on"
    item = broken.get(tenant, "tenantconfig:after")
    assert item is not None and item.value == "applied anyway"

    (letter,) = ops.dlq_list(settings, tenant, sink=sink)
    assert (letter.event_id, letter.error_type, letter.attempts) == (
        f"{tenant}:featureflags:dark-mode:1",
        "UnknownTag",
        2,
    )
    assert [x.event_id for x in ops.dlq_list(settings, event_id=letter.event_id, sink=sink)] == [letter.event_id]

    # Not fixed yet: the retry fails and the letter stays, one attempt older.
    (failed,) = ops.dlq_retry(settings, tenant=tenant, router=broken, sink=sink)
    assert (failed.outcome, failed.deleted) == ("failed", False) and "featureflags" in (failed.error or "")
    kept = sink.get(tenant, letter.event_id)
    assert kept is not None and kept.attempts == 3

    # The fix: the tag gets its store. Now the retry applies it and removes the letter.
    flags = MemoryConfigStore()
    fixed = TagRouter({"tenantconfig": tenantconfig, "featureflags": flags})
    (done,) = ops.dlq_retry(settings, event_id=letter.event_id, router=fixed, sink=sink)
    assert (done.tenant, done.outcome, done.deleted, done.error) == (tenant, "applied", True, None)
    flag = fixed.get(tenant, "featureflags:dark-mode")
    assert flag is not None and flag.value == {"on": True}
    assert ops.dlq_list(settings, tenant, sink=sink) == []
    assert ops.dlq_retry(settings, tenant=tenant, router=fixed, sink=sink) == []


def test_undecodable_letters_stay_and_selection_is_required(
    settings: settings_mod.Settings, sink: DynamoDBDeadLetterSink
) -> None:
    letter = DeadLetter(
        tenant="-",
        event_id=f"record:shardId-1:{uuid.uuid4().int}:0",
        data=b"not json",
        error_type="JSONDecodeError",
        error="unexpected character",
        attempts=1,
        failed_at=datetime(2024, 5, 1, tzinfo=UTC),
        shard_id="shardId-1",
    )
    sink.put(letter)
    router = TagRouter({"tenantconfig": MemoryConfigStore()})
    with pytest.raises(ValueError, match="which dead letters"):
        ops.dlq_retry(settings, router=router, sink=sink)
    (result,) = ops.dlq_retry(settings, everything=True, router=router, sink=sink)
    assert (result.outcome, result.deleted) == ("undecodable", False)
    assert [x.attempts for x in ops.dlq_list(settings, sink=sink)] == [2]
    sink.delete("-", letter.event_id)
    assert ops.dlq_list(settings, sink=sink) == []
