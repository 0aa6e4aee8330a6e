"""VALD-MD: visual attribution via latent diffusion for chest X-rays.

Layering (imports flow one way, checked by tests/test_layering.py):
``config``, ``imaging`` <- ``attribution`` <- ``engine`` <- {``jobs``, ``train``, ``evaluate``} <- ``web`` <- ``cli``;
``audit`` <- {``jobs``, ``web``}. Nothing imports ``web``.
"""

__version__ = "0.1.0"
