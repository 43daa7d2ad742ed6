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

Every write is conditional on ``attribute_not_exists(pk) OR version < :v``: an older or
repeated change fails the condition and is reported ``STALE`` without touching the item, so
the model never goes backwards whatever order Kinesis (or a replay) delivers in.
``BatchWriteItem`` takes no conditions, so it is used only to fill a fresh table (a replay).
A batch of ``transact_min`` or more changes goes out as ``TransactWriteItems`` of up to 100
conditional puts each: one request and, on DynamoDB Local, one storage transaction instead of
a hundred (measured in ``bench.projections``: many times the conditional ``PutItem`` rate).
The transaction is all or nothing, so when DynamoDB cancels it, its per-item
``CancellationReasons`` say which puts failed their condition (``STALE``); the others are sent
again without them, and any other reason sends that item down the one-by-one ``PutItem`` path,
which reports its own error. On real DynamoDB a transactional write costs two write units:
``transact_min=0`` keeps every change a plain ``PutItem``.

A delete leaves a tombstone with the delete's version, so a late older ``set`` fails the same
condition. Tombstones expire through TTL after ``tombstone_ttl`` (default 7 days); that must
exceed how late a change can arrive (Kinesis retention), otherwise an expired tombstone lets a
very late ``set`` resurrect the key. Replays apply in version order and are unaffected.

Table aliases (zero-downtime rebuilds)
--------------------------------------
``table_name`` is a *logical* name. The physical table it points to is looked up in the
small ``tagbus-aliases`` table (partition key ``alias`` = the logical name, attribute
``table``); with no alias item, or no alias table at all, the logical name is the table.
A replay rebuilds into a fresh ``<logical>-<generation>`` table and then switches the alias
with one conditional ``PutItem`` (:meth:`TableAlias.switch`), which every reader and writer
picks up within ``alias_ttl`` seconds (the resolution is cached that long, timed from before
the lookup was sent, so a cached answer is never older than ``alias_ttl``). The writer that
rebuilt the table waits out that TTL before it re-applies the events committed meanwhile
(see :mod:`projections.replay`). A table that vanished under a stale resolution (the old
generation after its grace period) makes the store look the alias up again and retry once.

An aliased store is :class:`~projections.stores.base.Rebuildable`: its
:class:`DynamoDBGeneration` is the fresh table (created by :meth:`DynamoDBConfigStore.new_generation`),
filled with ``bulk_put``, switched to through the alias, and the old table dropped after it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from kernel.retry import Backoff, Jitter
from projections.errors import ChangeRejected, ProjectionError, StoreError, StoreMisconfigured
from projections.model import ConfigChange, ConfigItem, ConfigKey
from projections.stores.base import ApplyResult, ChangeResult, ConfigPage, GenerationSwitch, Outcome
from projections.stores.botocore_errors import error_code, translate

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_dynamodb.type_defs import AttributeValueTypeDef

DEFAULT_TABLE = "tagbus-tenantconfig"
DEFAULT_ALIAS_TABLE = "tagbus-aliases"
#: Seconds a resolved alias is trusted; a switch reaches every process within this time.
ALIAS_TTL = 2.0
TTL_ATTRIBUTE = "expires_at"
#: BatchWriteItem takes at most 25 put or delete requests.
BATCH_WRITE_MAX = 25
#: TransactWriteItems takes at most 100 actions.
TRANSACT_MAX = 100
#: Batches at least this large are written as transactions by default.
TRANSACT_MIN = 4
_CONDITION = "attribute_not_exists(#pk) OR #version < :version"
_CONDITION_NAMES = {"#pk": "pk", "#version": "version"}
_STORE = "dynamodb"

T = TypeVar("T")

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class AliasTarget:
    """Where a logical table name points: the physical table and its generation (0: itself)."""

    alias: str
    table: str
    generation: int


class AliasConflict(StoreError):
    """The alias no longer points where the switch expected (another replay switched it)."""


