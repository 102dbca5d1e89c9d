"""Keep the docs true to the code: settings, routes, problem slugs, metrics and links.

Each test derives its list from the code (``describe()``, the app's OpenAPI document,
the error tree, the metrics registry), so adding a setting, a route, an error or a
metric without documenting it fails here. Links are checked strictly: a relative link
to a file that does not exist fails, and so does a ``#fragment`` naming no heading.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric

from service.app import create_app
from service.config import Settings, describe
from service.kernel.errors import KillSwitchError
from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api.md"
OPERATIONS = DOCS / "operations.md"

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@cache
def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("env", [row[1] for row in describe()])
def test_every_setting_is_documented(env: str) -> None:
    assert re.search(rf"`{re.escape(env)}`", _text(OPERATIONS)), (
        f"{env} is a setting (service/config.py) but docs/operations.md does not name it"
    )


# --------------------------------------------------------------------------- routes


def _routes() -> list[tuple[str, str]]:
    app = create_app(Settings())
    schema = app.openapi_schema.to_schema()
    return sorted(
        (method.upper(), path)
        for path, item in schema["paths"].items()
        for method in item
        if method in HTTP_METHODS
    )


def test_openapi_has_routes() -> None:
    assert len(_routes()) > 10


@pytest.mark.parametrize(("method", "path"), _routes())
def test_every_route_is_documented(method: str, path: str) -> None:
    # "POST /v1/tasks" must not be satisfied by "POST /v1/tasks/{task_id}/renew".
    pattern = rf"(?<![\w/]){method} {re.escape(path)}(?![\w/{{}}.-])"
    assert re.search(pattern, _text(API)), f"{method} {path} is missing from docs/api.md"


# --------------------------------------------------------------------------- problem slugs


def _error_classes() -> list[type[KillSwitchError]]:
    found: list[type[KillSwitchError]] = [KillSwitchError]
    queue: list[type[KillSwitchError]] = [KillSwitchError]
    while queue:
        for sub in queue.pop().__subclasses__():
            if sub not in found:
                found.append(sub)
                queue.append(sub)
    return found


@pytest.mark.parametrize("slug", sorted({cls.type_slug for cls in _error_classes()}))
def test_every_problem_slug_is_documented(slug: str) -> None:
    assert re.search(rf"`{re.escape(slug)}`", _text(API)), (
        f"problem type urn:killswitch:problem:{slug} is missing from docs/api.md"
    )


def test_problem_type_prefix_is_documented() -> None:
    assert "urn:killswitch:problem:" in _text(API)


# --------------------------------------------------------------------------- metrics


def _metric_families() -> list[Metric]:
    return list(Metrics().registry.collect())


def _exposed_names() -> list[str]:
    """Names as scraped: prometheus_client adds ``_total`` to counters."""
    names = []
    for family in _metric_families():
        names.append(family.name + "_total" if family.type == "counter" else family.name)
    return sorted(names)


@pytest.mark.parametrize("name", sorted(f.name for f in _metric_families()))
def test_every_metric_is_documented(name: str) -> None:
    assert re.search(rf"\b{re.escape(name)}\b", _text(OPERATIONS)), (
        f"metric {name} (service/metrics.py) is missing from docs/operations.md"
    )


@pytest.mark.parametrize("name", _exposed_names())
def test_every_exposed_metric_name_is_documented(name: str) -> None:
    assert re.search(rf"`{re.escape(name)}`", _text(OPERATIONS)), (
        f"metric {name} as scraped from /metrics is missing from docs/operations.md"
    )


# --------------------------------------------------------------------------- links

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> str:
    """Text without fenced code blocks and code spans, where links are not links."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _relative_links() -> list[tuple[str, str]]:
    """(file, target) of every link that is not an absolute URL; ``#x`` is same-page."""
    links: list[tuple[str, str]] = []
    for md in _markdown_files():
        for target in _LINK.findall(_prose(_text(md))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                continue  # http:, https:, mailto: ...
            links.append((str(md.relative_to(ROOT)), target))
    return sorted(set(links))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower-case, punctuation dropped, spaces → hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_FENCE.sub("", _text(path))):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_docs_have_links() -> None:
    assert _relative_links(), "expected README.md and docs/*.md to link to each other"


