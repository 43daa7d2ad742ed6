"""Kinesis write throttling, injected at the boto3 client, for a tailer run in this process.

Why injected: kinesis-mock (npm ``kinesis-local``) declares ``ProvisionedThroughputExceededException``
as a ``PutRecords`` error code but has no per-shard rate check (no "Rate exceeded" anywhere in
its bundle), and on the 2-core test machine it accepted 5,000 records in ten 500-record calls
at about 230 records/s with 0 failures. It can neither be driven past 1,000 records/s nor
throttle. So :class:`ThrottlingKinesis` wraps the real client and behaves like a shard over
its budget: a per-shard token bucket scaled down to ``records_per_second`` so the test load
exceeds it; records past the budget fail with ``ProvisionedThroughputExceededException``
*at random positions* of the request (real partial failures are not a clean tail), and a
share of whole calls is refused with the exception. Refused records are not sent at all,
exactly as Kinesis does not store them.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import botocore.exceptions

THROTTLED = "ProvisionedThroughputExceededException"


class ThrottlingKinesis:
    """A boto3 Kinesis client whose ``put_records`` is throttled like an overloaded single shard."""

    def __init__(
        self,
        client: Any,
        *,
        records_per_second: float = 100.0,
        whole_call_share: float = 0.1,
        seed: int | None = None,
    ) -> None:
        self._client = client
        self._rate = records_per_second
        self._tokens = records_per_second
        self._stamp = time.monotonic()
        self._whole_call_share = whole_call_share
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.calls = 0
        self.refused_calls = 0
        self.partial_calls = 0
        self.refused_records = 0
        self.sent_records = 0
        #: Throttling applies only while set: a burst past the shard's limit, then calm.
        self.active = threading.Event()

    @property
    def injected(self) -> int:
        """Throttle answers given: whole calls refused plus calls with refused records."""
        return self.refused_calls + self.partial_calls

    def put_records(self, **kwargs: Any) -> dict[str, Any]:
        records: list[dict[str, Any]] = list(kwargs["Records"])
        if not self.active.is_set():
            result: dict[str, Any] = self._client.put_records(**kwargs)
            return result
        with self._lock:
            self.calls += 1
            now = time.monotonic()
            self._tokens = min(self._rate, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            if self._random.random() < self._whole_call_share:
                self.refused_calls += 1
                raise botocore.exceptions.ClientError(
                    {"Error": {"Code": THROTTLED, "Message": "Rate exceeded for shard shardId-000000000000"}},
                    "PutRecords",
                )
            allowed = max(0, min(len(records), int(self._tokens)))
            refused = set(self._random.sample(range(len(records)), len(records) - allowed))
            self._tokens -= allowed
            if refused:
                self.partial_calls += 1
                self.refused_records += len(refused)
        sent = [r for i, r in enumerate(records) if i not in refused]
        answers: list[dict[str, Any]] = []
        if sent:
            real = self._client.put_records(**{**kwargs, "Records": sent})
            answers = list(real["Records"])
            failed = int(real.get("FailedRecordCount", 0))
        else:
            failed = 0
        with self._lock:
            self.sent_records += len(sent)
        merged: list[dict[str, Any]] = []
        real_answers = iter(answers)
        for i in range(len(records)):
            if i in refused:
                merged.append({"ErrorCode": THROTTLED, "ErrorMessage": "Rate exceeded for shard shardId-000000000000"})
            else:
                merged.append(next(real_answers))
        return {"FailedRecordCount": failed + len(refused), "Records": merged}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)
