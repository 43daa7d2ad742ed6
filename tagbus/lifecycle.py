"""Bringing the local stack up in the right order: infrastructure, schema, read-model tables, apps."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import psycopg
from alembic import command
from alembic.config import Config

from event_bus import partitions
from tagbus import aws, generations, stack, stack_lock
from tagbus.settings import REPO, Settings, load
from tailer import SlotReader


def migrate(settings: Settings, revision: str = "head") -> bool:
    """Apply the migrations, make the partitions of events ahead, and make sure the tailer's
    slot exists; ``True`` if the slot was new.

    The slot must exist before the bus accepts writes: events committed before its creation
    would never be decoded. Partitions are made here too, so a bus that cannot create
    them (a role that does not own the table) still starts with months ahead.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(REPO / "migrations"))
    cfg.set_main_option("sqlalchemy.url", settings.sqlalchemy_url().replace("%", "%%"))
    command.upgrade(cfg, revision)
    with psycopg.connect(settings.database_url, autocommit=True, connect_timeout=10) as conn:
        if partitions.events_partitioned(conn):  # not at revisions before 0003
            partitions.ensure_partitions(conn)
    tailer = settings.tailer()
    reader = SlotReader(settings.database_url, tailer.slot_name, tailer.publication)
    try:
        return reader.ensure_slot()
    finally:
        reader.close()


def ensure_read_models(settings: Settings) -> None:
    """Create the DynamoDB tables of the read model and the dead letters if missing."""
    from consumers.deadletters import DynamoDBDeadLetterSink
    from projections.stores.dynamodb import DynamoDBConfigStore

    dynamodb = aws.client(settings, "dynamodb")
    try:
        DynamoDBConfigStore(dynamodb).ensure_table()
        DynamoDBDeadLetterSink(dynamodb).ensure_table()
    finally:
        dynamodb.close()


def _forget_checkpoints_of_reset_streams(cfg: stack.StackConfig, settings: Settings) -> None:
    """After kinesis-mock started with empty streams, drop the KCL's lease tables.

    Their checkpoints name sequence numbers of the lost stream, which the new one refuses;
    without them the consumer starts over at the new stream's horizon.
    """
    mark = cfg.state / "kinesis-data" / stack.KINESIS_RESET_MARK
    if not mark.exists() or stack.status(cfg)["consumer"].running:
        return
    generations.forget_checkpoints(settings)
    mark.unlink()


def up(config: stack.StackConfig | None = None, parts: Sequence[str] | None = None) -> dict[str, stack.PartStatus]:
    """Start what is not running; schema and tables are brought up to date before the apps start.

    When kinesis-mock was found dead (it saves only every few minutes), the stream is renewed
    and what it may have lost is republished before the apps start
    (:func:`tagbus.generations.repair_after_crash`).
    """
    cfg = config or stack.StackConfig.from_env()
    wanted = list(parts or stack.ALL_PARTS)
    with stack_lock.held(cfg.run_dir):
        stack.up(cfg, [p for p in stack.INFRA_PARTS if p in wanted])
        apps = [p for p in stack.APP_PARTS if p in wanted]
        repair = generations.crash_mark(cfg).exists() and stack.status(cfg)["kinesis"].running
        if apps or repair:
            settings = load(home=cfg.state)
            migrate(settings)
            ensure_read_models(settings)
            if repair:
                generations.repair_after_crash(cfg, settings, progress=_say)
            if "consumer" in apps:
                _forget_checkpoints_of_reset_streams(cfg, settings)
            stack.up(cfg, apps)
        return stack.status(cfg)


def _say(message: str) -> None:
    print(f"tagbus: {message}", file=sys.stderr)
