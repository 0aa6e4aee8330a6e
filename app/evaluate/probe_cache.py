"""``vald-md evaluate probe --cache DIR``: each probed image's autoencoder reconstruction and counterfactuals, kept
on disk so that a later probe run with the same model and generation settings scores new map combinations,
smoothings or normals without running the diffusion again (about 17 s an image for the default's 16 samples on
one CPU thread; scoring a cached image takes well under a second).

Layout of DIR:

- ``cache.json``: the settings every entry was made with (model hash, generation parameters without the seed, the
  engine's compute record, the library versions, the probe's image size). A probe run whose settings differ
  refuses the folder (``ValueError``) rather than mix counterfactuals of two settings.
- ``<seed>.npz``, one per image (the probe derives each image's seed from its name): ``settings_sha256`` (of the
  settings above, so that an entry is never taken for other settings, even one written by a run that raced this
  one to create ``cache.json``), ``image_sha256`` (of the 256-px float32 image the probe fed the model, with its
  shape), ``reconstruction`` float32 (H, W) in [0, 1] and ``counterfactuals`` float32 (S, H, W) in [0, 1]. Written
  whole (:func:`app.fileio.write_atomic`), so an interrupted run leaves whole entries only and the next run fills
  in the rest.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.fileio import sha256_bytes, write_atomic

SETTINGS_FILE = "cache.json"


class ProbeCache:
    """A folder of cached counterfactuals for one probe setting (see the module docstring).

    Args:
        folder: the cache folder; created if missing.
        settings: what the entries depend on (JSON-ready: str, numbers, bools, None, lists, dicts); compared with
            the folder's ``cache.json``.

    Raises:
        ValueError: ``folder`` is not a folder, its ``cache.json`` is unreadable or was made with other settings,
            or it holds entries but no ``cache.json`` (their settings are unknown).
        OSError: the folder cannot be created or written.
    """

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"--cache {self.folder}: not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(settings, indent=2, sort_keys=True)
        self.settings: dict[str, Any] = json.loads(text)
        self.digest = sha256_bytes(text.encode())
        meta = self.folder / SETTINGS_FILE
        if meta.exists():
            try:
                made_with = json.loads(meta.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"--cache {self.folder}: {SETTINGS_FILE} unreadable ({e})") from None
            if not isinstance(made_with, dict):
                raise ValueError(f"--cache {self.folder}: {SETTINGS_FILE} is not a settings object")
            if made_with != self.settings:
                raise ValueError(f"--cache {self.folder}: made with other settings "
                                 f"({'; '.join(_differences(made_with, self.settings))}); give another folder")
            # equal as values (12 == 12.0), perhaps not as text: the entries carry the digest of the file's settings
            self.digest = sha256_bytes(json.dumps(made_with, indent=2, sort_keys=True).encode())
        elif any(self.folder.glob("*.npz")):
            raise ValueError(f"--cache {self.folder}: holds entries but no {SETTINGS_FILE}, so their settings are "
                             f"unknown; give another folder")
        else:
            write_atomic(meta, (text + "\n").encode())

    def _entry(self, seed: int) -> Path:
        return self.folder / f"{int(seed)}.npz"

    def get(self, image: NDArray[np.float32], seed: int) -> tuple[NDArray[np.float32], NDArray[np.float32]] | None:
        """(reconstruction (H, W), counterfactuals (S, H, W)) cached for ``image`` (H, W) at ``seed``, else None.

        Raises:
            ValueError: the entry is unreadable or not shaped like ``image``, was made with other settings, or
                was made from another image (the folder belongs to other data).
        """
        path = self._entry(seed)
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                if not isinstance(z, np.lib.npyio.NpzFile):
                    raise TypeError("not an .npz archive")
                made_with, made_from = str(z["settings_sha256"]), str(z["image_sha256"])
                recon, cfs = z["reconstruction"].astype(np.float32), z["counterfactuals"].astype(np.float32)
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"--cache {self.folder}: {path.name} is unreadable ({e}); delete it to make it "
                             f"again") from None
        if made_with != self.digest:
            raise ValueError(f"--cache {self.folder}: {path.name} was made with other settings than "
                             f"{SETTINGS_FILE} says; give another folder")
        if made_from != _image_sha256(image):
            raise ValueError(f"--cache {self.folder}: {path.name} was made from another image than the one probed "
                             f"with seed {seed}; the folder belongs to other data")
        if recon.shape != image.shape or cfs.ndim != 3 or cfs.shape[0] < 1 or cfs.shape[1:] != image.shape:
            raise ValueError(f"--cache {self.folder}: {path.name} is unreadable (reconstruction {recon.shape}, "
                             f"counterfactuals {cfs.shape} for an image of {image.shape}); delete it to make it "
                             f"again")
        return recon, cfs

    def put(self, image: NDArray[np.float32], seed: int, reconstruction: NDArray[np.float32],
            counterfactuals: NDArray[np.float32]) -> None:
        """Keep the reconstruction (H, W) and the counterfactuals (S, H, W) of ``image`` (H, W) at ``seed``."""
        buf = io.BytesIO()
        np.savez(buf, settings_sha256=np.array(self.digest), image_sha256=np.array(_image_sha256(image)),
                 reconstruction=np.asarray(reconstruction, np.float32),
                 counterfactuals=np.asarray(counterfactuals, np.float32))
        write_atomic(self._entry(seed), buf.getvalue())


def _image_sha256(image: NDArray[Any]) -> str:
    """SHA-256 of the image's shape and float32 bytes."""
    pixels = np.ascontiguousarray(image, np.float32)
    return sha256_bytes(repr(pixels.shape).encode() + pixels.tobytes())


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    """The leaves where two JSON values differ, as ``path: old vs new`` (e.g. ``parameters.strength: 0.9 vs 0.5``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))]
    return [] if old == new else [f"{where or 'settings'}: {old!r} vs {new!r}"]
