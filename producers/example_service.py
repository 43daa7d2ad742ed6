"""An example producer: a checkout service that records orders and publishes config changes.

Run it against the local stack::

    TAGBUS_TOKEN=$(.venv/bin/tagbus token --tenant acme --tier premium) \\
        .venv/bin/python -m producers.example_service --orders 20
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import uuid

from producers.client import EventRejected, TagbusClient, TagbusUnavailable, new_event


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("TAGBUS_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--orders", type=int, default=10, help="orders to place")
    args = parser.parse_args(argv)
    token = os.environ.get("TAGBUS_TOKEN")
    if not token:
        print("example_service: set TAGBUS_TOKEN (e.g. from `tagbus token --tenant acme`)", file=sys.stderr)
        return 2
    with TagbusClient(args.url, lambda: token) as bus:
        try:
            for _ in range(args.orders):
                order = f"order/{uuid.uuid4().hex[:12]}"
                placed = new_event("order.placed", "/checkout", {"total": random.randint(5, 500)}, subject=order)
                bus.post(placed)
                bus.post(new_event("order.paid", "/checkout", subject=order, causationid=placed["id"]))
            # Configuration goes through the same bus; its read model follows within a second.
            bus.post(new_event("config.set", "/checkout", {"key": "tenantconfig:checkout/max-items", "value": 50}))
        except (EventRejected, TagbusUnavailable) as e:
            print(f"example_service: {e}", file=sys.stderr)
            return 1
    print(f"placed {args.orders} orders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
