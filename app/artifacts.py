"""One review run end to end, written to a folder: decode -> counterfactual -> attribution -> files.

Used by ``vald-md counterfactual`` and by the web app's job worker, so both write the same artifacts:

=====================  ===============================================================================
``input.png``          the decoded, windowed image exactly as the model saw it, native size (16-bit PNG)
``counterfactual.png`` the first sample's counterfactual, native size (``counterfactual-<i>.png`` for more)
``overlay.png``        the attribution overlay (red = what the model removed), native size
``attribution.npy``    signed float32 (H, W) map, reference - counterfactual (mean over samples)
``attribution_std.npy`` per-pixel standard deviation over samples (only when samples > 1)
``reconstruction.png`` the autoencoder's reconstruction of the input (the alternative map reference)
``record.json``        every parameter, seeds, effective steps, model hash, library versions, timings, hashes
=====================  ===============================================================================
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app import attribution, imaging, rendering
from app.engine import CounterfactualEngine, CounterfactualResult, ProgressCallback

REFERENCES = ("input", "reconstruction")
DISCLAIMER = "AI-generated counterfactual — not for diagnostic use"


@dataclass
class ReviewRequest:
    """Parameters of one review run (see :meth:`CounterfactualEngine.generate` for ranges)."""

    prompt: str = "normal chest x-ray"
    negative_prompt: str = ""
    strength: float = 0.85
    guidance_scale: float = 7.5
    steps: int = 75
    seed: int | None = None
    scheduler: str = "pndm"
    samples: int = 1
    window: int | str | None = "auto"
    reference: str | None = None  # None: the model's recommendation (manifest "map_reference"), else "input"
    smoothing_sigma: float = 0.0

    def check(self) -> None:
        """Refuse values the engine does not check itself (reference map, smoothing)."""
        if self.reference is not None and self.reference not in REFERENCES:
            raise ValueError(f"reference={self.reference!r} must be one of {', '.join(REFERENCES)}")
        if not 0.0 <= self.smoothing_sigma <= 50.0:
            raise ValueError(f"smoothing_sigma={self.smoothing_sigma} must be within [0, 50] pixels")


def sha256(data: bytes) -> str:
    """Hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes) -> str:
    """Write atomically (temp file + rename) and return the SHA-256 of the bytes."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return sha256(data)


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def run_review(engine: CounterfactualEngine, data: bytes, req: ReviewRequest, out: Path, *,
               mask: np.ndarray | None = None, progress: ProgressCallback | None = None,
               cancel: threading.Event | None = None,
               decoded: imaging.DecodedImage | None = None) -> dict[str, Any]:
    """Decode ``data``, make the counterfactual(s), write every artifact into ``out``; return the record.

    Args:
        data: the uploaded file's bytes (DICOM, PNG or JPEG). decoded: pass when already decoded (skips decode).
        mask: optional bool (H, W) region mask in the native frame (e.g. lungs); restricts the map.

    Raises:
        imaging.ImagingError: the file cannot be read as a chest radiograph (message for the clinician).
        ValueError: a parameter is out of range. engine.GenerationCancelled: cancelled.
    """
    req.check()
    if req.reference is None:
        req.reference = str(engine.info.manifest.get("map_reference", "input"))
    out.mkdir(parents=True, exist_ok=True)
    img = decoded or imaging.decode_image(data, window=req.window)
    pixels = img.pixels
    if mask is not None and mask.shape != pixels.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image's {pixels.shape}")
    result: CounterfactualResult = engine.generate(
        pixels, req.prompt, negative_prompt=req.negative_prompt, strength=req.strength,
        guidance_scale=req.guidance_scale, steps=req.steps, seed=req.seed, scheduler=req.scheduler,
        samples=req.samples, progress=progress, cancel=cancel)
    reference = pixels if req.reference == "input" else result.reconstruction
    amap = attribution.difference_map(reference, result.counterfactuals, mask=mask,
                                      smoothing_sigma=req.smoothing_sigma)
    overlay = rendering.render_overlay(pixels, amap)
    hashes: dict[str, str] = {}
    hashes["input.png"] = _write(out / "input.png", imaging.to_png_bytes(pixels, bits=16))
    for i, cf in enumerate(result.counterfactuals):
        name = "counterfactual.png" if i == 0 else f"counterfactual-{i}.png"
        hashes[name] = _write(out / name, imaging.to_png_bytes(cf, bits=16))
    hashes["reconstruction.png"] = _write(out / "reconstruction.png",
                                          imaging.to_png_bytes(result.reconstruction, bits=16))
    hashes["overlay.png"] = _write(out / "overlay.png", imaging.to_png_bytes(overlay))
    hashes["attribution.npy"] = _write(out / "attribution.npy", _npy_bytes(amap.signed))
    if amap.std is not None:
        hashes["attribution_std.npy"] = _write(out / "attribution_std.npy", _npy_bytes(amap.std))
    if mask is not None:
        hashes["mask.png"] = _write(out / "mask.png", imaging.to_png_bytes(mask.astype(np.float32)))
    summary = attribution.summarize(amap)
    record = {
        "vald_md_record": 1,
        "created_at": datetime.now(UTC).isoformat(),
        "input": {"sha256": sha256(data), "pixels_sha256": sha256(np.ascontiguousarray(pixels).tobytes()),
                  **img.meta.public_summary()},
        **result.record(),
        "request": {"window": req.window, "reference": req.reference, "smoothing_sigma": req.smoothing_sigma,
                    "mask": mask is not None},
        "map_summary": summary.to_dict(),
        "artifacts_sha256": hashes,
        "disclaimer": DISCLAIMER,
    }
    _write(out / "record.json", json.dumps(record, indent=2, default=str).encode())
    return record
