"""The prefix router and its routing key, as plain data structures (issue 12, point 5)."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from teamgpu.upstream.routing import (
    BLOCK_BYTES,
    MAX_KEY_BLOCKS,
    PrefixRouter,
    RoutingKey,
    canonical_prompt,
    routing_key,
)

A, B, C = "http://a", "http://b", "http://c"
M = "model"


def text(seed: str, n_bytes: int) -> str:
    """Distinct words for ``seed``, about ``n_bytes`` long."""
    words = []
    size = 0
    i = 0
    while size < n_bytes:
        w = f"{seed}{i}"
        words.append(w)
        size += len(w) + 1
        i += 1
    return " ".join(words)


def chat(system: str, turns: int) -> dict[str, Any]:
    """A chat body with a system prompt and ``turns`` user turns (answers in between)."""
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for t in range(turns):
        if t:
            msgs.append({"role": "assistant", "content": f"answer {t}"})
        msgs.append({"role": "user", "content": f"question {t}?"})
    return {"model": M, "messages": msgs, "max_tokens": 32}


def key(body: dict[str, Any], endpoint: str = "chat/completions") -> RoutingKey:
    k = routing_key(endpoint, body)
    assert k is not None
    return k


# --- the key -----------------------------------------------------------------------------
def test_key_blocks_are_cumulative_hashes_of_full_blocks() -> None:
    body = chat(text("s", 3 * BLOCK_BYTES), 1)
    data = canonical_prompt("chat/completions", body)
    assert data is not None
    k = key(body)
    assert len(k) == len(data) // BLOCK_BYTES >= 3
    # a block hash is the hash of everything before its end: the same bytes after a
    # different start give a different hash
    other = RoutingKey.from_bytes(b"x" + data[1:])
    assert other is not None and other.blocks[0] != k.blocks[0]
    assert not set(other.blocks) & set(k.blocks)
    assert RoutingKey.from_bytes(b"x" * (BLOCK_BYTES - 1)) is None  # no full block
    huge = RoutingKey.from_bytes(b"x" * BLOCK_BYTES * (MAX_KEY_BLOCKS + 5))
    assert huge is not None and len(huge) == MAX_KEY_BLOCKS


def test_key_is_stable_across_dict_key_order() -> None:
    body = chat(text("s", 2000), 3)
    body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string"}}}}}]
    flipped = copy.deepcopy(body)
    flipped["messages"] = [dict(reversed(list(m.items()))) for m in flipped["messages"]]
    flipped["tools"] = [{"function": {"parameters": {"properties": {"x": {"type": "string"}},
                                                     "type": "object"}, "name": "f"},
                         "type": "function"}]
    flipped = dict(reversed(list(flipped.items())))
    assert key(body) == key(flipped)


def test_the_next_turn_extends_the_key_of_the_previous_one() -> None:
    system = text("s", 2400)
    keys = [key(chat(system, t)) for t in range(1, 7)]
    for k, nxt in itertools.pairwise(keys):
        assert len(nxt) >= len(k)
        assert nxt.blocks[:len(k)] == k.blocks


def test_key_distinguishes_different_prefixes() -> None:
    one = key(chat(text("s", 2000), 1))
    other_system = key(chat(text("t", 2000), 1))
    assert one.blocks[0] != other_system.blocks[0]
    # the same system prompt in another role is another prompt
    body = chat(text("s", 2000), 1)
    body["messages"][0]["role"] = "user"
    assert key(body).blocks[0] != one.blocks[0]
    # tools and cache_salt are rendered or hashed before the first message
    for extra in ({"tools": [{"type": "function", "function": {"name": "f"}}]},
                  {"cache_salt": "team-a"}):
        assert key({**chat(text("s", 2000), 1), **extra}).blocks[0] != one.blocks[0]
    # the same text as chat or as a raw prompt
    raw = key({"prompt": text("s", 2000)}, "completions")
    assert raw.blocks[0] != one.blocks[0]
    # fields the gateway owns, or that never reach the prompt, do not change the key
    assert key({**chat(text("s", 2000), 1), "model": "other", "priority": 1, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": 0.3}) == one


def test_text_parts_and_cache_control_key_like_plain_text() -> None:
    system = text("s", 2000)
    plain = key(chat(system, 2))
    parts = chat(system, 2)
    parts["messages"][0]["content"] = [{"type": "text", "text": system}]
    assert key(parts) == plain
    # Anthropic: system as blocks with a cache_control marker that moves every turn
    blocks = {"system": [{"type": "text", "text": system,
                          "cache_control": {"type": "ephemeral"}}],
              "messages": [{"role": "user", "content": [
                  {"type": "text", "text": "question 0?",
                   "cache_control": {"type": "ephemeral"}}]}]}
    no_marker = {"system": system, "messages": [{"role": "user", "content": "question 0?"}]}
    assert key(blocks, "messages") == key(no_marker, "messages")
    assert key(no_marker, "/v1/messages") == key(no_marker, "messages")


def test_key_for_each_endpoint() -> None:
    long = text("p", 1000)
    s = key({"prompt": long}, "completions")
    assert key({"prompt": [long, "other"]}, "completions") == s  # a batch: its first prompt
    ids = key({"prompt": list(range(300))}, "completions")
    assert len(ids) == 300 * 4 // BLOCK_BYTES
    assert key({"prompt": [list(range(300))]}, "completions") == ids
    resp = key({"input": long, "instructions": "be brief"}, "responses")
    assert resp.blocks[0] != key({"input": long}, "responses").blocks[0]
    assert key({"input": [{"role": "user", "content": long}]}, "responses") \
        == key({"input": long}, "responses")
    # Anthropic's system prompt keys as chat's system message
    sysmsg = key({"messages": [{"role": "system", "content": long},
                               {"role": "user", "content": "hi"}]})
    assert key({"system": long, "messages": [{"role": "user", "content": "hi"}]},
               "messages") == sysmsg


@pytest.mark.parametrize(("endpoint", "body"), [
    ("embeddings", {"input": text("p", 2000)}),
    ("chat/completions", {"messages": [{"role": "user", "content": "short"}]}),
    ("chat/completions", {"messages": "not a list"}),
    ("chat/completions", {"messages": ["not an object", text("p", 2000)]}),
    ("chat/completions", {}),
    ("completions", {"prompt": [True, 2]}),
    ("completions", {"prompt": {"a": 1}}),
    ("responses", {"input": 3}),
    ("chat/completions", {"messages": [{"role": "user", "content": text("p", 2000),
                                        "x": 2**70}]}),
])
def test_nothing_to_route_by_gives_no_key(endpoint: str, body: dict[str, Any]) -> None:
    assert routing_key(endpoint, body) is None


# --- the router --------------------------------------------------------------------------
def send(r: PrefixRouter, body: dict[str, Any], loads: dict[str, int],
         candidates: tuple[str, ...] = (A, B)) -> str:
    """Choose a backend for ``body`` and record it, as the pool's caller does."""
    k = key(body)
    url = r.choose(M, list(candidates), k, loads)
    assert url is not None
    r.record(M, k, url)
    return url


