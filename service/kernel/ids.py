"""Identifiers: task ids and SPIFFE IDs.

Task ids are ULIDs in lower-case Crockford base32 (48-bit millisecond time + 80 random
bits): they sort by creation time, which keeps B-tree inserts local and makes "newest
first" a primary-key scan. A task's sub-identity is
``spiffe://<trust-domain>/agent/<agent-id>/task/<task-id>`` and must satisfy the SPIFFE
ID rules (SPIFFE-ID §2): lower-case trust domain of ``[a-z0-9.-_]``, path segments of
``[A-Za-z0-9.-_]`` that are not ``.`` or ``..``, at most 2048 bytes.
"""

from __future__ import annotations

import re
import secrets

from service.kernel.errors import ClientError

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


def new_task_id(now: float) -> str:
    value = (int(now * 1000) << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def validate_trust_domain(trust_domain: str) -> str:
    if not _TRUST_DOMAIN.match(trust_domain):
        raise ClientError(
            f"invalid SPIFFE trust domain {trust_domain!r}: use lower-case letters, digits, . - _"
        )
    return trust_domain


def spiffe_id(trust_domain: str, *segments: str) -> str:
    for segment in segments:
        if not _SEGMENT.match(segment) or segment in (".", ".."):
            raise ClientError(f"invalid SPIFFE path segment {segment!r}")
    value = f"spiffe://{trust_domain}/" + "/".join(segments)
    if len(value.encode()) > 2048:
        raise ClientError("SPIFFE ID longer than 2048 bytes")
    return value


def task_spiffe_id(trust_domain: str, agent_id: str, task_id: str) -> str:
    return spiffe_id(trust_domain, "agent", agent_id, "task", task_id)
