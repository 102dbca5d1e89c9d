"""The one SSE wire parser (service/sdk/sse.py)."""

from __future__ import annotations

from service.sdk.sse import Message, messages


def test_fields_comments_multiline_data_and_blank_lines() -> None:
    lines = [
        ": keep-alive",
        "id: 7",
        "event: revocation",
        'data: {"a":',
        "data: 1}",
        "",
        "",  # a stray blank line is no message
        "event: heartbeat",
        'data:{"at": 1}',  # no space after the colon is allowed
        "",
        "event: half",  # a message never completed by a blank line is not delivered
    ]
    assert list(messages(lines)) == [
        Message("revocation", "7", '{"a":\n1}'),
        Message("heartbeat", None, '{"at": 1}'),
    ]
