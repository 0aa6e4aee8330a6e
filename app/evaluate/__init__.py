"""Evaluation of VALD-MD models: the paper's tables, counterfactual validity, localization and laterality.

Modules: ``common`` (data, seeds, run folders, progress, figures), ``generate`` (bulk counterfactuals and disease
induction, resumable), ``tables`` (Tables 1-4, validity, Figures 2/3), ``oracle`` (the normal-vs-abnormal
classifier), ``localize`` (maps against lesions, baselines, laterality) and ``command`` (``vald-md evaluate``).
Layering: imports ``engine``, ``metrics``, ``attribution`` and ``imaging``; never ``train``, ``jobs`` or ``web``.
"""

from app.evaluate.command import build_parser, main, parse_args

__all__ = ["build_parser", "main", "parse_args"]
