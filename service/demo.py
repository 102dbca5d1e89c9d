"""``killswitch demo``: simulated agents against a running stack, one of which goes rogue.

A small tool gateway (``GET /tools/<name>``) is protected by the guard SDK (Kafka
revocation feed, usage events to Kafka). Well-behaved agents open tasks with narrow
scopes through the agent SDK and call their tools; the rogue agent behaves for a while,
then calls a tool outside its declared scope. The guard refuses that call and reports it;
the detector revokes the task; the guard refuses the rogue's very next call. The demo
prints what happened and the measured kill latency: from the out-of-scope call to the
first request the guard refused because the task was revoked.

Each run gets a data directory of its own (``<data-dir>/demo-<n>``, see
:func:`fresh_data_dir`), so what it lists is its own doing, never an earlier session's.
By default the system stops when the demo is over; ``--keep-running`` leaves it up (for
the console) until Ctrl-C. The demo must never present an outcome it provoked on purpose
(the rogue's revoked task) as a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from service.config import Settings
from service.stack import Stack

AUD = "https://tools.demo"
TOOLS_PATH = "/tools/"

AGENTS: dict[str, tuple[list[str], list[str]]] = {
    # agent id: (ceiling grants, grants its tasks declare)
    "researcher": (["call:tool/search.*", "call:tool/fetch"], ["call:tool/search.web"]),
    "accountant": (["call:tool/invoices.*"], ["call:tool/invoices.read"]),
    "intern": (["call:tool/*"], ["call:tool/search.web"]),  # goes rogue
}
ROGUE = "intern"
ROGUE_TARGET = "payments.send"


DEMO_DIR = re.compile(r"demo-(\d+)")


def fresh_data_dir(base: Path) -> Path:
    """Create and return ``base/demo-<n>``, ``n`` one more than any demo before it."""
    base.mkdir(parents=True, exist_ok=True)
    taken = [int(m[1]) for p in base.iterdir() if (m := DEMO_DIR.fullmatch(p.name))]
    n = max(taken, default=0) + 1
    while True:
        path = base / f"demo-{n}"
        try:
            path.mkdir()
        except FileExistsError:  # another demo claimed it a moment ago
            n += 1
            continue
        return path


def demo_banner(stack: Stack, *, keep_running: bool) -> str:
    """The stack's banner, with a last line that says what really happens next."""
    lines = stack.banner().splitlines()
    if keep_running:
        lines[-1] = (
            "The demo runs now; the system stays up after it (open the console) until "
            "Ctrl-C or `killswitch down --data-dir " + str(stack.data_dir) + "`."
        )
    else:
        lines[-1] = (
            "The demo runs now and stops everything when it is over (Ctrl-C stops it "
            "earlier; `killswitch demo --keep-running` keeps the system up for the console)."
        )
    return "\n".join(lines)


@dataclass
class AgentRun:
    agent: str
    task_id: str = ""
    allowed: int = 0
    denied: int = 0
    outcome: str = "running"
    kill_latency_ms: float | None = None
    notes: list[str] = field(default_factory=list)


def _gateway() -> Any:
    from litestar import Litestar, get
    from litestar.params import FromPath

    @get("/tools/{name:str}", sync_to_thread=False)
    def call_tool(name: FromPath[str]) -> dict[str, str]:
        return {"tool": name, "result": "ok"}

    return Litestar([call_tool], openapi_config=None)


def _tool_resource(scope: Any) -> str:
    path: str = scope.get("path", "")
    return "tool/" + path.removeprefix(TOOLS_PATH)


async def _register(stack: Stack) -> dict[str, str]:
    secrets_by_agent: dict[str, str] = {}
    headers = {"Authorization": f"Bearer {stack.admin_token}"}
    async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=10) as api:
        for agent, (ceiling, _) in AGENTS.items():
            agent_id = f"{agent}-{int(time.time())}"
            r = await api.post(
                "/v1/agents",
                json={"id": agent_id, "ceiling": {"grants": ceiling, "audiences": [AUD]}},
            )
            r.raise_for_status()
            secrets_by_agent[agent_id] = r.json()["client_secret"]
    return secrets_by_agent