class TableAlias:
    """The physical table behind a logical name, read from (and switched in) the alias table.

    Item layout of ``tagbus-aliases``: ``alias`` (S, partition key), ``table`` (S),
    ``generation`` (N), ``previous`` (S), ``switched_at`` (S).
    """

    def __init__(
        self,
        client: DynamoDBClient,
        alias: str,
        *,
        table_name: str = DEFAULT_ALIAS_TABLE,
        ttl: float = ALIAS_TTL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.alias = alias
        self.table_name = table_name
        self.ttl = ttl
        self._monotonic = monotonic
        # (target, expires at): replaced as a whole, so readers in other threads see either.
        self._cached: tuple[AliasTarget, float] | None = None
        self._lock = threading.Lock()

    def ensure_table(self, *, wait: bool = True) -> None:
        """Create the alias table (on-demand) if it does not exist yet."""
        _ensure(self._client, self.table_name, [("alias", "HASH")], wait=wait)

    def resolve(self) -> str:
        """The physical table name, cached for ``ttl`` seconds."""
        cached = self._cached
        if cached is not None and self._monotonic() < cached[1]:
            return cached[0].table
        with self._lock:
            cached = self._cached
            if cached is not None and self._monotonic() < cached[1]:
                return cached[0].table
            # Timed from before the request: a cached answer is never older than ttl.
            started = self._monotonic()
            target = self.read()
            self._cached = (target, started + self.ttl)
            return target.table

    def invalidate(self) -> None:
        self._cached = None

    def read(self) -> AliasTarget:
        """The alias's current target, read strongly consistently (no cache)."""
        try:
            response = self._client.get_item(
                TableName=self.table_name, Key={"alias": {"S": self.alias}}, ConsistentRead=True
            )
        except ClientError as e:
            if error_code(e) == "ResourceNotFoundException":
                return AliasTarget(self.alias, self.alias, 0)  # no alias table: nothing was ever switched
            raise translate(e, store=_STORE, operation="GetItem(alias)") from e
        except BotoCoreError as e:
            raise translate(e, store=_STORE, operation="GetItem(alias)") from e
        item = response.get("Item")
        if item is None:
            return AliasTarget(self.alias, self.alias, 0)
        return AliasTarget(self.alias, item["table"]["S"], int(item["generation"]["N"]))

    def switch(self, expected: AliasTarget, table: str, generation: int) -> AliasTarget:
        """Point the alias at ``table`` atomically, if it still points at ``expected``.

        Raises :class:`AliasConflict` when someone else switched it in between.
        """
        # DynamoDB refuses names the condition does not use, so #alias only goes with the first.
        names = {"#table": "table", "#generation": "generation"}
        if expected.generation == 0:
            condition = "attribute_not_exists(#alias) OR (#table = :expected AND #generation = :zero)"
            values: dict[str, AttributeValueTypeDef] = {":expected": {"S": expected.table}, ":zero": {"N": "0"}}
            names["#alias"] = "alias"
        else:
            condition = "#table = :expected AND #generation = :generation"
            values = {":expected": {"S": expected.table}, ":generation": {"N": str(expected.generation)}}
        try:
            self._client.put_item(
                TableName=self.table_name,
                Item={
                    "alias": {"S": self.alias},
                    "table": {"S": table},
                    "generation": {"N": str(generation)},
                    "previous": {"S": expected.table},
                    "switched_at": {"S": datetime.now(UTC).isoformat()},
                },
                ConditionExpression=condition,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                raise AliasConflict(
                    f"alias {self.alias!r} no longer points at {expected.table!r}", store=_STORE, operation="PutItem"
                ) from e
            raise translate(e, store=_STORE, operation="PutItem(alias)") from e
        except BotoCoreError as e:
            raise translate(e, store=_STORE, operation="PutItem(alias)") from e
        self.invalidate()
        return AliasTarget(self.alias, table, generation)


class DynamoDBGeneration:
    """The fresh table a rebuild fills before the alias points at it (a :class:`~projections.stores.base.Generation`).

    Named ``<logical>-<generation>``; made by :meth:`DynamoDBConfigStore.new_generation`.
    """

    def __init__(
        self, store: DynamoDBConfigStore, alias: TableAlias, expected: AliasTarget, table: str, generation: int
    ) -> None:
        self._store = store
        self._alias = alias
        #: Where the alias pointed when this generation was made: the switch is conditional on it.
        self._expected = expected
        self.table = table
        self.generation = generation
        self._writer = store.bound_to(table)
        self._switched = False

    @property
    def writer(self) -> DynamoDBConfigStore:
        return self._writer

    @property
    def request_size(self) -> int:
        return self._store.bulk_request_size

    @property
    def settle_seconds(self) -> float:
        # Every process caches the alias for its TTL; twice that, and a margin for requests
        # sent just before their cache expired, covers readers and writers alike.
        return 2 * self._alias.ttl + 0.5

    def bulk_put(self, changes: Sequence[ConfigChange]) -> int:
        return self._store.bulk_put(changes, table=self.table)

    def switch(self) -> GenerationSwitch:
        """Point the alias at this table; :class:`AliasConflict` if another replay switched it first."""
        self._alias.switch(self._expected, self.table, self.generation)
        self._switched = True
        return GenerationSwitch(self._alias.alias, self._expected.table, self.table, self.generation)

    def discard(self) -> None:
        if self._switched:
            raise StoreError(f"{self.table} is the current table of {self._alias.alias!r}", store=_STORE)
        _delete_table(self._store._client, self.table)

    def drop_previous(self) -> None:
        if not self._switched:
            raise StoreError(f"{self.table} was not switched to: the previous table is current", store=_STORE)
        _delete_table(self._store._client, self._expected.table)


class _FixedTable:
    """A "resolution" that always names the same table (no alias lookups)."""

    def __init__(self, table: str) -> None:
        self.table = table

    def resolve(self) -> str:
        return self.table

    def invalidate(self) -> None:
        pass


class DynamoDBConfigStore:
    """Config keys in a DynamoDB table, written with version-conditional puts.

    ``table_name`` is the logical name, resolved through the alias table ``alias_table``
    (``None``: the logical name is the table, no lookups).
    """

    def __init__(
        self,
        client: DynamoDBClient,
        *,
        table_name: str = DEFAULT_TABLE,
        tombstone_ttl: timedelta | None = timedelta(days=7),
        clock: Callable[[], datetime] = _utcnow,
        alias_table: str | None = DEFAULT_ALIAS_TABLE,
        alias_ttl: float = ALIAS_TTL,
        write_concurrency: int = 8,
        transact_min: int = TRANSACT_MIN,
        bulk_write: Literal["transact", "batch"] = "transact",
    ) -> None:
        self._client = client
        self._transact_min = transact_min
        self._bulk_write = bulk_write
        self.table_name = table_name
        # Conditional puts of different keys are independent, and each one refuses to move its
        # key backwards whatever the order they land in, so a batch is written concurrently.
        self._writers = ThreadPoolExecutor(write_concurrency, thread_name_prefix="dynamodb-put")
        self._tombstone_ttl = tombstone_ttl
        self._clock = clock
        self.alias: TableAlias | None = (
            TableAlias(client, table_name, table_name=alias_table, ttl=alias_ttl) if alias_table else None
        )
        self._resolver: TableAlias | _FixedTable = self.alias or _FixedTable(table_name)

    @property
    def bulk_request_size(self) -> int:
        """Items one :meth:`bulk_put` request takes (``bulk_write`` picks the request)."""
        return TRANSACT_MAX if self._bulk_write == "transact" else BATCH_WRITE_MAX

    def current_table(self) -> str:
        """The physical table the logical name points to now (cached for the alias TTL)."""
        return self._resolver.resolve()

    def _on_table(self, call: Callable[[str], T]) -> T:
        """Run ``call(table)`` on the current table; after a vanished table, re-resolve and retry once."""
        table = self._resolver.resolve()
        try:
            return call(table)
        except ClientError as e:
            if error_code(e) != "ResourceNotFoundException" or self.alias is None:
                raise
            self._resolver.invalidate()
            fresh = self._resolver.resolve()
            if fresh == table:
                raise
        return call(fresh)

    # -- setup -------------------------------------------------------------------------

    def ensure_table(self, *, wait: bool = True, table: str | None = None) -> None:
        """Create the current table (or ``table``), on-demand with TTL on ``expires_at``, if missing."""
        name = table or self.current_table()
        _ensure(self._client, name, [("pk", "HASH"), ("sk", "RANGE")], wait=wait)
        try:
            ttl = self._client.describe_time_to_live(TableName=name)
            status = ttl.get("TimeToLiveDescription", {}).get("TimeToLiveStatus")
            if status not in ("ENABLED", "ENABLING"):
                self._client.update_time_to_live(
                    TableName=name,
                    TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
                )
        except (BotoCoreError, ClientError) as e:
            raise translate(e, store=_STORE, operation="ensure_table") from e

    def bound_to(self, table: str) -> DynamoDBConfigStore:
        """The same store writing to one physical table, with no alias lookups (for a rebuild)."""
        return DynamoDBConfigStore(
            self._client,
            table_name=table,
            tombstone_ttl=self._tombstone_ttl,
            clock=self._clock,
            alias_table=None,
            transact_min=self._transact_min,
            bulk_write=self._bulk_write,
        )

    # -- rebuilds (the Rebuildable port) -----------------------------------------------

    @property
    def can_rebuild(self) -> bool:
        """Only an aliased table can be rebuilt: its readers and writers must follow a switch."""
        return self.alias is not None

    def new_generation(self) -> DynamoDBGeneration:
        """Create an empty ``<logical>-<generation>`` table beside the current one (the alias is untouched)."""
        if self.alias is None:
            raise StoreMisconfigured(f"{self.table_name} has no alias table: it cannot be rebuilt", store=_STORE)
        self.alias.ensure_table()
        expected = self.alias.read()
        generation = expected.generation + 1
        # A table of a crashed or concurrent replay may hold the next name: take a free one
        # (two replays that race still cannot both switch: the switch is conditional).
        while _table_exists(self._client, f"{self.table_name}-{generation}"):
            generation += 1
        fresh = DynamoDBGeneration(self, self.alias, expected, f"{self.table_name}-{generation}", generation)
        try:
            self.ensure_table(table=fresh.table)
        except BaseException:
            with contextlib.suppress(StoreError):
                fresh.discard()
            raise
        return fresh

    # -- writes ------------------------------------------------------------------------

    def apply(self, changes: Sequence[ConfigChange]) -> ApplyResult:
        if len(changes) == 1:
            return ApplyResult((self._apply_one(changes[0]),))
        if not self._transact_min or len(changes) < self._transact_min:
            return ApplyResult(tuple(self._writers.map(self._apply_one, changes)))
        results: dict[int, ChangeResult] = {}
        # A transaction may touch an item once: the n-th change of a key goes in round n.
        for round_ in _rounds(changes):
            chunks = [round_[i : i + TRANSACT_MAX] for i in range(0, len(round_), TRANSACT_MAX)]
            for chunk_results in self._writers.map(self._apply_transaction, chunks):
                results.update(chunk_results)
        return ApplyResult(tuple(results[i] for i in range(len(changes))))

    def _apply_transaction(self, indexed: list[tuple[int, ConfigChange]]) -> dict[int, ChangeResult]:
        """Conditional puts of distinct keys in ``TransactWriteItems``; one result per index."""
        results: dict[int, ChangeResult] = {}
        pending: list[tuple[int, ConfigChange, dict[str, AttributeValueTypeDef]]] = []
        for index, change in indexed:
            try:
                pending.append((index, change, self._item(change)))
            except (TypeError, ValueError):
                results[index] = self._apply_one(change)  # reports the serialization error
        one_by_one: list[tuple[int, ConfigChange]] = []
        while pending:
            try:
                self._on_table(functools.partial(self._transact, items=[item for _, _, item in pending]))
            except ClientError as e:
                reasons = (
                    e.response.get("CancellationReasons") if error_code(e) == "TransactionCanceledException" else None
                )
                if not reasons or len(reasons) != len(pending):
                    one_by_one += [(index, change) for index, change, _ in pending]
                    break
                retry = []
                for (index, change, item), reason in zip(pending, reasons, strict=True):
                    code = reason.get("Code", "None")
                    if code == "ConditionalCheckFailed":
                        results[index] = ChangeResult(change, Outcome.STALE)
                    elif code == "None":
                        retry.append((index, change, item))
                    else:
                        one_by_one.append((index, change))
                pending = retry
            except (BotoCoreError, StoreError):
                one_by_one += [(index, change) for index, change, _ in pending]
                break
            else:
                results.update((index, ChangeResult(change, Outcome.APPLIED)) for index, change, _ in pending)
                break
        for index, change in one_by_one:
            results[index] = self._apply_one(change)
        return results

    def _transact(self, table: str, items: list[dict[str, AttributeValueTypeDef]]) -> None:
        self._client.transact_write_items(
            TransactItems=[
                {
                    "Put": {
                        "TableName": table,
                        "Item": item,
                        "ConditionExpression": _CONDITION,
                        "ExpressionAttributeNames": _CONDITION_NAMES,
                        "ExpressionAttributeValues": {":version": item["version"]},
                    }
                }
                for item in items
            ]
        )

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
            self._on_table(
                lambda table: self._client.put_item(
                    TableName=table,
                    Item=item,
                    ConditionExpression=_CONDITION,
                    ExpressionAttributeNames=_CONDITION_NAMES,
                    ExpressionAttributeValues={":version": {"N": str(change.version)}},
                ),
            )
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                return ChangeResult(change, Outcome.STALE)
            return ChangeResult(change, Outcome.FAILED, translate(e, store=_STORE, operation="PutItem"))
        except BotoCoreError as e:
            return ChangeResult(change, Outcome.FAILED, translate(e, store=_STORE, operation="PutItem"))
        except StoreError as e:  # the alias lookup failed
            return ChangeResult(change, Outcome.FAILED, e)
        return ChangeResult(change, Outcome.APPLIED)

    def bulk_put(
        self,
        changes: Sequence[ConfigChange],
        *,
        table: str,
        max_attempts: int = 10,
        base_delay: float = 0.05,
        max_delay: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> int:
        """Put final states into ``table`` unconditionally; returns how many items were written.

        Only safe into a table nobody else writes yet (a replay's fresh generation): there is
        no version condition. Changes must have distinct keys. ``bulk_write`` picks the
        request: ``"transact"`` (default) sends ``TransactWriteItems`` of 100 puts, which
        DynamoDB Local commits as one storage transaction (many times the items/s of
        ``BatchWriteItem`` there, see ``docs/read-models.md``; on real DynamoDB it costs two
        write units an item); ``"batch"`` sends ``BatchWriteItem`` of 25, half the write
        units, with ``UnprocessedItems`` sent again. Throttling backs off exponentially.
        Raises :class:`ChangeRejected` for a value that cannot be stored and
        :class:`StoreError` when the table keeps refusing.
        """
        items: list[dict[str, AttributeValueTypeDef]] = []
        operation = "TransactWriteItems" if self._bulk_write == "transact" else "BatchWriteItem"
        for change in changes:
            try:
                items.append(self._item(change))
            except (TypeError, ValueError) as e:
                raise ChangeRejected(
                    f"value of {change.key} is not serializable: {e}", store=_STORE, operation=operation
                ) from e
        backoff = Backoff(base_delay, max_delay, Jitter.EQUAL)
        size = self.bulk_request_size
        for start in range(0, len(items), size):
            pending = items[start : start + size]
            attempt = 0
            while pending:
                attempt += 1
                try:
                    pending = self._bulk_request(table, pending)
                except (BotoCoreError, ClientError) as e:
                    error = translate(e, store=_STORE, operation=operation)
                    if not error.retryable or attempt >= max_attempts:
                        raise error from e
                else:
                    if not pending:
                        break
                    if attempt >= max_attempts:
                        raise StoreError(
                            f"{len(pending)} item(s) still unprocessed after {attempt} {operation} attempts",
                            store=_STORE,
                            operation=operation,
                        )
                sleep(backoff.delay(attempt))
        return len(items)

    def _bulk_request(
        self, table: str, items: list[dict[str, AttributeValueTypeDef]]
    ) -> list[dict[str, AttributeValueTypeDef]]:
        """One bulk request; returns the items still to send (BatchWriteItem's unprocessed)."""
        if self._bulk_write == "transact":
            self._client.transact_write_items(TransactItems=[{"Put": {"TableName": table, "Item": i}} for i in items])
            return []
        response = self._client.batch_write_item(RequestItems={table: [{"PutRequest": {"Item": i}} for i in items]})
        unprocessed = response.get("UnprocessedItems", {}).get(table, [])
        return [r["PutRequest"]["Item"] for r in unprocessed]

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
            response = self._on_table(
                lambda table: self._client.get_item(
                    TableName=table,
                    Key={"pk": {"S": _pk(tenant)}, "sk": {"S": str(key)}},
                    ConsistentRead=True,
                ),
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
            "TableName": self.current_table(),
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

    def scan(self) -> Iterator[ConfigChange]:
        """Every item of the table the alias points to now, tombstones included (a paginated ``Scan``).

        The table is resolved once, when the scan starts: a scan that outlives an alias switch
        finishes on the generation it began with, whose keys were all current when it began.
        """
        request: dict[str, Any] = {"TableName": self.current_table(), "ConsistentRead": True}
        while True:
            try:
                response = self._client.scan(**request)
            except (BotoCoreError, ClientError) as e:
                raise translate(e, store=_STORE, operation="Scan") from e
            for item in response.get("Items", []):
                change = _scanned_change(item)
                if change is not None:
                    yield change
            last = response.get("LastEvaluatedKey")
            if not last:
                return
            request["ExclusiveStartKey"] = last


def _ensure(
    client: DynamoDBClient, name: str, keys: Sequence[tuple[str, Literal["HASH", "RANGE"]]], *, wait: bool
) -> None:
    """Create an on-demand table with string keys ``keys`` (name, HASH|RANGE) unless it exists."""
    try:
        try:
            client.describe_table(TableName=name)
            return
        except ClientError as e:
            if error_code(e) != "ResourceNotFoundException":
                raise
        try:
            client.create_table(
                TableName=name,
                AttributeDefinitions=[{"AttributeName": k, "AttributeType": "S"} for k, _ in keys],
                KeySchema=[{"AttributeName": k, "KeyType": kind} for k, kind in keys],
                BillingMode="PAY_PER_REQUEST",
            )
        except ClientError as e:
            # Another process created it first.
            if error_code(e) != "ResourceInUseException":
                raise
        if wait:
            client.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    except (BotoCoreError, ClientError) as e:
        raise translate(e, store=_STORE, operation="ensure_table") from e


def _table_exists(client: DynamoDBClient, name: str) -> bool:
    try:
        client.describe_table(TableName=name)
    except ClientError as e:
        if error_code(e) == "ResourceNotFoundException":
            return False
        raise translate(e, store=_STORE, operation="DescribeTable") from e
    except BotoCoreError as e:
        raise translate(e, store=_STORE, operation="DescribeTable") from e
    return True


def _delete_table(client: DynamoDBClient, name: str) -> None:
    """Delete a table; one already gone is fine."""
    try:
        client.delete_table(TableName=name)
    except ClientError as e:
        if error_code(e) != "ResourceNotFoundException":
            raise translate(e, store=_STORE, operation="DeleteTable") from e
    except BotoCoreError as e:
        raise translate(e, store=_STORE, operation="DeleteTable") from e


def _rounds(changes: Sequence[ConfigChange]) -> list[list[tuple[int, ConfigChange]]]:
    """``(index, change)`` pairs split so that no round holds two changes of one key."""
    rounds: list[list[tuple[int, ConfigChange]]] = []
    seen: dict[tuple[str, str], int] = {}
    for index, change in enumerate(changes):
        slot = (change.tenant, str(change.key))
        n = seen.get(slot, 0)
        seen[slot] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append((index, change))
    return rounds


_PK_PREFIX = "TENANT#"


def _pk(tenant: str) -> str:
    return f"{_PK_PREFIX}{tenant}"


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


def _scanned_change(item: dict[str, Any]) -> ConfigChange | None:
    """The change an item holds, tombstones included; ``None`` (logged) for an item we cannot read."""
    try:
        pk = item["pk"]["S"]
        if not pk.startswith(_PK_PREFIX):
            raise ValueError(f"partition key {pk!r} is not {_PK_PREFIX}<tenant>")
        deleted = bool(item.get("deleted", {}).get("BOOL", False))
        return ConfigChange(
            tenant=pk[len(_PK_PREFIX) :],
            key=ConfigKey.parse(item["sk"]["S"]),
            value=None if deleted else orjson.loads(item["value"]["S"]),
            version=int(item["version"]["N"]),
            position=int(item.get("position", {}).get("N", "0")),
            updated_at=datetime.fromisoformat(item["updated_at"]["S"]),
            deleted=deleted,
        )
    except (KeyError, ValueError, ProjectionError) as e:
        pk, sk = item.get("pk", {}).get("S"), item.get("sk", {}).get("S")
        log.warning("config table item %s / %s is not one tagbus wrote: %s: %s", pk, sk, type(e).__name__, e)
        return None
