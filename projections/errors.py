"""Errors of the projections, drawn once here.

::

    ProjectionError
    ├── InvalidConfigEvent        a config event whose data cannot be projected (poison)
    │   └── InvalidConfigKey      a key that is not ``<tag>:<path>`` with valid segments
    ├── UnknownTag                no store is registered for the key's tag
    └── StoreError                a read model call failed; ``.code`` is the provider's error code
        ├── StoreUnavailable      endpoint unreachable, 5xx, timeouts        (retryable)
        ├── StoreThrottled        the store asked us to slow down            (retryable)
        ├── StoreMisconfigured    table missing, access denied: an operator must act
        └── ChangeRejected        the store refuses this change (too large, invalid name): poison

``retryable`` tells a caller whether waiting and trying again can help. Adapters translate
botocore errors into these exactly once, at their boundary, by error code.
"""

from __future__ import annotations


class ProjectionError(Exception):
    """Base of every error raised by ``projections``."""

    retryable: bool = False


class InvalidConfigEvent(ProjectionError, ValueError):
    """A ``config.*`` event whose data cannot be turned into a change."""


class InvalidConfigKey(InvalidConfigEvent):
    """A config key that is not ``<tag>:<path>`` with ``/``-separated ``[A-Za-z0-9_.-]`` segments."""

    def __init__(self, key: object, reason: str) -> None:
        super().__init__(f"invalid config key {key!r}: {reason}")
        self.key = key
        self.reason = reason


class UnknownTag(ProjectionError, LookupError):
    """No read model is registered for a tag."""

    def __init__(self, tag: str, registered: frozenset[str]) -> None:
        known = ", ".join(sorted(registered)) or "none"
        super().__init__(f"no config store registered for tag {tag!r} (registered: {known})")
        self.tag = tag
        self.registered = registered


class StoreError(ProjectionError):
    """A call to a read model failed.

    ``store`` names the adapter, ``operation`` the provider call and ``code`` the provider's
    error code (e.g. ``ProvisionedThroughputExceededException``), when there is one.
    """

    def __init__(
        self,
        message: str,
        *,
        store: str = "",
        operation: str = "",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.store = store
        self.operation = operation
        self.code = code


class StoreUnavailable(StoreError):
    """The store could not be reached or answered with a server error; try again later."""

    retryable = True


class StoreThrottled(StoreError):
    """The store throttled the request; back off and try again."""

    retryable = True


class StoreMisconfigured(StoreError):
    """The store is not set up for us (missing table, access denied); retrying will not help."""


class ChangeRejected(StoreError):
    """The store refuses this particular change (too large, invalid name); it will never succeed."""
