"""Who may read what, and which requests are well formed: the same rules for gRPC and SSE.

Failures are raised as :class:`Refused` with a :class:`Refusal`; each protocol renders it once
(gRPC status codes in :mod:`config_server.service`, problem+json in :mod:`config_server.sse`).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from kernel import keys
from kernel.auth import AuthError, KeysUnavailable, PermissionDenied, TokenVerifier

READ_SCOPE = "config:read"
#: A watch with this scope spans every tenant (a config server chained to this one).
REPLICATE_SCOPE = "config:replicate"

#: List's page size when the request gives none, and its largest.
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1_000


class Refusal(enum.Enum):
    """Why a request is refused; gRPC status and HTTP status in the comments."""

    UNAUTHENTICATED = "unauthenticated"  # UNAUTHENTICATED, 401
    PERMISSION_DENIED = "permission-denied"  # PERMISSION_DENIED, 403
    INVALID = "invalid"  # INVALID_ARGUMENT, 422
    NOT_FOUND = "not-found"  # NOT_FOUND, 404
    EXHAUSTED = "exhausted"  # RESOURCE_EXHAUSTED, 429
    UNAVAILABLE = "unavailable"  # UNAVAILABLE, 503


class Refused(Exception):
    """A request the server will not serve, with a detail fit for the caller."""

    def __init__(self, refusal: Refusal, detail: str, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.refusal = refusal
        self.detail = detail
        self.retry_after = retry_after


def invalid(detail: str) -> Refused:
    return Refused(Refusal.INVALID, detail)


def not_ready() -> Refused:
    return Refused(Refusal.UNAVAILABLE, "the config server is still loading its state; retry shortly", retry_after=1)


@dataclass(frozen=True, slots=True)
class Caller:
    """A verified caller: the token's tenant, and whether its watches span every tenant."""

    tenant: str
    all_tenants: bool = False


class Access:
    """Verifies callers and checks keys, prefixes and page tokens against the registered tags."""

    def __init__(
        self, verifier: TokenVerifier, tags: Collection[str], *, max_prefixes: int, max_prefix_chars: int
    ) -> None:
        self._verifier = verifier
        self._tags = frozenset(tags)
        self._max_prefixes = max_prefixes
        self._max_prefix_chars = max_prefix_chars

    async def authorize(self, authorization: str | None, *, watch: bool = False) -> Caller:
        """The caller of a request with this ``Authorization`` value (``Bearer …``).

        Reads need ``config:read``; a watch may instead carry ``config:replicate``, which
        makes it span every tenant.
        """
        try:
            if self._verifier.may_block():
                # A cold JWKS cache means a fetch: never on the loop every stream shares.
                principal = await asyncio.to_thread(self._verifier.verify, authorization)
            else:
                principal = self._verifier.verify(authorization)
            if watch and REPLICATE_SCOPE in principal.scopes:
                return Caller(principal.tenant, all_tenants=True)
            principal.require(READ_SCOPE)
        except AuthError as e:
            raise _refused(e) from e
        return Caller(principal.tenant)

    def key(self, key: str) -> str:
        if not key.isprintable():
            raise invalid("key: control characters are not allowed")
        try:
            keys.split_key(key, self._tags)
        except ValueError as e:
            raise invalid(f"key {_shown(key)}: {e}") from e
        return key

    def prefix(self, prefix: str, *, field: str = "prefix") -> str:
        """A list or watch prefix: empty (every key), or a start of some valid key of a registered tag."""
        if len(prefix) > self._max_prefix_chars:
            raise invalid(f"{field}: at most {self._max_prefix_chars} characters")
        if not prefix.isprintable():
            raise invalid(f"{field}: control characters are not allowed")
        if prefix and not keys.may_prefix_key(prefix, self._tags):
            raise invalid(
                f"{field} {_shown(prefix)}: no key can start with it "
                f"('<tag>:' and a start of a path; registered tags: {', '.join(sorted(self._tags))})"
            )
        return prefix

    def prefixes(self, prefixes: Sequence[str]) -> tuple[str, ...]:
        if not prefixes:
            raise invalid("prefixes: at least one (an empty prefix watches every key)")
        if len(prefixes) > self._max_prefixes:
            raise invalid(f"prefixes: at most {self._max_prefixes}")
        return tuple(self.prefix(p, field=f"prefixes[{i}]") for i, p in enumerate(prefixes))

    def page_size(self, size: int) -> int:
        if size == 0:
            return DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise invalid(f"page_size: at most {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE})")
        return size

    def page_token(self, token: str) -> str | None:
        """The key a page starts after: the previous page's ``next_page_token``."""
        if not token:
            return None
        try:
            return self.key(token)
        except Refused as e:
            raise invalid("page_token: not a token this server gave (the last key of the previous page)") from e


def _refused(error: AuthError) -> Refused:
    if isinstance(error, KeysUnavailable):
        return Refused(Refusal.UNAVAILABLE, error.detail, retry_after=error.retry_after)
    if isinstance(error, PermissionDenied):
        return Refused(Refusal.PERMISSION_DENIED, error.detail)
    return Refused(Refusal.UNAUTHENTICATED, error.detail)


def _shown(text: str) -> str:
    """A caller's string in an error detail, cut short: a detail is no place for 500 characters."""
    return repr(text if len(text) <= 80 else text[:77] + "...")
