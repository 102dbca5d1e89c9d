"""Declared scopes: the grant grammar, matching, and attenuation (child ⊆ parent).

This module owns what a declared scope *means*: how a grant ``<action>:<resource-pattern>``
parses, which concrete ``(action, resource)`` pairs it covers, and whether one scope lies
within another (a task within its agent's ceiling, a sub-task within its parent task).
The grammar is documented in ``docs/scopes.md``; keep the two in step.

Resources are compared in one canonical form (``service.kernel.resources``): every
concrete resource is canonicalised before it is matched, and refused outright when a
server could resolve it out of a granted prefix (a dot-segment, an encoded slash); every
grant pattern is put in the same form when it is validated, and a pattern that could only
match refused resources is a syntax error. So the normal form of a scope holds canonical
patterns (lower-case web schemes and hosts, no default ports, unreserved escapes
decoded), and the guard, the detector and issuance decide every request alike.

It performs no I/O, reads no clock and holds no state except a bounded cache of compiled
scopes. Comparing a deadline with the current time is the caller's job.

Two properties every change here must keep (the property tests in
``tests/service/test_scopes.py`` check both):

* attenuation is *sound*: if ``is_subset(child, parent)`` then every pair ``child`` covers,
  ``parent`` covers too. It may be incomplete (answer "no" for a true subset); that fails
  closed and is documented. Canonicalisation keeps this: both scopes match the same
  canonical resource, and containment is decided on the canonical patterns.
* matching never backtracks catastrophically: see ``_glob_regex``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable
from typing import Annotated, Final, NoReturn, TypeAlias

import msgspec

from service.kernel.errors import ScopeSyntaxError
from service.kernel.resources import ResourceRefused, canonical, canonical_pattern

__all__ = [
    "MAX_AUDIENCES",
    "MAX_AUDIENCE_LENGTH",
    "MAX_GRANTS",
    "MAX_RESOURCE_LENGTH",
    "CompiledScope",
    "Grant",
    "Limits",
    "ScopeSpec",
    "compile_scope",
    "covers",
    "excess",
    "from_scope_claim",
    "is_subset",
    "parse_grant",
    "to_scope_claim",
    "validate",
]

MAX_GRANTS: Final = 256
MAX_AUDIENCES: Final = 32
MAX_RESOURCE_LENGTH: Final = 512
MAX_AUDIENCE_LENGTH: Final = 256

_ACTION = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_STAR_RUNS = re.compile(r"(\*+)")
_WHITESPACE = re.compile(r"\s")
_LIMIT_NAMES: Final = ("max_calls", "max_bytes_out", "max_rate", "deadline")
# Longest slice of user input echoed back in an error message.
_SHOWN_CHARS: Final = 80


# --------------------------------------------------------------------------- contracts


class Limits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Usage limits of a scope. ``None`` means unlimited."""

    max_calls: Annotated[int, msgspec.Meta(description="Most calls, at least 1")] | None = None
    max_bytes_out: Annotated[int, msgspec.Meta(description="Most bytes sent out")] | None = None
    max_rate: Annotated[float, msgspec.Meta(description="Calls per second, > 0")] | None = None
    deadline: Annotated[float, msgspec.Meta(description="Absolute, epoch seconds")] | None = None


class ScopeSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A declared scope as it crosses a boundary; ``validate`` gives its normal form."""

    grants: Annotated[
        tuple[str, ...],
        msgspec.Meta(
            description="1-256 grants '<action>:<resource-pattern>' (see docs/scopes.md)",
            examples=[["call:tool/search", "GET:https://api.example.com/v1/repos/**"]],
        ),
    ]
    audiences: Annotated[
        tuple[str, ...],
        msgspec.Meta(description="0-32 audiences (token 'aud'); exact match"),
    ] = ()
    limits: Limits = Limits()


_UNLIMITED: Final = Limits()


class Grant(msgspec.Struct, frozen=True):
    """One parsed grant. Build it with ``parse_grant``, which checks the grammar."""

    action: str
    resource: str

    def __str__(self) -> str:
        return f"{self.action}:{self.resource}"


# --------------------------------------------------------------------------- parsing


def _show(text: str) -> str:
    """Quote user input for an error message without echoing all of a huge string."""
    if len(text) > _SHOWN_CHARS:
        text = text[: _SHOWN_CHARS - 3] + "..."
    return repr(text)


def _chars_problem(text: str, what: str, max_length: int) -> str | None:
    if not text:
        return f"{what} is empty"
    if len(text) > max_length:
        return f"{what} has {len(text)} characters; at most {max_length} allowed"
    # isprintable() rejects control, format and separator characters except the ASCII
    # space; the regex catches that space and anything else Unicode calls whitespace.
    if not text.isprintable() or _WHITESPACE.search(text):
        return f"{what} contains whitespace or a control character"
    return None


def _grant_or_problem(text: object) -> Grant | str:
    if not isinstance(text, str):
        return f"grant of type {type(text).__name__}: not a string"
    shown = f"grant {_show(text)}"
    if not text:
        return f"{shown}: empty"
    # The first ':' ends the action: resources such as URLs contain ':' themselves.
    action, colon, resource = text.partition(":")
    if not colon:
        return f"{shown}: no ':' between action and resource"
    if action != "*" and _ACTION.fullmatch(action) is None:
        return (
            f"{shown}: action must be '*' or a letter followed by at most 63 letters, "
            "digits, '_', '.' or '-'"
        )
    problem = _chars_problem(resource, "resource pattern", MAX_RESOURCE_LENGTH)
    if problem is None and "***" in resource:
        problem = "resource pattern contains '***'; use '*' (within a segment) or '**'"
    if problem is not None:
        return f"{shown}: {problem}"
    try:
        resource = canonical_pattern(resource)
    except ResourceRefused as refused:
        return f"{shown}: resource pattern can never match: {refused.why}"
    if len(resource) > MAX_RESOURCE_LENGTH:
        # Canonicalising may add a '/' (an empty path), so the normal form is counted too.
        return (
            f"{shown}: resource pattern has {len(resource)} characters in canonical form; "
            f"at most {MAX_RESOURCE_LENGTH} allowed"
        )
    return Grant(action, resource)


def parse_grant(text: str) -> Grant:
    """Parse one grant ``<action>:<resource-pattern>``; the pattern in canonical form.

    Raises ``ScopeSyntaxError`` naming the grant and what is wrong with it.
    """
    result = _grant_or_problem(text)
    if isinstance(result, str):
        raise ScopeSyntaxError(result, extra={"invalid": [result]})
    return result


# --------------------------------------------------------------------------- validation


def _whole(value: object, low: int) -> bool:
    # bool is an int subclass; True as a call budget is a bug, not a 1.
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _finite(value: object) -> float | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _strings(raw: object, what: str, problems: list[str]) -> list[object]:
    # msgspec decoding guarantees a tuple; a spec built by hand may hold anything.
    if isinstance(raw, tuple | list):
        return list(raw)
    problems.append(f"{what} must be a list of strings, not {type(raw).__name__}")
    return []


def _valid_grants(raw: object, problems: list[str]) -> tuple[str, ...]:
    valid: list[str] = []
    for item in _strings(raw, "grants", problems):
        result = _grant_or_problem(item)
        if isinstance(result, str):
            problems.append(result)
        else:
            valid.append(str(result))
    grants = tuple(dict.fromkeys(valid))
    if not grants and not problems:
        problems.append("grants: at least one grant is required")
    if len(grants) > MAX_GRANTS:
        problems.append(f"grants: {len(grants)} distinct grants; at most {MAX_GRANTS} allowed")
    return grants


def _valid_audiences(raw: object, problems: list[str]) -> tuple[str, ...]:
    valid: list[str] = []
    for item in _strings(raw, "audiences", problems):
        if not isinstance(item, str):
            problems.append(f"audience of type {type(item).__name__}: not a string")
            continue
        problem = _chars_problem(item, "audience", MAX_AUDIENCE_LENGTH)
        if problem is not None:
            problems.append(f"audience {_show(item)}: {problem}")
        else:
            valid.append(item)
    audiences = tuple(dict.fromkeys(valid))
    if len(audiences) > MAX_AUDIENCES:
        problems.append(
            f"audiences: {len(audiences)} distinct audiences; at most {MAX_AUDIENCES} allowed"
        )
    return audiences


def _valid_limits(raw: object, problems: list[str]) -> Limits:
    if not isinstance(raw, Limits):
        problems.append(f"limits must be a Limits, not {type(raw).__name__}")
        return Limits()
    max_calls, max_bytes_out = raw.max_calls, raw.max_bytes_out
    max_rate, deadline = _finite(raw.max_rate), _finite(raw.deadline)
    before = len(problems)
    if max_calls is not None and not _whole(max_calls, 1):
        problems.append(f"limit max_calls={max_calls!r}: must be an integer >= 1")
    if max_bytes_out is not None and not _whole(max_bytes_out, 0):
        problems.append(f"limit max_bytes_out={max_bytes_out!r}: must be an integer >= 0")
    if raw.max_rate is not None and not (max_rate is not None and max_rate > 0):
        problems.append(f"limit max_rate={raw.max_rate!r}: must be a finite number > 0")
    if raw.deadline is not None and not (deadline is not None and deadline >= 0):
        problems.append(f"limit deadline={raw.deadline!r}: must be finite epoch seconds >= 0")
    if len(problems) > before:
        return raw
    # Floats in normal form, so Limits(max_rate=1) and Limits(max_rate=1.0) look alike.
    return Limits(
        max_calls=max_calls, max_bytes_out=max_bytes_out, max_rate=max_rate, deadline=deadline
    )


def validate(spec: ScopeSpec) -> ScopeSpec:
    """Check a whole scope and return its normal form.

    The normal form holds each grant's pattern in canonical form (``parse_grant``), keeps
    the first occurrence of each grant and audience, in order (grants compared after
    canonicalisation), and holds ``max_rate`` and ``deadline`` as floats. Counts are of
    distinct items. ``validate(validate(spec)) == validate(spec)``.

    Raises ``ScopeSyntaxError`` whose ``extra["invalid"]`` lists every bad item.
    """
    problems: list[str] = []
    grants = _valid_grants(spec.grants, problems)
    audiences = _valid_audiences(spec.audiences, problems)
    limits = _valid_limits(spec.limits, problems)
    if problems:
        shown = "; ".join(problems[:3])
        if len(problems) > 3:
            shown += f"; and {len(problems) - 3} more"
        raise ScopeSyntaxError(shown, extra={"invalid": problems})
    return ScopeSpec(grants=grants, audiences=audiences, limits=limits)


# --------------------------------------------------------------------------- patterns


def _glob_regex(pattern: str) -> str:
    """Translate a resource pattern to a regex for ``fullmatch`` (with ``re.DOTALL``).

    A naive translation (``*`` -> ``[^/]*``, ``**`` -> ``.*``) backtracks polynomially in
    the number of wildcards: ``*a*a*a*a*a*b`` against a long run of ``a`` never finishes,
    and patterns come from agents. Instead each wildcard-then-literal step is committed
    with an atomic group wherever taking the *earliest* occurrence of the literal is
    provably never worse than a later one:

    * after a ``*`` step the star cannot cross ``/``, so two candidate occurrences lie in
      the same ``/``-free window (or, if the literal holds a ``/``, coincide), and the
      earlier leaves every option the later one does;
    * a ``**`` step followed by ``*`` steps is not safe alone (in ``**b*c`` the first
      ``b`` may sit before a ``/`` that the ``*`` cannot cross), so the whole run up to
      the next ``**`` is committed as one unit: its first match ends earliest, and what
      follows is a ``**``, which can reach everything a later end could.

    The final step stays free to backtrack, since it must end exactly at the end of the
    string. Matching is linear for patterns without a ``**`` followed by ``*`` and at
    worst quadratic in the resource length otherwise.
    """
    parts = _STAR_RUNS.split(pattern)
    literals = [re.escape(part) for part in parts[0::2]]
    stars = parts[1::2]
    last_double = max((i for i, star in enumerate(stars) if star == "**"), default=-1)
    out = [literals[0]]
    in_unit = False
    for i, star in enumerate(stars):
        literal = literals[i + 1]
        final = i == len(stars) - 1
        if star == "**":
            if in_unit:
                out.append(")")
            in_unit = i < last_double
            if in_unit:
                out.append("(?>.*?" + literal)
            else:
                out.append(".*?" + literal if literal else ".*")
        elif not final:
            out.append("(?>[^/]*?" + literal + ")")
        else:
            out.append("[^/]*?" + literal if literal else "[^/]*+")
    return "".join(out)


class _Pattern:
    """A resource pattern prepared for the attenuation check.

    ``symbols`` are single literal characters, ``"*"`` or ``"**"`` (a literal ``*`` cannot
    occur: every ``*`` is a wildcard). The masks describe the pattern as an NFA over
    those symbols, one bit per position, so a check costs a few integer operations per
    child symbol.
    """

    __slots__ = (
        "accept",
        "double",
        "is_literal",
        "literal_bits",
        "prefix",
        "star",
        "suffix",
        "symbols",
        "text",
        "wild",
    )

    def __init__(self, text: str) -> None:
        parts = _STAR_RUNS.split(text)
        symbols: list[str] = []
        for i, part in enumerate(parts):
            if i % 2:
                symbols.append(part)
            else:
                symbols.extend(part)
        literal_bits: dict[str, int] = {}
        star = double = 0
        for position, symbol in enumerate(symbols):
            bit = 1 << position
            if symbol == "*":
                star |= bit
            elif symbol == "**":
                double |= bit
            else:
                literal_bits[symbol] = literal_bits.get(symbol, 0) | bit
        self.text = text
        self.symbols = tuple(symbols)
        self.is_literal = len(parts) == 1
        self.prefix = parts[0]
        self.suffix = parts[-1]
        self.literal_bits = literal_bits
        self.star = star
        self.double = double
        self.wild = star | double
        self.accept = 1 << len(symbols)

    def contains(self, child: _Pattern) -> bool:
        """Whether every string ``child`` matches is matched here (sound, not complete).

        Runs this pattern as an NFA over the child's symbols, treating child wildcards as
        symbols: a literal needs an equal literal; our ``*`` absorbs literals other than
        ``/`` and child ``*``; our ``**`` absorbs anything. A child ``*`` or ``**`` whose
        strings would have to be split across several of our symbols is not recognised.
        """
        if not (child.text.startswith(self.prefix) and child.text.endswith(self.suffix)):
            return False
        literal_bits, double, wild = self.literal_bits, self.double, self.wild
        state = 1 | ((1 & wild) << 1)
        for symbol in child.symbols:
            if symbol == "**":
                state &= double
            elif symbol == "*":
                state &= wild
            else:
                absorbing = double if symbol == "/" else wild
                state = ((state & literal_bits.get(symbol, 0)) << 1) | (state & absorbing)
            if not state:
                return False
            # Wildcards are never adjacent (that would be '***'), so one step of
            # "skip a wildcard" closes the state set.
            state |= (state & wild) << 1
        return bool(state & self.accept)


# --------------------------------------------------------------------------- compiled scopes

_UNDECIDED: Final = object()
# check() is a pure function of (scope, action, resource): recent answers are remembered
# so an agent calling the same tool again costs one dict lookup. One process-wide table,
# bounded in entries and in the length of what it keeps (~50 MB at worst), cleared when
# full: hostile distinct resources only ever miss, they never grow memory.
_DECIDED_MAX: Final = 65_536
_DECIDED_RESOURCE_MAX: Final = 512
_decided: dict[tuple[CompiledScope, str, str], str | None] = {}

_Matcher: TypeAlias = Callable[[str], "re.Match[str] | None"]


def _matcher(patterns: Iterable[str]) -> _Matcher | None:
    regexes = list(dict.fromkeys(_glob_regex(pattern) for pattern in patterns))
    if not regexes:
        return None
    return re.compile("(?:" + "|".join(regexes) + ")", re.DOTALL).fullmatch


class CompiledScope:
    """A validated scope with precompiled matchers. Immutable; get one from ``compile_scope``.

    ``spec`` is the normal form (see ``validate``). Grants are grouped by action into one
    combined regex each, so ``covers`` is a dict lookup plus one ``fullmatch``.
    """

    __slots__ = (
        "_audiences",
        "_by_action",
        "_default",
        "_grant_texts",
        "_matchers",
        "_patterns",
        "_patterns_any",
        "grants",
        "spec",
    )

    spec: ScopeSpec
    grants: tuple[Grant, ...]
    _audiences: frozenset[str]
    _by_action: dict[str, tuple[_Pattern, ...]]
    _default: _Matcher | None
    _grant_texts: frozenset[str]
    _matchers: dict[str, _Matcher | None]
    _patterns: dict[str, _Pattern]
    _patterns_any: tuple[_Pattern, ...]

    def __init__(self, spec: ScopeSpec) -> None:
        spec = validate(spec)
        grants = tuple(parse_grant(text) for text in spec.grants)
        resources: dict[str, list[str]] = {}
        for grant in grants:
            resources.setdefault(grant.action, []).append(grant.resource)
        # Grants for action '*' apply to every action, so each action's matcher includes
        # them; an action with no grants of its own falls back to them alone.
        any_action = resources.pop("*", [])
        patterns = {text: _Pattern(text) for text in dict.fromkeys(g.resource for g in grants)}
        patterns_any = tuple(patterns[text] for text in any_action)
        by_action = {
            action: tuple(patterns[text] for text in texts) + patterns_any
            for action, texts in resources.items()
        }
        matchers = {action: _matcher([*texts, *any_action]) for action, texts in resources.items()}
        setter = object.__setattr__
        setter(self, "spec", spec)
        setter(self, "grants", grants)
        setter(self, "_audiences", frozenset(spec.audiences))
        setter(self, "_default", _matcher(any_action))
        setter(self, "_matchers", matchers)
        setter(self, "_grant_texts", frozenset(spec.grants))
        setter(self, "_by_action", by_action)
        setter(self, "_patterns_any", patterns_any)
        setter(self, "_patterns", patterns)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"CompiledScope is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"CompiledScope is immutable; cannot delete {name!r}")

    def __repr__(self) -> str:
        return f"CompiledScope({self.spec!r})"

    def covers(self, action: str, resource: str) -> bool:
        """Whether some grant allows ``action`` on the concrete ``resource``.

        The resource is canonicalised first (``service.kernel.resources.canonical``):
        callers pass it as requested. A refused resource (a dot-segment, an encoded
        slash …) is covered by no grant, not even ``*:**``.
        """
        return self.check(action, resource) is None

    def check(self, action: str, resource: str) -> str | None:
        """``None`` when ``covers(action, resource)``, else why not.

        The reason begins ``"out of scope: "`` (the prefix the detector's out-of-scope
        rule recognises): the refusal of ``canonical`` or, for a resource no grant
        matches, the action and (the first 200 characters of) the resource as given.
        """
        key = (self, action, resource)
        reason = _decided.get(key, _UNDECIDED)
        if reason is not _UNDECIDED:
            return reason  # type: ignore[return-value]
        reason = self._decide(action, resource)
        if len(resource) <= _DECIDED_RESOURCE_MAX and len(action) <= 64:
            if len(_decided) >= _DECIDED_MAX:
                _decided.clear()
            _decided[key] = reason
        return reason

    def _decide(self, action: str, resource: str) -> str | None:
        try:
            canonical_resource = canonical(resource)
        except ResourceRefused as refused:
            return refused.detail
        match = self._matchers.get(action, self._default)
        if match is not None and match(canonical_resource) is not None:
            return None
        return f"out of scope: {action} {resource[:200]} is outside the scope"

    def allows_audience(self, audience: str) -> bool:
        """Exact membership: an empty audience list allows no audience at all."""
        return audience in self._audiences

    def _contains(self, grant: Grant, child: _Pattern) -> bool:
        """Whether ``grant`` (whose resource pattern is ``child``) is within one grant here."""
        if str(grant) in self._grant_texts:
            return True
        if child.is_literal:
            # A concrete resource is within the scope exactly when the scope covers it.
            return self.covers(grant.action, grant.resource)
        if grant.action == "*":
            candidates: tuple[_Pattern, ...] = self._patterns_any
        else:
            candidates = self._by_action.get(grant.action, self._patterns_any)
        return any(parent.contains(child) for parent in candidates)


@functools.lru_cache(maxsize=4096)
def _compile_cached(spec: ScopeSpec) -> CompiledScope:
    return CompiledScope(spec)


def compile_scope(spec: ScopeSpec) -> CompiledScope:
    """The compiled form of ``spec``, cached by value (specs are frozen).

    Raises ``ScopeSyntaxError`` if the spec is invalid.
    """
    try:
        return _compile_cached(spec)
    except TypeError:
        # Unhashable: built by hand with lists (or junk). validate() repairs the lists
        # into a hashable normal form, or raises for the junk.
        return _compile_cached(validate(spec))


def covers(spec: ScopeSpec, action: str, resource: str) -> bool:
    """Whether ``spec`` allows ``action`` on the concrete ``resource``."""
    return compile_scope(spec).covers(action, resource)


# --------------------------------------------------------------------------- attenuation


def excess(child: ScopeSpec, parent: ScopeSpec) -> list[str]:
    """What in ``child`` is not within ``parent``, one readable line per item.

    Empty means ``child`` ⊆ ``parent``: every grant is contained in a single parent grant,
    every audience is one of the parent's, and every limit the parent sets is set at
    least as tightly. Raises ``ScopeSyntaxError`` if either spec is invalid.
    """
    inner = compile_scope(child)
    outer = compile_scope(parent)
    found = [
        f"grant {str(grant)!r}"
        for grant in inner.grants
        if not outer._contains(grant, inner._patterns[grant.resource])
    ]
    found += [
        f"audience {audience!r}"
        for audience in inner.spec.audiences
        if not outer.allows_audience(audience)
    ]
    for name in _LIMIT_NAMES:
        bound: int | float | None = getattr(outer.spec.limits, name)
        value: int | float | None = getattr(inner.spec.limits, name)
        if bound is not None and (value is None or value > bound):
            found.append(f"limit {name}={value!r} exceeds {bound!r}")
    return found


def is_subset(child: ScopeSpec, parent: ScopeSpec) -> bool:
    """Whether ``child`` asks for nothing beyond ``parent`` (see ``excess``)."""
    return not excess(child, parent)


# --------------------------------------------------------------------------- JWT claim


def to_scope_claim(spec: ScopeSpec) -> str:
    """The JWT ``scope`` claim: the normalised grants joined by single spaces.

    RFC 9068 §2.2.3 carries the scope of a JWT access token in ``scope`` as defined by
    RFC 8693 §4.2: space-delimited scope tokens (RFC 6749 §3.3). Grants cannot contain
    whitespace, so the join is unambiguous. Audiences go to ``aud`` and limits to the
    ``task`` claim, not here.
    """
    return " ".join(compile_scope(spec).spec.grants)


def from_scope_claim(
    claim: str, audiences: tuple[str, ...] = (), limits: Limits = _UNLIMITED
) -> ScopeSpec:
    """Rebuild a validated scope from a ``scope`` claim plus audiences and limits.

    Any run of whitespace separates grants (RFC 6749 §3.3 asks for single spaces; being
    liberal here costs nothing since grants cannot contain whitespace).
    """
    grants = tuple(claim.split())
    # audiences pass through untouched so that validate() rejects a bare string.
    return validate(ScopeSpec(grants=grants, audiences=audiences, limits=limits))
