"""A small normal-vs-abnormal CNN ("oracle") that judges counterfactual validity.

A healthy counterfactual is *valid* when an independent classifier calls it normal. ``train_oracle`` fits a
4-block CNN on the labelled CSV's ``train`` split at 128 px (pure torch, a few minutes on 2 CPU cores), picks the
epoch with the best validation AUROC and the decision threshold with the best validation balanced accuracy,
and reports test accuracy and AUROC. :class:`Oracle` loads the result and scores images.

Pre-processing (train and inference alike): 8-bit gray -> bilinear resize to 128x128 (Pillow) -> per-image
standardisation (zero mean, unit SD), so global brightness shifts of a generator do not decide the call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from torch import nn

from app.evaluate.common import (
    HEALTHY_LABEL,
    Item,
    format_duration,
    load_u8,
    now_iso,
    read_items,
    select,
    write_json,
)
from app.fileio import sha256_file
from app.metrics import auroc
from app.provenance import library_versions

logger = logging.getLogger("vald_md.evaluate.oracle")

ORACLE_SIZE = 128
WEIGHTS_FILE = "oracle.safetensors"
CONFIG_FILE = "oracle.json"


class OracleNet(nn.Module):
    """4 conv blocks (3x3 conv, batch norm, ReLU, 2x2 max pool; the first conv has stride 2), global average
    pool, dropout, one logit (abnormal). Input (N, 1, 128, 128) standardised images."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [1, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2 if i == 0 else 1, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(chans[-1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) -> (N,) logits of "abnormal"."""
        out: torch.Tensor = self.head(self.features(x)).squeeze(1)
        return out


