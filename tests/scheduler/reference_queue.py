"""A brute-force model of the fair queue's rules, to check ``FairQueue`` against.

It keeps the waiting requests in one list and answers every call by enumerating them,
straight from the rules in docs/scheduler.md ("Order of service"): O(n) per call, no
heaps, no buckets, no lazy invalidation. It shares nothing with ``FairQueue`` but the
config's two rule functions (``admission_limit``, ``effective_priority``) and
``PriorityClass``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from teamgpu.scheduler import FairQueueConfig, PriorityClass, QueuedRequest

_CLASSES = tuple(PriorityClass)


@dataclass
class _Waiting:
    req: QueuedRequest
    seq: int


class ReferenceQueue:
    """The rules by enumeration. Raises no errors: the caller keeps within the bounds."""

    def __init__(self, config: FairQueueConfig) -> None:
        self.config = config
        self.now = -math.inf
        self.waiting: list[_Waiting] = []
        self.counters: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.last_served: dict[PriorityClass, str] = {}
        self._seq = 0

    # ------------------------------------------------------------------ rules

    def eff(self, w: _Waiting) -> PriorityClass:
        """Effective class: requested, promoted one step per full ``aging_s`` waited."""
        return self.config.effective_priority(w.req.priority, self.now - w.req.enqueued_at)

    def may_start(self, w: _Waiting, in_flight: int, capacity: int,
                  lowest: PriorityClass) -> bool:
        """Rule 1: the requested class decides, never the effective one."""
        requested = w.req.priority
        return requested <= lowest and in_flight < self.config.admission_limit(requested,
                                                                               capacity)

    def startable(self, in_flight: int, capacity: int,
                  lowest: PriorityClass) -> list[_Waiting]:
        return [w for w in self.waiting if self.may_start(w, in_flight, capacity, lowest)]

    def vtc_key(self, w: _Waiting) -> tuple[float, int]:
        # Sorting by (user's counter, seq) puts first the user with the smallest counter,
        # then the oldest head (seqs are unique), and that user's oldest request.
        return (self.counters.get(w.req.user, 0.0), w.seq)

    # ------------------------------------------------------------------ operations

    def advance(self, now: float) -> None:
        self.now = max(self.now, now)

    def push(self, req: QueuedRequest, now: float) -> int:
        self.advance(now)
        req.enqueued_at = self.now
        user = req.user
        self.weights[user] = req.weight
        self.counters.setdefault(user, 0.0)
        cls = req.priority
        if not any(w.req.user == user and self.eff(w) == cls for w in self.waiting):
            in_class = [self.counters[w.req.user] for w in self.waiting if self.eff(w) == cls]
            if in_class:
                floor: float | None = min(in_class)
            elif cls in self.last_served:
                floor = self.counters[self.last_served[cls]]
            else:
                floor = None
            if floor is not None:
                self.counters[user] = max(self.counters[user], floor)
        w = _Waiting(req, self._seq)
        self._seq += 1
        self.waiting.append(w)
        position = self.position(req.request_id)
        assert position is not None
        return position

    def remove(self, request_id: str) -> bool:
        for i, w in enumerate(self.waiting):
            if w.req.request_id == request_id:
                del self.waiting[i]
                return True
        return False

    def pop_next(self, now: float, in_flight: int, capacity: int,
                 lowest: PriorityClass = PriorityClass.LOW) -> QueuedRequest | None:
        self.advance(now)
        candidates = self.startable(in_flight, capacity, lowest)
        if not candidates:
            return None
        best_eff = min(self.eff(w) for w in candidates)
        chosen = min((w for w in candidates if self.eff(w) == best_eff), key=self.vtc_key)
        self.waiting.remove(chosen)
        req = chosen.req
        self.counters[req.user] += (
            self.config.input_token_weight * req.est_prompt_tokens / self.weights[req.user]
        )
        self.last_served[best_eff] = req.user
        return req

    def expire(self, now: float) -> list[str]:
        self.advance(now)
        out: list[str] = []
        for cls in _CLASSES:
            timeout = self.config.queue_timeout_s[cls]
            for w in sorted(self.waiting, key=lambda w: w.seq):
                if w.req.priority == cls and self.now - w.req.enqueued_at >= timeout:
                    out.append(w.req.request_id)
        self.waiting = [w for w in self.waiting if w.req.request_id not in out]
        return out

    def charge(self, user: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        weight = self.weights.setdefault(user, 1.0)
        cfg = self.config
        self.counters[user] = self.counters.get(user, 0.0) + (
            cfg.input_token_weight * prompt_tokens + cfg.output_token_weight * completion_tokens
        ) / weight

    def position(self, request_id: str) -> int | None:
        """The documented estimate, among requests of the same requested class or better."""
        me = next((w for w in self.waiting if w.req.request_id == request_id), None)
        if me is None:
            return None
        mine_eff = self.eff(me)
        rivals = [w for w in self.waiting if w.req.priority <= me.req.priority]
        ahead = sum(1 for w in rivals if self.eff(w) < mine_eff)
        same = [w for w in rivals if self.eff(w) == mine_eff]
        by_user: dict[str, list[_Waiting]] = {}
        for w in same:
            by_user.setdefault(w.req.user, []).append(w)
        own = by_user.pop(me.req.user)
        k = 1 + sum(1 for w in own if w.seq < me.seq)
        mine = (self.counters[me.req.user], min(w.seq for w in own))
        for name, theirs in by_user.items():
            first = (self.counters[name], min(w.seq for w in theirs)) < mine
            ahead += min(len(theirs), k if first else k - 1)
        return ahead + k

    def next_event_at(self) -> float | None:
        best = math.inf
        for w in self.waiting:
            best = min(best, w.req.enqueued_at + self.config.queue_timeout_s[w.req.priority])
            promoted = w.req.priority - self.eff(w)
            if self.eff(w) > PriorityClass.HIGH and self.config.aging_s < math.inf:
                best = min(best, w.req.enqueued_at + (promoted + 1) * self.config.aging_s)
        return None if best == math.inf else best

    def queued(self) -> tuple[dict[PriorityClass, int], dict[PriorityClass, int]]:
        """Waiting requests per requested class and per effective class."""
        requested = {c: sum(1 for w in self.waiting if w.req.priority == c) for c in _CLASSES}
        effective = {c: sum(1 for w in self.waiting if self.eff(w) == c) for c in _CLASSES}
        return requested, effective
