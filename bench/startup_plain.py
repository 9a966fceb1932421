"""The peer of tuner's start-up in bench/startup.py: a plain script that loads the same tiny pipeline with
diffusers + transformers + peft + torch, reads one batch of the same images, and takes one LoRA training
step (the math of diffusers' train_text_to_image_lora examples), then writes the time to ``--marker``.

    python bench/startup_plain.py --family sd15|sdxl --pipeline DIR --images DIR --marker FILE
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def batch(images: Path, n: int, size: int) -> torch.Tensor:
    files = sorted(images.glob("*.png"))[:n]
    arrays = [
        np.asarray(Image.open(f).convert("RGB").resize((size, size)), dtype=np.float32) / 127.5 - 1 for f in files
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def encode(tokenizer, encoder, prompts, penultimate: bool):
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    out = encoder(ids, output_hidden_states=True)
    return (out.hidden_states[-2] if penultimate else out[0]), out[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["sd15", "sdxl"], required=True)
    ap.add_argument("--pipeline", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--marker", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=64)
    args = ap.parse_args()
    root = args.pipeline
    torch.manual_seed(0)
    scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet").requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder").requires_grad_(False)
    if args.family == "sdxl":
        tokenizer_2 = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2")
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2").requires_grad_(
            False
        )
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    pixels = batch(args.images, args.batch, args.resolution)
    prompts = ["a photo"] * len(pixels)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        if args.family == "sdxl":
            h1, _ = encode(tokenizer, text_encoder, prompts, penultimate=True)
            h2, pooled = encode(tokenizer_2, text_encoder_2, prompts, penultimate=True)
            hidden = torch.cat([h1, h2], dim=-1)
            size = args.resolution
            time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(pixels), dtype=torch.float32)
            extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        else:
            hidden, _ = encode(tokenizer, text_encoder, prompts, penultimate=False)
            extra = {}
    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=hidden, **extra).sample
    loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    args.marker.write_text(repr(time.time()))


if __name__ == "__main__":
    main()
