"""The demo model on the CPU in bf16 and in float32: answers and decoding speed, one run.

    .venv/bin/python bench/demo_dtype.py [--dtypes bfloat16,float32] [--tokens 128]

For each dtype it starts vLLM with the demo model as ``teamgpu up`` does on the CPU
(``--enforce-eager``, ``--max-num-seqs 16``, ``--max-model-len 2048``,
``VLLM_CPU_KVCACHE_SPACE=1``) plus ``--dtype``, then:

* asks the README's question ("What is the capital of France?", chat, temperature 0,
  ``max_tokens`` 32) three times and prints the answers;
* streams ``--tokens`` tokens with ``ignore_eos`` from 1 client and from 8 clients at
  once and prints tokens/s (all clients together) and TTFT p50.

Why: a 135M model with 4-bit source weights sits on a knife's edge in bf16; whether its
greedy answer is right depends on the CPU's bf16 kernels (AMX and AVX-512 BF16 machines
answered nonsense, see docs/install.md). The figures printed here are the cost of the
dtype that makes it stable.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from teamgpu.engine.supervisor import EngineSpec, EngineSupervisor, free_port
from teamgpu.settings import default_cache_dir

QUESTION = "What is the capital of France?"
NAME = "demo"


async def ask(client: httpx.AsyncClient) -> str:
    r = await client.post("/v1/chat/completions", json={
        "model": NAME, "temperature": 0, "max_tokens": 32,
        "messages": [{"role": "user", "content": QUESTION}]})
    r.raise_for_status()
    return str(r.json()["choices"][0]["message"]["content"])


async def stream_one(client: httpx.AsyncClient, tokens: int) -> tuple[float, float, int]:
    """(ttft_s, total_s, tokens) of one streamed completion."""
    t0 = time.perf_counter()
    ttft = None
    n = 0
    async with client.stream("POST", "/v1/completions", json={
            "model": NAME, "prompt": "Once upon a time", "max_tokens": tokens,
            "ignore_eos": True, "temperature": 0, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                n += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return ttft or 0.0, time.perf_counter() - t0, n


async def speed(client: httpx.AsyncClient, clients: int, tokens: int) -> tuple[float, float]:
    """(tokens/s of all clients together, TTFT p50 s)."""
    t0 = time.perf_counter()
    results = await asyncio.gather(*(stream_one(client, tokens) for _ in range(clients)))
    wall = time.perf_counter() - t0
    return sum(r[2] for r in results) / wall, statistics.median(r[0] for r in results)


async def run_dtype(python: Path, model: Path, dtype: str, tokens: int) -> dict[str, object]:
    log = Path(tempfile.mkdtemp(prefix="teamgpu-dtype-")) / "engine.log"
    # "float32:compiled" drops --enforce-eager (vLLM's compiled graphs)
    dt, _, mode = dtype.partition(":")
    extra = ("--no-enforce-eager",) if mode == "compiled" else ()
    spec = EngineSpec(python=python, model=str(model), served_model_name=NAME, port=free_port(),
                      args=("--dtype", dt, *extra), env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                      log_path=log, device="cpu")
    sup = EngineSupervisor(spec, start_timeout_s=600)
    t0 = time.perf_counter()
    await sup.start()
    start_s = time.perf_counter() - t0
    try:
        async with httpx.AsyncClient(base_url=sup.base_url, timeout=300, trust_env=False) as c:
            answers = [await ask(c) for _ in range(3)]
            await speed(c, 1, 16)  # warm-up
            one = await speed(c, 1, tokens)
            eight = await speed(c, 8, tokens)
    finally:
        await sup.stop()
    return {"dtype": dtype, "start_s": start_s, "answers": answers, "one": one, "eight": eight}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bfloat16,float32",
                    help="comma-separated; DTYPE:compiled runs without --enforce-eager")
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    cache = default_cache_dir()
    python = Path((cache / "engine-python").read_text().strip())
    model = cache / "models" / "SmolLM2-135M-Instruct"
    rows = [await run_dtype(python, model, d, args.tokens) for d in args.dtypes.split(",")]
    print(f"\n{QUESTION!r}, chat, temperature 0, max_tokens 32, three times:")
    for r in rows:
        for a in r["answers"]:  # type: ignore[attr-defined]
            print(f"  {r['dtype']:>9}: {a!r}")
    print("\n| dtype | start s | 1 client tok/s | TTFT p50 | 8 clients tok/s | TTFT p50 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        one, eight = r["one"], r["eight"]
        print(f"| {r['dtype']} | {r['start_s']:.0f} | {one[0]:.1f} | {one[1]:.2f} s "  # type: ignore[index]
              f"| {eight[0]:.1f} | {eight[1]:.2f} s |")  # type: ignore[index]


if __name__ == "__main__":
    asyncio.run(main())
