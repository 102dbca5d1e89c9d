"""Event contracts: one decoder for every topic, and malformed input is an error, not a crash."""

from __future__ import annotations

import msgspec
import pytest

from service.kernel.events import (
    DeadLetter,
    Decision,
    RevocationEvent,
    Source,
    UsageEvent,
    decoder,
    encoder,
    revocation_key,
)


def _usage(**overrides: object) -> UsageEvent:
    fields: dict[str, object] = {
        "event_id": "e1",
        "at": 1.5,
        "agent_id": "billing",
        "task_id": "t1",
        "jti_hash": "ab" * 32,
        "action": "call",
        "resource": "tool/invoices.read",
        "audience": "https://tools.internal",
        "decision": Decision.ALLOW,
        "bytes_out": 120,
        "source": Source(address="10.0.0.7", user_agent="agent/1.0"),
    }
    fields.update(overrides)
    return UsageEvent(**fields)  # type: ignore[arg-type]


def test_usage_event_round_trips_through_the_one_decoder() -> None:
    event = _usage()
    raw = encoder.encode(event)
    assert b'"type":"usage"' in raw
    assert b'"version":1' in raw
    assert decoder.decode(raw) == event


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\xff garbage",
        b'{"type":"usage","event_id":"e1"',  # truncated
        b'{"type":"usage","version":1,"event_id":"e1","at":"yesterday"}',  # wrong type
        b'{"type":"nope"}',  # unknown tag
        b'{"type":"usage","version":2}',  # future version
    ],
)
def test_malformed_input_is_a_decode_error(raw: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decoder.decode(raw)


def test_unknown_fields_and_oversized_fields_are_refused() -> None:
    good = msgspec.to_builtins(_usage())
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        decoder.decode(msgspec.json.encode({**good, "surprise": 1}))
    with pytest.raises(msgspec.ValidationError, match="length"):
        decoder.decode(msgspec.json.encode({**good, "resource": "x" * 5000}))
    with pytest.raises(msgspec.ValidationError, match=">= 0"):
        decoder.decode(msgspec.json.encode({**good, "bytes_out": -1}))


def test_dead_letter_keeps_the_original_bytes() -> None:
    letter = DeadLetter(
        at=2.0,
        topic="killswitch.usage.v1",
        partition=0,
        offset=7,
        reason="truncated JSON",
        key=b"billing",
        value=b"\x00\x01",
    )
    assert decoder.decode(encoder.encode(letter)) == letter


def test_revocation_keys_compact_per_target() -> None:
    base = {
        "revocation_id": "r1",
        "seq": 1,
        "at": 1.0,
        "reason": "x",
        "actor": "a",
        "source": "analyst",
    }
    assert revocation_key(RevocationEvent(target="task", task_ids=["t1", "t2"], **base)) == (
        "task:t1"
    )
    assert revocation_key(RevocationEvent(target="agent", agent_id="b", **base)) == "agent:b"
    assert revocation_key(RevocationEvent(target="cutoff", **base)) == "cutoff:*:None"
    assert revocation_key(RevocationEvent(target="credential", jti_hash="h", **base)) == "jti:h"
