"""Prefix-affinity routing between backends serving the same model: a pure data structure.

When a model runs on several vLLM servers, the next turn of a conversation (or another
request with the same long prefix) is cheapest on the server that served the prefix: its
prefix cache still holds the KV blocks, so it skips their prefill. The router remembers
which backend served which prompt prefix and sends a request there, unless that backend is
much busier than the least-loaded one. The idea is that of SGLang's cache-aware router
(sgl-router, SGLang v0.4: an approximate radix tree of each worker's prompts, balanced
against load, over RadixAttention from Zheng et al., "SGLang: Efficient Execution of
Structured Language Model Programs", NeurIPS 2024) and of the prefix-aware routing of
llm-d and vLLM's production-stack, reduced to what a gateway can know without the
engine's tokenizer.

Two parts, neither doing I/O or reading a clock:

* :func:`routing_key` turns a request body into a :class:`RoutingKey`, the cumulative
  hashes of its prompt prefix at fixed byte boundaries.
* :class:`PrefixRouter` remembers, per served model, which backends last served each of
  those hashes (:meth:`~PrefixRouter.record`) and picks a backend for a new request
  (:meth:`~PrefixRouter.choose`).

Nothing here depends on time: vLLM evicts cached blocks under memory pressure, not by
age, so how old an entry is says little about whether the engine still holds it. The
entry cap (an LRU) bounds memory instead.

What vLLM's prefix cache keys on, and how the key approximates it
----------------------------------------------------------------
vLLM (V1, 0.32) renders chat messages with the model's chat template, tokenizes the
result and splits the tokens into blocks of ``block_size`` tokens (16 by default on a GPU;
128 on the CPU, where ``platforms/cpu.py`` raises the default). Each *full* block is
hashed together with its parent block's hash (plus the LoRA name, multi-modal item hashes
and, in the first block, the request's ``cache_salt``), so a block hash stands for the
whole prefix up to its end, and a cache hit is always the longest run of whole blocks
that equals an earlier request's. A partial last block is never cached.

The gateway has no tokenizer and no chat template, so it hashes bytes instead of tokens,
keeping the two properties that matter:

1. *Same prefix in, same hashes out; turn k+1 extends turn k.* The canonical
   serialisation writes a header line (``tools``, ``cache_salt``, ``chat_template``,
   ``chat_template_kwargs``, ``documents``: what the template renders before the first
   message, or what salts every block), then one line per message, each message encoded
   on its own as JSON: role, name and content first, as the template renders them, then
   the other fields with sorted keys (so dict key order never matters). A message's
   line does not depend on the messages after it, so the bytes of turn k's prompt are a
   prefix of turn k+1's, exactly as the rendered template of turn k is a prefix of turn
   k+1's. Text-only content given as a list of parts is joined with ``"\\n"``, as vLLM
   does for string-format templates, so ``"hi"`` and ``[{"type": "text", "text": "hi"}]``
   key alike; Anthropic's ``cache_control`` markers (which Claude Code moves to the newest
   message every turn) are dropped, because they never reach the tokens.
2. *Cumulative hashes at fixed boundaries.* Every ``BLOCK_BYTES`` (256) bytes the running
   hash (BLAKE2b, 64 bits) of everything so far is taken; only full byte-blocks count,
   like vLLM's full token blocks. Two requests share key block *i* exactly when their
   first ``256 * (i + 1)`` bytes are equal, and then their rendered prompts, and so their
   token blocks, agree up to about that point (BPE merges can shift the boundary by a
   token).

Why 256 bytes: English text and code run at about 3-4 bytes per token, so a byte-block is
about 64-85 tokens. The router only needs to rank backends by how long a prefix each
holds, and an error of one byte-block (under 100 tokens) is small against the prompts
where affinity pays (system prompts, files, conversations of hundreds to thousands of
tokens). Finer blocks would cost more: a 32k-token prompt (about 128 KB) is 500 hashes at
256 bytes, 2,000 at 64. With 100,000 entries (``DEFAULT_MAX_ENTRIES``) the router covers
about 25 MB of prompt text, some 6 million tokens, more than the KV caches of several
large GPUs hold (an 80 GB GPU keeps about half a million tokens of an 8B model), so the
cap rarely forgets a prefix an engine still has. Token-id prompts (``/v1/completions``
with a list of ints) are written 4 bytes per token, the same scale.

A match shorter than ``min_match_blocks`` (2 blocks, about 128 tokens: one KV block of
vLLM on the CPU, below which the CPU engine cannot hit at all) counts as no match, so that
a short prefix many requests share (a client's default system prompt) does not herd every
request onto one backend.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "BLOCK_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "MAX_KEY_BLOCKS",
    "PrefixRouter",
    "RoutingKey",
    "canonical_prompt",
    "routing_key",
]

BLOCK_BYTES = 256
"""Bytes of canonical prompt per key block (about 64 tokens; see the module docstring)."""
MAX_KEY_BLOCKS = 1024
"""Blocks hashed per request at most: the first 256 KiB (about 64k tokens) of a prompt."""
DEFAULT_MAX_ENTRIES = 100_000
"""Block hashes remembered across all models (about 25 MB of Python objects)."""
DEFAULT_MAX_HOLDERS = 4
"""Backends remembered per block hash, the most recent first."""

_HEADER_FIELDS = ("tools", "cache_salt", "chat_template", "chat_template_kwargs", "documents")
"""Body fields rendered before the first message, or salting every block."""
_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
_DROPPED_KEYS = frozenset({"cache_control"})
"""Keys of messages and parts that never reach the tokens."""
_Holder = tuple[str, int]
"""A backend URL and its epoch (see :meth:`PrefixRouter.forget`)."""
_ENDPOINTS = {
    "chat/completions": "chat",
    "completions": "completions",
    "responses": "responses",
    "messages": "anthropic",
}


@dataclass(frozen=True, slots=True)
class RoutingKey:
    """The prefix hashes of one request's prompt.

    Attributes:
        blocks: ``blocks[i]`` is a 64-bit hash of the first ``BLOCK_BYTES * (i + 1)``
            bytes of the canonical prompt; full blocks only, at most ``MAX_KEY_BLOCKS``.
    """

    blocks: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.blocks)

    @classmethod
    def from_bytes(cls, data: bytes) -> RoutingKey | None:
        """The key of a canonical prompt, or None when it is shorter than one block."""
        n = min(len(data) // BLOCK_BYTES, MAX_KEY_BLOCKS)
        if n == 0:
            return None
        h = hashlib.blake2b(digest_size=8)
        blocks = []
        view = memoryview(data)
        for i in range(n):
            h.update(view[i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES])
            blocks.append(int.from_bytes(h.copy().digest(), "little"))
        return cls(tuple(blocks))


def routing_key(endpoint: str, payload: Mapping[str, Any]) -> RoutingKey | None:
    """The routing key of a request body, or None when there is nothing to route by.

    Args:
        endpoint: ``chat/completions``, ``completions``, ``responses`` or ``messages``
            (Anthropic), with or without a leading ``/v1/``.
        payload: the decoded JSON body, as the client sent it (the fields the gateway
            owns, ``model``, ``priority``, ``stream_options``, are not part of the key).

    Returns:
        None for other endpoints (embeddings), for a prompt shorter than one block
        (``BLOCK_BYTES``), and for bodies of an unexpected shape (the engine will answer
        those; routing by load is then as good as anything). Never raises on bad input.
    """
    data = canonical_prompt(endpoint, payload)
    return RoutingKey.from_bytes(data) if data is not None else None


def canonical_prompt(endpoint: str, payload: Mapping[str, Any]) -> bytes | None:
    """The canonical serialisation :func:`routing_key` hashes (see the module docstring),
    or None for an endpoint or body shape it does not route."""
    kind = _ENDPOINTS.get(endpoint.removeprefix("/").removeprefix("v1/"))
    try:
        if kind == "chat":
            return _chat(payload, payload.get("messages"), None)
        if kind == "anthropic":
            return _chat(payload, payload.get("messages"), payload.get("system"))
        if kind == "responses":
            return _responses(payload)
        if kind == "completions":
            return _completions(payload.get("prompt"), _header(payload))
    except (TypeError, ValueError, orjson.JSONEncodeError):
        return None  # an odd body (a set, a huge int, a lone surrogate): route by load
    return None


# --- canonical serialisation -------------------------------------------------------------
def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS) + b"\n"


def _header(payload: Mapping[str, Any]) -> bytes:
    return _dumps({k: payload[k] for k in _HEADER_FIELDS if payload.get(k) is not None})


def _strip(obj: Any) -> Any:
    """``obj`` without the keys that never reach the tokens, at any depth."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _DROPPED_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _content(content: Any) -> Any:
    """Text-only part lists become one string joined by newlines (vLLM's rendering for
    string-format templates); anything else is kept, without ``cache_control``."""
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") in _TEXT_PART_TYPES
            and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    return _strip(content)


