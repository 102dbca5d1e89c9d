"""The declared-scope grammar: parsing, validation, matching and attenuation.

Examples pin the documented behaviour (docs/scopes.md); hypothesis properties check that
attenuation is sound against real matching and that matching agrees with a slow
reference glob matcher written here, independently of the module under test.

Resources and patterns are canonicalised (service/kernel/resources.py, whose rules
tests/kernel/test_resources.py checks). The generated strings here have no scheme, so
the one rule that applies is that a dot-segment ('.' or '..' between slashes) is refused
in a resource and rejected in a pattern; the reference below models exactly that.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import time
from typing import Any, cast

import msgspec
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from service.kernel.errors import ScopeSyntaxError
from service.kernel.scopes import (
    MAX_AUDIENCES,
    MAX_GRANTS,
    CompiledScope,
    Grant,
    Limits,
    ScopeSpec,
    compile_scope,
    covers,
    excess,
    from_scope_claim,
    is_subset,
    parse_grant,
    to_scope_claim,
    validate,
)

# No example database: these tests must not write .hypothesis/ into the tree.
PROPERTY = settings(max_examples=100, database=None, deadline=None)


def scope(*grants: str, audiences: tuple[str, ...] = (), **limits: Any) -> ScopeSpec:
    return ScopeSpec(grants=grants, audiences=audiences, limits=Limits(**limits))


# --------------------------------------------------------------------------- reference


def symbols(pattern: str) -> list[str]:
    """Split a pattern into single literal characters and '*' / '**' wildcards."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        run = 0
        while i + run < len(pattern) and pattern[i + run] == "*":
            run += 1
        if run:
            out.append("*" * run)
            i += run
        else:
            out.append(pattern[i])
            i += 1
    return out


def reference_match(pattern: str, text: str) -> bool:
    """Straightforward recursive glob: '*' any run without '/', '**' any run at all."""
    syms = symbols(pattern)

    @functools.cache
    def match(i: int, j: int) -> bool:
        if i == len(syms):
            return j == len(text)
        sym = syms[i]
        if sym == "**":
            return any(match(i + 1, k) for k in range(j, len(text) + 1))
        if sym == "*":
            k = j
            while True:
                if match(i + 1, k):
                    return True
                if k == len(text) or text[k] == "/":
                    return False
                k += 1
        return j < len(text) and text[j] == sym and match(i + 1, j + 1)

    return match(0, 0)


def has_dot_segment(text: str) -> bool:
    """A '.' or '..' segment: refused as a resource; in a pattern, a literal one."""
    return any(segment in (".", "..") for segment in text.split("/"))


def reference_covers(spec: ScopeSpec, action: str, resource: str) -> bool:
    if has_dot_segment(resource):
        return False
    for grant in spec.grants:
        grant_action, _, pattern = grant.partition(":")
        if grant_action in ("*", action) and reference_match(pattern, resource):
            return True
    return False


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "action", "resource"),
    [
        ("call:tool/search", "call", "tool/search"),
        ("call:mcp://github/create_issue", "call", "mcp://github/create_issue"),
        ("GET:https://api.example.com/v1/repos/**", "GET", "https://api.example.com/v1/repos/**"),
        (
            "POST:https://api.example.com/v1/repos/*/issues",
            "POST",
            "https://api.example.com/v1/repos/*/issues",
        ),
        ("read:file:///data/reports/*.csv", "read", "file:///data/reports/*.csv"),
        ("produce:kafka://orders.*", "produce", "kafka://orders.*"),
        ("consume:kafka://orders.eu", "consume", "kafka://orders.eu"),
        ("*:**", "*", "**"),
        ("db.query_v2-beta:sql://reporting/**", "db.query_v2-beta", "sql://reporting/**"),
        ("read:file:///données/*.csv", "read", "file:///données/*.csv"),
        ("a" * 64 + ":x", "a" * 64, "x"),
        ("read:" + "r" * 512, "read", "r" * 512),
    ],
)
def test_parse_valid_grants(text: str, action: str, resource: str) -> None:
    grant = parse_grant(text)
    assert grant == Grant(action, resource)
    assert str(grant) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("call", "no ':'"),
        ("tool/search", "no ':'"),
        (":tool/search", "action"),
        ("1call:x", "action"),
        ("_call:x", "action"),
        ("ca ll:x", "action"),
        ("call\t:x", "action"),
        ("a" * 65 + ":x", "action"),
        ("**:x", "action"),
        ("appel-é:x", "action"),
        ("call:", "empty"),
        ("call:tool search", "whitespace"),
        ("call: tool", "whitespace"),
        ("call:tool\t", "whitespace"),
        ("call:tool\nx", "whitespace"),
        ("call:x\x00y", "control"),
        ("call:x\x7fy", "control"),
        ("call:x\u00a0y", "whitespace"),
        ("call:x\u200by", "control"),
        ("call:x\u2028y", "whitespace"),
        ("call:a/***", "'***'"),
        ("call:****", "'***'"),
        ("call:" + "a" * 513, "513 characters"),
    ],
)
def test_parse_rejects_invalid_grants(text: str, why: str) -> None:
    with pytest.raises(ScopeSyntaxError) as caught:
        parse_grant(text)
    error = caught.value
    assert why in error.detail
    assert error.detail.startswith(f"grant {repr(text)[:20]}")
    assert error.extra == {"invalid": [error.detail]}
    assert error.status == 400


