"""Identity and tenant isolation of the bus over real HTTP, with keys from a real JWKS endpoint.

The bus under test accepts HS256 tokens (local secret) and RS256/ES256 tokens whose keys it
fetches from a JWKS document served on 127.0.0.1, and it checks ``iss`` and ``aud``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from devtools.ports import free_port
from devtools.postgres_cluster import cloned_database
from event_bus.app import create_app
from event_bus.settings import BusSettings
from kernel.auth import AuthSettings, KeysUnavailable, TokenVerifier, Unauthenticated, issue_dev_token
from tests.fixtures.bus import SECRET, TAGS, serve
from tests.fixtures.jwks import AUDIENCE, ISSUER, JwksServer, SigningKeys, claims, serve_jwks, sign
from tests.fixtures.waiting import wait_for

PROBLEM = "application/problem+json"


class MemoryConfigReader:
    """A config read side in memory: items per ``(tenant, key)``."""

    def __init__(self, items: Mapping[tuple[str, str], Any]) -> None:
        self._items = {
            (tenant, key): {"key": key, "value": value, "version": 1, "updated_at": "2024-01-01T00:00:00Z"}
            for (tenant, key), value in items.items()
        }

    def get(self, tenant: str, key: str) -> Mapping[str, Any] | None:
        return self._items.get((tenant, key))

    def list(
        self, tenant: str, prefix: str, *, limit: int, start_after: str | None
    ) -> tuple[list[Mapping[str, Any]], str | None]:
        keys = sorted(k for t, k in self._items if t == tenant and k.startswith(prefix))
        if start_after is not None:
            keys = [k for k in keys if k > start_after]
        page = keys[:limit]
        return [self._items[(tenant, k)] for k in page], (page[-1] if len(keys) > limit else None)


CONFIG = MemoryConfigReader(
    {
        ("acme", "tenantconfig:features/dark-mode"): True,
        ("acme", "tenantconfig:features/beta"): {"cohort": "a"},
        ("globex", "tenantconfig:features/dark-mode"): False,
        ("globex", "tenantconfig:limits/seats"): 10,
    }
)


class Bus:
    def __init__(self, base_url: str, jwks: JwksServer) -> None:
        self.base_url = base_url
        self.jwks = jwks

    def rs256(self, tenant: str, **extra: Any) -> str:
        return sign(claims(tenant, **extra), self.jwks.keys.rsa, "RS256", self.jwks.keys.rsa_kid)

    def es256(self, tenant: str, **extra: Any) -> str:
        return sign(claims(tenant, **extra), self.jwks.keys.ec, "ES256", self.jwks.keys.ec_kid)

    def hs256(self, tenant: str, **extra: Any) -> str:
        return sign(claims(tenant, **extra), SECRET, "HS256")

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with serve_jwks() as server:
        yield server


@pytest.fixture(scope="module")
def bus(pg_server_url: str, jwks: JwksServer) -> Iterator[Bus]:
    with cloned_database(pg_server_url) as url:
        auth = AuthSettings(jwt_secret=SECRET, jwks_url=jwks.url, issuer=ISSUER, audience=AUDIENCE)
        settings = BusSettings(database_url=url, auth=auth, pool_size=4)
        port = free_port()
        stop = serve(create_app(settings, tags=TAGS, config_reader=CONFIG), port)
        try:
            yield Bus(f"http://127.0.0.1:{port}", jwks)
        finally:
            stop()


def event(**fields: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/auth-test", "type": "thing.happened"} | fields


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(header: Mapping[str, Any], payload: Mapping[str, Any], signer: Any = None) -> str:
    """A token built by hand, for headers PyJWT refuses to produce (``none``, HS with a PEM)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = signer(signing_input.encode()) if signer else b""
    return f"{signing_input}.{_b64(signature)}"


def post_with(bus: Bus, token: str, body: Any = None) -> httpx.Response:
    with bus.client(token) as client:
        return client.post("/v1/events", json=body if body is not None else event())