def test_a_multi_turn_conversation_sticks_to_one_backend() -> None:
    r = PrefixRouter()
    system = text("s", 2400)
    first = send(r, chat(system, 1), {A: 0, B: 0})
    other = B if first == A else A
    for t in range(2, 7):
        # the other backend is idle; within the slack the conversation stays put
        assert send(r, chat(system, t), {first: 2, other: 0}) == first


def test_conversations_spread_and_each_sticks() -> None:
    r = PrefixRouter()
    systems = [text(f"c{i}", 2400) for i in range(8)]
    home = {i: send(r, chat(s, 1), {A: 0, B: 0}) for i, s in enumerate(systems)}
    assert sorted(home.values()) == [A] * 4 + [B] * 4  # ties go round-robin
    for t in range(2, 7):
        for i, s in enumerate(systems):
            assert send(r, chat(s, t), {A: 1, B: 1}) == home[i]


def test_a_shared_long_system_prompt_sticks_across_users() -> None:
    r = PrefixRouter()
    system = text("shared", 3000)
    first = send(r, {"messages": [{"role": "system", "content": system},
                                  {"role": "user", "content": "alice asks"}]}, {A: 0, B: 0})
    for user in ("bob", "carol", "dave"):
        body = {"messages": [{"role": "system", "content": system},
                             {"role": "user", "content": f"{user} asks something else"}]}
        assert send(r, body, {A: 1, B: 0} if first == A else {A: 0, B: 1}) == first


def test_a_busy_backend_is_skipped_past_the_threshold() -> None:
    r = PrefixRouter()  # at most max(2, 50 % of the least load) more in flight
    system = text("s", 2400)
    k = key(chat(system, 1))
    r.record(M, k, A)
    nxt = key(chat(system, 2))
    assert r.choose(M, [A, B], nxt, {A: 2, B: 0}) == A
    assert r.choose(M, [A, B], nxt, {A: 3, B: 0}) == B
    assert r.choose(M, [A, B], nxt, {A: 12, B: 8}) == A  # 4 more = 50 % of 8
    assert r.choose(M, [A, B], nxt, {A: 13, B: 8}) == B
    strict = PrefixRouter(abs_slack=0, rel_slack=0.0)
    strict.record(M, k, A)
    assert strict.choose(M, [A, B], nxt, {A: 1, B: 0}) == B
    assert strict.choose(M, [A, B], nxt, {A: 1, B: 1}) == A


