"""Usage reports from the audit log (the store's ``usage`` table).

Used by ``teamgpu usage`` (grouped by user, UTC day, model or batch job, over a period)
and by ``/stats`` (per user, today). A batch job's items are usage like any request (one
audit row each, with the job's ``batch_id``); grouping by batch tells them apart.
Counts and token sums are aggregated in SQL; the median time to first token needs the
values themselves, so it is computed here from one column, and only when asked for.

Works on SQLite and PostgreSQL (the two stores teamgpu supports); days are UTC days.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Engine, and_, case, func, select

from teamgpu.metrics.ttft import nearest_rank
from teamgpu.store.tables import LISTING_ENDPOINTS, usage

__all__ = ["GroupBy", "UsageGroup", "parse_since", "start_of_day", "usage_report"]

GroupBy = Literal["user", "day", "model", "batch"]
UNAUTHENTICATED = "(unauthenticated)"
NO_MODEL = "(none)"
NO_BATCH = "-"

_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True, slots=True)
class UsageGroup:
    """Usage of one user, day, model or batch job over a period.

    Attributes:
        key: The user (``(unauthenticated)`` for requests without a valid key), the UTC
            day as ``YYYY-MM-DD``, the served model name (``(none)`` when the request
            failed before a model was resolved), or the batch id (``-`` for requests not
            made by a batch job).
        requests: Requests, every outcome included.
        prompt_tokens: Prompt tokens.
        completion_tokens: Completion tokens.
        errors: Requests answered with HTTP status >= 400 (499: client disconnected).
        p50_ttft_ms: Median time to first token in milliseconds over the requests that
            produced a token; None when none did or when not computed.
    """

    key: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int
    p50_ttft_ms: float | None = None

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self, by: GroupBy) -> dict[str, Any]:
        """One JSON object: ``{by: key, requests, prompt_tokens, completion_tokens,
        total_tokens, errors, p50_ttft_ms}``."""
        return {
            by: self.key,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "errors": self.errors,
            "p50_ttft_ms": None if self.p50_ttft_ms is None else round(self.p50_ttft_ms, 1),
        }


def start_of_day(now: datetime) -> datetime:
    """Midnight UTC of the UTC day of ``now`` (an aware datetime, or naive UTC)."""
    now = _utc(now)
    return datetime(now.year, now.month, now.day, tzinfo=UTC)


def parse_since(text: str, now: datetime) -> datetime | None:
    """The start of a period given as ``--since`` takes it.

    Args:
        text: ``today``, ``yesterday``, ``all`` (no lower bound), a relative span
            ``N[s|m|h|d|w]`` (``24h``, ``7d``), a date ``YYYY-MM-DD`` (its midnight UTC),
            or an ISO 8601 date-time (UTC when it carries no offset).
        now: The current time (aware, or naive UTC).

    Returns:
        The aware UTC start, or None for ``all``.

    Raises:
        ValueError: Anything else, with the accepted forms in the message.
    """
    t = text.strip().lower()
    now = _utc(now)
    if t == "today":
        return start_of_day(now)
    if t == "yesterday":
        return start_of_day(now) - timedelta(days=1)
    if t == "all":
        return None
    m = _RELATIVE.match(t)
    if m:
        return now - timedelta(seconds=int(m.group(1)) * _UNITS_S[m.group(2)])
    try:
        if len(t) == 10:
            d = date.fromisoformat(t)
            return datetime(d.year, d.month, d.day, tzinfo=UTC)
        return _utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise ValueError(
            f"cannot read {text!r} as a time: use today, yesterday, all, 24h, 7d, 30m, "
            "YYYY-MM-DD or an ISO date-time"
        ) from None


def usage_report(
    engine: Engine,
    *,
    by: GroupBy = "user",
    since: datetime | None = None,
    until: datetime | None = None,
    with_ttft: bool = True,
) -> list[UsageGroup]:
    """Usage grouped by user, UTC day, model or batch job, for ``since <= ts < until``;
    model listings (``/v1/models``) and the Batch and Files API's own requests are
    audited but are not usage, and are left out (``LISTING_ENDPOINTS``).

    Args:
        engine: The store.
        by: ``user``, ``day``, ``model`` or ``batch``.
        since: Start of the period (aware or naive UTC); None for no lower bound.
        until: End of the period, excluded; None for no upper bound.
        with_ttft: Also compute the median TTFT per group (reads one value per request
            that produced a token; leave it off for frequent polling).

    Returns:
        Groups sorted by day ascending for ``by="day"``, else by total tokens then
        requests, descending.

    Raises:
        ValueError: An unknown ``by``.
        sqlalchemy.exc.SQLAlchemyError: The store cannot be read.
    """
    key = _group_expr(engine, by)
    cond = _period(since, until)
    q = select(
        key.label("k"),
        func.count().label("n"),
        func.coalesce(func.sum(usage.c.prompt_tokens), 0),
        func.coalesce(func.sum(usage.c.completion_tokens), 0),
        func.coalesce(func.sum(case((usage.c.status >= 400, 1), else_=0)), 0),
    ).where(usage.c.endpoint.not_in(LISTING_ENDPOINTS)).group_by(key)
    if cond is not None:
        q = q.where(cond)
    with engine.connect() as conn:
        rows = conn.execute(q).all()
        medians: dict[str, float | None] = {}
        if with_ttft and rows:
            tq = select(key, usage.c.ttft_ms).where(usage.c.ttft_ms.is_not(None))
            if cond is not None:
                tq = tq.where(cond)
            medians = _medians(conn.execute(tq))
    default = {"user": UNAUTHENTICATED, "model": NO_MODEL, "batch": NO_BATCH, "day": "?"}[by]
    groups = [
        UsageGroup(
            key=str(k) if k is not None else default,
            requests=int(n),
            prompt_tokens=int(p),
            completion_tokens=int(c),
            errors=int(e),
            p50_ttft_ms=medians.get(k) if with_ttft else None,
        )
        for k, n, p, c, e in rows
    ]
    if by == "day":
        groups.sort(key=lambda g: g.key)
    else:
        groups.sort(key=lambda g: (-g.total_tokens, -g.requests, g.key))
    return groups


# ---------------------------------------------------------------------- internals


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _group_expr(engine: Engine, by: str) -> ColumnElement[Any]:
    if by == "user":
        return usage.c.user
    if by == "model":
        return usage.c.model
    if by == "batch":
        return usage.c.batch_id
    if by == "day":
        if engine.dialect.name == "sqlite":
            # SQLAlchemy stores SQLite date-times as 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC
            return func.substr(usage.c.ts, 1, 10)
        return func.to_char(func.timezone("UTC", usage.c.ts), "YYYY-MM-DD")
    raise ValueError(f"by={by!r}: must be user, day, model or batch")


def _period(since: datetime | None, until: datetime | None) -> ColumnElement[bool] | None:
    parts = []
    if since is not None:
        parts.append(usage.c.ts >= _utc(since))
    if until is not None:
        parts.append(usage.c.ts < _utc(until))
    return and_(*parts) if parts else None


def _medians(rows: Iterable[Any]) -> dict[str, float | None]:
    values: dict[str, list[float]] = defaultdict(list)
    for k, ttft_ms in rows:
        values[k].append(float(ttft_ms))
    return {k: nearest_rank(sorted(v), 0.5) for k, v in values.items()}
