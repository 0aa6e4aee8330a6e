"""Issue 15's prepared GPU check (``benchmarks/gpu_check.sh``): its CPU dry run end to end, the embedded model's
packing for the device tool's 64 MiB, the merge of the stages into one JSON, and the docs' device call."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _helper():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(setting: str, review: float, plain: float) -> dict:
    """A review_vs_diffusers.py result object, reduced to what the merge reads."""
    return {"setting": setting, "review_s": {"median": review}, "plain_s": {"median": plain},
            "speedup_plain_over_review": round(plain / review, 3), "first_progress_s": {"median": 0.02},
            "per_denoising_step_ms": 9.5, "warmup_s": 1.0, "cuda_max_memory_allocated_mib": 2500.0}


def test_merge_summarises_stages_and_checks_the_goals(tmp_path):
    gc = _helper()
    (tmp_path / "meta.json").write_text(json.dumps({"mode": "run", "budget_s": 450, "wall_s": 400}))
    (tmp_path / "stages.jsonl").write_text(
        '{"stage": "sd", "status": "ok", "seconds": 50.0, "budget_s": 120, "rc": 0, "note": ""}\n'
        '{"stage": "sd_compiled", "status": "timeout", "seconds": 180.0, "budget_s": 180, "rc": 124, "note": "x"}\n')
    (tmp_path / "sd.json").write_text(json.dumps({"results": [_result("paper", 0.65, 1.3),
                                                              _result("fast", 0.3, 0.45)]}))
    # a stage stopped at its limit after its first setting left a one-setting file
    (tmp_path / "sd_compiled.json").write_text(json.dumps({"results": [_result("paper", 0.5, 1.0)]}))
    out = gc.summarise(tmp_path)
    assert out["stages"]["sd_compiled"]["status"] == "timeout"
    assert out["summary"]["sd.paper.review_s"] == 0.65 and out["summary"]["sd_compiled.paper.review_s"] == 0.5
    assert "sd_compiled.fast.review_s" not in out["summary"]
    g = out["goals"]
    assert g["paper_end_to_end"] == {"stage": "sd_compiled", "value_s": 0.5, "target_s": 0.7, "met": True}
    assert g["paper_speedup"]["met"] is True and g["paper_speedup"]["value"] == 2.0
    assert g["fast_end_to_end"]["met"] is False and g["fast_speedup"]["met"] is False  # 0.3 s; 1.5x
    text = gc.table(out)
    assert "sd_compiled   timeout" in text and "goal fast_end_to_end: 0.300 vs 0.25 (sd): NOT met" in text


def test_pack_leaves_out_the_text_encoder_weights_and_unpack_makes_a_loadable_model(tmp_path):
    from app.engine import CounterfactualEngine
    from tests.tiny_model import write_tiny_model

    gc = _helper()
    folder = write_tiny_model(tmp_path / "tiny")
    packed = gc.pack_model(folder, tmp_path / "packed")
    assert packed["left_out"] == ["text_encoder/model.safetensors"]
    assert not (tmp_path / "packed" / "text_encoder" / "model.safetensors").exists()
    assert (tmp_path / "packed" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    gc.unpack_model(tmp_path / "packed", tmp_path / "unpacked")
    eng = CounterfactualEngine(tmp_path / "unpacked", device="cpu")
    assert eng.info.parameters_m == CounterfactualEngine(folder, device="cpu").info.parameters_m


def test_the_docs_give_the_scripts_device_call():
    call = re.search(r"^#\s+(run\(command=.*\))$", SCRIPT.read_text(), flags=re.M)
    assert call, "the script's header names its device-tool call"
    perf = (ROOT / "docs" / "PERFORMANCE.md").read_text()
    section = perf.split("## Prepared GPU check", 1)[1].split("\n## ", 1)[0]
    assert call.group(1) in section
    assert "64 MiB" in section and "--dry-run" in section and "--prepare" in section


@pytest.mark.slow
def test_dry_run_writes_one_json_of_numbers(tmp_path):
    """The whole script on the CPU with tiny sizes (about a minute on 2 cores): every stage ends well and the
    summary holds a finite number for every stage, setting and metric the device run reports."""
    out = tmp_path / "out" / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage.setting" in proc.stdout and "goals: not checked in a dry run" in proc.stdout
    assert out.with_suffix(".log").is_file()
    result = json.loads(out.read_text())
    assert set(result) == {"schema", "meta", "stages", "env", "summary", "goals", "results"}
    assert {s["status"] for s in result["stages"].values()} == {"ok"}
    assert result["env"]["missing"] == []
    summary = result["summary"]
    assert all(isinstance(v, float) and math.isfinite(v) for v in summary.values()), summary
    stages = ["sd", "sd_compiled"] + (["embedded"] if (ROOT / "model_weights/vald-md-mini/unet").is_dir() else [])
    expected = {f"{stage}.{setting}.{metric}"
                for stage in stages for setting in (["fast"] if stage == "embedded" else ["paper", "fast"])
                for metric in ("review_s", "plain_s", "speedup", "first_progress_s", "per_step_ms")}
    expected |= {"budget_s", "wall_s", "tests_passed", "tests_failed", "tests_errors", "tests_skipped"}
    assert expected <= set(summary), expected - set(summary)
    assert summary["wall_s"] < summary["budget_s"]
    assert all(summary[k] > 0 for k in expected if k.endswith(("review_s", "plain_s", "speedup")))
    assert result["results"]["sd"]["paper"]["parameters"]["steps"] == 75
