"""The KCL consumer's checkpoints, and where a config server starts reading each shard from them.

A config server builds its state from a snapshot of the read models plus the stream. To miss
nothing it reads the consumer's checkpoints *before* the snapshot: the consumer checkpoints a
shard only after the read models hold everything up to that point, so the snapshot taken next
holds it too, and the server reads each shard from its checkpoint on. What it reads twice is
a no-op by version.

The lease table is the KCL application's (``consumers.daemon.APPLICATION_NAME``); one item per
shard, written by KCL 3's ``DynamoDBLeaseSerializer``::

    leaseKey                      S   the shard id (``<account>:<stream>:<epoch>:<shard id>`` when
                                      one application reads several streams)
    checkpoint                    S   a sequence number, or TRIM_HORIZON | LATEST | AT_TIMESTAMP |
                                      SHARD_END
    checkpointSubSequenceNumber   N   the user record within a KPL aggregate
    parentShardId                 SS  after a reshard
    childShardIds                 SS  set once the shard ended
    leaseOwner, leaseCounter, ownerSwitchesSinceCheckpoint, pendingCheckpoint, startingHashKey, …

``pendingCheckpoint`` (two-phase checkpoints) is not a promise that anything was applied and
is ignored. Where each shard starts (:func:`start_positions`):

========================================  ====================================================
the shard's lease                         the server reads
========================================  ====================================================
checkpoint = a sequence number            ``AT_SEQUENCE_NUMBER`` it (an aggregate is read whole
                                          again; its applied user records are no-ops)
checkpoint = SHARD_END                    nothing: every record of it is in the read models
checkpoint = TRIM_HORIZON / AT_TIMESTAMP  ``TRIM_HORIZON``: nothing consumed yet
checkpoint = LATEST                       ``TRIM_HORIZON`` too. Nothing was consumed yet, so the
                                          snapshot has nothing of this shard from the stream,
                                          and the consumer's first iterator opened at a point
                                          nobody recorded: starting at the server's own LATEST
                                          would lose what arrived between the two. Reading from
                                          the trim horizon re-reads older records (no-ops for
                                          keys the snapshot has), at worst also ones the
                                          consumer skipped by starting at LATEST.
no lease, shard open                      ``TRIM_HORIZON``: the consumer has not reached it
no lease, shard closed, a descendant      nothing: the KCL starts children only after their
started (checkpoint past TRIM_HORIZON)    parents reached SHARD_END, and deletes a finished
                                          parent's lease once its children started
no lease, shard closed, otherwise         ``TRIM_HORIZON``
========================================  ====================================================
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from botocore.exceptions import BotoCoreError, ClientError

from projections.stores.botocore_errors import error_code, translate

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

log = logging.getLogger(__name__)

_STORE = "dynamodb"


class CheckpointKind(enum.Enum):
    """What a lease's ``checkpoint`` holds: a sequence number or one of the KCL's sentinels."""

    SEQUENCE = "sequence"
    TRIM_HORIZON = "TRIM_HORIZON"
    LATEST = "LATEST"
    AT_TIMESTAMP = "AT_TIMESTAMP"
    SHARD_END = "SHARD_END"


_SENTINELS = {kind.value: kind for kind in CheckpointKind if kind is not CheckpointKind.SEQUENCE}


@dataclass(frozen=True, slots=True)
class ShardCheckpoint:
    """One shard's checkpoint as the consumer left it."""

    shard_id: str
    kind: CheckpointKind
    #: Set exactly when ``kind`` is ``SEQUENCE``.
    sequence_number: str | None = None
    sub_sequence_number: int = 0

    @property
    def started(self) -> bool:
        """The consumer applied records of this shard (and so finished its parents)."""
        return self.kind in (CheckpointKind.SEQUENCE, CheckpointKind.SHARD_END)


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """A shard as ``ListShards`` describes it."""

    shard_id: str
    parent_ids: tuple[str, ...] = ()
    #: The shard has an ending sequence number: it was split or merged and takes no more records.
    closed: bool = False

    @classmethod
    def from_listing(cls, shard: Mapping[str, Any]) -> ShardInfo:
        parents = tuple(p for p in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")) if p)
        closed = bool(shard.get("SequenceNumberRange", {}).get("EndingSequenceNumber"))
        return cls(shard_id=str(shard["ShardId"]), parent_ids=parents, closed=closed)


@dataclass(frozen=True, slots=True)
class StartAt:
    """Where to open a shard iterator: ``AT_SEQUENCE_NUMBER`` a checkpoint, or ``TRIM_HORIZON``."""

    iterator_type: Literal["AT_SEQUENCE_NUMBER", "TRIM_HORIZON"]
    sequence_number: str | None = None


TRIM_HORIZON = StartAt("TRIM_HORIZON")


def parse_lease(item: Mapping[str, Any], *, stream_name: str) -> ShardCheckpoint | None:
    """The checkpoint in one lease item; ``None`` for another stream's lease or one we cannot read.

    A lease we cannot read is logged: the shard then starts as if it had none, which reads
    more of it, never less.
    """
    key = item.get("leaseKey", {}).get("S")
    if not key:
        log.warning("lease item without a leaseKey: %s", sorted(item))
        return None
    if ":" in key:
        # Multi-stream applications key leases <account>:<stream>:<creation epoch>:<shard id>.
        parts = key.split(":")
        if len(parts) != 4 or parts[1] != stream_name:
            return None
        key = parts[3]
    text = item.get("checkpoint", {}).get("S")
    if not text:
        log.warning("lease of %s has no checkpoint; reading the shard as if it had no lease", key)
        return None
    kind = _SENTINELS.get(text)
    if kind is not None:
        return ShardCheckpoint(key, kind)
    if not text.isdigit():
        log.warning("lease of %s has an unknown checkpoint %r; reading the shard as if it had no lease", key, text)
        return None
    try:
        sub = int(item.get("checkpointSubSequenceNumber", {}).get("N", "0"))
    except ValueError:
        sub = 0
    return ShardCheckpoint(key, CheckpointKind.SEQUENCE, text, sub)


def read_checkpoints(client: DynamoDBClient, table: str, *, stream_name: str) -> dict[str, ShardCheckpoint]:
    """Every shard's checkpoint in the lease table ``table`` (strongly consistent), by shard id.

    No table at all means the consumer never ran: no shard has a checkpoint. Other failures
    raise :class:`~projections.errors.StoreError` (translated once, by code).
    """
    request: dict[str, Any] = {"TableName": table, "ConsistentRead": True}
    found: dict[str, ShardCheckpoint] = {}
    while True:
        try:
            response = client.scan(**request)
        except ClientError as e:
            if error_code(e) == "ResourceNotFoundException" and not found:
                log.info("no lease table %s: the consumer has not run, every shard starts at its trim horizon", table)
                return {}
            raise translate(e, store=_STORE, operation="Scan(leases)") from e
        except BotoCoreError as e:
            raise translate(e, store=_STORE, operation="Scan(leases)") from e
        for item in response.get("Items", []):
            checkpoint = parse_lease(item, stream_name=stream_name)
            if checkpoint is not None:
                found[checkpoint.shard_id] = checkpoint
        last = response.get("LastEvaluatedKey")
        if not last:
            return found
        request["ExclusiveStartKey"] = last


def start_positions(
    shards: Sequence[ShardInfo], checkpoints: Mapping[str, ShardCheckpoint]
) -> dict[str, StartAt | None]:
    """Where to start each listed shard; ``None`` for a shard the read models hold in full.

    The rules are in this module's docstring. A shard's children may only be read once its
    own records are (the reader's job, as in the KCL); this only picks the start of each.
    """
    children: dict[str, list[str]] = {}
    for shard in shards:
        for parent in shard.parent_ids:
            children.setdefault(parent, []).append(shard.shard_id)
    closed = {shard.shard_id for shard in shards if shard.closed}
    memo: dict[str, bool] = {}

    def started(shard_id: str) -> bool:
        """The consumer got past this shard's start: it, or a descendant, holds a real checkpoint."""
        if shard_id not in memo:
            memo[shard_id] = False  # resharding forms no cycles; this guards against bad input
            checkpoint = checkpoints.get(shard_id)
            if checkpoint is not None:
                memo[shard_id] = checkpoint.started
            elif shard_id in closed:
                memo[shard_id] = any(started(child) for child in children.get(shard_id, ()))
        return memo[shard_id]

    positions: dict[str, StartAt | None] = {}
    for shard in shards:
        checkpoint = checkpoints.get(shard.shard_id)
        if checkpoint is None:
            positions[shard.shard_id] = None if shard.closed and started(shard.shard_id) else TRIM_HORIZON
        elif checkpoint.kind is CheckpointKind.SHARD_END:
            positions[shard.shard_id] = None
        elif checkpoint.kind is CheckpointKind.SEQUENCE:
            positions[shard.shard_id] = StartAt("AT_SEQUENCE_NUMBER", checkpoint.sequence_number)
        else:
            positions[shard.shard_id] = TRIM_HORIZON
    return positions


def shard_infos(listing: Iterable[Mapping[str, Any]]) -> list[ShardInfo]:
    """``ListShards`` entries as :class:`ShardInfo`, in the order given."""
    return [ShardInfo.from_listing(shard) for shard in listing]
