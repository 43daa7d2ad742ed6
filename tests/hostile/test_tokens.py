"""Hostile tokens against every route: refused with 401 (or 403 for a missing scope), never a 5xx.

The bus trusts HS256 tokens signed with its local secret and RS256/ES256 tokens whose keys
its JWKS names, each with ``iss`` and ``aud`` checked; the tenant is taken from the token
only. The forged tokens below come from what attackers try: no algorithm, keys of their
own, an HMAC keyed with the public RSA key (HS/RS confusion), bent claims, and garbage.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping
from typing import Any

import httpx
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.bus import SECRET
from tests.fixtures.jwks import SigningKeys, claims, sign
from tests.hostile.conftest import HostileBus, HostileTally, assert_problem

ROUTES = [
    ("POST", "/v1/events"),
    ("POST", "/v1/events:batch"),
    ("GET", "/v1/events/some-id"),
    ("GET", "/v1/streams/some-stream"),
    ("GET", "/v1/config/tenantconfig:a/b"),
    ("GET", "/v1/config?prefix=tenantconfig:"),
]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(header: Mapping[str, Any], payload: Mapping[str, Any], key: bytes | None = None) -> str:
    """A token built by hand: PyJWT refuses to sign ``none`` or HS256 with a PEM key."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest() if key is not None else b""
    return f"{signing_input}.{_b64(signature)}"


def signed(payload: Mapping[str, Any], key: Any, algorithm: str, kid: str | None = None) -> str:
    """Signed by PyJWS, which (unlike ``jwt.encode``) signs claims of any shape."""
    headers = {"kid": kid} if kid is not None else None
    return jwt.api_jws.PyJWS().encode(json.dumps(payload).encode(), key, algorithm=algorithm, headers=headers)


