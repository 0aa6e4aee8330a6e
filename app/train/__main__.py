"""`vald-md train MODE ...` (and ``python -m app.train MODE ...``): pick the technique and run it.

Dispatch only; each technique is one module of this package:

* ``vae``, ``vae-decoder`` -- ``app.train.vae``: from-scratch stage 1 (the autoencoder) and 1b (its decoder).
* ``unet``                 -- ``app.train.unet``: from-scratch stage 2 (the text-conditioned UNet), ``--package``.
* ``dreambooth``           -- ``app.train.dreambooth``: the paper's fine-tuning of a full model folder.
* ``lungs``                -- ``app.train.lungs``: the lung-field segmenter.
* ``lesions``              -- ``app.train.lesions``: the lung-only lesion classifier.
* ``lesion-finetune``      -- ``app.train.finetune``: a model's UNet fine-tuned against source shortcuts.

The first four share one parser (``app.train.arguments``); the config TOML is read and checked
(``app.train.config``) before anything loads.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from app.train.arguments import parse_args
from app.train.config import ConfigError, TrainConfig, load_config

# the tables each config-driven mode reads; the `lr` table that --learning-rate overrides
NEEDS: dict[str, tuple[str, ...]] = {"vae": ("data", "vae"), "vae-decoder": ("data", "vae_decoder"),
                                     "unet": ("data", "unet", "text_encoder", "prompts"), "dreambooth": ()}
LR_SECTION = {"vae": "vae", "vae-decoder": "vae_decoder", "unet": "unet"}


def main(args: argparse.Namespace) -> int:
    """Run the mode ``args`` (from :func:`app.train.arguments.parse_args`) selects.

    Returns:
        The process exit code.

    Raises:
        ConfigError: ``--config`` is unreadable or does not match the tables the mode needs.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, NEEDS[args.mode]) if args.config else TrainConfig(path=None, raw={})
    section = LR_SECTION.get(args.mode)
    if section and args.learning_rate is not None:  # the effective value is what manifests record
        cfg = cfg.with_lr(section, args.learning_rate)
    if args.mode in ("vae", "vae-decoder"):
        from app.train import vae

        return vae.train_vae(args, cfg) if args.mode == "vae" else vae.train_vae_decoder(args, cfg)
    if args.mode == "unet":
        from app.train import unet

        return unet.train_unet(args, cfg)
    from app.train import dreambooth

    return dreambooth.train_dreambooth(args)


def run(argv: list[str]) -> int:
    """``vald-md train`` with ``argv`` the words after ``train``; returns the process exit code.

    A config that does not match its tables is reported on stderr (exit code 2), before anything loads.
    """
    try:
        if argv[:1] == ["lungs"]:
            from app.train import lungs

            return lungs.main(lungs.parse_args(argv[1:]))
        if argv[:1] == ["lesions"]:
            from app.train import lesions

            return lesions.main(lesions.parse_args(argv[1:]))
        if argv[:1] == ["lesion-finetune"]:
            from app.train import finetune

            return finetune.main(finetune.parse_args(argv[1:]))
        return main(parse_args(argv))
    except ConfigError as exc:
        sys.stderr.write(f"vald-md train: error: {exc}\n")
        return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(run(sys.argv[1:]))
