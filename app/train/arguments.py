"""The command line of ``vald-md train vae|vae-decoder|unet|dreambooth``: flags, and the checks between them."""

from __future__ import annotations

import argparse

import torch

DESCRIPTION = "`vald-md train`: produce VALD-MD models."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``vald-md train MODE ...``; incompatible flags are rejected here, before anything loads."""
    p = argparse.ArgumentParser(prog="vald-md train", description=DESCRIPTION)
    p.add_argument("mode", choices=["vae", "vae-decoder", "unet", "dreambooth"],
                   help="what to train (see the module docstring)")
    p.add_argument("--data", required=True, help="labelled CSV (path,label[,split][,caption]) or a class-folder tree")
    p.add_argument("--output-dir", required=True, help="run folder: checkpoints, loss.csv, loss.png, results")
    p.add_argument("--config", default=None, help="TOML with architecture/schedule (vae, unet modes)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, noise and initialisation")
    p.add_argument("--max-steps", type=int, default=None, help="override the configured number of steps")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint file to continue from")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop this invocation after N minutes (validate + checkpoint first); resume later")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--vae", default=None, help="unet mode: the trained autoencoder folder (OUT/vae-best)")
    p.add_argument("--package", default=None,
                   help="unet mode: after training, write the complete diffusers model folder here")
    d = p.add_argument_group("dreambooth mode (the paper's fine-tuning; defaults are the paper's)")
    d.add_argument("--model", default=None,
                   help="starting model folder (diffusers format, e.g. `model assemble`); vae-decoder: the model "
                   "folder whose autoencoder --package replaces")
    d.add_argument("--split", default="train", help="rows of this split column (default train)")
    d.add_argument("--stages", default="auto",
                   help="LABEL:STEPS,... in order; 'auto' = normal 1200 steps then 500 per disease class (paper)")
    d.add_argument("--resolution", type=int, default=512, help="training resolution in pixels (paper 512)")
    d.add_argument("--train-batch-size", type=int, default=2, help="instance images per step (paper 2)")
    d.add_argument("--learning-rate", type=float, default=None,
                   help="AdamW learning rate (dreambooth: paper 5e-5; vae, vae-decoder, unet: overrides the "
                   "config's lr, e.g. for a second, lower-rate round from a trained model)")
    d.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimiser step")
    d.add_argument("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"],
                   help="accelerate mixed precision (paper bf16; use 'no' on CPU)")
    d.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    d.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes AdamW8bit when installed")
    d.add_argument("--use-ema", action="store_true", help="keep an EMA of the UNet and save it")
    d.add_argument("--no-train-text-encoder", dest="train_text_encoder", action="store_false",
                   help="train the UNet only (default: joint text-encoder fine-tuning, as in the paper)")
    d.add_argument("--no-prior-preservation", dest="with_prior_preservation", action="store_false",
                   help="disable class-specific prior preservation (on by default)")
    d.add_argument("--class-prompt", default="chest x-ray", help="generic class prompt for the prior images")
    d.add_argument("--class-data-dir", default=None, help="folder of prior PNGs (generated when too few)")
    d.add_argument("--num-class-images", type=int, default=200, help="prior images to use/generate")
    d.add_argument("--prior-steps", type=int, default=50, help="sampling steps when generating prior images")
    d.add_argument("--prior-loss-weight", type=float, default=1.0, help="weight of the prior-preservation loss")
    d.add_argument("--checkpointing-steps", type=int, default=250, help="checkpoint every N steps")
    d.add_argument("--validation-steps", type=int, default=250,
                   help="write validation counterfactuals every N steps (0 = never)")
    d.add_argument("--save-fp16", action="store_true", help="store the output weights in fp16")
    args = p.parse_args(argv)
    if args.mode in ("vae", "vae-decoder", "unet") and not args.config:
        p.error(f"mode {args.mode} needs --config (e.g. configs/vald-md-mini.toml)")
    if args.mode in ("unet", "vae-decoder") and not args.vae:
        p.error(f"mode {args.mode} needs --vae (the folder written by mode vae, e.g. RUN/vae-best)")
    if args.mode == "vae-decoder" and args.package and not args.model:
        p.error("mode vae-decoder with --package needs --model (the model folder whose autoencoder it replaces)")
    if args.mode == "dreambooth" and not args.model:
        p.error("mode dreambooth needs --model (a diffusers folder, e.g. from `vald-md model assemble`)")
    if args.mode == "dreambooth" and args.mixed_precision != "no" and not torch.cuda.is_available():
        p.error(f"--mixed-precision {args.mixed_precision} needs a GPU; pass --mixed-precision no on CPU")
    if args.mode == "dreambooth" and args.learning_rate is None:
        args.learning_rate = 5e-5
    if args.package and args.mode not in ("unet", "vae-decoder"):
        p.error("--package applies to modes unet and vae-decoder only")
    return args
