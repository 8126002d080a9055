"""The shipped reverse-proxy configs, run for real on loopback in front of a live gateway.

- ``deploy/caddy/Caddyfile`` with Debian's ``caddy`` (2.6.2): ``tls internal`` (its local
  CA lives in a temporary storage folder; ``skip_install_trust`` keeps it out of the
  system trust store), with and without basic auth.
- ``deploy/nginx/teamgpu.conf`` with Debian's ``nginx`` as a foreground process with a
  temporary prefix and a self-signed certificate from ``openssl``.

Both are driven with the official OpenAI SDK trusting the proxy's CA. Row F1 of the fault
list: the fake backend pauses ``DELAY_S`` before each token, and the chunks must reach the
client one by one, spaced like that, not in one lump at the end.

The test installs nothing: ``scripts/setup-test-services.sh`` (run by ``./test.sh``)
apt-installs caddy and nginx. A missing binary fails the test, it does not skip it.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import DefaultHttpxClient, OpenAI

from teamgpu.cli.doctor import Doctor, Status
from teamgpu.settings import Settings
from tests.support.fake_backend import FakeBackend, ServerThread, free_port
from tests.support.harness import Harness, start_gateway, wait_until

pytestmark = pytest.mark.services

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TOKENS = 6
DELAY_S = 0.15
USER, PASSWORD = "team", "correct horse battery staple"


def binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                  else None)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/setup-test-services.sh")
    return path


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with ServerThread(FakeBackend()) as backend, \
            start_gateway(tmp_path_factory.mktemp("gw"), [backend.url]) as h:
        yield h


def stream_gaps(client: OpenAI) -> list[float]:
    """Stream a chat through ``client``; the arrival times of the content chunks (s)."""
    arrivals = []
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_body={"fake": {"tokens": TOKENS, "delay_s": DELAY_S}})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
    return arrivals


def assert_one_by_one(arrivals: list[float]) -> None:
    """Each token arrived on its own, about DELAY_S after the previous one (row F1)."""
    assert len(arrivals) == TOKENS
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # a buffering proxy delivers them together: gaps near 0. The median, not the minimum,
    # so that one late event on a busy machine (two arriving close together) is tolerated.
    assert statistics.median(gaps) > DELAY_S * 0.5, gaps
    assert arrivals[-1] - arrivals[0] > (TOKENS - 1) * DELAY_S * 0.8, gaps


def assert_stream_headers(r: httpx.Response, *, accel_header: bool = True) -> None:
    """Row F1's headers. nginx consumes X-Accel-Buffering (it is meant for nginx) and
    does not pass it on; Caddy passes it through."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in r.headers
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers.get("x-accel-buffering") == ("no" if accel_header else None)


