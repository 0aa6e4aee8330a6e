"""The import graph is the architecture (shared/STYLE.md): read every module's imports and check the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "app"

# module (first component under app/) -> app modules it must never import
FORBIDDEN: dict[str, set[str]] = {
    "datasets": {"config", "imaging", "attribution", "rendering", "metrics", "engine", "audit", "migrations",
                 "runs", "train", "evaluate", "jobs", "web", "manage", "cli", "lungs"},
    "config": {"imaging", "attribution", "engine", "jobs", "web", "train", "evaluate", "audit",
               "runs", "cli", "metrics", "lungs"},
    "imaging": {"attribution", "rendering", "engine", "jobs", "web", "train", "evaluate", "audit", "runs",
                "cli", "metrics", "config", "lungs"},
    "attribution": {"rendering", "engine", "jobs", "web", "train", "evaluate", "audit", "runs", "cli",
                    "lungs"},
    "rendering": {"engine", "jobs", "web", "train", "evaluate", "audit", "runs", "cli", "metrics",
                  "lungs"},
    # the map's calibrated scale: numpy and app.attribution only (rendering draws with it)
    "mapscale": {"rendering", "engine", "jobs", "web", "train", "evaluate", "audit", "runs", "cli",
                 "metrics", "lungs"},
    # the one generation request type (presets, schedulers): pure Python, below everything that generates
    "generation": {"datasets", "config", "imaging", "attribution", "rendering", "mapscale", "metrics", "engine",
                   "audit", "migrations", "lungs", "lesions", "mapmethods", "runs", "train",
                   "train_lungs", "train_lesions", "train_finetune", "evaluate", "jobs", "web", "manage", "cli"},
    "metrics": {"engine", "jobs", "web", "train", "evaluate", "audit", "runs", "cli"},
    "engine": {"runs", "jobs", "web", "train", "evaluate", "audit", "cli"},
    # the model folder (check, manifest, hash, load, write, assemble): torch and diffusers, below the engine, which
    # loads through it; never the engine or anything that generates
    "modelfolder": {"engine", "mapmethods", "runs", "jobs", "web", "train", "evaluate", "audit", "cli", "manage",
                    "lungs", "lesions", "metrics", "rendering", "attribution", "imaging", "config"},
    "audit": {"imaging", "attribution", "engine", "jobs", "web", "train", "evaluate", "runs",
              "cli", "lungs"},
    "migrations": {"imaging", "attribution", "engine", "runs", "jobs", "web", "train", "evaluate", "cli", "lungs"},
    # the lung segmenter: torch, numpy, scipy, Pillow and safetensors only (runs, jobs, web, cli may import it)
    "lungs": {"datasets", "config", "imaging", "attribution", "rendering", "metrics", "engine", "audit", "migrations",
              "runs", "train", "evaluate", "jobs", "web", "manage", "cli"},
    # the lesion classifier: torch, numpy and the lung segmenter's module only
    "lesions": {"datasets", "config", "imaging", "attribution", "rendering", "metrics", "engine", "audit", "migrations",
                "runs", "train", "evaluate", "jobs", "web", "manage", "cli", "mapmethods"},
    # engine-level map methods: beside the engine, below runs and evaluation
    "mapmethods": {"runs", "jobs", "web", "train", "evaluate", "audit", "cli", "manage"},
    # one package for runs (app/runs/: the record, its folder and reader, the review run, exports, DICOM SC);
    # its read side stays lighter still (RUN_READERS below)
    "runs": {"jobs", "web", "train", "evaluate", "audit", "cli", "manage"},
    # every training technique (app/train/: vae, unet, dreambooth, lungs, lesions, finetune and what they share)
    "train": {"runs", "jobs", "web", "evaluate", "audit", "cli", "manage"},
    "evaluate": {"jobs", "web", "train", "audit", "cli"},
    "jobs": {"web", "train", "evaluate", "cli"},
    "web": {"train", "cli"},
    "manage": {"imaging", "attribution", "engine", "jobs", "web", "train", "evaluate", "runs",
               "metrics", "cli", "lungs"},
}
for _banned in FORBIDDEN.values():  # a layer below the engine is below the model folder too
    if "engine" in _banned:
        _banned.add("modelfolder")
# modules that may not import torch/diffusers at all (pure numpy / database layers)
NO_TORCH = {"generation", "datasets", "imaging", "attribution", "mapscale", "rendering", "audit", "config",
            "migrations", "manage", "fileio"}
# the read side of app/runs/ (record, folder, read, exports, DICOM SC): what the pages, exports and the PACS store
# import; never the engine, the lung segmenter or the review run (torch), so that reading a run stays light
RUN_READERS = ("record", "folder", "read", "exports", "dicom_sc")
RUN_READERS_MAY_NOT = {"app.engine", "app.modelfolder", "app.lungs", "app.lesions", "app.mapmethods", "app.runs.review"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:  # relative import inside a package: resolve against app/
                pkg = path.parent.relative_to(APP.parent).parts
                base = ".".join(pkg[: len(pkg) - node.level + 1])
                found.add(f"{base}.{node.module}")
            elif node.module == "app":
                found.update(f"app.{a.name}" for a in node.names)
            else:
                found.add(node.module)
    return found


def _modules() -> list[tuple[str, Path]]:
    out = []
    for p in sorted(APP.rglob("*.py")):
        rel = p.relative_to(APP).parts
        out.append((rel[0].removesuffix(".py"), p))
    return out


@pytest.mark.parametrize("layer,path", _modules(), ids=lambda v: str(v).split("app/")[-1])
def test_imports_flow_one_way(layer, path):
    imported = _imports(path)
    app_deps = {m.split(".")[1] for m in imported if m.startswith("app.") and len(m.split(".")) > 1}
    bad = app_deps & FORBIDDEN.get(layer, set())
    assert not bad, f"{path.relative_to(APP.parent)} ({layer}) imports {sorted(bad)}, against the layering"
    if layer in NO_TORCH:
        heavy = {m.split(".")[0] for m in imported} & {"torch", "diffusers", "transformers", "fastapi"}
        assert not heavy, f"{path.relative_to(APP.parent)} must stay free of {sorted(heavy)}"


def test_nothing_imports_web():
    for layer, path in _modules():
        if layer in ("web", "cli"):
            continue
        assert not any(m.startswith("app.web") for m in _imports(path)), f"{path} imports app.web"


def _part_graph(package: str) -> dict[str, set[str]]:
    """Inside ``app/<package>/``: each part (module stem) -> the parts it imports, deferred imports too."""
    dotted = "app." + package.replace("/", ".")
    return {
        path.stem: {m.removeprefix(dotted + ".").split(".")[0] for m in _imports(path) if m.startswith(dotted + ".")}
        - {path.stem}
        for path in sorted((APP / package).glob("*.py")) if path.stem != "__init__"
    }


def _assert_no_circle(graph: dict[str, set[str]], where: str) -> None:
    done: set[str] = set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        assert module not in trail, f"import circle in {where}: " + " -> ".join((*trail, module))
        if module in done:
            return
        for imported in graph.get(module, set()):
            visit(imported, (*trail, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_audit_modules_import_without_a_circle():
    """Inside app/audit every import, deferred ones included, points one way; ``db`` is a leaf."""
    graph = _part_graph("audit")
    assert graph["db"] <= {"errors"}, f"app/audit/db.py must stay a leaf, imports {sorted(graph['db'])}"
    _assert_no_circle(graph, "app/audit")


# inside app/jobs/: the manager delegates to its parts; a part never reaches back up to the manager (or to the
# package, which re-exports the manager), and the parts below the store and the recorder know no files or database
JOBS_PARTS: dict[str, set[str]] = {
    "errors": {"app.jobs", "app.jobs.job", "app.jobs.policy", "app.jobs.estimate", "app.jobs.store",
               "app.jobs.recorder", "app.jobs.manager"},
    "job": {"app.jobs", "app.jobs.policy", "app.jobs.estimate", "app.jobs.store", "app.jobs.recorder",
            "app.jobs.manager", "app.filemodes"},
    "policy": {"app.jobs", "app.jobs.estimate", "app.jobs.store", "app.jobs.recorder", "app.jobs.manager",
               "app.filemodes"},
    "estimate": {"app.jobs", "app.jobs.job", "app.jobs.policy", "app.jobs.store", "app.jobs.recorder",
                 "app.jobs.manager", "app.audit", "app.filemodes"},
    "store": {"app.jobs", "app.jobs.policy", "app.jobs.estimate", "app.jobs.recorder", "app.jobs.manager"},
    "recorder": {"app.jobs", "app.jobs.policy", "app.jobs.estimate", "app.jobs.store", "app.jobs.manager",
                 "app.filemodes"},
}


@pytest.mark.parametrize("part", sorted(JOBS_PARTS))
def test_the_job_managers_parts_do_not_reach_back(part):
    path = APP / "jobs" / f"{part}.py"
    bad = _imports(path) & JOBS_PARTS[part]
    assert not bad, f"app/jobs/{part}.py imports {sorted(bad)}"


@pytest.mark.parametrize("name", RUN_READERS)
def test_run_readers_stay_free_of_the_engine(name):
    path = APP / "runs" / f"{name}.py"
    imported = _imports(path)
    bad = {m for m in imported if any(m == f or m.startswith(f + ".") for f in RUN_READERS_MAY_NOT)}
    assert not bad, f"app/runs/{name}.py imports {sorted(bad)}: reading a run must not load the engine"
    heavy = {m.split(".")[0] for m in imported} & {"torch", "diffusers", "transformers", "fastapi"}
    assert not heavy, f"app/runs/{name}.py must stay free of {sorted(heavy)}"


def test_fileio_is_a_leaf():
    imported = _imports(APP / "fileio.py")
    assert not {m for m in imported if m.startswith("app")}, "app/fileio.py must import no app module"


# packages split along their seams (issue 17): inside each, a part never imports the package itself (its __init__
# re-exports the parts, so that would be a circle) and the parts import one another one way, deferred imports too
SPLIT_PACKAGES = ("rendering", "metrics", "evaluate/localize")


@pytest.mark.parametrize("package", SPLIT_PACKAGES)
def test_split_packages_import_one_way(package):
    dotted = "app." + package.replace("/", ".")
    for path in sorted((APP / package).glob("*.py")):
        if path.stem != "__init__":
            assert dotted not in _imports(path), f"app/{package}/{path.name} imports its own package {dotted}"
    _assert_no_circle(_part_graph(package), f"app/{package}")


# the parts of the split packages that stay light: numpy-only metrics (the oracle and the probe use auroc and the
# bootstrap), the rendering's bottom layer, and the localization's cases and scores (no engine, no generation)
LIGHT_PARTS: dict[str, set[str]] = {
    "metrics/stats.py": {"app", "torch", "diffusers", "transformers"},
    "metrics/localization.py": {"app.metrics.ssim", "app.metrics.fid", "torch", "diffusers", "transformers"},
    "rendering/palette.py": {"app"},
    "rendering/fonts.py": {"app"},
    "rendering/options.py": {"app.rendering"},
    "evaluate/localize/cases.py": {"app.engine", "app.evaluate.generate", "app.evaluate.localize", "torch"},
    "evaluate/localize/scores.py": {"app.engine", "app.evaluate.generate", "app.evaluate.localize", "torch"},
}


@pytest.mark.parametrize("part", sorted(LIGHT_PARTS))
def test_light_parts_stay_light(part):
    banned = LIGHT_PARTS[part]
    bad = {m for m in _imports(APP / part) if any(m == b or m.startswith(b + ".") for b in banned)}
    assert not bad, f"app/{part} imports {sorted(bad)}"


def test_provenance_is_a_leaf():
    """app/provenance.py (the one ``library_versions``): every layer that records a result may import it."""
    imported = _imports(APP / "provenance.py")
    assert not {m for m in imported if m.startswith("app")}, "app/provenance.py must import no app module"