@pytest.mark.parametrize(
    "text",
    ["read:.", "read:..", "read:a/./b", "read:a/../**", "read:**/..", "read:./*", "call:tool/.."],
)
def test_dot_segment_patterns_are_rejected(text: str) -> None:
    # Such a resource is refused before matching, so the pattern could never match.
    with pytest.raises(ScopeSyntaxError, match="can never match: path holds a dot-segment"):
        parse_grant(text)


def test_parse_splits_at_the_first_colon() -> None:
    assert parse_grant("GET:https://h:8443/a:b") == Grant("GET", "https://h:8443/a:b")


def test_parse_rejects_non_strings_and_truncates_huge_input() -> None:
    with pytest.raises(ScopeSyntaxError, match="not a string"):
        parse_grant(cast(str, None))
    with pytest.raises(ScopeSyntaxError) as caught:
        parse_grant("call:" + "x " * 100_000)
    assert len(caught.value.detail) < 200


# --------------------------------------------------------------------------- validation


def test_validate_removes_duplicates_keeping_order() -> None:
    spec = scope("b:1", "a:2", "b:1", "c:3", "a:2", audiences=("y", "x", "y"))
    normal = validate(spec)
    assert normal.grants == ("b:1", "a:2", "c:3")
    assert normal.audiences == ("y", "x")
    assert validate(normal) == normal


def test_validate_lists_every_bad_item() -> None:
    spec = scope(
        "call:ok",
        "nocolon",
        "call:a b",
        audiences=("fine", "has space", ""),
        max_calls=0,
        max_rate=math.nan,
    )
    with pytest.raises(ScopeSyntaxError) as caught:
        validate(spec)
    invalid = caught.value.extra["invalid"]
    assert invalid == [
        "grant 'nocolon': no ':' between action and resource",
        "grant 'call:a b': resource pattern contains whitespace or a control character",
        "audience 'has space': audience contains whitespace or a control character",
        "audience '': audience is empty",
        "limit max_calls=0: must be an integer >= 1",
        "limit max_rate=nan: must be a finite number > 0",
    ]
    assert "and 3 more" in caught.value.detail


def test_validate_counts() -> None:
    with pytest.raises(ScopeSyntaxError, match="at least one grant"):
        validate(scope())
    validate(scope(*(f"call:t/{i}" for i in range(MAX_GRANTS))))
    with pytest.raises(ScopeSyntaxError, match="at most 256"):
        validate(scope(*(f"call:t/{i}" for i in range(MAX_GRANTS + 1))))
    # Counts are of distinct grants: duplicates are removed, not held against the caller.
    assert validate(scope(*(["call:t"] * 1000))).grants == ("call:t",)
    audiences = tuple(f"aud-{i}" for i in range(MAX_AUDIENCES + 1))
    validate(scope("call:t", audiences=audiences[:-1]))
    with pytest.raises(ScopeSyntaxError, match="at most 32"):
        validate(scope("call:t", audiences=audiences))
    with pytest.raises(ScopeSyntaxError, match="audience"):
        validate(scope("call:t", audiences=("a" * 257,)))


@pytest.mark.parametrize(
    "limits",
    [
        {"max_calls": 0},
        {"max_calls": -1},
        {"max_calls": True},
        {"max_calls": 1.5},
        {"max_bytes_out": -1},
        {"max_bytes_out": False},
        {"max_rate": 0},
        {"max_rate": -0.5},
        {"max_rate": math.nan},
        {"max_rate": math.inf},
        {"max_rate": True},
        {"max_rate": "1"},
        {"max_rate": 10**400},
        {"deadline": math.nan},
        {"deadline": -math.inf},
        {"deadline": -1.0},
    ],
)
def test_validate_rejects_bad_limits(limits: dict[str, Any]) -> None:
    with pytest.raises(ScopeSyntaxError, match="limit "):
        validate(scope("call:t", **limits))


