"""The ``tagbus`` command line: run the parts, manage the local stack, post and read events.

Every command exits 0 on success and otherwise prints one line of error and exits non-zero.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import httpx
import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tagbus import settings as settings_mod
from tagbus.settings import Settings, SettingsError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="tagbus: an event pipeline for multi-tenant config.")
config_app = typer.Typer(no_args_is_help=True, help="Read config keys from their read models, or watch them live.")
app.add_typer(config_app, name="config")

out = Console(width=None if sys.stdout.isatty() else 132)
err = Console(stderr=True, soft_wrap=True)

REPO = Path(__file__).resolve().parents[1]


class CliError(Exception):
    """A failure to report as one line."""


def _settings() -> Settings:
    try:
        return settings_mod.load()
    except SettingsError as e:
        raise CliError(str(e)) from e


def _secret(s: Settings) -> str:
    if not s.auth.jwt_secret:
        raise CliError("no TAGBUS_JWT_SECRET: run `tagbus up` (it writes .tagbus/env) or set it")
    return s.auth.jwt_secret


def _dev_token(
    s: Settings, tenant: str, tier: str = "enterprise", scope: str = "events:write events:read config:read"
) -> str:
    from kernel.auth import issue_dev_token

    return issue_dev_token(
        _secret(s),
        tenant=tenant,
        tier=tier,
        scope=scope,
        issuer=s.auth.issuer,
        audience=s.auth.audience,
        now=time.time(),
    )


def _http(s: Settings, token: str) -> httpx.Client:
    return httpx.Client(base_url=s.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=10.0)


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            problem = response.json()
            detail = problem.get("detail") or problem.get("title")
            errors = "; ".join(f"{e['field']}: {e['message']}" for e in problem.get("errors", []))
        except ValueError:
            detail, errors = response.text[:200], ""
        raise CliError(f"HTTP {response.status_code}: {detail}" + (f" ({errors})" if errors else ""))
    return response.json()


@app.command()
def token(
    tenant: Annotated[str, typer.Option(help="The tenant the token is for.")],
    tier: Annotated[str, typer.Option(help="basic | premium | enterprise")] = "basic",
    scope: Annotated[str, typer.Option(help="Space-separated scopes.")] = "events:write events:read config:read",
    subject: Annotated[str, typer.Option(help="The caller's `sub`.")] = "dev",
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 3600,
) -> None:
    """Print a development HS256 token (and nothing else) on stdout."""
    from kernel.auth import TIERS, issue_dev_token

    if tier not in TIERS:
        raise CliError(f"--tier must be one of {', '.join(TIERS)}")
    s = _settings()
    print(
        issue_dev_token(
            _secret(s),
            tenant=tenant,
            subject=subject,
            tier=tier,
            scope=scope,
            ttl_seconds=ttl,
            issuer=s.auth.issuer,
            audience=s.auth.audience,
            now=time.time(),
        )
    )


@app.command()
def post(
    tenant: Annotated[str, typer.Option(help="Tenant to post as (a dev token is made for it).")],
    type: Annotated[str, typer.Option("--type", help="Event type.")] = "config.set",
    key: Annotated[str | None, typer.Option(help="Config key, for config.set / config.deleted.")] = None,
    value: Annotated[str | None, typer.Option(help="Config value as JSON, for config.set.")] = None,
    data: Annotated[str | None, typer.Option(help="Event data as JSON (other types).")] = None,
    source: Annotated[str, typer.Option(help="CloudEvents source.")] = "/tagbus/cli",
    event_id: Annotated[str | None, typer.Option("--id", help="Event id (default: a new UUID).")] = None,
    stream: Annotated[str | None, typer.Option(help="Stream id (default: subject, key or id).")] = None,
) -> None:
    """Post one event through the bus and print where it was stored."""
    s = _settings()
    event: dict[str, Any] = {"specversion": "1.0", "id": event_id or str(uuid.uuid4()), "source": source, "type": type}
    if key is not None:
        payload: dict[str, Any] = {"key": key}
        if value is not None:
            payload["value"] = _json_arg("--value", value)
        event["data"] = payload
    elif data is not None:
        event["data"] = _json_arg("--data", data)
    if stream:
        event["streamid"] = stream
    with _http(s, _dev_token(s, tenant)) as client:
        result = _check(
            client.post("/v1/events", content=orjson.dumps(event), headers={"Content-Type": "application/json"})
        )
    out.print_json(orjson.dumps(result).decode())


def _json_arg(name: str, text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise CliError(f"{name} is not JSON: {e}") from e


@config_app.command("get")
def config_get(
    key: Annotated[str, typer.Argument(help="<tag>:<path>")],
    tenant: Annotated[str, typer.Option(help="Tenant to read as.")],
) -> None:
    """Print a config key's current value."""
    s = _settings()
    with _http(s, _dev_token(s, tenant, scope="config:read")) as client:
        item = _check(client.get(f"/v1/config/{key}"))
    out.print_json(orjson.dumps(item).decode())


