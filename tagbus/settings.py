"""Settings of every tagbus process, read from the environment once, at the entry point.

Values come from the process environment; for local development, ``.tagbus/env`` (written
by ``tagbus up``) fills in whatever the environment does not set, so the CLI works without
``source .tagbus/env``. With no endpoint overrides, boto3 talks to real AWS.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from event_bus.settings import BusSettings
from kernel.auth import AuthSettings
from tailer.settings import TailerSettings

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

    def bus(self) -> BusSettings:
        return BusSettings(database_url=self.database_url, auth=self.auth)

    def tailer(self) -> TailerSettings:
        return TailerSettings(database_url=self.database_url, stream_name=self.stream_name)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def sqlalchemy_url(self) -> str:
        scheme, sep, rest = self.database_url.partition("://")
        if not sep or scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
            raise SettingsError("TAGBUS_DATABASE_URL must be a postgresql:// URL")
        return "postgresql+psycopg://" + rest


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
    port_text = env.get("TAGBUS_HTTP_PORT", "8080")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SettingsError(f"TAGBUS_HTTP_PORT must be a port number, not {port_text!r}")
    secret = env.get("TAGBUS_JWT_SECRET") or None
    jwks = env.get("TAGBUS_JWKS_URL") or None
    return Settings(
        home=home,
        database_url=env.get("TAGBUS_DATABASE_URL", LOCAL_DATABASE_URL),
        stream_name=env.get("TAGBUS_STREAM_NAME", DEFAULT_STREAM),
        http_port=int(port_text),
        auth=AuthSettings(
            jwt_secret=secret,
            jwks_url=jwks,
            issuer=env.get("TAGBUS_JWT_ISSUER") or None,
            audience=env.get("TAGBUS_JWT_AUDIENCE") or None,
        ),
        environ=env,
    )
