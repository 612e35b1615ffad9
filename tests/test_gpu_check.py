"""``scripts/gpu_check.py`` on the CPU: argument parsing, the CUDA-less refusal, the table and JSON writer, and the
``--dry-run`` path through the same check code at tiny shapes (the GPU figures themselves need a GPU)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def test_arguments(gpu_check):
    args = gpu_check.parse_args([])
    assert args.only == list(gpu_check.CHECKS) and args.json == "gpu_check.json" and not args.dry_run
    assert gpu_check.parse_args(["--only", "knn", "step", "--dry-run"]).only == ["knn", "step"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "flash"])


def test_refuses_to_run_without_cuda_unless_dry_run(gpu_check, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a host without CUDA")
    assert gpu_check.main(["--json", str(tmp_path / "out.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: no CUDA device visible") and "--dry-run" in error and "\n" not in error
    assert not (tmp_path / "out.json").exists()


def test_a_check_that_raises_is_a_failed_row_and_the_others_still_run(gpu_check, monkeypatch):
    def broken(sizes):
        raise RuntimeError("No operator found for `memory_efficient_attention_forward`\nlong details")

    monkeypatch.setitem(gpu_check.CHECK_FUNCTIONS, "attention", broken)
    rows = gpu_check.run_checks(["attention", "knn"], gpu_check.DRY)
    assert rows[0] == {"check": "attention", "setting": "-", "status": "fail", "detail": rows[0]["detail"]}
    assert rows[0]["detail"] == "RuntimeError: No operator found for `memory_efficient_attention_forward`"
    assert rows[1]["check"] == "knn" and rows[1]["status"] == "ok"
    table = gpu_check.format_table(rows).splitlines()
    assert table[0].split() == ["check", "setting", "status", "s/call", "throughput", "figure"]
    assert table[2].split()[:3] == ["attention", "-", "fail"] and "q/s" in table[3]


def test_dry_run_writes_the_table_and_json(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--only", "attention", "augment", "knn", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["machine"]["device"] == "cpu" and report["machine"]["date"]
    rows = report["rows"]
    assert [row["check"] for row in rows] == ["attention", "attention", "augment", "knn"]
    assert all(row["status"] == "ok" and row["seconds"] > 0 for row in rows)
    assert [row["setting"] for row in rows[:2]] == ["math vs sdpa float16", "math vs sdpa bfloat16"]
    assert rows[2]["img_per_s"] > 0 and rows[2]["local_crops"] == 2 * 4
    printed = capsys.readouterr().out
    assert "math vs sdpa float16" in printed and f"wrote {out}" in printed


def test_dry_run_training_steps(gpu_check):
    rows = gpu_check.check_step(gpu_check.DRY)
    assert [row["setting"] for row in rows] == ["vit_pico b2 shipped fp16", "vit_pico b2 bf16"]
    assert all(row["status"] == "ok" and row["img_per_s"] > 0 for row in rows)
    assert rows[0]["loss_scale"] is not None and rows[1]["loss_scale"] is None  # the fp16 grad scaler


def test_dry_run_static_step_check(gpu_check):
    """The ``cuda_graph`` rows: on the CPU the static step runs eagerly and its first losses match the eager
    iteration's (bf16 autocast on both sides)."""
    rows = gpu_check.check_cuda_graph(gpu_check.DRY)
    assert [row["setting"] for row in rows] == ["vit_pico bf16 eager", "vit_pico bf16 static step (no CUDA: eager)"]
    assert all(row["status"] == "ok" and row["img_per_s"] > 0 for row in rows)
    assert rows[1]["rel_loss_difference"] <= 2e-2
