"""BackendPool's model names and backend choice, as a plain data structure (F12)."""

from __future__ import annotations

from typing import Any

from teamgpu.upstream.backends import BackendPool


def pool(aliases: dict[str, str] | None = None) -> BackendPool:
    p = BackendPool(["http://a", "http://b"], client=None, aliases=aliases)  # type: ignore[arg-type]
    a, b = p.backends
    a.models = {"org/Big-Model": {"id": "org/Big-Model", "root": "/models/Big-Model"}}
    b.models = {"org/Big-Model": {"id": "org/Big-Model"},
                "small": {"id": "small", "root": "/srv/weights/small-v2/"}}
    a.mark(True)
    b.mark(True)
    return p


def test_resolve() -> None:
    p = pool({"big": "org/Big-Model", "ghost": "not-served"})
    assert p.resolve("org/Big-Model") == "org/Big-Model"
    assert p.resolve("big") == "org/Big-Model"  # alias
    assert p.resolve("Big-Model") == "org/Big-Model"  # last path component
    assert p.resolve("small-v2") == "small"  # last component of the model's root
    assert p.resolve("ghost") is None  # alias to a name nobody serves
    assert p.resolve("nope") is None


def test_names_for_clients_are_served_names_then_aliases() -> None:
    p = pool({"big": "org/Big-Model", "ghost": "not-served", "small": "small"})
    assert p.served_names() == ["org/Big-Model", "small"]
    assert p.names_for_clients() == ["org/Big-Model", "small", "big"]


def test_pick_prefers_the_least_loaded_up_backend() -> None:
    p = pool()
    a, b = p.backends
    a.in_flight = 3
    assert p.pick("org/Big-Model") is b
    b.mark(False, "gone")
    assert p.pick("org/Big-Model") is a
    assert p.pick("small") is None  # known, but its only backend is down
    assert p.resolve("small") == "small"  # still known: 503, not 404
    assert p.any_up()
    a.mark(False)
    assert not p.any_up()


def test_card() -> None:
    p = pool()
    card: dict[str, Any] = p.card("small")
    assert card["id"] == "small"
    assert p.card("unknown") == {"id": "unknown", "object": "model"}
