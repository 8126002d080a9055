"""Dashboard sessions: a random session id, kept in memory, mapped to an admin key.

The browser holds only the session id (an ``HttpOnly`` cookie), never the key. A session
expires ``ttl_s`` after sign-in (12 hours by default); the routes also re-check on every
request that its key is still active and still an admin key, so revoking the key ends
the session at once. Sessions live in the gateway process: a restart signs everyone out.

A plain synchronous data structure that takes ``now`` (monotonic seconds) on every call.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["Session", "SessionStore"]

DEFAULT_TTL_S = 12 * 3600.0


@dataclass(frozen=True, slots=True)
class Session:
    """One signed-in browser.

    Attributes:
        sid: The session id: 32 random bytes, URL-safe base64 (the cookie's value).
        key_id: Id of the admin key that signed in.
        user: That key's user, for display.
        csrf: Token the page must send back with every state-changing request.
        expires_at: Monotonic seconds after which the session is void.
    """

    sid: str
    key_id: str
    user: str
    csrf: str
    expires_at: float


class SessionStore:
    """Sessions by id, oldest first, at most ``max_sessions`` of them.

    Args:
        ttl_s: Session lifetime in seconds (default 12 hours).
        max_sessions: Most sessions kept; signing in beyond it ends the oldest session.

    Raises:
        ValueError: A non-positive argument.
    """

    def __init__(self, *, ttl_s: float = DEFAULT_TTL_S, max_sessions: int = 1000) -> None:
        if ttl_s <= 0 or max_sessions < 1:
            raise ValueError(f"ttl_s={ttl_s!r}, max_sessions={max_sessions!r}: must be positive")
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, key_id: str, user: str, now: float) -> Session:
        """Start a session for an admin key (the caller has verified it).

        Args:
            key_id: The key's id.
            user: The key's user.
            now: Monotonic seconds.
        """
        self._prune(now)
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        s = Session(sid=secrets.token_urlsafe(32), key_id=key_id, user=user,
                    csrf=secrets.token_urlsafe(32), expires_at=now + self.ttl_s)
        self._sessions[s.sid] = s
        return s

    def get(self, sid: str | None, now: float) -> Session | None:
        """The live session with id ``sid``, or None (unknown or expired; expired ones are
        removed)."""
        if not sid:
            return None
        s = self._sessions.get(sid)
        if s is None:
            return None
        if s.expires_at <= now:
            del self._sessions[sid]
            return None
        return s

    def delete(self, sid: str | None) -> None:
        """End one session (sign-out). Unknown ids are ignored."""
        if sid:
            self._sessions.pop(sid, None)

    def delete_key(self, key_id: str) -> int:
        """End every session of a key (it was revoked or lost its admin role).

        Returns:
            How many sessions ended.
        """
        doomed = [sid for sid, s in self._sessions.items() if s.key_id == key_id]
        for sid in doomed:
            del self._sessions[sid]
        return len(doomed)

    def _prune(self, now: float) -> None:
        for sid in [sid for sid, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[sid]
