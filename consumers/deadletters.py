"""Dead letters: records the consumer gave up on, kept with their data and the reason.

A record lands here only after it failed ``max_attempts`` times with an error that waiting
cannot fix (malformed data, unknown tag, a value the store refuses). It is never dropped:
the processor checkpoints past it only once the letter is written. ``tagbus dlq`` lists
and retries them.

Table ``tagbus-deadletters``: partition key ``tenant`` (S), sort key ``event_id`` (S); a
record whose data could not be decoded is filed under tenant ``-`` and id
``record:<shard>:<sequence>:<sub>``.

``tagbus dlq retry`` applies a letter's event again once its cause is fixed and deletes the
letter only after the event went through (:meth:`DynamoDBDeadLetterSink.delete`).
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from projections.stores.botocore_errors import error_code, translate

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_dynamodb.type_defs import AttributeValueTypeDef

DEFAULT_TABLE = "tagbus-deadletters"
UNKNOWN_TENANT = "-"
_STORE = "dynamodb-deadletters"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record given up on, with enough context to inspect and retry it."""

    tenant: str
    event_id: str
    data: bytes
    error_type: str
    error: str
    attempts: int
    failed_at: datetime
    shard_id: str | None = None
    sequence_number: str | None = None
    sub_sequence_number: int | None = None
    partition_key: str | None = None
    stream: str | None = None
    version: int | None = None


class DeadLetterSink(Protocol):
    """Where given-up records go; ``put`` raises if the letter was not durably written."""

    def put(self, letter: DeadLetter) -> None: ...


class MemoryDeadLetterSink:
    """Dead letters in a list (tests, local experiments)."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []
        self._lock = threading.Lock()

    def put(self, letter: DeadLetter) -> None:
        with self._lock:
            self.letters.append(letter)

    def delete(self, tenant: str, event_id: str) -> None:
        with self._lock:
            self.letters = [x for x in self.letters if (x.tenant, x.event_id) != (tenant, event_id)]


class DynamoDBDeadLetterSink:
    """Dead letters in a DynamoDB table, one item per ``(tenant, event_id)``.

    A record dead-lettered again (after a restart redelivered it) overwrites its item with
    the newest error and attempt count.
    """

    def __init__(self, client: DynamoDBClient, *, table_name: str = DEFAULT_TABLE) -> None:
        self._client = client
        self.table_name = table_name

    def ensure_table(self, *, wait: bool = True) -> None:
        """Create the table (on-demand) if it does not exist yet."""
        try:
            try:
                self._client.describe_table(TableName=self.table_name)
                return
            except ClientError as e:
                if error_code(e) != "ResourceNotFoundException":
                    raise
            try:
                self._client.create_table(
                    TableName=self.table_name,
                    AttributeDefinitions=[
                        {"AttributeName": "tenant", "AttributeType": "S"},
                        {"AttributeName": "event_id", "AttributeType": "S"},
                    ],
                    KeySchema=[
                        {"AttributeName": "tenant", "KeyType": "HASH"},
                        {"AttributeName": "event_id", "KeyType": "RANGE"},
                    ],
                    BillingMode="PAY_PER_REQUEST",
                )
            except ClientError as e:
                if error_code(e) != "ResourceInUseException":
                    raise
            if wait:
                self._client.get_waiter("table_exists").wait(
                    TableName=self.table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
                )
        except (BotoCoreError, ClientError) as e:
            raise translate(e, store=_STORE, operation="ensure_table") from e

    def put(self, letter: DeadLetter) -> None:
        item: dict[str, AttributeValueTypeDef] = {
            "tenant": {"S": letter.tenant},
            "event_id": {"S": letter.event_id},
            "data": {"B": letter.data},
            "error_type": {"S": letter.error_type},
            "error": {"S": letter.error[:10_000]},
            "attempts": {"N": str(letter.attempts)},
            "failed_at": {"S": letter.failed_at.isoformat()},
        }
        optional: dict[str, str | int | None] = {
            "shard_id": letter.shard_id,
            "sequence_number": letter.sequence_number,
            "partition_key": letter.partition_key,
            "stream": letter.stream,
        }
        for name, value in optional.items():
            if value is not None:
                item[name] = {"S": str(value)}
        if letter.sub_sequence_number is not None:
            item["sub_sequence_number"] = {"N": str(letter.sub_sequence_number)}
        if letter.version is not None:
            item["version"] = {"N": str(letter.version)}
        try:
            self._client.put_item(TableName=self.table_name, Item=item)
        except (BotoCoreError, ClientError) as e:
            raise translate(e, store=_STORE, operation="PutItem") from e

    def list(self, tenant: str, *, limit: int = 100) -> Sequence[DeadLetter]:
        """A tenant's dead letters, by event id (first ``limit``)."""
        request: dict[str, Any] = {
            "TableName": self.table_name,
            "KeyConditionExpression": "#tenant = :tenant",
            "ExpressionAttributeNames": {"#tenant": "tenant"},
            "ExpressionAttributeValues": {":tenant": {"S": tenant}},
            "ConsistentRead": True,
        }
        return self._paged("Query", request, limit)

    def scan(self, *, limit: int = 100, event_id: str | None = None) -> Sequence[DeadLetter]:
        """Dead letters of every tenant (first ``limit``, in no particular order), optionally of one event id."""
        request: dict[str, Any] = {"TableName": self.table_name, "ConsistentRead": True}
        if event_id is not None:
            request["FilterExpression"] = "#event_id = :event_id"
            request["ExpressionAttributeNames"] = {"#event_id": "event_id"}
            request["ExpressionAttributeValues"] = {":event_id": {"S": event_id}}
        return self._paged("Scan", request, limit)

    def get(self, tenant: str, event_id: str) -> DeadLetter | None:
        """One dead letter, or ``None``."""
        try:
            response = self._client.get_item(
                TableName=self.table_name,
                Key={"tenant": {"S": tenant}, "event_id": {"S": event_id}},
                ConsistentRead=True,
            )
        except (BotoCoreError, ClientError) as e:
            raise translate(e, store=_STORE, operation="GetItem") from e
        item = response.get("Item")
        return _letter(item) if item else None

    def delete(self, tenant: str, event_id: str) -> None:
        """Remove a dead letter (after its event was applied); removing a missing one is a no-op."""
        try:
            self._client.delete_item(
                TableName=self.table_name, Key={"tenant": {"S": tenant}, "event_id": {"S": event_id}}
            )
        except (BotoCoreError, ClientError) as e:
            raise translate(e, store=_STORE, operation="DeleteItem") from e

    def _paged(self, operation: str, request: dict[str, Any], limit: int) -> builtins.list[DeadLetter]:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        call = self._client.query if operation == "Query" else self._client.scan
        found: builtins.list[DeadLetter] = []
        # A filtered scan may return short pages: keep going until enough or the end.
        while len(found) < limit:
            request["Limit"] = limit - len(found)
            try:
                response = call(**request)
            except (BotoCoreError, ClientError) as e:
                raise translate(e, store=_STORE, operation=operation) from e
            found.extend(_letter(item) for item in response.get("Items", []))
            last = response.get("LastEvaluatedKey")
            if not last:
                break
            request["ExclusiveStartKey"] = last
        return found[:limit]


def _letter(item: dict[str, Any]) -> DeadLetter:
    def text(name: str) -> str | None:
        return item[name]["S"] if name in item else None

    def number(name: str) -> int | None:
        return int(item[name]["N"]) if name in item else None

    return DeadLetter(
        tenant=item["tenant"]["S"],
        event_id=item["event_id"]["S"],
        data=bytes(item["data"]["B"]),
        error_type=item["error_type"]["S"],
        error=item["error"]["S"],
        attempts=int(item["attempts"]["N"]),
        failed_at=datetime.fromisoformat(item["failed_at"]["S"]),
        shard_id=text("shard_id"),
        sequence_number=text("sequence_number"),
        sub_sequence_number=number("sub_sequence_number"),
        partition_key=text("partition_key"),
        stream=text("stream"),
        version=number("version"),
    )
