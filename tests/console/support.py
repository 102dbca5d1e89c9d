"""Helpers for driving the console as a browser would: fetch a form, keep its CSRF token,
post it back with the session cookie."""

from __future__ import annotations

import re
from typing import Any

import httpx

from tests.support.harness import KS

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_NONCE = re.compile(r'name="nonce" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "no csrf_token field on the page"
    return found.group(1)


def nonce_of(html: str) -> str:
    found = _NONCE.search(html)
    assert found, "no confirmation nonce on the page"
    return found.group(1)


async def sign_in(ks: KS, token: str) -> str:
    """Sign ``ks.client`` in with ``token`` (dropping any earlier session); returns the
    session's CSRF token."""
    ks.client.cookies.clear()
    page = await ks.client.get("/console/login")
    assert page.status_code == 200, page.text
    r = await ks.client.post(
        "/console/login",
        data={"token": token, "csrf_token": csrf_of(page.text), "next": ""},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    landing = await ks.client.get(r.headers["location"])
    assert landing.status_code == 200, landing.text
    return csrf_of(landing.text)


async def post_form(ks: KS, path: str, data: dict[str, Any]) -> httpx.Response:
    return await ks.client.post(path, data=data, follow_redirects=False)


async def open_task_for(ks: KS) -> tuple[str, str, str]:
    """A fresh agent with one open task: (agent id, task id, access token)."""
    agent = await ks.agent()
    issued = await ks.open_task(agent.headers)
    return agent.id, issued["task"]["id"], issued["access_token"]
