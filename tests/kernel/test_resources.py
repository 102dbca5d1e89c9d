"""Canonical resources (service/kernel/resources.py) and their use by scopes, the guard's
check and the detector's out-of-scope rule.

Examples pin every rule of docs/scopes.md ("Canonical resources"); regression tests pin
the two findings that motivated it (a '..' climbing out of a granted prefix was allowed,
an upper-case host was denied); hypothesis properties check that the guard's call and
the detector's rule agree, that nothing covered resolves outside a granted prefix when a
server decodes it once and merges dot-segments (an independent resolver written here on
urllib), and that canonicalisation is idempotent and its fast path changes nothing.
"""

from __future__ import annotations

import posixpath
import urllib.parse
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from detectors.rules import OUT_OF_SCOPE_REASONS, Thresholds, out_of_scope
from detectors.state import AgentState, TaskState
from service.kernel import resources
from service.kernel.errors import ScopeSyntaxError, ScopeViolation
from service.kernel.events import Decision, UsageEvent
from service.kernel.resources import ResourceRefused, canonical, canonical_pattern
from service.kernel.scopes import ScopeSpec, compile_scope, is_subset, parse_grant, validate
from service.sdk.asgi import default_resource

PROPERTY = settings(max_examples=300, database=None, deadline=None)

TICKETS = "GET:https://api.example.com/v1/tickets/**"
FINDING_SCOPE = ScopeSpec(grants=(TICKETS,), audiences=("a",))


def refusal(resource: str) -> str | None:
    """Why ``canonical`` refuses ``resource``, or None."""
    try:
        canonical(resource)
    except ResourceRefused as refused:
        found = refused
    else:
        return None
    assert found.detail == "out of scope: " + found.why
    return found.why


# --------------------------------------------------------------------------- the findings


@pytest.mark.parametrize(
    "resource",
    [
        "https://api.example.com/v1/tickets/../admin/users",
        "https://api.example.com/v1/tickets/%2e%2e/admin/users",
        "https://api.example.com/v1/tickets/%2E%2E/admin/users",
        "https://api.example.com/v1/tickets/..%2fadmin/users",
        "https://api.example.com/v1/tickets/..%2Fadmin/users",
        "https://api.example.com/v1/tickets/.%2e/admin/users",
        "https://api.example.com/v1/tickets/..\\admin/users",
        "https://api.example.com/v1/tickets/..;/admin/users",
        "https://api.example.com/v1/tickets/1/..",
    ],
)
def test_finding_traversal_out_of_a_granted_prefix_is_refused(resource: str) -> None:
    scope = compile_scope(FINDING_SCOPE)
    assert not scope.covers("GET", resource)
    why = scope.check("GET", resource)
    assert why is not None
    assert why.startswith("out of scope: ")
    assert why.lower().startswith(OUT_OF_SCOPE_REASONS)  # the detector's recognition


@pytest.mark.parametrize(
    "resource",
    [
        "https://API.EXAMPLE.COM/v1/tickets/1",
        "HTTPS://Api.Example.Com/v1/tickets/1",
        "https://api.example.com:443/v1/tickets/1",
        "https://api.example.com:/v1/tickets/1",
        "https://api.example.com/v1/tickets/%31",
        "https://api.example.com/v1/%74ickets/1",
    ],
)
def test_finding_equivalent_urls_are_covered(resource: str) -> None:
    scope = compile_scope(FINDING_SCOPE)
    assert scope.covers("GET", resource)
    assert scope.check("GET", resource) is None
    assert canonical(resource) == "https://api.example.com/v1/tickets/1"


def test_out_of_scope_reason_for_a_plain_miss_names_the_request() -> None:
    scope = compile_scope(FINDING_SCOPE)
    assert scope.check("POST", "https://api.example.com/v1/tickets/1") == (
        "out of scope: POST https://api.example.com/v1/tickets/1 is outside the scope"
    )
    assert scope.check("GET", "https://api.example.com/v1/admin") is not None


