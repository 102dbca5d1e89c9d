"""The README's "A first session" block, run word for word the way a new user would.

The working tree (what a fresh clone of it would hold: tracked and untracked files that
are not ignored) is copied into an empty temporary directory, and the block is run there
by ``bash -e`` with the caller's environment less every ``KS_*`` variable: it makes its
own virtual environment, installs the package, starts the system with ``killswitch up``
in the background, uses it, and stops it with ``killswitch down``, all as written. Then
the stopped system's database is served again and the API is asked whether the two
revocations of the session happened.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.serve import clean_env, serve

ROOT = Path(__file__).resolve().parents[1]
SESSION_TIMEOUT = 600  # a fresh venv and `pip install -e .` take ~40 s with a warm cache

pytestmark = pytest.mark.slow


def first_session() -> str:
    """The first ``sh`` block after the ``## A first session`` heading."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## A first session\n", 1)
    assert len(section) == 2, "README.md has no '## A first session' section"
    block = re.search(r"^```sh\n(.*?)^```$", section[1], re.MULTILINE | re.DOTALL)
    assert block, "the first-session section has no ```sh block"
    return block.group(1)


# Never copied when the tree is not a git checkout: what a clone would not hold either.
_NOT_IN_A_CLONE = (".git", ".venv", ".killswitch", "*.egg-info", "__pycache__", ".*_cache")


def fresh_clone(into: Path) -> Path:
    """What ``git clone`` of the working tree would give, without its history."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:  # an unpacked archive, not a checkout
        shutil.copytree(ROOT, into, ignore=shutil.ignore_patterns(*_NOT_IN_A_CLONE))
        return into
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if not source.is_file():  # deleted in the working tree, not yet in the index
            continue
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return into


@pytest.fixture
def clone(tmp_path: Path) -> Iterator[Path]:
    work = fresh_clone(tmp_path / "killswitch")
    yield work
    # Whatever happened to the session, nothing it started outlives the test.
    subprocess.run(
        [sys.executable, "-m", "service", "down", "--data-dir", str(work / ".killswitch")],
        env=clean_env(),
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_the_block_is_what_a_new_user_needs() -> None:
    """Self-contained: it makes its venv, starts and stops the system, uses $KS_URL."""
    block = first_session()
    assert block.startswith("python3 -m venv .venv && . .venv/bin/activate"), block
    assert "killswitch up --detach" in block
    assert block.rstrip().splitlines()[-1].startswith("killswitch down")
    for fixed in ("127.0.0.1", "8080"):
        assert fixed not in block, "use $KS_URL: `killswitch up` may pick another port"
    assert not re.search(r"<[\w-]+>", block), "no <placeholder> left to fill in by hand"


def test_first_session_runs_word_for_word(clone: Path) -> None:
    block = first_session()
    # Without its own venv the block's `make install` would repoint this interpreter's
    # killswitch at the temporary copy.
    assert block.startswith("python3 -m venv .venv && . .venv/bin/activate"), block
    script = clone / "first-session.sh"
    script.write_text(block)
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", str(script)],
        cwd=clone,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SESSION_TIMEOUT,
        check=False,
    )
    transcript = f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.returncode == 0, transcript

    # It printed the console URL, the client secret stayed in its file, and the
    # introspection of the credential went from active to inactive.
    assert re.search(r"console\s+http://127\.0\.0\.1:\d+/console/", result.stdout), transcript
    secret_file = clone / "billing.secret"
    secret = secret_file.read_text().strip()
    assert secret.startswith("ksa_")
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert secret not in result.stdout + result.stderr
    verdicts = re.findall(r'"active": (true|false)', result.stdout)
    assert verdicts == ["true", "false"], transcript

    # `killswitch down` stopped everything and said so.
    data = clone / ".killswitch"
    assert not (data / "up.json").exists(), transcript
    assert "stopped killswitch at" in result.stderr, transcript

    # Serve the stopped system's database again and ask the API what happened.
    admin = (data / "admin.token").read_text().strip()
    issued = json.loads((clone / "task.json").read_text())
    task_id = issued["task"]["id"]
    database = f"sqlite:///{data / 'killswitch.db'}"
    with serve(data, database, admin_token_hint=admin) as srv, srv.client(admin) as api:
        revocations = api.get("/v1/revocations").json()["items"]
        task = api.get(f"/v1/tasks/{task_id}").json()
    by_type = {r["target"]["type"]: r for r in revocations}
    assert sorted(by_type) == ["cutoff", "task"], revocations
    assert len(revocations) == 2, revocations
    assert by_type["task"]["target"]["task_id"] == task_id
    assert by_type["task"]["reason"] == "left its scope"
    assert by_type["task"]["affected_credentials"] == 1
    assert by_type["cutoff"]["reason"] == "key leak"
    assert by_type["cutoff"]["target"]["agent_id"] is None  # everything, not one agent
    assert task["status"] == "revoked"
    assert task["agent_id"] == "billing"