def _message(msg: Any) -> bytes:
    """One line: ``[role, name, content, {other fields, sorted}]``. Role and name come
    first, as the template renders them before the content: a long content then cannot
    hide a different role from the first blocks."""
    if not isinstance(msg, dict):
        raise TypeError("a message must be an object")
    rest = {k: _strip(v) for k, v in msg.items()
            if k not in _DROPPED_KEYS and k not in ("role", "name", "content") and v is not None}
    return _dumps([msg.get("role"), msg.get("name"), _content(msg.get("content")), rest])


def _chat(payload: Mapping[str, Any], messages: Any, system: Any) -> bytes | None:
    if not isinstance(messages, list):
        return None
    parts = [_header(payload)]
    if system is not None:  # Anthropic's top-level system prompt comes before the messages
        parts.append(_message({"role": "system", "content": system}))
    parts.extend(_message(m) for m in messages)
    return b"".join(parts)


def _responses(payload: Mapping[str, Any]) -> bytes | None:
    inp = payload.get("input")
    items: list[Any]
    if isinstance(inp, str):
        items = [{"role": "user", "content": inp}]
    elif isinstance(inp, list):
        items = inp
    else:
        return None
    parts = [_header(payload)]
    if payload.get("instructions") is not None:
        parts.append(_message({"role": "system", "content": payload["instructions"]}))
    parts.extend(_message(m) for m in items)
    return b"".join(parts)


