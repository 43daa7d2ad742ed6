"""The reader SDK's errors, translated once from gRPC statuses.

::

    ConfigClientError
    ├── WatchRejected          the server refused the watch; retrying as is cannot help
    │   ├── Unauthenticated    UNAUTHENTICATED: no, malformed, expired or unverifiable token
    │   ├── PermissionDenied   PERMISSION_DENIED: the token lacks the ``config:read`` scope
    │   └── InvalidRequest     INVALID_ARGUMENT: a prefix the server will not watch
    ├── Disconnected           the stream failed or the server is unreachable (retried)
    │   └── Stalled            nothing arrived within ``max_silence`` (retried)
    ├── TokenUnavailable       the token callable raised (retried)
    ├── ProtocolError          the server broke the Watch contract (retried)
    ├── NotReady               ``wait_ready`` ran out of time (also a ``TimeoutError``)
    └── CacheClosed            the cache was closed

A cache never raises the retried ones at its caller: they show as its ``last_error`` while it
reconnects. ``wait_ready`` raises a :class:`WatchRejected`, :class:`NotReady` or
:class:`CacheClosed`.
"""

from __future__ import annotations

import grpc


class ConfigClientError(Exception):
    """Base of the reader SDK's errors."""


class WatchRejected(ConfigClientError):
    """The server refused the watch (``code``, ``detail``); the cache stops retrying it."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(f"{code.name}: {detail}" if detail else code.name)
        self.code = code
        self.detail = detail


class Unauthenticated(WatchRejected):
    """The token is missing, malformed, expired or could not be verified."""


class PermissionDenied(WatchRejected):
    """The token is valid but may not read config (scope ``config:read``)."""


class InvalidRequest(WatchRejected):
    """The server will not watch these prefixes."""


class Disconnected(ConfigClientError):
    """The stream failed with a retryable status, or the server could not be reached."""

    def __init__(self, code: grpc.StatusCode | None, detail: str) -> None:
        super().__init__(f"{code.name}: {detail}" if code is not None else detail)
        self.code = code
        self.detail = detail


class Stalled(Disconnected):
    """No message (not even progress) arrived within ``max_silence``; the stream was cut."""

    def __init__(self, seconds: float) -> None:
        super().__init__(None, f"no message from the server for {seconds:.1f} s")
        self.seconds = seconds


class TokenUnavailable(ConfigClientError):
    """The token callable raised; the watch is tried again with backoff."""


class ProtocolError(ConfigClientError):
    """A message the Watch contract does not allow (e.g. a change inside a snapshot)."""


class NotReady(ConfigClientError, TimeoutError):
    """The cache did not become ready in time; ``state`` and ``last_error`` tell why."""


class CacheClosed(ConfigClientError):
    """The cache was closed."""


#: Statuses that retrying with the same request and token cannot fix.
_REJECTED_BY_CODE: dict[grpc.StatusCode, type[WatchRejected]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
}


def from_status(code: grpc.StatusCode, detail: str | None) -> WatchRejected | Disconnected:
    """Our error for a call that ended with ``code``: the one place statuses are classified."""
    rejected = _REJECTED_BY_CODE.get(code)
    if rejected is not None:
        return rejected(code, detail or "")
    return Disconnected(code, detail or "")


def from_rpc_error(error: grpc.RpcError) -> WatchRejected | Disconnected:
    """Our error for a failed gRPC call (sync or ``grpc.aio``)."""
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        return from_status(error.code(), error.details())
    return Disconnected(None, f"{type(error).__name__} without a status")
