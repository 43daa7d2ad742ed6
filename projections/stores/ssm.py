"""The ``paramconfig`` read model: one SSM parameter per key, under ``/tagbus/<tenant>/<path>``.

Never going backwards without a conditional put
------------------------------------------------
SSM ``PutParameter`` has no condition on the current value, so the version rule of the
port is kept like this:

* The parameter's value is a JSON envelope that carries the key's version, not the bare
  value: ``{"v": <value>, "version": n, "position": p, "updated_at": "…"}`` for a set and
  ``{"deleted": true, "version": n, "position": p, "updated_at": "…"}`` for a delete. A
  delete leaves this tombstone instead of calling ``DeleteParameter``, so a late older set
  still finds the higher version and stays a no-op. Reads hide tombstones.
* ``apply`` reads the current envelopes (``GetParameters``, ten names a call), compares
  versions, and writes only newer changes with ``PutParameter(Overwrite=True)``.

Read-compare-write is race-free here because there is exactly one writer per key: the
events of a key form one stream, a stream maps to one Kinesis partition key
(``tenant/stream``) and therefore one shard, and the KCL grants a shard's lease to one
record processor at a time. Two caveats follow from that argument and are the operator's
to respect: a replay must not write to SSM while live consumers run, and after a lease
moves the old holder may finish one in-flight batch (both write versions of the same
events, so at worst a key briefly holds an older value that the next delivery corrects).

Throttling: SSM answers ``ThrottlingException`` ("Rate exceeded") at a few dozen writes per
second per account. Changes of one key within a call are coalesced to the highest version
(one read and at most one write per key), and throttled calls are retried with exponential
backoff before the change is reported ``FAILED`` with :class:`StoreThrottled`.

Names and sizes: a name is ``<root>/<tenant>/<path>``; tenant and path segments must be
``[A-Za-z0-9_.-]``, the hierarchy at most 15 levels and the name short enough for the
1011-character ARN limit. The envelope must fit the tier: 4 KB on ``Standard``, 8 KB on
``Advanced`` or ``Intelligent-Tiering`` (the default, which only pays for advanced storage
when a value needs it). Changes outside these limits fail with :class:`ChangeRejected`.
One store serves one tag (``paramconfig``): the tag is not part of the name.
"""

from __future__ import annotations

import builtins
import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from kernel.retry import Backoff, Jitter
from projections.errors import ChangeRejected, ProjectionError, StoreError, StoreThrottled
from projections.model import ConfigChange, ConfigItem, ConfigKey
from projections.stores.base import ApplyResult, ChangeResult, ConfigPage, Outcome
from projections.stores.botocore_errors import translate

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

log = logging.getLogger(__name__)

Tier = Literal["Standard", "Advanced", "Intelligent-Tiering"]

DEFAULT_ROOT = "/tagbus"
DEFAULT_TAG = "paramconfig"
MAX_LEVELS = 15
#: SSM limits the full ARN (``arn:aws:ssm:<region>:<account>:parameter``…) to 1011 characters.
MAX_NAME_CHARS = 1011 - 80
STANDARD_MAX_VALUE = 4096
ADVANCED_MAX_VALUE = 8192
_GET_BATCH = 10
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")
_STORE = "ssm"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Envelope:
    """A key's state as stored in its parameter value; tombstones have ``deleted``."""

    value: Any
    version: int
    position: int
    updated_at: str
    deleted: bool

    def encode(self) -> str:
        body: dict[str, Any] = {"deleted": True} if self.deleted else {"v": self.value}
        body.update(version=self.version, position=self.position, updated_at=self.updated_at)
        return orjson.dumps(body).decode()

    @classmethod
    def decode(cls, text: str) -> Envelope | None:
        """The envelope in a parameter value, or ``None`` for a value tagbus did not write."""
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("version"), int):
            return None
        deleted = body.get("deleted") is True
        if not deleted and "v" not in body:
            return None
        return cls(
            value=body.get("v"),
            version=body["version"],
            position=int(body.get("position", 0)),
            updated_at=str(body.get("updated_at", "")),
            deleted=deleted,
        )

    @classmethod
    def of(cls, change: ConfigChange) -> Envelope:
        return cls(
            value=None if change.deleted else change.value,
            version=change.version,
            position=change.position,
            updated_at=change.updated_at.isoformat(),
            deleted=change.deleted,
        )