def assert_status(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM if status >= 400 else True


# --- accepted tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "HS256"])
def test_tokens_from_the_jwks_and_the_local_secret_are_accepted(bus: Bus, alg: str) -> None:
    token = {"RS256": bus.rs256, "ES256": bus.es256, "HS256": bus.hs256}[alg]("acme")
    sent = event()
    created = post_with(bus, token, sent)
    assert created.status_code == 201, created.text
    with bus.client(token) as client:
        assert client.get(f"/v1/events/{sent['id']}").json()["tenantid"] == "acme"


def test_the_key_set_is_fetched_once_and_cached(bus: Bus) -> None:
    for _ in range(20):
        assert post_with(bus, bus.es256("acme")).status_code == 201
    assert bus.jwks.fetches == 1


# --- refused tokens -----------------------------------------------------------------------


def refused_tokens(bus: Bus) -> dict[str, str]:
    keys = bus.jwks.keys
    other = SigningKeys()
    good = claims("acme")
    pem = keys.rsa_public_pem()

    def hmac_with_pem(data: bytes) -> bytes:
        return hmac.new(pem, data, hashlib.sha256).digest()

    return {
        "unknown kid": sign(good, other.rsa, "RS256", "rsa-unknown"),
        "known kid, other key": sign(good, other.rsa, "RS256", keys.rsa_kid),
        "other EC key": sign(good, other.ec, "ES256", keys.ec_kid),
        "HS256 signed with the RSA public key": forge(
            {"alg": "HS256", "typ": "JWT", "kid": keys.rsa_kid}, good, hmac_with_pem
        ),
        "HS256 signed with the RSA public key, no kid": forge({"alg": "HS256", "typ": "JWT"}, good, hmac_with_pem),
        "alg none": forge({"alg": "none", "typ": "JWT"}, good),
        "alg None": forge({"alg": "None", "typ": "JWT", "kid": keys.rsa_kid}, good),
        "alg RS384": sign(good, keys.rsa, "RS384", keys.rsa_kid),
        "alg ES512 curve mismatch": sign(good, ec.generate_private_key(ec.SECP521R1()), "ES512", keys.ec_kid),
        # An RS256 header naming the EC key: PyJWT got the raw EC key and raised a TypeError (500).
        "RS256 header, EC kid": sign(good, keys.rsa, "RS256", keys.ec_kid),
        "ES256 header, RSA kid": sign(good, keys.ec, "ES256", keys.rsa_kid),
        "expired": sign(good | {"exp": good["iat"] - 3600}, keys.rsa, "RS256", keys.rsa_kid),
        "future nbf": sign(good | {"nbf": good["iat"] + 3600}, keys.ec, "ES256", keys.ec_kid),
        "wrong aud": sign(good | {"aud": "someone-else"}, keys.rsa, "RS256", keys.rsa_kid),
        "no aud": sign({k: v for k, v in good.items() if k != "aud"}, keys.rsa, "RS256", keys.rsa_kid),
        "wrong iss": sign(good | {"iss": "https://evil.test/"}, keys.ec, "ES256", keys.ec_kid),
        "no iss": sign({k: v for k, v in good.items() if k != "iss"}, keys.rsa, "RS256", keys.rsa_kid),
        "no exp": sign({k: v for k, v in good.items() if k != "exp"}, keys.rsa, "RS256", keys.rsa_kid),
        "HS256 wrong aud": sign(good | {"aud": "someone-else"}, SECRET, "HS256"),
        "tenant with NUL": sign(good | {"tenant_id": "ac\x00me"}, keys.rsa, "RS256", keys.rsa_kid),
        "tenant too long": sign(good | {"tenant_id": "t" * 500}, keys.rsa, "RS256", keys.rsa_kid),
        "tenant not a string": sign(good | {"tenant_id": ["acme"]}, keys.rsa, "RS256", keys.rsa_kid),
        "bad tier": sign(good | {"tier": "platinum"}, keys.rsa, "RS256", keys.rsa_kid),
        "truncated signature": sign(good, keys.rsa, "RS256", keys.rsa_kid)[:-10],
        "header not JSON": "bm90IGpzb24." + sign(good, keys.rsa, "RS256", keys.rsa_kid).split(".", 1)[1],
        "kid not a string": forge({"alg": "RS256", "kid": {"x": 1}}, good, lambda _: b"x" * 256),
    }


def test_refused_tokens_are_401(bus: Bus) -> None:
    statuses = {name: post_with(bus, token) for name, token in refused_tokens(bus).items()}
    wrong = {name: (r.status_code, r.text[:200]) for name, r in statuses.items() if r.status_code != 401}
    assert not wrong
    for response in statuses.values():
        assert response.headers["content-type"] == PROBLEM
        assert response.headers["www-authenticate"] == "Bearer"


def test_unknown_kids_do_not_hammer_the_key_server(bus: Bus) -> None:
    before = bus.jwks.fetches
    other = SigningKeys()
    for i in range(20):
        assert post_with(bus, sign(claims("acme"), other.rsa, "RS256", f"rotated-{i}")).status_code == 401
    # One forced refresh at most per cooldown, not one per forged kid.
    assert bus.jwks.fetches - before <= 1


def test_another_tenants_tenantid_is_403(bus: Bus) -> None:
    for token in (bus.rs256("acme"), bus.es256("acme"), bus.hs256("acme")):
        assert_status(post_with(bus, token, event(tenantid="globex")), 403)
        with bus.client(token) as client:
            batch = client.post("/v1/events:batch", json=[event(), event(tenantid="globex")])
        assert_status(batch, 403)


# --- cross-tenant probes on every read path ---------------------------------------------


def test_no_read_path_crosses_tenants(bus: Bus) -> None:
    secret = event(subject=f"orders/{uuid.uuid4()}", data={"card": "4111"})
    with bus.client(bus.rs256("acme")) as acme, bus.client(bus.es256("globex")) as globex:
        assert acme.post("/v1/events", json=secret).status_code == 201
        stream = secret["subject"]
        assert acme.get(f"/v1/events/{secret['id']}").status_code == 200
        assert acme.get(f"/v1/streams/{stream}").status_code == 200

        probes = {
            "event": globex.get(f"/v1/events/{secret['id']}"),
            "stream": globex.get(f"/v1/streams/{stream}"),
            "stream page 2": globex.get(f"/v1/streams/{stream}", params={"from_version": 1, "limit": 1}),
            "acme-only key": globex.get("/v1/config/tenantconfig:features/beta"),
        }
        for name, response in probes.items():
            assert response.status_code == 404, (name, response.text)
            assert "4111" not in response.text and "cohort" not in response.text

        # A key both tenants hold: each reads its own value.
        assert acme.get("/v1/config/tenantconfig:features/dark-mode").json()["value"] is True
        assert globex.get("/v1/config/tenantconfig:features/dark-mode").json()["value"] is False
        # Listing shows only the caller's keys, whatever the prefix.
        for prefix in ("", "tenantconfig:", "tenantconfig:features/"):
            acme_keys = {i["key"] for i in acme.get("/v1/config", params={"prefix": prefix}).json()["items"]}
            globex_keys = {i["key"] for i in globex.get("/v1/config", params={"prefix": prefix}).json()["items"]}
            assert "tenantconfig:limits/seats" not in acme_keys
            assert "tenantconfig:features/beta" not in globex_keys
        assert {i["key"] for i in globex.get("/v1/config").json()["items"]} == {
            "tenantconfig:features/dark-mode",
            "tenantconfig:limits/seats",
        }


def test_a_tenantid_claim_cannot_be_smuggled_through_the_query(bus: Bus) -> None:
    sent = event()
    with bus.client(bus.rs256("acme")) as acme, bus.client(bus.rs256("globex")) as globex:
        assert acme.post("/v1/events", json=sent).status_code == 201
        for params in ({"tenant": "acme"}, {"tenantid": "acme"}, {"tenant_id": "acme"}):
            assert globex.get(f"/v1/events/{sent['id']}", params=params).status_code == 404
            assert {i["key"] for i in globex.get("/v1/config", params=params).json()["items"]} >= set()
            items = globex.get("/v1/config", params=params | {"prefix": "tenantconfig:features/b"}).json()["items"]
            assert items == []


# --- the verifier on its own ------------------------------------------------------------


def test_an_unreachable_key_server_is_503_not_401() -> None:
    verifier = TokenVerifier(
        AuthSettings(jwks_url="http://127.0.0.1:9/jwks.json", issuer=ISSUER, audience=AUDIENCE), jwks_timeout_seconds=1
    )
    token = sign(claims("acme"), SigningKeys().rsa, "RS256", "rsa-1")
    assert verifier.may_block()
    with pytest.raises(KeysUnavailable) as caught:
        verifier.verify(f"Bearer {token}")
    assert caught.value.retry_after


def test_hs256_is_refused_when_only_a_jwks_is_configured(jwks: JwksServer) -> None:
    verifier = TokenVerifier(AuthSettings(jwks_url=jwks.url, issuer=ISSUER, audience=AUDIENCE))
    with pytest.raises(Unauthenticated):
        verifier.verify(f"Bearer {sign(claims('acme'), SECRET, 'HS256')}")


def test_a_key_removed_from_the_jwks_stops_being_accepted() -> None:
    keys = SigningKeys()
    with serve_jwks(keys) as server:
        auth = AuthSettings(jwks_url=server.url, issuer=ISSUER, audience=AUDIENCE)
        verifier = TokenVerifier(auth, jwks_lifespan_seconds=0.2)
        token = sign(claims("acme"), keys.rsa, "RS256", keys.rsa_kid)
        assert verifier.verify(f"Bearer {token}").tenant == "acme"
        server.document = {"keys": [k for k in server.document["keys"] if k["kid"] != keys.rsa_kid]}

        def refused() -> bool:
            try:
                verifier.verify(f"Bearer {token}")
            except Unauthenticated:
                return True
            return False  # the cached key set has not expired yet

        wait_for(refused, "the token to be refused once the cached key set expired", 5)


# --- the audience and issuer are always checked (RFC 7519 §4.1.3) -------------------------


def test_settings_refuse_a_jwks_without_an_issuer() -> None:
    with pytest.raises(ValueError, match="issuer"):
        AuthSettings(jwks_url="http://127.0.0.1:9/jwks.json")


def test_a_token_without_aud_or_for_another_audience_is_refused_by_default() -> None:
    verifier = TokenVerifier(AuthSettings(jwt_secret=SECRET))
    now = time.time()
    assert verifier.verify(f"Bearer {issue_dev_token(SECRET, tenant='acme', now=now)}").tenant == "acme"
    foreign = issue_dev_token(SECRET, tenant="acme", now=now, audience="billing-service")
    plain = {k: v for k, v in claims("acme").items() if k not in ("iss", "aud")}
    for token in (foreign, sign(plain, SECRET, "HS256")):
        with pytest.raises(Unauthenticated):
            verifier.verify(f"Bearer {token}")
