"""``killswitch demo`` as a user runs it: the console script, a real stack (tansu, service,
detector) in subprocesses, no mocks.

Each test runs one whole demo (~15 s): the default one, which stops by itself, and
``--keep-running``, which leaves the system up for the console until Ctrl-C (SIGINT).
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.serve import clean_env, killswitch_executable

DEMO_TIMEOUT = 180


def _start(data_dir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [killswitch_executable(), "demo", "--data-dir", str(data_dir), *args],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # our SIGINT reaches the demo only, as a terminal's would
    )


def test_demo_runs_in_a_fresh_directory_and_says_it_stops(tmp_path: Path) -> None:
    # An earlier demo's directory (with a database of its own) is left alone.
    (tmp_path / "demo-1").mkdir()
    (tmp_path / "demo-1" / "killswitch.db").write_bytes(b"")
    proc = _start(tmp_path)
    out, _ = proc.communicate(timeout=DEMO_TIMEOUT)
    assert proc.returncode == 0, out
    assert f"data        {tmp_path / 'demo-2'}" in out, out
    assert (tmp_path / "demo-2" / "killswitch.db").exists()
    assert (tmp_path / "demo-1" / "killswitch.db").read_bytes() == b""
    # The banner says what happens: the demo ends by itself (no "Ctrl-C stops everything").
    assert "stops everything when it is over" in out, out
    assert "Ctrl-C (where it runs)" not in out, out
    assert "the demo is over; stopping everything" in out, out
    # The rogue's revoked task is the demo's own doing, not a warning.
    assert "WARNING" not in out, out
    # (not a bare "409": ids and timestamps may contain those digits)
    assert not re.search(r"\b409\b.*(conflict|already)|conflict", out, re.I), out
    # Only its own revocations: two tasks completed, one revoked by the detector.
    revocations = re.findall(r"^  revocation by (.*)$", out, re.M)
    assert len(revocations) == 3, out
    assert sum("operator:detector: scope.out_of_scope" in r for r in revocations) == 1, out
    assert not (tmp_path / "demo-2" / "up.json").exists()  # it stopped, and withdrew


def _lines_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """Read the demo's output until ``marker`` (in a thread: readline cannot time out)."""
    assert proc.stdout is not None
    stream = proc.stdout
    seen: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in stream:
            seen.append(line)
            if marker in line:
                found.set()
                return
        found.set()

    threading.Thread(target=read, daemon=True).start()
    found.wait(timeout)
    return "".join(seen)


def _wait_for(get: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_demo_keep_running_leaves_the_system_up_until_ctrl_c(tmp_path: Path) -> None:
    proc = _start(tmp_path, "--keep-running")
    try:
        out = _lines_until(proc, "Ctrl-C stops everything.", DEMO_TIMEOUT)
        assert "the demo is over; the system keeps running" in out, out
        assert proc.poll() is None, out
        [url, token] = re.findall(
            r"^  admin token export KS_URL=(\S+) KS_TOKEN=(kso_\S+)$", out, re.M
        )[-1]
        assert f"  console     {url}/console/" in out, out
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"})
        assert api.get("/console/").status_code in (200, 302, 303, 401)
        tasks = api.get("/v1/tasks", params={"limit": 100}).json()["items"]
        [rogue] = [t for t in tasks if t["agent_id"].startswith("intern-")]
        assert rogue["status"] == "revoked"

        # The rogue's in-scope calls the guard still allowed while the revocation travelled
        # to it are low; a use the guard refused is high (docs/detector.md).
        def lifecycle() -> list[dict[str, Any]]:
            page = api.get(
                "/v1/alerts", params={"task_id": rogue["id"], "rule": "lifecycle.use_after_end"}
            ).json()["items"]
            return [a for a in page if a["evidence"]["decision"] == "deny"] and page

        alerts = _wait_for(lifecycle)
        assert alerts, "no lifecycle.use_after_end alert for the rogue's task"
        for alert in alerts:
            window = alert["evidence"]["propagation_window"]
            assert alert["severity"] == ("low" if window else "high"), alert
            assert window == (alert["evidence"]["decision"] == "allow"), alert
        assert len([a for a in alerts if a["severity"] == "low"]) <= 1, alerts
    finally:
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        stopped_in = time.monotonic() - started
    assert proc.returncode == 0, rest
    assert "stopping killswitch" in rest, rest
    assert not list(tmp_path.glob("demo-*/up.json"))
    # Detector, service and broker stop within the service's SSE grace, not after a
    # broker's SIGKILL timeout on top of it.
    assert stopped_in < 15, f"stopping the demo took {stopped_in:.1f} s"