class SSMConfigStore:
    """Config keys of one tag as SSM parameters holding versioned JSON envelopes."""

    def __init__(
        self,
        client: SSMClient,
        *,
        tag: str = DEFAULT_TAG,
        root: str = DEFAULT_ROOT,
        tier: Tier = "Intelligent-Tiering",
        max_attempts: int = 5,
        base_delay: float = 0.2,
        max_delay: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
        write_concurrency: int = 8,
    ) -> None:
        if not root.startswith("/") or root.endswith("/"):
            raise ValueError("root must start with '/' and not end with it")
        self._client = client
        self.tag = tag
        self.root = root
        self.tier: Tier = tier
        self._max_attempts = max_attempts
        self._backoff = Backoff(base_delay, max_delay, Jitter.EQUAL)
        self._sleep = sleep
        self._pool = ThreadPoolExecutor(write_concurrency, thread_name_prefix="ssm")

    # -- names -------------------------------------------------------------------------

    def parameter_name(self, tenant: str, key: ConfigKey) -> str:
        """The parameter of a key; raises :class:`ChangeRejected` if SSM cannot name it."""
        if key.tag != self.tag:
            raise ChangeRejected(f"{key} does not belong to this store (tag {self.tag!r})", store=_STORE)
        if not _SEGMENT.fullmatch(tenant):
            raise ChangeRejected(f"tenant {tenant!r} is not a valid SSM path segment", store=_STORE)
        name = f"{self.root}/{tenant}/{key.path}"
        if name.count("/") > MAX_LEVELS:
            raise ChangeRejected(f"{name} is deeper than SSM's {MAX_LEVELS} levels", store=_STORE)
        if len(name) > MAX_NAME_CHARS:
            raise ChangeRejected(f"parameter name for {key} exceeds {MAX_NAME_CHARS} characters", store=_STORE)
        return name

    # -- writes ------------------------------------------------------------------------

    def apply(self, changes: Sequence[ConfigChange]) -> ApplyResult:
        outcomes: dict[int, ChangeResult] = {}
        winners: dict[str, int] = {}  # parameter name -> index of its highest-version change
        for index, change in enumerate(changes):
            try:
                name = self.parameter_name(change.tenant, change.key)
                self._encode_checked(change)
            except ProjectionError as e:
                outcomes[index] = ChangeResult(change, Outcome.FAILED, e)
                continue
            best = winners.get(name)
            if best is None or changes[best].version < change.version:
                winners[name] = index

        names = list(winners)
        current: dict[str, Envelope | None] = {}
        read_errors: dict[str, ProjectionError] = {}

        def read(chunk: builtins.list[str]) -> dict[str, Envelope | None] | ProjectionError:
            try:
                return self._read(chunk)
            except ProjectionError as e:
                return e

        # GetParameters takes ten names: a large batch's reads are independent and run
        # concurrently too (one after another, they were a sizeable share of a batch's time).
        chunks = [names[start : start + _GET_BATCH] for start in range(0, len(names), _GET_BATCH)]
        for chunk, found in zip(chunks, self._pool.map(read, chunks), strict=True):
            if isinstance(found, ProjectionError):
                read_errors.update(dict.fromkeys(chunk, found))
            else:
                current.update(found)

        def decide(name: str, index: int) -> ChangeResult:
            change = changes[index]
            if name in read_errors:
                return ChangeResult(change, Outcome.FAILED, read_errors[name])
            stored = current.get(name)
            if stored is not None and stored.version >= change.version:
                return ChangeResult(change, Outcome.STALE)
            try:
                self._put(name, self._encode_checked(change))
            except ProjectionError as e:
                return ChangeResult(change, Outcome.FAILED, e)
            return ChangeResult(change, Outcome.APPLIED)

        # One winner per parameter name: the puts are independent and run concurrently.
        names_in_order = list(winners)
        results = self._pool.map(decide, names_in_order, [winners[n] for n in names_in_order])
        decided: dict[str, ChangeResult] = dict(zip(names_in_order, results, strict=True))

        # A change coalesced away shares its winner's fate: stale if the winner got through,
        # failed with the winner's error otherwise (it was not applied either).
        for index, change in enumerate(changes):
            if index in outcomes:
                continue
            name = self.parameter_name(change.tenant, change.key)
            result = decided[name]
            if winners[name] == index:
                outcomes[index] = result
            elif result.outcome is Outcome.FAILED:
                outcomes[index] = ChangeResult(change, Outcome.FAILED, result.error)
            else:
                outcomes[index] = ChangeResult(change, Outcome.STALE)
        return ApplyResult(tuple(outcomes[i] for i in range(len(changes))))

    def _encode_checked(self, change: ConfigChange) -> str:
        try:
            text = Envelope.of(change).encode()
        except TypeError as e:
            raise ChangeRejected(f"value of {change.key} is not serializable: {e}", store=_STORE) from e
        limit = STANDARD_MAX_VALUE if self.tier == "Standard" else ADVANCED_MAX_VALUE
        if len(text) > limit:
            raise ChangeRejected(
                f"value of {change.key} is {len(text)} characters as stored; the {self.tier} tier "
                f"holds at most {limit}",
                store=_STORE,
                code="ParameterValueTooLarge",
            )
        return text

    def _read(self, names: Sequence[str]) -> dict[str, Envelope | None]:
        response = self._call(
            "GetParameters", lambda: self._client.get_parameters(Names=list(names), WithDecryption=False)
        )
        found: dict[str, Envelope | None] = dict.fromkeys(names)
        for parameter in response.get("Parameters", []):
            envelope = Envelope.decode(parameter.get("Value", ""))
            if envelope is None:
                log.warning("parameter %s holds a value tagbus did not write", parameter["Name"])
            found[parameter["Name"]] = envelope
        return found

    def _put(self, name: str, value: str) -> None:
        self._call(
            "PutParameter",
            lambda: self._client.put_parameter(Name=name, Value=value, Type="String", Overwrite=True, Tier=self.tier),
        )

    def _call(self, operation: str, call: Callable[[], T]) -> T:
        """Run one SSM call, backing off while SSM throttles; errors leave translated."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return call()
            except (BotoCoreError, ClientError) as e:
                error = translate(e, store=_STORE, operation=operation)
                if not isinstance(error, StoreThrottled) or attempt >= self._max_attempts:
                    raise error from e
            self._sleep(self._backoff.delay(attempt))

    # -- reads -------------------------------------------------------------------------

    def get(self, tenant: str, key: ConfigKey) -> ConfigItem | None:
        try:
            name = self.parameter_name(tenant, key)
        except ChangeRejected:
            return None  # no parameter can have this name, so the key was never stored
        try:
            response = self._call("GetParameter", lambda: self._client.get_parameter(Name=name, WithDecryption=False))
        except StoreError as e:
            if e.code == "ParameterNotFound":
                return None
            raise
        envelope = Envelope.decode(response["Parameter"].get("Value", ""))
        return _item(key, envelope)

    def list(self, tenant: str, prefix: str, *, limit: int = 100, start_after: str | None = None) -> ConfigPage:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        tag_prefix = f"{self.tag}:"
        if not (prefix.startswith(tag_prefix) or tag_prefix.startswith(prefix)):
            return ConfigPage((), None)
        path_prefix = prefix[len(tag_prefix) :]
        # GetParametersByPath matches whole levels, so ask for the deepest complete level
        # and filter the rest of the prefix here. SSM returns no useful order and cannot
        # start after a name, so the level is read in full and sorted.
        level = path_prefix.rpartition("/")[0]
        if not _SEGMENT.fullmatch(tenant):
            return ConfigPage((), None)
        base = f"{self.root}/{tenant}"
        path = f"{base}/{level}" if level else base
        parameters = self._call("GetParametersByPath", lambda: self._by_path(path))
        items: list[ConfigItem] = []
        for name, value in parameters:
            key_path = name[len(base) + 1 :]
            key_string = f"{tag_prefix}{key_path}"
            if not key_string.startswith(prefix) or (start_after is not None and key_string <= start_after):
                continue
            try:
                key = ConfigKey(self.tag, key_path)
            except ProjectionError:
                continue  # not a name tagbus writes
            item = _item(key, Envelope.decode(value))
            if item is not None:
                items.append(item)
        items.sort(key=lambda item: str(item.key))
        if len(items) > limit:
            return ConfigPage(tuple(items[:limit]), str(items[limit - 1].key))
        return ConfigPage(tuple(items), None)

    def _by_path(self, path: str) -> builtins.list[tuple[str, str]]:
        paginator = self._client.get_paginator("get_parameters_by_path")
        found: list[tuple[str, str]] = []
        pages: Iterable[Any] = paginator.paginate(Path=path, Recursive=True, WithDecryption=False)
        for page in pages:
            found.extend((p["Name"], p.get("Value", "")) for p in page.get("Parameters", []))
        return found

    def scan(self) -> Iterator[ConfigChange]:
        """Every parameter under the root (``GetParametersByPath``, recursive), tombstones included.

        A page that SSM throttles is asked for again with backoff, like every other call here.
        """
        request: dict[str, Any] = {"Path": self.root, "Recursive": True, "WithDecryption": False, "MaxResults": 10}
        while True:
            page = self._call("GetParametersByPath", functools.partial(self._client.get_parameters_by_path, **request))
            for parameter in page.get("Parameters", []):
                change = self._scanned_change(parameter["Name"], parameter.get("Value", ""))
                if change is not None:
                    yield change
            token = page.get("NextToken")
            if not token:
                return
            request["NextToken"] = token

    def _scanned_change(self, name: str, value: str) -> ConfigChange | None:
        tenant, _, path = name[len(self.root) + 1 :].partition("/")
        envelope = Envelope.decode(value)
        try:
            if envelope is None:
                raise ValueError("the value is not a tagbus envelope")
            return ConfigChange(
                tenant=tenant,
                key=ConfigKey(self.tag, path),
                value=envelope.value,
                version=envelope.version,
                position=envelope.position,
                updated_at=datetime.fromisoformat(envelope.updated_at),
                deleted=envelope.deleted,
            )
        except (ValueError, ProjectionError) as e:
            log.warning("parameter %s is not one tagbus wrote: %s", name, e)
            return None


def _item(key: ConfigKey, envelope: Envelope | None) -> ConfigItem | None:
    if envelope is None or envelope.deleted:
        return None
    return ConfigItem(
        key=key,
        value=envelope.value,
        version=envelope.version,
        updated_at=datetime.fromisoformat(envelope.updated_at),
    )
