"""Concrete resources in canonical form: normalised once, before any scope match.

This module owns the one form a resource is compared in. ``canonical(resource)`` turns
the resource of a request into that form, or refuses it; ``canonical_pattern(pattern)``
puts a grant's resource pattern into the same form when the grant is validated.
``service.kernel.scopes`` calls both, so the guard, the detector and issuance agree on
every ``(action, resource)``. The rules are tabled in ``docs/scopes.md``; keep the two
in step. Pure: no I/O, no clock, no state.

It must never *resolve* anything. A resource that a server could resolve to somewhere
else (``..``, an encoded ``/``) is refused, not rewritten: which of ``a/b%2Fc`` or
``a/b/c`` a server means, and whether it merges ``..`` before or after routing, differs
between servers, and a guard that guesses wrong lets a request climb out of a granted
prefix. A refusal is a :class:`ResourceRefused` whose ``detail`` begins
``"out of scope: "``, the prefix the detector's out-of-scope rule recognises.

Web URLs (schemes ``http``, ``https``, ``ws``, ``wss``):

* scheme and host are case-insensitive (RFC 3986 §3.1, §3.2.2): lower-cased (the host
  ASCII only: no IDNA mapping, so a non-ASCII host is compared as written);
* the default port (80 for http and ws, 443 for https and wss; RFC 9110 §4.2.1-4.2.3,
  RFC 6455 §3) and an empty port are dropped, leading zeros of a port removed, and an
  empty path becomes ``/`` (RFC 3986 §6.2.3, RFC 9110 §4.2.3);
* percent-encoding (RFC 3986 §6.2.2.1, §6.2.2.2): escapes of unreserved characters
  (§2.3: ``ALPHA DIGIT - . _ ~``) are decoded, every other escape keeps its octet with
  upper-case hex; a ``%`` not followed by two hex digits is refused. Decoding happens
  once: ``%252e`` stays ``%252e``, a literal name, and a server must not decode twice;
* refused: a dot-segment in the path (RFC 3986 §3.3, §5.2.4), raw or encoded in any
  case (``.``, ``..``, ``%2e``, ``.%2E`` …), also with path parameters (``..;x``: some
  servlet containers treat it as ``..``); an encoded ``/`` or ``\\`` (``%2F``, ``%5C``)
  or a raw ``\\`` in the path or authority (WHATWG URL parsers treat ``\\`` as ``/``);
  userinfo (RFC 9110 §4.2.4 deprecates it; ``https://good@evil/`` confuses readers);
  a fragment (RFC 9110 §4.2.5: never sent to a server, so it cannot name a resource);
  a percent-encoded host, an empty host, a malformed port; ASCII control characters
  (WHATWG parsers silently drop tabs and newlines, so ``.<TAB>.`` would become ``..``).
  The query is kept, percent-normalised like the path, and not checked for dots.

Other resources (``mcp://``, ``kafka://``, ``tool/search`` …) are compared exactly, case
included (tool names and Kafka topics are case-sensitive), except that a scheme followed
by ``://`` is lower-cased. Any ``/``-separated resource with a raw dot-segment (``.`` or
``..`` between slashes, or at either end) is refused; ``file://`` resources are also
refused for ``%2e``-encoded dot-segments, ``%2F``/``%5C`` and a raw ``\\``.

A fast path returns the common already-canonical ``https://host/path`` after a few
substring tests, without a regex or ``urllib.parse``; ``bench/resources.py`` measures it.

``ResourceRefused`` sits in the error tree (``service.kernel.errors``) under
``ScopeViolation`` (403): the request asks for something outside its scope::

    ScopeViolation
    └── ResourceRefused    a concrete resource refused before any match
"""

from __future__ import annotations

import re
import string
from typing import Final

from service.kernel.errors import ScopeViolation

__all__ = [
    "DOT_SEGMENT",
    "ENCODED_SLASH",
    "REFUSED_PREFIX",
    "ResourceRefused",
    "canonical",
    "canonical_pattern",
]

