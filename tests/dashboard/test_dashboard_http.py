"""The dashboard over HTTP: sign-in, the session cookie, CSRF, revoke, the numbers."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from teamgpu.dashboard import routes as dashboard_routes
from teamgpu.dashboard.routes import COOKIE, session_store
from tests.support.fake_backend import MODEL, ServerThread
from tests.support.harness import Harness, assert_openai_error

from .conftest import browser, dashboard_gateway, sign_in

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
STATIC = Path(dashboard_routes.__file__).parent / "static"


def set_cookie(r: object) -> str:
    headers = r.headers.get_list("set-cookie")  # type: ignore[attr-defined]
    [cookie] = [h for h in headers if h.startswith(COOKIE + "=")]
    return cookie  # type: ignore[no-any-return]


def test_without_a_session_the_page_sends_you_to_sign_in(dash: Harness) -> None:
    c = browser(dash)
    r = c.get("/dashboard")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
    form = c.get("/dashboard/login")
    assert form.status_code == 200 and 'name="key"' in form.text
    assert "default-src 'none'" in form.headers["content-security-policy"]
    assert_openai_error(c.get("/dashboard/api/stats"), 401, code="session_required")
    assert_openai_error(c.get("/dashboard/api/keys"), 401)


def test_sign_in_needs_a_valid_admin_key(dash: Harness) -> None:
    c = browser(dash)
    r = c.post("/dashboard/login", data={"key": "tg-not-a-key"})
    assert r.status_code == 401 and "not valid" in r.text and COOKIE not in r.headers.get(
        "set-cookie", "")
    r = c.post("/dashboard/login", data={"key": dash.user_key})
    assert r.status_code == 403 and "not an admin key" in r.text
    r = c.post("/dashboard/login", data={"key": ""})
    assert r.status_code == 401
    r = c.post("/dashboard/login", json={"key": dash.admin_key})
    assert r.status_code == 415


def test_the_session_cookie_is_httponly_samesite_strict_and_holds_no_key(dash: Harness) -> None:
    r = browser(dash).post("/dashboard/login", data={"key": dash.admin_key})
    assert r.status_code == 303
    cookie = set_cookie(r)
    attrs = [a.strip().lower() for a in cookie.split(";")]
    assert "httponly" in attrs and "samesite=strict" in attrs and "path=/dashboard" in attrs
    assert "max-age=43200" in attrs
    assert "secure" not in attrs  # plain http on loopback
    assert dash.admin_key not in cookie
    sid = cookie.split(";")[0].split("=", 1)[1]
    assert len(sid) >= 43


def test_the_cookie_is_secure_behind_tls(dash: Harness) -> None:
    r = browser(dash).post("/dashboard/login", data={"key": dash.admin_key},
                           headers={"X-Forwarded-Proto": "https"})
    assert "secure" in [a.strip().lower() for a in set_cookie(r).split(";")]


def test_the_page_and_its_assets_are_served_by_the_gateway(dash: Harness) -> None:
    c, _csrf = sign_in(dash)
    page = c.get("/dashboard")
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    srcs = re.findall(r'(?:src|href)="(/[^"]+)"', page.text)
    assert {s.split("?")[0] for s in srcs} >= {"/dashboard/static/chart.umd.min.js",
                                               "/dashboard/static/dashboard.js",
                                               "/dashboard/static/dashboard.css"}
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page.text)  # nothing external
    for s in srcs:
        assert c.get(s).status_code == 200, s
    assert "<script>" not in page.text and "style=" not in page.text  # CSP-clean


def test_vendored_chart_js_is_the_npm_file_with_its_licence() -> None:
    data = (STATIC / "chart.umd.min.js").read_bytes()
    assert hashlib.sha256(data).hexdigest() == (
        "87364cc2b2a76a6684929e7d6b80b18a897794db38400caff1fcf1791c6925d2")
    assert data.startswith(b"/*!\n * Chart.js v4.6.1")
    assert "MIT License" in (STATIC / "chart.js.LICENSE.md").read_text()


def test_api_stats_is_the_stats_snapshot(dash: Harness) -> None:
    dash.client("user").post("/v1/chat/completions", json=CHAT)
    c, _ = sign_in(dash)
    mine = c.get("/dashboard/api/stats").json()
    theirs = dash.client("admin").get("/stats").json()
    assert mine.pop("session")["user"] == "root"
    for volatile in ("generated_at", "uptime_s"):
        mine.pop(volatile)
        theirs.pop(volatile)
    assert mine == theirs
    assert mine["users_today"]["alice"]["requests"] == 1


def test_keys_are_listed_without_secrets(dash: Harness) -> None:
    c, _ = sign_in(dash)
    keys = c.get("/dashboard/api/keys").json()["keys"]
    assert {k["user"] for k in keys} == {"root", "alice"}
    assert all(k["status"] == "active" and k["prefix"].startswith("tg-") for k in keys)
    body = c.get("/dashboard/api/keys").text
    assert dash.admin_key not in body and dash.user_key not in body
    assert "key_hash" not in body


def test_keys_show_their_models(dash: Harness) -> None:
    """``keys --models``: the list of a limited key, None (every model) for the others;
    the page has the column."""
    dash.gw.keys.create("lim", models=[MODEL, "coder"])
    c, _ = sign_in(dash)
    keys = {k["user"]: k for k in c.get("/dashboard/api/keys").json()["keys"]}
    assert keys["lim"]["models"] == [MODEL, "coder"]
    assert keys["alice"]["models"] is None and keys["root"]["models"] is None
    assert "<th>models</th>" in c.get("/dashboard").text
    assert 'k.models ? k.models.join(", ") : "all"' in (STATIC / "dashboard.js").read_text()


def test_revoke_needs_the_csrf_token(dash: Harness) -> None:
    c, _csrf = sign_in(dash)
    alice = next(k for k in c.get("/dashboard/api/keys").json()["keys"] if k["user"] == "alice")
    url = f"/dashboard/api/keys/{alice['id']}/revoke"
    assert_openai_error(c.post(url), 403, code="csrf_failed")
    assert_openai_error(c.post(url, headers={"X-CSRF-Token": "x" * 43}), 403)
    _other, other_csrf = sign_in(dash)
    assert_openai_error(c.post(url, headers={"X-CSRF-Token": other_csrf}), 403)
    assert dash.client("user").get("/v1/models").status_code == 200  # still works


def test_revoking_a_key_rejects_it_at_once(dash: Harness) -> None:
    c, csrf = sign_in(dash)
    assert dash.client("user").get("/v1/models").status_code == 200
    alice = next(k for k in c.get("/dashboard/api/keys").json()["keys"] if k["user"] == "alice")
    r = c.post(f"/dashboard/api/keys/{alice['id']}/revoke", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["revoked"]["status"] == "revoked"
    assert_openai_error(dash.client("user").get("/v1/models"), 401)
    again = c.post(f"/dashboard/api/keys/{alice['id']}/revoke", headers={"X-CSRF-Token": csrf})
    assert_openai_error(again, 409, code="key_not_active")
    missing = c.post("/dashboard/api/keys/key_000000000000/revoke",
                     headers={"X-CSRF-Token": csrf})
    assert_openai_error(missing, 404, code="key_not_found")


def test_revoke_refuses_an_id_that_is_also_a_user_name(dash: Harness) -> None:
    c, csrf = sign_in(dash)
    _, victim = dash.gw.keys.create("someone")
    dash.gw.keys.create(victim.key_id)  # a user named like the key id
    r = c.post(f"/dashboard/api/keys/{victim.key_id}/revoke", headers={"X-CSRF-Token": csrf})
    assert_openai_error(r, 409)
    assert all(k.status(k.created_at) == "active" for k in dash.gw.keys.list())


def test_a_revoked_or_demoted_admin_key_ends_its_sessions(dash: Harness) -> None:
    second_admin, p = dash.gw.keys.create("ops", admin=True)
    c, _ = sign_in(dash, second_admin)
    assert c.get("/dashboard/api/stats").status_code == 200
    dash.gw.keys.revoke(p.key_id)  # e.g. with `teamgpu keys revoke` while signed in
    assert_openai_error(c.get("/dashboard/api/stats"), 401)
    assert c.get("/dashboard").status_code == 303


def test_revoking_your_own_key_signs_you_out(dash: Harness) -> None:
    c, csrf = sign_in(dash)
    me = c.get("/dashboard/api/stats").json()["session"]["key_id"]
    assert c.post(f"/dashboard/api/keys/{me}/revoke",
                  headers={"X-CSRF-Token": csrf}).status_code == 200
    assert_openai_error(c.get("/dashboard/api/stats"), 401)


def test_sign_out_needs_the_csrf_token_and_ends_the_session(dash: Harness) -> None:
    c, csrf = sign_in(dash)
    r = c.post("/dashboard/logout", data={"csrf": "wrong"})
    assert r.status_code == 403
    assert c.get("/dashboard/api/stats").status_code == 200
    r = c.post("/dashboard/logout", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
    assert 'max-age=0' in set_cookie(r).lower() or "expires=" in set_cookie(r).lower()
    assert c.get("/dashboard/api/stats").status_code == 401


def test_sessions_expire_after_twelve_hours(dash: Harness) -> None:
    c, _ = sign_in(dash)

    class Req:
        app = dash.app

    store = session_store(Req())  # type: ignore[arg-type]
    [s] = list(store._sessions.values())
    assert s.expires_at - time.monotonic() > 12 * 3600 - 60
    store._sessions[s.sid] = type(s)(s.sid, s.key_id, s.user, s.csrf, time.monotonic() - 1)
    assert c.get("/dashboard/api/stats").status_code == 401


def test_dashboard_works_with_metrics_behind_a_key(fake_server: ServerThread,
                                                   tmp_path: Path) -> None:
    with dashboard_gateway(tmp_path, [fake_server.url], metrics_require_key=True) as h:
        c, _ = sign_in(h)
        assert c.get("/dashboard/api/stats").status_code == 200


def test_guessing_keys_on_the_sign_in_form_is_throttled(fake_server: ServerThread,
                                                        tmp_path: Path) -> None:
    """The sign-in form is an authentication path like the API: failures count against
    the address in the same per-address throttle (row of issue 4), and other addresses
    keep signing in."""
    with dashboard_gateway(tmp_path / "gw", [fake_server.url], trust_forwarded_for=True,
                           auth_failures_per_minute=3) as h:
        guesser = browser(h, headers={"X-Forwarded-For": "198.51.100.7"})
        for _ in range(2):
            assert guesser.post("/dashboard/login", data={"key": "tg-guess"}).status_code == 401
        # the API's failures and the form's share one budget per address
        api = browser(h, headers={"X-Forwarded-For": "198.51.100.7",
                                  "Authorization": "Bearer tg-guess"})
        assert api.post("/v1/chat/completions", json=CHAT).status_code == 401
        r = guesser.post("/dashboard/login", data={"key": h.admin_key})
        assert r.status_code == 429, r.text  # refused before the key is looked at
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert COOKIE not in r.headers.get("set-cookie", "")
        assert api.post("/v1/chat/completions", json=CHAT).status_code == 429
        # another address is not locked out, and a non-admin key is not a failed guess
        other = browser(h, headers={"X-Forwarded-For": "203.0.113.9"})
        for _ in range(4):
            assert other.post("/dashboard/login", data={"key": h.user_key}).status_code == 403
        assert other.post("/dashboard/login", data={"key": h.admin_key}).status_code == 303
