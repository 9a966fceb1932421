"""The optimiser side of a family module: the optimiser and schedule built on the trainable parameters, gradient
clipping with the norm logged (and a non-finite step dropped), and a resumed schedule's learning rate. Mixed into
``DiffusionModule``."""

from __future__ import annotations

import torch


class OptimizationMixin:
    def on_train_start(self) -> None:
        # A resume restores the learning rate the old run last set. If the run's length changed
        # (max_train_steps raised to train on), the schedule is a new curve: take its value at this step
        # now, not one step late. With an unchanged length this is the very value restored.
        from torch.optim.lr_scheduler import LambdaLR

        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, LambdaLR) and scheduler.last_epoch > 0:
                lrs = [
                    base * fn(scheduler.last_epoch)
                    for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
                ]
                for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
                    group["lr"] = lr
                scheduler._last_lr = lrs

    def on_before_optimizer_step(self, optimizer) -> None:
        # after backward, before clipping and the update: stochastic rounding's bf16 weights become fp32
        if getattr(self, "rounding", None) is not None:
            self.rounding.before_step()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Clipping computes the total gradient norm anyway; log that one rather than computing it twice.
        # (Lightning calls this after un-scaling fp16 gradients, so the norm is the true one.)
        # A step whose loss or gradient is not finite is dropped here (no gradients: the optimiser leaves
        # every parameter and its state as they were), or stops the run (models/guard.py).
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None  # fp16 skips inf itself
        if self.nonfinite.drop_step(norm, self.trainer, scaled):
            for p in params:
                p.grad = None
            return
        if not params:
            return
        if gradient_clip_val:
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)
        self.log("grad_norm", norm, on_step=True, on_epoch=False)  # before clipping: spikes show here

    def configure_optimizers(self):
        return self.build_optimizer(int(self.trainer.estimated_stepping_batches))

    def build_optimizer(self, num_training_steps: int):
        """The optimiser over the trainable parameters (LoRA+: the B matrices in a group at their own rate) and its
        schedule over ``num_training_steps``, as Lightning takes them."""
        from models.trainable import param_groups, scale_group_rates

        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured")
        lora = self.hparams.lora or {}
        named = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(param_groups(named, lora.get("plus_ratio"), self.trained_text_encoders()))
        scale_group_rates(optimizer, lora.get("text_encoder_lr"))
        self.rounding = None
        if self.hparams.get("stochastic_rounding"):  # bf16 weights updated in fp32, rounded back at random
            from models.rounding import StochasticRounding

            self.rounding = StochasticRounding(optimizer, lambda: (self.hparams.seed, self.trainer.global_step))
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer, num_training_steps=num_training_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}