@pytest.mark.parametrize(("source", "target"), _relative_links())
def test_relative_link_resolves(source: str, target: str) -> None:
    base = (ROOT / source).parent
    file_part, _, fragment = target.partition("#")
    path = (base / file_part).resolve() if file_part else ROOT / source
    assert path.exists(), f"{source} links to {target}, but {path} does not exist"
    if fragment and path.suffix == ".md":
        assert fragment in _anchors(path), (
            f"{source} links to {target}, but {path.name} has no heading with anchor #{fragment}"
        )


# --------------------------------------------------------------------------- stated facts


def _squash(text: str) -> str:
    """Markdown with line breaks folded to single spaces (a fact may wrap)."""
    return re.sub(r"\s+", " ", text)


def test_kafka_md_states_how_tansu_is_stopped() -> None:
    import signal

    from service.brokers import tansu

    source = Path(tansu.__file__).read_text(encoding="utf-8")
    assert "stop_signal=signal.SIGINT" in source
    assert signal.SIGINT.name == "SIGINT"
    doc = _squash(_text(DOCS / "kafka.md"))
    assert f"(tansu: SIGINT, {tansu.STOP_TIMEOUT:g} s;" in doc
    assert "test_tansu_stops_at_once_with_clients_connected" in doc
    test_file = ROOT / "tests" / "integration" / "test_brokers.py"
    assert "def test_tansu_stops_at_once_with_clients_connected" in _text(test_file)


def test_detector_md_states_the_propagation_grace() -> None:
    from detectors.rules import Thresholds

    grace = Thresholds().end_grace
    doc = _squash(_text(DOCS / "detector.md"))
    assert f"`end_grace` = {grace:g} s" in doc
    assert f"at most `end_grace` ({grace:g} s) after the end | **low**" in doc


#: Each audited action and the words the threat model and the console's audit page use.
AUDITED = {
    "agent.register": "registration",
    "agent.reinstate": "reinstatement",
    "operator.create": "operator",
    "operator.disable": "operator",
    "keys.rotate": "key rotation",
    "revoke": "revocation",
    "alert.ack": "alert acknowledgement",
    "console.sign_in": "console sign-in",
}


def _audited_actions() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "service").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for call in re.finditer(r"append_audit\(", text):
            found.update(
                re.findall(r'action="([a-z_.]+)"', text[call.end() : call.end() + 400])[:1]
            )
    return found


def test_audit_log_is_described_as_it_is() -> None:
    actions = _audited_actions()
    assert actions, "no append_audit(... action=...) call found"
    assert actions == set(AUDITED), "audited actions changed: update AUDITED and the docs"
    threat = _squash(_text(DOCS / "threat-model.md")).lower()
    page = _text(ROOT / "service" / "console" / "templates" / "audit.html").lower()
    for words in AUDITED.values():
        assert words in threat, words
        assert words in page, words
    # The table is ordinary and issuance/renewal are not in it: the page must not claim more.
    assert "not append-only" in threat
    assert "append-only" not in page
    assert "every change" not in page
    assert "renewing tasks is not recorded" in page


def test_the_demo_options_the_docs_name_exist() -> None:
    from service.cli import build_parser

    args = build_parser().parse_args(["demo", "--keep-running"])
    assert args.keep_running is True
    assert build_parser().parse_args(["demo"]).keep_running is False
    for doc in (ROOT / "README.md", OPERATIONS):
        text = _squash(_text(doc))
        assert "killswitch demo --keep-running" in text or "`--keep-running`" in text, doc
        assert "demo-<n>" in text, doc
