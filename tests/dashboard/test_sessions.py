"""Dashboard sessions as a plain data structure."""

from __future__ import annotations

import pytest

from teamgpu.dashboard.sessions import SessionStore


def test_a_session_lives_twelve_hours_by_default() -> None:
    st = SessionStore()
    s = st.create("key_1", "root", now=0.0)
    assert len(s.sid) >= 43 and len(s.csrf) >= 43 and s.sid != s.csrf
    assert st.get(s.sid, now=12 * 3600 - 1) == s
    assert st.get(s.sid, now=12 * 3600) is None
    assert len(st) == 0  # an expired session is removed when seen


def test_unknown_and_empty_ids() -> None:
    st = SessionStore()
    st.create("key_1", "root", now=0.0)
    assert st.get(None, 0.0) is None
    assert st.get("", 0.0) is None
    assert st.get("nope", 0.0) is None


def test_sign_out_and_ending_every_session_of_a_key() -> None:
    st = SessionStore()
    a = st.create("key_1", "root", 0.0)
    b = st.create("key_1", "root", 0.0)
    c = st.create("key_2", "ops", 0.0)
    st.delete(a.sid)
    assert st.get(a.sid, 1.0) is None and st.get(b.sid, 1.0) == b
    assert st.delete_key("key_1") == 1
    assert st.get(b.sid, 1.0) is None and st.get(c.sid, 1.0) == c


def test_the_number_of_sessions_is_bounded() -> None:
    st = SessionStore(max_sessions=2)
    first = st.create("k", "u", 0.0)
    st.create("k", "u", 1.0)
    st.create("k", "u", 2.0)
    assert len(st) == 2 and st.get(first.sid, 3.0) is None


def test_expired_sessions_are_pruned_on_create() -> None:
    st = SessionStore(ttl_s=10)
    st.create("k", "u", 0.0)
    st.create("k", "u", 20.0)
    assert len(st) == 1


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match=r"ttl_s=0, .*must be positive"):
        SessionStore(ttl_s=0)