def test_validate_normalises_limits() -> None:
    normal = validate(scope("call:t", max_calls=1, max_bytes_out=0, max_rate=2, deadline=17))
    assert normal.limits == Limits(max_calls=1, max_bytes_out=0, max_rate=2.0, deadline=17.0)
    assert type(normal.limits.max_rate) is float
    assert type(normal.limits.deadline) is float


def test_validate_repairs_hand_built_lists_and_rejects_a_bare_string() -> None:
    spec = ScopeSpec(grants=cast(tuple[str, ...], ["call:t", "call:t"]))
    assert validate(spec).grants == ("call:t",)
    assert compile_scope(spec).covers("call", "t")
    with pytest.raises(ScopeSyntaxError, match="list of strings"):
        validate(ScopeSpec(grants=cast(tuple[str, ...], "call:t")))
    with pytest.raises(ScopeSyntaxError, match="not a string"):
        validate(ScopeSpec(grants=cast(tuple[str, ...], ("call:t", 7))))
    with pytest.raises(ScopeSyntaxError, match="not a string"):
        compile_scope(ScopeSpec(grants=cast(tuple[str, ...], (["call:t"],))))
    with pytest.raises(ScopeSyntaxError, match="limits must be a Limits"):
        compile_scope(ScopeSpec(grants=("call:t",), limits=cast(Limits, {"max_calls": 1})))


def test_scope_spec_decodes_strictly() -> None:
    body = b'{"grants": ["call:t"], "audiences": ["api"], "limits": {"max_calls": 3}}'
    spec = msgspec.json.decode(body, type=ScopeSpec)
    assert spec == scope("call:t", audiences=("api",), max_calls=3)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"grants": ["call:t"], "scope": "x"}', type=ScopeSpec)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"grants": ["call:t"], "limits": {"calls": 3}}', type=ScopeSpec)


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("pattern", "resource", "expected"),
    [
        # '*' stays within a path segment, '**' crosses segments; both may be empty.
        ("tool/*", "tool/search", True),
        ("tool/*", "tool/", True),
        ("tool/*", "tool/a/b", False),
        ("tool/**", "tool/a/b", True),
        ("tool/**", "tool/", True),
        ("tool/**", "tool", False),
        ("tool/search", "tool/Search", False),
        ("tool/search", "tool/search/", False),
        # Dots and every other character except '*' are literal.
        ("kafka://orders.*", "kafka://orders.eu", True),
        ("kafka://orders.*", "kafka://orders.", True),
        ("kafka://orders.*", "kafka://ordersXeu", False),
        ("kafka://orders.*", "kafka://orders.eu/x", False),
        ("a?b", "axb", False),
        ("a?b", "a?b", True),
        ("(x|y)[z]$", "(x|y)[z]$", True),
        ("(x|y)[z]$", "x", False),
        # URL prefixes.
        ("https://api.example.com/v1/repos/**", "https://api.example.com/v1/repos/a/b?x=1", True),
        ("https://api.example.com/v1/repos/**", "https://api.example.com/v1/repos/", True),
        ("https://api.example.com/v1/repos/**", "https://api.example.com/v1/reposX", False),
        ("https://api.example.com/v1/repos/**", "https://api.example.com/v1/repos", False),
        ("https://api.example.com/v1/repos/**", "https://api.example.com.evil/v1/repos/", False),
        (
            "https://api.example.com/v1/repos/*/issues",
            "https://api.example.com/v1/repos/ks/issues",
            True,
        ),
        (
            "https://api.example.com/v1/repos/*/issues",
            "https://api.example.com/v1/repos/a/b/issues",
            False,
        ),
        # Files.
        ("file:///data/reports/*.csv", "file:///data/reports/q1.csv", True),
        ("file:///data/reports/*.csv", "file:///data/reports/.csv", True),
        ("file:///data/reports/*.csv", "file:///data/reports/2024/q1.csv", False),
        ("file:///data/reports/*.csv", "file:///data/reports/q1.csv.gz", False),
        ("file:///data/**/*.csv", "file:///data/reports/2024/q1.csv", True),
        ("file:///data/**/*.csv", "file:///data/q1.csv", False),
        # Several wildcards.
        ("a*b*c", "abc", True),
        ("a*b*c", "aXbYbZc", True),
        ("a*b*c", "aXb/c", False),
        ("a*b*c", "a/bc", False),
        ("**b*c", "b/xbc", True),
        ("**/x/**", "a/b/x/c", True),
        ("**/x/**", "x/c", False),
        # Control characters never appear in patterns, but '**' and '*' match them.
        ("**", "a\nb", True),
        ("a*", "a\n", True),
    ],
)
def test_matching_examples(pattern: str, resource: str, expected: bool) -> None:
    spec = scope(f"act:{pattern}")
    assert covers(spec, "act", resource) is expected
    assert reference_match(pattern, resource) is expected


