"""The config-key grammar, ``<tag>:<path>``: one definition for the bus, the read models and the
config server.

A tag names a read model (``[A-Za-z][A-Za-z0-9_-]*``, and registered); a path is
``/``-separated segments of ``[A-Za-z0-9_.-]``. A key is also its event's stream, so it is at
most :data:`MAX_KEY_CHARS` characters. Functions return a one-line reason or raise
``ValueError`` with it; each entry point turns that into its own error.
"""

from __future__ import annotations

import re
from collections.abc import Collection

#: A key is its event's stream id, which the bus bounds; the read models' limits lie above it
#: (a DynamoDB sort key takes 1,024 bytes), so a key they would refuse is refused here.
MAX_KEY_CHARS = 512

# Used with ``fullmatch``: ``$`` would also match before a trailing newline ("a\n").
TAG = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")
# What may follow ``<tag>:`` in a prefix of some valid key: whole segments, then part of one.
_PATH_PREFIX = re.compile(r"([A-Za-z0-9_.-]+/)*[A-Za-z0-9_.-]*")


def tag_problem(tag: str) -> str | None:
    """Why ``tag`` cannot be a tag, or ``None``."""
    if not TAG.fullmatch(tag):
        return f"tag {tag!r} is not [A-Za-z][A-Za-z0-9_-]*"
    return None


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a key's path, or ``None``."""
    if not path or not all(SEGMENT.fullmatch(s) for s in path.split("/")):
        return "the path is '/'-separated segments of letters, digits, '_', '.' and '-'"
    return None


def split_key(key: str, tags: Collection[str] | None = None) -> tuple[str, str]:
    """``(tag, path)`` of a valid key; ``ValueError`` naming what is wrong otherwise.

    With ``tags``, the tag must also be one of them (a registered read model).
    """
    if len(key) > MAX_KEY_CHARS:
        raise ValueError(f"a config key is at most {MAX_KEY_CHARS} characters")
    tag, sep, path = key.partition(":")
    if not sep or not tag:
        raise ValueError("a config key is '<tag>:<path>'")
    if tags is not None and tag not in tags:
        raise ValueError(f"unknown tag {tag!r}; registered: {', '.join(sorted(tags))}")
    reason = tag_problem(tag) or path_problem(path)
    if reason:
        raise ValueError(reason)
    return tag, path


def may_prefix_key(prefix: str, tags: Collection[str]) -> bool:
    """Whether some valid key of a registered tag starts with ``prefix``."""
    if len(prefix) > MAX_KEY_CHARS:
        return False
    tag, sep, path = prefix.partition(":")
    if not sep:
        return any(t.startswith(tag) for t in tags)
    return tag in tags and _PATH_PREFIX.fullmatch(path) is not None
