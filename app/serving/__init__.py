"""Serving the model beyond this process: a Ray Serve deployment of the engine and the job queue's backend that
runs on it (issue 14). Nothing here imports Ray until a Ray backend is built (``VALD_MD_BACKEND=ray``).

Package layout (imports flow down the list; nothing here imports ``app.web``):

- ``loading``: the optional helper models (lung segmenter, lesion classifier), loaded as the front and every
  replica load them (:func:`load_segmenter`, :func:`load_classifier`);
- ``replica``: one model copy as a Serve deployment, streaming a review's progress (:class:`ReviewReplica`);
- ``backend``: connect or start the cluster, deploy, and run jobs on it with cancel and one retry after a lost
  replica (:class:`RayBackend`, :func:`connect`, :func:`deploy`).
"""

from __future__ import annotations

from app.serving.backend import APP_NAME, RayBackend, connect, deploy, deployment_options
from app.serving.loading import load_classifier, load_segmenter
from app.serving.replica import ReviewReplica, replica_config

__all__ = ["APP_NAME", "RayBackend", "ReviewReplica", "connect", "deploy", "deployment_options", "load_classifier",
           "load_segmenter", "replica_config"]