def test_actions_are_exact_and_case_sensitive() -> None:
    spec = scope("GET:https://h/**", "call:tool/*", "*:kafka://audit")
    assert covers(spec, "GET", "https://h/x")
    assert not covers(spec, "get", "https://h/x")
    assert not covers(spec, "POST", "https://h/x")
    assert not covers(spec, "call", "https://h/x")
    assert covers(spec, "call", "tool/x")
    # An action-'*' grant applies to every action, including ones named nowhere else.
    for action in ("GET", "call", "produce", "*"):
        assert covers(spec, action, "kafka://audit")
    # A request whose action is literally '*' is covered only by '*' grants.
    assert not covers(spec, "*", "tool/x")


def test_audiences_are_exact() -> None:
    compiled = compile_scope(scope("call:t", audiences=("https://api.example.com", "mq")))
    assert compiled.allows_audience("mq")
    assert compiled.allows_audience("https://api.example.com")
    assert not compiled.allows_audience("https://api.example.com/")
    assert not compiled.allows_audience("MQ")
    # No audiences allows no audience: fail closed.
    assert not compile_scope(scope("call:t")).allows_audience("mq")


def test_compiled_scope_is_cached_and_immutable() -> None:
    spec = scope("call:t", "call:t", audiences=("a",))
    compiled = compile_scope(spec)
    assert compile_scope(scope("call:t", "call:t", audiences=("a",))) is compiled
    assert isinstance(compiled, CompiledScope)
    assert compiled.spec == validate(spec)
    assert compiled.grants == (Grant("call", "t"),)
    with pytest.raises(AttributeError):
        compiled.spec = scope("call:other")
    with pytest.raises(AttributeError):
        del compiled.grants


def test_invalid_scope_cannot_be_compiled_or_matched() -> None:
    with pytest.raises(ScopeSyntaxError):
        compile_scope(scope("call:***"))
    with pytest.raises(ScopeSyntaxError):
        covers(scope("call: x"), "call", "x")


@pytest.mark.parametrize(
    ("pattern", "resource"),
    [
        ("*a" * 12 + "*b", "a" * 5000),
        ("**a" * 12 + "**b", "a" * 5000),
        ("**a*a*a*a*a*b**c", "a" * 2000),
        ("x/**/*/**/*/**/*/**/*/**/y", "x/" + "a/" * 1500),
    ],
)
def test_matching_does_not_backtrack_catastrophically(pattern: str, resource: str) -> None:
    # A naive glob-to-regex translation takes longer than the age of the universe here.
    compiled = compile_scope(scope(f"act:{pattern}"))
    started = time.perf_counter()
    assert not compiled.covers("act", resource)
    assert time.perf_counter() - started < 1.0


# --------------------------------------------------------------------------- attenuation


@pytest.mark.parametrize(
    ("child", "parent"),
    [
        ("GET:https://api.example.com/v1/repos/ks/**", "GET:https://api.example.com/v1/repos/**"),
        ("GET:https://api.example.com/v1/repos/ks/issues", "GET:https://api.example.com/**"),
        ("GET:https://api.example.com/v1/repos/*/issues", "GET:https://api.example.com/v1/**"),
        ("call:tool/*", "call:tool/**"),
        ("call:tool/search", "call:tool/*"),
        ("call:tool/search", "*:tool/*"),
        ("read:file:///data/reports/*.csv", "read:file:///data/reports/*"),
        ("read:file:///data/reports/2024/*.csv", "read:file:///data/**"),
        ("read:file:///data/*/*.csv", "read:file:///data/**.csv"),
        ("produce:kafka://orders.eu", "produce:kafka://orders.*"),
        ("produce:kafka://orders.*", "produce:kafka://orders*"),
        ("produce:kafka://orders.*", "produce:kafka://**"),
        ("*:x/**", "*:**"),
    ],
)
def test_subset_examples(child: str, parent: str) -> None:
    assert is_subset(scope(child), scope(parent))
    assert excess(scope(child), scope(parent)) == []


