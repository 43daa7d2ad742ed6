"""The config server: tenant config held in memory and pushed to watchers as it changes.

A source (:mod:`config_server.source`: the Kinesis stream, or an upstream server) feeds a
:class:`~config_server.state.ConfigState` — every key's entry, a bounded history of recent
changes, the watchers to fan them out to. :class:`~config_server.server.ConfigServer` serves it:

- gRPC ``tagbus.config.v1.ConfigService`` (``config_api/v1/config.proto``): ``Get``, ``List``
  and the server-streaming ``Watch``; health checking and reflection are on, so ``grpcurl``
  works against it;
- HTTP: ``GET /v1/config:watch?prefix=<tag>:<path>&since=<position>`` as Server-Sent Events
  (``id:`` = position, ``Last-Event-ID`` resumes), ``/healthz``, ``/readyz``, ``/metrics``.

Both take the tenant from a bearer token with the scope ``config:read`` (``config:replicate``
lets a watch span every tenant, for chaining servers). Modules: ``settings`` (bounds),
``state``, ``access`` (who may read what, which requests are well formed), ``watch`` (one
stream's frames and bounds, whatever the protocol), ``service`` (gRPC), ``sse`` (HTTP),
``metrics``, ``server`` (the process).
"""