def chat_body() -> dict[str, object]:
    return {"model": "fake-model", "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}


@contextlib.contextmanager
def running(cmd: list[str], env: dict[str, str], log: Path, ready: object) -> Iterator[None]:
    """Run ``cmd`` in its own process group until the block ends; fail with its log when it
    dies or ``ready()`` stays false."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not ready():  # type: ignore[operator]
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{cmd[0]} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- Caddy ---------------------------------------------------------------------------------
@dataclass
class Caddy:
    url: str           # https://127.0.0.1:PORT
    root_ca: Path      # the local CA's root certificate
    admin: str         # http://127.0.0.1:PORT of the admin endpoint (the health check)
    basic_auth: bool


@contextlib.contextmanager
def run_caddy(tmp: Path, upstream: str, basic_auth: bool) -> Iterator[Caddy]:
    caddy = binary("caddy")
    https_port, http_port, admin_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CADDY_")}
    env.update(HOME=str(tmp), XDG_DATA_HOME=str(tmp / "data"),
               XDG_CONFIG_HOME=str(tmp / "config"),
               CADDY_SITE_ADDRESS=f"127.0.0.1:{https_port}",
               CADDY_HTTPS_PORT=str(https_port), CADDY_HTTP_PORT=str(http_port),
               CADDY_ADMIN=f"127.0.0.1:{admin_port}", CADDY_UPSTREAM=upstream)
    if basic_auth:
        hashed = subprocess.run([caddy, "hash-password", "--plaintext", PASSWORD],
                                capture_output=True, text=True, check=True).stdout.strip()
        env.update(CADDY_BASIC_AUTH="on", CADDY_BASIC_AUTH_USER=USER,
                   CADDY_BASIC_AUTH_HASH=hashed)
    root = tmp / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"
    cmd = [caddy, "run", "--config", str(DEPLOY / "caddy" / "Caddyfile"),
           "--adapter", "caddyfile"]
    with running(cmd, env, tmp / "caddy.log",
                 lambda: root.exists() and port_open(https_port) and port_open(admin_port)):
        c = Caddy(f"https://127.0.0.1:{https_port}", root, f"http://127.0.0.1:{admin_port}",
                  basic_auth)
        # the certificate for 127.0.0.1 is issued just after start
        wait_until(lambda: _tls_ok(c), 10, "Caddy's certificate")
        yield c


def _tls_ok(c: Caddy) -> bool:
    try:
        httpx.get(c.url + "/healthz", verify=ca(c.root_ca), timeout=2, trust_env=False)
        return True
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def caddy(gw: Harness, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Caddy]:
    with run_caddy(tmp_path_factory.mktemp("caddy"), gw.url.removeprefix("http://"),
                   basic_auth=False) as c:
        yield c


@pytest.fixture(scope="module")
def caddy_auth(gw: Harness, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Caddy]:
    with run_caddy(tmp_path_factory.mktemp("caddy_auth"), gw.url.removeprefix("http://"),
                   basic_auth=True) as c:
        yield c


def ca(path: Path) -> ssl.SSLContext:
    """Trust only ``path`` (httpx deprecates ``verify=<path>``)."""
    return ssl.create_default_context(cafile=str(path))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_caddy_streams_events_one_by_one(caddy: Caddy, gw: Harness) -> None:
    client = OpenAI(base_url=caddy.url + "/v1", api_key=gw.user_key, max_retries=0,
                    http_client=DefaultHttpxClient(verify=ca(caddy.root_ca), trust_env=False))
    assert_one_by_one(stream_gaps(client))
    r = httpx.post(caddy.url + "/v1/chat/completions", json=chat_body(), verify=ca(caddy.root_ca),
                   headers={"Authorization": f"Bearer {gw.user_key}"}, trust_env=False)
    assert_stream_headers(r)


def test_caddy_tls_internal_needs_its_root(caddy: Caddy, gw: Harness) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(caddy.url + "/healthz", trust_env=False)
    # what `teamgpu doctor` says about it, with and without the root
    s = Settings(data_dir=gw.data_dir)
    c = Doctor(s, url=caddy.url + "/v1").check_tls()
    assert c.status is Status.FAIL and c.fix and "root.crt" in c.fix
    c = Doctor(s, url=caddy.url, ca_cert=caddy.root_ca).check_tls()
    assert c.status is Status.PASS and "Caddy Local Authority" in c.message
    c = Doctor(s, url=caddy.url, key=gw.user_key, ca_cert=caddy.root_ca).check_gateway()
    assert c.status is Status.PASS


def test_caddy_admin_endpoint_answers_the_health_check(caddy: Caddy) -> None:
    assert httpx.get(caddy.admin + "/config/", trust_env=False).status_code == 200


def test_caddy_rejects_a_bad_api_key_through_the_gateway(caddy: Caddy) -> None:
    r = httpx.get(caddy.url + "/v1/models", verify=ca(caddy.root_ca), trust_env=False,
                  headers={"Authorization": "Bearer tg-wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"]
    assert r.headers.get("x-request-id")


def test_caddy_basic_auth(caddy_auth: Caddy, gw: Harness) -> None:
    verify = ca(caddy_auth.root_ca)
    url = caddy_auth.url + "/v1/models"
    # no basic credentials: Caddy answers 401 itself, the gateway never sees it
    r = httpx.get(url, verify=verify, trust_env=False, headers={"x-api-key": gw.user_key})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert "x-request-id" not in r.headers
    r = httpx.get(url, verify=verify, trust_env=False,
                  headers={"Authorization": basic(USER, "wrong"), "x-api-key": gw.user_key})
    assert r.status_code == 401 and "x-request-id" not in r.headers
    # right credentials, wrong key: the gateway's 401
    r = httpx.get(url, verify=verify, trust_env=False,
                  headers={"Authorization": basic(USER, PASSWORD), "x-api-key": "tg-wrong"})
    assert r.status_code == 401 and r.headers.get("x-request-id")
    # both right: the OpenAI SDK streams, with the key in x-api-key
    client = OpenAI(base_url=caddy_auth.url + "/v1", api_key=gw.user_key, max_retries=0,
                    default_headers={"Authorization": basic(USER, PASSWORD),
                                     "x-api-key": gw.user_key},
                    http_client=DefaultHttpxClient(verify=verify, trust_env=False))
    assert_one_by_one(stream_gaps(client))


# --- nginx ---------------------------------------------------------------------------------
@dataclass
class Nginx:
    url: str
    http_url: str
    cert: Path


def nginx_site(gateway_port: int, http_port: int, https_port: int, cert: Path, key: Path,
               *, buffering_default: bool = False, force_buffering: bool = False,
               htpasswd: Path | None = None) -> str:
    """deploy/nginx/teamgpu.conf with loopback ports and test certificates; each replaced
    line must occur exactly once, so a change in the shipped file breaks this test."""
    text = (DEPLOY / "nginx" / "teamgpu.conf").read_text()
    swaps = {
        "server 127.0.0.1:8080;": f"server 127.0.0.1:{gateway_port};",
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
        "/etc/ssl/teamgpu/fullchain.pem": str(cert),
        "/etc/ssl/teamgpu/privkey.pem": str(key),
    }
    if buffering_default:
        swaps["proxy_buffering off;"] = "# proxy_buffering: nginx default (on)"
    if force_buffering:
        swaps["proxy_buffering off;"] = ("proxy_buffering on; "
                                         "proxy_ignore_headers X-Accel-Buffering;")
    if htpasswd is not None:
        swaps['# auth_basic           "teamgpu";'] = 'auth_basic "teamgpu";'
        swaps["# auth_basic_user_file /etc/nginx/teamgpu.htpasswd;"] = \
            f"auth_basic_user_file {htpasswd};"
    for old, new in swaps.items():
        assert text.count(old) == 1, f"{old!r} not exactly once in teamgpu.conf"
        text = text.replace(old, new)
    return text


@contextlib.contextmanager
def run_nginx(tmp: Path, gateway_port: int, **site: object) -> Iterator[Nginx]:
    nginx = binary("nginx")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    http_port, https_port = free_port(), free_port()
    (tmp / "teamgpu.conf").write_text(
        nginx_site(gateway_port, http_port, https_port, cert, key, **site))  # type: ignore[arg-type]
    temp = "\n".join(f"  {d}_temp_path {tmp / d};" for d in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root root;\n" if os.geteuid() == 0 else ""
    (tmp / "nginx.conf").write_text(
        f"daemon off;\n{user}worker_processes 1;\npid {tmp / 'nginx.pid'};\n"
        f"error_log {tmp / 'error.log'} info;\nevents {{ worker_connections 64; }}\n"
        f"http {{\n  access_log off;\n{temp}\n  include {tmp / 'teamgpu.conf'};\n}}\n")
    cmd = [nginx, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf")]
    test = subprocess.run([*cmd, "-t"], check=False, capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    with running(cmd, dict(os.environ), tmp / "nginx.log", lambda: port_open(https_port)):
        yield Nginx(f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}", cert)


@pytest.mark.parametrize("buffering_default", [False, True],
                         ids=["shipped-config", "nginx-default-buffering"])
def test_nginx_streams_events_one_by_one(gw: Harness, tmp_path: Path,
                                         buffering_default: bool) -> None:
    """With the shipped config, and (row F1) with nginx's default proxy_buffering: the
    gateway's X-Accel-Buffering: no still makes nginx pass each event on at once."""
    port = int(gw.url.rsplit(":", 1)[1])
    with run_nginx(tmp_path, port, buffering_default=buffering_default) as n:
        client = OpenAI(base_url=n.url + "/v1", api_key=gw.user_key, max_retries=0,
                        http_client=DefaultHttpxClient(verify=ca(n.cert), trust_env=False))
        assert_one_by_one(stream_gaps(client))
        r = httpx.post(n.url + "/v1/chat/completions", json=chat_body(), verify=ca(n.cert),
                       headers={"Authorization": f"Bearer {gw.user_key}"}, trust_env=False)
        assert_stream_headers(r, accel_header=False)
        r = httpx.get(n.http_url + "/v1/models", trust_env=False)
        assert r.status_code == 301 and r.headers["location"].startswith("https://")


def test_gap_check_catches_a_buffering_proxy(gw: Harness, tmp_path: Path) -> None:
    """Negative control: nginx told to buffer and to ignore X-Accel-Buffering delivers the
    tokens in one lump, and the check above notices."""
    port = int(gw.url.rsplit(":", 1)[1])
    with run_nginx(tmp_path, port, force_buffering=True) as n:
        client = OpenAI(base_url=n.url + "/v1", api_key=gw.user_key, max_retries=0,
                        http_client=DefaultHttpxClient(verify=ca(n.cert), trust_env=False))
        arrivals = stream_gaps(client)
    with pytest.raises(AssertionError):
        assert_one_by_one(arrivals)


def test_nginx_basic_auth_and_key(gw: Harness, tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    port = int(gw.url.rsplit(":", 1)[1])
    with run_nginx(tmp_path, port, htpasswd=htpasswd) as n:
        url, verify = n.url + "/v1/models", ca(n.cert)
        r = httpx.get(url, verify=verify, trust_env=False, headers={"x-api-key": gw.user_key})
        assert r.status_code == 401 and "x-request-id" not in r.headers  # nginx's own 401
        r = httpx.get(url, verify=verify, trust_env=False,
                      headers={"Authorization": basic(USER, PASSWORD), "x-api-key": "tg-no"})
        assert r.status_code == 401 and r.headers.get("x-request-id")   # the gateway's
        r = httpx.get(url, verify=verify, trust_env=False,
                      headers={"Authorization": basic(USER, PASSWORD), "x-api-key": gw.user_key})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "fake-model"
