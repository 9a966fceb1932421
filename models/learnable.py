"""Tiny pipelines whose frozen parts behave like real ones, so that a family can be shown to learn
(``python -m tuner.tiny FAMILY DIR --learnable``; ``bench/learn.py``).

A tiny *random* VAE is useless for that: its posterior std is about 1 while its means spread by about
0.2, so a cached latent is nearly pure noise, and its decoder returns noise whatever it is given. Here
the VAE is fitted for a few hundred steps on generated shapes (``toy_images``) so that:

- the posterior is nearly deterministic: the log-variance half of ``conv_out`` is fixed at
  ``LOGVAR`` (std ~1e-3), far below the spread of the means;
- its latents have zero mean and unit variance on images, through ``scaling_factor`` (and
  ``shift_factor`` where the family's VAE has one), as the real checkpoints' factors are chosen;
- the decoder roughly inverts the encoder, so a sample can be judged in pixels.

The fit uses generic shapes (random rectangles and ellipses in random colours), not a benchmark's
classes. Random tiny text encoders already give different prompts different embeddings
(``prompt_spread`` measures it); the denoiser stays random. Pixel-space families (IF) have no VAE, so
only the text side matters for them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOGVAR = -14.0  # posterior log-variance: std = exp(-7) ~ 1e-3
FIT_STEPS = 300
FIT_SIZE = 32  # the VAE is convolutional: fitted at 32 px (4x cheaper), it serves 64 px as well


def toy_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` images (n, 3, size, size) in [-1, 1]: a plain background with one to three rectangles or
    ellipses, every colour and box drawn from ``generator``."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        image = torch.rand(3, 1, 1, generator=generator).expand(3, size, size).clone()
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            cx, cy, rx, ry = (torch.rand(4, generator=generator) * torch.tensor([1, 1, 0.35, 0.35]) + torch.tensor([0, 0, 0.08, 0.08])) * size
            if torch.rand(1, generator=generator) < 0.5:
                inside = ((xs - cx).abs() <= rx) & ((ys - cy).abs() <= ry)
            else:
                inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
            image[:, inside] = torch.rand(3, 1, generator=generator)
        out[i] = image * 2 - 1
    return out


def _freeze_logvar(vae) -> None:
    """Fix the posterior's log-variance at LOGVAR: the log-variance half of ``conv_out`` (and of the
    quant conv, set to the identity) gives a constant, and its gradients are masked off."""
    latent = vae.config.latent_channels
    conv = vae.encoder.conv_out
    with torch.no_grad():
        conv.weight[latent:].zero_()
        conv.bias[latent:].fill_(LOGVAR)
        if vae.quant_conv is not None:
            vae.quant_conv.weight.copy_(torch.eye(2 * latent).view(2 * latent, 2 * latent, 1, 1))
            vae.quant_conv.bias.zero_()
            vae.quant_conv.requires_grad_(False)
    mask = torch.ones_like(conv.weight)
    mask[latent:] = 0
    conv.weight.register_hook(lambda g: g * mask)
    conv.bias.register_hook(lambda g: torch.cat([g[:latent], torch.zeros_like(g[latent:])]))


def fit_vae(vae, seed: int = 0, steps: int = FIT_STEPS, lr: float = 3e-3) -> dict[str, float]:
    """Fit ``vae`` (in place) into a nearly deterministic autoencoder of ``toy_images`` whose latents,
    after its ``shift_factor``/``scaling_factor``, have zero mean and unit variance; returns what was
    measured on held-out images (``reconstruction_mse``, ``posterior_std``, ``mean_spread``)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    _freeze_logvar(vae)
    vae.train()
    params = [p for p in vae.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        images = toy_images(8, FIT_SIZE, generator)
        mean = vae.encode(images).latent_dist.mean
        recon = vae.decode(mean).sample
        # per-channel moments pulled to (0, 1): the latent space a denoiser expects
        moments = mean.mean(dim=(0, 2, 3)).pow(2).mean() + (mean.std(dim=(0, 2, 3)) - 1).pow(2).mean()
        loss = F.mse_loss(recon, images) + 0.01 * moments
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    vae.eval()
    return _set_factors(vae, toy_images(64, FIT_SIZE, generator))


@torch.no_grad()
def _set_factors(vae, images: torch.Tensor) -> dict[str, float]:
    posterior = vae.encode(images).latent_dist
    mean = posterior.mean
    shift = float(mean.mean()) if vae.config.shift_factor is not None else 0.0
    if vae.config.shift_factor is None and vae.post_quant_conv is not None:
        # no shift_factor in this VAE's config (SD's): fold the channels' residual means into the quant
        # convs' biases instead, exactly (both are 1x1), so the latents are centred all the same
        centre = mean.mean(dim=(0, 2, 3))
        latent = vae.config.latent_channels
        vae.quant_conv.bias[:latent] -= centre
        weight = vae.post_quant_conv.weight[:, :, 0, 0]
        vae.post_quant_conv.bias += weight @ centre
        mean = mean - centre.view(1, -1, 1, 1)
    scale = 1.0 / float((mean - shift).std())
    vae.register_to_config(scaling_factor=scale, shift_factor=shift if vae.config.shift_factor is not None else None)
    recon = vae.decode(vae.encode(images).latent_dist.mean).sample
    return {
        "reconstruction_mse": float(F.mse_loss(recon, images)),
        "posterior_std": float(posterior.std.mean()),
        "mean_spread": float(mean.std()),
        "scaling_factor": scale,
        "shift_factor": shift,
    }


def prompt_spread(pipe, prompts: list[str]) -> float:
    """The smallest distance between two prompts' embeddings (of the first text encoder, mean over
    tokens, over the embeddings' overall scale): how clearly a text encoder tells them apart."""
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    tokens = tokenizer(prompts, padding="max_length", max_length=min(tokenizer.model_max_length, 64),
                       truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(tokens.input_ids)[0].float()
    flat = hidden.flatten(1)
    scale = flat.norm(dim=1).mean()
    gaps = [float((flat[i] - flat[j]).norm() / scale) for i in range(len(prompts)) for j in range(i)]
    return min(gaps) if gaps else math.inf


# A random CLIP's outputs are dominated by its position embeddings (its token embeddings start as small as
# they are): "a square at the top left" and "... top right" came out 7-16% apart. Real token embeddings
# carry the words; scaled up, they bring two such prompts about 30% apart.
CLIP_TOKEN_SCALE = 20.0


def sharpen_text_encoders(pipe) -> None:
    """Make the tiny CLIP text encoders tell prompts apart (T5 already does: ~0.9 apart)."""
    for name, module in pipe.components.items():
        if name.startswith("text_encoder") and type(module).__name__.startswith("CLIPTextModel"):
            with torch.no_grad():
                module.get_input_embeddings().weight.mul_(CLIP_TOKEN_SCALE)


def make_learnable(pipe, seed: int = 0) -> dict[str, float]:
    """Fit the pipeline's VAE (if it has one) and sharpen its text encoders, in place; returns what was
    measured."""
    sharpen_text_encoders(pipe)
    vae = getattr(pipe, "vae", None)
    return fit_vae(vae, seed) if vae is not None else {}