@pytest.mark.parametrize(
    ("child", "parent"),
    [
        ("call:tool/**", "call:tool/*"),
        ("call:tool/*", "call:tool/search"),
        ("produce:kafka://orders*", "produce:kafka://orders.*"),
        ("GET:https://api.example.com/v1/**", "GET:https://api.example.com/v1/repos/**"),
        ("POST:https://api.example.com/v1/repos/**", "GET:https://api.example.com/v1/repos/**"),
        ("get:https://api.example.com/v1/repos/**", "GET:https://api.example.com/v1/repos/**"),
        ("*:tool/search", "call:tool/search"),
        ("*:tool/*", "call:tool/**"),
        ("read:a/*", "read:*"),
        ("read:*/a", "read:*a"),
        ("read:x**", "read:x*"),
        ("read:file:///data/**", "read:file:///data/*"),
    ],
)
def test_not_subset_examples(child: str, parent: str) -> None:
    assert excess(scope(child), scope(parent)) == [f"grant {child!r}"]
    assert not is_subset(scope(child), scope(parent))


def test_excess_reports_audiences_and_limits() -> None:
    parent = scope(
        "call:tool/*",
        audiences=("api", "mq"),
        max_calls=100,
        max_bytes_out=1000,
        max_rate=5,
        deadline=2000.0,
    )
    child = scope(
        "call:tool/search",
        "call:other",
        audiences=("mq", "db"),
        max_calls=None,
        max_bytes_out=1001,
        max_rate=5,
        deadline=1999.5,
    )
    assert excess(child, parent) == [
        "grant 'call:other'",
        "audience 'db'",
        "limit max_calls=None exceeds 100",
        "limit max_bytes_out=1001 exceeds 1000",
    ]
    tighter = scope(
        "call:tool/x",
        audiences=("api",),
        max_calls=100,
        max_bytes_out=0,
        max_rate=0.1,
        deadline=1.0,
    )
    assert excess(tighter, parent) == []
    # A parent without limits bounds nothing; one without audiences admits none.
    assert excess(scope("call:tool/x", max_rate=1e9), scope("call:tool/*")) == []
    assert excess(scope("call:t", audiences=("api",)), scope("call:t")) == ["audience 'api'"]
    assert excess(scope("call:t", max_rate=6.5), parent) == [
        "grant 'call:t'",
        "limit max_calls=None exceeds 100",
        "limit max_bytes_out=None exceeds 1000",
        "limit max_rate=6.5 exceeds 5.0",
        "limit deadline=None exceeds 2000.0",
    ]


def test_excess_rejects_invalid_scopes() -> None:
    with pytest.raises(ScopeSyntaxError):
        excess(scope("call:a b"), scope("call:**"))
    with pytest.raises(ScopeSyntaxError):
        excess(scope("call:x"), scope("call"))


def test_known_incompleteness_fails_closed() -> None:
    # Every string '/**' matches contains a '/', so '**/*' matches it too, but proving it
    # needs the child's '**' split across the parent's '**', '/' and '*'. Not attempted:
    # the check answers "no", which refuses a scope rather than granting too much.
    child, parent = scope("read:/**"), scope("read:**/*")
    assert not is_subset(child, parent)
    strings = ("".join(p) for n in range(7) for p in itertools.product("a/", repeat=n))
    for text in strings:
        if reference_match("/**", text):
            assert reference_match("**/*", text)


# --------------------------------------------------------------------------- JWT claim


def test_scope_claim() -> None:
    spec = scope("call:tool/search", "GET:https://h/**", "call:tool/search", audiences=("a",))
    assert to_scope_claim(spec) == "call:tool/search GET:https://h/**"
    rebuilt = from_scope_claim("  call:tool/search \t GET:https://h/**\n", audiences=("a",))
    assert rebuilt == validate(spec)
    with pytest.raises(ScopeSyntaxError, match="at least one grant"):
        from_scope_claim("")
    with pytest.raises(ScopeSyntaxError, match="list of strings"):
        from_scope_claim("call:t", audiences=cast(tuple[str, ...], "api"))
    with pytest.raises(ScopeSyntaxError):
        to_scope_claim(scope("call:a***"))


