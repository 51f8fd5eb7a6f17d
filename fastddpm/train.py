"""Trainer: Adam on the DDPM loss with warm-up, gradient clipping and an EMA of the weights."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from fastddpm.data import save_image_grid
from fastddpm.diffusion import Diffusion


def ema_with_warmup(decay: float):
    """EMA update for AveragedModel whose decay ramps up as min(decay, (1 + n)/(10 + n)) over the first
    updates, so early averages are not dominated by the random initialisation."""

    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        # num_averaged is a device tensor: the decay stays one too, so the update never syncs with the host.
        n = torch.as_tensor(num_averaged, dtype=torch.float32)
        d = torch.clamp((1 + n) / (10 + n), max=decay)
        torch._foreach_mul_(ema_params, d)
        torch._foreach_add_(ema_params, torch._foreach_mul(params, 1 - d))

    return update


def _infinite_batches(data, batch_size: int, generator: torch.Generator, num_workers: int = 0):
    """Shuffled batches forever: an in-memory tensor is indexed directly, a Dataset goes through a DataLoader."""
    if isinstance(data, torch.Tensor):
        while True:
            perm = torch.randperm(len(data), generator=generator)
            for i in range(0, len(perm) - batch_size + 1, batch_size):
                yield data[perm[i:i + batch_size]]
    else:
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True,
                                             num_workers=num_workers, generator=generator)
        while True:
            yield from loader


class Trainer:
    """Trains ``diffusion`` on ``data`` (a [N, C, H, W] tensor in [0, 1] or a Dataset of such images)."""

    def __init__(self, diffusion: Diffusion, data, *, out: str | os.PathLike, batch_size: int = 64,
                 lr: float = 2e-4, warmup: int = 5000, grad_clip: float = 1.0, ema_decay: float = 0.9999,
                 seed: int = 0, device: str | torch.device = "cpu", num_workers: int = 0):
        if len(data) < batch_size:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({len(data)} images)")
        self.device = torch.device(device)
        self.diffusion = diffusion.to(self.device)
        self.data = data
        self.out = Path(out)
        self.batch_size, self.grad_clip, self.warmup = batch_size, grad_clip, warmup
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.Adam(self.diffusion.model.parameters(), lr=lr, foreach=True)
        # Linear learning-rate warm-up over `warmup` steps, as in the DDPM paper's CIFAR-10 recipe.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: min(1.0, (s + 1) / max(1, warmup)))
        self.ema = AveragedModel(self.diffusion.model, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
        self.step = 0
        self.num_workers = num_workers

    def ema_diffusion(self) -> Diffusion:
        """A Diffusion that shares the schedule and settings but runs the EMA weights."""
        return Diffusion(self.ema.module, **self.diffusion.config, backend=self.diffusion.backend).to(self.device)

    def train(self, steps: int, log_every: int = 50, progress: bool = True) -> list[float]:
        """Run ``steps`` optimisation steps; returns the per-step losses."""
        self.diffusion.train()
        batches = _infinite_batches(self.data, self.batch_size, self.generator, self.num_workers)
        losses = []
        disable = not progress or os.environ.get("FASTDDPM_NO_PROGRESS", "") not in ("", "0")
        with tqdm(range(steps), desc="training", disable=disable) as bar:
            for _ in bar:
                images = next(batches).to(self.device, non_blocking=True)
                loss = self.diffusion(images)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.diffusion.model.parameters(), self.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.ema.update_parameters(self.diffusion.model)
                self.step += 1
                losses.append(loss.detach())
                if self.step % log_every == 0 or self.step == steps:
                    recent = torch.stack(losses[-log_every:]).mean().item()
                    if not math.isfinite(recent):
                        raise FloatingPointError(f"training loss became {recent} at step {self.step}")
                    bar.set_postfix(loss=f"{recent:.4f}")
        return torch.stack(losses).tolist() if losses else []

    def save(self, num_samples: int = 64, seed: int = 0, progress: bool = True) -> Path | None:
        """Write the EMA model (``save_pretrained`` into ``out``) and, if num_samples, ``out/samples.png``."""
        ema = self.ema_diffusion()
        ema.save_pretrained(self.out)
        if not num_samples:
            return None
        gen = torch.Generator(self.device).manual_seed(seed)
        ema.eval()
        images = ema.sample(num_samples, generator=gen, progress=progress)
        return save_image_grid(images, self.out / "samples.png", scale=max(1, 512 // (8 * (images.shape[-1] + 2))))
