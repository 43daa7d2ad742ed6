"""The local stack comes up, each part answers a real request, and the KCL daemon consumes.

Fast when the stack is already up (``make up``): ``up`` only checks pid files then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import psycopg
import pytest

from consumers import daemon
from tagbus import install, stack
from tests.fixtures.waiting import wait_for

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config() -> stack.StackConfig:
    return stack.StackConfig.from_env(root=ROOT)


@pytest.fixture(scope="module")
def infra(config: stack.StackConfig) -> dict[str, stack.PartStatus]:
    return stack.up(config, parts=stack.INFRA_PARTS)


@pytest.fixture(scope="module")
def aws(config: stack.StackConfig) -> Iterator[dict[str, Any]]:
    """boto3 clients on the local endpoints, closed at the end (no unclosed-socket warnings)."""
    clients = {name: _client(config, name) for name in ("kinesis", "dynamodb", "ssm", "cloudwatch")}
    yield clients
    for client in clients.values():
        client.close()


def _client(config: stack.StackConfig, service: str) -> Any:
    env = stack.stack_env(config)
    endpoint = env[f"AWS_ENDPOINT_URL_{service.upper()}"]
    return boto3.session.Session().client(  # type: ignore[call-overload]
        service,
        endpoint_url=endpoint,
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def test_infra_parts_run_with_pid_files(infra: dict[str, stack.PartStatus], config: stack.StackConfig) -> None:
    for name in stack.INFRA_PARTS:
        part = infra[name]
        assert part.running, f"{name} not running; log {part.log}"
        assert config.pid_file(name).read_text().strip() == str(part.pid)


def test_env_file_and_secret(infra: dict[str, stack.PartStatus], config: stack.StackConfig) -> None:
    env = stack.stack_env(config)
    text = (config.state / "env").read_text()
    for key in (
        "TAGBUS_DATABASE_URL",
        "AWS_ENDPOINT_URL_KINESIS",
        "AWS_ENDPOINT_URL_DYNAMODB",
        "AWS_ENDPOINT_URL_SSM",
        "AWS_ENDPOINT_URL_CLOUDWATCH",
        "TAGBUS_JWT_SECRET",
        "TAGBUS_STREAM_NAME",
    ):
        assert f"export {key}=" in text
        assert env[key]
    assert env["TAGBUS_DATABASE_URL"] == f"postgresql://tagbus:tagbus@127.0.0.1:{config.postgres_port}/tagbus"
    secret = config.state / "jwt-secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert stack.stack_env(config)["TAGBUS_JWT_SECRET"] == env["TAGBUS_JWT_SECRET"]


def test_postgres_answers_with_logical_wal(infra: dict[str, stack.PartStatus], config: stack.StackConfig) -> None:
    with psycopg.connect(config.database_url, connect_timeout=5) as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        assert conn.execute("SHOW max_replication_slots").fetchone() == ("10",)
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("tagbus", "tagbus")


def test_kinesis_stream_exists_and_boto3_works_on_plain_port(
    infra: dict[str, stack.PartStatus], config: stack.StackConfig, aws: dict[str, Any]
) -> None:
    kinesis = aws["kinesis"]
    summary = kinesis.describe_stream_summary(StreamName=config.stream_name)
    assert summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE"


def test_dynamodb_local_answers(infra: dict[str, stack.PartStatus], aws: dict[str, Any]) -> None:
    tables = aws["dynamodb"].list_tables()
    assert "TableNames" in tables


def test_moto_serves_ssm_and_cloudwatch(infra: dict[str, stack.PartStatus], aws: dict[str, Any]) -> None:
    ssm = aws["ssm"]
    name = f"/tagbus-test/{uuid.uuid4().hex}"
    ssm.put_parameter(Name=name, Value="v", Type="String")
    try:
        assert ssm.get_parameter(Name=name)["Parameter"]["Value"] == "v"
    finally:
        ssm.delete_parameter(Name=name)
    aws["cloudwatch"].list_metrics()


def test_status_reports_every_part(infra: dict[str, stack.PartStatus], config: stack.StackConfig) -> None:
    statuses = stack.status(config)
    assert list(statuses) == list(stack.ALL_PARTS)
    assert all(statuses[name].running for name in stack.INFRA_PARTS)


# -- the generic mechanism, on a throwaway part (never touches the shared stack) ----------


@pytest.fixture
def toy_part(tmp_path: Path, unused_port: int) -> Iterator[tuple[stack.StackConfig, stack.PartSpec]]:
    cfg = stack.StackConfig(root=tmp_path)
    spec = stack.PartSpec(
        name="toy",
        argv=(sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(unused_port)),
        cwd=tmp_path,
        marker=f"http.server --bind 127.0.0.1 {unused_port}",
        health=lambda: httpx.get(f"http://127.0.0.1:{unused_port}/", timeout=1).raise_for_status(),
        timeout=20,
    )
    yield cfg, spec
    stack.stop_part(cfg, spec, timeout=5)


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_spawn_wait_stop_and_stale_pid(toy_part: tuple[stack.StackConfig, stack.PartSpec]) -> None:
    cfg, spec = toy_part
    pid = stack.spawn_detached(spec, cfg.pid_file("toy"), cfg.log_file("toy"))
    stack.wait_healthy(spec, pid, cfg.log_file("toy"))
    assert os.getpgid(pid) == pid  # own session, so down can signal the whole group

    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not stack._alive(pid, spec.marker), "the killed part to be gone", 5)
    # The pid file still names the dead process: a stale file stops nothing.
    assert cfg.pid_file("toy").is_file()
    assert stack.stop_part(cfg, spec) is False
    assert not cfg.pid_file("toy").exists()

    # Started again on a fresh port: the killed server's port can linger for a moment on a
    # busy machine, and this test is about the pid file, not about port reuse.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = dataclasses.replace(
        spec,
        argv=(sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)),
        marker=f"http.server --bind 127.0.0.1 {port}",
        health=lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=1).raise_for_status(),
    )
    pid = stack.spawn_detached(spec, cfg.pid_file("toy"), cfg.log_file("toy"))
    stack.wait_healthy(spec, pid, cfg.log_file("toy"))
    assert stack.stop_part(cfg, spec) is True
    assert not stack._alive(pid, spec.marker)


def test_part_that_dies_names_itself_and_its_log(tmp_path: Path) -> None:
    cfg = stack.StackConfig(root=tmp_path)
    spec = stack.PartSpec(
        name="broken",
        argv=(sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"),
        cwd=tmp_path,
        marker="print('boom')",
        health=lambda: None,
        min_alive=5,
        timeout=10,
    )
    pid = stack.spawn_detached(spec, cfg.pid_file("broken"), cfg.log_file("broken"))
    with pytest.raises(stack.PartStartError) as info:
        stack.wait_healthy(spec, pid, cfg.log_file("broken"))
    assert info.value.part == "broken"
    assert str(cfg.log_file("broken")) in str(info.value)


# -- the KCL MultiLangDaemon against kinesis-mock and DynamoDB Local ----------------------

_SAMPLE_PROCESSOR = textwrap.dedent(
    """
    import json, sys
    from amazon_kclpy import kcl
    from amazon_kclpy.v3 import processor

    OUT = sys.argv[1]

    class Sample(processor.RecordProcessorBase):
        def initialize(self, initialize_input):
            pass

        def process_records(self, process_records_input):
            last = None
            with open(OUT, "a") as out:
                for record in process_records_input.records:
                    out.write(json.dumps({"data": record.binary_data.decode()}) + "\\n")
                    last = record.sequence_number
            if last is not None:
                process_records_input.checkpointer.checkpoint(last)
                with open(OUT, "a") as out:
                    out.write(json.dumps({"checkpointed": last}) + "\\n")

        def lease_lost(self, lease_lost_input):
            pass

        def shard_ended(self, shard_ended_input):
            shard_ended_input.checkpointer.checkpoint()

        def shutdown_requested(self, shutdown_requested_input):
            shutdown_requested_input.checkpointer.checkpoint()

    kcl.KCLProcess(Sample()).run()
    """
)


# Fixed names on purpose: KCL 3.x waits a random 1-30 s (hard-coded in Scheduler) before its
# first shard sync when the lease table is empty, and polls a new lease table's GSI every 10 s.
# Reusing the stream and the application's tables keeps every run after the first fast.
_KCL_TEST_STREAM = "tagbus-stack-test"
_KCL_TEST_APP = "tagbus-stack-test"


def test_multilang_daemon_consumes_and_checkpoints(
    infra: dict[str, stack.PartStatus], config: stack.StackConfig, aws: dict[str, Any], tmp_path: Path
) -> None:
    jars = install.install_kcl_jars(ROOT)
    kinesis, dynamodb = aws["kinesis"], aws["dynamodb"]
    with contextlib.suppress(kinesis.exceptions.ResourceInUseException):
        kinesis.create_stream(StreamName=_KCL_TEST_STREAM, ShardCount=1)
    kinesis.get_waiter("stream_exists").wait(
        StreamName=_KCL_TEST_STREAM, WaiterConfig={"Delay": 0.2, "MaxAttempts": 50}
    )
    payload = f"hello-{uuid.uuid4().hex}"
    put = kinesis.put_record(StreamName=_KCL_TEST_STREAM, Data=payload.encode(), PartitionKey="k")
    sequence, shard = put["SequenceNumber"], put["ShardId"]

    script = tmp_path / "sample_processor.py"
    script.write_text(_SAMPLE_PROCESSOR)
    out = tmp_path / "records.jsonl"
    out.touch()
    env = {**os.environ, **stack.stack_env(config)}
    settings = daemon.DaemonSettings.from_env(
        env,
        [str(config.venv_python), str(script), str(out)],
        stream_name=_KCL_TEST_STREAM,
        application_name=_KCL_TEST_APP,
    )
    log = tmp_path / "daemon.log"
    properties, logback = daemon.write_config(settings, tmp_path)
    argv = daemon.daemon_argv(properties, jars_dir=jars, logback=logback)
    with open(log, "ab") as handle:
        process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:

        def checkpointed() -> list[dict[str, str]] | None:
            lines = [json.loads(line) for line in out.read_text().splitlines() if line]
            if {"checkpointed": sequence} in lines:
                return lines
            assert process.poll() is None, f"the daemon exited; its log {log}:\n{log.read_text()[-3000:]}"
            return None

        lines = wait_for(
            checkpointed,
            "the record to be processed and checkpointed",
            120,
            interval=0.2,
            explain=lambda: f"daemon log {log}:\n{log.read_text()[-3000:]}",
        )
        assert {"data": payload} in lines
        lease = dynamodb.get_item(TableName=_KCL_TEST_APP, Key={"leaseKey": {"S": shard}}, ConsistentRead=True)
        assert lease["Item"]["checkpoint"]["S"] == sequence
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_a_part_not_healthy_in_time_names_its_hint(tmp_path: Path) -> None:
    def still_loading() -> None:
        raise ConnectionError("still loading")

    cfg = stack.StackConfig(root=tmp_path)
    spec = stack.PartSpec(
        name="slow",
        argv=(sys.executable, "-c", "import time; time.sleep(30)"),
        cwd=tmp_path,
        marker="time.sleep(30)",
        health=still_loading,
        timeout=0.5,
        slow_start_hint=lambda: "it reloads its saved state",
    )
    pid = stack.spawn_detached(spec, cfg.pid_file("slow"), cfg.log_file("slow"))
    try:
        with pytest.raises(stack.PartStartError) as info:
            stack.wait_healthy(spec, pid, cfg.log_file("slow"))
        assert "still loading" in info.value.reason
        assert info.value.reason.endswith("; it reloads its saved state")
    finally:
        stack.stop_part(cfg, spec)


def test_kinesis_streams_starting_empty_are_marked_for_the_kcl_checkpoints_to_go(tmp_path: Path) -> None:
    data = tmp_path / "kinesis-data"
    data.mkdir()
    state = data / "kinesis-data.json"
    mark = data / stack.KINESIS_RESET_MARK

    state.write_text('{"streams": {}}')
    stack._mark_if_streams_start_empty(state)
    assert not mark.exists()  # a readable saved state: the streams come back

    state.write_text('{"streams": ')  # truncated by a kill
    stack._mark_if_streams_start_empty(state)
    assert mark.exists() and not state.exists()
    assert [p.name.startswith("kinesis-data.json.unreadable-") for p in data.iterdir() if p != mark] == [True]

    mark.unlink()
    stack._mark_if_streams_start_empty(state)  # no saved state at all (removed by hand, or a first start)
    assert mark.exists()


def test_kinesis_hint_only_for_a_big_saved_state(tmp_path: Path) -> None:
    state = tmp_path / "kinesis-data" / "kinesis-data.json"
    assert stack.kinesis_reload_hint(state) is None  # no saved state
    state.parent.mkdir()
    state.write_text("{}")
    assert stack.kinesis_reload_hint(state) is None  # small: nothing to explain
    os.truncate(state, stack.KINESIS_BIG_STATE_BYTES)  # sparse: takes no disk
    hint = stack.kinesis_reload_hint(state)
    assert hint is not None
    assert f"{stack.KINESIS_BIG_STATE_BYTES / 1e6:,.0f} MB" in hint and f"rm -rf {state.parent}" in hint