# --------------------------------------------------------------------------- web URLs


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        # Already canonical: the fast path returns it unchanged.
        ("https://api.example.com/v1/tickets/1", "https://api.example.com/v1/tickets/1"),
        ("https://h/a?q=1&r=/x", "https://h/a?q=1&r=/x"),
        ("https://h/.well-known/jwks.json", "https://h/.well-known/jwks.json"),
        ("https://h/a/...", "https://h/a/..."),
        ("https://h/a/..x/.b", "https://h/a/..x/.b"),
        # Scheme and host case (RFC 3986 §3.1, §3.2.2); the path keeps its case.
        ("HTTPS://API.Example.COM/V1/Tickets", "https://api.example.com/V1/Tickets"),
        ("Http://H/", "http://h/"),
        ("https://[2001:DB8::1]/x", "https://[2001:db8::1]/x"),
        # Default and empty ports (§6.2.3, RFC 9110 §4.2.3, RFC 6455 §3).
        ("https://h:443/x", "https://h/x"),
        ("http://h:80/x", "http://h/x"),
        ("ws://h:80/x", "ws://h/x"),
        ("wss://h:443/x", "wss://h/x"),
        ("https://h:80/x", "https://h:80/x"),
        ("http://h:443/x", "http://h:443/x"),
        ("https://h:8443/x", "https://h:8443/x"),
        ("https://h:08443/x", "https://h:8443/x"),
        ("https://h:0443/x", "https://h/x"),
        ("https://h:/x", "https://h/x"),
        ("https://[::1]:443/x", "https://[::1]/x"),
        ("https://[::1]:8443/x", "https://[::1]:8443/x"),
        # Empty path.
        ("https://h", "https://h/"),
        ("https://h?q", "https://h/?q"),
        ("https://h:443", "https://h/"),
        # Percent-encoding (§6.2.2.1, §6.2.2.2): unreserved decoded, others upper-cased.
        ("https://h/%7euser/%41%62%2D%5F%2e%30", "https://h/~user/Ab-_.0"),
        ("https://h/a%3ab%2cc%c3%a9", "https://h/a%3Ab%2Cc%C3%A9"),
        ("https://h/a%20b", "https://h/a%20b"),
        ("https://h/x?q=%2e%2E%2f%7E%3d", "https://h/x?q=..%2F~%3D"),
        # Decoded once: '%25' is a literal '%', so '%252e' names '%2e', not '.'.
        ("https://h/a/%252e%252e/b", "https://h/a/%252e%252e/b"),
        ("https://h/100%25", "https://h/100%25"),
        # Dots are literal in the query; '+' is not a space here.
        ("https://h/x?next=/../admin", "https://h/x?next=/../admin"),
        ("https://h/a+b", "https://h/a+b"),
        # Non-ASCII is compared as written (no IDNA, no Unicode case mapping).
        ("https://bücher.example/x", "https://bücher.example/x"),
        ("https://BÜCHER.example/x", "https://bÜcher.example/x"),
    ],
)
def test_web_urls_canonicalise(resource: str, expected: str) -> None:
    assert canonical(resource) == expected
    assert canonical(expected) == expected


