"""``vald-md evaluate probe --cache DIR``: each probed image's autoencoder reconstruction and counterfactuals, kept
on disk so that a later probe run with the same model and generation settings scores new map combinations,
smoothings or normals without running the diffusion again (about 17 s an image for the default's 16 samples on
one CPU thread; scoring a cached image takes well under a second).

Layout of DIR:

- ``cache.json``: the settings every entry was made with (model hash, generation parameters without the seed, the
  engine's compute record, the probe's image size). A probe run whose settings differ refuses the folder
  (``ValueError``) rather than mix counterfactuals of two settings.
- ``<seed>.npz``, one per image (the probe derives each image's seed from its name): ``image_sha256`` (of the
  256-px float32 image the probe fed the model), ``reconstruction`` float32 (H, W) in [0, 1] and
  ``counterfactuals`` float32 (S, H, W) in [0, 1]. Written whole (:func:`app.fileio.write_atomic`), so an
  interrupted run leaves whole entries only and the next run fills in the rest.
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
        settings: what the entries depend on (JSON-ready); compared with the folder's ``cache.json``.

    Raises:
        ValueError: the folder holds entries made with other settings, or is not a folder.
    """

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"--cache {self.folder}: not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.settings = json.loads(json.dumps(settings, default=str))
        meta = self.folder / SETTINGS_FILE
        if meta.exists():
            try:
                made_with = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"--cache {self.folder}: {SETTINGS_FILE} unreadable ({e})") from None
            if made_with != self.settings:
                keys = sorted(k for k in set(made_with) | set(self.settings)
                              if made_with.get(k) != self.settings.get(k))
                raise ValueError(f"--cache {self.folder}: made with other settings ({', '.join(keys)} differ); "
                                 f"give another folder")
        else:
            write_atomic(meta, json.dumps(self.settings, indent=2).encode())

    def _entry(self, seed: int) -> Path:
        return self.folder / f"{int(seed)}.npz"

    def get(self, image: NDArray[np.float32], seed: int) -> tuple[NDArray[np.float32], NDArray[np.float32]] | None:
        """(reconstruction (H, W), counterfactuals (S, H, W)) cached for ``image`` at ``seed``, else None.

        Raises:
            ValueError: the entry for ``seed`` was made from another image (the cache belongs to other data).
        """
        path = self._entry(seed)
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                made_from = str(z["image_sha256"])
                recon, cfs = z["reconstruction"].astype(np.float32), z["counterfactuals"].astype(np.float32)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise ValueError(f"--cache {self.folder}: {path.name} is unreadable ({e}); delete it to make it "
                             f"again") from None
        if made_from != _image_sha256(image):
            raise ValueError(f"--cache {self.folder}: {path.name} was made from another image than the one probed "
                             f"with seed {seed}; the folder belongs to other data")
        return recon, cfs

    def put(self, image: NDArray[np.float32], seed: int, reconstruction: NDArray[np.float32],
            counterfactuals: NDArray[np.float32]) -> None:
        """Keep the reconstruction (H, W) and the counterfactuals (S, H, W) of ``image`` at ``seed``."""
        buf = io.BytesIO()
        np.savez(buf, image_sha256=np.array(_image_sha256(image)),
                 reconstruction=np.asarray(reconstruction, np.float32),
                 counterfactuals=np.asarray(counterfactuals, np.float32))
        write_atomic(self._entry(seed), buf.getvalue())


def _image_sha256(image: NDArray[Any]) -> str:
    return sha256_bytes(np.ascontiguousarray(image, np.float32).tobytes())