REFUSED_PREFIX: Final = "out of scope: "
DOT_SEGMENT: Final = "path holds a dot-segment ('.' or '..')"
ENCODED_SLASH: Final = "path holds an encoded '/' or '\\' (%2F or %5C)"
BACKSLASH: Final = "URL holds a '\\' (parsed as '/' by WHATWG URL parsers)"
BAD_PERCENT: Final = "malformed percent-encoding ('%' not followed by two hex digits)"
FRAGMENT: Final = "URL holds a fragment ('#'); fragments are never sent to a server"
USERINFO: Final = "URL holds userinfo ('user@'), deprecated by RFC 9110 §4.2.4"
NO_HOST: Final = "URL has no host"
BAD_HOST: Final = "URL host is malformed or percent-encoded"
BAD_PORT: Final = "URL port is not a number from 0 to 65535"
CONTROL: Final = "URL holds an ASCII control character"

_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_UNRESERVED: Final = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX: Final = frozenset(string.hexdigits)
_DOTS: Final = frozenset((".", ".."))
_ASCII_LOWER: Final = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_CONTROLS: Final = re.compile(r"[\x00-\x1f\x7f]")
# In a pattern, wildcards are replaced by these two control characters (which patterns
# cannot contain) while the rules run, so every rule sees them as opaque non-literals.
_STAR: Final = "\x01"
_DOUBLE: Final = "\x02"
_DEFAULT_PORT_SUFFIX: Final = {
    scheme: re.compile(rf":(?:0*{port})?$") for scheme, port in _DEFAULT_PORTS.items()
}


class ResourceRefused(ScopeViolation):
    """A concrete resource (or a grant pattern) that is refused, never matched.

    ``why`` says which rule refused it; ``detail`` is ``"out of scope: " + why``.
    """

    def __init__(self, why: str) -> None:
        super().__init__(REFUSED_PREFIX + why)
        self.why = why


def canonical(resource: str) -> str:
    """The canonical form of a concrete ``resource`` (see the module docstring).

    Raises ``ResourceRefused`` for a resource no grant may cover. Idempotent:
    ``canonical(canonical(r)) == canonical(r)``.
    """
    # Fast path: already-canonical http(s) with a non-empty, lower-case host and no port
    # or userinfo. Each test is one C-level call; anything unusual takes the full route.
    scheme, _, rest = resource.partition("://")
    if (
        (scheme == "https" or scheme == "http")
        and "%" not in rest
        and "/." not in rest
        and "\\" not in rest
        and "#" not in rest
        and rest.isprintable()
    ):
        authority, slash, _ = rest.partition("/")
        if (
            slash
            and authority
            and ":" not in authority
            and "@" not in authority
            and "?" not in authority
            and (authority.islower() or authority.lower() == authority)
        ):
            return resource
    return _canonical(resource)


def _canonical(resource: str) -> str:
    """``canonical`` without its fast path (the tests check the two agree)."""
    scheme, rest = _split_scheme(resource)
    if scheme is None:
        _refuse_dot_segments(resource)
        return resource
    if scheme in _DEFAULT_PORTS:
        if _CONTROLS.search(rest):
            raise ResourceRefused(CONTROL)
        return _web(scheme, rest, pattern=False)
    if scheme == "file":
        _check_file(rest)
    _refuse_dot_segments(rest)
    return f"{scheme}://{rest}"


def canonical_pattern(pattern: str) -> str:
    """A grant's resource pattern in canonical form, by the rules ``canonical`` applies.

    Only what is literal is rewritten (scheme and host case, a default port, unreserved
    escapes); wildcards stay. A pattern with a literal dot-segment, an encoded slash or a
    backslash (in a web or ``file://`` URL), a fragment, userinfo or a malformed escape
    could only match refused resources and raises ``ResourceRefused``. The pattern must
    already be valid otherwise (no control characters, no ``***``).
    """
    if "*" not in pattern:
        return canonical(pattern)
    text = pattern.replace("**", _DOUBLE).replace("*", _STAR)
    scheme, rest = _split_scheme(text)
    if scheme is None:
        _refuse_dot_segments(text)
    else:
        if scheme in _DEFAULT_PORTS:
            rest = _web(scheme, rest, pattern=True)[len(scheme) + 3 :]
        else:
            if scheme == "file":
                _check_file(rest)
            _refuse_dot_segments(rest)
        text = f"{scheme}://{rest}"
    return text.replace(_DOUBLE, "**").replace(_STAR, "*")


# --------------------------------------------------------------------------- the rules