def test_a_too_busy_holder_gives_way_to_the_next_longest() -> None:
    r = PrefixRouter()
    system = text("s", 2400)
    r.record(M, key(chat(system, 1)), B)  # B holds the system prompt and turn 1
    r.record(M, key(chat(system, 3)), A)  # A holds turns 1-3: the longest
    nxt = key(chat(system, 4))
    assert r.match(M, nxt)[A] > r.match(M, nxt)[B] >= r.min_match_blocks
    assert r.choose(M, [A, B, C], nxt, {A: 0, B: 0, C: 0}) == A
    assert r.choose(M, [A, B, C], nxt, {A: 5, B: 1, C: 0}) == B  # A too busy, B is not
    assert r.choose(M, [A, B, C], nxt, {A: 5, B: 5, C: 0}) == C  # both too busy


def test_no_match_goes_least_loaded_with_round_robin_ties() -> None:
    r = PrefixRouter()
    fresh = key(chat(text("new", 2400), 1))
    assert r.choose(M, [A, B, C], fresh, {A: 2, B: 1, C: 3}) == B
    assert r.choose(M, [A, B, C], None, {A: 2, B: 1, C: 3}) == B
    assert [r.choose(M, [A, B, C], fresh, {A: 1, B: 0, C: 0}) for _ in range(4)] \
        == [B, C, B, C]
    assert r.choose(M, [A, B], fresh, {}) in (A, B)  # unknown loads count as 0
    assert r.choose(M, [], fresh, {}) is None


def test_a_short_match_counts_as_none() -> None:
    r = PrefixRouter(min_match_blocks=2)
    one_block = RoutingKey((11,))
    r.record(M, one_block, A)
    assert r.match(M, RoutingKey((11, 12))) == {A: 1}
    assert r.choose(M, [A, B], RoutingKey((11, 12)), {A: 1, B: 0}) == B
    r.record(M, RoutingKey((11, 12)), A)
    assert r.choose(M, [A, B], RoutingKey((11, 12, 13)), {A: 1, B: 0}) == A


def test_a_shared_prefix_served_by_both_is_balanced_by_load() -> None:
    r = PrefixRouter()
    k = RoutingKey((1, 2, 3))
    r.record(M, k, A)
    r.record(M, k, B)
    assert r.match(M, k) == {A: 3, B: 3}
    assert r.choose(M, [A, B], k, {A: 2, B: 1}) == B
    assert r.choose(M, [A, B], k, {A: 0, B: 1}) == A


def test_holders_per_block_are_capped_most_recent_first() -> None:
    r = PrefixRouter(max_holders=2)
    k = RoutingKey((1, 2))
    for url in (A, B, C):
        r.record(M, k, url)
    assert r.match(M, k) == {C: 2, B: 2}


def test_models_do_not_share_entries() -> None:
    r = PrefixRouter()
    k = RoutingKey((1, 2, 3))
    r.record("m1", k, A)
    assert r.match("m2", k) == {}
    assert r.choose("m2", [A, B], k, {A: 1, B: 0}) == B


def test_the_lru_cap_holds_memory() -> None:
    r = PrefixRouter(max_entries=10)
    r.record(M, RoutingKey(tuple(range(8))), A)
    assert len(r) == 8
    r.record(M, RoutingKey(tuple(range(100, 108))), B)
    assert len(r) == 10
    # the older prompt lost its deepest blocks first; its first ones stay
    assert r.match(M, RoutingKey(tuple(range(8)))) == {A: 2}
    for i in range(1000):
        r.record(M, RoutingKey((i, i + 1, i + 2)), A)
        assert len(r) <= 10
    with pytest.raises(ValueError, match="max_entries=0"):
        PrefixRouter(max_entries=0)


def test_a_match_survives_a_dropped_earlier_block() -> None:
    r = PrefixRouter()
    r.record(M, RoutingKey((1, 2, 3, 4)), A)
    r._entries.pop((M, 1))  # dropped by the cap, say: the hashes after it still count
    assert r.match(M, RoutingKey((1, 2, 3, 4, 5))) == {A: 4}


def test_forget_drops_a_backend_everywhere() -> None:
    r = PrefixRouter()
    r.record(M, RoutingKey((1, 2, 3)), A)
    r.record(M, RoutingKey((1, 2)), B)
    r.forget(A)
    assert r.match(M, RoutingKey((1, 2, 3))) == {B: 2}
    r.forget(C)  # never seen: nothing to do
    # what A serves after it came back counts again; its old entries stay forgotten
    r.record(M, RoutingKey((1, 2)), A)
    assert r.match(M, RoutingKey((1, 2, 3))) == {A: 2, B: 2}
    r.record(M, RoutingKey((1, 2, 3)), B)
    assert r._entries[(M, 1)] == ((B, 0), (A, 1))  # the stale holder was cleaned up


def test_skipped_backends_are_not_chosen_even_with_the_longest_prefix() -> None:
    """Down, draining and excluded backends are left out of the candidates by the pool
    (see test_backend_pool.py); the router never returns a non-candidate."""
    r = PrefixRouter()
    k = key(chat(text("s", 2400), 2))
    r.record(M, k, A)
    assert r.choose(M, [B, C], k, {A: 0, B: 4, C: 5}) == B