@pytest.mark.parametrize(
    ("resource", "why"),
    [
        # Dot-segments, raw or encoded in any case, anywhere in the path.
        ("https://h/..", "dot-segment"),
        ("https://h/.", "dot-segment"),
        ("https://h/a/./b", "dot-segment"),
        ("https://h/a/../b", "dot-segment"),
        ("https://h/a/..", "dot-segment"),
        ("https://h/a/../", "dot-segment"),
        ("https://h/%2e/b", "dot-segment"),
        ("https://h/%2E%2E/b", "dot-segment"),
        ("https://h/%2e%2E/b", "dot-segment"),
        ("https://h/.%2e/b", "dot-segment"),
        ("https://h/%2E./b", "dot-segment"),
        ("https://h/a/%2e%2e", "dot-segment"),
        ("https://h/a/..;jsessionid=1/b", "dot-segment"),
        ("https://h/a/.;x/b", "dot-segment"),
        ("https://h/..?q", "dot-segment"),
        ("http://h/../x", "dot-segment"),
        ("wss://h/../x", "dot-segment"),
        ("HTTPS://H/A/../B", "dot-segment"),
        # Encoded slash or backslash, raw backslash.
        ("https://h/a%2fb", "encoded '/'"),
        ("https://h/a%2Fb", "encoded '/'"),
        ("https://h/a%5cb", "encoded '/'"),
        ("https://h/a%5Cb", "encoded '/'"),
        ("https://h/a\\b", "'\\'"),
        ("https://h/a/..\\b", "'\\'"),
        ("https://h\\evil/a", "'\\'"),
        # Malformed escapes.
        ("https://h/a%", "percent"),
        ("https://h/a%2", "percent"),
        ("https://h/a%zz", "percent"),
        ("https://h/a%+1", "percent"),
        ("https://h/a% 1", "percent"),
        ("https://h/x?q=%g0", "percent"),
        # Fragments, userinfo, hosts and ports.
        ("https://h/a#b", "fragment"),
        ("https://h/a?q#b", "fragment"),
        ("https://user@h/a", "userinfo"),
        ("https://api.example.com@evil.com/v1/tickets/1", "userinfo"),
        ("https://:pw@h/a", "userinfo"),
        ("https:///a", "no host"),
        ("https://:443/a", "no host"),
        ("https://h%2eexample/a", "host"),
        ("https://[::1/a", "host"),
        ("https://[::1]x/a", "host"),
        ("https://h:x/a", "port"),
        ("https://h:1:2/a", "port"),
        ("https://h:65536/a", "port"),
        ("https://h:-1/a", "port"),
        ("https://h:\u0664\u0664\u0663/a", "port"),
        # ASCII controls (WHATWG parsers drop tabs and newlines: '.\t.' would be '..').
        ("https://h/.\t./b", "control"),
        ("https://h/a\nb", "control"),
        ("https://h/a\x00", "control"),
        ("https://h/a\x7f", "control"),
    ],
)
def test_web_urls_refused(resource: str, why: str) -> None:
    found = refusal(resource)
    assert found is not None, resource
    assert why in found
    assert not compile_scope(ScopeSpec(grants=("*:**",))).covers("GET", resource)


# --------------------------------------------------------------------------- other resources


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ("tool/search", "tool/search"),
        ("tool/Search", "tool/Search"),
        ("tool/invoices.read", "tool/invoices.read"),
        ("tool/a..b", "tool/a..b"),
        ("tool/%2e%2e", "tool/%2e%2e"),
        ("kafka://orders.eu", "kafka://orders.eu"),
        ("kafka://Orders.EU", "kafka://Orders.EU"),
        ("KAFKA://Orders.EU", "kafka://Orders.EU"),
        ("kafka://orders..eu", "kafka://orders..eu"),
        ("mcp://GitHub/Search_Issues", "mcp://GitHub/Search_Issues"),
        ("Mcp://github/x", "mcp://github/x"),
        ("mcp://github/%2e%2e/x", "mcp://github/%2e%2e/x"),
        ("sql://reporting/a%2Fb", "sql://reporting/a%2Fb"),
        ("file:///data/reports/q1.csv", "file:///data/reports/q1.csv"),
        ("FILE:///Data/Q1.csv", "file:///Data/Q1.csv"),
        ("file:///data/r%C3%A9sum%c3%a9", "file:///data/r%C3%A9sum%c3%a9"),
        ("file:///data/.hidden/..x", "file:///data/.hidden/..x"),
        ("file://localhost/data/x", "file://localhost/data/x"),
        # ':' without '//' is not a scheme: left exactly as written.
        ("Tool:Search", "Tool:Search"),
        ("urn:X:Y", "urn:X:Y"),
        ("tool/x://y", "tool/x://y"),
    ],
)
def test_other_resources_are_exact(resource: str, expected: str) -> None:
    assert canonical(resource) == expected


