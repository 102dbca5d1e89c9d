"""Resource canonicalisation per core, next to ``urllib.parse.urlsplit`` in the same run.

``service.kernel.resources.canonical`` runs before every scope match the guard makes, so
its cost is on the request path. One run prints, per input class, canonicalisations/s
and ``urlsplit``/s on the same inputs (``urlsplit`` only splits: it neither normalises
nor refuses anything, so it is a floor for "parse a URL in Python", not a competitor;
its own parse is timed, and separately its lru_cache hit as an ordinary call gets it on
these few repeated inputs):

* **typical** — already-canonical ``https://host/path`` URLs (the fast path);
* **normalised** — equivalent spellings that need the full route (upper-case host,
  default port, unreserved escapes);
* **hostile** — the traversal forms (``..``, ``%2e%2e``, ``%2E%2E``, ``..%2f``,
  backslash, ``..;``), each refused with ``ResourceRefused``;
* **other** — tool names, ``kafka://`` topics and ``file://`` paths;

and ``CompiledScope.check`` on the typical inputs next to the bare precompiled regex
match it wraps, so the price of canonicalising inside the guard's scope step shows.
Best of 5 windows, pinned to one CPU when possible.

Usage:
    python bench/resources.py            # ~10 s
    python bench/resources.py --quick    # ~3 s
    python bench/resources.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _timing import rate  # noqa: E402

from service.kernel.resources import ResourceRefused, canonical  # noqa: E402
from service.kernel.scopes import ScopeSpec, compile_scope  # noqa: E402

INPUTS: dict[str, list[str]] = {
    "typical": [
        "https://api.example.com/v1/tickets/42",
        "https://api.internal/v1/invoices/2024/0042?expand=lines",
        "https://tools.internal/v1/repos/acme/killswitch/issues/17",
        "http://10.0.0.7/healthz",
    ],
    "normalised": [
        "https://API.EXAMPLE.COM/v1/tickets/42",
        "https://api.example.com:443/v1/tickets/42",
        "https://api.example.com/v1/%74ickets/%7Euser",
        "HTTPS://Api.Internal:443/v1/invoices/a%2cb",
    ],
    "hostile": [
        "https://api.example.com/v1/tickets/../admin/users",
        "https://api.example.com/v1/tickets/%2e%2e/admin/users",
        "https://api.example.com/v1/tickets/%2E%2E/admin/users",
        "https://api.example.com/v1/tickets/..%2fadmin/users",
        "https://api.example.com/v1/tickets/..\\admin/users",
        "https://api.example.com/v1/tickets/..;/admin/users",
    ],
    "other": [
        "tool/invoices.read",
        "mcp://github/search_issues",
        "kafka://orders.eu",
        "file:///data/reports/2024/q1.csv",
    ],
}
GRANTS = (
    "GET:https://api.example.com/v1/tickets/**",
    "GET:https://api.internal/v1/**",
    "GET:https://tools.internal/v1/repos/*/*/issues/*",
    "GET:http://10.0.0.7/healthz",
)


def canonicalise_all(inputs: list[str], rounds: int) -> Callable[[], int]:
    def run() -> int:
        refused = 0
        for _ in range(rounds):
            for resource in inputs:
                try:
                    canonical(resource)
                except ResourceRefused:
                    refused += 1
        # Every hostile input is refused, every other one is not.
        assert refused in (0, rounds * len(inputs)), refused
        return rounds * len(inputs)

    return run


def urlsplit_all(inputs: list[str], rounds: int, *, cached: bool) -> Callable[[], int]:
    # Since 3.11 urlsplit is an lru_cache wrapper; on a handful of repeated inputs it would
    # measure a cache hit, so the parse itself is its __wrapped__ function.
    split = urllib.parse.urlsplit if cached else urllib.parse.urlsplit.__wrapped__

    def run() -> int:
        for _ in range(rounds):
            for resource in inputs:
                split(resource)
        return rounds * len(inputs)

    return run


def bench(rounds: int) -> dict[str, float]:
    results: dict[str, float] = {}
    for name, inputs in INPUTS.items():
        results[f"canonical {name}"] = rate(canonicalise_all(inputs, rounds))
        results[f"urlsplit {name}"] = rate(urlsplit_all(inputs, rounds, cached=False))
        results[f"urlsplit cached {name}"] = rate(urlsplit_all(inputs, rounds, cached=True))
    scope = compile_scope(ScopeSpec(grants=GRANTS, audiences=("a",)))
    typical = INPUTS["typical"]
    check = scope.check
    match = scope._matchers["GET"]
    assert match is not None
    assert all(check("GET", resource) is None for resource in typical)

    def checks() -> int:
        for _ in range(rounds):
            for resource in typical:
                check("GET", resource)
        return rounds * len(typical)

    def bare() -> int:
        for _ in range(rounds):
            for resource in typical:
                match(resource)
        return rounds * len(typical)

    results["CompiledScope.check typical"] = rate(checks)
    results["precompiled regex fullmatch typical"] = rate(bare)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one CPU")
    args = parser.parse_args()
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    results = bench(rounds=20_000 if args.quick else 80_000)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"Python {sys.version.split()[0]}, one core, best of 3 windows")
    width = max(len(name) for name in INPUTS)
    print(
        f"{'inputs':<{width}}  {'canonical/s':>12}  {'urlsplit/s':>12}  ratio"
        f"  {'urlsplit (lru hit)/s':>20}"
    )
    for name in INPUTS:
        ours, theirs = results[f"canonical {name}"], results[f"urlsplit {name}"]
        hit = results[f"urlsplit cached {name}"]
        print(
            f"{name:<{width}}  {ours:>12,.0f}  {theirs:>12,.0f}  {ours / theirs:4.1f}x"
            f"  {hit:>20,.0f}"
        )
    check = results["CompiledScope.check typical"]
    bare = results["precompiled regex fullmatch typical"]
    print(f"CompiledScope.check (decision remembered), typical:{check:>12,.0f}/s")
    print(f"precompiled regex fullmatch alone, typical:       {bare:>12,.0f}/s")


if __name__ == "__main__":
    main()
