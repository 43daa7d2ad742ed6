"""``tagbus status``: is progress moving? Slot lag, event counts, dead letters, the config server's lag."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
from rich.console import Console
from rich.table import Table

from tagbus import aws
from tagbus.settings import Settings
from tailer import slot_status

_DEADLETTER_TABLE = "tagbus-deadletters"


def show(settings: Settings, console: Console) -> None:
    table = Table("measure", "value", title="pipeline")
    try:
        with psycopg.connect(settings.database_url, connect_timeout=3) as conn:
            slot = slot_status(conn, settings.tailer().slot_name)
            count, newest = conn.execute("SELECT count(*), max(recorded_at) FROM events").fetchone() or (0, None)
    except psycopg.OperationalError:
        table.add_row("database", "[red]unreachable[/red]")
    else:
        table.add_row("events stored", f"{count:,}")
        if newest is not None:
            age = (datetime.now(UTC) - newest).total_seconds()
            table.add_row("newest event", f"{age:,.1f} s ago")
        if slot is None:
            table.add_row("tailer slot", "[yellow]missing (run `tagbus migrate`)[/yellow]")
        else:
            table.add_row("tailer slot", slot.slot_name)
            table.add_row("slot lag", f"{slot.lag_bytes:,} bytes of WAL not yet published")
            table.add_row("slot WAL status", slot.wal_status or "-")
    for name, value in _tailer_progress(settings):
        table.add_row(name, value)
    table.add_row("dead letters", _dead_letters(settings))
    for name, value in _config_server_progress(settings):
        table.add_row(name, value)
    console.print(table)


def _metrics(url: str) -> dict[str, float] | None:
    """A /metrics page as name → value, label sets summed; ``None`` when nothing answers."""
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def _config_server_progress(settings: Settings) -> list[tuple[str, str]]:
    """What the config server says on its /metrics: how far it has read, how far behind it is."""
    url = f"{settings.config_base_url}/metrics"
    values = _metrics(url)
    if values is None:
        return [("config server", f"[yellow]no metrics at {url}[/yellow]")]
    ready = values.get("config_server_ready", 0.0) >= 1
    return [
        ("config server", "ready" if ready else "[yellow]catching up[/yellow]"),
        ("config position", f"{values.get('config_server_position', 0):,.0f}"),
        ("config source lag", f"{values.get('config_server_source_lag_seconds', 0):,.1f} s"),
        ("config watch streams", f"{values.get('config_server_streams_open', 0):,.0f}"),
    ]


def _tailer_progress(settings: Settings) -> list[tuple[str, str]]:
    """What the running tailer says on its /metrics: is progress moving?"""
    url = f"http://127.0.0.1:{settings.environ.get('TAGBUS_TAILER_METRICS_PORT', '9464')}/metrics"
    values = _metrics(url)
    if values is None:
        return [("tailer", f"[yellow]no metrics at {url}[/yellow]")]
    now = datetime.now(UTC).timestamp()

    def ago(name: str) -> str:
        stamp = values.get(name, 0.0)
        return f"{now - stamp:,.1f} s ago" if stamp else "never"

    return [
        ("events published", f"{values.get('tagbus_tailer_events_published_total', 0):,.0f}"),
        ("last publish", ago("tagbus_tailer_last_publish_timestamp_seconds")),
        ("slot last advanced", ago("tagbus_tailer_last_advance_timestamp_seconds")),
    ]


def _dead_letters(settings: Settings) -> str:
    import botocore.exceptions

    client = aws.client(settings, "dynamodb", connect_timeout=3, read_timeout=5, retries={"max_attempts": 1})
    try:
        count = client.scan(TableName=_DEADLETTER_TABLE, Select="COUNT")["Count"]
    except client.exceptions.ResourceNotFoundException:
        return "0 (no table yet)"
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        return f"unknown ({type(e).__name__})"
    finally:
        client.close()
    return f"{count:,}"
