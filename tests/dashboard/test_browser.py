"""The dashboard in headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
driven by Selenium): sign in with an admin key, see the numbers ``/stats`` reports,
revoke a key from the page and see that key rejected with 401.

Data on the page: real requests through the gateway to the fake backend (users, tokens,
errors, two streams in flight, backend health), and two real batch jobs submitted with the
``openai`` SDK: alice's, whose three slow items are in flight while the browser looks, and
erin's, paused by her key's daily token limit after three items. The models are the fake
backend's (ready) and two declared on a backend where nothing listens: ``gone`` is down;
``sleepy`` is reported sleeping, with two on-demand starts, by a stand-in for ``teamgpu
up``'s engine host (no engine runs here). Because the gateway's request path does not
feed the scheduler and the TTFT window in every build, the test also puts three requests
in a real ``Admission`` queue, seeds the last hour of TTFT samples, and gives the metrics
a stand-in GPU reading (this machine has no GPU); after the screenshot it switches the
GPU source off and checks the "no GPU" message.

Set ``TEAMGPU_UPDATE_SCREENSHOTS=1`` to write the screenshot to docs/img/dashboard.png
(otherwise it goes to the test's temporary directory).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from teamgpu.metrics import GpuSample
from teamgpu.scheduler import Admission, FairQueueConfig, PriorityClass, QueuedRequest
from tests.support.fake_backend import MODEL, ServerThread
from tests.support.harness import Harness, wait_until
from tests.support.observed import StandInHost, paused_and_running_jobs

from .conftest import dashboard_gateway

pytestmark = pytest.mark.services

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Write a docstring."}]}
GPU = GpuSample(index=0, name="NVIDIA L4 (stand-in reading)", uuid="GPU-test",
                utilization_percent=83.0, memory_used_bytes=19 * 1024**3,
                memory_total_bytes=24 * 1024**3, temperature_c=67.0, power_w=58.0)
#: roles as a model set in teamgpu.toml gives them ([[models]]; backends filled in)
MODELS = [{"name": MODEL, "roles": ["chat", "edit", "apply", "autocomplete"]},
          {"name": "sleepy", "roles": ["embed"]}]
SLEEPY_STARTS = {"count": 2, "last_wait_s": 4.2, "waiting": 0}


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("Debian's chromium and chromium-driver are needed: "
                    "apt-get install chromium chromium-driver (scripts/setup-test-services.sh)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1440,1850", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_window_size(1440, 1850)
    try:
        yield d
    finally:
        d.quit()


def seed_ttft_history(h: Harness) -> None:
    """An hour of TTFT samples (oldest first), the last five minutes included."""
    window = h.gw.metrics.ttft_window
    rng = random.Random(5)
    now = time.time()
    for minute in range(60, 0, -1):
        if minute == 5:
            continue  # samples at the 5-minute edge would leave the window mid-test
        base = 0.09 + 0.05 * (1 + (minute % 17) / 17)
        for t in sorted(now - minute * 60 + rng.uniform(0, 50) for _ in range(20)):
            window.add(base * rng.uniform(0.7, 1.5) + (0.5 if rng.random() < 0.03 else 0), t)
    for _ in range(8):  # inside the 5-minute window, away from its edge
        window.add(rng.uniform(0.08, 0.3), now - rng.uniform(5, 200))


def text_of(d: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    return str(d.find_element(By.CSS_SELECTOR, css).text)


def num(s: str) -> int:
    return int(s.replace(",", ""))


def ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{round(seconds * 1000):,} ms"


def span(s: float | None) -> str:
    """dashboard.js's ``span``."""
    if s is None:
        return "–"
    t = round(s)
    if t < 60:
        return f"{t} s"
    if t < 3600:
        return f"{t // 60} min {t % 60:02d} s"
    return f"{t // 3600} h {t % 3600 // 60:02d} min"


#: One table's rows at one moment (the page redraws them every 2 s, so elements found
#: one by one may be gone by the time they are read): per row its key attribute, each
#: cell's text by the cell's first class, the badge's class, the done bar's style.
ROWS_JS = """
const skip = ["num", "mono", "small"];
return Array.from(document.querySelectorAll(arguments[0] + " tbody tr[" + arguments[1] + "]"))
  .map((tr) => {
    const cells = {};
    for (const td of tr.cells) {
      const name = td.className.split(" ").filter((c) => c && !skip.includes(c))[0];
      cells[name] = td.innerText;
    }
    const pill = tr.querySelector(".pill");
    const counts = tr.querySelector(".counts");
    const done = tr.querySelector(".fill.done");
    return {key: tr.getAttribute(arguments[1]), cells: cells,
            pill: pill && pill.className, counts: counts && counts.innerText,
            done_style: done && done.getAttribute("style")};
  });
"""


