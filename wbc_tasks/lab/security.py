"""Defence in depth for every response of the lab: a strict Content-Security-Policy with a fresh
nonce per response (the only scripts that run are the pages' own, which carry it), no MIME
sniffing, and no full URLs (drop names) leaked in the Referer header to other sites.

Even if a value ever escaped escaping, an injected ``<script>`` or ``onload=`` has no nonce and
does not run. Styles stay inline (``'unsafe-inline'`` for styles only: the pages have no external
assets). ``frame-ancestors 'self'``: Airflow shows the lab inside its own frame, same origin.
"""

from __future__ import annotations

import secrets
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REFERRER_POLICY = "same-origin"


def lab_policy(nonce: str) -> str:
    """The lab's Content-Security-Policy for one response."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'self'"
    )


def csp_nonce(request: Any) -> str:
    """The nonce of this response's policy (for the templates' ``<script nonce=...>``); empty
    where the app runs without :class:`SecurityHeaders` (a test's policy-off mode)."""
    return str(getattr(request.state, "csp_nonce", ""))


class SecurityHeaders:
    """ASGI middleware: the policy, ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy`` on
    every response, streamed ones included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(18)
        # A copy: the state Starlette hands each request may be shared with the parent app's.
        scope["state"] = {**scope.get("state", {}), "csp_nonce": nonce}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = lab_policy(nonce)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = REFERRER_POLICY
            await send(message)

        await self.app(scope, receive, send_with_headers)
