"""Exact prompt-token counts from the backend's ``/tokenize`` (vLLM)."""

from __future__ import annotations

from typing import Any

import aiohttp

from teamgpu.upstream.backends import BackendPool
from teamgpu.upstream.client import UpstreamClient

__all__ = ["TOKENIZE_TIMEOUT_S", "PromptCounter"]

TOKENIZE_TIMEOUT_S = 2.0


class PromptCounter:
    """Asks a backend serving the model how many tokens a prompt has.

    Used only for keys with a token limit, where the reservation should be exact. A
    backend that answers 404 (no ``/tokenize``: not vLLM) is not asked again.
    """

    def __init__(self, client: UpstreamClient, pool: BackendPool) -> None:
        self._client = client
        self._pool = pool
        self._no_tokenize: set[str] = set()

    async def count(self, served: str, body: dict[str, Any]) -> int | None:
        """The prompt's token count, or None when no backend tells (none up, no
        ``/tokenize``, a failure or a timeout of 2 s).

        Args:
            served: the served model name.
            body: the ``/tokenize`` request (from the protocol adapter).

        A dropped keep-alive connection is retried once; a timeout is not.
        """
        b = self._pool.pick(served)
        if b is None or b.url in self._no_tokenize:
            return None
        for attempt in (1, 2):
            try:
                status, data = await self._client.post_json(f"{b.url}/tokenize", body,
                                                            TOKENIZE_TIMEOUT_S)
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # a pooled keep-alive connection the engine closed just as it was reused
                # (uvicorn, as vLLM runs it, closes idle ones after 5 s): /tokenize has no
                # side effects, so once more, on another connection
                if attempt == 2:
                    return None
            except (aiohttp.ClientError, TimeoutError, OSError):
                return None
        if status == 404:
            self._no_tokenize.add(b.url)
            return None
        if status != 200 or not isinstance(data, dict) or not isinstance(data.get("count"), int):
            return None
        return int(data["count"])
