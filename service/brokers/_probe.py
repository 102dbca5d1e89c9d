"""Readiness probe: a Kafka metadata round trip through aiokafka's admin client."""

from __future__ import annotations

import contextlib
import logging

from ._process import run_sync

__all__ = ["metadata_probe"]


async def _metadata(bootstrap: str, wait_s: float) -> str | None:
    from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped,unused-ignore]

    ms = max(int(wait_s * 1000), 500)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=ms, client_id="killswitch-ready"
    )
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
    except Exception as e:  # not ready yet: report why
        return f"metadata request failed: {type(e).__name__}: {e}"
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    brokers = cluster.get("brokers") or []
    if not brokers:
        return "metadata lists no brokers yet"
    if cluster.get("controller_id", -1) in (-1, None):
        return "no active controller yet"
    return None


def metadata_probe(bootstrap: str, timeout: float) -> str | None:
    """None when ``bootstrap`` answers a metadata request listing a broker and a controller.

    aiokafka logs every refused connection at ERROR; those are expected while the broker
    starts, so its connection logger is quietened for the duration of the probe.
    """
    conn_log = logging.getLogger("aiokafka")
    old = conn_log.level
    conn_log.setLevel(logging.CRITICAL)
    try:
        return run_sync(lambda: _metadata(bootstrap, timeout))
    finally:
        conn_log.setLevel(old)