# --------------------------------------------------------------------------- properties

ACTIONS = ("read", "write", "*")
CONCRETE_ACTIONS = ("read", "write", "other")
AUDIENCES = ("api", "db", "mq")
# A small alphabet so wildcards, '/' and literal '.' interact often. A pattern with a
# literal dot-segment is invalid (test_dot_segment_patterns_are_rejected).
patterns = (
    st.text("ab/.*", min_size=1, max_size=8)
    .map(lambda s: re.sub(r"\*{3,}", "**", s))
    .filter(lambda s: not has_dot_segment(s))
)
grant_texts = st.builds("{}:{}".format, st.sampled_from(ACTIONS), patterns)
limits = st.builds(
    Limits,
    max_calls=st.none() | st.integers(1, 4),
    max_bytes_out=st.none() | st.integers(0, 4),
    max_rate=st.none() | st.sampled_from([0.5, 1.0, 2.0]),
    deadline=st.none() | st.sampled_from([10.0, 20.0, 30.0]),
)
specs = st.builds(
    ScopeSpec,
    grants=st.lists(grant_texts, min_size=1, max_size=3).map(tuple),
    audiences=st.lists(st.sampled_from(AUDIENCES), max_size=2).map(tuple),
    limits=limits,
)


def instantiate(data: st.DataObject, pattern: str, *, loose: bool = False) -> str:
    """A concrete string the pattern matches, by filling in each wildcard.

    ``loose`` lets a '*' take a '/' (and wildcards a newline), giving near misses.
    """
    star, double_star = ("ab/.\n", "ab/.\n") if loose else ("ab.", "ab/.")
    out = []
    for sym in symbols(pattern):
        if sym == "*":
            out.append(data.draw(st.text(star, max_size=3)))
        elif sym == "**":
            out.append(data.draw(st.text(double_star, max_size=4)))
        else:
            out.append(sym)
    return "".join(out)


# Replacements that keep a pattern within the original, and some that widen it.
NARROWER = {"*": ["*", "", "a", "a*", "*b", ".", "*.*"], "**": ["**", "*", "", "a/", "*/**", "/"]}
WIDER = {"*": ["**", "/", "a/*", "*/", "*/*"], "**": []}
WIDER_LITERAL = ["*", "**", "/", "a"]


@st.composite
def nearby_pattern(draw: st.DrawFn, pattern: str, *, wider: bool) -> str:
    """A pattern within ``pattern`` or, if ``wider``, possibly just outside it."""
    out = []
    for sym in symbols(pattern):
        choices = NARROWER.get(sym, [sym])
        # Widen wildcards more often than literals: a changed literal mostly just fails
        # the containment check early, a widened wildcard probes it.
        if wider and draw(st.integers(0, 3)) < (2 if sym.startswith("*") else 1):
            choices = choices + WIDER.get(sym, WIDER_LITERAL)
        out.append(draw(st.sampled_from(choices)))
    child = re.sub(r"\*{3,}", "**", "".join(out))
    # Replacing a wildcard by '.' can leave a literal dot-segment, which is invalid.
    return child if child and not has_dot_segment(child) else pattern


@st.composite
def nearby_limit(draw: st.DrawFn, bound: float | None, values: list[float], wider: bool) -> Any:
    if bound is None or (wider and draw(st.booleans())):
        return draw(st.none() | st.sampled_from(values))
    return draw(st.sampled_from([v for v in values if v <= bound] + [bound]))


@st.composite
def nearby_spec(draw: st.DrawFn, parent: ScopeSpec, *, wider: bool = False) -> ScopeSpec:
    """A spec built to lie within ``parent`` or, if ``wider``, near its edge."""
    grants = []
    for grant in draw(st.lists(st.sampled_from(parent.grants), min_size=1, max_size=3)):
        action, _, resource = grant.partition(":")
        if action == "*" or (wider and draw(st.integers(0, 4)) == 0):
            action = draw(st.sampled_from(ACTIONS))
        grants.append(f"{action}:{draw(nearby_pattern(resource, wider=wider))}")
    audiences = list(parent.audiences) + (list(AUDIENCES) if wider else [])
    bounds = parent.limits
    return ScopeSpec(
        grants=tuple(grants),
        audiences=tuple(draw(st.lists(st.sampled_from(audiences)))) if audiences else (),
        limits=Limits(
            max_calls=draw(nearby_limit(bounds.max_calls, [1, 2, 3, 4], wider)),
            max_bytes_out=draw(nearby_limit(bounds.max_bytes_out, [0, 1, 2, 3, 4], wider)),
            max_rate=draw(nearby_limit(bounds.max_rate, [0.25, 0.5, 1.0, 2.0], wider)),
            deadline=draw(nearby_limit(bounds.deadline, [5.0, 10.0, 20.0, 30.0], wider)),
        ),
    )


