"""scripts/benchmark.py: a quick run writes well-formed rows; bad input gives one clear error line.

No timing is asserted (the machine is shared); the rows' keys, types and signs are.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark.py"


def _run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_step_writes_machine_and_rows(tmp_path):
    out = tmp_path / "bench.json"
    result = _run("--quick", "--only", "step", "--json", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    machine = report["machine"]
    assert machine["device"] == "cpu"
    assert _positive(machine["matmul_gflops_fp32_cpu"])
    assert machine["torch_threads"] >= 1 and machine["cpu"]
    rows = report["rows"]
    assert rows and report["compare_reference"] == []
    for row in rows:
        assert row["module"] == "step" and row["workload"].startswith("train_step_")
        for key in ("seconds", "img_per_s", "gflops", "peak_mem_mb", "pct_of_matmul", "tflop_per_step"):
            assert _positive(row[key]), (key, row[key])
        assert row["img_per_s"] == pytest.approx(int(row["workload"].rsplit("_b", 1)[1]) / row["seconds"])
    assert "train_step_" in result.stdout and "GFLOP/s" in result.stdout


def test_missing_reference_dir_is_one_clear_error(tmp_path):
    missing = tmp_path / "no_such_checkout"
    result = _run("--only", "none", "--compare-reference", str(missing), timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(missing) in lines[0] and "not a checkout of the official Franca code" in lines[0]
    assert "Traceback" not in result.stderr


def test_unknown_workload_is_one_clear_error():
    result = _run("--only", "no_such_workload", timeout=60)
    assert result.returncode != 0
    assert (
        result.stderr.strip().splitlines() == [result.stderr.strip()]
        and "unknown workload(s) ['no_such_workload']" in result.stderr
    )


def test_device_peaks_table():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import benchmark
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert benchmark.device_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert benchmark.device_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert benchmark.device_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert benchmark.device_peak_tflops("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    assert benchmark.device_peak_tflops("Tesla T4") is None


def test_xformers_stand_in_block_diagonal_attention_matches_per_sequence():
    import torch
    import torch.nn.functional as F

    from benchmarks.reference_shims import BlockDiagonalMask, _memory_efficient_attention

    torch.manual_seed(0)
    crops = [torch.randn(2, 5, 2, 4), torch.randn(3, 3, 2, 4)]  # (batch, tokens, heads, head dim)
    mask, packed = BlockDiagonalMask.from_tensor_list(crops)
    assert packed.shape == (1, 2 * 5 + 3 * 3, 2, 4) and mask.runs() == [(2, 5), (3, 3)]
    assert all(torch.equal(a, b) for a, b in zip(mask.split(packed), crops))
    out = mask.split(_memory_efficient_attention(packed, packed, packed, attn_bias=mask))
    for crop, got in zip(crops, out):
        x = crop.transpose(1, 2)
        torch.testing.assert_close(got, F.scaled_dot_product_attention(x, x, x).transpose(1, 2))


OFFICIAL = Path("/work/ref/Franca")


@pytest.mark.slow
@pytest.mark.skipif(not (OFFICIAL / "franca" / "train" / "ssl_meta_arch.py").is_file(), reason="no official checkout")
def test_compare_reference_runs_both_sides_on_the_official_checkout():
    from benchmarks.compare_reference import compare

    rows = compare(OFFICIAL, only=["sinkhorn"], repeats=2, threads=1, quick=True, log=lambda _: None)
    (row,) = rows
    assert "error" not in row, row.get("error")
    assert row["workload"] == "compare/sinkhorn" and row["target"] == 0.7
    assert len(row["times"]["ours"]) == len(row["times"]["official"]) == 2
    assert row["ratio"] == pytest.approx(row["seconds"] / row["official_seconds"])
    assert _positive(row["peak_mem_mb"]) and _positive(row["official_peak_mem_mb"])
