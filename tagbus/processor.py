"""The KCL's per-shard entry point: ``python -m tagbus.processor``, spawned by the MultiLangDaemon.

It lives in the composition root because it wires the processor: settings from the
environment the daemon passes on, boto3 clients from :mod:`tagbus.aws`, the tag registry
from :mod:`tagbus.compose`.
"""

from __future__ import annotations

import sys

from consumers import processor
from tagbus import compose, settings


def main() -> int:
    loaded = settings.load()
    processor.configure_logging(loaded.environ.get("TAGBUS_LOG_LEVEL", "INFO"))
    return processor.run(compose.shard_processor(loaded))


if __name__ == "__main__":
    sys.exit(main())
