"""Guard verification per core, cold and cached, next to PyJWT in the same run; and the
memory of the revocation state per 1M revoked credentials.

One run prints:

1. Library limits, single core, measured now: raw Ed25519 verifies/s (cryptography) and
   PyJWT ``jwt.decode(..., algorithms=["EdDSA"], audience=…, issuer=…)`` decodes/s on the
   same killswitch-shaped tokens.
2. ``Guard.check_sync`` checks/s:
   * **cold** — every token seen for the first time: parse, signature, claims, scope
     compile, cache insert;
   * **cached** — a working set of tokens checked again and again (dict hit, expiry,
     staleness, revocation, the scope decision remembered per (action, resource));
   * **cached, a new URL each call** — the same tokens, each call to another URL that
     needs normalising (host case, default port, an escape): canonicalisation and the
     precompiled scope match run every time;
   * each with and without usage reporting (building the ``UsageEvent`` and queueing it;
     the JSON encoding then happens off the request path in the emitter, its cost is
     shown separately as "usage encode").
3. ``DenyState`` memory for 1M revoked jti hashes (tracemalloc), next to a plain
   ``set`` of the 64-character hex strings.

Everything runs in one process, pinned to one CPU when possible. The revocation feed is
a stand-in that is always fresh (no broker: this measures the guard, not Kafka); keys
are pinned with ``Guard.add_keys``. Best of 3 windows.

Usage:
    python bench/guard.py                  # ~30 s
    python bench/guard.py --quick          # fewer tokens, ~8 s
    python bench/guard.py --json

Target (issue 4): cached >= 200,000 checks/s on one core.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import secrets
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jwt  # noqa: E402
import msgspec  # noqa: E402
from _timing import rate  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: E402

from service.config import Settings  # noqa: E402
from service.kernel.events import RevocationEvent, encoder  # noqa: E402
from service.kernel.jwk import public_jwk, thumbprint  # noqa: E402
from service.kernel.jws import b64url  # noqa: E402
from service.sdk import DenyState, Guard, UsageEmitter  # noqa: E402
from service.sdk.dpop import DPoPKey  # noqa: E402

ISSUER = "http://killswitch.bench"
AUD = "https://tools.internal"
GRANTS = "call:tool/invoices.* GET:https://api.internal/v1/** read:file:///data/**"


class FreshFeed:
    """Always caught up and always heard from: isolates the guard's own cost."""

    def __init__(self) -> None:
        self.state = DenyState()
        self.ready = asyncio.Event()
        self.ready.set()
        self.last_heard = float("inf")

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def stale(self, now: float, bound: float) -> bool:
        return False


def make_tokens(
    n: int, jkt: str | None = None, private: ed25519.Ed25519PrivateKey | None = None
) -> tuple[list[str], ed25519.Ed25519PublicKey, dict[str, Any]]:
    private = private or ed25519.Ed25519PrivateKey.generate()
    jwk = public_jwk(private.public_key())
    kid = thumbprint(jwk)
    header = b64url(msgspec.json.encode({"alg": "EdDSA", "typ": "at+jwt", "kid": kid}))
    now = int(time.time())
    tokens = []
    for i in range(n):
        task = f"task-{i:08d}"
        claims = {
            "iss": ISSUER,
            "sub": f"spiffe://killswitch.local/agent/billing/task/{task}",
            "aud": [AUD],
            "client_id": "billing",
            "scope": GRANTS,
            "jti": b64url(secrets.token_bytes(16)),
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "task": {"id": task, "agent_id": "billing", "parent_id": None, "deadline": now + 3600},
        }
        if jkt is not None:
            claims["cnf"] = {"jkt": jkt}
        signing_input = header + "." + b64url(msgspec.json.encode(claims))
        tokens.append(signing_input + "." + b64url(private.sign(signing_input.encode())))
    return tokens, private.public_key(), {"keys": [{**jwk, "kid": kid, "alg": "EdDSA"}]}


def make_guard(jwks: dict[str, Any], usage: bool) -> Guard:
    emitter = UsageEmitter(Settings(), capacity=10**9) if usage else None
    guard = Guard(ISSUER, AUD, FreshFeed(), usage=emitter, cache_size=10**7)
    guard.add_keys(jwks)
    return guard


def bench_checks(tokens: list[str], jwks: dict[str, Any], cached_rounds: int) -> dict[str, float]:
    results: dict[str, float] = {}
    working_set = tokens[:1000]
    for usage in (False, True):
        label = "+usage" if usage else ""

        # Cold: a fresh guard per window so every token is a first sight.
        def cold(usage: bool = usage) -> int:
            guard = make_guard(jwks, usage)
            check = guard.check_sync
            for token in tokens:
                if not check(token, "call", "tool/invoices.read").allowed:
                    raise SystemExit("cold check denied")
            return len(tokens)

        results[f"cold{label}"] = rate(cold)
        guard = make_guard(jwks, usage)
        for token in working_set:
            guard.check_sync(token, "call", "tool/invoices.read")

        def cached(guard: Guard = guard) -> int:
            check = guard.check_sync
            for _ in range(cached_rounds):
                for token in working_set:
                    check(token, "call", "tool/invoices.read")
            if guard.usage is not None:
                guard.usage._queue.clear()  # what the emitter's task would have drained
            return cached_rounds * len(working_set)

        results[f"cached{label}"] = rate(cached)

        verdict = guard.check_sync(working_set[0], "GET", "https://api.internal/v1/x")
        assert verdict.allowed, verdict.reason
        denied = guard.check_sync(working_set[0], "call", "tool/payments.send")
        assert not denied.allowed
    # The emitter's per-event encoding, done off the request path.
    guard = make_guard(jwks, True)
    for _ in range(10_000):
        guard.check_sync(working_set[0], "call", "tool/invoices.read")
    assert guard.usage is not None
    events = list(guard.usage._queue)

    def encode() -> int:
        for event in events:
            encoder.encode(event)
        return len(events)

    results["usage encode"] = rate(encode)
    return results


