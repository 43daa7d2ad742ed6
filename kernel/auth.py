"""Bearer-token verification: who is calling, for which tenant, with which rights.

The tenant is taken from the token only. Algorithms come from an allowlist fixed by the
configuration (HS256 with a local secret, or RS256/ES256 keys from a JWKS URL); ``none``
is never accepted because PyJWT is always called with an explicit ``algorithms`` list.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

TIERS = ("basic", "premium", "enterprise")
#: ``config:replicate`` lets a config server's ``Watch`` span every tenant: for chaining
#: servers, never for services, which read their own tenant's keys with ``config:read``.
SCOPES = frozenset({"events:write", "events:read", "config:read", "config:replicate", "admin"})

_HMAC_ALGORITHMS = ["HS256"]
_JWKS_ALGORITHMS = ["RS256", "ES256"]
#: Tenant ids end up in index keys (``(tenant_id, stream_id, …)``) and in Kinesis partition
#: keys: bounded, and free of control characters (PostgreSQL refuses U+0000 in text).
MAX_TENANT_CHARS = 128


#: The audience every tagbus entry point identifies itself with unless configured otherwise.
DEFAULT_AUDIENCE = "tagbus"


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """How bearer tokens are verified.

    There is always an audience: RFC 7519 §4.1.3 says a recipient that does not identify
    itself with a present ``aud`` must reject the token, and with a key set shared by many
    services of one identity provider, a token minted for any of them would otherwise work
    here. With a JWKS an issuer is required too, for the same reason.
    """

    jwt_secret: str | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str = DEFAULT_AUDIENCE
    leeway_seconds: int = 30

    def __post_init__(self) -> None:
        if not self.audience:
            raise ValueError("a JWT audience is required (TAGBUS_JWT_AUDIENCE; default 'tagbus')")
        if self.jwks_url and not self.issuer:
            raise ValueError("a JWKS URL needs an issuer (TAGBUS_JWT_ISSUER): any issuer's keys would be accepted")


class AuthError(Exception):
    """A caller that may not proceed; each entry point renders it in its own protocol.

    ``Unauthenticated`` is HTTP 401 / gRPC UNAUTHENTICATED, ``PermissionDenied`` 403 /
    PERMISSION_DENIED, ``KeysUnavailable`` 503 / UNAVAILABLE (retry after ``retry_after`` s).
    """

    def __init__(self, detail: str, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class Unauthenticated(AuthError):
    """No token, or one that does not verify: who is calling is unknown."""


class PermissionDenied(AuthError):
    """A verified caller without the right to do this."""


class KeysUnavailable(AuthError):
    """Our key server cannot be reached: the token may be fine, the caller should retry."""


def unauthorized(detail: str) -> Unauthenticated:
    return Unauthenticated(detail)


def forbidden(detail: str) -> PermissionDenied:
    return PermissionDenied(detail)


def unavailable(detail: str, retry_after: int = 1) -> KeysUnavailable:
    return KeysUnavailable(detail, retry_after=retry_after)


@dataclass(frozen=True, slots=True)
class Quota:
    """A per-token override of the tier's token bucket."""

    events_per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class Principal:
    """The verified caller."""

    subject: str
    tenant: str
    tier: str
    scopes: frozenset[str]
    quota: Quota | None = None

    def require(self, scope: str) -> None:
        if scope not in self.scopes and "admin" not in self.scopes:
            raise forbidden(f"the token lacks the scope {scope!r}")


