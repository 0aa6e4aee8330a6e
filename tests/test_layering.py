"""The import graph is the architecture (shared/STYLE.md): read every module's imports and check the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "app"

# module (first component under app/) -> app modules it must never import
FORBIDDEN: dict[str, set[str]] = {
    "datasets": {"config", "imaging", "attribution", "rendering", "metrics", "engine", "audit", "migrations", "artifacts",
                 "exports", "train", "evaluate", "jobs", "web", "manage", "cli", "lungs"},
    "config": {"imaging", "attribution", "engine", "artifacts", "jobs", "web", "train", "evaluate", "audit",
               "exports", "cli", "metrics", "lungs"},
    "imaging": {"attribution", "rendering", "engine", "artifacts", "jobs", "web", "train", "evaluate", "audit", "exports",
                "cli", "metrics", "config", "lungs"},
    "attribution": {"rendering", "engine", "artifacts", "jobs", "web", "train", "evaluate", "audit", "exports", "cli",
                    "lungs"},
    "rendering": {"engine", "artifacts", "jobs", "web", "train", "evaluate", "audit", "exports", "cli", "metrics",
                  "lungs"},
    # the map's calibrated scale: numpy and app.attribution only (rendering draws with it)
    "mapscale": {"rendering", "engine", "artifacts", "jobs", "web", "train", "evaluate", "audit", "exports", "cli",
                 "metrics", "lungs"},
    # the one generation request type (presets, schedulers): pure Python, below everything that generates
    "generation": {"datasets", "config", "imaging", "attribution", "rendering", "mapscale", "metrics", "engine",
                   "audit", "migrations", "lungs", "lesions", "mapmethods", "artifacts", "exports", "train",
                   "train_lungs", "train_lesions", "train_finetune", "evaluate", "jobs", "web", "manage", "cli"},
    "metrics": {"engine", "artifacts", "jobs", "web", "train", "evaluate", "audit", "exports", "cli"},
    "engine": {"artifacts", "jobs", "web", "train", "evaluate", "audit", "exports", "cli", "serving"},
    "audit": {"imaging", "attribution", "engine", "artifacts", "jobs", "web", "train", "evaluate", "exports",
              "cli", "lungs"},
    "migrations": {"imaging", "attribution", "engine", "artifacts", "jobs", "web", "train", "evaluate", "cli", "lungs"},
    # the lung segmenter: torch, numpy, scipy, Pillow and safetensors only (artifacts, jobs, web, cli may import it)
    "lungs": {"datasets", "config", "imaging", "attribution", "rendering", "metrics", "engine", "audit", "migrations",
              "artifacts", "exports", "train", "evaluate", "jobs", "web", "manage", "cli"},
    # the lesion classifier: torch, numpy and the lung segmenter's module only
    "lesions": {"datasets", "config", "imaging", "attribution", "rendering", "metrics", "engine", "audit", "migrations",
                "artifacts", "exports", "train", "evaluate", "jobs", "web", "manage", "cli", "mapmethods"},
    # engine-level map methods: beside the engine, below artifacts and evaluation
    "mapmethods": {"artifacts", "jobs", "web", "train", "evaluate", "audit", "exports", "cli", "manage"},
    "artifacts": {"jobs", "web", "train", "evaluate", "audit", "cli", "serving"},
    "exports": {"engine", "jobs", "web", "train", "evaluate", "audit", "cli", "lungs"},
    # every training technique (app/train/: vae, unet, dreambooth, lungs, lesions, finetune and what they share)
    "train": {"artifacts", "jobs", "web", "evaluate", "audit", "cli", "manage"},
    "evaluate": {"jobs", "web", "train", "audit", "cli"},
    # the queue knows its backends only as app.jobs.backend.Backend: the Ray one (app.serving) comes from above
    "jobs": {"web", "train", "evaluate", "cli", "serving"},
    # the Ray Serve deployment and backend: above the queue (it implements its Backend), below the web app
    "serving": {"web", "train", "evaluate", "cli", "manage"},
    "web": {"train", "cli"},
    "manage": {"imaging", "attribution", "engine", "artifacts", "jobs", "web", "train", "evaluate", "exports",
               "metrics", "cli", "lungs"},
}
# modules that may not import torch/diffusers at all (pure numpy / database layers)
NO_TORCH = {"generation", "datasets", "imaging", "attribution", "mapscale", "rendering", "audit", "exports", "config",
            "migrations", "manage"}


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


def test_audit_modules_import_without_a_circle():
    """Inside app/audit every import, deferred ones included, points one way; ``db`` is a leaf."""
    package = APP / "audit"
    graph = {
        path.stem: {m.split(".")[2] for m in _imports(path) if m.startswith("app.audit.")} - {path.stem}
        for path in sorted(package.glob("*.py")) if path.stem != "__init__"
    }
    assert graph["db"] <= {"errors"}, f"app/audit/db.py must stay a leaf, imports {sorted(graph['db'])}"
    done: set[str] = set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        assert module not in trail, "import circle in app/audit: " + " -> ".join((*trail, module))
        if module in done:
            return
        for imported in graph.get(module, set()):
            visit(imported, (*trail, module))
        done.add(module)

    for module in graph:
        visit(module, ())


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
