"""The guard against real parts: tokens from ``killswitch serve``, JWKS over HTTP,
revocations on a tansu broker."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from detectors.rules import OUT_OF_SCOPE_REASONS, _reason_is
from service import kafka
from service.brokers import start_tansu
from service.config import Settings
from service.kernel.jws import b64url
from service.kernel.tokens import jti_hash
from service.sdk import Guard, KafkaRevocationFeed, Outcome, Verdict
from tests.sdk.conftest import (
    Service,
    checkpoint,
    kafka_guard,
    publish,
    revocation,
    topic_settings,
)
from tests.support.harness import AUD

TOOL = "tool/invoices.read"


async def until(check: Callable[[], Awaitable[Verdict]], reason: str, within: float = 5) -> float:
    """Poll ``check`` until it denies with ``reason``; return how long that took."""
    start = time.monotonic()
    while True:
        verdict = await check()
        if not verdict.allowed and verdict.reason == reason:
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"still {verdict.reason!r}, wanted {reason!r}"
        await asyncio.sleep(0.005)


def _forge(token: str, *, header: dict[str, str] | None = None, payload: dict | None = None) -> str:
    h, p, s = token.split(".")
    if header is not None:
        old = json.loads(base64.urlsafe_b64decode(h + "=="))
        h = b64url(json.dumps({**old, **header}).encode())
    if payload is not None:
        old = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
        p = b64url(json.dumps({**old, **payload}).encode())
    return f"{h}.{p}.{s}"


async def test_cold_then_cached_decisions_agree(service: Service, settings: Settings) -> None:
    issued = await service.open_task()
    token = issued["access_token"]
    async with kafka_guard(service, settings) as guard:
        cold = guard.check_sync(token, "call", TOOL)
        assert cold.allowed, cold.reason
        assert cold.outcome is Outcome.ALLOWED
        assert cold.claims is not None
        assert cold.claims["task"]["id"] == issued["task"]["id"]
        assert cold.task_id == issued["task"]["id"]
        assert cold.jti_hash == jti_hash(issued["jti"])
        assert guard.cached_tokens == 1
        cached = guard.check_sync(token, "call", TOOL)
        assert cached is cold  # the cached path hands out the entry's one allow verdict
        for check in (guard.check_sync, guard.check_sync):  # deny cached as well
            denied = check(token, "call", "tool/invoices.delete")
            assert not denied.allowed
            assert denied.outcome is Outcome.FORBIDDEN
            assert "outside the scope" in denied.reason
            # The detector's unknown-scope fallback keys on this reason: keep them in step.
            assert _reason_is(denied.reason, OUT_OF_SCOPE_REASONS)
        wrong_action = guard.check_sync(token, "read", TOOL)
        assert wrong_action.outcome is Outcome.FORBIDDEN
    async with kafka_guard(service, settings) as fresh:  # cold sight of an out-of-scope use
        denied = fresh.check_sync(token, "call", "tool/payments.send")
        assert denied.outcome is Outcome.FORBIDDEN
        assert denied.claims is not None


async def test_wrong_audience_and_issuer(service: Service, settings: Settings) -> None:
    token = (await service.open_task())["access_token"]
    async with kafka_guard(service, settings, audience="https://other.internal") as guard:
        verdict = await guard.check(token, "call", TOOL)
        assert verdict.outcome is Outcome.INVALID
        assert verdict.reason == "token not issued for this audience"
        assert verdict.claims is not None  # authentic, so attributed
    feed = KafkaRevocationFeed(settings)
    other = Guard(
        "http://not-the-issuer", AUD, feed, jwks_url=f"{service.url}/.well-known/jwks.json"
    )
    async with other:
        await other.wait_ready()
        assert (await other.check(token, "call", TOOL)).reason == "wrong issuer"


async def test_expiry_cold_and_cached(service: Service, settings: Settings) -> None:
    issued = await service.open_task()
    token = issued["access_token"]
    now = [time.time()]
    async with kafka_guard(service, settings, clock=lambda: now[0], leeway=2) as guard:
        assert guard.check_sync(token, "call", TOOL).allowed
        now[0] = issued["expires_at"] + 1.9  # inside the leeway
        assert guard.check_sync(token, "call", TOOL).allowed
        now[0] = issued["expires_at"] + 2.0
        cached = guard.check_sync(token, "call", TOOL)
        assert (cached.allowed, cached.reason) == (False, "token expired")
        assert guard.cached_tokens == 0
        cold = guard.check_sync(token, "call", TOOL)
        assert (cold.allowed, cold.reason) == (False, "token expired")
        assert cold.agent_id == issued["task"]["agent_id"]
        now[0] = time.time() - 3600  # long before nbf
        assert guard.check_sync(token, "call", TOOL).reason == "token not yet valid"


async def test_forged_and_malformed_tokens(service: Service, settings: Settings) -> None:
    token = (await service.open_task())["access_token"]
    async with kafka_guard(service, settings) as guard:
        cases = {
            "": "missing token",
            "abc": "malformed token: not a compact JWS",
            _forge(token, payload={"scope": "call:**"}): "invalid signature",
            _forge(token, payload={"aud": ["https://tools.internal", "x"]}): "invalid signature",
            _forge(token, header={"typ": "JWT"}): "token type must be at+jwt (RFC 9068 §4)",
            _forge(token, header={"alg": "none"}): "algorithm 'none' not accepted",
            _forge(token, header={"alg": "ES256"}): "algorithm ES256 is not the key's (EdDSA)",
            _forge(token, header={"alg": "HS256"}): "algorithm 'HS256' not accepted",
            token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"): "invalid signature",
        }
        for bad, reason in cases.items():
            for _ in range(2):  # the second answer comes from the rejection cache
                verdict = guard.check_sync(bad, "call", TOOL)
                assert (verdict.allowed, verdict.outcome, verdict.reason) == (
                    False,
                    Outcome.INVALID,
                    reason,
                ), bad
        # A token signed with an attacker's key under the real kid.
        h, p, _ = token.split(".")
        attacker = ed25519.Ed25519PrivateKey.generate()
        forged = f"{h}.{p}.{b64url(attacker.sign(f'{h}.{p}'.encode()))}"
        assert guard.check_sync(forged, "call", TOOL).reason == "invalid signature"
        assert guard.check_sync(token, "call", TOOL).allowed


async def test_unknown_kid_is_refetched_after_rotation(
    service: Service, settings: Settings
) -> None:
    old = (await service.open_task())["access_token"]
    async with kafka_guard(service, settings, jwks_min_interval=0.3) as guard:
        assert (await guard.check(old, "call", TOOL)).allowed
        fetches = guard.jwks_fetches
        await service.admin_post("/v1/keys/rotate")
        new = (await service.open_task())["access_token"]
        assert new.split(".")[0] != old.split(".")[0]  # another kid
        await asyncio.sleep(0.35)  # past the refetch rate limit
        verdict = await guard.check(new, "call", TOOL)
        assert verdict.allowed, verdict.reason
        assert guard.jwks_fetches == fetches + 1
        assert (await guard.check(old, "call", TOOL)).allowed  # the old key stays known

        # Unknown kids cannot make the guard hammer the JWKS endpoint.
        fetches = guard.jwks_fetches
        for i in range(200):
            bogus = _forge(new, header={"kid": f"no-such-key-{i}"})
            assert (await guard.check(bogus, "call", TOOL)).reason == "unknown signing key (kid)"
        assert guard.jwks_fetches <= fetches + 1


async def test_sync_check_sees_rotation_after_background_refetch(
    service: Service, settings: Settings
) -> None:
    async with kafka_guard(service, settings, jwks_min_interval=0.0) as guard:
        await service.admin_post("/v1/keys/rotate")
        token = (await service.open_task())["access_token"]
        first = guard.check_sync(token, "call", TOOL)
        assert first.reason == "unknown signing key (kid)"  # fail closed, refetch scheduled
        for _ in range(200):
            await asyncio.sleep(0.01)
            if guard.check_sync(token, "call", TOOL).allowed:
                break
        else:
            pytest.fail("background JWKS refetch never admitted the new key")


@pytest.mark.parametrize("target", ["credential", "task", "agent", "cutoff", "global"])
async def test_revocation_over_kafka_denies(
    service: Service, settings: Settings, target: str
) -> None:
    agent = await service.agent()
    issued = await service.open_task(agent)
    bystander = (await service.open_task())["access_token"]
    token, task_id = issued["access_token"], issued["task"]["id"]
    async with kafka_guard(service, settings) as guard:
        assert guard.check_sync(token, "call", TOOL).allowed
        now = time.time()
        event, reason = {
            "credential": (
                revocation("credential", jti_hash=jti_hash(issued["jti"])),
                "credential revoked",
            ),
            "task": (revocation("task", task_ids=[task_id]), "task revoked"),
            "agent": (
                revocation("agent", agent_id=agent[0], cutoff=now, task_ids=[task_id]),
                "task revoked",
            ),
            "cutoff": (
                revocation("cutoff", agent_id=agent[0], cutoff=now),
                "issued before the agent's cut-off",
            ),
            "global": (revocation("cutoff", cutoff=now), "issued before the global cut-off"),
        }[target]
        await publish(settings, event)

        async def check() -> Verdict:
            return guard.check_sync(token, "call", TOOL)

        await until(check, reason)
        verdict = await check()
        assert verdict.outcome is Outcome.REVOKED
        other = guard.check_sync(bystander, "call", TOOL)
        assert other.allowed is (target != "global"), other.reason


async def test_task_end_reads_completed(service: Service, settings: Settings) -> None:
    issued = await service.open_task()
    async with kafka_guard(service, settings) as guard:
        await publish(
            settings, revocation("task", task_ids=[issued["task"]["id"]], source="task_end")
        )

        async def check() -> Verdict:
            return guard.check_sync(issued["access_token"], "call", TOOL)

        await until(check, "task completed")


async def test_guard_started_late_knows_every_revocation_before_ready(
    service: Service, settings: Settings
) -> None:
    agent = await service.agent()
    issued = [await service.open_task(agent) for _ in range(3)]
    now = time.time()
    events = [revocation("credential", jti_hash=jti_hash(f"old-{i}")) for i in range(500)]
    events += [
        revocation("credential", jti_hash=jti_hash(issued[0]["jti"])),
        revocation("task", task_ids=[issued[1]["task"]["id"], "child-1"]),
        revocation("cutoff", agent_id="someone-else", cutoff=now),
    ]
    await publish(settings, *events)
    feed = KafkaRevocationFeed(settings)
    guard = Guard(service.url, AUD, feed)
    await guard.start()
    try:
        async with asyncio.timeout(15):
            await feed.ready.wait()
        # Checked the instant ready is set: nothing may still be on its way.
        assert feed.state.applied == len(events)
        assert len(feed.state.revoked_jtis) == 501
        assert feed.state.closed_tasks == {issued[1]["task"]["id"]: "revoked", "child-1": "revoked"}
        assert feed.state.agent_cutoffs == {"someone-else": now}
        await guard.wait_ready()
        verdicts = [guard.check_sync(i["access_token"], "call", TOOL) for i in issued]
        assert [v.reason for v in verdicts] == ["credential revoked", "task revoked", "allowed"]
    finally:
        await guard.stop()


async def test_not_ready_feed_fails_closed(service: Service, settings: Settings) -> None:
    token = (await service.open_task())["access_token"]
    missing = Settings(
        kafka_bootstrap=settings.kafka_bootstrap, kafka_revocations_topic="no-such-topic-yet"
    )
    feed = KafkaRevocationFeed(missing)
    async with Guard(service.url, AUD, feed) as guard:
        await asyncio.sleep(0.3)
        assert not feed.ready.is_set()
        assert not guard.ready
        verdict = guard.check_sync(token, "call", TOOL)
        assert (verdict.allowed, verdict.outcome) == (False, Outcome.UNAVAILABLE)
        assert verdict.reason == "revocation feed not ready"
        assert verdict.claims is not None  # the token itself was fine


async def test_stale_feed_fails_closed(service: Service) -> None:
    token = (await service.open_task())["access_token"]
    broker = start_tansu()
    try:
        settings = topic_settings(broker.bootstrap)
        await kafka.ensure_topics(settings)
        await publish(settings, checkpoint())
        async with kafka_guard(service, settings, max_staleness=0.5) as guard:
            await asyncio.sleep(0.8)  # quiet topic: empty fetches still count as heard
            assert guard.check_sync(token, "call", TOOL).allowed

            async def check() -> Verdict:
                return guard.check_sync(token, "call", TOOL)

            os.kill(broker.pid, signal.SIGKILL)  # the broker dies: the feed goes quiet
            await until(check, "revocation feed stale", within=5)
            # Not before the bound has passed since the broker was last heard from.
            assert time.monotonic() - guard.feed.last_heard >= 0.5
            verdict = await check()
            assert verdict.outcome is Outcome.UNAVAILABLE
    finally:
        broker.stop()
