"""The review web app: ``create_app(settings, engine=None)`` (see :mod:`app.web.app`). Nothing imports this package
except the command line."""

from app.web.app import create_app

__all__ = ["create_app"]