@config_app.command("list")
def config_list(
    tenant: Annotated[str, typer.Option(help="Tenant to read as.")],
    prefix: Annotated[str, typer.Option(help="Key prefix, e.g. tenantconfig:")] = "",
) -> None:
    """List config keys under a prefix as a table."""
    s = _settings()
    with _http(s, _dev_token(s, tenant, scope="config:read")) as client:
        page = _check(client.get("/v1/config", params={"prefix": prefix}))
    table = Table("key", "value", "version", "updated_at", title=f"{tenant} {prefix}")
    for item in page["items"]:
        table.add_row(item["key"], orjson.dumps(item["value"]).decode(), str(item["version"]), str(item["updated_at"]))
    out.print(table)


@config_app.command("watch")
def config_watch(
    tenant: Annotated[str, typer.Option(help="Tenant to watch as (a dev token is made for it).")],
    prefix: Annotated[
        list[str] | None, typer.Option(help="Key prefix, e.g. tenantconfig:features/ (repeatable; default: all).")
    ] = None,
    since: Annotated[
        int | None, typer.Option(help="Also print the keys whose current value was set after this position.")
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to wait for the first snapshot.")] = 15.0,
) -> None:
    """Print each change of a tenant's config as the config server pushes it, with its delay.

    The delay runs from the change's ``updated_at`` (recorded by the bus) to its arrival here.
    Ctrl-C stops (exit 0).
    """
    import logging
    import threading

    from config_client import ConfigClientError
    from tagbus.watching import ServerUnreachable, StampedWatch, WatchPrinter

    s = _settings()
    _secret(s)
    # The SDK logs refusals and reconnects; here the one-line error and the state lines say it.
    logging.getLogger("config_client").addHandler(logging.NullHandler())
    logging.getLogger("config_client").propagate = False
    prefixes = prefix or [""]
    printer = WatchPrinter(sys.stdout, tenant=tenant, as_json=json, since=since)
    watch = StampedWatch(
        s.grpc_target,
        # A callable: every (re)connection gets a fresh token, so a long watch outlives one.
        token=lambda: _dev_token(s, tenant, scope="config:read"),
        prefixes=prefixes,
        on_arrival=printer.arrived,
    )
    try:
        try:
            watch.start(connect_timeout)
        except ServerUnreachable as e:
            raise CliError(str(e)) from e
        except ConfigClientError as e:
            raise CliError(f"config server at {s.grpc_target} refused the watch: {e}") from e
        printer.ready(prefixes, keys=len(watch.cache.items()), position=watch.cache.position)
        while True:
            threading.Event().wait(0.5)
            printer.state(watch.cache.state, position=watch.cache.position, error=watch.cache.last_error)
    except KeyboardInterrupt:
        pass
    finally:
        watch.close()


@app.command()
def migrate(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply the Alembic migrations to TAGBUS_DATABASE_URL and create the tailer's slot."""
    from tagbus import lifecycle

    if lifecycle.migrate(_settings(), revision):
        err.print("created the tailer's replication slot", highlight=False)


@app.command()
def up(
    parts: Annotated[list[str] | None, typer.Argument(help="Parts to start (default: all).")] = None,
) -> None:
    """Start the local stack in the background (only what is not running) and wait until healthy."""
    from tagbus import lifecycle, stack

    unknown = set(parts or ()) - set(stack.ALL_PARTS)
    if unknown:
        raise CliError(f"unknown part(s) {', '.join(sorted(unknown))}; parts: {', '.join(stack.ALL_PARTS)}")
    try:
        statuses = lifecycle.up(parts=parts)
    except stack.StackError as e:
        raise CliError(str(e)) from e
    out.print(stack.format_status(statuses), highlight=False)
    out.print("environment: . .tagbus/env", highlight=False)


@app.command()
def down(
    parts: Annotated[list[str] | None, typer.Argument(help="Parts to stop (default: all).")] = None,
) -> None:
    """Stop the parts of the local stack that `tagbus up` started, by pid."""
    from tagbus import stack

    try:
        statuses = stack.down(parts=parts)
    except stack.StackError as e:
        raise CliError(str(e)) from e
    out.print(stack.format_status(statuses), highlight=False)


@app.command()
def status() -> None:
    """Show the local stack's parts and the pipeline's progress (slot lag, dead letters)."""
    from tagbus import stack
    from tagbus import status as status_mod

    out.print(stack.format_status(stack.status()), highlight=False)
    status_mod.show(_settings(), out)


@app.command()
def consumer() -> None:
    """Run the KCL MultiLangDaemon with tagbus's record processor in the foreground."""
    from consumers.daemon import DaemonSettings, run_daemon
    from consumers.worker_lock import WorkerIdTaken

    s = _settings()
    state = s.home
    daemon = DaemonSettings.from_env(dict(s.environ), [sys.executable, "-m", "tagbus.processor"])
    try:
        code = run_daemon(
            daemon, jars_dir=state / "kcl-jars", workdir=state / "kcl-run", env=dict(s.environ), lock_dir=state / "run"
        )
    except WorkerIdTaken as e:
        raise CliError(str(e)) from e
    if code:
        raise CliError(f"the MultiLangDaemon exited with {code}")


@app.command()
def keeper() -> None:
    """Keep the local stack running in the foreground: restart parts that die, renew the stream."""
    import logging
    import signal
    import threading

    from tagbus import stack
    from tagbus.keeper import Keeper, KeeperSettings

    s = _settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    try:
        settings = KeeperSettings.from_env(s.environ)
    except ValueError as e:
        raise CliError(str(e)) from e
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Keeper(stack.StackConfig.from_env(), s, settings).run(stop)


@app.command("rotate-stream")
def rotate_stream(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the consumer to reach the end.")] = 300.0,
) -> None:
    """Replace the local stack's Kinesis stream by an empty one, once the consumer has read all of it."""
    from tagbus import generations, stack

    s = _settings()
    try:
        generation = generations.rotate(
            stack.StackConfig.from_env(),
            s,
            drain_timeout=timeout,
            progress=lambda message: err.print(message, highlight=False),
        )
    except generations.RenewalError as e:
        raise CliError(str(e)) from e
    since = generation.since.isoformat() if generation.since else "the beginning"
    out.print(f"stream {s.stream_name} renewed; its events were recorded from {since} on", highlight=False)


@app.command("config-server")
def config_server() -> None:
    """Run the config server (gRPC ConfigService, Server-Sent Events) in the foreground."""
    import logging

    from tagbus import compose

    s = _settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    try:
        code = compose.run_config_server(s)
    except SettingsError as e:
        raise CliError(str(e)) from e
    if code:
        raise CliError(f"the config server exited with {code}")


@app.command()
def bus(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Run the event bus (HTTP ingest and read API) in the foreground."""
    import logging

    from event_bus.server import ServerSettings, serve
    from tagbus.compose import bus_app

    s = _settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve(bus_app(s), ServerSettings(host=host, port=s.http_port))


@app.command()
def tailer(
    metrics_port: Annotated[
        int, typer.Option(envvar="TAGBUS_TAILER_METRICS_PORT", help="Port of /metrics on 127.0.0.1 (0 = off).")
    ] = 9464,
    aggregate: Annotated[
        bool, typer.Option(envvar="TAGBUS_TAILER_AGGREGATE", help="KPL-aggregate records (KCL consumers de-aggregate).")
    ] = False,
    in_flight: Annotated[
        int,
        typer.Option(
            envvar="TAGBUS_TAILER_IN_FLIGHT",
            min=1,
            help="Batches published at once; one sharing a stream with a batch in flight waits for it.",
        ),
    ] = 1,
) -> None:
    """Run the log tailer (WAL → Kinesis) in the foreground; a second one waits as standby."""
    import logging
    import signal
    import threading

    from tagbus import aws
    from tailer import run_tailer
    from tailer.settings import TailerTuning

    s = _settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # The publisher retries forever with its own backoff: botocore's retries and long read
    # timeouts would only hide a hung endpoint from it.
    kinesis = aws.client(
        s, "kinesis", connect_timeout=5, read_timeout=15, retries={"mode": "standard", "max_attempts": 1}
    )
    tuning = TailerTuning(aggregate=aggregate, in_flight=in_flight)
    run_tailer(s.tailer(), kinesis, stop=stop, tuning=tuning, metrics_port=metrics_port or None)


@app.command()
def republish(
    tenant: Annotated[str, typer.Option(help="Tenant whose events to send again.")],
    since: Annotated[
        str,
        typer.Option(help="ISO 8601 time; per stream, from the first version recorded at or after it (naive = UTC)."),
    ],
    stream: Annotated[str | None, typer.Option(help="Only this stream (default: all the tenant's streams).")] = None,
) -> None:
    """Re-publish a range of the events table to Kinesis, each stream in version order."""
    from datetime import UTC, datetime

    from tagbus import aws
    from tailer import KinesisPublisher, TailerError
    from tailer.republish import republish as run_republish

    try:
        moment = datetime.fromisoformat(since)
    except ValueError as e:
        raise CliError(f"--since {since!r} is not an ISO 8601 time") from e
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    s = _settings()
    publisher = KinesisPublisher(aws.client(s, "kinesis"), s.stream_name)
    with Progress(TextColumn("republishing"), BarColumn(), MofNCompleteColumn(), console=err) as bar:
        task = bar.add_task("events", total=None)
        try:
            summary = run_republish(
                s.database_url,
                publisher,
                tenant=tenant,
                since=moment,
                stream=stream,
                progress=lambda n: bar.update(task, completed=n),
            )
        except TailerError as e:
            raise CliError(str(e)) from e
    out.print(
        f"republished {summary.events:,} events of {summary.streams:,} streams in {summary.seconds:.1f}s",
        highlight=False,
    )


@app.command()
def demo(timeout: Annotated[float, typer.Option(help="Seconds to wait for the read models.")] = 90.0) -> None:
    """Post config events for two tenants and wait until both read models show them."""
    from tagbus import demo as demo_mod

    try:
        demo_mod.run(_settings(), out, timeout=timeout)
    except demo_mod.DemoError as e:
        raise CliError(str(e)) from e


dlq_app = typer.Typer(no_args_is_help=True, help="Inspect and retry dead-lettered events.")
app.add_typer(dlq_app, name="dlq")


@app.command()
def replay(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant (applied in place, conditionally).")] = None,
    tag: Annotated[str | None, typer.Option(help="Only keys of this tag, e.g. tenantconfig.")] = None,
    since: Annotated[str | None, typer.Option(help="Only events recorded since this ISO 8601 time (in place).")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Never rebuild into a fresh table.")] = False,
    keep_old: Annotated[bool, typer.Option("--keep-old", help="Keep the old DynamoDB table after the switch.")] = False,
    grace: Annotated[float, typer.Option(help="Seconds after the switch before the old table is dropped.")] = 30.0,
) -> None:
    """Rebuild the read models from the events table (zero downtime for DynamoDB)."""
    from datetime import datetime

    from projections.errors import ProjectionError
    from projections.replay import ReplayProgress
    from tagbus import ops

    started: datetime | None = None
    if since is not None:
        try:
            started = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError as e:
            raise CliError(f"--since {since!r} is not an ISO 8601 time") from e
        if started.tzinfo is None:
            raise CliError("--since needs a time zone (e.g. 2024-05-01T00:00:00Z)")
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    with Progress(*columns, console=err, transient=False) as bar:
        reading = bar.add_task("read", total=None, detail="")
        writing = bar.add_task("write", total=None, detail="", visible=False)

        def progress(p: ReplayProgress) -> None:
            if p.phase == "read":
                bar.update(
                    reading,
                    total=max(1, p.max_id - p.min_id + 1),
                    completed=p.last_id - p.min_id + 1,
                    detail=f"{p.events_read:,} events, {p.keys:,} keys",
                )
            elif p.phase == "write":
                bar.update(reading, completed=bar.tasks[reading].total or 0)
                bar.update(writing, visible=True, total=p.keys_total, completed=p.keys_written, detail="")
            else:
                bar.update(writing, detail=p.phase)

        try:
            summary = ops.replay(
                _settings(),
                tenant=tenant,
                tag=tag,
                since=started,
                progress=progress,
                rebuild=False if in_place else None,
                drop_after=None if keep_old else grace,
            )
        except (ProjectionError, ValueError) as e:
            raise CliError(f"replay failed: {e}") from e
    table = Table("events read", "keys", "written", "stale", "tombstones", "failed", "caught up", "seconds", "events/s")
    table.add_row(
        f"{summary.events_read:,}",
        f"{summary.keys:,}",
        f"{summary.keys_written:,}",
        f"{summary.stale:,}",
        f"{summary.tombstones:,}",
        f"{summary.failed:,}",
        f"{summary.catch_up_events:,}",
        f"{summary.seconds:.1f}",
        f"{summary.events_per_second:,.0f}",
    )
    out.print(table)
    for switch in summary.switches:
        dropped = "dropped" if switch.old_dropped else "kept"
        out.print(
            f"{switch.alias}: switched {switch.old_table} -> {switch.new_table} "
            f"(generation {switch.generation}); old table {dropped}",
            highlight=False,
        )
    for failure in summary.failures[:10]:
        out.print(f"[yellow]not projectable[/]: {failure.tenant}/{failure.event_id}: {failure.error}")


@dlq_app.command("list")
def dlq_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's dead letters.")] = None,
    event_id: Annotated[str | None, typer.Option("--id", help="Only this event id.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
) -> None:
    """List dead-lettered events with their error and attempt count."""
    from projections.errors import StoreError
    from tagbus import ops

    try:
        letters = ops.dlq_list(_settings(), tenant, event_id=event_id, limit=limit)
    except StoreError as e:
        raise CliError(f"cannot read dead letters: {e}") from e
    table = Table("tenant", "event id", "stream", "version", "attempts", "failed at", "error")
    for x in letters:
        table.add_row(
            x.tenant,
            x.event_id,
            x.stream or "",
            str(x.version or ""),
            str(x.attempts),
            x.failed_at.isoformat(timespec="seconds"),
            f"{x.error_type}: {x.error}"[:120],
        )
    out.print(table)
    out.print(f"{len(letters)} dead letter(s)")


@dlq_app.command("retry")
def dlq_retry(
    event_id: Annotated[str | None, typer.Option("--id", help="Retry this event id.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Retry this tenant's dead letters (or narrow --id).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Retry every dead letter.")] = False,
) -> None:
    """Apply dead-lettered events again (after fixing their cause); letters that go through are removed."""
    from projections.errors import StoreError
    from tagbus import ops

    try:
        results = ops.dlq_retry(_settings(), event_id=event_id, tenant=tenant, everything=all_)
    except ValueError as e:
        raise CliError(f"{e} (--id, --tenant or --all)") from e
    except StoreError as e:
        raise CliError(f"cannot retry dead letters: {e}") from e
    table = Table("tenant", "event id", "outcome", "letter", "error")
    for r in results:
        table.add_row(r.tenant, r.event_id, r.outcome, "removed" if r.deleted else "kept", (r.error or "")[:120])
    out.print(table)
    failed = sum(1 for r in results if not r.deleted)
    if failed:
        raise CliError(f"{failed} of {len(results)} dead letter(s) still failing")
    out.print(f"{len(results)} dead letter(s) applied and removed")


@app.command()
def query(
    sql_text: Annotated[str, typer.Argument(metavar="SQL", help="One read-only SQL statement.")],
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's rows (row-level security).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Print at most this many rows.")] = 1000,
    csv: Annotated[bool, typer.Option("--csv", help="CSV with a header row.")] = False,
    json: Annotated[bool, typer.Option("--json", help="A JSON array of objects.")] = False,
    timeout: Annotated[float, typer.Option(help="Statement timeout in seconds.")] = 30.0,
) -> None:
    """Run one read-only SQL statement as the analyst role; print a table, CSV or JSON."""
    from tagbus import analyst

    if csv and json:
        raise CliError("--csv and --json exclude each other")
    try:
        result = analyst.run_query(_settings(), sql_text, tenant=tenant, limit=limit, statement_timeout=timeout)
    except analyst.QueryError as e:
        raise CliError(str(e)) from e
    if csv:
        sys.stdout.write(analyst.to_csv(result))
    elif json:
        sys.stdout.buffer.write(analyst.to_json(result) + b"\n")
    else:
        out.print(analyst.render_table(result))
    if result.truncated and (csv or json):
        err.print(f"tagbus: output truncated at {limit} rows (raise --limit)", highlight=False)


@app.command()
def maintain(
    months_ahead: Annotated[int, typer.Option(min=0, help="Partitions to make after the current month's.")] = 3,
    archive_before: Annotated[
        str | None,
        typer.Option(metavar="YYYY-MM", help="Move partitions of months before this one to schema archive."),
    ] = None,
) -> None:
    """Make the events table's monthly partitions ahead; archive old ones (never deletes rows)."""
    import psycopg

    from event_bus import partitions

    try:
        before = partitions.Month.parse(archive_before) if archive_before is not None else None
    except ValueError as e:
        raise CliError(str(e)) from e
    s = _settings()
    try:
        with psycopg.connect(s.database_url, autocommit=True, connect_timeout=10) as conn:
            if not partitions.events_partitioned(conn):
                raise CliError("the events table is not partitioned: run `tagbus migrate` first")
            created = partitions.ensure_partitions(conn, months_ahead)
            archived = partitions.detach_before(conn, before) if before is not None else []
    except partitions.PartitionError as e:
        raise CliError(str(e)) from e
    except psycopg.OperationalError as e:
        raise CliError("cannot reach the database: " + " ".join(str(e).split())) from e
    out.print(f"partitions created: {', '.join(created) or 'none (all there already)'}", highlight=False)
    if before is not None:
        out.print(f"archived to schema archive: {', '.join(archived) or f'none before {before}'}", highlight=False)


def main() -> None:
    """Entry point of the ``tagbus`` console script."""
    try:
        app(standalone_mode=False)
    except CliError as e:
        err.print(f"tagbus: {e}", highlight=False, markup=False)
        sys.exit(1)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # click's usage errors and anything unforeseen: one line, no traceback
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        err.print(f"tagbus: {type(e).__name__}: {e}", highlight=False, markup=False)
        sys.exit(1)
