"""The dashboard in real headless Chromium against a real agent: the rendered tiles show the
numbers ``GET /v1/metrics`` reports (the agent runs on a frozen clock, so both read the
same window), charts and the KV level bar are drawn, dark mode applies."""

from __future__ import annotations

import json
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests

from lemonade_inferos.agent.server import BackgroundAgent
from lemonade_inferos.types import KVStats, RunStats

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "dash-token-" + "d" * 24
NOW = float(int(time.time()))  # the agent's frozen clock

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed at /usr/bin/chromium"),
]


class ElementsById(HTMLParser):
    """Collects every element that has an id: its attributes and its direct text."""

    def __init__(self) -> None:
        super().__init__()
        self.el: dict[str, dict] = {}
        self._stack: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag in ("meta", "link", "br", "img", "input"):
            return
        self._stack.append(a.get("id"))
        if a.get("id"):
            self.el[a["id"]] = {"tag": tag, "attrs": a, "text": ""}

    def handle_endtag(self, tag: str) -> None:
        if tag in ("meta", "link", "br", "img", "input"):
            return
        if self._stack:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        for i in reversed(self._stack):
            if i:
                self.el[i]["text"] += data
                return


def chromium(url: str, tmp: Path, *extra: str) -> str:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000", "--window-size=1280,1400", *extra, url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def render(url: str, tmp: Path) -> dict[str, dict]:
    p = ElementsById()
    p.feed(chromium(url, tmp, "--dump-dom"))
    return p.el


def fmt(v, kind: str) -> str:
    """The dashboard's number formats (see static/dashboard.js)."""
    if v is None:
        return "—"
    return {"f1": f"{v:.1f}", "f2": f"{v:.2f}", "f3": f"{v:.3f}", "int": str(round(v)),
            "mb": f"{v:.3f}" if v < 10 else f"{v:.1f}", "signed3": f"{v:+.3f}", "pct": f"{round(v * 100)}%"}[kind]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("dash_state")
    with BackgroundAgent(state_dir=state, token=TOKEN, clock=lambda: NOW) as a:
        for i in range(30):
            base = i % 6 == 0
            s = RunStats(
                request_id=f"d{i}", model="stories260K", start_time=NOW - 40 + i, end_time=NOW - 39.4 + i,
                prompt_tokens=20 + i, generated_tokens=48 + i % 5, ttft_ms=12.5 + (i * 7) % 11, total_ms=600.0 + 10 * i,
                decode_tps=90.0 + i % 9, peak_rss_bytes=300_000_000 + 1_000_000 * (i % 3), prompt_nll=2.1 + 0.01 * (i % 4),
                baseline=base, policy_name="baseline" if base else "default", prompt_hash="aa" if i % 3 == 0 else "bb",
                kv=KVStats(tokens=70, total_bytes=(180_000 if base else 52_000 + 100 * i), fp16_bytes=90_000,
                           fp32_bytes=180_000, level_distribution={} if base else {"L0": 280, "L1": 40, "L2": 120, "L3": 60},
                           store="fp32" if base else "tiered"),
            )
            r = requests.post(a.url + "/v1/stats", json={**s.to_dict(), "instance": f"dash-{i % 2}"},
                              headers={"X-Inferos-Token": TOKEN})
            assert r.status_code == 201, r.text
        yield a


TILES = {
    "tps-value": ("throughput.tokens_per_second", "f1"),
    "rps-value": ("throughput.requests_per_second", "f2"),
    "window-count": ("measurement_window.sample_count", "int"),
    "ttft-value": ("first_token_latency.mean_ms", "f1"),
    "ttft-median": ("first_token_latency.median_ms", "f1"),
    "ttft-p95": ("first_token_latency.p95_ms", "f1"),
    "kv-value": ("memory.kv_cache_usage_mb", "mb"),
    "kv-compression": ("kv_stats.compression_ratio", "f2"),  # KV/fp16, the convention of every report
    "dppl-value": ("quality.delta_ppl_est.delta", "signed3"),
    "ppl-current": ("quality.delta_ppl_est.current", "f3"),
    "ppl-baseline": ("quality.delta_ppl_est.baseline", "f3"),
    "latency-p95": ("latency.p95_ms", "f1"),
    "rss-total": ("memory.total_allocated_mb", "mb"),
    "rss-peak": ("memory.peak_usage_mb", "mb"),
    "reports-total": ("counters.reports_total", "int"),
    "instances": ("measurement_window.instances", "int"),
}