@pytest.mark.parametrize(
    ("resource", "why"),
    [
        ("file:///data/../etc/passwd", "dot-segment"),
        ("file:///data/reports/../secrets/key", "dot-segment"),
        ("file:///data/./x", "dot-segment"),
        ("file:///data/..", "dot-segment"),
        ("file:///data/%2e%2e/etc/passwd", "dot-segment"),
        ("file:///data/%2E./etc", "dot-segment"),
        ("file:///data/..%2fetc", "encoded '/'"),
        ("file:///data/a%2Fb", "encoded '/'"),
        ("file:///data/a%5cb", "encoded '/'"),
        ("file:///data/..\\etc", "'\\'"),
        ("FILE:///data/../x", "dot-segment"),
        ("mcp://github/../admin", "dot-segment"),
        ("mcp://github/./x", "dot-segment"),
        ("kafka://orders/..", "dot-segment"),
        ("tool/..", "dot-segment"),
        ("tool/./search", "dot-segment"),
        ("../tool", "dot-segment"),
        ("./tool", "dot-segment"),
        ("..", "dot-segment"),
        (".", "dot-segment"),
    ],
)
def test_other_resources_refused(resource: str, why: str) -> None:
    found = refusal(resource)
    assert found is not None, resource
    assert why in found


def test_file_traversal_is_not_matched_by_a_file_grant() -> None:
    # docs/scopes.md used to say this *was* matched, and left it to the caller.
    scope = compile_scope(ScopeSpec(grants=("read:file:///data/**",)))
    assert scope.covers("read", "file:///data/reports/q1.csv")
    assert not scope.covers("read", "file:///data/../etc/passwd")
    assert not scope.covers("read", "file:///data/reports/../secrets/key")
    assert not scope.covers("read", "file:///data/%2e%2e/etc/passwd")


def test_tool_names_and_kafka_topics_keep_their_case() -> None:
    scope = compile_scope(ScopeSpec(grants=("call:tool/search", "consume:kafka://Orders.EU")))
    assert scope.covers("call", "tool/search")
    assert not scope.covers("call", "tool/Search")
    assert scope.covers("consume", "kafka://Orders.EU")
    assert scope.covers("consume", "KAFKA://Orders.EU")
    assert not scope.covers("consume", "kafka://orders.eu")


def test_refusal_is_a_scope_violation() -> None:
    with pytest.raises(ScopeViolation) as caught:
        canonical("https://h/../x")
    assert isinstance(caught.value, ResourceRefused)
    assert caught.value.status == 403
    assert caught.value.detail == "out of scope: path holds a dot-segment ('.' or '..')"


