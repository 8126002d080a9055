"""The memory plan of a model set, checked before any engine starts.

Every local model of the set gets a share, and the shares of the engines that run at the
same time must fit together:

- **GPU** (``cuda``): the share is vLLM's ``--gpu-memory-utilization``, a fraction of the
  GPU's memory that one vLLM instance may use (weights, activations, CUDA graphs and KV
  cache; vLLM's own default is 0.92 for a lone engine). The fractions of the engines that
  are awake must sum to at most ``GPU_UTILIZATION_BOUND`` (0.95): each process also holds
  a CUDA context outside its budget (a few hundred MiB; not measured here, there is no GPU
  on the project's machines), and vLLM refuses to start when less than its fraction is
  free. A model given no fraction gets an equal part of ``GPU_DEFAULT_TOTAL`` (0.90) minus
  the fractions that are given. An on-demand model put to sleep (vLLM sleep level 1, see
  :mod:`teamgpu.engine.fleet`) keeps ``GPU_SLEEP_RESIDUAL`` (0.05) of the GPU, an estimate:
  level 1 frees every allocation of vLLM's sleep-mode allocator (weights, KV cache, CUDA
  graph pools) but not the CUDA context and what was allocated outside that pool.
- **CPU**: each engine gets its own KV cache, ``VLLM_CPU_KVCACHE_SPACE`` GiB (an integer:
  vLLM 0.32 parses it with ``int()``), and needs its weights in RAM plus a fixed overhead
  per engine (API server, engine core and worker processes, torch, activations). The sum
  over the engines that run together must fit in ``MemAvailable`` (``/proc/meminfo``)
  minus ``CPU_RESERVE_BYTES`` kept for the gateway and the system. Measured here (vLLM
  0.32 CPU, eager, 2 cores, drop of MemAvailable from before the start to ready):
  all-MiniLM-L6-v2 (87 MB of weights, no KV cache: an encoder-only model allocates none)
  took 1.25 GiB; SmolLM2-135M-Instruct (bf16 files served as float32, i.e. 0.5 GiB of
  weights, 1 GiB KV cache, ``--max-model-len 2048 --max-num-seqs 16``) took 3.1 GiB.
  Hence ``CPU_ENGINE_OVERHEAD_BYTES`` = 1.75 GiB, the larger of the two remainders
  (1.17 and 1.6 GiB) rounded up.

On-demand models count when they would start: the plan refuses a set where an on-demand
model could not start even with every other on-demand model stopped, and the fleet asks
:meth:`MemoryPlan.fits` before each start (evicting idle on-demand models first).

Only the standard library is used; nothing here starts a process.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from teamgpu.engine.errors import MemoryPlanError
from teamgpu.engine.supervisor import engine_arg
from teamgpu.settings import ModelConfig

__all__ = [
    "CPU_DEFAULT_KV_GIB",
    "CPU_ENGINE_OVERHEAD_BYTES",
    "CPU_RESERVE_BYTES",
    "GPU_DEFAULT_TOTAL",
    "GPU_SLEEP_RESIDUAL",
    "GPU_UTILIZATION_BOUND",
    "Device",
    "EngineShare",
    "GiB",
    "MemoryPlan",
    "estimate_weight_bytes",
    "mem_available_bytes",
    "plan_memory",
]

Device = Literal["cpu", "cuda"]
GiB = 1024**3
GPU_UTILIZATION_BOUND = 0.95
"""Largest sum of ``--gpu-memory-utilization`` of the engines awake on one GPU."""
GPU_DEFAULT_TOTAL = 0.90
"""What the models without a ``gpu_memory_utilization`` share equally."""
GPU_SLEEP_RESIDUAL = 0.05
"""Fraction of the GPU an engine asleep at level 1 is assumed to keep (an estimate)."""
CPU_DEFAULT_KV_GIB = 1
"""KV cache of a generating model on the CPU when ``kv_cache_gib`` is unset."""
CPU_ENGINE_OVERHEAD_BYTES = int(1.75 * GiB)
"""RAM of one vLLM CPU engine besides its weights and KV cache (measured, see above)."""
CPU_RESERVE_BYTES = 1 * GiB
"""MemAvailable left to the gateway and the system."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}


