"""Microbenchmark: the cost of one scheduling decision of the fair queue.

Keeps ``queued`` requests from ``users`` users waiting (mixed classes, random prompt
sizes) and runs push-pop cycles: ``pop_next`` dispatches one request, its user is charged
some streamed output tokens, and the user pushes a new request so the depth stays
constant. The clock advances 1 ms per cycle, so aging promotions happen too. Each call is
timed with ``time.perf_counter``; the table reports per-call costs in microseconds.

Two kinds of rows. Reserve "off": a capacity of 10^6, so every request may start and the
decision alone is measured. Reserve "binding": capacity 16 with the default reserves
(2 + 1) and ``in_flight`` drawn each cycle from 0-12 (every class may start), 13 (high
and normal) or 14 (high only), a third each, so ``pop_next`` often has to pass over aged
``low`` requests that may not start; a decision that starts nothing is timed too, and
then nothing is pushed.

    .venv/bin/python bench/scheduler_micro.py            # the table
    .venv/bin/python bench/scheduler_micro.py --check    # exit 1 if over the target

Target (issue 3): one decision with 1,000 queued requests from 50 users < 50 us.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from teamgpu.scheduler import FairQueue, FairQueueConfig, PriorityClass, QueuedRequest

TARGET_US = 50.0
CLASS_MIX = (PriorityClass.HIGH, PriorityClass.NORMAL, PriorityClass.NORMAL, PriorityClass.LOW)


def bench(queued: int, users: int, cycles: int, *, binding: bool = False,
          seed: int = 7) -> dict[str, float]:
    """Run ``cycles`` push-pop cycles at constant depth; return per-call costs in us."""
    rng = random.Random(seed)
    config = FairQueueConfig(max_queued_per_user=queued, max_queued_total=queued + 1)
    queue = FairQueue(config)
    # Off: never the limit, measure the decision alone. Binding: see the module docstring.
    capacity = 16 if binding else 1_000_000
    names = [f"user{i}" for i in range(users)]
    serial = 0
    now = 0.0

    def new_request(user: str) -> QueuedRequest:
        nonlocal serial
        serial += 1
        return QueuedRequest(
            request_id=f"r{serial}",
            user=user,
            priority=rng.choice(CLASS_MIX),
            weight=1.0 + int(user.removeprefix("user")) % 3,
            est_prompt_tokens=rng.randint(16, 4096),
            est_output_tokens=rng.randint(16, 512),
        )

    for i in range(queued):
        queue.push(new_request(names[i % users]), now)

    pop_s: list[float] = []
    push_s: list[float] = []
    position_s: list[float] = []
    clock = time.perf_counter
    for i in range(cycles):
        now += 0.001
        in_flight = rng.choice((rng.randint(0, 12), 13, 14)) if binding else 0
        t0 = clock()
        req = queue.pop_next(now, in_flight, capacity)
        t1 = clock()
        if req is None:
            assert binding
            if i >= cycles // 10:
                pop_s.append(t1 - t0)
            continue
        queue.charge(req.user, completion_tokens=rng.randint(1, 64))
        fresh = new_request(req.user)
        t2 = clock()
        queue.push(fresh, now)
        t3 = clock()
        queue.position(fresh.request_id)
        t4 = clock()
        if i >= cycles // 10:  # the first 10% warm up
            pop_s.append(t1 - t0)
            push_s.append(t3 - t2)
            position_s.append(t4 - t3)

    def summary(samples: list[float]) -> tuple[float, float, float]:
        us = sorted(s * 1e6 for s in samples)
        return statistics.fmean(us), us[len(us) // 2], us[int(len(us) * 0.99)]

    pop_mean, pop_p50, pop_p99 = summary(pop_s)
    push_mean, _, _ = summary(push_s)
    pos_mean, _, _ = summary(position_s)
    return {
        "pop_mean": pop_mean,
        "pop_p50": pop_p50,
        "pop_p99": pop_p99,
        "push_mean": push_mean,
        "position_mean": pos_mean,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50_000, help="push-pop cycles per row")
    parser.add_argument("--check", action="store_true", help="exit 1 if over the target")
    args = parser.parse_args()

    rows = [(100, 10, False), (1_000, 50, False), (10_000, 500, False),
            (1_000, 50, True), (10_000, 500, True)]
    print(f"Fair queue: cost of one decision ({args.cycles} push-pop cycles per row, "
          f"Python {sys.version.split()[0]})\n")
    print("| queued | users | reserve | pop_next mean (us) | pop_next p50 (us) "
          "| pop_next p99 (us) | push mean (us) | position mean (us) |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    headline: dict[bool, float] = {}
    for queued, users, binding in rows:
        r = bench(queued, users, args.cycles, binding=binding)
        if (queued, users) == (1_000, 50):
            headline[binding] = r["pop_mean"]
        print(f"| {queued:,} | {users} | {'binding' if binding else 'off'} "
              f"| {r['pop_mean']:.1f} | {r['pop_p50']:.1f} | {r['pop_p99']:.1f} "
              f"| {r['push_mean']:.1f} | {r['position_mean']:.1f} |")
    ok = max(headline.values()) < TARGET_US
    print(f"\npop_next with 1,000 queued from 50 users: {headline[False]:.1f} us, "
          f"{headline[True]:.1f} us with the reserve binding "
          f"(target < {TARGET_US:.0f} us): {'PASS' if ok else 'FAIL'}")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