# --------------------------------------------------------------------------- grant patterns


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("https://api.example.com/v1/**", "https://api.example.com/v1/**"),
        ("HTTPS://API.Example.com:443/V1/**", "https://api.example.com/V1/**"),
        ("https://api.example.com:/v1/*", "https://api.example.com/v1/*"),
        ("http://h:80/**", "http://h/**"),
        ("https://h:8443/**", "https://h:8443/**"),
        ("https://*.EXAMPLE.com:443/x/**", "https://*.example.com/x/**"),
        ("https://*.example.com:8443/x", "https://*.example.com:8443/x"),
        ("https://h/%7e*/%2d**", "https://h/~*/-**"),
        ("https://h/a%3a*", "https://h/a%3A*"),
        ("https://h/a/..*", "https://h/a/..*"),
        ("https://h/*/.b", "https://h/*/.b"),
        # '**' ends what can be known about the authority: lower-cased, nothing else.
        ("https://API.example.com**", "https://api.example.com**"),
        ("https://**", "https://**"),
        # An empty path in a pattern is '/', as in every canonical resource.
        ("https://*.example.com", "https://*.example.com/"),
        ("https://h?*", "https://h/?*"),
        ("https://API.example.com", "https://api.example.com/"),
        # Other schemes: only the scheme is folded.
        ("Kafka://Orders.*", "kafka://Orders.*"),
        ("MCP://GitHub/**", "mcp://GitHub/**"),
        ("tool/Search*", "tool/Search*"),
        ("file:///data/**/*.csv", "file:///data/**/*.csv"),
        ("*://h/x", "*://h/x"),
        ("http*://H/x", "http*://H/x"),
        ("**", "**"),
    ],
)
def test_patterns_canonicalise(pattern: str, expected: str) -> None:
    assert canonical_pattern(pattern) == expected
    assert canonical_pattern(expected) == expected
    assert parse_grant(f"GET:{pattern}").resource == expected


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("https://h/a/../**", "dot-segment"),
        ("https://h/**/../x", "dot-segment"),
        ("https://h/**/..", "dot-segment"),
        ("https://h/*/./x", "dot-segment"),
        ("https://h/%2e%2e/**", "dot-segment"),
        ("https://h/.%2E/**", "dot-segment"),
        ("https://h/..;*/x", "dot-segment"),
        ("https://h/a%2F*", "encoded '/'"),
        ("https://h/a%5c**", "encoded '/'"),
        ("https://h/a\\**", "'\\'"),
        ("https://h/a%*", "percent"),
        ("https://h/a%4*", "percent"),
        ("https://h/**#x", "fragment"),
        ("https://u@*.example.com/**", "userinfo"),
        ("https://*@h/**", "userinfo"),
        ("https://h%41*/x", "host"),
        ("https://h:x/**", "port"),
        ("https:///**", "no host"),
        ("file:///data/../**", "dot-segment"),
        ("file:///data/%2e%2e/**", "dot-segment"),
        ("file:///data/%2F**", "encoded '/'"),
        ("mcp://github/../*", "dot-segment"),
        ("tool/./*", "dot-segment"),
        ("*/..", "dot-segment"),
        ("**/../**", "dot-segment"),
        # A literal pattern is canonicalised exactly like a resource.
        ("https://h/a/../b", "dot-segment"),
        ("file:///data/reports/../secrets/key", "dot-segment"),
    ],
)
def test_patterns_that_could_only_match_refused_resources_are_invalid(
    pattern: str, why: str
) -> None:
    with pytest.raises(ResourceRefused) as caught:
        canonical_pattern(pattern)
    assert why in caught.value.why
    with pytest.raises(ScopeSyntaxError) as invalid:
        parse_grant(f"GET:{pattern}")
    assert "resource pattern can never match" in invalid.value.detail


def test_validate_canonicalises_and_deduplicates_grants() -> None:
    spec = ScopeSpec(
        grants=(
            "GET:HTTPS://API.EXAMPLE.COM:443/v1/tickets/**",
            "GET:https://api.example.com/v1/tickets/**",
            "GET:https://api.example.com/v1/%74ickets/**",
            "consume:KAFKA://Orders.EU",
        ),
        audiences=("a",),
    )
    normal = validate(spec)
    assert normal.grants == (TICKETS, "consume:kafka://Orders.EU")
    assert validate(normal) == normal


def test_canonical_length_is_checked() -> None:
    # 512 characters as written, 513 once the empty path becomes '/'.
    pattern = "https://" + "h" * 496 + ".example"
    assert len(pattern) == 512
    with pytest.raises(ScopeSyntaxError, match="513 characters in canonical form"):
        parse_grant(f"GET:{pattern}")


def test_attenuation_compares_canonical_forms() -> None:
    parent = ScopeSpec(grants=("GET:https://api.example.com/v1/**",), audiences=("a",))
    for child in (
        "GET:HTTPS://API.EXAMPLE.COM/v1/tickets/**",
        "GET:https://api.example.com:443/v1/tickets/1",
        "GET:https://api.example.com/v1/%74ickets/*",
    ):
        assert is_subset(ScopeSpec(grants=(child,), audiences=("a",)), parent), child
    outside = ScopeSpec(grants=("GET:https://api.example.com:8443/v1/x",), audiences=("a",))
    assert not is_subset(outside, parent)
    with pytest.raises(ScopeSyntaxError, match="dot-segment"):
        is_subset(ScopeSpec(grants=("GET:https://api.example.com/v1/../admin",)), parent)