@dataclass(frozen=True)
class EngineShare:
    """The memory one engine is planned to use.

    Attributes:
        name: the model's name.
        on_demand: started on the first request, not at start-up.
        gpu_fraction: its ``--gpu-memory-utilization`` (0 on the CPU).
        kv_cache_gib: its ``VLLM_CPU_KVCACHE_SPACE`` (0 on a GPU).
        weight_bytes: estimated size of its weights in memory (0 when unknown: a model
            id rather than a local folder).
        overhead_bytes: the per-engine overhead on the CPU (0 on a GPU).
    """

    name: str
    on_demand: bool
    gpu_fraction: float = 0.0
    kv_cache_gib: int = 0
    weight_bytes: int = 0
    overhead_bytes: int = 0

    @property
    def cpu_bytes(self) -> int:
        """RAM the engine needs on the CPU: KV cache + weights + overhead, in bytes."""
        return self.kv_cache_gib * GiB + self.weight_bytes + self.overhead_bytes

    def describe(self, device: Device) -> str:
        """One line: the share and, on the CPU, what it is made of."""
        if device == "cuda":
            return f"{self.gpu_fraction:.2f} of the GPU"
        weights = _gib(self.weight_bytes) if self.weight_bytes else "unknown"
        return (f"{_gib(self.cpu_bytes)} = KV cache {self.kv_cache_gib} GiB + weights "
                f"{weights} + engine {_gib(self.overhead_bytes)}")


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclass(frozen=True)
class MemoryPlan:
    """The shares of a model set and the budget they must fit in.

    Attributes:
        device: ``cpu`` or ``cuda``.
        shares: model name -> share, in the order of the set (local models only).
        budget: on a GPU the largest sum of fractions (``GPU_UTILIZATION_BOUND``); on the
            CPU bytes: MemAvailable when the plan was made minus ``CPU_RESERVE_BYTES``.
        sleep_residual: fraction of the GPU a sleeping engine keeps.
        reserve_bytes: MemAvailable kept free on the CPU (for :meth:`fits`).
    """

    device: Device
    shares: Mapping[str, EngineShare]
    budget: float
    sleep_residual: float = GPU_SLEEP_RESIDUAL
    reserve_bytes: int = CPU_RESERVE_BYTES

    def always_on(self) -> list[str]:
        """Models started at start-up (not on demand), in the set's order."""
        return [n for n, s in self.shares.items() if not s.on_demand]

    def use(self, awake: Iterable[str], sleeping: Iterable[str] = ()) -> float:
        """What ``awake`` engines (and, on a GPU, ``sleeping`` ones) use together: a
        fraction of the GPU, or bytes of RAM."""
        if self.device == "cuda":
            return (sum(self.shares[n].gpu_fraction for n in awake)
                    + self.sleep_residual * len(list(sleeping)))
        return float(sum(self.shares[n].cpu_bytes for n in awake))

    def fits(self, awake: Iterable[str], sleeping: Iterable[str] = (), *,
             new: str | None = None, mem_available: int | None = None) -> bool:
        """Whether ``awake`` and ``sleeping`` engines fit in the budget together.

        Args:
            awake: engines running (or starting) with their full share, ``new`` included.
            sleeping: engines asleep on a GPU.
            new: the engine about to start or wake; on the CPU with ``mem_available``
                its share must also fit in what the machine has free right now (other
                programs may have taken memory since the plan was made).
            mem_available: MemAvailable now, in bytes (CPU only), or None.
        """
        awake, sleeping = list(awake), list(sleeping)
        if self.use(awake, sleeping) > self.budget + 1e-9:
            return False
        if self.device == "cpu" and new is not None and mem_available is not None:
            return self.shares[new].cpu_bytes <= mem_available - self.reserve_bytes
        return True

    def describe(self, awake: Iterable[str], sleeping: Iterable[str] = ()) -> str:
        """Lines naming each engine's share, the total and the budget."""
        awake, sleeping = list(awake), list(sleeping)
        width = max((len(n) for n in [*awake, *sleeping]), default=0)
        lines = [f"  {n:<{width}}  {self.shares[n].describe(self.device)}"
                 + (" (on demand)" if self.shares[n].on_demand else "") for n in awake]
        lines += [f"  {n:<{width}}  {self.sleep_residual:.2f} of the GPU (asleep)"
                  for n in sleeping]
        total = self.use(awake, sleeping)
        if self.device == "cuda":
            lines.append(f"  total {total:.2f} of the GPU; at most {self.budget:.2f} "
                         "(the rest is for the CUDA context of each engine)")
        else:
            lines.append(f"  total {_gib(total)}; available {_gib(self.budget)} "
                         f"(MemAvailable minus {_gib(self.reserve_bytes)} for the gateway "
                         "and the system)")
        return "\n".join(lines)


def mem_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """``MemAvailable`` from ``/proc/meminfo``, in bytes.

    Raises:
        MemoryPlanError: the file is missing or has no MemAvailable line (not Linux).
    """
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError) as exc:
        raise MemoryPlanError(f"cannot read MemAvailable from {meminfo}: {exc}") from exc
    raise MemoryPlanError(f"no MemAvailable line in {meminfo}")


