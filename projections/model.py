"""Records of the config read models: keys, changes projected from events, items read back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kernel import keys
from kernel.envelope import CONFIG_DELETED, CONFIG_SET, StoredEvent
from projections.errors import InvalidConfigEvent, InvalidConfigKey


@dataclass(frozen=True, slots=True, order=True)
class ConfigKey:
    """A config key ``<tag>:<path>``; the tag picks the read model, the path names the value."""

    tag: str
    path: str

    def __post_init__(self) -> None:
        reason = keys.tag_problem(self.tag) or keys.path_problem(self.path)
        if reason:
            raise InvalidConfigKey(f"{self.tag}:{self.path}", reason)

    @classmethod
    def parse(cls, key: str) -> ConfigKey:
        """Parse ``"<tag>:<path>"``; raise :class:`InvalidConfigKey` if it is not one."""
        if not isinstance(key, str):
            raise InvalidConfigKey(key, "not a string")
        tag, sep, path = key.partition(":")
        if not sep:
            raise InvalidConfigKey(key, "missing ':' between tag and path")
        return cls(tag, path)

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/"))

    def __str__(self) -> str:
        return f"{self.tag}:{self.path}"


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """One set or delete of a config key, as projected from a ``config.*`` event.

    ``version`` is the event's stream version, and the stream of a config event is its key,
    so it orders every change of one key; stores keep the highest version they have seen.
    """

    tenant: str
    key: ConfigKey
    value: Any
    version: int
    position: int
    updated_at: datetime
    deleted: bool = False

    @classmethod
    def from_event(cls, event: StoredEvent) -> ConfigChange | None:
        """The change an event makes, or ``None`` for event types no config model projects.

        Raises :class:`InvalidConfigEvent` (or its :class:`InvalidConfigKey`) for a config
        event whose data is malformed: such an event can never be applied.
        """
        if event.type not in (CONFIG_SET, CONFIG_DELETED):
            return None
        data = event.data
        if not isinstance(data, dict) or "key" not in data:
            raise InvalidConfigEvent(f"event {event.id!r}: data must be an object with a 'key'")
        key = ConfigKey.parse(data["key"])
        if event.stream != str(key):
            # The version only orders a key's changes because the key is the stream.
            raise InvalidConfigEvent(f"event {event.id!r}: stream {event.stream!r} is not its key {str(key)!r}")
        if event.version < 1:
            raise InvalidConfigEvent(f"event {event.id!r}: version {event.version} is not positive")
        deleted = event.type == CONFIG_DELETED
        if not deleted and "value" not in data:
            raise InvalidConfigEvent(f"event {event.id!r}: config.set without a 'value'")
        return cls(
            tenant=event.tenant,
            key=key,
            value=None if deleted else data["value"],
            version=event.version,
            position=event.position,
            updated_at=event.recorded_at,
            deleted=deleted,
        )


@dataclass(frozen=True, slots=True)
class ConfigItem:
    """The current value of a config key, as a read model returns it."""

    key: ConfigKey
    value: Any
    version: int
    updated_at: datetime
