"""The ``killswitch`` command line against a real ``killswitch serve`` subprocess (one per
module, on SQLite). Client commands run in-process through ``service.cli.main`` (the
exact code the console script runs) to keep the subprocess count small; the console
script itself, the environment defaults and ``--offline`` run as real subprocesses."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from service.brokers import free_port
from service.cli import Api, build_parser, main
from tests.support.harness import AUD, basic, bearer
from tests.support.serve import Served, clean_env, killswitch_executable, run_cli, serve


@dataclass
class Result:
    code: int
    out: str
    err: str


class Cli(Protocol):
    def __call__(self, *args: str, stdin: str = "") -> Result: ...


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("cli")
    admin = "kso_" + secrets.token_urlsafe(32)
    with serve(base / "data", f"sqlite:///{base / 'data' / 'ks.db'}", admin_token=admin) as srv:
        yield srv


@pytest.fixture
def cli(server: Served, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``killswitch <args>`` in-process with KS_URL/KS_TOKEN pointing at the server."""
    monkeypatch.setenv("KS_URL", server.url)
    assert server.admin_token is not None
    monkeypatch.setenv("KS_TOKEN", server.admin_token)

    def run(*args: str, stdin: str = "") -> Result:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def _add_agent(cli: Cli, agent_id: str, *extra: str) -> str:
    r = cli("agents", "add", agent_id, "--grant", "call:tool/invoices.*", "--audience", AUD, *extra)
    assert r.code == 0, r.err
    match = re.search(r"client secret \(shown once\): (\S+)", r.err)
    assert match, r.err
    return match.group(1)


def _open_task(server: Served, agent_id: str, secret: str) -> dict[str, Any]:
    r = httpx.post(
        f"{server.url}/v1/tasks",
        json={"scope": {"grants": ["call:tool/invoices.read"], "audiences": [AUD]}},
        headers=basic(agent_id, secret),
    )
    assert r.status_code == 201, r.text
    result: dict[str, Any] = r.json()
    return result


def _introspect(server: Served, token: str) -> bool:
    assert server.admin_token is not None
    r = httpx.post(
        f"{server.url}/oauth2/introspect",
        data={"token": token},
        headers=bearer(server.admin_token),
    )
    assert r.status_code == 200, r.text
    active: bool = r.json()["active"]
    return active


# --------------------------------------------------------------------------- help


