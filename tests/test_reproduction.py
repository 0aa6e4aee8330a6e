"""A pinned expected output: the tiny model's seeded counterfactual and its map summary, as numbers.

README ("record.json"): "a run can be reproduced from its record (same seed + same inputs -> identical output on
the CPU generator)". The other tests check that two runs in one process agree; this one checks the output against
numbers written down here, so that a change which alters every run alike (a scheduler, a seeded draw, the
letterbox, the map) fails a test instead of passing unseen.

When this test fails after a deliberate change of the numbers, or after torch / diffusers / transformers versions
change (``library_versions()`` of the run goes in the failure message): first check that the change is expected
(run the previous versions side by side if in doubt), then regenerate the pinned values by running this file with
``VALD_MD_PRINT_PINNED=1 pytest -s tests/test_reproduction.py`` and paste what it prints over ``PINNED`` and
``PINNED_SUMMARY``, saying in the commit message why the numbers moved. Never loosen the tolerances to make a
version change pass.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

import numpy as np
import pytest

from app import attribution, imaging
from tests.factories import png_bytes

#: the run: every value the output depends on (besides the model, built from seed 0 by tests/tiny_model.py)
SETTINGS: dict[str, Any] = {"prompt": "normal chest x ray", "strength": 0.5, "guidance_scale": 5.0, "steps": 4,
                            "seed": 11, "scheduler": "pndm", "samples": 2}
#: rows 16..19, columns 16..19 of the first counterfactual (float, [0, 1]; the image is 40 x 36), rounded to 1e-4
PATCH = (slice(16, 20), slice(16, 20))
PINNED: list[list[float]] = [[0.7421, 0.686, 0.61, 0.6034], [0.6959, 0.6441, 0.5831, 0.5931],
                              [0.5374, 0.5141, 0.5568, 0.6493], [0.393, 0.4492, 0.5862, 0.7053]]
#: attribution.summarize of the two-sample map against the input, floats rounded to 1e-4
PINNED_SUMMARY: dict[str, Any] = {
    "n_samples": 2, "threshold_mode": "percentile", "threshold_parameter": 95.0, "threshold_value": 0.5462,
    "mask_area_px": 1440, "changed_area_px": 72, "changed_area_fraction": 0.05, "mean_abs_in_mask": 0.2616,
    "max_abs_in_mask": 0.7399, "centroid_xy": [17.2837, 18.7797], "energy_share_in_mask": 1.0,
    "mean_std_in_mask": 0.1225}
#: pinned values are rounded to 1e-4; a value may differ by that rounding plus float noise between CPUs
TOLERANCE = 1e-4


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


@pytest.fixture(scope="module")
def pinned_run(tiny_engine) -> tuple[Any, np.ndarray]:
    pixels = imaging.decode_image(png_bytes()).pixels
    return tiny_engine.generate(pixels, **SETTINGS), pixels


def test_the_seeded_counterfactual_and_its_map_summary_are_the_pinned_numbers(pinned_run) -> None:
    result, pixels = pinned_run
    patch = np.round(result.counterfactuals[0][PATCH].astype(np.float64), 4).tolist()
    summary = {k: _rounded(v) for k, v in asdict(attribution.summarize(
        attribution.difference_map(pixels, result.counterfactuals))).items()}
    if os.environ.get("VALD_MD_PRINT_PINNED") == "1":
        print(f"\nPINNED = {json.dumps(patch)}\nPINNED_SUMMARY = {json.dumps(summary)}")  # noqa: T201 - on request
    versions = result.record()["library_versions"]
    assert result.seeds == [11, 12] and result.counterfactuals.shape == (2, 40, 36)
    assert np.allclose(result.counterfactuals[0][PATCH], PINNED, rtol=0, atol=TOLERANCE), (
        f"the counterfactual moved: {patch}; library versions {versions} (see the module docstring)")
    assert summary.keys() == PINNED_SUMMARY.keys()
    for key, pinned in PINNED_SUMMARY.items():
        expected = pinned if isinstance(pinned, str) else pytest.approx(pinned, rel=0, abs=TOLERANCE)
        assert summary[key] == expected, (
            f"map summary {key} moved: {summary[key]} (pinned {pinned}); library versions {versions}")


def test_a_rerun_from_the_record_is_identical(tiny_engine, pinned_run) -> None:
    """The record's parameters and first seed give the same pixels again, bit for bit (CPU generator)."""
    result, pixels = pinned_run
    parameters = result.record()["parameters"]
    again = tiny_engine.generate(pixels, **{k: parameters[k] for k in SETTINGS})
    assert np.array_equal(again.counterfactuals, result.counterfactuals)
