"""The import graph is the architecture (shared/STYLE.md): read every module's imports (deferred ones too) and
check them against one ordered list of layers, plus a cycle check over every ``app`` module.

``RANKS`` lists the layers bottom-up (a layer is the first path component under ``app/``: a module or a package).
A layer imports only layers of a strictly lower rank; layers of one rank are peers and never import each other.
Nothing can import ``web`` or ``cli`` (they are on top). Independently of the ranks, no module of any package may sit
on an import circle (strongly connected components of the module graph); the next circle fails CI with its path.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "app"

RANKS: tuple[tuple[str, ...], ...] = (
    ("__init__", "fileio", "provenance"),  # the standard library only: version, atomic writes + SHA-256, versions
    ("config", "datasets", "generation", "filemodes"),  # settings, labelled image lists, the one request type
    ("imaging", "lungs", "audit"),  # bytes -> pixels; the lung segmenter; the audit database
    ("attribution", "lesions", "modelfolder", "migrations", "manage"),  # maps (may read images); the classifier
    ("mapscale", "metrics", "engine"),  # the map's scale; SSIM/FID/localization; the counterfactual engine
    ("rendering", "mapmethods"),  # overlays, legends, banners; map methods beside the SDEdit difference
    ("runs",),  # one review run, its record, its checked folder, its exports
    ("pacs", "train", "evaluate", "jobs"),  # PACS over DICOMweb; training; evaluation; the review queue
    ("serving",),  # the model on Ray Serve replicas: a backend of the review queue
    ("web",),  # the FastAPI app
    ("cli",),  # the vald-md command
)
RANK: dict[str, int] = {layer: rank for rank, layers in enumerate(RANKS) for layer in layers}

# layers that may not import torch/diffusers/transformers/fastapi, directly or through any app module they import
NO_TORCH = {"__init__", "fileio", "config", "datasets", "generation", "filemodes", "imaging",
            "attribution", "audit", "mapscale", "migrations", "manage", "rendering"}
HEAVY = {"torch", "diffusers", "transformers", "fastapi"}
# the read side of app/runs/ (record, folder, read, exports, DICOM SC): what the pages, exports and the PACS store
# import; never the engine, the lung segmenter or the review run (torch), so that reading a run stays light
RUN_READERS = ("record", "folder", "read", "exports", "dicom_sc")
RUN_READERS_MAY_NOT = {"app.engine", "app.modelfolder", "app.lungs", "app.lesions", "app.mapmethods", "app.runs.review"}


def _imports(path: Path) -> set[str]:
    """Dotted names ``path`` imports anywhere in its body (deferred imports too); ``from app.x import y`` gives
    ``app.x.y`` when ``y`` is a module of package ``app.x``, else ``app.x``."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside a package: resolve against app/
                pkg = path.parent.relative_to(APP.parent).parts
                base = ".".join(pkg[: len(pkg) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module == "app" or module.startswith("app."):
                folder = APP.parent.joinpath(*module.split("."))
                for alias in node.names:
                    sub = folder / f"{alias.name}.py"
                    found.add(f"{module}.{alias.name}" if sub.is_file() or (folder / alias.name).is_dir()
                              else module)
            else:
                found.add(module)
    return found


def _name(path: Path) -> str:
    """``app/x/y.py`` -> ``app.x.y``; ``app/x/__init__.py`` -> ``app.x``."""
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> list[tuple[str, Path]]:
    return [(_layer(_name(p)), p) for p in sorted(APP.rglob("*.py"))]


def _graph() -> dict[str, set[str]]:
    """Every ``app`` module -> the ``app`` modules it imports (names of existing modules or packages only)."""
    paths = {_name(p): p for p in APP.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in paths and m != name} for name, path in paths.items()}


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components of more than one module (each one import circle or more)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_layer_has_a_rank():
    layers = {layer for layer, _ in _modules()}
    assert layers <= set(RANK), f"add {sorted(layers - set(RANK))} to RANKS in tests/test_layering.py"
    assert len(RANK) == sum(len(r) for r in RANKS), "a layer is listed twice in RANKS"


@pytest.mark.parametrize("layer,path", _modules(), ids=lambda v: str(v).split("app/")[-1])
def test_imports_flow_down_the_ranks(layer, path):
    higher = {m for m in _imports(path) if m.startswith("app.") and _layer(m) != layer
              and RANK.get(_layer(m), len(RANKS)) >= RANK[layer]}
    assert not higher, (f"{path.relative_to(APP.parent)} (layer {layer!r}, rank {RANK[layer]}) imports "
                        f"{sorted(higher)} of the same or a higher rank (tests/test_layering.py RANKS)")


def test_no_import_circle_anywhere_in_app():
    circles = _strongly_connected(_graph())
    assert not circles, "import circles (deferred imports count): " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_cycle_check_finds_a_circle():
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _strongly_connected({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("layer", sorted(NO_TORCH))
def test_light_layers_stay_free_of_torch_even_through_other_modules(layer):
    graph = _graph()
    paths = {_name(p): p for p in APP.rglob("*.py")}
    start = {name for name in graph if _layer(name) == layer}
    seen, todo = set(start), list(start)
    while todo:
        todo.extend(m for m in graph[todo.pop()] if m not in seen and not seen.add(m))  # type: ignore[func-returns-value]
    for name in sorted(seen):
        heavy = {m.split(".")[0] for m in _imports(paths[name])} & HEAVY
        assert not heavy, f"layer {layer!r} reaches {name}, which imports {sorted(heavy)}"


def test_audit_db_is_a_leaf():
    """``app/audit/db.py`` (engines, sessions, migrations runner) imports nothing of the audit package but errors."""
    inside = {m for m in _imports(APP / "audit" / "db.py") if m.startswith("app.")}
    assert inside <= {"app.audit.errors"}, f"app/audit/db.py must stay a leaf, imports {sorted(inside)}"


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
    # the shared job table: rows and claims only, no files (job.json stays the store's) and no audit records
    "jobtable": {"app.jobs", "app.jobs.estimate", "app.jobs.store", "app.jobs.recorder", "app.jobs.manager",
                 "app.filemodes"},
    # the manager's shared-table half: the table and the job, never the manager, the package or the backends
    "shared": {"app.jobs", "app.jobs.manager", "app.jobs.policy", "app.jobs.estimate", "app.jobs.recorder",
               "app.jobs.backend"},
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
