"""Loading the helper models beside the engine: the lung segmenter and the lesion classifier, each optional.

The review server's front (``app.web``) and every Ray Serve replica (:mod:`app.serving.replica`) load them the same
way: in a thread that then ends, as the engine is (``app.engine.load_engine_in_short_lived_thread``), and never fatally.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from app.lungs import LungSegmenter, SegmenterFolderError

__all__ = ["load_classifier", "load_segmenter"]

logger = logging.getLogger("vald_md.web")


def load_segmenter(folder: Path) -> LungSegmenter | None:
    """The lung segmenter in ``folder``, or ``None`` (with a warning) when there is none: never fatal, because the
    review app works without it (maps are then not restricted to the lungs, and each record says why).

    Loaded in a thread that then ends, as the model is (``engine.load_engine_in_short_lived_thread``), so that the job
    worker stays the only long-lived thread with an OpenMP team.
    """
    box: dict[str, LungSegmenter] = {}
    errors: list[Exception] = []

    def load() -> None:
        try:
            box["seg"] = LungSegmenter(folder, device="cpu")
        except SegmenterFolderError as e:  # missing or unreadable folder: the expected case
            errors.append(e)
        except Exception as e:  # noqa: BLE001  damaged weights (safetensors, state-dict mismatch): not worth a crash
            errors.append(RuntimeError(f"{type(e).__name__}: {e}"))

    t = threading.Thread(target=load, name="vald-md-segmenter-load")
    t.start()
    t.join()
    if errors or "seg" not in box:
        reason = errors[0] if errors else "the loader stopped"
        logger.warning("no lung segmenter loaded (%s); attribution maps will not be restricted to the lungs",
                       reason)
        return None
    seg = box["seg"]
    logger.info("lung segmenter %s (%s) loaded", seg.info.name, seg.info.sha256[:12])
    return seg


def load_classifier(folder: Path) -> Any:
    """The lesion classifier (``app.lesions.LesionClassifier``) in ``folder``, or ``None`` (with a warning) when
    there is none: never fatal, the server then offers only the SDEdit map. Loaded in a passing thread, as the
    segmenter is."""
    from app.lesions import LesionClassifier

    box: dict[str, Any] = {}
    errors: list[Exception] = []

    def load() -> None:
        try:
            box["clf"] = LesionClassifier(folder)
        except Exception as e:  # noqa: BLE001  missing folder, damaged weights: not worth a crash
            errors.append(e)

    t = threading.Thread(target=load, name="vald-md-classifier-load")
    t.start()
    t.join()
    if errors or "clf" not in box:
        reason = errors[0] if errors else "the loader stopped"
        logger.warning("no lesion classifier loaded (%s); the classifier-guided map method is not available", reason)
        return None
    clf = box["clf"]
    logger.info("lesion classifier %s (%s) loaded", clf.info["name"], clf.info["sha256"][:12])
    return clf