def bench_distinct(tokens: list[str], jwks: dict[str, Any], cached_rounds: int) -> dict[str, float]:
    """Cached tokens, each call to a URL never seen before that needs normalising (host
    case, default port, an escape): canonicalisation and the scope match run every time,
    the remembered decisions never hit."""
    guard = make_guard(jwks, False)
    working_set = tokens[:1000]
    for token in working_set:
        guard.check_sync(token, "call", "tool/invoices.read")
    n = 4096 * max(1, cached_rounds // 10)
    urls = [f"https://API.internal:443/v1/items/{i}?page=%7E{i}" for i in range(3 * n)]
    repeated = working_set * (n // len(working_set) + 1)
    windows = iter(range(3))

    def distinct() -> int:
        check = guard.check_sync
        w = next(windows)
        for token, url in zip(repeated, urls[w * n : (w + 1) * n], strict=False):
            check(token, "GET", url)
        return n

    return {"cached distinct": rate(distinct)}


def bench_dpop(cached_rounds: int) -> dict[str, float]:
    """DPoP-bound tokens (RFC 9449): each check verifies a fresh proof (one signature and
    the replay cache) on top of the cached path; a fresh guard per window."""
    key = DPoPKey.generate()
    bound, _, jwks = make_tokens(200, jkt=key.jkt)
    url = "https://api.internal/v1/x"
    n = 2000 * max(1, cached_rounds // 100)
    proofs = [
        (bound[i % len(bound)], key.proof("GET", url, access_token=bound[i % len(bound)]))
        for i in range(n * 3)
    ]
    windows = iter(range(3))

    def with_dpop() -> int:
        guard = make_guard(jwks, False)
        w = next(windows)
        check = guard.check_sync
        for token, proof in proofs[w * n : (w + 1) * n]:
            if not check(token, "GET", url, dpop=proof).allowed:
                raise SystemExit("DPoP check denied")
        return n

    return {"cached dpop": rate(with_dpop)}


def bench_libraries(tokens: list[str], public: ed25519.Ed25519PublicKey) -> dict[str, float]:
    sample = tokens[:5000]
    parts = []
    for token in sample:
        signing_input, _, sig = token.rpartition(".")
        parts.append((signing_input.encode(), jwt.utils.base64url_decode(sig)))

    def raw() -> int:
        for message, signature in parts:
            public.verify(signature, message)
        return len(parts)

    def pyjwt() -> int:
        for token in sample:
            jwt.decode(token, key=public, algorithms=["EdDSA"], audience=AUD, issuer=ISSUER)
        return len(sample)

    return {"ed25519 verify": rate(raw), "pyjwt decode": rate(pyjwt)}


def bench_memory(n: int) -> dict[str, float]:
    def events() -> Any:
        for i in range(n):
            yield RevocationEvent(
                revocation_id=f"r{i}",
                seq=i + 1,
                at=0.0,
                target="credential",
                jti_hash=hashlib.sha256(f"jti-{i}".encode()).hexdigest(),
                reason="bench",
                actor="bench",
                source="detector",
            )

    gc.collect()
    tracemalloc.start()
    state = DenyState()
    for event in events():
        state.apply(event)
    gc.collect()
    ours = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(state.revoked_jtis) == n
    del state
    gc.collect()
    tracemalloc.start()
    plain = {hashlib.sha256(f"jti-{i}".encode()).hexdigest() for i in range(n)}
    theirs = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(plain) == n
    scale = 1_000_000 / n
    return {"state MB/1M": ours * scale / 1e6, "str set MB/1M": theirs * scale / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens (~8 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one CPU")
    args = parser.parse_args()
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    n_tokens = 5_000 if args.quick else 20_000
    tokens, public, jwks = make_tokens(n_tokens)
    results: dict[str, float] = {}
    results.update(bench_libraries(tokens, public))
    results.update(bench_checks(tokens, jwks, cached_rounds=100 if args.quick else 300))
    results.update(bench_distinct(tokens, jwks, cached_rounds=100 if args.quick else 300))
    results.update(bench_dpop(cached_rounds=100 if args.quick else 300))
    results.update(bench_memory(200_000 if args.quick else 1_000_000))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"python {sys.version.split()[0]}, pyjwt {jwt.__version__}, one core, best of 3\n")
    print(f"{'what':<34}{'per second':>14}{'µs each':>10}")
    rows = [
        ("raw Ed25519 verify (cryptography)", "ed25519 verify"),
        ("pyjwt jwt.decode EdDSA", "pyjwt decode"),
        ("guard cold (first sight)", "cold"),
        ("guard cold + usage event", "cold+usage"),
        ("guard cached", "cached"),
        ("guard cached + usage event", "cached+usage"),
        ("guard cached, a new URL each call", "cached distinct"),
        ("guard cached, DPoP proof verified", "cached dpop"),
        ("usage event JSON encode (emitter)", "usage encode"),
    ]
    for label, key in rows:
        value = results[key]
        print(f"{label:<34}{value:>14,.0f}{1e6 / value:>10.2f}")
    with_encode = 1 / (1 / results["cached+usage"] + 1 / results["usage encode"])
    print(f"{'cached + usage incl. encode':<34}{with_encode:>14,.0f}{1e6 / with_encode:>10.2f}")
    print()
    print(f"DenyState, 1M revoked jti hashes: {results['state MB/1M']:.1f} MB")
    print(f"set of 1M hex str (DenyState style):    {results['str set MB/1M']:.1f} MB")


if __name__ == "__main__":
    main()
