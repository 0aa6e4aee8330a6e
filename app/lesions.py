"""The lesion classifier: a small CNN that sees only the lungs, trained to tell diseased from normal lungs.

It guides counterfactuals towards "normal" (``app.mapmethods.classifier_guided``, as DiME / FastDiME do) and
gives a gradient map. It is fed only the lung field so that it cannot use the shortcuts of mixed-source data
(markers, borders, letterbox, exposure outside the chest), and each input is standardised inside the lungs.

Input preparation (:meth:`LesionClassifier.prepare`, differentiable in the image): the image (H, W) in [0, 1] is
cropped to the bounding box of the lung mask widened by 5 % per side, resized to ``size`` x ``size``, standardised
by the mean and standard deviation of its lung pixels, and set to 0 outside the (resized) lung mask.

Trained by ``vald-md train lesions`` (``app/train/lesions.py``). Imports torch, numpy and ``app.lungs``; nothing
of the web.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from app import lungs

CONFIG_NAME = "classifier.json"
WEIGHTS_NAME = "model.safetensors"
BOX_MARGIN = 0.05


class LesionNet(nn.Module):
    """(N, 1, S, S) prepared lung crops -> (N,) disease logits. Five stride-2 conv blocks, global average pool."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128, 128), dropout: float = 0.2) -> None:
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        layers: list[nn.Module] = []
        cin = 1
        for c in self.channels:
            layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.GroupNorm(min(8, c), c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            cin = c
        self.features = nn.Sequential(*layers)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(cin, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.drop(self.features(x).mean(dim=(2, 3))))[:, 0]
        return logits


def lung_box(lungs: NDArray[np.bool_], margin: float = BOX_MARGIN) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1): the lung mask's bounding box widened by ``margin`` of the image per side, clipped;
    the whole image when the mask is empty."""
    h, w = lungs.shape
    rows, cols = np.flatnonzero(lungs.any(1)), np.flatnonzero(lungs.any(0))
    if len(rows) == 0:
        return 0, h, 0, w
    mr, mc = round(margin * h), round(margin * w)
    return (max(0, int(rows[0]) - mr), min(h, int(rows[-1]) + 1 + mr),
            max(0, int(cols[0]) - mc), min(w, int(cols[-1]) + 1 + mc))


def standardize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per image: (x - mean_lungs) / std_lungs inside the mask, 0 outside. (N, 1, S, S) -> same."""
    n = m.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)
    mean = (x * m).sum(dim=(2, 3), keepdim=True) / n
    std = (((x - mean) ** 2 * m).sum(dim=(2, 3), keepdim=True) / n).sqrt().clamp(min=1e-3)
    return (x - mean) / std * m


def prepare(image: torch.Tensor, lungs: NDArray[np.bool_], size: int) -> torch.Tensor:
    """Differentiable preparation of one image; see the module docstring.

    Args:
        image: float tensor (H, W) in [0, 1]. lungs: bool (H, W). size: output side.

    Returns:
        (1, 1, size, size) float32 tensor: standardised lung pixels, 0 elsewhere.
    """
    r0, r1, c0, c1 = lung_box(lungs)
    crop = image[r0:r1, c0:c1][None, None].float()
    m = torch.from_numpy(lungs[r0:r1, c0:c1].astype(np.float32))[None, None]
    crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
    m = (F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False) >= 0.5).float()
    return standardize(crop, m)


def folder_hash(folder: Path) -> str:
    """SHA-256 over the classifier's configuration and weights (``app.lungs.folder_hash``)."""
    return lungs.folder_hash(folder, (CONFIG_NAME, WEIGHTS_NAME))


def save_classifier(folder: Path, model: LesionNet, *, size: int, name: str, metrics: dict[str, Any],
                    training: dict[str, Any]) -> str:
    """Write ``classifier.json`` + ``model.safetensors`` (fp32) into ``folder``; returns the folder hash."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_NAME))
    cfg = {"name": name, "architecture": "LesionNet", "channels": list(model.channels), "size": size,
           "input": "lung box + 5 % margin, resized, standardised inside the lungs, 0 outside",
           "metrics": metrics, "training": training}
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder_hash(folder)


class LesionClassifier:
    """A trained lesion classifier loaded from a folder (``classifier.json`` + ``model.safetensors``).

    Raises:
        FileNotFoundError: the folder lacks one of the two files.
    """

    def __init__(self, folder: Path | str) -> None:
        from safetensors.torch import load_file

        self.folder = Path(folder)
        for n in (CONFIG_NAME, WEIGHTS_NAME):
            if not (self.folder / n).is_file():
                raise FileNotFoundError(f"{self.folder} is not a lesion classifier folder: {n} is missing")
        cfg = json.loads((self.folder / CONFIG_NAME).read_text())
        self.size = int(cfg["size"])
        self.model = LesionNet(tuple(cfg["channels"]))
        self.model.load_state_dict(load_file(str(self.folder / WEIGHTS_NAME)))
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.info = {"name": cfg.get("name", self.folder.name), "sha256": folder_hash(self.folder),
                     "metrics": cfg.get("metrics", {})}

    def logit_tensor(self, image: torch.Tensor, lungs: NDArray[np.bool_]) -> torch.Tensor:
        """Disease logit (0-d tensor) of an image tensor (H, W) in [0, 1]; differentiable in ``image``."""
        logit: torch.Tensor = self.model(prepare(image, lungs, self.size))[0]
        return logit

    @torch.no_grad()
    def probability(self, image: NDArray[Any], lungs: NDArray[np.bool_]) -> float:
        """P(disease) in [0, 1] of an image (H, W) in [0, 1] with its lung mask."""
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        return float(torch.sigmoid(self.logit_tensor(x, lungs)))
