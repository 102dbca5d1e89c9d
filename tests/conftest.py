"""Shared fixtures: real databases (SQLite file and a throwaway PostgreSQL server) and
an in-process killswitch app over them. Every test that takes ``ks`` runs twice, once
per database."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.support.harness import KS, running_app
from tests.support.postgres import PostgresServer, start_postgres

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = start_postgres()
    yield server
    server.stop()


async def fresh_postgres_database(server: PostgresServer) -> str:
    name = f"ks_{next(_db_counter)}_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(server.admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server.url(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'killswitch.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return await fresh_postgres_database(server)


@pytest.fixture
async def ks(database_url: str, tmp_path: Path) -> AsyncIterator[KS]:
    async with running_app(database_url, tmp_path) as harness:
        yield harness