def children(parent: ScopeSpec) -> st.SearchStrategy[ScopeSpec]:
    return st.one_of(specs, nearby_spec(parent), nearby_spec(parent, wider=True))


# Fills small enough to enumerate, varied enough to expose a '/' or a '**' where the
# parent cannot take one.
STAR_FILLS = ("", "a", ".b")
DOUBLE_STAR_FILLS = ("", "/", "a/b.")
# Fills that break the pattern's rules ('/' or a newline under '*'): near misses.
LOOSE_FILLS = ("", "a", "/", "\n/a")


def instantiations(pattern: str, limit: int = 81, *, loose: bool = False) -> list[str]:
    """Concrete strings the pattern matches: each wildcard filled every small way.

    With ``loose`` every wildcard takes ``LOOSE_FILLS``, so some results do not match.
    """
    star, double_star = (LOOSE_FILLS, LOOSE_FILLS) if loose else (STAR_FILLS, DOUBLE_STAR_FILLS)
    options = [
        star if sym == "*" else double_star if sym == "**" else (sym,) for sym in symbols(pattern)
    ]
    return ["".join(parts) for parts in itertools.islice(itertools.product(*options), limit)]


def assert_sound(data: st.DataObject, child: ScopeSpec, parent: ScopeSpec) -> None:
    """Everything the child covers, the parent covers: on instantiations of each child
    grant (so the check is never vacuous) and on an arbitrary string. An instantiation
    with a dot-segment is refused by both."""
    for grant in validate(child).grants:
        action, _, pattern = grant.partition(":")
        for concrete in CONCRETE_ACTIONS if action == "*" else (action,):
            for resource in instantiations(pattern):
                refused = has_dot_segment(resource)
                assert covers(child, concrete, resource) is not refused
                assert covers(parent, concrete, resource) is not refused, (
                    grant,
                    concrete,
                    resource,
                )
    action = data.draw(st.sampled_from(CONCRETE_ACTIONS))
    resource = data.draw(st.text("ab/.", max_size=8))
    if covers(child, action, resource):
        assert covers(parent, action, resource)


@PROPERTY
@given(data=st.data())
def test_narrowed_scopes_are_subsets_and_sound(data: st.DataObject) -> None:
    parent = data.draw(specs)
    child = data.draw(nearby_spec(parent))
    assert is_subset(child, parent), excess(child, parent)
    assert_sound(data, child, parent)


@PROPERTY
@given(data=st.data())
def test_subset_is_sound_for_arbitrary_pairs(data: st.DataObject) -> None:
    parent = data.draw(specs)
    child = data.draw(children(parent))
    subset = is_subset(child, parent)
    event(f"subset={subset}")
    if subset:
        assert_sound(data, child, parent)


@settings(PROPERTY, max_examples=300)
@given(parent=patterns, parent_action=st.sampled_from(ACTIONS), data=st.data())
def test_grant_containment_is_sound(parent: str, parent_action: str, data: st.DataObject) -> None:
    # One grant each side, so every example exercises the grant-level check.
    child = data.draw(nearby_pattern(parent, wider=True))
    child_action = data.draw(st.sampled_from([parent_action, parent_action, *ACTIONS]))
    outer = scope(f"{parent_action}:{parent}")
    contained = is_subset(scope(f"{child_action}:{child}"), outer)
    event(f"contained={contained}")
    if contained:
        for action in CONCRETE_ACTIONS if child_action == "*" else (child_action,):
            for resource in instantiations(child):
                assert reference_match(child, resource)
                assert reference_match(parent, resource), (child, parent, resource)
                refused = has_dot_segment(resource)
                assert covers(outer, action, resource) is not refused, (child_action, action)


@PROPERTY
@given(parent=specs, data=st.data())
def test_literal_grants_are_decided_exactly(parent: ScopeSpec, data: st.DataObject) -> None:
    action = data.draw(st.sampled_from(("read", "write")))
    resource = data.draw(st.text("ab/.", min_size=1, max_size=8))
    child = ScopeSpec(grants=(f"{action}:{resource}",), limits=parent.limits)
    if has_dot_segment(resource):
        # Refused as a resource, so rejected as a literal grant: nothing to decide.
        assert not covers(parent, action, resource)
        with pytest.raises(ScopeSyntaxError, match="dot-segment"):
            is_subset(child, parent)
        return
    assert is_subset(child, parent) == covers(parent, action, resource)


