"""``teamgpu top``: a live terminal view of a running gateway, like ``htop``.

Polls ``GET /stats`` over HTTP with an admin key and redraws: queue by class, in-flight,
time to first token, today's top users, the models (state, in flight, queued, on-demand
starts), the batch jobs (progress, ETA), GPU and backends. ``--once`` prints one frame
and exits (for scripts and tests).

Exit status: 0, or 1 when the gateway cannot be reached or refuses the key (with
``--once``, or on the first poll of the live view).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import click
import httpx
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from teamgpu.cli.common import gateway_or_recorded
from teamgpu.scheduler.priority import PriorityClass

__all__ = ["StatsError", "fetch_stats", "render_stats", "top"]

TOP_USERS = 10
BAR_CELLS = 10  # width of a batch job's progress bar
#: colour of a model's state and of a batch job's status (others: no colour)
STATE_STYLE = {"ready": "green", "starting": "yellow", "restarting": "yellow",
               "sleeping": "blue", "stopped": "blue", "failed": "red", "down": "red",
               "in_progress": "green", "cancelling": "yellow", "expired": "red"}


class StatsError(Exception):
    """``/stats`` could not be read (unreachable, refused key, not a teamgpu gateway)."""


def fetch_stats(client: httpx.Client, url: str, key: str) -> dict[str, Any]:
    """``GET {url}/stats`` with an admin key.

    Raises:
        StatsError: Connection failure, 401/403, another non-200 status, or a body that
            is not the stats JSON; the message says which.
    """
    try:
        r = client.get(f"{url.rstrip('/')}/stats", headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError as exc:
        raise StatsError(f"cannot reach {url}: {exc}") from exc
    if r.status_code in (401, 403):
        raise StatsError(f"{url} refused the key ({r.status_code}): {_message(r)}; "
                         "top needs an admin key")
    if r.status_code != 200:
        raise StatsError(f"{url}/stats answered {r.status_code}: {_message(r)}")
    try:
        data = r.json()
    except ValueError:
        raise StatsError(f"{url}/stats did not answer JSON; is it a teamgpu gateway?") from None
    if not isinstance(data, dict) or "queue" not in data:
        raise StatsError(f"{url}/stats lacks the queue and GPU fields; is the gateway older "
                         "than teamgpu top?")
    return data


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200]


# ---------------------------------------------------------------------- rendering


def _ms(s: float | None) -> str:
    return "–" if s is None else f"{s * 1000:,.0f} ms"


def _gib(b: int | None) -> str:
    return "–" if b is None else f"{b / 1024 ** 3:.1f} GiB"


def _duration(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}h{m:02d}m" if d else f"{h}h{m:02d}m{s:02d}s"


def _span(s: float | None) -> str:
    """Seconds as ``45s``, ``12m05s``, ``3h07m``, ``2d03h``; ``–`` for None."""
    if s is None:
        return "–"
    t = round(s)
    if t < 60:
        return f"{t}s"
    if t < 3600:
        return f"{t // 60}m{t % 60:02d}s"
    if t < 86400:
        return f"{t // 3600}h{t % 3600 // 60:02d}m"
    return f"{t // 86400}d{t % 86400 // 3600:02d}h"


def _models_table(models: list[dict[str, Any]], wide: bool) -> Table:
    """Each served model: state, in flight, queued, capacity, on-demand starts (and its
    roles on a wide terminal)."""
    t = Table(title="models", title_justify="left", expand=True)
    t.add_column("model", overflow="ellipsis", no_wrap=True, ratio=2)
    if wide:
        t.add_column("roles", overflow="ellipsis", no_wrap=True, ratio=2)
    t.add_column("state", no_wrap=True)
    for c in ("in flight", "queued", "capacity"):
        t.add_column(c, justify="right", no_wrap=True)
    t.add_column("starts (last wait)", overflow="ellipsis", no_wrap=True)
    for m in models:
        st = m.get("starts")
        starts = "–" if not st else (
            f"{st['count']:,}" + ("" if st.get("last_wait_s") is None
                                  else f" ({st['last_wait_s']:.1f} s)")
            + (f", {st['waiting']:,} waiting" if st.get("waiting") else ""))
        cap = m.get("capacity")
        row: list[RenderableType] = [m["name"]]
        if wide:
            row.append(", ".join(m.get("roles", [])) or "–")
        row += [Text(m["state"], style=STATE_STYLE.get(m["state"], "")), f"{m['in_flight']:,}",
                f"{m['queued']:,}", "–" if cap is None else f"{cap:,}", starts]
        t.add_row(*row)
    return t


def _progress(items: dict[str, int]) -> Text:
    """A bar (done green, failed red), and under it ``done/total`` and the failed ones."""
    total = max(1, items["total"])
    done = round(BAR_CELLS * items["done"] / total)
    failed = min(BAR_CELLS - done, round(BAR_CELLS * items["failed"] / total))
    bar = Text.assemble(("█" * done, "green"), ("█" * failed, "red"),
                        ("░" * (BAR_CELLS - done - failed), "dim"))
    bar.append(f"\n{items['done']:,}/{items['total']:,} done")
    if items["failed"]:
        bar.append(f", {items['failed']:,} failed", style="red")
    return bar


def _batches_table(jobs: list[dict[str, Any]], wide: bool) -> Table:
    """Each batch job: user, status (or when its pause ends), progress, in flight, queued,
    ETA (a paused job's counts the pause, as ``/stats`` reports it). Below 100 columns the
    user goes under the job's id, which is cut short."""
    t = Table(title="batch jobs", title_justify="left", expand=True)
    t.add_column("job" if wide else "job, user", overflow="ellipsis", no_wrap=True,
                 max_width=None if wide else 16)
    if wide:
        t.add_column("user", overflow="ellipsis", no_wrap=True, max_width=12)
    t.add_column("status", min_width=11)
    t.add_column("progress", min_width=BAR_CELLS)
    for c in ("in flight", "queued", "ETA"):
        t.add_column(c, justify="right", no_wrap=True)
    for j in jobs:
        items = j["items"]
        paused = j.get("paused_until")
        if paused:
            status = Text(f"paused to {datetime.fromtimestamp(paused, UTC):%H:%M} UTC",
                          style="yellow")
        else:
            status = Text(j["status"], style=STATE_STYLE.get(j["status"], ""))
        who: list[RenderableType] = [j["id"], j["user"]] if wide else [
            Text.assemble(j["id"], "\n", (j["user"], "dim"))]
        t.add_row(*who, status, _progress(items), f"{items['in_flight']:,}",
                  f"{items['queued']:,}", _span(j.get("eta_s")))
    return t


def render_stats(data: dict[str, Any], url: str = "", width: int | None = None) -> RenderableType:
    """One frame of ``teamgpu top`` from a ``/stats`` snapshot; ``width`` (columns of the
    terminal) below 100 puts the four tiles in two rows of two and leaves the models'
    roles out. The models and batch jobs are left out for a gateway whose ``/stats`` has
    no ``models`` and ``batches``."""
    q = data["queue"]
    inflight = data["in_flight"]
    ttft = data["ttft"]
    today = data["today"]
    header = Text.assemble(
        ("teamgpu top", "bold"), f"  {url}  ",
        (f"up {_duration(data.get('uptime_s', 0))}", "dim"),
        (f"  at {data.get('generated_at', '')[:19].replace('T', ' ')} UTC", "dim"),
    )

    queue = Table.grid(padding=(0, 2))
    for cls in PriorityClass.labels():
        queue.add_row(cls, Text(f"{q[cls]:,}", style="bold" if q[cls] else ""))
    oldest = max(q.get("oldest_wait_s", {}).values(), default=0.0)
    queue.add_row("oldest", f"{oldest:.1f} s" if q["total"] else "–")

    flight = Table.grid(padding=(0, 2))
    cap = inflight.get("capacity")
    flight.add_row("total", f"{inflight['total']:,}" + (f" / {cap:,}" if cap else ""))
    for backend, n in inflight.get("by_backend", {}).items():
        flight.add_row(backend, f"{n:,}")

    latency = Table.grid(padding=(0, 2))
    latency.add_row("p50", _ms(ttft["p50_s"]))
    latency.add_row("p95", _ms(ttft["p95_s"]))
    latency.add_row("requests", f"{ttft['count']:,}")

    day = Table.grid(padding=(0, 2))
    day.add_row("requests", f"{today['requests']:,}")
    day.add_row("tokens", f"{today['total_tokens']:,}")
    day.add_row("errors", f"{today['errors']:,}")

    panels = [
        Panel(queue, title="queue"), Panel(flight, title="in flight"),
        Panel(latency, title=f"TTFT {int(ttft['window_s'] // 60)} min"),
        Panel(day, title=f"today {today['date']}"),
    ]
    per_row = 2 if width is not None and width < 100 else 4
    tiles = Table.grid(padding=(0, 1), expand=True)
    for _ in range(per_row):
        tiles.add_column(ratio=1)
    for i in range(0, len(panels), per_row):
        tiles.add_row(*panels[i:i + per_row])

    users = Table(title="top users today", title_justify="left", expand=True)
    users.add_column("user")
    for c in ("requests", "prompt", "completion", "total tokens", "errors"):
        users.add_column(c, justify="right")
    for name, u in list(data.get("users_today", {}).items())[:TOP_USERS]:
        users.add_row(name, f"{u['requests']:,}", f"{u['prompt_tokens']:,}",
                      f"{u['completion_tokens']:,}", f"{u['total_tokens']:,}",
                      f"{u['errors']:,}")

    parts: list[RenderableType] = [header, tiles, users]
    if data.get("models"):
        parts.append(_models_table(data["models"], wide=per_row == 4))
    if "batches" in data:
        if data["batches"]:
            parts.append(_batches_table(data["batches"], wide=per_row == 4))
        else:
            parts.append(Text("batch jobs: none running or ended in the last hour",
                              style="dim"))
    gpus = data.get("gpu", [])
    if gpus:
        g_table = Table(title="GPU", title_justify="left", expand=True)
        for c in ("gpu", "name", "util", "memory", "temp", "power"):
            g_table.add_column(c, justify="left" if c == "name" else "right")
        for g in gpus:
            util = g.get("utilization_percent")
            temp = g.get("temperature_c")
            power = g.get("power_w")
            g_table.add_row(
                str(g["index"]), g["name"], "–" if util is None else f"{util:.0f} %",
                f"{_gib(g.get('memory_used_bytes'))} / {_gib(g.get('memory_total_bytes'))}",
                "–" if temp is None else f"{temp:.0f} °C",
                "–" if power is None else f"{power:.0f} W")
        parts.append(g_table)
    else:
        parts.append(Text("GPU: none found (no NVIDIA driver or NVML on the gateway host)",
                          style="dim"))

    backends = Table(title="backends", title_justify="left", expand=True)
    for c in ("backend", "state", "in flight", "models"):
        backends.add_column(c, justify="right" if c == "in flight" else "left")
    for b in data.get("backends", []):
        backends.add_row(b["url"], Text("up", style="green") if b["up"] else
                         Text("down", style="red"), f"{b['in_flight']:,}",
                         ", ".join(b.get("models", [])))
    parts.append(backends)
    return Group(*parts)


# ---------------------------------------------------------------------- command


@click.command("top")
@click.option("--url", default=None, envvar=["TEAMGPU_URL", "OPENAI_BASE_URL"],
              help="The gateway's URL, with or without /v1 (env TEAMGPU_URL or "
                   "OPENAI_BASE_URL; default: the server running on this machine).")
@click.option("--key", required=True, envvar=["TEAMGPU_ADMIN_KEY", "OPENAI_API_KEY"],
              help="An admin key (env TEAMGPU_ADMIN_KEY or OPENAI_API_KEY).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between two polls.")
@click.option("--once", is_flag=True, help="Print one frame and exit.")
def top(url: str | None, key: str, interval: float, once: bool) -> None:
    """Live view of a running gateway: queue, in-flight, TTFT, top users, models, batch
    jobs, GPU, backends."""
    url = gateway_or_recorded(url, api=False).rstrip("/")
    url = url.removesuffix("/v1")  # /stats is at the root, as /healthz and /dashboard
    console = Console()
    with httpx.Client(timeout=max(5.0, interval * 3), trust_env=False) as client:
        try:
            data = fetch_stats(client, url, key)
        except StatsError as exc:
            raise click.ClickException(str(exc)) from None
        if once or not console.is_terminal:
            # one frame; without a terminal (a pipe, a log) a frame per poll, appended
            console.print(render_stats(data, url, console.width))
            try:
                while not once:
                    time.sleep(interval)
                    try:
                        data = fetch_stats(client, url, key)
                    except StatsError as exc:
                        console.print(Text(f"{datetime.now():%H:%M:%S}  {exc}", style="red"))
                        continue
                    console.print(render_stats(data, url, console.width))
            except KeyboardInterrupt:
                pass
            return
        with Live(render_stats(data, url, console.width), console=console, screen=True,
                  refresh_per_second=4) as live:
            try:
                while True:
                    time.sleep(interval)
                    try:
                        data = fetch_stats(client, url, key)
                    except StatsError as exc:
                        # keep showing the last good frame under the error
                        stamp = datetime.now().strftime("%H:%M:%S")
                        live.update(Group(Text(f"{stamp}  {exc}", style="red"),
                                          render_stats(data, url, console.width)))
                    else:
                        live.update(render_stats(data, url, console.width))
            except KeyboardInterrupt:
                pass