# --------------------------------------------------------------------------- the ASGI edge


def asgi_scope(path: str, host: bytes = b"api.example.com") -> dict[str, Any]:
    return {"type": "http", "scheme": "https", "path": path, "headers": [(b"host", host)]}


@pytest.mark.parametrize(
    ("decoded_path", "covered"),
    [
        ("/v1/tickets/1", True),
        ("/v1/tickets/../admin/users", False),  # raw '..' or '%2e%2e', decoded by the server
        ("/v1/tickets/./1", False),
        ("/v1/tickets/a\\b", False),
        ("/v1/tickets/?/../../admin", False),  # from '%3F': a path, not a query
        ("/v1/tickets/#/../../admin", False),  # from '%23'
        ("/v1/tickets/%2e%2e/admin", True),  # from '%252e%252e': the literal name '%2e%2e'
        ("/v1/tickets/%41", True),  # from '%2541': the literal name '%41', not 'A'
        ("/v1/tickets/a\tb", True),  # from '%09': escaped back, a literal tab
    ],
)
def test_default_resource_is_the_path_the_app_routes(decoded_path: str, covered: bool) -> None:
    resource = default_resource(asgi_scope(decoded_path))
    scope = compile_scope(FINDING_SCOPE)
    assert scope.covers("GET", resource) is covered, resource
    if covered:
        assert urllib.parse.unquote(urllib.parse.urlsplit(canonical(resource)).path) == (
            decoded_path
        )


def test_default_resource_folds_the_host_header() -> None:
    resource = default_resource(asgi_scope("/v1/tickets/1", host=b"API.Example.com:443"))
    assert compile_scope(FINDING_SCOPE).covers("GET", resource)


# --------------------------------------------------------------------------- properties

HOSTS = st.sampled_from(
    [
        "api.example.com",
        "API.EXAMPLE.COM",
        "Api.Example.Com",
        "api.example.com.",
        "api.example.co",
        "evil.com",
        "api.example.com@evil.com",
        "127.0.0.1",
        "[::1]",
    ]
)
PORTS = st.sampled_from(["", "", "", ":", ":443", ":0443", ":80", ":8443", ":x", ":99999"])
SCHEMES = st.sampled_from(["https", "https", "HTTPS", "Https", "http", "wss", "ws"])
SEGMENTS = st.sampled_from(
    [
        "1",
        "a",
        "B",
        "admin",
        "",
        ".",
        "..",
        "...",
        ".hidden",
        "%2e",
        "%2E",
        "%2e%2E",
        "%2E%2e",
        ".%2e",
        "%2E.",
        "..%2f",
        "%2f",
        "%2F",
        "%5c",
        "\\",
        "..\\",
        "%41",
        "%7e",
        "%7E",
        "~",
        "%3a",
        "%3A",
        "..;x",
        ".;",
        "x;y",
        "%252e",
        "%252e%252e",
        "%25",
        "%",
        "%zz",
        "a%2",
        ".\t.",
    ]
)
QUERIES = st.sampled_from(["", "", "?", "?q=1", "?next=/../admin", "?a=%2e%41", "#x", "?q#f"])
PREFIXES = st.sampled_from(["/v1/tickets/", "/v1/tickets/", "/v1/%74ickets/", "/v1/", "/"])


@st.composite
def web_urls(draw: st.DrawFn) -> str:
    path = draw(PREFIXES) + "/".join(draw(st.lists(SEGMENTS, max_size=5)))
    return f"{draw(SCHEMES)}://{draw(HOSTS)}{draw(PORTS)}{path}{draw(QUERIES)}"