class TokenVerifier:
    """Verifies bearer tokens and turns their claims into a :class:`Principal`."""

    def __init__(
        self,
        settings: AuthSettings,
        *,
        jwks_lifespan_seconds: float = 300.0,
        jwks_timeout_seconds: float = 5.0,
        cache_seconds: float = 30.0,
        cache_size: int = 10_000,
    ) -> None:
        if not settings.jwt_secret and not settings.jwks_url:
            raise ValueError("set a JWT secret (HS256, local) or a JWKS URL (RS256/ES256)")
        self._settings = settings
        # Verified tokens are remembered briefly: a client reuses its token for many requests,
        # and a cheap answer matters most for a tenant flooding past its quota. An entry never
        # outlives the token's `exp`, nor the key set it was verified with.
        self._cache_seconds = min(cache_seconds, jwks_lifespan_seconds) if settings.jwks_url else cache_seconds
        self._cache_size = cache_size
        self._cache: dict[str, tuple[Principal, float]] = {}
        # The key set is cached for ``lifespan`` seconds and refetched after it, so a key
        # removed from the JWKS stops being accepted (a per-kid LRU cache would keep it
        # forever). An unknown ``kid`` refetches at most once per ``cooldown_duration``.
        self._jwks = (
            jwt.PyJWKClient(settings.jwks_url, lifespan=jwks_lifespan_seconds, timeout=jwks_timeout_seconds)
            if settings.jwks_url
            else None
        )

    def verify(self, authorization: str | None) -> Principal:
        if not authorization:
            raise unauthorized("missing bearer token")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("the Authorization header must be 'Bearer <token>'")
        token = token.strip()
        now = time.time()
        cached = self._cache.get(token)
        if cached is not None and cached[1] > now:
            return cached[0]
        claims = self._decode(token)
        principal = _principal(claims)
        if self._cache_seconds > 0:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[token] = (principal, min(float(claims["exp"]), now + self._cache_seconds))
        return principal

    def may_block(self) -> bool:
        """Whether :meth:`verify` may fetch the JWKS over the network (cache cold or expired).

        The app then verifies in a worker thread, so that a slow key server never stalls
        the event loop; otherwise verification is pure CPU and runs inline.
        """
        if self._jwks is None:
            return False
        cache = self._jwks.jwk_set_cache
        return cache is None or cache.get() is None

    def _decode(self, token: str) -> dict[str, Any]:
        s = self._settings
        options = {"require": ["exp", "sub", "tenant_id", "aud"]}
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if self._jwks is not None and alg in _JWKS_ALGORITHMS:
                # Pass the JWK itself, not its raw key: PyJWT then refuses a token whose
                # ``alg`` does not fit the key's type (an RS256 header naming an EC key's
                # ``kid`` would otherwise reach cryptography and raise a TypeError).
                jwk = self._jwks.get_signing_key_from_jwt(token)
                key: Any = jwk
                algorithms = [jwk.algorithm_name] if jwk.algorithm_name in _JWKS_ALGORITHMS else []
                if not algorithms:
                    raise unauthorized(f"the signing key's algorithm {jwk.algorithm_name!r} is not allowed")
            elif s.jwt_secret and alg in _HMAC_ALGORITHMS:
                key, algorithms = s.jwt_secret, _HMAC_ALGORITHMS
            else:
                raise unauthorized(f"token algorithm {alg!r} is not allowed")
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_seconds,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError as e:
            raise unauthorized("token expired") from e
        except jwt.ImmatureSignatureError as e:
            raise unauthorized("token not yet valid (nbf/iat in the future)") from e
        except jwt.InvalidAudienceError as e:
            raise unauthorized("token audience not accepted") from e
        except jwt.InvalidIssuerError as e:
            raise unauthorized("token issuer not accepted") from e
        except jwt.InvalidSignatureError as e:
            raise unauthorized("token signature does not verify") from e
        except jwt.MissingRequiredClaimError as e:
            raise unauthorized(f"token lacks the claim {e.claim!r}") from e
        except jwt.PyJWKClientConnectionError as e:
            # Our key server is down, not the caller's token wrong: let it retry.
            raise unavailable("the token signing keys cannot be fetched; retry later", retry_after=5) from e
        except (jwt.PyJWKClientError, jwt.PyJWKError, jwt.PyJWKSetError) as e:
            raise unauthorized("no signing key for this token") from e
        except jwt.PyJWTError as e:
            raise unauthorized("malformed token") from e
        return claims


def _principal(claims: Mapping[str, Any]) -> Principal:
    tenant = claims.get("tenant_id")
    if not isinstance(tenant, str) or not tenant:
        raise unauthorized("claim 'tenant_id' must be a non-empty string")
    if len(tenant) > MAX_TENANT_CHARS or not tenant.isprintable():
        raise unauthorized(f"claim 'tenant_id' must be at most {MAX_TENANT_CHARS} printable characters")
    tier = claims.get("tier", "basic")
    if tier not in TIERS:
        raise unauthorized(f"claim 'tier' must be one of {', '.join(TIERS)}")
    scope = claims.get("scope", "")
    if not isinstance(scope, str):
        raise unauthorized("claim 'scope' must be a space-separated string")
    return Principal(
        subject=str(claims["sub"]),
        tenant=tenant,
        tier=tier,
        scopes=frozenset(scope.split()) & SCOPES,
        quota=_quota(claims.get("quota")),
    )


def _quota(raw: object) -> Quota | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise unauthorized("claim 'quota' must be an object")
    rate, burst = raw.get("events_per_second"), raw.get("burst")
    if not isinstance(rate, int | float) or rate <= 0 or isinstance(rate, bool):
        raise unauthorized("claim 'quota.events_per_second' must be a positive number")
    if burst is None:
        burst = max(1, int(rate))
    if not isinstance(burst, int) or burst < 1 or isinstance(burst, bool):
        raise unauthorized("claim 'quota.burst' must be a positive integer")
    return Quota(float(rate), burst)


def issue_dev_token(
    secret: str,
    *,
    tenant: str,
    subject: str = "dev",
    tier: str = "basic",
    scope: str = "events:write events:read config:read",
    ttl_seconds: int = 3600,
    issuer: str | None = None,
    audience: str = DEFAULT_AUDIENCE,
    now: float,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """An HS256 token for local development and tests."""
    claims: dict[str, Any] = {
        "sub": subject,
        "tenant_id": tenant,
        "tier": tier,
        "scope": scope,
        "iat": int(now),
        "exp": int(now) + ttl_seconds,
    }
    if issuer:
        claims["iss"] = issuer
    claims["aud"] = audience
    claims.update(extra or {})
    return jwt.encode(claims, secret, algorithm="HS256")


__all__ = [
    "AuthError",
    "AuthSettings",
    "KeysUnavailable",
    "PermissionDenied",
    "Principal",
    "Quota",
    "TokenVerifier",
    "Unauthenticated",
    "issue_dev_token",
]