def event(**fields: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/hostile", "type": "thing.happened"} | fields


def send(client: httpx.Client, method: str, path: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    if method == "POST":
        body: Any = [event()] if path.endswith(":batch") else event()
        return client.post(path, json=body, headers=headers)
    return client.get(path, headers=headers)


def forged_tokens(bus: HostileBus) -> dict[str, str]:
    keys = bus.jwks.keys
    other = SigningKeys()
    good = claims("acme")
    pem = keys.rsa_public_pem()
    without = {name: {k: v for k, v in good.items() if k != name} for name in ("sub", "tenant_id", "exp", "iss", "aud")}
    return {
        "alg none": forge({"alg": "none", "typ": "JWT"}, good),
        "alg none, kid": forge({"alg": "none", "kid": keys.rsa_kid}, good),
        "alg NONE": forge({"alg": "NONE"}, good),
        "alg missing": forge({"typ": "JWT"}, good, SECRET.encode()),
        "wrong HS key": sign(good, "another-secret-that-is-long-enough-for-hs", "HS256"),
        "wrong RSA key, known kid": sign(good, other.rsa, "RS256", keys.rsa_kid),
        "wrong RSA key, unknown kid": sign(good, other.rsa, "RS256", "rsa-evil"),
        "wrong EC key": sign(good, other.ec, "ES256", keys.ec_kid),
        "HS256 keyed with the RSA public key": forge({"alg": "HS256", "kid": keys.rsa_kid}, good, pem),
        "HS256 keyed with the RSA public key, no kid": forge({"alg": "HS256"}, good, pem),
        "HS256 keyed with the JWK's n": forge({"alg": "HS256", "kid": keys.rsa_kid}, good, pem.strip()),
        "RS256 header, EC kid": sign(good, keys.rsa, "RS256", keys.ec_kid),
        "HS384": forge({"alg": "HS384"}, good, SECRET.encode()),
        "RS512": sign(good, keys.rsa, "RS512", keys.rsa_kid),
        "expired": sign(good | {"exp": good["iat"] - 600}, keys.rsa, "RS256", keys.rsa_kid),
        "expired HS": sign(good | {"exp": good["iat"] - 600}, SECRET, "HS256"),
        "future nbf": sign(good | {"nbf": good["iat"] + 600}, keys.rsa, "RS256", keys.rsa_kid),
        "future nbf HS": sign(good | {"nbf": good["iat"] + 600}, SECRET, "HS256"),
        "future iat": sign(good | {"iat": good["iat"] + 600}, keys.rsa, "RS256", keys.rsa_kid),
        "wrong aud": sign(good | {"aud": "other-service"}, keys.rsa, "RS256", keys.rsa_kid),
        "aud list without ours": sign(good | {"aud": ["x", "y"]}, keys.rsa, "RS256", keys.rsa_kid),
        "wrong iss": sign(good | {"iss": "https://evil.test/"}, keys.ec, "ES256", keys.ec_kid),
        "iss not a string": signed(good | {"iss": 7}, keys.rsa, "RS256", keys.rsa_kid),
        "exp not a number": sign(good | {"exp": "tomorrow"}, keys.rsa, "RS256", keys.rsa_kid),
        **{f"no {name}": sign(c, keys.rsa, "RS256", keys.rsa_kid) for name, c in without.items()},
        "empty tenant": sign(good | {"tenant_id": ""}, keys.rsa, "RS256", keys.rsa_kid),
        "tenant an object": sign(good | {"tenant_id": {"$ne": ""}}, keys.rsa, "RS256", keys.rsa_kid),
        "tenant with NUL": sign(good | {"tenant_id": "ac\x00me"}, keys.rsa, "RS256", keys.rsa_kid),
        "tenant with newline": sign(good | {"tenant_id": "acme\nglobex"}, keys.rsa, "RS256", keys.rsa_kid),
        "bad tier": sign(good | {"tier": "root"}, keys.rsa, "RS256", keys.rsa_kid),
        "scope a list": sign(good | {"scope": ["admin"]}, keys.rsa, "RS256", keys.rsa_kid),
        "quota negative": sign(good | {"quota": {"events_per_second": -1}}, keys.rsa, "RS256", keys.rsa_kid),
        "quota a string": sign(good | {"quota": "unlimited"}, keys.rsa, "RS256", keys.rsa_kid),
        "signature stripped": sign(good, keys.rsa, "RS256", keys.rsa_kid).rsplit(".", 1)[0] + ".",
        "signature of another token": sign(claims("globex"), keys.rsa, "RS256", keys.rsa_kid).rsplit(".", 1)[0]
        + "."
        + sign(good, keys.rsa, "RS256", keys.rsa_kid).rsplit(".", 1)[1],
        "two parts": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0",
        "four parts": sign(good, SECRET, "HS256") + ".extra",
        "not base64": "!!!.???.***",
        "huge": "a" * 8_000,
        "jku header": forge({"alg": "RS256", "jku": "http://127.0.0.1:9/evil.json", "kid": "x"}, good, b"x"),
        "kid path traversal": forge({"alg": "HS256", "kid": "../../../../dev/null"}, good, b""),
        "kid an object": forge({"alg": "RS256", "kid": {"x": 1}}, good, b"x"),
    }


def test_forged_tokens_are_refused_on_every_route(
    hostile_bus: HostileBus, http: httpx.Client, tally: HostileTally
) -> None:
    wrong: dict[str, tuple[int, str]] = {}
    for name, token in forged_tokens(hostile_bus).items():
        for method, path in ROUTES:
            response = tally.response("token_forged", send(http, method, path, token))
            if response.status_code != 401 or response.headers.get("www-authenticate") != "Bearer":
                wrong[f"{name}: {method} {path}"] = (response.status_code, response.text[:200])
            else:
                assert_problem(response, 401)
    assert not wrong
    assert hostile_bus.healthy()


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Basic YWRtaW46YWRtaW4=",
        "Token abc",
        "bearer\tabc",
        "Bearer a b c",
        "Bearer " + "x" * 60_000,
        "Bearer \u00e9\u00e9",
    ],
)
def test_malformed_authorization_headers_are_401(
    hostile_bus: HostileBus, tally: HostileTally, header: str | None
) -> None:
    headers = {} if header is None else {"Authorization": header.encode("utf-8")}
    for method, path in ROUTES:
        body = [event()] if path.endswith(":batch") else event()
        response = httpx.request(
            method, f"{hostile_bus.base_url}{path}", headers=headers, json=body if method == "POST" else None
        )
        tally.response("token_malformed_header", response)
        assert_problem(response, 401)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    token=st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), min_size=1, max_size=300)
    .map(str.strip)
    .filter(bool)
)
def test_garbage_tokens_are_401(http: httpx.Client, tally: HostileTally, token: str) -> None:
    response = send(http, "POST", "/v1/events", token)
    tally.response("token_garbage", response)
    assert_problem(response, 401)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    payload=st.dictionaries(
        st.sampled_from(["sub", "tenant_id", "tier", "scope", "exp", "nbf", "iat", "quota", "iss", "aud"]),
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    )
)
def test_signed_but_bent_claims_never_crash(
    hostile_bus: HostileBus, http: httpx.Client, tally: HostileTally, payload: dict[str, Any]
) -> None:
    # Signed with the trusted key: only the claims are hostile. Valid claims may pass.
    token = signed(claims("acme") | payload, hostile_bus.jwks.keys.rsa, "RS256", hostile_bus.jwks.keys.rsa_kid)
    for method, path in ROUTES:
        response = tally.response("token_bent_claims", send(http, method, path, token))
        assert response.status_code < 500, response.text[:300]
        if response.status_code >= 400:
            assert_problem(response)