@st.composite
def ticket_urls(draw: st.DrawFn) -> str:
    """URLs spelling the granted origin and prefix in every equivalent way, with
    dot-segments and encodings injected among ordinary segments below it."""
    scheme = draw(st.sampled_from(["https", "HTTPS", "hTTps"]))
    host = draw(st.sampled_from(["api.example.com", "API.EXAMPLE.COM", "api.Example.com"]))
    port = draw(st.sampled_from(["", "", ":443", ":", ":0443", ":8443"]))
    prefix = draw(st.sampled_from(["/v1/tickets/", "/v1/%74ickets/", "/v1/tickets%2F", "/v1/"]))
    ordinary = st.sampled_from(["1", "a", "B", "%41", "~", "%7E", ".x", "..x", "%252e", ""])
    # Mostly ordinary segments, so that a good share is covered and the check has teeth.
    segments = st.one_of(ordinary, ordinary, ordinary, SEGMENTS)
    path = "/".join(draw(st.lists(segments, max_size=6)))
    return f"{scheme}://{host}{port}{prefix}{path}{draw(QUERIES)}"


OTHER = st.sampled_from(
    ["tool/", "tool/search", "kafka://", "KAFKA://Orders.", "mcp://github/", "file:///data/"]
)
other_resources = st.builds(
    lambda head, parts: head + "/".join(parts), OTHER, st.lists(SEGMENTS, max_size=4)
)
any_resources = st.one_of(web_urls(), ticket_urls(), other_resources, st.text(max_size=30))

GRANTS = [
    TICKETS,
    "GET:https://api.example.com/v1/*/1",
    "GET:https://API.example.com:443/v1/**",
    "*:https://api.example.com/**",
    "GET:http://api.example.com/**",
    "GET:https://*.example.com/v1/tickets/*",
    "GET:wss://api.example.com/**",
    "GET:https://api.example.com/v1/tickets/~/**",
    "GET:https://api.example.com/v1/tickets/%252e/**",
    "GET:https://127.0.0.1/**",
    "call:tool/**",
    "consume:kafka://Orders.*",
    "read:file:///data/**",
    "*:**",
]
specs = st.lists(st.sampled_from(GRANTS), min_size=1, max_size=3).map(
    lambda grants: ScopeSpec(grants=tuple(grants), audiences=("a",))
)
ACTIONS = st.sampled_from(["GET", "POST", "call", "consume", "read"])


def usage(action: str, resource: str, why: str | None) -> UsageEvent:
    """The usage event the guard emits for a check that answered ``why``."""
    return UsageEvent(
        event_id="e-1",
        at=100.0,
        agent_id="agent",
        task_id="t-1",
        jti_hash="j" * 64,
        action=action,
        resource=resource,
        audience="a",
        decision=Decision.ALLOW if why is None else Decision.DENY,
        reason=why,
    )


@PROPERTY
@given(spec=specs, action=ACTIONS, resource=st.one_of(web_urls(), ticket_urls(), other_resources))
def test_guard_check_and_detector_rule_agree(spec: ScopeSpec, action: str, resource: str) -> None:
    scope = compile_scope(spec)
    why = scope.check(action, resource)  # exactly the guard's call in check_sync
    assert (why is None) == scope.covers(action, resource)
    event(f"covered={why is None}, refused={refusal(resource) is not None}")
    ev = usage(action, resource, why)
    agent = AgentState("agent", 0)
    known = TaskState("t-1", "agent")
    known.learn(spec, None, "active", "agent")
    finding = out_of_scope(ev, known, agent, Thresholds())
    assert (finding is None) == (why is None)
    if finding is not None:
        assert finding.evidence["scope_reason"] == why
        assert finding.evidence["guard_reason"] == why
    # A detector that has not learnt the task yet goes by the guard's deny reason alone.
    unknown = TaskState("t-1", "agent")
    assert (out_of_scope(ev, unknown, agent, Thresholds()) is None) == (why is None)


