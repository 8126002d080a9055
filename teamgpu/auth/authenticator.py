"""Who is calling: the key a request carries, checked through the failed-auth throttle."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from starlette.requests import Request

from teamgpu.auth.keys import KeyStore, Principal
from teamgpu.errors import AuthenticationError, PermissionDenied
from teamgpu.limits import AuthFailureThrottle, RateLimited

__all__ = ["INVALID_KEY_MESSAGES", "Authenticator", "secret_from_headers"]

INVALID_KEY_MESSAGES = {"unknown": "Invalid API key", "expired": "API key expired",
                        "revoked": "API key revoked"}
KNOWN_GOOD_MAX = 50_000  # (address, key) pairs remembered, least recently used dropped


def secret_from_headers(headers: Mapping[str, str]) -> str | None:
    """The key from ``Authorization: Bearer KEY``, else ``x-api-key: KEY`` (the OpenAI and
    Anthropic SDKs send one or the other), else None."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get("x-api-key") or None


class Authenticator:
    """Turns a request's key into a :class:`Principal`.

    Args:
        keys: the key store (read on every request, so a change takes effect at once).
        throttle: the per-address failed-authentication throttle (docs/limits.md).
        trust_forwarded_for: take the client's address from ``X-Forwarded-For``.
        on_throttled: called when an address is refused by the throttle (a metric).
    """

    def __init__(self, keys: KeyStore, throttle: AuthFailureThrottle, *,
                 trust_forwarded_for: bool, on_throttled: Callable[[], None]) -> None:
        self.keys = keys
        self.throttle = throttle
        self._trust_forwarded_for = trust_forwarded_for
        self._on_throttled = on_throttled
        # (address, key id) pairs that authenticated: a key already in use from an
        # address keeps working while that address is throttled for someone else's
        # failures (a colleague's IDE with a truncated key behind the same NAT)
        self._known_good: OrderedDict[tuple[str, str], None] = OrderedDict()
        # plain sqlite3 look-ups take about 10 us: not worth a thread hop
        self._lookup_in_thread = keys.engine.url.get_backend_name() != "sqlite"

    def client_addr(self, request: Request) -> str | None:
        """The client's address: the rightmost ``X-Forwarded-For`` entry when trusted (the
        one the gateway's own proxy added), else the peer's address."""
        if self._trust_forwarded_for:
            fwd = request.headers.get("x-forwarded-for")
            if fwd:
                return fwd.split(",")[-1].strip()[:64]
        return request.client.host if request.client else None

    async def authenticate(self, request: Request) -> Principal:
        """The principal of the key the request carries.

        Raises:
            RateLimited: 429, the client's address made too many failed attempts.
            AuthenticationError: 401, missing, unknown, expired or revoked key.
        """
        return await self.verify_secret(secret_from_headers(request.headers),
                                        self.client_addr(request) or "unknown")

    async def verify_secret(self, secret: str | None, addr: str) -> Principal:
        """The active key ``secret``, checked through the per-address failed-authentication
        throttle. The API and the dashboard's sign-in form both use it.

        Only a key that was never issued counts as a failure: a revoked or expired key is a
        stale client (an IDE still set up with it), and no key at all is a misconfigured
        one; counting those would lock out everyone behind the same address. An address
        over the limit is refused, except for a key that already authenticated from that
        address (this process remembers the last ``KNOWN_GOOD_MAX`` such pairs): a guesser
        has no such key, and the team behind one NAT keeps working.

        Raises:
            RateLimited: 429, ``addr`` made too many failed attempts, and the key is not
                one already used from it.
            AuthenticationError: 401, missing, unknown, expired or revoked key.
        """
        try:
            await self.throttle.check(addr)
        except RateLimited:
            p = await self._lookup(secret) if secret is not None else None
            if p is None or (addr, p.key_id) not in self._known_good \
                    or p.status(datetime.now(UTC)) != "active":
                self._on_throttled()
                raise
            self._known_good.move_to_end((addr, p.key_id))
            return p
        if secret is None:
            raise AuthenticationError(
                "Missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                code="missing_api_key",
            )
        # one look-up whatever the outcome: the reason of a refusal comes from the same row
        p = await self._lookup(secret)
        status = "unknown" if p is None else p.status(datetime.now(UTC))
        if p is None or status != "active":
            if p is None:
                await self.throttle.record_failure(addr)
            raise AuthenticationError(INVALID_KEY_MESSAGES[status])
        self._known_good[(addr, p.key_id)] = None
        self._known_good.move_to_end((addr, p.key_id))
        if len(self._known_good) > KNOWN_GOOD_MAX:
            self._known_good.popitem(last=False)
        return p

    async def _lookup(self, secret: str) -> Principal | None:
        if self._lookup_in_thread:
            return await asyncio.to_thread(self.keys.lookup, secret)
        return self.keys.lookup(secret)

    async def require_admin(self, request: Request) -> Principal:
        """The principal of an admin key.

        Raises:
            RateLimited: 429 (see :meth:`authenticate`).
            AuthenticationError: 401, no valid key.
            PermissionDenied: 403, a valid key that is not an admin key.
        """
        p = await self.authenticate(request)
        if not p.is_admin:
            raise PermissionDenied("this endpoint needs an admin key")
        return p
