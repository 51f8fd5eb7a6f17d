"""Trainer: Adam on the DDPM loss with warm-up, gradient clipping and an EMA of the weights."""

from __future__ import annotations

import math
import os
import shutil
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


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of indices as a pure function of (seed, step): epoch e is a permutation drawn from a generator
    seeded with (seed, e), and step s takes its (s mod steps-per-epoch)-th slice. Training resumed at any
    step therefore sees exactly the batches an uninterrupted run would, with no sampler state to save."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int = 0):
        self.num_items, self.batch_size, self.seed, self.start_step = num_items, batch_size, seed, start_step
        self.steps_per_epoch = num_items // batch_size

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if getattr(self, "_epoch", None) != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=gen)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.indices(step).tolist()
            step += 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.pt")


class Trainer:
    """Trains ``diffusion`` on ``data`` (a [N, C, H, W] tensor in [0, 1] or a Dataset of such images).

    ``train(steps)`` runs until ``self.step == steps``; with ``save_every`` it writes ``out/checkpoint/``
    (atomically) every that many steps and at the end, and ``resume()`` continues from it exactly.
    """

    def __init__(self, diffusion: Diffusion, data, *, out: str | os.PathLike, batch_size: int = 64,
                 lr: float = 2e-4, warmup: int = 5000, grad_clip: float = 1.0, ema_decay: float = 0.9999,
                 seed: int = 0, device: str | torch.device = "cpu", num_workers: int = 0, save_every: int = 0):
        if len(data) < batch_size:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({len(data)} images)")
        self.device = torch.device(device)
        self.diffusion = diffusion.to(self.device)
        self.data = data
        self.out = Path(out)
        self.batch_size, self.grad_clip, self.warmup = batch_size, grad_clip, warmup
        self.seed, self.save_every = seed, save_every
        self.optimizer = torch.optim.Adam(self.diffusion.model.parameters(), lr=lr, foreach=True)
        # Linear learning-rate warm-up over `warmup` steps, as in the DDPM paper's CIFAR-10 recipe.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: min(1.0, (s + 1) / max(1, warmup)))
        self.ema = AveragedModel(self.diffusion.model, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
        self.step = 0
        self.num_workers = num_workers

    # ------------------------------------------------------------------ data
    def _batches(self):
        sampler = EpochBatchSampler(len(self.data), self.batch_size, self.seed, start_step=self.step)
        if isinstance(self.data, torch.Tensor):  # in memory: index directly
            for idx in sampler:
                yield self.data[idx]
        else:
            yield from torch.utils.data.DataLoader(self.data, batch_sampler=sampler, num_workers=self.num_workers)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def save_checkpoint(self) -> Path:
        """Write model, EMA (safetensors) and optimizer/scheduler/step/RNG state (state.pt) to
        ``out/checkpoint/`` atomically: into a temporary folder, fsynced, then swapped in by rename."""
        from safetensors.torch import save_file

        final, tmp, old = self.checkpoint_dir, self.out / "checkpoint.tmp", self.out / "checkpoint.old"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

        def tensors(module):
            return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}

        save_file(tensors(self.diffusion.model), str(tmp / "model.safetensors"))
        save_file(tensors(self.ema.module), str(tmp / "ema.safetensors"))
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema_n_averaged": self.ema.n_averaged.cpu(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "diffusion_config": self.diffusion.config,
        }
        torch.save(state, tmp / "state.pt")
        for name in CHECKPOINT_FILES:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        _fsync_dir(self.out)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def resume(self, directory: str | os.PathLike | None = None) -> int:
        """Load ``out/checkpoint/`` (or ``directory``) and continue from its step; returns that step.

        Weights come from safetensors and the rest through ``torch.load(weights_only=True)``, so nothing
        is unpickled. A missing, truncated or corrupted file raises ValueError naming it.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        ckpt = Path(directory) if directory is not None else self.checkpoint_dir
        if directory is None and not ckpt.is_dir() and (self.out / "checkpoint.old").is_dir():
            ckpt = self.out / "checkpoint.old"  # killed between the two renames of save_checkpoint
        if not ckpt.is_dir():
            raise FileNotFoundError(f"no checkpoint to resume from: {ckpt} does not exist")
        for name in CHECKPOINT_FILES:
            if not (ckpt / name).is_file():
                raise ValueError(f"checkpoint {ckpt} is incomplete: {name} is missing")
        try:
            model_state = load_file(str(ckpt / "model.safetensors"))
            ema_state = load_file(str(ckpt / "ema.safetensors"))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"checkpoint file is corrupted: {e} (in {ckpt})") from e
        try:
            state = torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")
        except Exception as e:  # torch.load raises a variety of errors on damaged files
            raise ValueError(f"{ckpt / 'state.pt'} is corrupted or not a fastddpm checkpoint: {e}") from e
        try:
            self.diffusion.model.load_state_dict(model_state)
            self.ema.module.load_state_dict(ema_state)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise ValueError(f"checkpoint {ckpt} does not fit this model or trainer: {e}") from e
        self.ema.n_averaged.copy_(state["ema_n_averaged"])
        torch.set_rng_state(state["rng_torch"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step = int(state["step"])
        return self.step

    def ema_diffusion(self) -> Diffusion:
        """A Diffusion that shares the schedule and settings but runs the EMA weights."""
        return Diffusion(self.ema.module, **self.diffusion.config, backend=self.diffusion.backend).to(self.device)

    def train(self, steps: int, log_every: int = 50, progress: bool = True) -> list[float]:
        """Optimise until ``self.step == steps``; returns the losses of the steps run by this call."""
        self.diffusion.train()
        batches = self._batches()
        losses = []
        disable = not progress or os.environ.get("FASTDDPM_NO_PROGRESS", "") not in ("", "0")
        with tqdm(total=steps, initial=self.step, desc="training", disable=disable) as bar:
            while self.step < steps:
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
                bar.update(1)
                losses.append(loss.detach())
                if self.step % log_every == 0 or self.step == steps:
                    recent = torch.stack(losses[-log_every:]).mean().item()
                    if not math.isfinite(recent):
                        raise FloatingPointError(f"training loss became {recent} at step {self.step}")
                    bar.set_postfix(loss=f"{recent:.4f}")
                if self.save_every and (self.step % self.save_every == 0 or self.step == steps):
                    self.save_checkpoint()
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