def _checkpoint_dtype(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    dtype = config.get("torch_dtype") or config.get("dtype")
    return str(dtype) if dtype else None


def estimate_weight_bytes(model: str, engine_args: Sequence[str] = ()) -> int:
    """The size of a model's weights in memory, from its files.

    The sum of the weight files (``*.safetensors``; else ``*.bin``, ``*.pt``, ``*.pth``,
    ``*.gguf``) in the folder, scaled when ``--dtype`` in ``engine_args`` changes the
    width of the checkpoint's dtype (``config.json`` ``torch_dtype``): bf16 files served
    as float32 take twice their size, as the demo model does on the CPU.

    Args:
        model: a local folder or a model id.
        engine_args: the engine's flags (only ``--dtype`` is read).

    Returns:
        Bytes; 0 when ``model`` is not a local folder (a model id: its size is unknown
        here).
    """
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return 0
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = 0
    for suffix in WEIGHT_SUFFIXES:
        size = sum(p.stat().st_size for p in files if p.name.endswith(suffix))
        if size:
            break
    want = DTYPE_BYTES.get(engine_arg(list(engine_args), "--dtype") or "")
    have = DTYPE_BYTES.get(_checkpoint_dtype(folder) or "")
    if want and have and want != have:
        size = size * want // have
    return size


def _gpu_fractions(local: Sequence[ModelConfig]) -> dict[str, float]:
    given = {m.name: m.gpu_memory_utilization for m in local
             if m.gpu_memory_utilization is not None}
    unset = [m.name for m in local if m.gpu_memory_utilization is None]
    fractions = {n: f for n, f in given.items() if f is not None}
    if unset:
        left = GPU_DEFAULT_TOTAL - sum(fractions.values())
        if left <= 0.01 * len(unset):
            raise MemoryPlanError(
                f"the models with gpu_memory_utilization take {sum(fractions.values()):.2f} "
                f"of the GPU; nothing is left of {GPU_DEFAULT_TOTAL:.2f} for "
                f"{', '.join(unset)}: give them a gpu_memory_utilization too")
        fractions.update({n: round(left / len(unset), 3) for n in unset})
    return fractions


def plan_memory(
    models: Sequence[ModelConfig],
    device: Device,
    *,
    mem_available: int | Callable[[], int] | None = None,
    overhead_bytes: int = CPU_ENGINE_OVERHEAD_BYTES,
    reserve_bytes: int = CPU_RESERVE_BYTES,
    gpu_bound: float = GPU_UTILIZATION_BOUND,
    sleep_residual: float = GPU_SLEEP_RESIDUAL,
    engine_args: Callable[[ModelConfig], Sequence[str]] | None = None,
) -> MemoryPlan:
    """Give each local model its share and check that the set fits.

    Checked: the models started at start-up fit together, and each on-demand model fits
    beside them (with every other on-demand model stopped).

    Args:
        models: the model set; remote-only models (no ``model``) need no share.
        device: ``cpu`` or ``cuda``.
        mem_available: MemAvailable in bytes (or a function returning it); default:
            read ``/proc/meminfo`` (CPU only).
        overhead_bytes: RAM per CPU engine besides weights and KV cache.
        reserve_bytes: MemAvailable kept for the gateway and the system.
        gpu_bound: largest sum of GPU fractions of the engines awake.
        sleep_residual: GPU fraction a sleeping engine keeps.
        engine_args: the flags each model's engine will get (for ``--dtype``); default:
            ``model.engine_args``.

    Returns:
        The plan, for the fleet to consult before every start.

    Raises:
        MemoryPlanError: the set does not fit; the message names each model's share and
            the total.
    """
    local = [m for m in models if m.local]
    if device == "cuda":
        fractions = _gpu_fractions(local)
        shares = {m.name: EngineShare(m.name, m.on_demand, gpu_fraction=fractions[m.name])
                  for m in local}
        budget = gpu_bound
    else:
        available = mem_available() if callable(mem_available) else mem_available
        if available is None:
            available = mem_available_bytes()
        shares = {}
        for m in local:
            assert m.model is not None
            kv = m.kv_cache_gib
            if kv is None:
                kv = CPU_DEFAULT_KV_GIB if m.generates else 0
            args = engine_args(m) if engine_args is not None else m.engine_args
            shares[m.name] = EngineShare(
                m.name, m.on_demand, kv_cache_gib=kv,
                weight_bytes=estimate_weight_bytes(m.model, args), overhead_bytes=overhead_bytes)
        budget = float(available - reserve_bytes)
    plan = MemoryPlan(device, shares, budget, sleep_residual, reserve_bytes)

    where = "on the GPU" if device == "cuda" else "in the CPU's memory"
    always = plan.always_on()
    if not plan.fits(always):
        raise MemoryPlanError(
            f"the models started at start-up do not fit {where}:\n{plan.describe(always)}\n"
            + _advice(device))
    for name, share in shares.items():
        if share.on_demand and not plan.fits([*always, name]):
            raise MemoryPlanError(
                f"on-demand model {name!r} could never start {where}, even with every other "
                f"on-demand model stopped:\n{plan.describe([*always, name])}\n"
                + _advice(device))
    return plan


def _advice(device: Device) -> str:
    if device == "cuda":
        return ("Lower gpu_memory_utilization of some models, or make some on_demand "
                "(teamgpu.toml [[models]]).")
    return ("Lower kv_cache_gib of some models, make some on_demand, or serve fewer models "
            "(teamgpu.toml [[models]]).")
