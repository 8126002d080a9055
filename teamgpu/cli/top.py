"""``teamgpu top``: a live terminal view of a running gateway, like ``htop``.

Polls ``GET /stats`` over HTTP with an admin key and redraws: queue by class, in-flight,
time to first token, today's top users, GPU and backends. ``--once`` prints one frame
and exits (for scripts and tests).

Exit status: 0, or 1 when the gateway cannot be reached or refuses the key (with
``--once``, or on the first poll of the live view).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import click
import httpx
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from teamgpu.scheduler.priority import PriorityClass

__all__ = ["StatsError", "fetch_stats", "render_stats", "top"]

TOP_USERS = 10


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


def render_stats(data: dict[str, Any], url: str = "", width: int | None = None) -> RenderableType:
    """One frame of ``teamgpu top`` from a ``/stats`` snapshot; ``width`` (columns of the
    terminal) below 100 puts the four tiles in two rows of two."""
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
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, envvar="TEAMGPU_URL",
              help="The gateway's base URL (env TEAMGPU_URL).")
@click.option("--key", required=True, envvar="TEAMGPU_ADMIN_KEY",
              help="An admin key (env TEAMGPU_ADMIN_KEY).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between two polls.")
@click.option("--once", is_flag=True, help="Print one frame and exit.")
def top(url: str, key: str, interval: float, once: bool) -> None:
    """Live view of a running gateway: queue, in-flight, TTFT, top users, GPU, backends."""
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