def _completions(prompt: Any, header: bytes) -> bytes | None:
    """A raw prompt: its UTF-8 bytes, or 4 bytes per token id. A batch of prompts (one
    request, one backend) routes by its first prompt."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return header + prompt.encode("utf-8", "surrogatepass")
    if isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return header + b"".join(t.to_bytes(4, "little", signed=True) for t in prompt)
    return None


# --- the router --------------------------------------------------------------------------
class PrefixRouter:
    """Which backends served which prompt prefixes, per served model; and the choice.

    Memory: at most ``max_entries`` block hashes over all models, each with up to
    ``max_holders`` backends, least recently recorded dropped first (about 250 bytes an
    entry, measured: 25 MB at the default cap). Time: O(blocks of the key) for
    :meth:`choose` and :meth:`record` (about 0.5 ms for a 30 KB prompt); O(1) for
    :meth:`forget`, which only starts a new *epoch* for the backend: entries of its older
    epochs no longer count and are cleaned up as they are recorded over or dropped.

    Decision rule (:meth:`choose`), over the candidates the caller gives (up, not
    draining, not excluded):

    1. ``least`` is the smallest load among the candidates. A candidate is *eligible* if
       its load is at most ``least + max(abs_slack, rel_slack * least)`` requests in
       flight: with the defaults, at most 2 more than the least-loaded backend, or 50 %
       more when that is larger (a backend 3 busier than an idle one, or 5 busier than
       one with 8 in flight, is too busy to keep a prefix).
    2. Among eligible candidates, the one holding the longest matching prefix wins, if
       that match is at least ``min_match_blocks`` blocks. Ties: the lower load, then
       round-robin.
    3. Otherwise (no match, or too short): the least-loaded candidate; ties round-robin.

    With two backends this is: the backend that served the prefix, unless it is busier
    than the other by more than the slack, then the least-loaded one. With more, a
    too-busy holder of the longest prefix gives way to the holder of the next-longest
    one before falling back to load alone. The round-robin counter is the router's only
    other state; it makes ties deterministic (tests) and spreads new conversations.

    Args:
        max_entries: block hashes remembered, over all models.
        max_holders: backends remembered per hash (a hot shared prefix ends up on
            several backends; then load decides between them).
        abs_slack: requests in flight a holder may exceed the least-loaded by, at least.
        rel_slack: the same, as a fraction of the least-loaded backend's load.
        min_match_blocks: shortest match, in key blocks, that counts.

    Raises:
        ValueError: a parameter out of range (a programming error, at start-up).
    """

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_holders: int = DEFAULT_MAX_HOLDERS,
        abs_slack: int = 2,
        rel_slack: float = 0.5,
        min_match_blocks: int = 2,
    ) -> None:
        if max_entries < 1 or max_holders < 1 or abs_slack < 0 or rel_slack < 0 \
                or min_match_blocks < 1:
            raise ValueError(
                f"PrefixRouter: max_entries={max_entries}, max_holders={max_holders}, "
                f"min_match_blocks={min_match_blocks} must be >= 1 and abs_slack={abs_slack}, "
                f"rel_slack={rel_slack} >= 0")
        self.max_entries = max_entries
        self.max_holders = max_holders
        self.abs_slack = abs_slack
        self.rel_slack = rel_slack
        self.min_match_blocks = min_match_blocks
        # (served, block hash) -> holders, the most recent first; a holder is the
        # backend's current (url, epoch) tuple, one object shared by all its entries
        self._entries: OrderedDict[tuple[str, int], tuple[_Holder, ...]] = OrderedDict()
        self._current: dict[str, _Holder] = {}
        self._turn = 0

    def __len__(self) -> int:
        """Block hashes remembered (never more than ``max_entries``)."""
        return len(self._entries)

    def match(self, served: str, key: RoutingKey) -> dict[str, int]:
        """Backend URL -> how many leading blocks of ``key`` it served for ``served``.

        Every block is looked up (no early stop), because a hash is cumulative: holding
        block ``i`` means holding the prefix up to it even if an earlier entry was dropped.
        """
        depth: dict[str, int] = {}
        current = self._current
        for i, h in enumerate(key.blocks):
            for holder in self._entries.get((served, h), ()):
                if current.get(holder[0]) is holder:
                    depth[holder[0]] = i + 1
        return depth

    def choose(self, served: str, candidates: Sequence[str], key: RoutingKey | None,
               loads: Mapping[str, int]) -> str | None:
        """The backend for a request (the rule is in the class docstring).

        Args:
            served: the served model name.
            candidates: backend URLs that may take the request, in pool order.
            key: the request's :func:`routing_key`; None routes by load alone.
            loads: backend URL -> requests in flight (missing counts as 0).

        Returns:
            One of ``candidates``, or None when there are none.
        """
        if not candidates:
            return None
        load = {c: loads.get(c, 0) for c in candidates}
        least = min(load.values())
        depth = self.match(served, key) if key is not None else {}
        limit = least + max(self.abs_slack, self.rel_slack * least)
        eligible = [c for c in candidates if load[c] <= limit]
        best = max((depth.get(c, 0) for c in eligible), default=0)
        pool = [c for c in eligible if depth.get(c, 0) == best] \
            if best >= self.min_match_blocks else list(candidates)
        low = min(load[c] for c in pool)
        tied = [c for c in pool if load[c] == low]
        if len(tied) == 1:
            return tied[0]
        self._turn += 1
        return tied[(self._turn - 1) % len(tied)]

    def record(self, served: str, key: RoutingKey, backend: str) -> None:
        """``backend`` was sent the request with ``key``: it now holds those blocks.

        Deepest block first, so that a prefix's first blocks are the most recent entries
        and the last to be dropped (vLLM, too, evicts a prefix's tail blocks first).
        """
        entries, current = self._entries, self._current
        me = current.get(backend)
        if me is None:
            me = current[backend] = (backend, 0)
        keep = self.max_holders - 1
        for h in reversed(key.blocks):
            k = (served, h)
            old = entries.pop(k, ())
            others = [x for x in old if x is not me and current.get(x[0]) is x]
            entries[k] = (me, *others[:keep])
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def forget(self, backend: str) -> None:
        """What ``backend`` served no longer counts (it went down: a restarted engine
        starts with an empty cache). O(1): a new epoch; what it serves from now on counts.
        """
        old = self._current.get(backend)
        if old is not None:
            self._current[backend] = (backend, old[1] + 1)