def _split_scheme(text: str) -> tuple[str | None, str]:
    """``(lower-cased scheme, rest after '://')``, or ``(None, text)`` without a scheme."""
    sep = text.find("://")
    if sep <= 0:
        return None, text
    scheme = text[:sep]
    if not (scheme.isascii() and scheme.isalpha()) and _SCHEME.fullmatch(scheme) is None:
        return None, text
    return scheme.lower(), text[sep + 3 :]


def _refuse_dot_segments(text: str) -> None:
    if (text.startswith(".") or "/." in text) and not _DOTS.isdisjoint(text.split("/")):
        raise ResourceRefused(DOT_SEGMENT)


def _check_file(rest: str) -> None:
    if "\\" in rest:
        raise ResourceRefused(BACKSLASH)
    if "%" in rest:
        folded = rest.lower()
        if "%2f" in folded or "%5c" in folded:
            raise ResourceRefused(ENCODED_SLASH)
        _refuse_dot_segments(folded.replace("%2e", "."))


def _web(scheme: str, rest: str, *, pattern: bool) -> str:
    """A web URL (scheme already lower-cased, ``rest`` after ``://``) in canonical form.

    In a pattern the authority may hold ``*`` wildcards, and a ``**`` ends it without
    saying where the path starts; such an authority is only lower-cased and stripped of
    a trailing default port.
    """
    if "#" in rest:
        raise ResourceRefused(FRAGMENT)
    end = len(rest)
    for stop in ("/", "?", _DOUBLE) if pattern else ("/", "?"):
        found = rest.find(stop, 0, end)
        if found >= 0:
            end = found
    authority, tail = rest[:end], rest[end:]
    if "\\" in authority:
        raise ResourceRefused(BACKSLASH)
    if "@" in authority:
        raise ResourceRefused(USERINFO)
    if "%" in authority:
        raise ResourceRefused(BAD_HOST)
    if pattern and (_STAR in authority or tail.startswith(_DOUBLE)):
        if not authority and not tail.startswith(_DOUBLE):
            raise ResourceRefused(NO_HOST)
        authority = authority.translate(_ASCII_LOWER)
        if not tail.startswith(_DOUBLE):
            authority = _DEFAULT_PORT_SUFFIX[scheme].sub("", authority)
    else:
        authority = _authority(scheme, authority)
    path, question, query = tail.partition("?")
    path = _percent(path) or "/"
    if question:
        query = _percent(query)
    if "\\" in path:
        raise ResourceRefused(BACKSLASH)
    if "%2F" in path or "%5C" in path:
        raise ResourceRefused(ENCODED_SLASH)
    if "/." in path and any(segment.partition(";")[0] in _DOTS for segment in path.split("/")):
        raise ResourceRefused(DOT_SEGMENT)
    return f"{scheme}://{authority}{path}{question}{query}"


def _authority(scheme: str, authority: str) -> str:
    """``host[:port]`` with the host lower-cased and a default or empty port dropped."""
    if authority.startswith("["):
        # An IP literal (RFC 3986 §3.2.2): its ':'s are not the port separator.
        close = authority.find("]")
        if close < 0:
            raise ResourceRefused(BAD_HOST)
        host, after = authority[: close + 1], authority[close + 1 :]
        if after and after[0] != ":":
            raise ResourceRefused(BAD_HOST)
        port = after[1:]
    else:
        host, _, port = authority.partition(":")
    if not host:
        raise ResourceRefused(NO_HOST)
    host = host.translate(_ASCII_LOWER)
    if not port:
        return host
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ResourceRefused(BAD_PORT)
    number = int(port)
    return host if number == _DEFAULT_PORTS[scheme] else f"{host}:{number}"


def _percent(text: str) -> str:
    """Decode escapes of unreserved characters, upper-case the hex of the others."""
    if "%" not in text:
        return text
    first, *pieces = text.split("%")
    out = [first]
    for piece in pieces:
        digits = piece[:2]
        if len(digits) < 2 or not _HEX.issuperset(digits):
            raise ResourceRefused(BAD_PERCENT)
        char = chr(int(digits, 16))
        out.append(char if char in _UNRESERVED else "%" + digits.upper())
        out.append(piece[2:])
    return "".join(out)
