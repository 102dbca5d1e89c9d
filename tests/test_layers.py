"""The layers hold: import-linter contracts (pyproject.toml ``[tool.importlinter]``) and a
subprocess import of the SDK that must not load litestar or a database driver."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept() -> None:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run(
        [lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_sdk_imports_no_litestar_or_database() -> None:
    code = (
        "import sys, service.sdk\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('litestar', 'asyncpg', 'sqlite3', 'aiosqlite', 'uvicorn', 'sklearn', 'jinja2') or "
        "m.startswith(('service.app', 'service.core', 'service.storage', 'service.api',"
        " 'service.auth', 'service.console')))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_kernel_imports_no_io_layer() -> None:
    code = (
        "import sys\n"
        "import service.kernel.tokens, service.kernel.deny, service.kernel.scopes\n"
        "import service.kernel.events, service.kernel.jwk, service.kernel.ids\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('litestar', 'asyncpg', 'sqlite3', 'aiokafka', 'httpx', 'uvicorn') or "
        "(m.startswith('service.') and not m.startswith('service.kernel')))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