@PROPERTY
@given(spec=specs)
def test_subset_is_reflexive(spec: ScopeSpec) -> None:
    assert is_subset(spec, spec)
    assert is_subset(validate(spec), spec)
    assert is_subset(spec, validate(spec))


@PROPERTY
@given(data=st.data())
def test_subset_is_transitive(data: st.DataObject) -> None:
    top = data.draw(specs)
    middle = data.draw(children(top))
    bottom = data.draw(children(middle))
    chained = is_subset(bottom, middle) and is_subset(middle, top)
    event(f"chained={chained}")
    if chained:
        assert is_subset(bottom, top)


@PROPERTY
@given(data=st.data())
def test_excess_is_empty_exactly_for_subsets_and_names_each_item(data: st.DataObject) -> None:
    parent = data.draw(specs)
    child = data.draw(children(parent))
    found = excess(child, parent)
    event(f"subset={not found}")
    assert (found == []) == is_subset(child, parent)
    assert all(item.startswith(("grant '", "audience '", "limit ")) for item in found)
    # Dropping what excess names leaves a subset: it named everything that was wrong.
    kept = [g for g in validate(child).grants if f"grant {g!r}" not in found]
    if kept:
        trimmed = ScopeSpec(grants=tuple(kept), limits=parent.limits)
        assert is_subset(trimmed, parent)


# Regex metacharacters in patterns and resources check that literals are escaped.
wide_patterns = (
    st.text("a/.*?[(\\$", min_size=1, max_size=8)
    .map(lambda s: re.sub(r"\*{3,}", "**", s))
    .filter(lambda s: not has_dot_segment(s))
)


@settings(max_examples=150, database=None, deadline=None)
@given(data=st.data())
def test_covers_agrees_with_reference_matcher(data: st.DataObject) -> None:
    grants = data.draw(
        st.lists(st.builds("{}:{}".format, st.sampled_from(ACTIONS), wide_patterns), min_size=1)
    )
    spec = ScopeSpec(grants=tuple(grants[:4]))
    # Aim at one grant, so the resource is often one it (nearly) matches.
    grant_action, _, pattern = data.draw(st.sampled_from(grants[:4])).partition(":")
    actions = CONCRETE_ACTIONS if grant_action == "*" else (grant_action, *CONCRETE_ACTIONS)
    action = data.draw(st.sampled_from(actions))
    resources = [
        data.draw(st.text("a/.*?[(\\$\n", max_size=10)),
        instantiate(data, pattern),
        instantiate(data, pattern, loose=True),
        *instantiations(pattern, loose=True),
    ]
    for resource in resources:
        assert covers(spec, action, resource) == reference_covers(spec, action, resource)


printable_resources = (
    st.text(st.characters(categories=("L", "M", "N", "P", "S")), min_size=1, max_size=20)
    .map(lambda s: re.sub(r"\*{3,}", "**", s))
    .filter(lambda s: not has_dot_segment(s))
)


@PROPERTY
@given(
    grants=st.lists(
        st.builds("{}:{}".format, st.sampled_from(ACTIONS), printable_resources),
        min_size=1,
        max_size=5,
    ),
    audiences=st.lists(st.sampled_from(AUDIENCES), max_size=3).map(tuple),
    limits=limits,
)
def test_scope_claim_round_trips(
    grants: list[str], audiences: tuple[str, ...], limits: Limits
) -> None:
    spec = ScopeSpec(grants=tuple(grants), audiences=audiences, limits=limits)
    claim = to_scope_claim(spec)
    assert claim.split(" ") == list(validate(spec).grants)
    assert from_scope_claim(claim, audiences, limits) == validate(spec)


@PROPERTY
@given(
    resource=printable_resources,
    where=st.integers(0, 20),
    blank=st.sampled_from([" ", "\t", "\n", "\r", "\x0b", "\x00", "\x1f", "\u3000", "\u2029"]),
)
def test_whitespace_or_control_anywhere_is_rejected(resource: str, where: int, blank: str) -> None:
    text = resource[:where] + blank + resource[where:]
    with pytest.raises(ScopeSyntaxError):
        parse_grant(f"read:{text}")
