"""The shared kernel: what every tagbus component imports, and which imports nothing of ours.

- ``envelope`` — :class:`StoredEvent`, the record that crosses every boundary, and its wire form;
- ``keys`` — the config-key grammar ``<tag>:<path>``;
- ``schema`` — the events table (SQLAlchemy Core metadata for Alembic) and its row → event mapping;
- ``auth`` — bearer-token verification (:class:`TokenVerifier`) shared by every entry point;
- ``gc_tuning`` — the garbage-collector setting of long-running processes.
"""
