"""The plain training loop that bench/gpu_throughput.py measures tuner against.

Written the way a diffusers example script is, without accelerate and without any of tuner's code:
the denoiser from ``from_pretrained`` in bf16 (quantised to int8 with optimum-quanto when asked), a peft
LoRA through diffusers' ``add_adapter`` with only its weights upcast to fp32, the forward under bf16
autocast, MSE in fp32, gradient clipping, AdamW and a constant LR schedule (a ``LambdaLR``). Noise,
timesteps and sigmas are drawn on the device, as the example scripts draw them.

It trains from the batch tuner's latent and text-embedding caches produce (``encoded``: the VAE
posterior's mean and log-variance; ``cond``: prompt embeddings), so no VAE or text encoder runs on
either side.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

# The LoRA targets tuner uses by default for each family (its models/sdxl.py, models/flux.py), written
# out here so that this loop depends on diffusers and peft only.
LORA_TARGETS = {
    "sdxl": ["to_k", "to_q", "to_v", "to_out.0"],
    "flux": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
}
DENOISERS = {"sdxl": "unet", "flux": "transformer"}


def load_denoiser(path: Path, family: str, int8: bool, rank: int, checkpointing: bool) -> torch.nn.Module:
    """The denoiser in bf16 (int8 weights when ``int8``) with a rank-``rank`` LoRA that trains in fp32."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    cls = {"sdxl": UNet2DConditionModel, "flux": FluxTransformer2DModel}[family]
    model = cls.from_pretrained(path, subfolder=DENOISERS[family], torch_dtype=torch.bfloat16)
    model.requires_grad_(False)
    if int8:
        from optimum.quanto import freeze, qint8, quantize

        quantize(model, weights=qint8)
        freeze(model)
    lora = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS[family])
    model.add_adapter(lora)
    cast_training_params(model, dtype=torch.float32)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): Flux's 2x2 patch tokens."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, d = tokens.shape
    patches = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, d // 4, h, w)


def token_positions(h2: int, w2: int, device, dtype) -> torch.Tensor:
    """RoPE positions of the packed tokens: (h2 * w2, 3) rows of (0, row, column)."""
    rows = torch.arange(h2, device=device).repeat_interleave(w2)
    cols = torch.arange(w2, device=device).repeat(h2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)


class PlainLoop:
    """One LoRA training step of an SDXL UNet or a Flux transformer, by hand."""

    def __init__(self, path: Path, family: str, device: torch.device, int8: bool, checkpointing: bool, hp: dict):
        from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler

        self.family, self.device, self.max_grad_norm = family, device, hp["max_grad_norm"]
        self.guidance = hp["guidance"]
        self.model = load_denoiser(path, family, int8, hp["rank"], checkpointing).to(device)
        self.model.train()
        vae = AutoencoderKL.load_config(path, subfolder="vae")
        self.scale, self.shift = vae["scaling_factor"], vae.get("shift_factor") or 0.0
        scheduler_cls = DDPMScheduler if family == "sdxl" else FlowMatchEulerDiscreteScheduler
        self.scheduler = scheduler_cls.from_pretrained(path, subfolder="scheduler")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=hp["lr"], weight_decay=hp["weight_decay"])
        warmup = hp["lr_warmup_steps"]
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, step / warmup) if warmup else 1.0
        )

    def latents(self, encoded: torch.Tensor) -> torch.Tensor:
        """A sample of the cached VAE posterior, shifted and scaled into the latent space."""
        mean, logvar = encoded.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return (mean + std * torch.randn_like(mean) - self.shift) * self.scale

    def sdxl_loss(self, batch: dict) -> torch.Tensor:
        latents = self.latents(batch["encoded"])  # (B, 4, h, w)
        noise = torch.randn_like(latents)
        n = latents.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = (
            noise
            if self.scheduler.config.prediction_type == "epsilon"
            else self.scheduler.get_velocity(latents, noise, t)
        )
        bf16 = torch.bfloat16
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)  # (B, 6)
        added = {"text_embeds": batch["cond"]["pooled"].to(bf16), "time_ids": time_ids.to(bf16)}
        prompt = batch["cond"]["prompt_embeds"].to(bf16)  # (B, 77, 2048)
        pred = self.model(noisy.to(bf16), t, encoder_hidden_states=prompt, added_cond_kwargs=added).sample
        return F.mse_loss(pred.float(), target.float())

    def flux_shift(self, tokens: int) -> float:
        """dev's resolution-dependent shift exp(mu), mu linear in the image's token count; else the fixed one."""
        c = self.scheduler.config
        if not c.use_dynamic_shifting:
            return c.shift
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        return math.exp(c.base_shift + slope * (tokens - c.base_image_seq_len))

    def flux_loss(self, batch: dict) -> torch.Tensor:
        latents = self.latents(batch["encoded"])  # (B, 16, h, w)
        b, _, h, w = latents.shape
        noise = torch.randn_like(latents)
        u = torch.sigmoid(torch.randn(b, device=self.device))  # logit-normal(0, 1), SD3 paper sec. 3.1
        s = self.flux_shift((h // 2) * (w // 2))
        sigmas = s * u / (1 + (s - 1) * u)  # (B,)
        sig = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - sig) * latents + sig * noise
        bf16 = torch.bfloat16
        prompt = batch["cond"]["prompt_embeds"].to(bf16)  # (B, 512, 4096)
        guidance = torch.full((b,), self.guidance, device=self.device) if self.model.config.guidance_embeds else None
        pred = self.model(
            hidden_states=pack(noisy.to(bf16)),
            timestep=sigmas,
            guidance=guidance,
            pooled_projections=batch["cond"]["pooled"].to(bf16),
            encoder_hidden_states=prompt,
            txt_ids=torch.zeros(prompt.shape[1], 3, device=self.device, dtype=bf16),
            img_ids=token_positions(h // 2, w // 2, self.device, bf16),
            return_dict=False,
        )[0]
        return F.mse_loss(unpack(pred, h, w).float(), (noise - latents).float())

    def step(self, batch: dict) -> float:
        """One optimiser step on ``batch`` (CPU tensors, moved here as a training script's loader would be)."""
        batch = {k: _to(v, self.device) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.sdxl_loss(batch) if self.family == "sdxl" else self.flux_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()  # the example scripts log the loss every step


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
