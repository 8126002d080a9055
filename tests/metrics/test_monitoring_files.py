"""deploy/monitoring: the Grafana dashboard refers only to metrics that exist.

Gateway names come from what GatewayMetrics renders with every series populated; vLLM
names from a real scrape of vLLM 0.32 (CPU) with the demo model
(``data/vllm-0.32-cpu-metrics.txt``, taken on this machine); DCGM names from
dcgm-exporter's default counters (``etc/default-counters.csv``; DCGM is not run here).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from teamgpu.batch import JobStats
from teamgpu.metrics import GatewayMetrics, NvmlSampler

from .exposition import names
from .fake_nvml import FakeNvml

REPO = Path(__file__).resolve().parents[2]
MON = REPO / "deploy" / "monitoring"
DASHBOARD = MON / "grafana" / "dashboards" / "teamgpu.json"
VLLM_SCRAPE = Path(__file__).parent / "data" / "vllm-0.32-cpu-metrics.txt"

#: dcgm-exporter etc/default-counters.csv (the fields it exports without configuration)
DCGM_DEFAULT = {
    "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_MEMORY_TEMP",
    "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_ENC_UTIL", "DCGM_FI_DEV_DEC_UTIL", "DCGM_FI_DEV_XID_ERRORS",
    "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
    "DCGM_FI_DEV_VGPU_LICENSE_STATUS", "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_ROW_REMAP_FAILURE",
}

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}


def gateway_names() -> set[str]:
    """Every sample and family name GatewayMetrics renders, every series populated."""
    model = {"name": "m", "state": "ready", "in_flight": 1, "queued": 1,
             "starts": {"count": 1, "last_wait_s": 1.0, "waiting": 0}}
    job: JobStats = {"id": "batch_1", "user": "u", "endpoint": "/v1/chat/completions",
                     "status": "in_progress",
                     "items": {"total": 3, "queued": 1, "in_flight": 1, "done": 1, "failed": 0},
                     "tokens": {"prompt": 1, "completion": 1, "total": 2}, "started_at": 1.0,
                     "finished_at": None, "eta_s": 2.0, "paused_until": None}
    m = GatewayMetrics(queue_depth=lambda: {"high": 1}, inflight=lambda: {"http://b": 1},
                       backend_up=lambda: {"http://b": True}, gpu=NvmlSampler(nvml=FakeNvml()),
                       models=lambda: [model], batches=lambda: [job])
    m.request_done(user="u", model="m", endpoint="completions", priority="high", status=200,
                   prompt_tokens=1, completion_tokens=1, ttft_s=0.1, duration_s=0.2,
                   queue_wait_s=0.0)
    m.inter_token(model="m", priority="high", gap_s=0.01)
    m.rate_limited(user="u", limit="requests")
    return names(m.render()[0].decode())


def vllm_names() -> set[str]:
    return names(VLLM_SCRAPE.read_text())


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    e = re.sub(r"\$__\w+|\$\{?\w+\}?", "1m", expr)          # Grafana variables
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', e)               # strings
    e = re.sub(r"\{[^}]*\}", "", e)                          # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                         # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    found = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(?!\s*\()", e):
        word = m.group(1)
        if word.lower() not in PROMQL_WORDS:
            found.add(word)
    return found


def exprs(dashboard: dict[str, Any]) -> list[str]:
    out = []
    for p in dashboard["panels"]:
        for inner in [p, *p.get("panels", [])]:
            out += [t["expr"] for t in inner.get("targets", []) if t.get("expr")]
    return out


def test_the_name_extraction_itself() -> None:
    assert metric_names('histogram_quantile(0.95, sum by (le, priority) '
                        '(rate(teamgpu_ttft_bucket{priority="high"}[$__rate_interval])))'
                        ) == {"teamgpu_ttft_bucket"}
    assert metric_names("DCGM_FI_DEV_FB_USED * 1024 * 1024") == {"DCGM_FI_DEV_FB_USED"}
    assert metric_names("avg_over_time((sum(a_b) > bool 0)[1h:1m])") == {"a_b"}
    assert metric_names("rate(vllm:prompt_tokens_total[5m])") == {"vllm:prompt_tokens_total"}


def test_grafana_dashboard_is_valid_json_and_names_only_existing_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "teamgpu"
    known = gateway_names() | vllm_names() | DCGM_DEFAULT
    used: set[str] = set()
    for e in exprs(dashboard):
        found = metric_names(e)
        assert found, f"no metric in {e!r}"
        unknown = found - known
        assert not unknown, f"{e!r} refers to metrics nobody exports: {sorted(unknown)}"
        used |= found
    # the views the issue asks for are all there
    for name in ("teamgpu_queue_depth", "teamgpu_inflight_requests", "teamgpu_backend_up",
                 "teamgpu_tokens_total", "teamgpu_requests_total", "teamgpu_rate_limited_total",
                 "teamgpu_time_to_first_token_seconds_bucket",
                 "teamgpu_queue_wait_seconds_bucket", "teamgpu_request_duration_seconds_bucket",
                 "teamgpu_inter_token_latency_seconds_bucket",
                 "teamgpu_gpu_utilization_percent", "teamgpu_gpu_memory_used_bytes",
                 "teamgpu_model_state", "teamgpu_model_inflight_requests",
                 "teamgpu_model_queue_depth", "teamgpu_model_starts_total",
                 "teamgpu_batch_items", "teamgpu_batch_eta_seconds", "teamgpu_batch_jobs",
                 "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting",
                 "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"):
        assert name in used, name


def test_every_panel_uses_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_vllm_scrape_has_the_names_environment_md_lists() -> None:
    v = vllm_names()
    for n in ("vllm:num_requests_running", "vllm:num_requests_waiting",
              "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total",
              "vllm:time_to_first_token_seconds_bucket"):
        assert n in v


def _jobs(name: str) -> dict[str, Any]:
    cfg = yaml.safe_load((MON / name).read_text())
    return {j["job_name"]: j for j in cfg["scrape_configs"]}


def _targets(job: dict[str, Any]) -> list[str]:
    return [t for sc in job["static_configs"] for t in sc["targets"]]


def test_prometheus_scrapes_gateway_vllm_and_dcgm_in_compose() -> None:
    """prometheus.yml is what deploy/compose.yaml mounts: Compose service names."""
    jobs = _jobs("prometheus.yml")
    assert set(jobs) == {"teamgpu", "vllm", "dcgm"}
    assert jobs["teamgpu"]["metrics_path"] == "/metrics"
    assert _targets(jobs["teamgpu"]) == ["gateway:8080"]
    assert _targets(jobs["vllm"]) == ["vllm:8000"]
    assert _targets(jobs["dcgm"]) == ["dcgm-exporter:9400"]


def test_prometheus_scrapes_gateway_vllm_and_dcgm_on_a_host() -> None:
    """prometheus.host.yml: `teamgpu up` on the host, engine on a fixed loopback port."""
    jobs = _jobs("prometheus.host.yml")
    assert set(jobs) == {"teamgpu", "vllm", "dcgm"}
    assert _targets(jobs["teamgpu"]) == ["127.0.0.1:8080"]
    assert _targets(jobs["vllm"]) == ["127.0.0.1:8001"]
    assert _targets(jobs["dcgm"]) == ["127.0.0.1:9400"]
    assert "--engine-port 8001" in (MON / "prometheus.host.yml").read_text()


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    ds = yaml.safe_load((MON / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    assert ds["datasources"][0]["uid"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((MON / "grafana/provisioning/dashboards/teamgpu.yml").read_text())
    assert prov["providers"][0]["type"] == "file"
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/teamgpu"


def test_every_gateway_metric_is_in_the_docs_table() -> None:
    """docs/observability.md's metrics table has a row for each family /metrics may show."""
    doc = (REPO / "docs" / "observability.md").read_text()
    documented = set(re.findall(r"^\| `(teamgpu_\w+)` \|", doc, flags=re.MULTILINE))
    m = GatewayMetrics(redis_errors=lambda: {"limiter": 0})
    families = {line.split()[2] for line in m.render()[0].decode().splitlines()
                if line.startswith("# TYPE ")}
    exported = {n for n in gateway_names() | families
                if n.startswith("teamgpu_") and n.split("_")[-1] not in ("bucket", "count",
                                                                            "sum")}
    assert exported <= documented, sorted(exported - documented)
    assert {"teamgpu_model_state", "teamgpu_batch_items", "teamgpu_batch_jobs"} <= exported
