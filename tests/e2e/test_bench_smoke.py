"""The benchmark still runs (tiny counts; no timing is asserted: figures come from make bench)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "run.py"


@pytest.mark.slow
def test_bench_smoke(short_dir: Path) -> None:
    out = short_dir / "results.json"
    result = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    for key in ("one_client", "concurrent", "create_contexts_per_s", "cli_ms",
                "ratio_fetch_p50_vs_floor", "ratio_fetch_throughput_vs_floor",
                "ratio_fetch_10k_vs_10_p50", "ratio_status_vs_python",
                "ratio_fetch_max_uses_vs_unlimited_p50", "ratio_fetch_identity_vs_token_p50",
                "ratio_run_masked_vs_unmasked_throughput", "run_start_ms",
                "ratio_run_masked_vs_cat_throughput", "mcp_proxy_mib_per_s",
                "ratio_mcp_proxy_masked_vs_unmasked_throughput",
                "ratio_mcp_proxy_masked_vs_cat_throughput",
                "ratio_create_8_clients_vs_1", "ratio_import_client_vs_python",
                "ratio_fetch_raw_client_p50_vs_floor_raw_client",
                "ratio_fetch_metrics_on_vs_off_p50", "metrics_scrape_bytes"):
        assert key in rows, key
    assert set(rows["one_client"]) == {"floor", "floor_blocking", "floor_anyio",
                                       "floor_raw_client", "fetch_raw_client", "fetch", "fetch_10k",
                                       "fetch_max_uses", "fetch_identity", "fetch_metrics_on"}
    assert "ratio_fetch_p50_vs_blocking_floor" in rows
    assert "ratio_fetch_p50_vs_anyio_floor" in rows
    assert rows["client_import_loads"] == []