async def _behave(
    stack: Stack, gateway: str, agent_id: str, secret: str, run: AgentRun, calls: int
) -> None:
    from service.sdk import KillSwitchClient

    base = agent_id.rsplit("-", 1)[0]
    grants = AGENTS[base][1]
    tool = grants[0].split("/", 1)[1]
    async with (
        KillSwitchClient(stack.url, agent_id, secret) as ks,
        ks.task(grants=grants, audiences=[AUD], ttl=120, purpose=f"demo: {base}") as cred,
        httpx.AsyncClient(base_url=gateway, auth=cred.auth, timeout=5) as tools,
    ):
        run.task_id = cred.task_id
        for _ in range(calls):
            r = await tools.get(TOOLS_PATH + tool)
            if r.status_code == 200:
                run.allowed += 1
            else:
                run.denied += 1
            await asyncio.sleep(0.05)
        if base != ROGUE:
            run.outcome = "completed"
            return
        # The rogue turn: one call outside the declared scope...
        violation_at = time.perf_counter()
        r = await tools.get(TOOLS_PATH + ROGUE_TARGET)
        run.denied += 1
        run.notes.append(f"out-of-scope call → {r.status_code} {r.json().get('detail', '')}")
        # ...then it carries on as if nothing happened, until the kill switch bites.
        deadline = violation_at + 10
        while time.perf_counter() < deadline:
            r = await tools.get(TOOLS_PATH + tool)
            if r.status_code == 200:
                run.allowed += 1
                await asyncio.sleep(0.001)
                continue
            run.denied += 1
            run.kill_latency_ms = (time.perf_counter() - violation_at) * 1000
            run.outcome = "revoked"
            detail = r.json().get("detail", "")
            run.notes.append(f"next call → {r.status_code} {detail}")
            # The guard said the task is dead: the SDK must not try to complete it (that
            # would be a 409 the demo provoked, logged as a warning).
            cred.closed = detail or "task revoked"
            return
        run.outcome = "NOT revoked within 10 s"


async def _revocation_reasons(stack: Stack, task_ids: set[str]) -> list[str]:
    """The revocations of this demo's own tasks (its database holds nothing else)."""
    headers = {"Authorization": f"Bearer {stack.admin_token}"}
    async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=10) as api:
        r = await api.get("/v1/revocations", params={"limit": 1000})
        r.raise_for_status()
        return [
            f"{v['actor']}: {v['reason']}"
            for v in r.json()["items"]
            if v["target"].get("task_id") in task_ids
        ]


async def _demo(stack: Stack, console: Console) -> list[AgentRun]:
    import uvicorn

    from service.brokers import free_port
    from service.sdk import Guard, GuardMiddleware, KafkaRevocationFeed, UsageEmitter

    settings = Settings(kafka_bootstrap=stack.kafka_bootstrap)
    guard = Guard(
        issuer=stack.url,
        audience=AUD,
        feed=KafkaRevocationFeed(settings),
        usage=UsageEmitter(settings),
    )
    await guard.start()
    await asyncio.wait_for(guard.wait_ready(), timeout=30)
    port = free_port()
    app = GuardMiddleware(
        _gateway(), guard, action_for=lambda _s: "call", resource_for=_tool_resource
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    serving = asyncio.create_task(server.serve())
    gateway = f"http://127.0.0.1:{port}"
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes only a flag
            await asyncio.sleep(0.05)
        console.print(f"tool gateway (guarded) on {gateway}; registering agents...")
        secrets_by_agent = await _register(stack)
        runs = {agent_id: AgentRun(agent_id) for agent_id in secrets_by_agent}
        console.print("agents at work; the intern goes rogue after 20 calls...")
        await asyncio.gather(
            *(
                _behave(stack, gateway, agent_id, secret, runs[agent_id], calls=20)
                for agent_id, secret in secrets_by_agent.items()
            )
        )
        return list(runs.values())
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, timeout=5)
        await guard.stop()


def run_demo(stack: Stack, *, keep_running: bool = False) -> list[AgentRun]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    console = Console()
    runs = asyncio.run(_demo(stack, console))
    table = Table(title="killswitch demo")
    for column in ("agent", "task", "allowed", "denied", "outcome", "kill latency"):
        table.add_column(column, overflow="fold")
    for run in runs:
        latency = f"{run.kill_latency_ms:.1f} ms" if run.kill_latency_ms is not None else ""
        table.add_row(
            run.agent, run.task_id, str(run.allowed), str(run.denied), run.outcome, latency
        )
    console.print(table)
    for run in runs:
        for note in run.notes:
            console.print(f"  {run.agent}: {note}")
    for reason in asyncio.run(_revocation_reasons(stack, {r.task_id for r in runs})):
        console.print(f"  revocation by {reason}")
    if keep_running:
        console.print(
            f"\nthe demo is over; the system keeps running:\n"
            f"  console     {stack.url}/console/  (sign in with the admin token)\n"
            f"  admin token export KS_URL={stack.url} KS_TOKEN={stack.admin_token}\n"
            f"Ctrl-C stops everything.",
            soft_wrap=True,
        )
    else:
        console.print(
            f"\nthe demo is over; stopping everything (its data stays in {stack.data_dir}; "
            "`killswitch demo --keep-running` keeps the system up for the console)",
            soft_wrap=True,
        )
    return runs