def table_rows(d: Any, table: str, key: str) -> dict[str, dict[str, Any]]:
    rows = d.execute_script(ROWS_JS, table, key)
    return {r["key"]: r for r in rows}


def check_models(d: Any, models: list[dict[str, Any]]) -> None:
    """The Models table shows ``/stats`` ``models``, row by row."""
    rows = table_rows(d, "#models", "data-model")
    assert list(rows) == [m["name"] for m in models]
    badge = {"ready": "ok", "sleeping": "idle", "down": "bad"}
    for m in models:
        r, c = rows[m["name"]], rows[m["name"]]["cells"]
        assert c["roles"] == (", ".join(m["roles"]) or "–")
        assert c["state"] == m["state"] and r["pill"] == f"pill {badge[m['state']]}"
        assert c["backends"] == ", ".join(m["backends"])
        assert num(c["inflight"]) == m["in_flight"]
        assert num(c["queued"]) == m["queued"]
        assert c["capacity"] == "–" if m["capacity"] is None else num(c["capacity"]) == m[
            "capacity"]
        assert c["starts"] == ("–" if m["starts"] is None else
                               f"{m['starts']['count']} · last wait {m['starts']['last_wait_s']} s")


def check_batches(d: Any, jobs: list[dict[str, Any]]) -> None:
    """The Batch jobs table shows ``/stats`` ``batches``, row by row."""
    rows = table_rows(d, "#batches", "data-batch")
    assert list(rows) == [j["id"] for j in jobs]
    for j in jobs:
        r, c, it = rows[j["id"]], rows[j["id"]]["cells"], j["items"]
        assert (c["user"], c["endpoint"], c["status"]) == (j["user"], j["endpoint"], j["status"])
        assert r["counts"] == f"{it['done']} done · {it['failed']} failed / {it['total']}"
        width = float(r["done_style"].removeprefix("width: ").removesuffix("%;"))
        assert width == pytest.approx(100 * it["done"] / it["total"], abs=0.05)
        assert num(c["inflight"]) == it["in_flight"]
        assert num(c["queued"]) == it["queued"]
        assert c["eta"] == span(j["eta_s"]), (c["eta"], j["eta_s"])
        assert (c["paused"] == "–") == (j["paused_until"] is None)


