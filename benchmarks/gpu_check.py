"""Helpers of ``benchmarks/gpu_check.sh`` (issue 15's prepared GPU check): environment report, packing the embedded
model to travel without its text encoder's weights, the travel-size estimate, and the merge of the stages' JSON into
one result file with a short table.

    python3 benchmarks/gpu_check.py env OUT.json
    python3 benchmarks/gpu_check.py pack-model SRC DST        # here: the model folder minus text-encoder weights
    python3 benchmarks/gpu_check.py unpack-model SRC DST      # there: the same folder, text encoder seeded random
    python3 benchmarks/gpu_check.py travel-size [PATH ...]    # bytes the device tool would send (+ carried PATHs)
    python3 benchmarks/gpu_check.py merge WORK OUT.json       # WORK/stages.jsonl + WORK/*.json -> OUT.json, table

Only the standard library at import time: ``merge`` and ``travel-size`` run without torch.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKED_MARKER = "gpu_check_packed.json"
TEXT_ENCODER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TRAVEL_LIMIT_BYTES = 64 * 2**20
MEASURED_STAGES = ("sd", "sd_compiled", "embedded")
SETTINGS = ("paper", "fast")
GOALS = {"paper": 0.7, "fast": 0.25}  # end-to-end seconds on an H100/H200 (issue 15)
SPEEDUP_GOAL = 1.7  # over plain diffusers fp16 with SDPA


# ----------------------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------------------
def env_report() -> dict[str, Any]:
    """Python, torch, CUDA device and library versions as this interpreter sees them; ``missing`` lists the
    modules the check needs that do not import."""
    report: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                              "platform": platform.platform(), "cpu_count": os.cpu_count(), "missing": []}
    for name in ("torch", "diffusers", "transformers", "pydicom", "PIL", "scipy", "safetensors", "pytest"):
        try:
            module = __import__(name)
            report[name] = str(getattr(module, "__version__", "?"))
        except Exception as e:  # noqa: BLE001 - any import failure is a finding
            report["missing"].append(f"{name}: {type(e).__name__}: {e}")
    try:
        import torch

        report["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            report["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                             "capability": f"{props.major}.{props.minor}",
                             "multiprocessors": props.multi_processor_count,
                             "bf16_supported": torch.cuda.is_bf16_supported(), "cuda": torch.version.cuda}
    except ImportError:
        report["cuda_available"] = False
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
        report["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        report["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    return report


# ----------------------------------------------------------------------------------------------------------------
# the embedded model, packed to travel
# ----------------------------------------------------------------------------------------------------------------
def pack_model(src: Path, dst: Path) -> dict[str, Any]:
    """Copy the model folder ``src`` to ``dst`` without the text encoder's weights (45 MB of vald-md-mini's 70 MB),
    with a marker file saying so. UNet, autoencoder, scheduler, tokenizer and every config travel unchanged.

    The text encoder runs once per prompt in a review run (the engine caches prompt embeddings) and its speed does
    not depend on its weights' values, so a seeded random encoder of the same configuration times the same.
    """
    src, dst = Path(src), Path(dst)
    if not (src / "model_index.json").is_file():
        raise SystemExit(f"pack-model: '{src}' is not a model folder (no model_index.json)")
    if dst.exists():
        shutil.rmtree(dst)
    left_out: list[str] = []

    def ignore(folder: str, names: list[str]) -> list[str]:
        if Path(folder).name != "text_encoder":
            return []
        skipped = [n for n in names if n in TEXT_ENCODER_WEIGHTS]
        left_out.extend(f"text_encoder/{n}" for n in skipped)
        return skipped

    shutil.copytree(src, dst, ignore=ignore)
    marker = {"packed_from": str(src), "left_out": left_out,
              "why": "the device tool sends at most 64 MiB of working tree; the text encoder's weights are "
                     "rebuilt there with seeded random values of the same configuration (timing only)"}
    (dst / PACKED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return {"bytes": tree_bytes(dst), **marker}


def unpack_model(src: Path, dst: Path) -> dict[str, Any]:
    """A loadable copy of the packed folder ``src`` in ``dst``: the text encoder written with seeded random weights
    (float16, as the packed configuration's) from its ``config.json``."""
    import torch
    from transformers import AutoConfig, AutoModel

    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    config = AutoConfig.from_pretrained(dst / "text_encoder", local_files_only=True)
    torch.manual_seed(0)
    try:
        encoder = AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        encoder = AutoModel.from_config(config)
    encoder.eval().to(torch.float16).save_pretrained(dst / "text_encoder", safe_serialization=True)
    return {"path": str(dst), "text_encoder": f"{type(encoder).__name__}, seeded random weights (timing only)"}


def tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def travel_bytes(root: Path, carried: list[Path]) -> dict[str, Any]:
    """What the device tool would send from ``root``: tracked files and untracked files git does not ignore, plus
    the ``carried`` paths; against its 64 MiB limit. Biggest contributors listed."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout.decode()
    sizes: dict[str, int] = {}
    for rel in filter(None, out.split("\0")):
        f = root / rel
        if f.is_file():
            top = "/".join(Path(rel).parts[:2]) if rel.startswith("model_weights/") else Path(rel).parts[0]
            sizes[top] = sizes.get(top, 0) + f.stat().st_size
    for path in carried:
        if path.exists():
            sizes[f"{path.name} (carried)"] = tree_bytes(path) if path.is_dir() else path.stat().st_size
    total = sum(sizes.values())
    biggest = dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:6])
    return {"total_bytes": total, "limit_bytes": TRAVEL_LIMIT_BYTES, "fits": total <= TRAVEL_LIMIT_BYTES,
            "biggest_bytes": biggest}


# ----------------------------------------------------------------------------------------------------------------
# merging the stages
# ----------------------------------------------------------------------------------------------------------------
def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def junit_counts(path: Path) -> dict[str, int]:
    """passed / failed / errors / skipped from a pytest ``--junitxml`` file (zeros when it is absent)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    if not path.is_file():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        key = ("failed" if "failure" in kinds else "errors" if "error" in kinds
               else "skipped" if "skipped" in kinds else "passed")
        counts[key] += 1
    return counts


def stage_results(path: Path) -> dict[str, dict[str, Any]]:
    """setting -> result object, from a ``review_vs_diffusers.py --json`` file (one setting or ``results``)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {r["setting"]: r for r in data.get("results", [data])}


def summarise(work: Path) -> dict[str, Any]:
    """The final result object: stage statuses, environment, full per-stage results, a flat ``summary`` of numbers
    (``STAGE.SETTING.METRIC``, seconds unless the name says otherwise) and the issue's goals checked."""
    stages: dict[str, dict[str, Any]] = {}
    stages_file = work / "stages.jsonl"
    if stages_file.is_file():
        for line in stages_file.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                stages[rec.pop("stage")] = rec
    meta = json.loads((work / "meta.json").read_text()) if (work / "meta.json").is_file() else {}
    summary: dict[str, float] = {}
    for key in ("budget_s", "wall_s"):
        if _number(meta.get(key)) is not None:
            summary[key] = float(meta[key])
    if "tests" in stages:
        for k, v in junit_counts(work / "tests.xml").items():
            summary[f"tests_{k}"] = float(v)
    results: dict[str, dict[str, Any]] = {}
    for stage in MEASURED_STAGES:
        per_setting = stage_results(work / f"{stage}.json")
        if per_setting:
            results[stage] = per_setting
        for setting, r in per_setting.items():
            metrics = {"review_s": r["review_s"]["median"], "plain_s": r["plain_s"]["median"],
                       "speedup": r.get("speedup_plain_over_review"),
                       "first_progress_s": r["first_progress_s"]["median"],
                       "per_step_ms": r.get("per_denoising_step_ms"),
                       "warmup_s": r.get("warmup_s"), "cuda_mem_mib": r.get("cuda_max_memory_allocated_mib")}
            for name, value in metrics.items():
                if _number(value) is not None:
                    summary[f"{stage}.{setting}.{name}"] = float(value)
    # the goals are an H100/H200's: a dry run (CPU, tiny model) checks the plumbing only
    return {"schema": 1, "meta": meta, "stages": stages,
            "env": json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {},
            "summary": summary, "goals": goals(summary) if meta.get("mode") == "run" else {}, "results": results}


def goals(summary: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Issue 15's GPU goals against the SD-sized stages (the faster of eager and compiled): the paper's request
    <= 0.7 s and the fast preset <= 0.25 s end to end, and >= 1.7x the plain diffusers fp16 call."""
    out: dict[str, dict[str, Any]] = {}
    for setting, limit in GOALS.items():
        found = [(summary[f"{s}.{setting}.review_s"], s) for s in ("sd", "sd_compiled")
                 if f"{s}.{setting}.review_s" in summary]
        if not found:
            continue
        value, stage = min(found)
        speedup = summary.get(f"{stage}.{setting}.speedup")
        out[f"{setting}_end_to_end"] = {"stage": stage, "value_s": value, "target_s": limit, "met": value <= limit}
        if speedup is not None:
            out[f"{setting}_speedup"] = {"stage": stage, "value": speedup, "target": SPEEDUP_GOAL,
                                         "met": speedup >= SPEEDUP_GOAL}
    return out


def table(result: dict[str, Any]) -> str:
    """A short text table: stage statuses, then review run vs plain call per stage and setting, then the goals."""
    lines = ["stage         status    seconds  budget"]
    for name, st in result["stages"].items():
        lines.append(f"{name:<13} {st.get('status', '?'):<9} {st.get('seconds', 0):>7.1f} {st.get('budget_s', 0):>7}")
    s = result["summary"]
    if "tests_passed" in s:
        lines.append("GPU tests: " + ", ".join(f"{int(s[f'tests_{k}'])} {k}"
                                               for k in ("passed", "failed", "errors", "skipped")))
    lines += ["", "stage.setting          review s  plain s  speedup  step ms  first progress ms"]
    for stage in MEASURED_STAGES:
        for setting in SETTINGS:
            key = f"{stage}.{setting}"
            if f"{key}.review_s" not in s:
                continue
            lines.append(f"{key:<22} {s[f'{key}.review_s']:>8.3f} {s[f'{key}.plain_s']:>8.3f} "
                         f"{s.get(f'{key}.speedup', float('nan')):>8.2f} "
                         f"{s.get(f'{key}.per_step_ms', float('nan')):>8.2f} "
                         f"{1e3 * s.get(f'{key}.first_progress_s', float('nan')):>18.0f}")
    if result["meta"].get("mode") != "run":
        lines.append("goals: not checked in a dry run (they are an H100's or H200's)")
    for name, g in result["goals"].items():
        value = g.get("value_s", g.get("value"))
        target = g.get("target_s", g.get("target"))
        lines.append(f"goal {name}: {value:.3f} vs {target} ({g['stage']}): {'met' if g['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write(__doc__ or "")
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "env" and len(rest) == 1:
        Path(rest[0]).write_text(json.dumps(env_report(), indent=2) + "\n")
        return 0
    if cmd == "pack-model" and len(rest) == 2:
        sys.stdout.write(json.dumps(pack_model(Path(rest[0]), Path(rest[1])), indent=2) + "\n")
        return 0
    if cmd == "unpack-model" and len(rest) == 2:
        sys.stdout.write(json.dumps(unpack_model(Path(rest[0]), Path(rest[1])), indent=2) + "\n")
        return 0
    if cmd == "travel-size":
        sys.stdout.write(json.dumps(travel_bytes(ROOT, [ROOT / p for p in rest]), indent=2) + "\n")
        return 0
    if cmd == "merge" and len(rest) == 2:
        result = summarise(Path(rest[0]))
        out = Path(rest[1])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        sys.stdout.write(table(result) + "\n")
        return 0
    sys.stderr.write(f"gpu_check.py: unknown command {' '.join(argv)!r}\n\n{__doc__}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
