"""Print which version of each Kafka API aiokafka would use against a broker.

aiokafka >= 0.13 negotiates every request version from the broker's ApiVersions answer
(the old ``api_version=`` client option is a deprecated no-op). This shows, per API that
aiokafka implements, the broker's supported range, aiokafka's range and the pick.

    python scripts/kafka_api_versions.py tansu
    python scripts/kafka_api_versions.py apache [--version 4.4.0]
    python scripts/kafka_api_versions.py --bootstrap HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.brokers import (
    DEFAULT_KAFKA_VERSION,
    BrokerProcess,
    start_apache_kafka,
    start_tansu,
)


def aiokafka_requests() -> dict[int, tuple[str, list[int]]]:
    import aiokafka.protocol as proto
    from aiokafka.protocol.api import Request

    out: dict[int, tuple[str, list[int]]] = {}
    for mod in pkgutil.iter_modules(proto.__path__):
        m = importlib.import_module(f"aiokafka.protocol.{mod.name}")
        for name, obj in inspect.getmembers(m, inspect.isclass):
            if issubclass(obj, Request) and obj is not Request and hasattr(obj, "_CLASSES"):
                versions = sorted(c.API_VERSION for c in obj._CLASSES)
                out[obj.API_KEY] = (name.removesuffix("Request"), versions)
    return out


async def broker_versions(bootstrap: str) -> dict[int, tuple[int, int]]:
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        node = next(iter(client.cluster.brokers())).nodeId
        conn = await client._get_conn(node)
        return dict(conn._versions)
    finally:
        await client.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", nargs="?", choices=["tansu", "apache"])
    ap.add_argument("--version", default=DEFAULT_KAFKA_VERSION)
    ap.add_argument("--bootstrap")
    a = ap.parse_args()
    broker: BrokerProcess | None = None
    if a.bootstrap:
        bootstrap = a.bootstrap
    elif a.kind == "tansu":
        broker = start_tansu()
        bootstrap = broker.bootstrap
    elif a.kind == "apache":
        broker = start_apache_kafka(version=a.version)
        bootstrap = broker.bootstrap
    else:
        ap.error("give a kind or --bootstrap")
    try:
        theirs = asyncio.run(broker_versions(bootstrap))
    finally:
        if broker:
            broker.stop()
    print(f"{'api':<22} {'key':>3}  {'broker':>7}  {'aiokafka':>8}  used")
    for key, (name, ours) in sorted(aiokafka_requests().items()):
        if key not in theirs:
            print(f"{name:<22} {key:>3}  {'-':>7}  {ours[0]}..{ours[-1]:<5}  UNSUPPORTED BY BROKER")
            continue
        lo, hi = theirs[key]
        usable = [v for v in ours if lo <= v <= hi]
        pick = str(usable[-1]) if usable else "NONE (incompatible)"
        print(f"{name:<22} {key:>3}  {lo:>3}..{hi:<3}  {ours[0]:>3}..{ours[-1]:<4}  {pick}")


if __name__ == "__main__":
    main()