def eventually(d: Any, check: Any, timeout_s: float = 10.0) -> None:
    """Run ``check(d)`` until it passes (the page polls every 2 s); its last failure
    otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check(d)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def test_sign_in_see_stats_revoke_a_key(driver: Any, fake_server: ServerThread,
                                        closed_port_url: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    gpu_samples = [GPU]
    host = StandInHost({"sleepy": "sleeping"}, {"sleepy": SLEEPY_STARTS})
    with dashboard_gateway(tmp_path / "gw", [fake_server.url], gpu=lambda: list(gpu_samples),
                           host=host, declared={closed_port_url: ["sleepy", "gone"]},
                           models=[{**MODELS[0], "backends": [fake_server.url]},
                                   {**MODELS[1], "backends": [closed_port_url]}],
                           batch_poll_interval_s=0.1) as h:
        seed_ttft_history(h)
        # two batch jobs: erin's stops after three items (her daily token limit), alice's
        # three items take a minute each, so both stand still while the browser looks
        paused, running = paused_and_running_jobs(h)
        keys = {u: h.gw.keys.create(u)[0] for u in ("bob", "carol", "dana")}
        keys["alice"] = h.user_key
        clients = {u: h.client(k) for u, k in keys.items()}
        for user, n, tokens in (("alice", 4, 40), ("bob", 2, 120), ("carol", 3, 16),
                                ("dana", 1, 8)):
            for _ in range(n):
                r = clients[user].post("/v1/chat/completions",
                                       json={**CHAT, "max_tokens": tokens,
                                             "fake": {"tokens": tokens}})
                assert r.status_code == 200
        assert clients["carol"].post("/v1/chat/completions",
                                     json={**CHAT, "fake": {"status": 400}}).status_code == 400

        # two long streams of bob's stay in flight while the browser looks
        stop = threading.Event()

        def stream() -> None:
            body = {**CHAT, "stream": True, "max_tokens": 600,
                    "fake": {"tokens": 600, "delay_s": 0.1}}
            with httpx.Client(base_url=h.url, timeout=30, trust_env=False,
                              headers={"Authorization": f"Bearer {keys['bob']}"}) as c, \
                    c.stream("POST", "/v1/chat/completions", json=body) as r:
                for _ in r.iter_bytes():
                    if stop.is_set():
                        return

        streams = [threading.Thread(target=stream, daemon=True) for _ in range(2)]
        for t in streams:
            t.start()
        wait_until(lambda: h.client("admin").get("/stats").json()["in_flight"]["total"] == 5,
                   what="two streams and three batch items in flight")

        # a scheduler beside the model's own (whose queue stays empty): both its slots
        # taken, three requests waiting
        waiting: list[asyncio.Task[Any]] = []

        async def queue_up() -> list[Any]:
            adm = Admission(FairQueueConfig(reserved_slots_high=0, reserved_slots_normal=0),
                            capacity=2)
            h.gw.admissions.admissions["queued"] = adm  # the queue tile shows its queue
            leases = [await adm.acquire(QueuedRequest(f"s{i}", "bob", PriorityClass.LOW))
                      for i in range(2)]
            for rid, user, cls in (("w1", "alice", PriorityClass.HIGH),
                                   ("w2", "bob", PriorityClass.LOW),
                                   ("w3", "bob", PriorityClass.LOW)):
                waiting.append(asyncio.ensure_future(adm.acquire(QueuedRequest(rid, user, cls))))
            await asyncio.sleep(0.01)
            return leases

        leases = h.thread.call(queue_up())
        try:
            # --- sign in -------------------------------------------------------------
            driver.get(h.url + "/dashboard")
            WebDriverWait(driver, 10).until(ec.url_contains("/dashboard/login"))
            driver.find_element(By.ID, "key").send_keys(h.admin_key)
            driver.find_element(By.ID, "sign-in").click()
            WebDriverWait(driver, 10).until(ec.url_to_be(h.url + "/dashboard"))
            cookie = driver.get_cookie("teamgpu_session")
            assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
            assert h.admin_key not in cookie["value"]
            assert driver.execute_script("return document.cookie") == ""  # HttpOnly
            WebDriverWait(driver, 10).until(
                lambda d: text_of(d, "#requests-today") not in ("–", "")
                and text_of(d, "#users tbody tr[data-user='dana'] td.total"))
            WebDriverWait(driver, 10).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#keys tbody tr[data-key-id]"))
            time.sleep(2.5)  # one more poll: charts drawn with the same numbers

            # --- the numbers /stats reports --------------------------------------------
            s = h.client("admin").get("/stats").json()
            # 11 requests, and erin's three batch items: batch items are usage too
            assert num(text_of(driver, "#requests-today")) == s["today"]["requests"] == 14
            assert num(text_of(driver, "#tokens-today")) == s["today"]["total_tokens"]
            assert num(text_of(driver, "#errors-today")) == s["today"]["errors"] == 1
            for cls, expected in (("high", 1), ("normal", 0), ("low", 2)):
                assert num(text_of(driver, f"#queue-{cls}")) == s["queue"][cls] == expected
            assert num(text_of(driver, "#inflight-total")) == s["in_flight"]["total"] == 5
            assert num(text_of(driver, "#inflight-capacity")) == s["in_flight"]["capacity"]
            assert text_of(driver, "#ttft-p50") == ms(s["ttft"]["p50_s"]) != "–"
            assert text_of(driver, "#ttft-p95") == ms(s["ttft"]["p95_s"])
            assert num(text_of(driver, "#ttft-count")) == s["ttft"]["count"]
            rows = driver.find_elements(By.CSS_SELECTOR, "#users tbody tr[data-user]")
            assert [r.get_attribute("data-user") for r in rows] == list(s["users_today"])
            for user, u in s["users_today"].items():
                sel = f"#users tbody tr[data-user='{user}']"
                for field in ("requests", "prompt", "completion", "total", "errors"):
                    key = {"prompt": "prompt_tokens", "completion": "completion_tokens",
                           "total": "total_tokens"}.get(field, field)
                    assert num(text_of(driver, f"{sel} td.{field}")) == u[key], (user, field)
            gpu_card = text_of(driver, "#gpus [data-gpu='0']")
            assert "83 %" in gpu_card and "19.0 GiB of 24.0 GiB" in gpu_card
            backend = text_of(driver, f"#backends tbody tr[data-backend='{fake_server.url}']")
            assert "up" in backend and MODEL in backend
            down = text_of(driver, f"#backends tbody tr[data-backend='{closed_port_url}']")
            assert "down" in down and "sleepy, gone" in down

            # --- models and batch jobs ------------------------------------------------
            assert [(m["name"], m["state"]) for m in s["models"]] == [
                (MODEL, "ready"), ("sleepy", "sleeping"), ("gone", "down")]
            assert s["models"][0]["in_flight"] == 5
            check_models(driver, s["models"])
            jobs = {j["id"]: j for j in s["batches"]}
            assert jobs[paused]["items"] == {"total": 8, "queued": 5, "in_flight": 0,
                                             "done": 3, "failed": 0}
            assert jobs[paused]["paused_until"] and jobs[paused]["eta_s"] is not None
            assert jobs[running]["items"] == {"total": 3, "queued": 0, "in_flight": 3,
                                              "done": 0, "failed": 0}
            # the paused job's ETA counts down with the clock: its minute may roll over
            # between the page's poll and this one, so look again (at a new /stats) until
            # they agree
            eventually(driver, lambda d: check_batches(
                d, h.client("admin").get("/stats").json()["batches"]))
            assert driver.execute_script(
                "return Chart.getChart('tokens-chart').data.labels") == list(s["users_today"])

            def ttft_chart_is_stats(d: Any) -> bool:
                per_minute = h.client("admin").get("/stats").json()["ttft"]["per_minute"]
                want = [None if p["p95_s"] is None else round(p["p95_s"] * 1000)
                        for p in per_minute]
                got = d.execute_script("return Chart.getChart('ttft-chart').data.datasets[1].data")
                return bool(got == want and len(got) == 60 and any(want))

            WebDriverWait(driver, 10).until(ttft_chart_is_stats)  # a minute may roll over

            # --- revoke carol's key from the page -------------------------------------
            carol = next(k for k in h.gw.keys.list() if k.user == "carol")
            assert clients["carol"].get("/v1/models").status_code == 200
            button = driver.find_element(
                By.CSS_SELECTOR, f"#keys tr[data-key-id='{carol.key_id}'] button.revoke")
            button.click()
            assert button.text == "Confirm revoke"
            button.click()
            WebDriverWait(driver, 10).until(lambda d: d.execute_script(
                "return document.querySelector(arguments[0]).dataset.status",
                f"#keys tr[data-key-id='{carol.key_id}']") == "revoked")
            assert "Revoked" in text_of(driver, "#keys-notice")
            r = clients["carol"].get("/v1/models")
            assert r.status_code == 401 and r.json()["error"]["message"] == "API key revoked"

            out = (REPO / "docs" / "img" if os.environ.get("TEAMGPU_UPDATE_SCREENSHOTS")
                   else tmp_path)
            out.mkdir(parents=True, exist_ok=True)
            assert driver.save_screenshot(str(out / "dashboard.png"))

            # --- no GPU: the panel says so --------------------------------------------
            gpu_samples.clear()
            WebDriverWait(driver, 10).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#gpus .no-gpu"))

            problems = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
                        and "favicon.ico" not in e["message"]]
            assert not problems, problems  # no CSP violation, no script error

            # --- sign out --------------------------------------------------------------
            driver.find_element(By.ID, "sign-out").click()
            WebDriverWait(driver, 10).until(ec.url_contains("/dashboard/login"))
            driver.get(h.url + "/dashboard")
            WebDriverWait(driver, 10).until(ec.url_contains("/dashboard/login"))
        finally:
            async def drain() -> None:
                del h.gw.admissions.admissions["queued"]
                for lease in leases:
                    lease.release()
                for task in asyncio.as_completed(waiting):
                    (await task).release()

            h.thread.call(drain())
            stop.set()
            for t in streams:
                t.join(timeout=10)
