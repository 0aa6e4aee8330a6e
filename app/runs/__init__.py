"""Review runs: one package for what a run writes and everything that reads it.

=====================  ==========================================================================================
:mod:`.review`         one review run end to end (``ReviewRequest``, ``run_review``): decode -> counterfactual ->
                       attribution -> the run folder's files
:mod:`.record`         ``record.json`` as a type (``RunRecord``, ``RunParameters``), byte-compatible with every
                       record written
:mod:`.folder`         the run folder's file names and the one reader of them, with SHA-256 checks (``RunFolder``)
:mod:`.read`           what every export shows, rebuilt from the folder (map, overlay with legend, facts)
:mod:`.exports`        annotated PNG, JSON record, ZIP bundle; ``build_export`` / ``save_export``
:mod:`.dicom_sc`       the DICOM Secondary Capture export
=====================  ==========================================================================================

Nothing is imported here: the read side (record, folder, read, exports, dicom_sc) stays free of the engine and
torch, which only :mod:`.review` loads.
"""
