"""The embedded model's components on the CPU in fp32 / bf16 autocast, NCHW / channels-last (issue 15, lever 3).

Times the autoencoder's decode of one 32 x 32 latent, its encode of one 256 px image, and one UNet call on a CFG
batch of 2, in each of the four combinations (median of ``--runs`` after one warm-up). The measurement behind
``CounterfactualEngine(cpu_autocast=True)``: the autoencoder under bf16 autocast and channels-last, the UNet fp32.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/autocast_components.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--runs", type=int, default=5, help="timed repetitions per measurement (default 5)")
    args = p.parse_args(argv)
    import torch

    from app.engine import CounterfactualEngine

    torch.set_num_threads(args.threads)
    eng = CounterfactualEngine(None, device="cpu")  # fp32, no autocast: this script switches it itself
    vae, unet = eng.pipe.vae, eng.pipe.unet
    size = eng.info.image_size
    z = torch.randn(1, unet.config.in_channels, size // eng.pipe.vae_scale_factor, size // eng.pipe.vae_scale_factor)
    x = torch.randn(1, eng.info.image_channels, size, size)
    pos, neg = eng.prompt_embeddings("normal chest x-ray", "")
    emb, zz = torch.cat([neg, pos]), torch.cat([z, z])

    def ms(f: Callable[[], object]) -> float:
        f()
        ts = []
        for _ in range(args.runs):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return round(1e3 * float(np.median(ts)), 1)

    out = {}
    with torch.no_grad():
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            vae.to(memory_format=fmt)
            unet.to(memory_format=fmt)
            for autocast in (False, True):
                def ctx() -> object:
                    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)  # noqa: B023 - used in this iteration only

                def dec() -> None:
                    with ctx():
                        vae.decode(z)

                def enc() -> None:
                    with ctx():
                        vae.encode(x)

                def step() -> None:
                    with ctx():
                        unet(zz, 500, encoder_hidden_states=emb)

                key = f"{'bf16 autocast' if autocast else 'fp32'}, {'channels-last' if channels_last else 'NCHW'}"
                out[key] = {"vae_decode_ms": ms(dec), "vae_encode_ms": ms(enc), "unet_cfg_step_ms": ms(step)}
    sys.stdout.write(json.dumps({"threads": args.threads, "runs": args.runs, "results": out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
