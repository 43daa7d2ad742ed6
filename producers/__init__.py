"""Client SDK for services that post events to tagbus."""

from producers.client import AsyncTagbusClient, EventRejected, TagbusClient, TagbusUnavailable, new_event

__all__ = ["AsyncTagbusClient", "EventRejected", "TagbusClient", "TagbusUnavailable", "new_event"]
