// teamgpu dashboard: polls /dashboard/api/stats (the same numbers as GET /stats) and
// draws them. No framework; Chart.js (vendored next to this file) for the two charts.
// Every value from the server goes into the page through textContent, never as HTML.
"use strict";

(function () {
  const POLL_MS = 2000;
  const KEYS_MS = 15000;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const myKeyId = document.querySelector('meta[name="session-key-id"]').content;
  const COLORS = ["#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2"];
  let tokensChart = null;
  let ttftChart = null;

  const $ = (id) => document.getElementById(id);
  const int = (n) => (n == null ? "–" : Number(n).toLocaleString("en-US"));
  const ms = (s) => (s == null ? "–" : Math.round(s * 1000).toLocaleString("en-US") + " ms");
  const secs = (s) => (s == null ? "–" : s < 1 ? ms(s) : s.toFixed(1) + " s");
  const gib = (b) => (b == null ? "–" : (b / 1024 ** 3).toFixed(1) + " GiB");
  // a span of seconds as "45 s", "12 min 05 s", "3 h 07 min"
  const span = (s) => {
    if (s == null) return "–";
    const t = Math.round(s);
    const two = (n) => String(n).padStart(2, "0");
    if (t < 60) return t + " s";
    if (t < 3600) return Math.floor(t / 60) + " min " + two(t % 60) + " s";
    return Math.floor(t / 3600) + " h " + two(Math.floor((t % 3600) / 60)) + " min";
  };
  // badge colour of a model's state and of a batch job's status
  const MODEL_BADGE = { ready: "ok", starting: "warn", restarting: "warn", sleeping: "idle",
    stopped: "idle", failed: "bad", down: "bad" };
  const JOB_BADGE = { in_progress: "ok", validating: "idle", finalizing: "idle",
    cancelling: "warn", completed: "done", cancelled: "done", failed: "bad", expired: "bad" };

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text != null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function row(cells, attrs) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      if (c instanceof Node) {
        const td = document.createElement("td");
        td.appendChild(c);
        tr.appendChild(td);
      } else {
        tr.appendChild(el("td", c[0], c[1]));
      }
    }
    for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
    return tr;
  }

  function setText(id, text) {
    $(id).textContent = text;
  }

  function status(ok, text) {
    const p = $("poll-status");
    p.textContent = text;
    p.className = "pill " + (ok ? "ok" : "bad");
  }

  // ------------------------------------------------------------------ stats

  function render(s) {
    setText("queue-high", int(s.queue.high));
    setText("queue-normal", int(s.queue.normal));
    setText("queue-low", int(s.queue.low));
    const oldest = Math.max(...Object.values(s.queue.oldest_wait_s));
    setText("queue-oldest", s.queue.total ? secs(oldest) : "–");
    setText("inflight-total", int(s.in_flight.total));
    setText("inflight-capacity", s.in_flight.capacity == null ? "–" : int(s.in_flight.capacity));
    setText("requests-today", int(s.today.requests));
    setText("tokens-today", int(s.today.total_tokens));
    setText("errors-today", int(s.today.errors));
    setText("ttft-p50", ms(s.ttft.p50_s));
    setText("ttft-p95", ms(s.ttft.p95_s));
    setText("ttft-count", int(s.ttft.count));
    renderUsers(s.users_today);
    renderGpus(s.gpu);
    renderBackends(s.backends);
    renderModels(s.models || []);
    renderBatches(s.batches || []);
    renderTokensChart(s.users_today);
    renderTtftChart(s.ttft.per_minute);
  }

  function renderUsers(users) {
    const body = $("users").tBodies[0];
    body.replaceChildren();
    const names = Object.keys(users);
    if (!names.length) {
      body.appendChild(row([["no requests yet today", "muted"]]));
      return;
    }
    for (const name of names) {
      const u = users[name];
      body.appendChild(row([
        [name, "user"],
        [int(u.requests), "num requests"],
        [int(u.prompt_tokens), "num prompt"],
        [int(u.completion_tokens), "num completion"],
        [int(u.total_tokens), "num total"],
        [int(u.errors), "num errors"],
      ], { "data-user": name }));
    }
  }

  function bar(percent) {
    const outer = el("div", null, "bar");
    const inner = el("div", null, "fill");
    inner.style.width = Math.max(0, Math.min(100, percent || 0)).toFixed(1) + "%";
    outer.appendChild(inner);
    return outer;
  }

  function renderGpus(gpus) {
    const box = $("gpus");
    box.replaceChildren();
    if (!gpus.length) {
      box.appendChild(el("p", "No GPU found (no NVIDIA driver or NVML on this host).",
        "muted no-gpu"));
      return;
    }
    for (const g of gpus) {
      const card = el("div", null, "gpu");
      card.setAttribute("data-gpu", g.index);
      card.appendChild(el("h3", `GPU ${g.index} · ${g.name}`));
      const memPct = g.memory_total_bytes ? (100 * g.memory_used_bytes) / g.memory_total_bytes : 0;
      card.appendChild(el("div", `utilisation ${g.utilization_percent == null ? "–" :
        g.utilization_percent.toFixed(0) + " %"}`, "small util"));
      card.appendChild(bar(g.utilization_percent));
      card.appendChild(el("div", `memory ${gib(g.memory_used_bytes)} of ${gib(g.memory_total_bytes)}`,
        "small mem"));
      card.appendChild(bar(memPct));
      const t = g.temperature_c == null ? "–" : g.temperature_c.toFixed(0) + " °C";
      const p = g.power_w == null ? "–" : g.power_w.toFixed(0) + " W";
      card.appendChild(el("div", `${t} · ${p}`, "small muted"));
      box.appendChild(card);
    }
  }

  function renderBackends(backends) {
    const body = $("backends").tBodies[0];
    body.replaceChildren();
    for (const b of backends) {
      const state = el("span", b.up ? "up" : "down", "pill " + (b.up ? "ok" : "bad"));
      if (b.error) state.title = b.error;
      body.appendChild(row([
        [b.url, "mono"], state, [int(b.in_flight), "num"], [b.models.join(", ") || "–", ""],
      ], { "data-backend": b.url }));
    }
  }

  function badge(text, colours) {
    return el("span", text, "pill " + (colours[text] || ""));
  }

  function cell(child, cls) {
    const td = document.createElement("td");
    td.appendChild(child);
    if (cls) td.className = cls;
    return td;
  }

  function renderModels(models) {
    const body = $("models").tBodies[0];
    body.replaceChildren();
    for (const m of models) {
      let starts = "–";  // not a model that starts on demand
      if (m.starts) {
        starts = `${int(m.starts.count)} · last wait ${secs(m.starts.last_wait_s)}`;
        if (m.starts.waiting) starts += ` · ${int(m.starts.waiting)} waiting`;
      }
      const tr = row([
        [m.name, "name mono"], [m.roles.join(", ") || "–", "roles"],
      ], { "data-model": m.name, "data-state": m.state });
      tr.appendChild(cell(badge(m.state, MODEL_BADGE), "state"));
      for (const [text, cls] of [
        [m.backends.join(", ") || "–", "backends mono"], [int(m.in_flight), "num inflight"],
        [int(m.queued), "num queued"], [m.capacity == null ? "–" : int(m.capacity), "num capacity"],
        [starts, "starts small"],
      ]) tr.appendChild(el("td", text, cls));
      body.appendChild(tr);
    }
  }

  // done (green) and failed (red) as shares of the job's items
  function progress(items) {
    const box = el("div", null, "");
    const outer = el("div", null, "bar progress");
    for (const [n, cls] of [[items.done, "fill done"], [items.failed, "fill failed"]]) {
      const f = el("div", null, cls);
      f.style.width = (items.total ? (100 * n) / items.total : 0).toFixed(1) + "%";
      outer.appendChild(f);
    }
    box.appendChild(outer);
    box.appendChild(el("div", `${int(items.done)} done · ${int(items.failed)} failed / ` +
      `${int(items.total)}`, "small counts"));
    return box;
  }

  function renderBatches(jobs) {
    const body = $("batches").tBodies[0];
    body.replaceChildren();
    if (!jobs.length) {
      body.appendChild(row([["no batch job running or ended in the last hour", "muted"]]));
      return;
    }
    const when = (t) => new Date(t * 1000).toLocaleString([], { month: "short", day: "numeric",
      hour: "2-digit", minute: "2-digit" });
    for (const j of jobs) {
      const tr = row([
        [j.id, "id mono"], [j.user, "user"], [j.endpoint, "endpoint mono"],
      ], { "data-batch": j.id, "data-status": j.status });
      tr.appendChild(cell(badge(j.status, JOB_BADGE), "status"));
      tr.appendChild(cell(progress(j.items), "progress"));
      for (const [text, cls] of [
        [int(j.items.in_flight), "num inflight"], [int(j.items.queued), "num queued"],
        [span(j.eta_s), "num eta"], [j.paused_until ? when(j.paused_until) : "–", "paused small"],
      ]) tr.appendChild(el("td", text, cls));
      body.appendChild(tr);
    }
  }

  function renderTokensChart(users) {
    if (typeof Chart === "undefined") return;
    const names = Object.keys(users).slice(0, 20);
    const prompt = names.map((n) => users[n].prompt_tokens);
    const completion = names.map((n) => users[n].completion_tokens);
    if (!tokensChart) {
      tokensChart = new Chart($("tokens-chart"), {
        type: "bar",
        data: { labels: names, datasets: [
          { label: "prompt", data: prompt, backgroundColor: COLORS[0] },
          { label: "completion", data: completion, backgroundColor: COLORS[1] },
        ] },
        options: {
          indexAxis: "y", animation: false, maintainAspectRatio: false,
          scales: { x: { stacked: true, beginAtZero: true }, y: { stacked: true } },
        },
      });
      return;
    }
    tokensChart.data.labels = names;
    tokensChart.data.datasets[0].data = prompt;
    tokensChart.data.datasets[1].data = completion;
    tokensChart.update("none");
  }

  function renderTtftChart(points) {
    if (typeof Chart === "undefined") return;
    const labels = points.map((p) => new Date(p.t * 1000).toLocaleTimeString([],
      { hour: "2-digit", minute: "2-digit" }));
    const toMs = (v) => (v == null ? null : Math.round(v * 1000));
    const p50 = points.map((p) => toMs(p.p50_s));
    const p95 = points.map((p) => toMs(p.p95_s));
    if (!ttftChart) {
      ttftChart = new Chart($("ttft-chart"), {
        type: "line",
        data: { labels, datasets: [
          { label: "p50", data: p50, borderColor: COLORS[0], backgroundColor: COLORS[0],
            pointRadius: 2, spanGaps: false },
          { label: "p95", data: p95, borderColor: COLORS[2], backgroundColor: COLORS[2],
            pointRadius: 2, spanGaps: false },
        ] },
        options: {
          animation: false, maintainAspectRatio: false,
          scales: { y: { beginAtZero: true, title: { display: true, text: "ms" } },
            x: { ticks: { maxTicksLimit: 12 } } },
        },
      });
      return;
    }
    ttftChart.data.labels = labels;
    ttftChart.data.datasets[0].data = p50;
    ttftChart.data.datasets[1].data = p95;
    ttftChart.update("none");
  }

  async function poll() {
    try {
      const r = await fetch("/dashboard/api/stats", { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) {
        window.location.assign("/dashboard/login?expired=1");
        return;
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      render(await r.json());
      status(true, "live · " + new Date().toLocaleTimeString());
    } catch (e) {
      status(false, "cannot reach the gateway (" + e.message + ")");
    }
    setTimeout(poll, POLL_MS);
  }

  // ------------------------------------------------------------------ keys

  async function loadKeys() {
    try {
      const r = await fetch("/dashboard/api/keys", { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) {
        window.location.assign("/dashboard/login?expired=1");
        return;
      }
      if (r.ok) renderKeys((await r.json()).keys);
    } catch (e) {
      /* the stats poll reports connection problems */
    }
  }

  function revokeButton(k) {
    const b = el("button", "Revoke", "danger revoke");
    let armed = null;
    b.addEventListener("click", async () => {
      if (!armed) {
        b.textContent = k.id === myKeyId ? "Revoke your own key?" : "Confirm revoke";
        b.classList.add("armed");
        armed = setTimeout(() => {
          armed = null;
          b.textContent = "Revoke";
          b.classList.remove("armed");
        }, 5000);
        return;
      }
      clearTimeout(armed);
      b.disabled = true;
      const r = await fetch(`/dashboard/api/keys/${encodeURIComponent(k.id)}/revoke`, {
        method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
      });
      const notice = $("keys-notice");
      if (r.ok) {
        notice.textContent = `Revoked ${k.id} (${k.user}).`;
        notice.className = "notice ok";
      } else {
        let msg = "HTTP " + r.status;
        try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
        notice.textContent = `Could not revoke ${k.id}: ${msg}`;
        notice.className = "notice bad";
      }
      await loadKeys();
    });
    return b;
  }

  function renderKeys(keys) {
    const body = $("keys").tBodies[0];
    body.replaceChildren();
    const day = (iso) => (iso ? iso.slice(0, 16).replace("T", " ") : "never");
    for (const k of keys) {
      const action = k.status === "active" ? revokeButton(k) : el("span", "", "");
      body.appendChild(row([
        [k.id, "mono"], [k.user, ""], [k.prefix + "…", "mono"],
        [k.is_admin ? "admin" : "user", ""], [k.status, "status " + k.status],
        [k.models ? k.models.join(", ") : "all", "models"],
        [`${k.default_priority} ≤ ${k.max_priority}`, ""], [day(k.created_at), "small"],
        [day(k.expires_at), "small"], action,
      ], { "data-key-id": k.id, "data-status": k.status }));
    }
  }

  function start() {
    poll();
    loadKeys();
    setInterval(loadKeys, KEYS_MS);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