def lookup(doc: dict, path: str):
    for part in path.split("."):
        doc = doc[part]
    return doc


def test_tiles_show_the_agent_metrics(agent: BackgroundAgent, tmp_path: Path) -> None:
    el = render(agent.url + "/dashboard", tmp_path)
    assert el["conn"]["attrs"]["data-conn"] == "live"
    m = requests.get(agent.url + "/v1/metrics").json()
    assert m["measurement_window"]["sample_count"] == 30 and m["quality"]["delta_ppl_est"]["delta"] is not None
    checked = 0
    for el_id, (path, kind) in TILES.items():
        expected = lookup(m, path)
        assert json.loads(el[el_id]["attrs"]["data-value"]) == expected, el_id
        assert el[el_id]["text"].strip() == fmt(expected, kind), el_id
        checked += 1
    assert checked == len(TILES)
    # a few spelled out, so a formatting slip in both places cannot hide
    assert el["reports-total"]["text"] == "30"
    assert el["window-count"]["text"] == "30"
    assert el["tps-value"]["text"] == f"{m['throughput']['tokens_per_second']:.1f}"
    # the policy pill and the device meters
    assert el["policy-name"]["text"] == "default" and el["policy-version"]["text"] == f"v{m['optimization_status']['policy_version']}"
    cpu = el["dev-cpu"]
    assert "na" not in cpu["attrs"].get("class", "")
    assert el["dev-npu"]["attrs"]["class"] == "na" and "not available on this platform" in el["dev-npu"]["attrs"]["title"]
    assert el["pool"]["attrs"]["data-available"] == "false"
    assert float(el["updated"]["attrs"]["data-value"]) == m["unix_time"] == NOW


def test_charts_and_kv_levels_are_drawn(agent: BackgroundAgent, tmp_path: Path) -> None:
    dom = chromium(agent.url + "/v1/dashboard", tmp_path, "--dump-dom")
    el = ElementsById()
    el.feed(dom)
    for chart in ("chart-tps", "chart-ttft", "chart-kv"):
        assert el.el[chart]["attrs"]["data-points"] == "30", chart
    assert dom.count('class="line"') == 3 and dom.count("<path") >= 6
    levels = requests.get(agent.url + "/v1/metrics").json()["kv_stats"]["level_distribution"]
    assert levels == {"L0": 25 * 280, "L1": 25 * 40, "L2": 25 * 120, "L3": 25 * 60}
    assert el.el["kv-levels"]["attrs"]["data-total"] == str(sum(levels.values()))
    for level, n in levels.items():
        assert f'data-level="{level}" data-value="{n}"' in dom
    assert el.el["dev-cpu"]["attrs"].get("title") == ""
    assert 'class="fill" style="width:' in dom  # the CPU meter was sized (CSP allows CSSOM styles)
    assert '<body data-state="ready"' in dom


def test_dark_mode_and_screenshot(agent: BackgroundAgent, tmp_path: Path) -> None:
    dom = chromium(agent.url + "/dashboard?theme=dark", tmp_path, "--dump-dom")
    assert '<html lang="en" data-theme="dark">' in dom
    assert 'data-theme-choice="dark"' in dom
    css = requests.get(agent.url + "/dashboard/static/dashboard.css").text
    assert "prefers-color-scheme: dark" in css and ':root[data-theme="dark"]' in css
    shot = tmp_path / "dashboard-dark.png"
    chromium(agent.url + "/dashboard?theme=dark", tmp_path, f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_page_is_self_contained(agent: BackgroundAgent) -> None:
    html = requests.get(agent.url + "/dashboard").text
    js = requests.get(agent.url + "/dashboard/static/dashboard.js").text
    for text in (html, js):
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text
    r = requests.get(agent.url + "/dashboard")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert requests.get(agent.url + "/dashboard/static/../app.py").status_code == 404
