"""What a record says about the software that made it: :func:`library_versions`, the one list of the libraries
whose versions decide a result. A leaf: it imports no app module, and the libraries only when called, so every
layer that records a run, a model or an evaluation may import it.
"""

from __future__ import annotations

import platform

__all__ = ["library_versions"]


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide the numbers and the files, in this order: python, torch, diffusers,
    transformers, numpy, pillow (the PNG/JPEG codecs), pydicom (DICOM decoding).

    Run records, model manifests (``vald_md.json``) and evaluation records all carry this dict, so that a result
    can be matched with the software that made it (``tests/test_reproduction.py`` prints it on a mismatch).
    """
    import diffusers
    import numpy as np
    import PIL
    import pydicom
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "pydicom": pydicom.__version__}
