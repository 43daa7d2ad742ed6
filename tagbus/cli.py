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
from rich.table import Table

from tagbus import settings as settings_mod
from tagbus.settings import Settings, SettingsError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="tagbus: an event pipeline for multi-tenant config.")
config_app = typer.Typer(no_args_is_help=True, help="Read config keys from their read models.")
app.add_typer(config_app, name="config")

out = Console(width=None if sys.stdout.isatty() else 132)
err = Console(stderr=True)

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
    from event_bus.auth import issue_dev_token

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
    from event_bus.auth import TIERS, issue_dev_token

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

    s = _settings()
    state = s.home
    daemon = DaemonSettings.from_env(dict(s.environ), [sys.executable, "-m", "consumers.processor"])
    code = run_daemon(daemon, jars_dir=state / "kcl-jars", workdir=state / "kcl-run", env=dict(s.environ))
    if code:
        raise CliError(f"the MultiLangDaemon exited with {code}")


@app.command()
def bus(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Run the event bus (HTTP ingest and read API) in the foreground."""
    import logging

    import uvicorn

    from tagbus.compose import bus_app

    s = _settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(bus_app(s), host=host, port=s.http_port, access_log=False, log_level="warning")


@app.command()
def tailer() -> None:
    """Run the log tailer (WAL → Kinesis) in the foreground; a second one waits as standby."""
    import logging
    import signal
    import threading

    from event_bus.tailer import LogTailer
    from tagbus import aws

    s = _settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with LogTailer(s.tailer(), aws.client(s, "kinesis")) as relay:
        relay.run(stop)


@app.command()
def demo(timeout: Annotated[float, typer.Option(help="Seconds to wait for the read models.")] = 90.0) -> None:
    """Post config events for two tenants and wait until both read models show them."""
    from tagbus import demo as demo_mod

    try:
        demo_mod.run(_settings(), out, timeout=timeout)
    except demo_mod.DemoError as e:
        raise CliError(str(e)) from e


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
