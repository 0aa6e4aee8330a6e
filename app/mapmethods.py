"""Attribution-map methods beyond the SDEdit difference map, computed with a loaded engine.

=====================  ==========================================================================================
``diffedit``           DiffEdit-style noise contrast (Couairon et al. 2022): noise the input's latent to
                       ``strength``, predict the noise under the healthy and the disease prompt, average
                       ``|eps_healthy - eps_disease|`` over channels and ``draws`` noise draws; upsampled to the
                       model frame
``classifier_guided``  classifier-guided SDEdit counterfactual (FastDiME-style); the map is
                       ``|reference - counterfactual|`` as for the product map
``ddim_inversion``     DDIM inversion instead of SDEdit noise (Mokady et al. 2023; Song et al. 2021): the input's
                       latent is inverted deterministically to ``strength`` under the empty prompt, then denoised
                       twice from that same latent, under the healthy prompt with guidance (the counterfactual)
                       and under the empty prompt (the reconstruction); the map is ``|reconstruction -
                       counterfactual|``, so only what the prompt changed remains (no SDEdit noise draw)
``classifier_grad``    input gradient of the lesion classifier's disease logit (SmoothGrad over ``draws`` noisy
                       copies), positive part: where more density would raise the disease score
=====================  ==========================================================================================

All functions take the letterboxed model-frame image (S, S) float32 in [0, 1] and return a float32 (S, S) map,
higher = more attributed. Seeds are explicit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from app.engine import CounterfactualEngine


@torch.no_grad()
def diffedit_contrast(engine: CounterfactualEngine, img_model: NDArray[np.float32], *,
                      healthy_prompt: str = "normal chest x-ray", disease_prompt: str = "COVID 19",
                      strength: float = 0.5, draws: int = 8, seed: int = 0) -> NDArray[np.float32]:
    """DiffEdit noise contrast; see the module table. ``strength`` in (0, 1]: noise level as a share of T."""
    pipe = engine.pipe
    x = engine.to_model_tensor(img_model) * 2 - 1
    z0 = pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor
    sched = pipe.scheduler
    t_idx = min(int(strength * sched.config.num_train_timesteps), sched.config.num_train_timesteps - 1)
    t = torch.tensor([t_idx], device=engine.device)
    pos, _ = engine.prompt_embeddings(healthy_prompt, "")
    dis, _ = engine.prompt_embeddings(disease_prompt, "")
    gen = torch.Generator("cpu").manual_seed(seed)
    acc = torch.zeros(z0.shape[-2:], device=engine.device)
    for _ in range(draws):
        noise = torch.randn(z0.shape, generator=gen, dtype=torch.float32).to(engine.device, z0.dtype)
        zt = sched.add_noise(z0, noise, t)
        eps = pipe.unet(torch.cat([zt, zt]), t, encoder_hidden_states=torch.cat([pos, dis])).sample
        acc += (eps[0] - eps[1]).float().abs().mean(0)
    m = F.interpolate((acc / draws)[None, None], size=img_model.shape, mode="bilinear", align_corners=False)
    return m[0, 0].cpu().numpy().astype(np.float32)


def classifier_gradient(classifier: Any, img_model: NDArray[np.float32], lungs: NDArray[np.bool_], *,
                        draws: int = 8, noise: float = 0.02, seed: int = 0) -> NDArray[np.float32]:
    """SmoothGrad of the lesion classifier's disease logit w.r.t. the image, positive part; see the module table.

    Args:
        classifier: an ``app.lesions.LesionClassifier``. lungs: bool (S, S) lung mask of ``img_model``.
        draws: noisy copies averaged; noise: their Gaussian sigma in image units ([0, 1] range).
    """
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(img_model, dtype=np.float32))
    acc = torch.zeros_like(x)
    for _ in range(draws):
        xi = (x + noise * torch.randn(x.shape, generator=gen)).requires_grad_(True)
        logit = classifier.logit_tensor(xi, lungs)
        (g,) = torch.autograd.grad(logit.sum(), xi)
        acc += g
    return torch.clamp(acc / draws, min=0).numpy().astype(np.float32)


@dataclass
class InversionResult:
    """A DDIM-inversion counterfactual in the model frame: float32 (1, S, S) in [0, 1] and the reconstruction
    (S, S) denoised from the same inverted latent under the source prompt (the map's reference)."""

    counterfactuals: NDArray[np.float32]
    reconstruction: NDArray[np.float32]


@torch.no_grad()
def ddim_inversion(engine: CounterfactualEngine, img_model: NDArray[np.float32], *,
                   prompt: str = "normal chest x-ray", source_prompt: str = "", strength: float = 0.3,
                   steps: int = 50, guidance_scale: float = 7.5) -> InversionResult:
    """DDIM-inversion counterfactual and reconstruction; see the module table. Deterministic (no noise draw).

    Steps: 1. encode the input (posterior mode); 2. invert with DDIM (eta 0) through the last
    ``int(steps x strength)`` timesteps of a ``steps``-step schedule, the noise predicted under ``source_prompt``
    at each target timestep (the usual approximation); 3. denoise from the inverted latent twice in one batch: with
    classifier-free guidance towards ``prompt`` (the counterfactual) and under ``source_prompt`` alone (the
    reconstruction, which undoes the inversion up to its approximation error); 4. decode both.

    Args:
        img_model: (S, S) float32 in [0, 1], the model frame. strength: (0, 1]; steps: DDIM steps at strength 1;
        guidance_scale: classifier-free guidance of the counterfactual (>= 1).
    """
    from diffusers import DDIMScheduler

    pipe = engine.pipe
    vae, unet, sf = pipe.vae, pipe.unet, float(pipe.vae.config.scaling_factor)
    sched = DDIMScheduler.from_config(engine._base_scheduler_config)
    sched.set_timesteps(steps, device=engine.device)
    n_eff = max(1, int(steps * strength))
    timesteps = sched.timesteps[steps - n_eff:]  # descending
    stride = sched.config.num_train_timesteps // steps
    pos, neg = engine.prompt_embeddings(prompt, "")
    src = neg if source_prompt == "" else engine.prompt_embeddings(source_prompt, "")[0]

    def alpha(t: int) -> torch.Tensor:
        a: torch.Tensor = sched.alphas_cumprod[t] if t >= 0 else sched.final_alpha_cumprod
        return a

    def gray(decoded: torch.Tensor) -> NDArray[np.float32]:
        return ((decoded.float().mean(1).clamp(-1, 1) + 1) / 2).cpu().numpy().astype(np.float32)

    with engine.lock:
        z = vae.encode(engine.to_model_tensor(img_model) * 2 - 1).latent_dist.mode() * sf
        for t in reversed(timesteps):  # ascending: from level t - stride up to level t
            a_prev, a_t = alpha(int(t) - stride).to(z.dtype), alpha(int(t)).to(z.dtype)
            eps = unet(z, t, encoder_hidden_states=src).sample
            z0_hat = (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            z = a_t.sqrt() * z0_hat + (1 - a_t).sqrt() * eps
        z_cf, z_rec = z, z.clone()
        emb = torch.cat([neg, pos, src])
        for t in timesteps:
            e_u, e_c, e_r = unet(torch.cat([z_cf, z_cf, z_rec]), t, encoder_hidden_states=emb).sample.chunk(3)
            z_cf = sched.step(e_u + guidance_scale * (e_c - e_u), t, z_cf).prev_sample
            z_rec = sched.step(e_r, t, z_rec).prev_sample
        out = gray(vae.decode(torch.cat([z_cf, z_rec]) / sf).sample)
    return InversionResult(counterfactuals=out[:1], reconstruction=out[1])


@dataclass
class GuidedResult:
    """A classifier-guided counterfactual in the model frame: float32 (1, S, S) in [0, 1], the autoencoder's
    reconstruction (S, S), and the classifier's disease logit of the input and of the counterfactual."""

    counterfactuals: NDArray[np.float32]
    reconstruction: NDArray[np.float32]
    logit_input: float
    logit_counterfactual: float


def classifier_guided(engine: CounterfactualEngine, classifier: Any, img_model: NDArray[np.float32],
                      lungs: NDArray[np.bool_], *, prompt: str = "normal chest x-ray", strength: float = 0.3,
                      steps: int = 50, guidance_scale: float = 7.5, classifier_scale: float = 0.3,
                      seed: int = 0) -> GuidedResult:
    """Classifier-guided SDEdit (DDIM, eta 0), in the manner of FastDiME (Weng et al. 2023).

    Steps: 1. encode the input (posterior mode) and noise it to ``strength`` with a seeded draw; 2. at every DDIM
    step, predict the noise with classifier-free guidance, form the clean-latent estimate ``z0``, decode it, take
    the gradient of the classifier's disease logit w.r.t. ``z0`` (the UNet is not back-propagated), move ``z0``
    against it by ``classifier_scale`` latent standard deviations (gradient normalised to unit RMS) and re-derive
    the noise from the moved ``z0``; 3. decode.

    Args:
        img_model: (S, S) float32 in [0, 1], the model frame. lungs: bool (S, S) lung mask of it.
        strength: (0, 1]; steps: DDIM steps at strength 1; guidance_scale: classifier-free guidance;
        classifier_scale: >= 0, the step against the disease gradient per denoising step (0 = plain DDIM SDEdit).
    """
    from diffusers import DDIMScheduler

    pipe = engine.pipe
    vae, unet, sf = pipe.vae, pipe.unet, float(pipe.vae.config.scaling_factor)
    sched = DDIMScheduler.from_config(engine._base_scheduler_config)
    sched.set_timesteps(steps, device=engine.device)
    n_eff = max(1, int(steps * strength))
    timesteps = sched.timesteps[steps - n_eff:]
    pos, neg = engine.prompt_embeddings(prompt, "")
    emb = torch.cat([neg, pos])
    gen = torch.Generator("cpu").manual_seed(seed)

    def gray(decoded: torch.Tensor) -> torch.Tensor:
        return ((decoded.float().mean(1)[0].clamp(-1, 1) + 1) / 2)

    with engine.lock:
        with torch.no_grad():
            x = engine.to_model_tensor(img_model) * 2 - 1
            z0 = vae.encode(x).latent_dist.mode() * sf
            noise = torch.randn(z0.shape, generator=gen, dtype=torch.float32).to(engine.device, z0.dtype)
            z = sched.add_noise(z0, noise, timesteps[:1])
            logit_in = float(classifier.logit_tensor(torch.from_numpy(img_model.astype(np.float32)), lungs))
        for t in timesteps:
            with torch.no_grad():
                e_u, e_c = unet(torch.cat([z, z]), t, encoder_hidden_states=emb).sample.chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
                a = sched.alphas_cumprod[int(t)].to(z.dtype)
                z0_hat = (z - (1 - a).sqrt() * eps) / a.sqrt()
            if classifier_scale > 0:
                z0_req = z0_hat.detach().float().requires_grad_(True)
                img_hat = gray(vae.decode(z0_req.to(z.dtype) / sf).sample).cpu()
                logit = classifier.logit_tensor(img_hat, lungs)
                (g,) = torch.autograd.grad(logit, z0_req)
                g = g / (g.pow(2).mean().sqrt() + 1e-12)
                with torch.no_grad():
                    z0_hat = z0_hat - classifier_scale * z0_hat.std() * g.to(z0_hat.dtype)
                    eps = (z - a.sqrt() * z0_hat) / (1 - a).sqrt()
            with torch.no_grad():
                z = sched.step(eps, t, z).prev_sample
        with torch.no_grad():
            cf = gray(vae.decode(z / sf).sample).cpu()
            logit_cf = float(classifier.logit_tensor(cf, lungs))
            recon = engine.reconstruct_model_frame(img_model)
    return GuidedResult(counterfactuals=cf.numpy()[None].astype(np.float32), reconstruction=recon,
                        logit_input=logit_in, logit_counterfactual=logit_cf)
