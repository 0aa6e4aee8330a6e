"""Labelled image sets on disk: a ``path,label[,split][,caption]`` CSV or a folder with one sub-folder per class.

Read by the training command (``app.train``) and the evaluation command (``app.evaluate``), so that both see the
same rows for the same arguments. Standard library only; the pixels are read by the callers.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
"""File types a class-folder tree contributes when the caller decodes with Pillow (training)."""
IMAGE_SUFFIXES = (*RASTER_SUFFIXES, ".dcm")
"""File types a class-folder tree contributes by default (evaluation decodes DICOM too)."""


@dataclass(frozen=True)
class LabelledImage:
    """One labelled image.

    Attributes:
        path: absolute (or caller-relative) path of the file.
        rel: POSIX path relative to the data root (the CSV's folder, or the class-folder tree's root); used for
            output names and stable per-image seeds.
        label: class name (CSV ``label`` column, or the sub-folder's name).
        caption: the CSV's optional ``caption`` column (``None`` when absent or empty).
    """

    path: Path
    rel: str
    label: str
    caption: str | None = None


def read_labelled(data: Path, split: str | None = None,
                  suffixes: Iterable[str] = IMAGE_SUFFIXES) -> tuple[Path, list[LabelledImage]]:
    """Read a labelled data set.

    Args:
        data: a CSV with columns ``path,label[,split][,caption]`` (paths relative to the CSV's folder, as
            ``cxr256/labels.csv``), or a folder whose sub-folders are class names (``data/<label>/*.png``).
        split: keep only rows whose ``split`` equals this; ignored for folders and CSVs without the column.
        suffixes: lower-case file suffixes taken from a class-folder tree (CSV rows are taken as listed).

    Returns:
        ``(root, rows)``: the folder ``rel`` paths are relative to, and the rows in file order.

    Raises:
        FileNotFoundError: ``data`` does not exist.
        ValueError: the CSV lacks ``path``/``label`` columns or nothing is selected.
    """
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"--data {data} does not exist; pass a labels CSV (path,label[,split]) or a "
                                "folder with one sub-folder per class")
    wanted = tuple(suffixes)
    rows: list[LabelledImage] = []
    if data.is_dir():
        root = data
        for sub in sorted(p for p in data.iterdir() if p.is_dir()):
            for f in sorted(sub.iterdir()):
                if f.suffix.lower() in wanted:
                    rows.append(LabelledImage(f, f.relative_to(root).as_posix(), sub.name))
    else:
        root = data.parent
        with open(data, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or [])
            if not {"path", "label"} <= cols:
                raise ValueError(f"{data.name}: needs columns 'path' and 'label', found {sorted(cols)}")
            for r in reader:
                if split is not None and "split" in cols and r["split"] != split:
                    continue
                rows.append(LabelledImage(root / r["path"], Path(r["path"]).as_posix(), r["label"],
                                          r.get("caption") or None))
    if not rows:
        raise ValueError(f"{data}: no images selected (split={split!r})")
    return root, rows