def test_scopes_are_enforced_per_route(hostile_bus: HostileBus, tally: HostileTally) -> None:
    needed = ["events:write", "events:write", "events:read", "events:read", "config:read", "config:read"]
    for (method, path), scope in zip(ROUTES, needed, strict=True):
        others = " ".join(s for s in ("events:write", "events:read", "config:read") if s != scope)
        with hostile_bus.client(hostile_bus.rs256("acme", scope=others)) as client:
            assert_problem(tally.response("token_missing_scope", send(client, method, path)), 403)


def test_the_tenant_comes_only_from_the_token(hostile_bus: HostileBus, tally: HostileTally) -> None:
    with (
        hostile_bus.client(hostile_bus.rs256("acme")) as acme,
        hostile_bus.client(hostile_bus.hs256("globex")) as globex,
    ):
        for claimed in ("globex", "ACME", "acme ", "", "acme\x00", 7, ["acme"], {"id": "acme"}):
            single = tally.response("tenantid_in_body", acme.post("/v1/events", json=event(tenantid=claimed)))
            batch = tally.response(
                "tenantid_in_body", acme.post("/v1/events:batch", json=[event(), event(tenantid=claimed)])
            )
            assert_problem(single, 403, 422)
            assert_problem(batch, 403, 422)
        # Smuggled through headers and the query: ignored, the token's tenant stands.
        sent = event()
        created = acme.post(
            "/v1/events", json=sent, params={"tenant": "globex"}, headers={"X-Tenant-Id": "globex", "Tenant": "globex"}
        )
        tally.response("tenantid_elsewhere", created)
        assert created.status_code == 201 and created.json()["tenant"] == "acme"
        leak = tally.response("tenantid_elsewhere", globex.get(f"/v1/events/{sent['id']}"), secrets=("/hostile",))
        assert_problem(leak, 404)
        # Explicitly null is "not sent" (CloudEvents JSON): stored under the token's tenant.
        nulled = acme.post("/v1/events", json=event(tenantid=None))
        assert nulled.status_code == 201 and nulled.json()["tenant"] == "acme"