def preprocess(img: NDArray[Any], size: int = ORACLE_SIZE) -> NDArray[np.float32]:
    """uint8 or float [0, 1] (H, W) -> float32 (size, size), standardised per image."""
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        arr = np.rint(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    small = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    sd = float(small.std())
    out: NDArray[np.float32] = ((small - small.mean()) / (sd if sd > 1e-6 else 1.0)).astype(np.float32)
    return out


def _metrics(p: NDArray[np.float64], y: NDArray[np.int64], threshold: float) -> dict[str, Any]:
    pred = p >= threshold
    pos, neg = y == 1, y == 0
    sens = float(pred[pos].mean()) if pos.any() else math.nan
    spec = float((~pred[neg]).mean()) if neg.any() else math.nan
    return {"n": len(y), "n_normal": int(neg.sum()), "n_abnormal": int(pos.sum()),
            "accuracy": float((pred == pos).mean()), "balanced_accuracy": (sens + spec) / 2,
            "sensitivity": sens, "specificity": spec, "auroc": auroc(p, y), "threshold": threshold}


def _load_split(items: list[Item], split: str, limit: int | None, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = sorted({it.label for it in items})
    chosen = select(items, labels, limit)
    x = np.stack([preprocess(load_u8(it.path), size) for it in chosen])[:, None]
    y = np.array([0 if it.label == HEALTHY_LABEL else 1 for it in chosen], dtype=np.int64)
    logger.info("oracle %s: %d images (%d abnormal)", split, len(y), int(y.sum()))
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch: int = 128) -> NDArray[np.float64]:
    model.eval()
    out = [torch.sigmoid(model(x[i:i + batch])).double().numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros(0)


def _augment(x: torch.Tensor, gen: torch.Generator, shift: int = 6) -> torch.Tensor:
    """Random translation (reflect-padded, up to ``shift`` px) and contrast jitter (x0.9..1.1) per image."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (shift, shift, shift, shift), mode="reflect")
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    out = torch.stack([padded[i, :, int(dy[i]):int(dy[i]) + h, int(dx[i]):int(dx[i]) + w] for i in range(n)])
    return out * (0.9 + 0.2 * torch.rand(n, 1, 1, 1, generator=gen))


def train_oracle(data: Path, out: Path, *, epochs: int = 12, batch_size: int = 32, lr: float = 2e-3,
                 width: int = 16, seed: int = 0, limit: int | None = None, size: int = ORACLE_SIZE,
                 stream: IO[str] | None = None) -> dict[str, Any]:
    """Train the oracle on ``train``, select on ``val``, report ``test``; write ``oracle.safetensors`` + ``.json``.

    Args:
        data: labels CSV with ``path,split,label`` (``normal`` vs every other label = abnormal).
        out: output folder. epochs: passes over the training split (>= 1). batch_size, lr: AdamW settings.
        width: channels of the first block (doubling per block). seed: torch and augmentation seed.
        limit: images per class per split (for smoke tests; None = all). size: input side in pixels.
        stream: where per-epoch progress lines go (stderr by default).

    Returns:
        The record written to ``oracle.json`` (history, chosen epoch and threshold, val and test metrics).

    Raises:
        ValueError: ``epochs`` < 1, or the CSV lacks a train/val/test split or one of the two classes.
    """
    from safetensors.torch import save_file

    # 1. check inputs and load the three splits
    if epochs < 1:
        raise ValueError(f"--epochs {epochs} must be >= 1")
    stream = stream if stream is not None else sys.stderr
    t_start = time.perf_counter()
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hashes = hashlib.sha256()
    for split in ("train", "val", "test"):
        _, items = read_items(Path(data), split)
        if {it.label for it in items} == {HEALTHY_LABEL} or HEALTHY_LABEL not in {it.label for it in items}:
            raise ValueError(f"split {split!r} of {data} needs '{HEALTHY_LABEL}' and at least one other label")
        splits[split] = _load_split(items, split, limit, size)
        for it in sorted(items, key=lambda i: i.rel):
            hashes.update(f"{split}|{it.rel}|{it.label}\n".encode())
    x_tr, y_tr = splits["train"]

    # 2. train, keeping the epoch with the best validation AUROC
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = OracleNet(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_tr) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    loss_fn = nn.BCEWithLogitsLoss()
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            logits = model(_augment(x_tr[idx], gen))
            loss = loss_fn(logits, y_tr[idx].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        p_val = _predict(model, splits["val"][0])
        val_auroc = auroc(p_val, splits["val"][1].numpy())
        seconds = time.perf_counter() - t0
        history.append({"epoch": epoch, "train_loss": total / len(x_tr), "val_auroc": val_auroc,
                        "seconds": round(seconds, 2)})
        score = val_auroc if math.isfinite(val_auroc) else -1.0
        if best is None or score > best[0]:
            best = (score, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
        stream.write(f"oracle epoch {epoch}/{epochs}  loss {total / len(x_tr):.4f}  val AUROC {val_auroc:.4f}  "
                     f"{seconds:.1f} s  ETA {format_duration(seconds * (epochs - epoch))}\n")
        stream.flush()
    assert best is not None
    model.load_state_dict(best[2])

    # 3. threshold on val (best balanced accuracy), then the test split
    p_val = _predict(model, splits["val"][0])
    y_val = splits["val"][1].numpy()
    candidates = np.unique(np.concatenate([p_val, [0.5]]))
    bal = [_metrics(p_val, y_val, float(t))["balanced_accuracy"] for t in candidates]
    threshold = float(candidates[int(np.nanargmax(bal))])
    p_test = _predict(model, splits["test"][0])
    record = {
        "vald_md_oracle": 1, "architecture": f"OracleNet(width={width}): 4x[conv3x3-BN-ReLU-maxpool2], GAP, "
                                              "dropout 0.2, linear", "input_size": size, "width": width,
        "preprocessing": "8-bit gray, bilinear resize, per-image standardisation",
        "positive_class": "abnormal (every label but 'normal')", "epochs": epochs, "best_epoch": best[1],
        "batch_size": batch_size, "lr": lr, "seed": seed, "limit_per_class": limit, "history": history,
        "threshold": threshold, "threshold_rule": "maximum balanced accuracy on val",
        "val": _metrics(p_val, y_val, threshold), "test": _metrics(p_test, splits["test"][1].numpy(), threshold),
        "data": str(data), "data_hash": hashes.hexdigest(), "train_seconds": round(time.perf_counter() - t_start, 1),
        "torch_threads": torch.get_num_threads(), "library_versions": library_versions(), "created_at": now_iso(),
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(out) / WEIGHTS_FILE))
    record["weights_sha256"] = sha256_file(Path(out) / WEIGHTS_FILE)
    write_json(Path(out) / CONFIG_FILE, record)
    return record


class Oracle:
    """A trained oracle loaded from its folder; :meth:`p_abnormal` scores images, ``threshold`` decides.

    Raises:
        FileNotFoundError: the folder lacks ``oracle.json`` or ``oracle.safetensors``.
    """

    def __init__(self, folder: Path) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{folder} is not an oracle folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                                    "train one with `vald-md evaluate train-oracle`")
        self.record: dict[str, Any] = json.loads((folder / CONFIG_FILE).read_text())
        self.size = int(self.record["input_size"])
        self.threshold = float(self.record["threshold"])
        self.model = OracleNet(int(self.record["width"]))
        self.model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        self.model.eval()

    def p_abnormal(self, images: Iterable[NDArray[Any]]) -> NDArray[np.float64]:
        """Probability of "abnormal" per image (uint8 or float [0, 1] (H, W)); (N,) float64."""
        arrs = [preprocess(img, self.size) for img in images]
        if not arrs:
            return np.zeros(0)
        return _predict(self.model, torch.from_numpy(np.stack(arrs)[:, None]))

    def describe(self) -> dict[str, Any]:
        """Identity and quality of the oracle for reports: architecture, threshold, weights hash, test metrics."""
        keys = ("architecture", "input_size", "threshold", "threshold_rule", "best_epoch", "epochs", "seed",
                "weights_sha256", "test", "val", "data_hash", "created_at")
        return {k: self.record.get(k) for k in keys}