def resolved(url: str) -> tuple[str, str, str]:
    """How a server that decodes once and merges dot-segments reads ``url``.

    Written on urllib, independently of the module under test: percent-decode the path
    once, treat '\\' as '/' (WHATWG), drop ';' parameters, merge '.' and '..' (RFC 3986
    §5.2.4). Returns (scheme, host, path).
    """
    parts = urllib.parse.urlsplit(url)
    path = urllib.parse.unquote(parts.path).replace("\\", "/")
    path = "/".join(segment.split(";")[0] for segment in path.split("/"))
    merged = posixpath.normpath(path or "/")
    if path.endswith("/") and merged != "/":
        merged += "/"
    return parts.scheme.lower(), (parts.hostname or "").lower(), merged


@settings(PROPERTY, max_examples=1000)
@given(resource=st.one_of(ticket_urls(), web_urls()))
def test_nothing_covered_resolves_outside_the_granted_prefix(resource: str) -> None:
    scope = compile_scope(FINDING_SCOPE)
    covered = scope.covers("GET", resource)
    event(f"covered={covered}")
    if not covered:
        return
    form = canonical(resource)
    assert form.startswith("https://api.example.com/v1/tickets/")
    path = urllib.parse.urlsplit(form).path
    assert not {".", ".."} & set(path.split("/"))
    assert "%2F" not in path
    assert "%5C" not in path
    assert "\\" not in path
    scheme, host, where = resolved(resource)
    assert (scheme, host) == ("https", "api.example.com")
    assert urllib.parse.urlsplit(resource).port in (None, 443)
    assert where.startswith("/v1/tickets/"), (resource, where)


@PROPERTY
@given(resource=any_resources)
def test_canonical_is_idempotent_and_its_fast_path_changes_nothing(resource: str) -> None:
    why: str | None = None
    try:
        slow: str | None = resources._canonical(resource)
    except ResourceRefused as refused:
        slow, why = None, refused.why
    assert refusal(resource) == why
    if slow is not None:
        assert canonical(resource) == slow
        assert canonical(slow) == slow
        event("canonical changed it" if slow != resource else "already canonical")


@st.composite
def web_patterns(draw: st.DrawFn) -> str:
    """A web URL from ``web_urls`` with wildcards put in at a few places."""
    text = draw(web_urls())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["*", "**", "/*", "*/", "/**"])) + text[at:]
    return text


@PROPERTY
@given(pattern=st.one_of(web_patterns(), web_urls(), other_resources))
def test_canonical_pattern_is_idempotent_and_exact_for_literals(pattern: str) -> None:
    if "***" in pattern or not pattern.isprintable() or not pattern:
        return
    try:
        form = canonical_pattern(pattern)
    except ResourceRefused:
        event("refused")
        return
    assert canonical_pattern(form) == form
    if "*" not in pattern:
        assert form == canonical(pattern)
    # The pattern describes canonical resources: with its wildcards left empty it spells
    # one that is already canonical (or refused), as long as the wildcards stay out of
    # the authority, where an empty one can change where the path starts.
    scheme, sep, rest = form.partition("://")
    if not sep or "*" in rest.partition("/")[0] or "*" in scheme:
        return
    plain = form.replace("*", "")
    if refusal(plain) is None:
        assert canonical(plain) == plain, (pattern, form)


def test_the_detector_trusts_a_guard_refusal_of_a_resource_it_sees_cut() -> None:
    """Usage events carry at most 2,048 characters of the resource: a long request the
    guard refused may look covered once cut. The guard's refusal still counts."""
    spec = ScopeSpec(grants=("GET:https://api.example.com/v1/**",), audiences=("a",))
    long = "https://api.example.com/v1/" + "a/" * 1500 + "../admin"
    why = compile_scope(spec).check("GET", long)
    assert why is not None
    assert why.startswith("out of scope")
    cut = usage("GET", long[:2048], why)
    assert compile_scope(spec).check("GET", cut.resource) is None  # covered once cut
    known = TaskState("t-1", "agent")
    known.learn(spec, None, "active", "agent")
    assert out_of_scope(cut, known, AgentState("agent", 0), Thresholds()) is not None
