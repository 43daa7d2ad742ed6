"""Settings of every tagbus process, read from the environment once, at the entry point.

Values come from the process environment; for local development, ``.tagbus/env`` (written
by ``tagbus up``) fills in whatever the environment does not set, so the CLI works without
``source .tagbus/env``. With no endpoint overrides, boto3 talks to real AWS.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from event_bus.settings import BusSettings
from kernel.auth import DEFAULT_AUDIENCE, AuthSettings
from tailer.settings import TailerSettings

if TYPE_CHECKING:
    from config_server.settings import ConfigServerSettings

REPO = Path(__file__).resolve().parents[1]
LOCAL_DATABASE_URL = "postgresql://tagbus:tagbus@127.0.0.1:55432/tagbus"
DEFAULT_STREAM = "tagbus-events"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message says which and how to fix it."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the composition root needs to build the components."""

    home: Path
    database_url: str
    stream_name: str
    http_port: int
    auth: AuthSettings
    environ: Mapping[str, str]
    #: The config server's gRPC and HTTP (SSE, health, metrics) ports.
    grpc_port: int = 50051
    config_http_port: int = 8081
    #: ``host:port`` of an upstream config server to chain to instead of reading Kinesis, and
    #: the token (scope ``config:replicate``) to watch it with; without one, a development
    #: token is made with the local HS256 secret.
    config_upstream: str | None = None
    config_upstream_token: str | None = None
    #: Lag-aware back pressure of the bus (``event_bus.backpressure``); off while both are None.
    backpressure_lag_bytes: int | None = None
    backpressure_freshness_seconds: float | None = None

    def bus(self) -> BusSettings:
        return BusSettings(
            database_url=self.database_url,
            auth=self.auth,
            backpressure_lag_bytes=self.backpressure_lag_bytes,
            backpressure_freshness_seconds=self.backpressure_freshness_seconds,
            # The slot the tailer confirms, from the one place that names it.
            backpressure_slot=self.tailer().slot_name,
        )

    def tailer(self) -> TailerSettings:
        return TailerSettings(database_url=self.database_url, stream_name=self.stream_name)

    def config_server(self) -> ConfigServerSettings:
        """The config server's settings: its ports, and its tuning from ``TAGBUS_CONFIG_<FIELD>``.

        Every bound of :class:`ConfigServerSettings` can be set by its name in capitals, e.g.
        ``TAGBUS_CONFIG_HISTORY_SIZE`` or ``TAGBUS_CONFIG_GRPC_HOST`` (``0.0.0.0`` off a laptop).
        """
        from config_server.settings import ConfigServerSettings

        tuning: dict[str, object] = {}
        for spec in dataclasses.fields(ConfigServerSettings):
            if spec.name in _PORT_FIELDS:
                continue
            name = f"TAGBUS_CONFIG_{spec.name.upper()}"
            text = self.environ.get(name)
            if text:
                tuning[spec.name] = _typed(name, text, type(spec.default))
        try:
            return ConfigServerSettings(grpc_port=self.grpc_port, http_port=self.config_http_port, **tuning)  # type: ignore[arg-type]
        except ValueError as e:
            raise SettingsError(f"config server settings: {e}") from e

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        """Where this checkout's config server answers gRPC."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def config_base_url(self) -> str:
        """The config server's HTTP side: Server-Sent Events, health, metrics."""
        return f"http://127.0.0.1:{self.config_http_port}"

    def sqlalchemy_url(self) -> str:
        scheme, sep, rest = self.database_url.partition("://")
        if not sep or scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
            raise SettingsError("TAGBUS_DATABASE_URL must be a postgresql:// URL")
        return "postgresql+psycopg://" + rest


def _auth(env: Mapping[str, str], secret: str | None, jwks: str | None) -> AuthSettings:
    try:
        return AuthSettings(
            jwt_secret=secret,
            jwks_url=jwks,
            issuer=env.get("TAGBUS_JWT_ISSUER") or None,
            audience=env.get("TAGBUS_JWT_AUDIENCE") or DEFAULT_AUDIENCE,
        )
    except ValueError as e:
        raise SettingsError(str(e)) from e


def read_env_file(path: Path) -> dict[str, str]:
    """Parse the ``export NAME=value`` lines of a ``.tagbus/env`` file."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            words = words[1:]
        for word in words:
            name, sep, value = word.partition("=")
            if sep:
                values[name] = value
    return values


def load(environ: Mapping[str, str] | None = None, *, home: Path | None = None) -> Settings:
    """Read the settings once; ``environ`` defaults to the process environment."""
    real = dict(os.environ if environ is None else environ)
    home = home or Path(real.get("TAGBUS_HOME", ".tagbus")).resolve()
    env = read_env_file(home / "env") | real
    secret = env.get("TAGBUS_JWT_SECRET") or None
    jwks = env.get("TAGBUS_JWKS_URL") or None
    return Settings(
        home=home,
        database_url=env.get("TAGBUS_DATABASE_URL", LOCAL_DATABASE_URL),
        stream_name=env.get("TAGBUS_STREAM_NAME", DEFAULT_STREAM),
        http_port=_port(env, "TAGBUS_HTTP_PORT", 8080),
        auth=_auth(env, secret, jwks),
        environ=env,
        grpc_port=_port(env, "TAGBUS_GRPC_PORT", 50051),
        config_http_port=_port(env, "TAGBUS_CONFIG_HTTP_PORT", 8081),
        config_upstream=_upstream(env.get("TAGBUS_CONFIG_UPSTREAM")),
        config_upstream_token=env.get("TAGBUS_CONFIG_UPSTREAM_TOKEN") or None,
        backpressure_lag_bytes=_bound(env, "TAGBUS_BACKPRESSURE_LAG_BYTES", int),
        backpressure_freshness_seconds=_bound(env, "TAGBUS_BACKPRESSURE_FRESHNESS_SECONDS", float),
    )


#: Fields of :class:`ConfigServerSettings` set from the stack's port variables instead.
_PORT_FIELDS = frozenset({"grpc_port", "http_port"})


def _typed(name: str, text: str, kind: type) -> object:
    try:
        return kind(text)
    except ValueError as e:
        what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise SettingsError(f"{name} must be {what}, not {text!r}") from e


_N = TypeVar("_N", int, float)


def _bound(env: Mapping[str, str], name: str, kind: type[_N]) -> _N | None:
    """A positive bound, or ``None`` (off) when unset, empty or ``0``."""
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        value = kind(-1)
    if value < 0 or not math.isfinite(value):
        raise SettingsError(f"{name} must be a positive number (or 0 for off), not {text!r}")
    return value or None


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name) or str(default)
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise SettingsError(f"{name} must be a port number, not {text!r}")
    return int(text)


def _upstream(text: str | None) -> str | None:
    """``host:port`` of an upstream config server, checked here so a typo fails at start."""
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"TAGBUS_CONFIG_UPSTREAM must be host:port, not {text!r}")
    return text
