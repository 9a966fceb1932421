"""Training-step overhead: tuner's step under Lightning against a bare PyTorch loop doing the same math.

Both run in this process on the tiny SD 1.5 pipeline, with the same batch, the same LoRA, AdamW and
gradient clipping. They alternate step by step (a bare step runs between two of tuner's), so drift on
the machine hits both alike; the figure is the ratio of median per-step times. Last line: ``key=value`` pairs.

    python bench/step_overhead.py [--steps 30] [--rounds 5] [--batch 4] [--resolution 64] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _compose(demo: Path, out: Path, args):
    from common import compose_config

    from tuner.run import prepare

    cfg = compose_config(
        [
            f"demo_assets_dir={demo}",
            f"output_dir={out}",
            f"max_train_steps={args.steps}",
            "checkpointing_steps=0",
            "logger=csv",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            f"data.batch_size={args.batch}",
            f"data.resolution={args.resolution}",
            "data.caption_dropout_probability=0",
            "callbacks.ema.enabled=false",  # the tiny preset turns these on; the bench times the step alone
            "callbacks.validation.enabled=false",
        ]
    )
    return prepare(cfg)


def _module(cfg):
    from hydra.utils import instantiate

    from tuner.runtime.model import optimizer_factory

    torch.manual_seed(cfg.seed)
    return instantiate(
        cfg.model, optimizer=optimizer_factory(cfg), lr_scheduler=instantiate(cfg.lr_scheduler), seed=cfg.seed
    )


class BareLoop:
    """The same math written out by hand: VAE encode, CLIP encode, noise, UNet, MSE, clipping, AdamW."""

    def __init__(self, cfg, batch):
        module = _module(cfg)
        self.unet, self.vae, self.te, self.tok = module.unet, module.vae, module.text_encoder, module.tokenizer
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
        self.acp, self.batch, self.max_norm = module.noise.alphas_cumprod, batch, cfg.max_grad_norm
        self.n = 0

    def step(self) -> float:
        t0 = time.perf_counter()
        batch, g = self.batch, torch.Generator().manual_seed(self.n)
        self.n += 1
        with torch.no_grad():
            latents = self.vae.encode(batch["pixels"]).latent_dist.sample(generator=g) * self.vae.config.scaling_factor
            ids = self.tok(batch["captions"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            hidden = self.te(ids.input_ids)[0]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
        a = self.acp[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = self.unet(noisy, t, encoder_hidden_states=hidden).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()  # the project logs the loss every step, which reads it back
        return time.perf_counter() - t0


def plain_lightning_module(cfg, batch):
    """The bare loop's math as the training_step of a minimal LightningModule: Lightning's own cost."""
    import lightning as L

    inner = BareLoop(cfg, batch)

    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.unet, self.vae, self.te = inner.unet, inner.vae, inner.te

        def training_step(self, b, i):
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                latents = self.vae.encode(b["pixels"]).latent_dist.sample(generator=g) * self.vae.config.scaling_factor
                ids = inner.tok(
                    b["captions"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
                )
                hidden = self.te(ids.input_ids)[0]
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
            a = inner.acp[t].view(-1, 1, 1, 1)
            pred = self.unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, encoder_hidden_states=hidden).sample
            return torch.nn.functional.mse_loss(pred, noise)

        def configure_optimizers(self):
            return inner.opt

    return Plain()


def interleaved(cfg, batch, plain: bool = False) -> tuple[list[float], list[float]]:
    """Run tuner's own fit (Lightning loop, hooks, logging, clipping, scheduler) and, between its
    steps, one bare step. A project step is the wall time from one batch start to the next, less the
    bare step run inside it; both see the same machine at the same moment."""
    import lightning as L

    from tuner.run import build_trainer

    bare = BareLoop(cfg, batch)
    starts: list[float] = []
    bare_times: list[float] = []

    class Interleave(L.Callback):
        def on_train_batch_start(self, *a):
            starts.append(time.perf_counter())

        def on_train_batch_end(self, *a):
            bare_times.append(bare.step())

    loader = torch.utils.data.DataLoader([batch] * cfg.max_train_steps, batch_size=None)
    if plain:
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=cfg.max_train_steps,
            gradient_clip_val=cfg.max_grad_norm,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Interleave()],
        )
        trainer.fit(plain_lightning_module(cfg, batch), train_dataloaders=loader)
    else:
        trainer = build_trainer(cfg, Path(cfg.output_dir))
        trainer.callbacks.append(Interleave())
        trainer.fit(_module(cfg), train_dataloaders=loader)
    project = [b - a - t for a, b, t in zip(starts, starts[1:], bare_times, strict=False)]
    return project, bare_times[: len(project)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped from the start of each run")
    parser.add_argument("--smoke", action="store_true", help="4 steps, 1 round, batch 1: checks the code path")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds, args.batch, args.warmup = 4, 1, 1, 1

    import logging

    logging.disable(logging.WARNING)
    from datamodules.datamodule import DiffusionDataModule, collate
    from datamodules.demo import write_images
    from tuner.config.families import write_tiny

    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp) / "demo"
        write_tiny("sd15", demo / "sd15")
        write_images(demo / "images")
        cfg = _compose(demo, Path(tmp) / "out", args)
        dm = DiffusionDataModule(**{k: v for k, v in cfg.data.items() if not k.startswith("_")})
        dm.scan()
        square = [i for i, s in enumerate(dm.samples) if s.bucket[0] == s.bucket[1]]
        from datamodules.datamodule import BucketedImageDataset

        ds = BucketedImageDataset(dm.samples, dm.sources, 0)
        batch = collate([ds[(i, 0)] for i in (square * args.batch)[: args.batch]])

        project, bare, plain, bare2 = [], [], [], []
        for _ in range(args.rounds):
            p, b = interleaved(cfg, batch)
            project += p[args.warmup :]
            bare += b[args.warmup :]
            p, b = interleaved(cfg, batch, plain=True)
            plain += p[args.warmup :]
            bare2 += b[args.warmup :]
    med = statistics.median
    step_ratio = med(project) / med(bare)
    lightning_ratio = med(plain) / med(bare2)  # what Lightning's loop alone costs over the bare loop
    print(f"tuner step:      median {med(project) * 1e3:.2f} ms (bare alongside: {med(bare) * 1e3:.2f} ms)")
    print(f"plain Lightning: median {med(plain) * 1e3:.2f} ms (bare alongside: {med(bare2) * 1e3:.2f} ms)")
    print(
        f"step_ratio={step_ratio:.3f} lightning_ratio={lightning_ratio:.3f} "
        f"tuner_over_lightning={step_ratio / lightning_ratio:.3f} project_ms={med(project) * 1e3:.2f} "
        f"bare_ms={med(bare) * 1e3:.2f} batch={args.batch} resolution={args.resolution}"
    )


if __name__ == "__main__":
    main()
