"""Trainer: Adam on the DDPM loss with warm-up, gradient clipping and an EMA of the weights."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from fastddpm.cuda_graphs import host_syncs_raise
from fastddpm.data import save_image_grid
from fastddpm.diffusion import Diffusion, changed_settings, state_dict_mismatch


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


@torch.no_grad()
def ema_update_(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor,
                decay: float, apply: torch.Tensor) -> None:
    """One EMA update on the device: what ``AveragedModel.update_parameters`` does with
    ``ema_with_warmup(decay)``, without reading ``n_averaged`` on the host. The first update copies the
    weights (decay 0), later ones use d = min(decay, (1 + n)/(10 + n)) with the same arithmetic as
    ema_with_warmup; where the 0-d bool ``apply`` is False the average and ``n_averaged`` stay as they are
    (decay 1: ema·1 + θ·0, θ finite). Integer buffers are left as they are."""
    n = n_averaged.to(torch.float32)
    d = torch.clamp((1 + n) / (10 + n), max=decay)
    d = torch.where(apply, torch.where(n_averaged == 0, 0.0, d), 1.0)
    torch._foreach_mul_(averaged, d)
    torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - d))
    n_averaged.add_(apply)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of indices as a pure function of (seed, step): epoch e is a permutation drawn from a generator
    seeded with (seed, e), and step s takes its (s mod steps-per-epoch)-th slice. Training resumed at any
    step therefore sees exactly the batches an uninterrupted run would, with no sampler state to save."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int = 0, shard=(0, 1)):
        self.num_items, self.batch_size, self.seed, self.start_step = num_items, batch_size, seed, start_step
        self.steps_per_epoch = num_items // batch_size
        self.rank, self.world_size = shard  # process `rank` of `world_size` takes its slice of each batch

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if getattr(self, "_epoch", None) != epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, SEED_DATA, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=gen)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]

    def __iter__(self):
        step = self.start_step
        while True:
            idx = self.indices(step)
            per = len(idx) // self.world_size
            yield idx[self.rank * per:(self.rank + 1) * per].tolist()
            step += 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (NumPy's SeedSequence), so that the data order, each process's
    noise stream and re-seeds on resume never share a stream."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


SEED_DATA, SEED_NOISE, SEED_RESUME = 0, 1, 2


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def lock_output_dir(out: str | os.PathLike):
    """Hold an exclusive lock on ``out`` (creating it) for the duration of the block: ``out/train.lock``,
    flock'ed and holding this process's id. The kernel drops the lock when the process ends, however it ends,
    so a killed run never leaves ``out`` locked. A second holder gets an OSError naming the first's id."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / "train.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise OSError(f"{out} is in use by process {holder}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield out
    finally:
        os.close(fd)  # releases the lock


CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.pt")
# The Trainer's settings that shape the optimisation: a checkpoint stores them, and resume() refuses others.
TRAINER_SETTINGS = ("batch_size", "lr", "warmup", "grad_clip", "ema_decay", "seed", "grad_accum", "amp",
                    "hflip")
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Eager steps of the fast path before its CUDA graph is captured (allocations, autotuning, Adam's state).
FAST_PATH_WARMUP = 3


class Trainer:
    """Trains ``diffusion`` on ``data`` (a [N, C, H, W] tensor in [0, 1] or a Dataset of such images).

    ``train(steps)`` runs until ``self.step == steps``; with ``save_every`` it writes ``out/checkpoint/``
    (atomically) every that many steps and at the end, and ``resume()`` continues from it exactly.

    ``fast_path=True`` runs each step as one function of static buffers (the batch is copied into a fixed
    tensor; loss, backward, clipping, Adam, EMA and the skip decision all stay on the device) and, on a GPU
    with ``cuda_graph=True``, captures that function in a CUDA graph after ``FAST_PATH_WARMUP`` eager steps
    and replays it for every later step: the host then launches one graph per step instead of thousands of
    kernels. The noise needs no host RNG inside the graph: t, the flips and the Philox key of the in-kernel ε
    are drawn with torch's CUDA generator, whose state the graph replays with fresh values each step. A
    capture that fails warns once and the step runs eagerly. On a CPU the same function runs eagerly and gives
    the plain loop's losses exactly. One process only (no DDP). ``channels_last=True`` keeps the network's
    weights and activations in channels-last layout (with ``amp='bf16'``, the fastest on GPUs).
    """

    def __init__(self, diffusion: Diffusion, data, *, out: str | os.PathLike, batch_size: int = 64,
                 lr: float = 2e-4, warmup: int = 5000, grad_clip: float = 1.0, ema_decay: float = 0.9999,
                 seed: int = 0, device: str | torch.device = "cpu", num_workers: int = 0, save_every: int = 0,
                 grad_accum: int = 1, amp: str = "off", log_every: int = 50, sample_every: int = 0,
                 num_samples: int = 64, compile: bool = False, hflip: bool = False, fast_path: bool = False,
                 cuda_graph: bool = True, channels_last: bool = False):
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
        if grad_accum < 1 or log_every < 1 or save_every < 0 or sample_every < 0:
            raise ValueError("grad_accum and log_every must be >= 1, save_every and sample_every >= 0")
        if not lr > 0 or grad_clip < 0 or not 0 <= ema_decay < 1:
            raise ValueError(f"need lr > 0, grad_clip >= 0 and 0 <= ema_decay < 1; got lr={lr}, "
                             f"grad_clip={grad_clip}, ema_decay={ema_decay}")
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if len(data) < batch_size * self.world_size:
            raise ValueError(f"batch_size {batch_size} × {self.world_size} processes is larger than the "
                             f"dataset ({len(data)} images)")
        if fast_path and self.world_size > 1:
            raise ValueError("fast_path=True trains in one process (the step is one CUDA graph, without "
                             "DDP's all-reduce); turn it off under torch.distributed")
        self.device = torch.device(device)
        self.diffusion = diffusion.to(self.device)
        self.channels_last = channels_last
        if channels_last:  # before the EMA copy and the optimizer, so that both share the layout
            self.diffusion.model.to(memory_format=torch.channels_last)
        self.data = data
        self.out = Path(out)
        self.batch_size, self.grad_clip, self.warmup = batch_size, grad_clip, warmup
        self.seed, self.save_every, self.grad_accum = seed, save_every, grad_accum
        self.log_every, self.sample_every, self.num_samples = log_every, sample_every, num_samples
        self.amp, self.hflip = amp, hflip
        # The fused Adam kernel: one launch for all weights, and it skips its whole update (weights, moments,
        # step count) on the device when the optimizer's found_inf is 1: a non-finite step needs no host sync.
        self.optimizer = torch.optim.Adam(self.diffusion.model.parameters(), lr=lr, **self._adam_flags())
        # Linear learning-rate warm-up over `warmup` steps, as in the DDPM paper's CIFAR-10 recipe.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: min(1.0, (s + 1) / max(1, warmup)))
        # The rate as a device tensor the kernel reads (and a CUDA graph replays with): the scheduler, created
        # with a float so that its base rate and state stay floats, fills it before each step.
        self._lr = torch.tensor(self.optimizer.param_groups[0]["lr"], dtype=torch.float32, device=self.device)
        self.optimizer.param_groups[0]["lr"] = self._lr
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        # device=: AveragedModel keeps its counter n_averaged on the CPU otherwise, which ema_update_ updates
        # on the device with the step's skip decision.
        self.ema = AveragedModel(self.diffusion.model, device=self.device,
                                 multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
        # What ema_update_ averages: the floating-point parameters and buffers, paired as update_parameters
        # pairs them.
        ema_module, model = self.ema.module, self.diffusion.model
        pairs = [(a.detach(), m.detach()) for a, m in zip([*ema_module.parameters(), *ema_module.buffers()],
                                                         [*model.parameters(), *model.buffers()])
                 if a.is_floating_point()]
        self._ema_tensors, self._model_tensors = [a for a, _ in pairs], [m for _, m in pairs]
        # What runs the loss: the Diffusion itself, wrapped in DDP under torch.distributed, optionally
        # compiled. Compiling the network alone (in place: state_dict keys unchanged) leaves the input checks,
        # which read values back to the host, outside the compiled graph.
        if compile:
            self.diffusion.model.compile()
        self.loss_fn = self.diffusion
        if self.world_size > 1:  # the schedule's tables are the same everywhere: no buffer broadcasts
            self.loss_fn = torch.nn.parallel.DistributedDataParallel(
                self.diffusion, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        self.lr, self.ema_decay = lr, ema_decay
        self.step = 0
        self.last_lr = lr
        # Steps whose gradient norm was not finite (never applied to the weights): a device tensor, read when
        # logging and saving.
        self.skipped = torch.zeros((), dtype=torch.long, device=self.device)
        self.num_workers = num_workers
        self.fast_path, self.cuda_graph = fast_path, cuda_graph
        self._static_images = self._static_out = self._graph = None  # the fast path's buffers and graph
        self._graph_failed = False
        self._eager_fast_steps = 0  # the warm-up before a capture
        self._side_stream = None  # where the eager fast steps run on a GPU (one stream: its cached memory)

    # ------------------------------------------------------------------ data
    def _batches(self):
        # One global batch of batch_size × world_size per micro-step; each process takes its slice.
        micro = self.step * self.grad_accum
        sampler = EpochBatchSampler(len(self.data), self.batch_size * self.world_size, self.seed,
                                    start_step=micro, shard=(self.rank, self.world_size))
        if isinstance(self.data, torch.Tensor):  # in memory: index directly
            for idx in sampler:
                yield self.data[idx]
        else:
            # The DataLoader's own generator keeps it from drawing from the global RNG (which resume
            # restores).
            yield from torch.utils.data.DataLoader(self.data, batch_sampler=sampler,
                                                   num_workers=self.num_workers,
                                                   generator=torch.Generator().manual_seed(self.seed))

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def save_checkpoint(self) -> Path:
        """Write model, EMA (safetensors) and optimizer/scheduler/step/RNG state (state.pt) to
        ``out/checkpoint/`` atomically: into a temporary folder, fsynced, then swapped in by rename. A failed
        write (a full disk) removes the temporary folder and raises OSError naming it."""
        final, tmp, old = self.checkpoint_dir, self.out / "checkpoint.tmp", self.out / "checkpoint.old"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._write_checkpoint(tmp)
        except BaseException as e:  # a full disk, Ctrl-C, ...: no partial folder stays
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, Exception) and not isinstance(e, OSError):  # safetensors', torch.save's errors
                raise OSError(f"cannot write the checkpoint to {tmp}: {e}") from e
            raise
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        _fsync_dir(self.out)
        shutil.rmtree(old, ignore_errors=True)
        # The EMA model too, so that `fastddpm sample --checkpoint OUT` works during training and after a
        # kill.
        self.ema_diffusion().save_pretrained(self.out / "model")
        return final

    @property
    def settings(self) -> dict:
        """The settings that shape the optimisation (TRAINER_SETTINGS), as a checkpoint stores them."""
        return {name: getattr(self, name) for name in TRAINER_SETTINGS}

    def _write_checkpoint(self, tmp: Path) -> None:
        from safetensors.torch import save_file

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
            "scaler": self.scaler.state_dict(),
            "skipped": int(self.skipped),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "diffusion_config": self.diffusion.config,
            "model_config": getattr(self.diffusion.model, "config", None),
            "trainer": self.settings,
        }
        torch.save(state, tmp / "state.pt")
        for name in ("model.safetensors", "ema.safetensors"):  # safetensors writes 0600: take state.pt's mode
            os.chmod(tmp / name, stat.S_IMODE(os.stat(tmp / "state.pt").st_mode))
        for name in CHECKPOINT_FILES:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)

    def resume(self, directory: str | os.PathLike | None = None) -> int:
        """Load ``out/checkpoint/`` (or ``directory``) and continue from its step; returns that step.

        Weights come from safetensors and the rest through ``torch.load(weights_only=True)``, so nothing
        is unpickled. A missing, truncated or corrupted file raises ValueError naming it, and so does a
        checkpoint written with other diffusion, network or TRAINER_SETTINGS, naming each differing setting.
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
        weights = {}
        for name in ("model.safetensors", "ema.safetensors"):
            try:
                weights[name] = load_file(str(ckpt / name))
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"{ckpt / name} is corrupted or not a safetensors file: {e}") from e
        model_state, ema_state = weights["model.safetensors"], weights["ema.safetensors"]
        state_path = ckpt / "state.pt"
        try:
            state = torch.load(state_path, weights_only=True, map_location="cpu")
        except Exception as e:  # torch.load raises a variety of errors on damaged files
            raise ValueError(f"{state_path} is corrupted or not a fastddpm checkpoint: {e}") from e
        state = state if isinstance(state, dict) else {}
        model_config = getattr(self.diffusion.model, "config", None)
        for what, saved, now in [("diffusion", state.get("diffusion_config"), self.diffusion.config),
                                 ("model", state.get("model_config"), model_config),
                                 ("trainer", state.get("trainer"), self.settings)]:
            if not isinstance(saved, dict) or not isinstance(now, dict):  # an older checkpoint; no config
                continue
            changed = changed_settings(saved, now)
            if changed:
                raise ValueError(f"checkpoint {ckpt} was trained with other {what} settings (saved vs now): "
                                 f"{changed}")
        for name, module, weights_state in [("model.safetensors", self.diffusion.model, model_state),
                                            ("ema.safetensors", self.ema.module, ema_state)]:
            mismatch = state_dict_mismatch(module, weights_state)
            if mismatch:
                raise ValueError(f"{ckpt / name} does not fit this network: {mismatch}")
        try:
            self.diffusion.model.load_state_dict(model_state)
            self.ema.module.load_state_dict(ema_state)
            self.optimizer.load_state_dict(state["optimizer"])
            self._restore_adam()
            self.scheduler.load_state_dict(state["scheduler"])
            self.ema.n_averaged.copy_(state["ema_n_averaged"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.skipped.fill_(int(state.get("skipped", 0)))
            torch.set_rng_state(state["rng_torch"])
            if state.get("rng_cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng_cuda"], self.device)
            self.step = int(state["step"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ValueError(f"checkpoint {ckpt} does not fit this trainer, or {state_path.name} is damaged: "
                             f"{str(e)[:300]}") from e
        # A graph captured before holds the optimizer state tensors load_state_dict replaced: the fast path
        # warms up and captures again.
        self._graph, self._eager_fast_steps = None, 0
        if self.world_size > 1:  # the saved RNG state is rank 0's: every rank needs its own stream
            torch.manual_seed(derive_seed(self.seed, SEED_RESUME, self.step, self.rank))
        metrics = self.out / "metrics.jsonl"
        if self.rank == 0 and metrics.is_file():  # rows logged after the checkpoint are logged again
            rows = _read_metrics(metrics)
            metrics.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= self.step))
        return self.step

    def ema_diffusion(self) -> Diffusion:
        """A Diffusion that shares the schedule and settings but runs the EMA weights."""
        return Diffusion(self.ema.module, **self.diffusion.config,
                         backend=self.diffusion.backend).to(self.device)

    def _micro_step(self, images: torch.Tensor, sync: bool = True,
                    autocast_cache: bool = True) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.hflip:  # random horizontal flips, per image (the paper's CIFAR-10 augmentation)
            flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
            images = torch.where(flip, images.flip(-1), images)
        # Under DDP, only the last micro-batch of a step all-reduces the gradients.
        no_sync = self.loss_fn.no_sync() if not sync and self.world_size > 1 else contextlib.nullcontext()
        with no_sync:
            with torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp], enabled=self.amp != "off",
                                cache_enabled=autocast_cache):
                loss = self.loss_fn(images)  # Diffusion computes its loss in fp32 whatever the autocast dtype
            self.scaler.scale(loss / self.grad_accum).backward()
        return loss.detach()

    def _adam_flags(self) -> dict:
        # capturable on a GPU: the step count stays on the device and the step can be captured in a CUDA graph
        return dict(fused=True, foreach=None, capturable=self.device.type == "cuda")

    def _restore_adam(self) -> None:
        """After optimizer.load_state_dict: the saved param group replaced this one's, so the rate becomes the
        device tensor again (holding the saved rate) and the fused, capturable settings come back; step counts
        saved on the CPU (by a foreach Adam) move to the device."""
        group = self.optimizer.param_groups[0]
        saved_lr = group["lr"]
        self._lr.fill_(float(saved_lr))  # a CPU tensor (map_location="cpu") or a float
        group.update(self._adam_flags(), lr=self._lr)
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].to(dtype=torch.float32, device=self.device)

    def _update(self) -> torch.Tensor:
        """Unscale, clip, and apply Adam and the EMA unless the gradient norm is not finite, all decided on
        the device (no host sync): the fused Adam kernel skips its update where found_inf is 1, the EMA keeps
        its average, and ``skipped`` counts the step. Returns the gradient norm."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.diffusion.model.parameters(),
                                                   self.grad_clip if self.grad_clip else float("inf"))
        finite = torch.isfinite(grad_norm)  # a NaN/Inf never reaches the weights
        self.optimizer.found_inf = finite.logical_not().float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        ema_update_(self._ema_tensors, self._model_tensors, self.ema.n_averaged, self.ema_decay, finite)
        self.skipped.add_(finite.logical_not())
        self.scaler.update()
        return grad_norm.detach()

    def _optimizer_step(self) -> torch.Tensor:
        """The update (see _update), then the learning-rate schedule; returns the gradient norm."""
        grad_norm = self._update()
        self.optimizer.zero_grad(set_to_none=True)
        self._schedule_lr()
        return grad_norm

    def _schedule_lr(self) -> None:
        # The rate this step used, computed on the host as the scheduler does (its own record is the device
        # tensor); then the scheduler fills the tensor with the next step's rate.
        self.last_lr = self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        self.scheduler.step()

    # ------------------------------------------------------------------ the fast path
    def _fast_step_fn(self) -> None:
        """One whole step on the static buffers: reads ``_static_images`` [grad_accum, B, C, H, W] and writes
        (loss, gradient norm) into ``_static_out``; no host sync, so it can be captured in a CUDA graph. The
        weight casts of autocast are not cached: inside a graph each replay casts the current weights."""
        loss = torch.stack([self._micro_step(self._static_images[i], autocast_cache=False)
                            for i in range(self.grad_accum)]).mean()
        grad_norm = self._update()
        self._static_out.copy_(torch.stack([loss, grad_norm]))

    def _fast_step(self, micro_batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The fast path's step: the batch into the static buffers, then the graph's replay (or the step
        function run eagerly: on a CPU, in the warm-up, after a failed capture); returns (loss, grad_norm)."""
        if self._static_images is None:
            first = micro_batches[0]
            self._static_images = torch.empty((self.grad_accum, *first.shape), dtype=first.dtype,
                                              device=self.device)
            self._static_out = torch.zeros(2, device=self.device)
        for buffer, batch in zip(self._static_images, micro_batches):
            if batch.shape != buffer.shape:
                raise ValueError(f"the fast path's batches all have one shape: {list(buffer.shape)} (the "
                                 f"first batch's), got {list(batch.shape)}")
            if buffer.is_cuda and batch.device.type == "cpu" and not batch.is_pinned():
                # from pageable memory CUDA waits for the stream before copying, i.e. for the step before:
                # through pinned memory (torch's caching host allocator) the copy waits for nothing
                batch = batch.pin_memory()
            buffer.copy_(batch, non_blocking=True)
        if self._graph is None and self._wants_graph() and self._eager_fast_steps >= FAST_PATH_WARMUP:
            self._capture()
        if self._graph is not None:
            self._graph.replay()
        else:
            if self.device.type == "cuda":  # eager steps before a capture run on a side stream, as torch asks
                if self._side_stream is None:
                    self._side_stream = torch.cuda.Stream(self.device)
                side = self._side_stream
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    if self._wants_graph() and self._eager_fast_steps == FAST_PATH_WARMUP - 1:
                        self._last_warmup_step()
                    else:
                        self._fast_step_fn()
                torch.cuda.current_stream(self.device).wait_stream(side)
            else:
                self._fast_step_fn()
            self.optimizer.zero_grad(set_to_none=True)
            self._eager_fast_steps += 1
        out = self._static_out.clone()
        self._schedule_lr()
        return out[0], out[1]

    def _last_warmup_step(self) -> None:
        """The warm-up step before the capture, run where a host sync raises: a step that syncs is never
        captured (a failed capture breaks torch's CUDA state for the process; cuda_graphs.host_syncs_raise);
        the fast path warns once, runs this step again eagerly and stays eager."""
        try:
            with host_syncs_raise():
                self._fast_step_fn()
            return
        except RuntimeError as e:
            if "synchronizing" not in str(e):  # (torch's words for a sync under the debug mode; else a bug)
                raise
            self._give_up_graph(f"it synchronises with the host ({type(e).__name__}: {e})")
        self._fast_step_fn()

    def _give_up_graph(self, why: str) -> None:
        """Forget what a step stopped midway left (gradients, the scaler's unscale_), warn, stay eager."""
        torch.cuda.synchronize(self.device)
        self._graph_failed = True
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():  # forget the unscale_ the aborted step recorded
            self.scaler._per_optimizer_states.clear()
        warnings.warn(f"capturing the training step in a CUDA graph failed: {why}; the fast path runs it "
                      f"eagerly", RuntimeWarning, stacklevel=4)

    def _wants_graph(self) -> bool:
        return self.cuda_graph and self.device.type == "cuda" and not self._graph_failed

    def _capture(self) -> None:
        """Capture _fast_step_fn in a CUDA graph. The gradients are unset first, so that the captured backward
        allocates them in the graph's memory and every replay writes them afresh (no zeroing between replays).
        torch's default CUDA generator (t, flips, dropout, the Philox key of ε) is registered with the graph
        by the capture itself: each replay draws the numbers the next eager step would have drawn."""
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: CUDA work of other threads (a DataLoader's pin-memory thread) does not break it
            with torch.cuda.device(self.device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._fast_step_fn()
        except Exception as e:  # noqa: BLE001 — any capture failure (an unsupported op, out of memory)
            self._give_up_graph(f"{type(e).__name__}: {e}")
            return
        self._graph = graph

    def train(self, steps: int, progress: bool = True) -> list[float]:
        """Optimise until ``self.step == steps``; returns the losses of the steps run by this call."""
        self.diffusion.train()
        batches = self._batches()
        losses, window, last_log = [], [], (time.perf_counter(), self.step)
        main = self.rank == 0
        disable = not progress or not main or os.environ.get("FASTDDPM_NO_PROGRESS", "") not in ("", "0")
        try:
            with tqdm(total=steps, initial=self.step, desc="training", unit="step", disable=disable) as bar:
                while self.step < steps:
                    if self.fast_path:
                        loss, grad_norm = self._fast_step([next(batches) for _ in range(self.grad_accum)])
                    else:
                        loss = torch.stack([
                            self._micro_step(next(batches).to(self.device, non_blocking=True),
                                             sync=i == self.grad_accum - 1)
                            for i in range(self.grad_accum)]).mean()
                        grad_norm = self._optimizer_step()
                    self.step += 1
                    bar.update(1)
                    window.append(torch.stack([loss, grad_norm]))
                    if self.step % self.log_every == 0 or self.step == steps:
                        # the one read-back per log interval: the window's losses and norms, and `skipped`
                        values = torch.cat([torch.stack(window).flatten(), self.skipped.double()[None]]).cpu()
                        skipped, values = int(values[-1]), values[:-1].float().reshape(-1, 2)
                        losses.extend(values[:, 0].tolist())
                        mean_loss, mean_norm = values.nanmean(0).tolist()
                        now = time.perf_counter()
                        record = {"step": self.step, "loss": mean_loss, "lr": self.last_lr,
                                  "grad_norm": mean_norm,
                                  "steps_per_s": (self.step - last_log[1]) / (now - last_log[0]),
                                  "skipped": skipped, "time": time.time()}
                        window, last_log = [], (now, self.step)
                        bar.set_postfix(loss=f"{mean_loss:.4f}")
                        if main:
                            self._log(record)
                    if self.sample_every and self.step % self.sample_every == 0:
                        if main:
                            self.write_samples(self.out / "samples" / f"step_{self.step}.png", progress=False)
                        self._barrier()
                    if self.save_every and (self.step % self.save_every == 0 or self.step == steps):
                        if main:
                            self.save_checkpoint()
                        self._barrier()
        finally:
            batches.close()  # ends DataLoader workers
        return losses

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _log(self, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "metrics.jsonl"
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # the message names the file whichever call failed (a full disk fails the flush)
            raise OSError(f"cannot write {path}: {e.strerror or e}") from e

    def write_samples(self, path: Path, seed: int = 0, progress: bool = True) -> Path | None:
        """A grid of ``num_samples`` EMA samples at ``path``, and the loss curve beside the outputs."""
        if not self.num_samples:
            return None
        ema = self.ema_diffusion().eval()
        images = ema.sample(self.num_samples, generator=torch.Generator(self.device).manual_seed(seed),
                            progress=progress)
        grid = save_image_grid(images, path, scale=max(1, 512 // (8 * (images.shape[-1] + 2))))
        plot_loss(self.out / "metrics.jsonl", self.out / "loss.png")
        return grid

    def save(self, progress: bool = True) -> Path | None:
        """Write the EMA model (``save_pretrained`` into ``out/model``) and ``out/samples.png``; rank 0
        only."""
        if self.rank != 0:
            return None
        self.ema_diffusion().save_pretrained(self.out / "model")
        return self.write_samples(self.out / "samples.png", progress=progress)


def plot_loss(metrics: Path, path: Path) -> Path | None:
    """The loss curve of ``metrics.jsonl`` as a PNG (needs matplotlib; skipped without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not metrics.is_file():
        return None
    rows = _read_metrics(metrics)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl, skipping a line cut short by a kill."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows
