"""The ``tenantconfig`` read model: one DynamoDB table, one partition per tenant.

Item layout of ``tagbus-tenantconfig``::

    pk          S   TENANT#<tenant>
    sk          S   <tag>:<path>            (the key string; begins_with(sk) lists a prefix)
    value       S   the value as JSON text  (absent on tombstones; JSON keeps floats, nulls
                                             and nesting exact, which native maps do not)
    version     N   the key's stream version
    position    N   commit LSN of the event
    updated_at  S   the event's recorded_at, ISO 8601
    deleted     BOOL
    expires_at  N   tombstones only: epoch seconds for DynamoDB TTL

Every write is a ``PutItem`` conditional on ``attribute_not_exists(pk) OR version < :v``: an
older or repeated change fails the condition and is reported ``STALE`` without touching the
item, so the model never goes backwards whatever order Kinesis (or a replay) delivers in.
``BatchWriteItem`` takes no conditions and ``TransactWriteItems`` cancels the whole batch on
one stale item, so changes are put one by one.

A delete leaves a tombstone with the delete's version, so a late older ``set`` fails the same
condition. Tombstones expire through TTL after ``tombstone_ttl`` (default 7 days); that must
exceed how late a change can arrive (Kinesis retention), otherwise an expired tombstone lets a
very late ``set`` resurrect the key. Replays apply in version order and are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from projections.errors import ChangeRejected, ProjectionError, StoreError
from projections.model import ConfigChange, ConfigItem, ConfigKey
from projections.stores.base import ApplyResult, ChangeResult, ConfigPage, Outcome
from projections.stores.botocore_errors import error_code, translate

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_dynamodb.type_defs import AttributeValueTypeDef

DEFAULT_TABLE = "tagbus-tenantconfig"
TTL_ATTRIBUTE = "expires_at"
_STORE = "dynamodb"


def _utcnow() -> datetime:
    return datetime.now(UTC)


class DynamoDBConfigStore:
    """Config keys in a DynamoDB table, written with version-conditional puts."""

    def __init__(
        self,
        client: DynamoDBClient,
        *,
        table_name: str = DEFAULT_TABLE,
        tombstone_ttl: timedelta | None = timedelta(days=7),
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._client = client
        self.table_name = table_name
        self._tombstone_ttl = tombstone_ttl
        self._clock = clock

    # -- setup -------------------------------------------------------------------------

    def ensure_table(self, *, wait: bool = True) -> None:
        """Create the table (on-demand, TTL on ``expires_at``) if it does not exist yet."""
        try:
            try:
                self._client.describe_table(TableName=self.table_name)
            except ClientError as e:
                if error_code(e) != "ResourceNotFoundException":
                    raise
                try:
                    self._client.create_table(
                        TableName=self.table_name,
                        AttributeDefinitions=[
                            {"AttributeName": "pk", "AttributeType": "S"},
                            {"AttributeName": "sk", "AttributeType": "S"},
                        ],
                        KeySchema=[
                            {"AttributeName": "pk", "KeyType": "HASH"},
                            {"AttributeName": "sk", "KeyType": "RANGE"},
                        ],
                        BillingMode="PAY_PER_REQUEST",
                    )
                except ClientError as create_error:
                    # Another consumer process created it first.
                    if error_code(create_error) != "ResourceInUseException":
                        raise
            if wait:
                self._client.get_waiter("table_exists").wait(
                    TableName=self.table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
                )
            ttl = self._client.describe_time_to_live(TableName=self.table_name)
            status = ttl.get("TimeToLiveDescription", {}).get("TimeToLiveStatus")
            if status not in ("ENABLED", "ENABLING"):
                self._client.update_time_to_live(
                    TableName=self.table_name,
                    TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
                )
        except (BotoCoreError, ClientError) as e:
            raise translate(e, store=_STORE, operation="ensure_table") from e

    # -- writes ------------------------------------------------------------------------

    def apply(self, changes: Sequence[ConfigChange]) -> ApplyResult:
        return ApplyResult(tuple(self._apply_one(change) for change in changes))

    def _apply_one(self, change: ConfigChange) -> ChangeResult:
        try:
            item = self._item(change)
        except (TypeError, ValueError) as e:
            # orjson refuses the value (e.g. an integer beyond 64 bits): it never will.
            error: ProjectionError = ChangeRejected(
                f"value of {change.key} is not serializable: {e}", store=_STORE, operation="PutItem"
            )
            return ChangeResult(change, Outcome.FAILED, error)
        try:
            self._client.put_item(
                TableName=self.table_name,
                Item=item,
                ConditionExpression="attribute_not_exists(#pk) OR #version < :version",
                ExpressionAttributeNames={"#pk": "pk", "#version": "version"},
                ExpressionAttributeValues={":version": {"N": str(change.version)}},
            )
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                return ChangeResult(change, Outcome.STALE)
            return ChangeResult(change, Outcome.FAILED, translate(e, store=_STORE, operation="PutItem"))
        except BotoCoreError as e:
            return ChangeResult(change, Outcome.FAILED, translate(e, store=_STORE, operation="PutItem"))
        return ChangeResult(change, Outcome.APPLIED)

    def _item(self, change: ConfigChange) -> dict[str, AttributeValueTypeDef]:
        item: dict[str, AttributeValueTypeDef] = {
            "pk": {"S": _pk(change.tenant)},
            "sk": {"S": str(change.key)},
            "version": {"N": str(change.version)},
            "position": {"N": str(change.position)},
            "updated_at": {"S": change.updated_at.isoformat()},
            "deleted": {"BOOL": change.deleted},
        }
        if change.deleted:
            if self._tombstone_ttl is not None:
                expires = self._clock() + self._tombstone_ttl
                item[TTL_ATTRIBUTE] = {"N": str(int(expires.timestamp()))}
        else:
            item["value"] = {"S": orjson.dumps(change.value).decode()}
        return item

    # -- reads -------------------------------------------------------------------------

    def get(self, tenant: str, key: ConfigKey) -> ConfigItem | None:
        try:
            response = self._client.get_item(
                TableName=self.table_name,
                Key={"pk": {"S": _pk(tenant)}, "sk": {"S": str(key)}},
                ConsistentRead=True,
            )
        except (BotoCoreError, ClientError) as e:
            raise translate(e, store=_STORE, operation="GetItem") from e
        item = response.get("Item")
        if item is None or item.get("deleted", {}).get("BOOL", False):
            return None
        return _config_item(item)

    def list(self, tenant: str, prefix: str, *, limit: int = 100, start_after: str | None = None) -> ConfigPage:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        condition = "#pk = :pk"
        values: dict[str, AttributeValueTypeDef] = {":pk": {"S": _pk(tenant)}, ":false": {"BOOL": False}}
        names = {"#pk": "pk", "#deleted": "deleted"}
        if prefix:
            condition += " AND begins_with(#sk, :prefix)"
            values[":prefix"] = {"S": prefix}
            names["#sk"] = "sk"
        request: dict[str, Any] = {
            "TableName": self.table_name,
            "KeyConditionExpression": condition,
            # Tombstones stay in the table until TTL removes them; reads never show them.
            "FilterExpression": "#deleted = :false",
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
            "ConsistentRead": True,
        }
        if start_after is not None:
            request["ExclusiveStartKey"] = {"pk": {"S": _pk(tenant)}, "sk": {"S": start_after}}
        found: list[ConfigItem] = []
        # One item more than asked tells whether there is a next page. Limit counts items
        # before the filter, so keep querying until enough live items turned up.
        while len(found) <= limit:
            request["Limit"] = limit + 1 - len(found)
            try:
                response = self._client.query(**request)
            except (BotoCoreError, ClientError) as e:
                raise translate(e, store=_STORE, operation="Query") from e
            found.extend(_config_item(item) for item in response.get("Items", []))
            last = response.get("LastEvaluatedKey")
            if not last:
                break
            request["ExclusiveStartKey"] = last
        if len(found) > limit:
            page = found[:limit]
            return ConfigPage(tuple(page), str(page[-1].key))
        return ConfigPage(tuple(found), None)


def _pk(tenant: str) -> str:
    return f"TENANT#{tenant}"


def _config_item(item: dict[str, Any]) -> ConfigItem:
    try:
        return ConfigItem(
            key=ConfigKey.parse(item["sk"]["S"]),
            value=orjson.loads(item["value"]["S"]),
            version=int(item["version"]["N"]),
            updated_at=datetime.fromisoformat(item["updated_at"]["S"]),
        )
    except (KeyError, ValueError, ProjectionError) as e:
        raise StoreError(f"malformed item in the config table: {item.get('sk')}", store=_STORE) from e
