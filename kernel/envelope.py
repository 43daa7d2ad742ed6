"""The event envelope: CloudEvents 1.0 JSON as tagbus stores, streams and projects it.

Part of the shared kernel (``kernel``), which every component imports: the
record that crosses every boundary (HTTP → table → WAL → Kinesis → projections) is
defined here, together with its wire format.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

SPECVERSION = "1.0"

#: Kinesis rejects partition keys longer than 256 Unicode characters.
MAX_PARTITION_KEY_CHARS = 256

CONFIG_SET = "config.set"
CONFIG_DELETED = "config.deleted"
CONFIG_TYPES = frozenset({CONFIG_SET, CONFIG_DELETED})

_KNOWN_ATTRIBUTES = frozenset(
    {
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
        "data",
        "tenantid",
        "streamid",
        "version",
        "recordedat",
        "position",
        "correlationid",
        "causationid",
    }
)


# Not frozen, though no code changes one once built: the tailer builds one per decoded row,
# and a frozen dataclass's __init__ (object.__setattr__ per field) was a large share of its
# decode time (``docs/benchmarks.md``, Tailer). Treat it as immutable (it is not hashable).
@dataclass(slots=True)
class StoredEvent:
    """One committed event, as read back from the events table or a Kinesis record."""

    id: str
    tenant: str
    stream: str
    version: int
    type: str
    source: str
    recorded_at: datetime
    data: Any = None
    subject: str | None = None
    time: datetime | None = None
    datacontenttype: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Commit LSN of the transaction that stored the event, as an integer; 0 when unknown.
    position: int = 0
    #: The event carries a payload even though ``data`` is ``None``: it was sent as
    #: ``"data": null``, which CloudEvents tells apart from no ``data`` at all.
    null_data: bool = False

    def to_cloudevent(self) -> dict[str, Any]:
        """The envelope as CloudEvents JSON attributes, with the bus-assigned extensions."""
        body: dict[str, Any] = {
            "specversion": SPECVERSION,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "tenantid": self.tenant,
            "streamid": self.stream,
            "version": self.version,
            "recordedat": _iso(self.recorded_at),
        }
        if self.subject is not None:
            body["subject"] = self.subject
        if self.time is not None:
            body["time"] = _iso(self.time)
        if self.datacontenttype is not None:
            body["datacontenttype"] = self.datacontenttype
        for name in ("correlationid", "causationid"):
            if name in self.metadata:
                body[name] = self.metadata[name]
        # A stored extension never overrides an attribute of ours (e.g. a forged ``version``
        # would defeat the consumers' per-stream ordering); validation refuses such names.
        for name, value in self.metadata.get("extensions", {}).items():
            if name not in _KNOWN_ATTRIBUTES:
                body[name] = value
        if self.data is not None or self.null_data:
            body["data"] = self.data
        if self.position:
            body["position"] = self.position
        return body

    def to_record_data(self) -> bytes:
        """Bytes of the Kinesis record ``Data`` for this event."""
        return orjson.dumps(self.to_cloudevent())

    @property
    def partition_key(self) -> str:
        return partition_key(self.tenant, self.stream)

    @classmethod
    def from_cloudevent(cls, body: dict[str, Any]) -> StoredEvent:
        """Rebuild a stored event from :meth:`to_cloudevent` output (e.g. a Kinesis record)."""
        metadata: dict[str, Any] = {k: body[k] for k in ("correlationid", "causationid") if k in body}
        extensions = {k: v for k, v in body.items() if k not in _KNOWN_ATTRIBUTES}
        if extensions:
            metadata["extensions"] = extensions
        time = body.get("time")
        return cls(
            id=body["id"],
            tenant=body["tenantid"],
            stream=body["streamid"],
            version=int(body["version"]),
            type=body["type"],
            source=body["source"],
            recorded_at=datetime.fromisoformat(body["recordedat"]),
            data=body.get("data"),
            subject=body.get("subject"),
            time=datetime.fromisoformat(time) if time else None,
            datacontenttype=body.get("datacontenttype"),
            metadata=metadata,
            position=int(body.get("position", 0)),
            null_data="data" in body and body["data"] is None,
        )

    @classmethod
    def from_record_data(cls, data: bytes) -> StoredEvent:
        return cls.from_cloudevent(orjson.loads(data))


def partition_key(tenant: str, stream: str) -> str:
    """Deterministic Kinesis partition key of a ``(tenant, stream)`` pair, ≤ 256 characters.

    Short pairs stay readable (``tenant/stream``); long ones are hashed, which keeps every
    event of one stream on one shard and therefore in version order.
    """
    plain = f"{tenant}/{stream}"
    if len(plain) <= MAX_PARTITION_KEY_CHARS:
        return plain
    digest = hashlib.sha256(f"{len(tenant)}:{tenant}/{stream}".encode()).hexdigest()
    return f"h/{digest}"


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
