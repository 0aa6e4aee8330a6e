"""CPU seconds of each stage of the server's start-up, one after the other in one process (issue 15: where the
seconds before /readyz go): the command line and its parser (sqlalchemy, sqlmodel, alembic, the audit models);
torch; the rest of the web stack (uvicorn, fastapi, ``app.web``); diffusers and transformers (the seeded img2img
pipeline class); the engine's construction (``from_pretrained`` and the rest, on one torch thread as the server
loads); then, as ``vald-md serve`` does since issue 15, the start-up's objects frozen and the collector turned on
at ready (it is off until then; ``--gc-on`` keeps it on throughout, as the server did before). The one full pass
over the start-up's objects, which the server runs 5 s after ready, is reported apart (``after_ready_cpu_s``).
The server runs the model's stages in its model thread beside the database's start-up; this runs them in order so
that each has its own number. Prints JSON, with which of the libraries that only some requests need were imported
(none, since issue 15).

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python benchmarks/startup_stages.py [--gc-on]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LATE = ("pydicom", "highdicom", "dicomweb_client", "dicomanonymizer")
"""Imported with the first request that needs them (DICOM, PACS, de-identification), not at start-up."""


def main(argv: list[str] | None = None) -> int:
    """Measure and print; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "model_weights" / "vald-md-mini", help="model folder")
    p.add_argument("--gc-on", action="store_true", help="keep the garbage collector on throughout (the server before "
                                                         "issue 15), no final collection")
    args = p.parse_args(argv)
    stages: dict[str, float] = {}
    last = time.process_time()

    def mark(name: str) -> None:
        nonlocal last
        now = time.process_time()
        stages[name] = round(now - last, 2)
        last = now

    import app.cli

    app.cli.build_parser()
    mark("cli_and_parser")
    if not args.gc_on:
        gc.disable()  # where app.cli.main turns it off for serve: after the parser, before the rest
    import torch

    mark("torch")
    import uvicorn  # noqa: F401 - imported for its cost, as cmd_serve does

    import app.web
    import app.web.accesslog

    mark("web_stack")
    from app.modelfolder import seeded_img2img_pipeline_class

    seeded_img2img_pipeline_class()
    mark("diffusers_and_transformers")
    from app.engine import CounterfactualEngine

    torch.set_num_threads(1)  # as load_engine_in_short_lived_thread loads
    CounterfactualEngine(args.model)
    mark("engine_construction")
    after_ready: dict[str, float] = {}
    if not args.gc_on:
        gc.freeze()  # as the server does at ready (app.cli._CollectGarbageWhenReady)
        gc.enable()
        mark("freeze_at_ready")
        gc.unfreeze()  # its one pass over the start-up's objects, which the server runs after ready
        gc.collect()
        after_ready["start_up_gc_collect"] = round(time.process_time() - last, 2)
    print(json.dumps({"cpu_s": stages, "total_cpu_s": round(sum(stages.values()), 2), "after_ready_cpu_s": after_ready,
                      "late_libraries_imported": [m for m in LATE if m in sys.modules],
                      "app": str(Path(app.__file__).parent)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
