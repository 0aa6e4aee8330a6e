"""`vald-md train`: produce VALD-MD models (entry point: ``app.train.__main__``).

One module per technique -- ``vae`` (from-scratch stages 1 and 1b), ``unet`` (stage 2 and the model folder),
``dreambooth`` (the paper's fine-tuning), ``lungs`` (segmenter), ``lesions`` (classifier), ``finetune``
(lesion fine-tuning) -- over what they share: ``common`` (data, checkpoints, loss log, progress, run records),
``schedule`` (learning-rate schedules), ``config`` (typed, checked config tables) and ``arguments`` (the
command line of the first three). Every technique checkpoints (``--resume latest``), logs losses to
``loss.csv``, draws ``loss.png`` and prints a progress line with an ETA. Architecture and schedule of the
embedded model live in ``configs/vald-md-mini.toml``.
"""
