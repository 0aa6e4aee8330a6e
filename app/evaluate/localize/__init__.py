"""Localization of attribution maps against radiologist lesions, and the laterality of localized induction.

``localize_run`` scores, on the same images and seeds, every map a user could be shown plus baselines:

==========================  ==============================================================================
``cf_input``                ``|input - counterfactual|``, one sample (the paper's map)
``cf_recon``                ``|reconstruction - counterfactual|``, one sample (reference = autoencoder round trip)
``cf_input_meanS``          ``|input - mean of S counterfactuals|`` (``--samples S`` > 1)
``cf_recon_meanS``          ``|reconstruction - mean of S counterfactuals|``
``empty_input``             the same pipeline with the empty prompt ``""`` (what img2img changes anyway)
``empty_recon``             the empty-prompt map with the reconstruction as reference
``intensity``               the input's own intensity (bright = dense), no model
``random``                  uniform random values, no model
==========================  ==============================================================================

Metrics per image and map (``app.metrics``): pointing game, pixel AUROC and AUPRC, IoU and Dice of the top 5 %
and 10 % of the map's pixels, and the share of the map's |energy| inside the lesions; all restricted to the
optional region mask alike. Aggregates are means with percentile-bootstrap 95 % CIs over images; paired
comparisons (e.g. reconstruction vs input reference) bootstrap the per-image differences.

``laterality_run`` induces "opacity in the left lung" and "... right lung" on normal images and reports the share
of each map's energy on the named side; the patient's left is the image's right (PA view convention).

One concern per module, imports flowing one way: :mod:`~app.evaluate.localize.cases` (the lesion cases) and
:mod:`~app.evaluate.localize.scores` (metrics, summary, CSV, markdown) below :mod:`~app.evaluate.localize.run`
(the run); :mod:`~app.evaluate.localize.laterality` stands apart. Their public names are re-exported here.
"""

from __future__ import annotations

from app.evaluate.localize.cases import (
    BOX_FRAME,
    BOX_LABEL,
    LesionCase,
    lesion_mask,
    read_lesion_cases,
)
from app.evaluate.localize.laterality import (
    LATERALITY_PROMPTS,
    LateralitySettings,
    image_right_share,
    laterality_markdown,
    laterality_run,
    laterality_summary,
)
from app.evaluate.localize.run import (
    RUN_KEYS,
    LocalizeSettings,
    localize_run,
)
from app.evaluate.localize.scores import (
    K_PERCENTS,
    METRICS,
    PRIMARY_METRIC,
    describe_method,
    localization_markdown,
    method_maps,
    score_map,
    summarize_localization,
)

__all__ = [
    "BOX_FRAME",
    "BOX_LABEL",
    "K_PERCENTS",
    "LATERALITY_PROMPTS",
    "METRICS",
    "PRIMARY_METRIC",
    "RUN_KEYS",
    "LateralitySettings",
    "LesionCase",
    "LocalizeSettings",
    "describe_method",
    "image_right_share",
    "laterality_markdown",
    "laterality_run",
    "laterality_summary",
    "lesion_mask",
    "localization_markdown",
    "localize_run",
    "method_maps",
    "read_lesion_cases",
    "score_map",
    "summarize_localization",
]