def _commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str | None]]:
    """Every (sub)command path with the one-line help its parent lists for it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*prefix, name), helps.get(name)
                yield from _commands(sub, (*prefix, name))


def test_console_script_help() -> None:
    result = run_cli(["--help"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage: killswitch")
    assert "Identity and task-scoped credentials for AI agents" in out
    for command in ("serve", "agents", "operators", "revoke", "keys", "config"):
        assert re.search(rf"^\s+{command}\s+\S", out, re.M), f"{command} not explained:\n{out}"
    assert "KS_TOKEN" in out
    assert "KS_URL" in out


def test_every_subcommand_explains_itself(cli: Cli) -> None:
    commands = list(_commands(build_parser()))
    assert len(commands) >= 13, commands
    for path, one_liner in commands:
        r = cli(*path, "--help")
        assert r.code == 0, (path, r.err)
        assert r.out.startswith(f"usage: killswitch {' '.join(path)}"), r.out
        assert one_liner, f"{' '.join(path)} has no help line in its parent's listing"
        # Its own --help says what it does, not only how to call it.
        flat = " ".join(r.out.split()).lower()
        assert " ".join(one_liner.split()).lower() in flat or _has_description(r.out), (
            f"`killswitch {' '.join(path)} --help` does not explain the command:\n{r.out}"
        )


def _has_description(help_text: str) -> bool:
    """A paragraph between the usage block and the first argument section."""
    blocks = [b for b in help_text.split("\n\n") if b.strip()]
    return len(blocks) > 2 and not blocks[1].rstrip().endswith(":") and ":\n" not in blocks[1]


def test_no_command_and_unknown_command_are_usage_errors(cli: Cli) -> None:
    r = cli()
    assert r.code == 2
    assert "usage: killswitch" in r.err
    r = cli("frobnicate")
    assert r.code == 2
    assert "invalid choice" in r.err


# --------------------------------------------------------------------------- agents


def test_agents_add_list_suspend_reinstate(cli: Cli, server: Served) -> None:
    agent_id = _new_id("cli-agent")
    r = cli(
        "agents",
        "add",
        agent_id,
        "--grant",
        "call:tool/invoices.*",
        "--grant",
        "GET:https://api.internal/v1/**",
        "--audience",
        AUD,
        "--max-calls",
        "50",
        "--max-ttl",
        "600",
        "--name",
        "CLI agent",
    )
    assert r.code == 0, r.err
    agent = json.loads(r.out)
    assert agent["id"] == agent_id
    assert agent["name"] == "CLI agent"
    assert agent["ceiling"]["grants"] == ["call:tool/invoices.*", "GET:https://api.internal/v1/**"]
    assert agent["ceiling"]["limits"]["max_calls"] == 50
    assert agent["max_task_ttl"] == 600
    secrets_shown = re.findall(r"client secret \(shown once\): (\S+)", r.err)
    assert len(secrets_shown) == 1, r.err
    secret = secrets_shown[0]
    assert secret not in r.out  # only on stderr, once
    assert r.err.count(secret) == 1
    issued = _open_task(server, agent_id, secret)  # the printed secret is the real one
    assert issued["task"]["scope"]["limits"]["max_calls"] == 50

    r = cli("agents", "list")
    assert r.code == 0, r.err
    [line] = [ln for ln in r.out.splitlines() if ln.startswith(agent_id)]
    assert line.split()[:2] == [agent_id, "active"]
    assert "call:tool/invoices.*" in line
    assert "GET:https://api.internal/v1/**" in line

    r = cli("agents", "suspend", agent_id)
    assert r.code == 2
    assert "--reason" in r.err

    r = cli("agents", "suspend", agent_id, "--reason", "cli test")
    assert r.code == 0, r.err
    revocation = json.loads(r.out)
    assert revocation["target"] == {"type": "agent", "agent_id": agent_id}
    assert revocation["reason"] == "cli test"
    assert not _introspect(server, issued["access_token"])
    r = cli("agents", "list")
    [line] = [ln for ln in r.out.splitlines() if ln.startswith(agent_id)]
    assert line.split()[1] == "suspended"

    r = cli("agents", "reinstate", agent_id, "--reason", "back")
    assert r.code == 0, r.err
    assert json.loads(r.out)["status"] == "active"
    r = cli("agents", "reinstate", agent_id, "--reason", "again")
    assert r.code == 1
    assert "HTTP 409" in r.err
    assert "not suspended" in r.err


def test_agents_add_with_a_public_jwk_and_no_secret(cli: Cli, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from service.kernel.jwk import public_jwk

    jwk_file = tmp_path / "agent.jwk"
    jwk_file.write_text(json.dumps(public_jwk(ed25519.Ed25519PrivateKey.generate().public_key())))
    agent_id = _new_id("keyed")
    r = cli(
        "agents",
        "add",
        agent_id,
        "--grant",
        "call:tool/x",
        "--audience",
        AUD,
        "--public-jwk",
        str(jwk_file),
        "--no-secret",
    )
    assert r.code == 0, r.err
    assert json.loads(r.out)["auth_methods"] == ["private_key_jwt"]
    assert "client secret" not in r.err


def test_agents_add_secret_file_and_json(cli: Cli, server: Served, tmp_path: Path) -> None:
    agent_id = _new_id("filed")
    secret_file = tmp_path / "agent.secret"
    r = cli(
        "agents", "add", agent_id, "--grant", "call:tool/invoices.*", "--audience", AUD,
        "--secret-file", str(secret_file),
    )  # fmt: skip
    assert r.code == 0, r.err
    assert json.loads(r.out)["id"] == agent_id
    secret = secret_file.read_text().strip()
    assert secret.startswith("ksa_")
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert secret not in r.out + r.err  # the file is the only copy
    assert f"client secret written to {secret_file} (mode 0600)" in r.err
    _open_task(server, agent_id, secret)

    # --json: the API's whole answer on stdout, secret included (or null with a file).
    other = _new_id("json")
    r = cli("agents", "add", other, "--grant", "call:tool/invoices.*", "--audience", AUD, "--json")
    assert r.code == 0, r.err
    created = json.loads(r.out)
    assert created["agent"]["id"] == other
    assert "client secret" not in r.err
    _open_task(server, other, created["client_secret"])
    third = _new_id("json-file")
    r = cli(
        "agents", "add", third, "--grant", "call:tool/invoices.*", "--audience", AUD, "--json",
        "--secret-file", str(secret_file),
    )  # fmt: skip
    assert r.code == 0, r.err
    assert json.loads(r.out)["client_secret"] is None
    _open_task(server, third, secret_file.read_text().strip())  # replaced, still 0600
    assert secret_file.stat().st_mode & 0o777 == 0o600

    r = cli("agents", "add", _new_id("x"), "--grant", "call:x", "--audience", AUD,
            "--no-secret", "--secret-file", str(tmp_path / "none"))  # fmt: skip
    assert r.code == 2
    assert "--secret-file needs a client secret" in r.err
    assert not (tmp_path / "none").exists()


def test_agents_add_without_an_audience_is_refused(cli: Cli) -> None:
    agent_id = _new_id("no-aud")
    r = cli("agents", "add", agent_id, "--grant", "call:tool/invoices.*")
    assert r.code == 1
    [line] = r.err.splitlines()
    assert line.startswith("killswitch: error: HTTP 400 Bad request: an agent's ceiling needs")
    assert "audience" in line
    r = cli("agents", "list")
    assert agent_id not in r.out  # nothing registered


# --------------------------------------------------------------------------- tasks


def test_tasks_list_and_show(cli: Cli, server: Served) -> None:
    agent_id = _new_id("lister")
    secret = _add_agent(cli, agent_id)
    first, second = (_open_task(server, agent_id, secret) for _ in range(2))
    r = cli("revoke", "task", first["task"]["id"], "--reason", "listing test")
    assert r.code == 0, r.err

    r = cli("tasks", "list", "--agent", agent_id)
    assert r.code == 0, r.err
    header, *rows = r.out.splitlines()
    assert header.split()[:3] == ["task", "agent", "status"]
    assert [row.split()[:3] for row in rows] == [  # newest first
        [second["task"]["id"], agent_id, "active"],
        [first["task"]["id"], agent_id, "revoked"],
    ]
    assert "call:tool/invoices.read" in rows[0]

    r = cli("tasks", "list", "--agent", agent_id, "--status", "active", "--quiet")
    assert r.code == 0, r.err
    assert r.out == second["task"]["id"] + "\n"  # what $(...) captures
    r = cli("tasks", "list", "--agent", agent_id, "--status", "revoked", "--json")
    assert r.code == 0, r.err
    page = json.loads(r.out)
    assert [t["id"] for t in page["items"]] == [first["task"]["id"]]
    r = cli("tasks", "list", "--status", "zombie")
    assert r.code == 2
    assert "invalid choice" in r.err

    r = cli("tasks", "show", second["task"]["id"])
    assert r.code == 0, r.err
    shown = json.loads(r.out)
    assert shown == second["task"] | {"status": "active"}
    r = cli("tasks", "show", "no-such-task")
    assert r.code == 1
    assert "HTTP 404 Not found: no task 'no-such-task'" in r.err


def test_introspect_a_token(cli: Cli, server: Served) -> None:
    agent_id = _new_id("intro")
    issued = _open_task(server, agent_id, _add_agent(cli, agent_id))
    token = issued["access_token"]
    r = cli("introspect", token)
    assert r.code == 0, r.err
    answer = json.loads(r.out)
    assert answer["active"] is True
    assert answer["client_id"] == agent_id
    assert answer["scope"] == "call:tool/invoices.read"
    r = cli("revoke", "task", issued["task"]["id"], "--reason", "introspect test")
    assert r.code == 0, r.err
    r = cli("introspect", "-", stdin=token + "\n")  # from stdin: not in the process list
    assert r.code == 0, r.err
    assert json.loads(r.out) == {"active": False}
    r = cli("introspect", "not-a-token")
    assert (r.code, json.loads(r.out)) == (0, {"active": False})
    r = cli("introspect", "-", stdin="")
    assert r.code == 2
    assert "no access token" in r.err


# --------------------------------------------------------------------------- up/env/down


def test_env_and_down_without_a_running_system(tmp_path: Path) -> None:
    data = tmp_path / "nothing-here"
    result = run_cli(["env", "--data-dir", str(data)])
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"killswitch: error: no `killswitch up` is running for {data}; "
        "start one with `killswitch up --detach`\n"
    )
    result = run_cli(["down", "--data-dir", str(data)])
    assert result.returncode == 0, result.stderr
    assert f"nothing is up for {data}" in result.stderr
    result = run_cli(["up", "--detach", "--demo", "--data-dir", str(data)])
    assert result.returncode == 2
    assert "--detach" in result.stderr
    assert not data.exists()


def test_env_and_down_ignore_a_stale_state_file(tmp_path: Path) -> None:
    """A crashed `up` leaves up.json behind: its pid is gone, so nothing is running."""
    from service.stack import STATE_FILE

    data = tmp_path / "crashed"
    data.mkdir()
    state = {"pid": _exited_pid(), "url": "http://127.0.0.1:9", "admin_token": "kso_x"}
    state["banner"] = "killswitch is up"
    (data / STATE_FILE).write_text(json.dumps(state))
    result = run_cli(["env", "--data-dir", str(data)])
    assert result.returncode == 1
    assert "no `killswitch up` is running" in result.stderr
    assert not (data / STATE_FILE).exists()


def _exited_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: no process has this pid now
    return proc.pid


def test_up_banner_names_the_console() -> None:
    from service.stack import Stack

    banner = Stack(
        url="http://127.0.0.1:8123",
        admin_token="kso_x",
        detector_token="kso_y",
        kafka_bootstrap="127.0.0.1:9092",
        detector_metrics="http://127.0.0.1:9464",
        data_dir=Path(".killswitch"),
    ).banner()
    assert re.search(r"^  console +http://127\.0\.0\.1:8123/console/$", banner, re.M), banner
    assert "export KS_URL=http://127.0.0.1:8123 KS_TOKEN=kso_x" in banner
    assert "killswitch down" in banner


# --------------------------------------------------------------------------- operators


def test_operators_add_analyst(cli: Cli, server: Served) -> None:
    name = _new_id("alice")
    r = cli("operators", "add", name, "--role", "analyst")
    assert r.code == 0, r.err
    operator = json.loads(r.out)
    assert (operator["name"], operator["role"]) == (name, "analyst")
    [token] = re.findall(r"operator token \(shown once\): (kso_\S+)", r.err)
    assert token not in r.out
    # The token works, with the analyst's rights only.
    assert httpx.get(f"{server.url}/v1/agents", headers=bearer(token)).status_code == 200
    r = cli("agents", "add", _new_id("x"), "--grant", "call:x", "--token", token)
    assert r.code == 1
    assert "HTTP 403 Forbidden" in r.err
    assert "role: admin" in r.err

    r = cli("operators", "add", name, "--role", "analyst")
    assert r.code == 1
    assert "HTTP 409" in r.err
    assert "already exists" in r.err
    r = cli("operators", "add", _new_id("rs"), "--role", "resource_server")
    assert r.code == 1
    assert "HTTP 400 Bad request: a resource_server operator needs the audience" in r.err
    r = cli("operators", "add", "bob", "--role", "superuser")
    assert r.code == 2
    assert "invalid choice" in r.err


def test_operators_add_offline_against_a_stopped_service(tmp_path: Path) -> None:
    data = tmp_path / "data"
    db = f"sqlite:///{data / 'ks.db'}"
    with serve(data, db) as first:
        admin = first.printed_admin_token
        assert admin is not None, first.output()
        port = first.port
    env = {"KS_DATA_DIR": str(data), "KS_DATABASE_URL": db}
    result = run_cli(["operators", "add", "night-shift", "--role", "analyst", "--offline"], env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["role"] == "analyst"
    [token] = re.findall(r"operator token \(shown once\): (kso_\S+)", result.stderr)
    result = run_cli(
        ["operators", "add", "rs-offline", "--role", "resource_server", "--offline"], env=env
    )
    assert result.returncode == 1
    assert "needs the audience" in result.stderr

    with serve(data, db, port=port) as second:
        assert second.printed_admin_token is None, second.output()
        r = httpx.get(f"{second.url}/v1/agents", headers=bearer(token))
        assert r.status_code == 200, r.text
        r = httpx.get(f"{second.url}/v1/operators", headers=bearer(admin))
        assert r.status_code == 200, r.text
        assert {o["name"] for o in r.json()} == {"bootstrap-admin", "night-shift"}


# --------------------------------------------------------------------------- revoke


def test_revoke_task_agent_credential_and_cutoff(cli: Cli, server: Served) -> None:
    agent_id = _new_id("rv")
    secret = _add_agent(cli, agent_id)
    by_task, by_jti, by_cutoff = (_open_task(server, agent_id, secret) for _ in range(3))

    r = cli("revoke", "task", by_task["task"]["id"], "--reason", "left its scope", "--yes")
    assert r.code == 0, r.err
    assert json.loads(r.out)["target"] == {"type": "task", "task_id": by_task["task"]["id"]}
    assert not _introspect(server, by_task["access_token"])
    assert _introspect(server, by_jti["access_token"])

    r = cli("revoke", "credential", by_jti["jti"], "--reason", "leaked")
    assert r.code == 0, r.err
    assert json.loads(r.out)["affected_credentials"] == 1
    assert not _introspect(server, by_jti["access_token"])
    assert _introspect(server, by_cutoff["access_token"])

    # Cut-off without --yes asks; anything but yes aborts and revokes nothing.
    r = cli("revoke", "cutoff", "--agent", agent_id, "--reason", "key leak", stdin="n\n")
    assert r.code == 1
    assert "aborted" in r.err
    assert _introspect(server, by_cutoff["access_token"])
    r = cli("revoke", "cutoff", "--agent", agent_id, "--reason", "key leak", "--yes")
    assert r.code == 0, r.err
    revocation = json.loads(r.out)
    assert revocation["target"]["type"] == "cutoff"
    assert revocation["target"]["agent_id"] == agent_id
    assert not _introspect(server, by_cutoff["access_token"])

    other = _new_id("rv2")
    _add_agent(cli, other)
    r = cli("revoke", "agent", other, "--reason", "compromised host", "--yes")
    assert r.code == 0, r.err
    assert json.loads(r.out)["target"] == {"type": "agent", "agent_id": other}
    r = cli("agents", "list")
    [line] = [ln for ln in r.out.splitlines() if ln.startswith(other)]
    assert line.split()[1] == "suspended"

    r = cli("revoke", "task", "no-such-task", "--reason", "x")
    assert r.code == 1
    assert "HTTP 404 Not found" in r.err


def test_revoke_cutoff_without_yes_on_a_closed_stdin_refuses(cli: Cli, server: Served) -> None:
    agent_id = _new_id("eof")
    issued = _open_task(server, agent_id, _add_agent(cli, agent_id))
    # In-process: end of input at once.
    r = cli("revoke", "cutoff", "--agent", agent_id, "--reason", "key leak", stdin="")
    assert r.code == 1
    assert r.out == ""
    assert r.err == (
        "killswitch: error: a cut-off needs a confirmation and standard input is closed: "
        "pass --yes\n"
    )
    # The console script with </dev/null, as a script or CI job would run it.
    assert server.admin_token is not None
    env = {"KS_URL": server.url, "KS_TOKEN": server.admin_token}
    with open(os.devnull) as devnull:
        result = subprocess.run(
            [killswitch_executable(), "revoke", "cutoff", "--reason", "key leak"],
            env=clean_env(env),
            stdin=devnull,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "EOFError" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "pass --yes" in result.stderr
    assert _introspect(server, issued["access_token"])  # nothing was revoked


def test_revoking_a_revoked_task_again_answers_with_the_first_revocation(
    cli: Cli, server: Served
) -> None:
    agent_id = _new_id("twice")
    issued = _open_task(server, agent_id, _add_agent(cli, agent_id))
    task_id = issued["task"]["id"]
    r = cli("revoke", "task", task_id, "--reason", "first")
    assert r.code == 0, r.err
    first = json.loads(r.out)
    assert "already revoked" not in r.err
    r = cli("revoke", "task", task_id, "--reason", "second")
    assert r.code == 0, r.err
    again = json.loads(r.out)
    assert again == first  # the same record: same id, seq and first reason
    assert f"already revoked: this is revocation #{first['seq']}" in r.err


def test_revoke_needs_an_id_and_a_reason(cli: Cli) -> None:
    for target in ("task", "agent", "credential"):
        r = cli("revoke", target, "--reason", "x")
        assert r.code == 2, r.err
        assert "usage: killswitch" in r.err
        assert f"revoke {target} needs an id" in r.err
    r = cli("revoke", "task", "abc")
    assert r.code == 2
    assert "--reason" in r.err
    r = cli("revoke", "everything", "--reason", "x")
    assert r.code == 2
    assert "invalid choice" in r.err


# --------------------------------------------------------------------------- keys


def test_keys_list_and_rotate(cli: Cli, server: Served) -> None:
    r = cli("keys", "list")
    assert r.code == 0, r.err
    [active_before] = [ln.split()[0] for ln in r.out.splitlines() if ln.endswith("active")]
    r = cli("keys", "rotate")
    assert r.code == 0, r.err
    match = re.fullmatch(r"rotated: new signing key (\S+) \(EdDSA\)\n", r.out)
    assert match, r.out
    new_kid = match.group(1)
    assert new_kid != active_before
    r = cli("keys", "list")
    assert r.code == 0, r.err
    lines = {ln.split()[0]: ln for ln in r.out.splitlines()}
    assert lines[new_kid].split()[1:] == ["EdDSA", "active"]
    assert "retired, published until" in lines[active_before]
    jwks = httpx.get(f"{server.url}/.well-known/jwks.json").json()
    assert {active_before, new_kid} <= {k["kid"] for k in jwks["keys"]}


# --------------------------------------------------------------------------- errors


def test_no_token_is_a_clear_error(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KS_TOKEN")
    r = cli("agents", "list")
    assert r.code == 2
    assert "killswitch: error: no operator token: pass --token or set KS_TOKEN" in r.err
    # Same through the console script, with no KS_* environment at all.
    result = run_cli(["keys", "list"])
    assert result.returncode == 2
    assert "no operator token" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_service_is_a_clear_error(cli: Cli) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    r = cli("agents", "list", "--url", url)
    assert r.code == 2
    assert f"cannot reach killswitch at {url}" in r.err
    assert "killswitch serve" in r.err
    assert "Traceback" not in r.err


def test_bad_token_is_reported_with_the_problem_title(cli: Cli) -> None:
    r = cli("agents", "list", "--token", "kso_" + secrets.token_urlsafe(16))
    assert r.code == 1
    assert "HTTP 401 Authentication required: invalid operator token" in r.err


def test_invalid_grants_are_all_named(cli: Cli) -> None:
    bad = ["nocolon", "call:", ":tool/x", "call:a***b"]
    args = [arg for grant in bad for arg in ("--grant", grant)]
    r = cli("agents", "add", _new_id("bad"), *args, "--audience", AUD)
    assert r.code == 1
    assert "HTTP 400 Invalid scope" in r.err
    for grant in bad:
        assert repr(grant) in r.err or grant in r.err, f"{grant!r} not named:\n{r.err}"


def test_problem_details_list_the_offending_grants(
    cli: Cli, server: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    """The client's error rendering: a scope violation names each offending grant."""
    agent_id = _new_id("off")
    secret = _add_agent(cli, agent_id)
    parent = _open_task(server, agent_id, secret)
    api = Api(server.url, parent["access_token"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        api.call(
            "POST",
            "/v1/tasks",
            {
                "scope": {
                    "grants": ["call:tool/invoices.write", "call:tool/invoices.read"],
                    "audiences": [AUD],
                    "limits": {},
                }
            },
        )
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "HTTP 403 Scope exceeds what is allowed: declared scope exceeds" in err
    assert "parent task's scope" in err
    assert "\n  - grant 'call:tool/invoices.write'" in err
    assert "call:tool/invoices.read'" not in err.split("\n", 1)[1]  # within the parent


def test_client_commands_read_ks_url_and_ks_token_from_the_environment(server: Served) -> None:
    assert server.admin_token is not None
    result = run_cli(["keys", "list"], env={"KS_URL": server.url, "KS_TOKEN": server.admin_token})
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\S+\s+EdDSA\s+active$", result.stdout, re.M), result.stdout


def test_config_lists_every_setting(cli: Cli) -> None:
    from service.config import describe

    r = cli("config")
    assert r.code == 0, r.err
    for _name, env, _default, _doc in describe():
        assert re.search(rf"^{env}\s", r.out, re.M), env
