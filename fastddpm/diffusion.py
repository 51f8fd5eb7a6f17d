"""Diffusion: the DDPM training loss, the forward process and sampling around a user's network.

Names follow ``GaussianDiffusion`` of denoising-diffusion-pytorch so that swapping the import is enough;
the defaults are the DDPM paper's (see the README for where they differ from that package).
"""

from __future__ import annotations

import json
import math
import operator
import os
import shutil
import stat
import tempfile
import uuid
import warnings
from collections import namedtuple
from pathlib import Path

import torch
from torch import nn

from fastddpm import _extension, reference, sampling
from fastddpm.ops import assert_on_device, check_backend, check_timesteps, draws_noise_in_kernel
from fastddpm.ops.diffusion_loss import diffusion_loss as _diffusion_loss_op
from fastddpm.ops.diffusion_loss import noised as _noised
from fastddpm.ops.q_sample import q_sample as _q_sample_op
from fastddpm.ops.reverse_step import p_sample_step as _p_sample_step_op
from fastddpm.schedules import NoiseSchedule, get_beta_schedule

ModelPrediction = namedtuple("ModelPrediction", ["pred_noise", "pred_x_start"])

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _as_int(value, name: str) -> int:
    """value as an int (python or numpy ints, 0-d integer tensors); bools and floats are refused."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def _positive_int(value, name: str) -> int:
    n = _as_int(value, name)
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def _drop_schedule_keys(state_dict, prefix, *args):
    for name in (*NoiseSchedule.TABLES, "loss_weight"):
        for key in (prefix + name, prefix + "schedule." + name):
            state_dict.pop(key, None)


def state_dict_mismatch(module: nn.Module, state: dict) -> str:
    """"" when ``state`` loads into ``module`` strictly; otherwise a short account of the difference: how many
    weights are missing, unexpected or of another shape, with the first two of each."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(items)} {what} (e.g. {'; '.join(items[:2])}{'; …' if len(items) > 2 else ''})"
             for what, items in [("weights missing", missing), ("unexpected weights", unexpected),
                                 ("weights of another shape (saved vs this network)", shapes)] if items]
    return ", ".join(parts)


def changed_settings(saved: dict, now: dict) -> str:
    """The saved settings that ``now`` gives other values, as 'name: saved vs now, …' ("" when none);
    tuples and lists compare equal, as JSON stores both as lists."""
    def norm(v):
        return [norm(x) for x in v] if isinstance(v, (list, tuple)) else v

    return ", ".join(f"{k}: {v!r} vs {now.get(k)!r}" for k, v in saved.items() if norm(v) != norm(now.get(k)))


def normalize_to_neg_one_to_one(img):
    return img * 2 - 1


def unnormalize_to_zero_to_one(x):
    return (x + 1) * 0.5


class Diffusion(nn.Module):
    """DDPM around ``model(x_t, t)`` (t: int64 [B] in [0, T)).

    ``loss = diffusion(images)`` draws t and ε and returns L_simple; ``diffusion.sample(16)`` runs the
    reverse process (ancestral, or DDIM when ``sampling_timesteps < timesteps``) and returns images in
    [0, 1] (with ``auto_normalize``).
    """

    def __init__(self, model: nn.Module, *, image_size, timesteps: int | None = None, sampling_timesteps=None,
                 objective: str = "pred_noise", beta_schedule="linear", schedule_fn_kwargs=None,
                 ddim_sampling_eta: float = 0.0, auto_normalize: bool = True,
                 offset_noise_strength: float = 0.0, min_snr_loss_weight: bool = False,
                 min_snr_gamma: float = 5, variance: str = "fixed_small", clip_denoised: bool = True,
                 backend: str = "auto", channels: int | None = None, check_inputs: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module called as model(x_t, t), got {type(model).__name__}")
        if objective not in reference.OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of "
                             f"{', '.join(reference.OBJECTIVES)}")
        if variance not in reference.VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(reference.VARIANCES)}")
        self.model = model
        if channels is None:
            channels = getattr(model, "channels", getattr(model, "in_channels", None))
            if channels is None:
                raise ValueError(f"cannot tell the image channels of {type(model).__name__} (it has no "
                                 f"`channels` or `in_channels` attribute): pass channels=")
        self.channels = _positive_int(channels, "channels")
        if not isinstance(image_size, (tuple, list)):
            image_size = (image_size, image_size)
        if len(image_size) != 2:
            raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
        self.image_size = tuple(_positive_int(s, "image_size") for s in image_size)
        model_size = getattr(model, "image_size", None)  # a network built for one size (fastddpm.UNet)
        if isinstance(model_size, int) and not isinstance(model_size, bool):
            model_size = (model_size, model_size)
        if (isinstance(model_size, (tuple, list)) and len(model_size) == 2
                and tuple(model_size) != self.image_size):
            raise ValueError(f"image_size={self.image_size} does not match the image size the model was "
                             f"built for, {type(model).__name__}.image_size={getattr(model, 'image_size')}")
        self.objective = objective
        self.variance = variance
        self.clip_denoised = bool(clip_denoised)
        self.auto_normalize = bool(auto_normalize)
        self.backend = check_backend(backend)
        self.check_inputs = bool(check_inputs)
        self.schedule_fn_kwargs = dict(schedule_fn_kwargs or {})
        if isinstance(beta_schedule, str):
            betas = get_beta_schedule(beta_schedule, 1000 if timesteps is None else _positive_int(
                timesteps, "timesteps"), **self.schedule_fn_kwargs)
        else:  # the user's own betas; timesteps, when given, must match their number
            betas = get_beta_schedule(beta_schedule, timesteps, **self.schedule_fn_kwargs)
            beta_schedule = betas.tolist()
        self.beta_schedule = beta_schedule
        self.schedule = NoiseSchedule(betas)
        self.num_timesteps = self.schedule.num_timesteps
        if self.schedule.zero_terminal_snr and objective == "pred_noise":
            raise ValueError("this schedule reaches ᾱ = 0 at its last step (zero terminal SNR), where x_0 "
                             "cannot be recovered from a noise prediction; use objective='pred_v' or "
                             "'pred_x0'")
        alpha_bar_T = float(self.schedule.alphas_cumprod[-1])
        if alpha_bar_T > 1e-2:
            warnings.warn(f"the {'given' if not isinstance(beta_schedule, str) else beta_schedule!r} "
                          f"schedule ends at ᾱ_T = {alpha_bar_T:.3g}: x_T is far from N(0, I), so samples "
                          f"started from pure noise will be off. With few timesteps use schedule_fn_kwargs="
                          f"{{'scale_with_timesteps': True}} (linear) or the cosine schedule", UserWarning,
                          stacklevel=2)
        self.sampling_timesteps = (self.num_timesteps if sampling_timesteps is None
                                   else _positive_int(sampling_timesteps, "sampling_timesteps"))
        if self.sampling_timesteps > self.num_timesteps:
            raise ValueError(f"sampling_timesteps must lie in [1, timesteps={self.num_timesteps}], "
                             f"got {sampling_timesteps}")
        self.ddim_sampling_eta = float(ddim_sampling_eta)
        if not 0.0 <= self.ddim_sampling_eta <= 1.0:
            raise ValueError(f"ddim_sampling_eta must lie in [0, 1], got {ddim_sampling_eta}")
        self.offset_noise_strength = float(offset_noise_strength)
        if self.offset_noise_strength < 0:
            raise ValueError(f"offset_noise_strength must be >= 0, got {offset_noise_strength}")
        self.min_snr_loss_weight = bool(min_snr_loss_weight)
        self.min_snr_gamma = float(min_snr_gamma)
        if self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        # Checkpoints of GaussianDiffusion hold the schedule's tables; here they are derived, so drop them.
        self._register_load_state_dict_pre_hook(_drop_schedule_keys)

    @property
    def device(self) -> torch.device:
        return self.schedule.betas.device

    @property
    def is_ddim_sampling(self) -> bool:
        return self.sampling_timesteps < self.num_timesteps

    def normalize(self, img):
        return normalize_to_neg_one_to_one(img) if self.auto_normalize else img

    def unnormalize(self, x):
        return unnormalize_to_zero_to_one(x) if self.auto_normalize else x

    @property
    def config(self) -> dict:
        return {
            "image_size": list(self.image_size), "timesteps": self.num_timesteps,
            "sampling_timesteps": self.sampling_timesteps, "objective": self.objective,
            "beta_schedule": self.beta_schedule, "schedule_fn_kwargs": self.schedule_fn_kwargs,
            "ddim_sampling_eta": self.ddim_sampling_eta, "auto_normalize": self.auto_normalize,
            "offset_noise_strength": self.offset_noise_strength,
            "min_snr_loss_weight": self.min_snr_loss_weight, "min_snr_gamma": self.min_snr_gamma,
            "variance": self.variance, "clip_denoised": self.clip_denoised, "channels": self.channels,
        }

    # ------------------------------------------------------------------ input checks
    def _check_images(self, img: torch.Tensor, what: str = "images") -> None:
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(img).__name__}")
        if not img.is_floating_point():
            raise TypeError(f"{what} must be floating point (got {img.dtype}); convert integer images with "
                            f"img.float() / 255")
        expected = (self.channels, *self.image_size)
        if img.dim() != 4 or tuple(img.shape[1:]) != expected:
            raise ValueError(f"{what} must have shape [B, {', '.join(map(str, expected))}], "
                             f"got {list(img.shape)}")
        if img.shape[0] == 0:
            raise ValueError(f"{what} is an empty batch")

    def _check_finite_range(self, img: torch.Tensor) -> None:
        if not self.check_inputs or torch._C._functorch.peek_interpreter_stack() is not None:
            return  # (values cannot be read under torch.func transforms)
        if img.is_cuda:  # on the device, without a host sync (a bad batch fails the next sync)
            lo, hi = torch.aminmax(img.detach())
            if self.auto_normalize:  # (NaN fails both comparisons)
                ok = lo.ge(0).logical_and_(hi.le(1))
            else:
                ok = lo.isfinite().logical_and_(hi.isfinite())
            assert_on_device(ok, "training batch contains NaN or Inf" + (
                ", or values outside [0, 1] (auto_normalize=True)" if self.auto_normalize else ""))
            return
        lo, hi = torch.stack(torch.aminmax(img.detach())).tolist()  # one host sync for both checks
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("training batch contains NaN or Inf")
        if self.auto_normalize and (lo < 0 or hi > 1):
            raise ValueError(f"images must lie in [0, 1] with auto_normalize=True, got values in [{lo:.4g}, "
                             f"{hi:.4g}]; pass auto_normalize=False for data already in [-1, 1]")

    def _check_noise(self, noise, x: torch.Tensor) -> torch.Tensor:
        if noise is None:
            return torch.randn_like(x)
        if not isinstance(noise, torch.Tensor) or noise.shape != x.shape or noise.dtype != x.dtype:
            got = (f"{list(noise.shape)} {noise.dtype}" if isinstance(noise, torch.Tensor)
                   else type(noise).__name__)
            raise ValueError(f"noise must match x_start: {list(x.shape)} {x.dtype}, got {got}")
        return noise

    def _check_t(self, t, batch: int) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            t = torch.full((batch,), _as_int(t, f"t (an int or an int64 tensor of shape [{batch}])"),
                           dtype=torch.long, device=self.device)
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"t must be an int64 tensor of shape [{batch}], got dtype {t.dtype}")
        if t.shape != (batch,):
            raise ValueError(f"t must have shape [{batch}], got {list(t.shape)}")
        # (values cannot be read under torch.func transforms; kernels and reference clamp t into [0, T))
        check = self.check_inputs and torch._C._functorch.peek_interpreter_stack() is None
        if check and t.is_cuda:  # on the device, without a host sync
            check_timesteps("t", t, self.num_timesteps)
        elif check:
            lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one host sync
            if lo < 0 or hi >= self.num_timesteps:
                raise ValueError(f"t must lie in [0, {self.num_timesteps}), got values in [{lo}, {hi}]")
        return t.long()

    @property
    def loss_weight(self) -> torch.Tensor:
        """The per-timestep weight [T] of the loss (all ones without min_snr_loss_weight)."""
        t = torch.arange(self.num_timesteps, device=self.device)
        return reference.loss_weight(self.schedule, self.objective, t,
                                     self.min_snr_gamma if self.min_snr_loss_weight else None)

    # ------------------------------------------------------------------ forward process and loss
    def q_sample(self, x_start, t, noise=None):
        """x_t ~ q(x_t | x_0) (eq. 4); x_start in the model's range ([-1, 1] with auto_normalize)."""
        self._check_images(x_start, "x_start")
        t = self._check_t(t, x_start.shape[0])
        return _q_sample_op(self.schedule, x_start, t, self._check_noise(noise, x_start),
                            backend=self.backend, check=False)

    def _p_losses(self, x_start, t, noise=None, reduction="mean"):
        gamma = self.min_snr_gamma if self.min_snr_loss_weight else None
        loss_args = dict(objective=self.objective, min_snr_gamma=gamma, reduction=reduction,
                         backend=self.backend, check=False)
        if (noise is None and self.offset_noise_strength == 0
                and draws_noise_in_kernel("diffusion_loss", x_start.device, self.backend)):
            # Fused path (Triton, or the C++ CPU kernels): ε is drawn inside q_sample from a Philox key; the
            # loss regenerates it from that key (Triton; float16/bfloat16 data) or reads it as q_sample wrote
            # it (C++ CPU kernels), as fastddpm.ops.diffusion_loss.noised decides.
            x_t, noise_kwargs = _noised(self.schedule, x_start, t, backend=self.backend, check=False)
            out = sampling.model_output(self.model, x_t, t)
            return _diffusion_loss_op(self.schedule, out, x_start, t, **noise_kwargs, **loss_args)
        if noise is None:
            noise = torch.randn_like(x_start)
            if self.offset_noise_strength > 0:  # offset noise (Guttenberg 2023): a per-channel constant shift
                noise = noise + self.offset_noise_strength * torch.randn_like(x_start[:, :, :1, :1])
        noise = self._check_noise(noise, x_start)
        x_t = _q_sample_op(self.schedule, x_start, t, noise, backend=self.backend, check=False)
        out = sampling.model_output(self.model, x_t, t)
        return _diffusion_loss_op(self.schedule, out, x_start, t, noise, **loss_args)

    def p_losses(self, x_start, t, noise=None, reduction="mean"):
        """L_simple (eq. 14) at the given timesteps; x_start in the model's range."""
        self._check_images(x_start, "x_start")
        return self._p_losses(x_start, self._check_t(t, x_start.shape[0]), noise, reduction)

    def forward(self, img, *args, **kwargs):
        """Training loss for a batch of images ([0, 1] with auto_normalize): t ~ U{0..T−1}, ε ~ N(0, I)."""
        self._check_images(img)
        self._check_finite_range(img)
        img = img.to(sampling.model_dtype(self.model, img.dtype))  # the network's dtype, as sampling does
        t = torch.randint(0, self.num_timesteps, (img.shape[0],), device=img.device)
        return self._p_losses(self.normalize(img), t, *args, **kwargs)

    # ------------------------------------------------------------------ reverse process
    def predict_start_from_noise(self, x_t, t, noise):
        return reference.predict_start_from_noise(self.schedule, x_t, t, noise)

    def predict_noise_from_start(self, x_t, t, x0):
        return reference.predict_noise_from_start(self.schedule, x_t, t, x0)

    def predict_v(self, x_start, t, noise):
        return reference.predict_v(self.schedule, x_start, t, noise)

    def predict_start_from_v(self, x_t, t, v):
        return reference.predict_start_from_v(self.schedule, x_t, t, v)

    def q_posterior(self, x_start, x_t, t):
        return reference.q_posterior(self.schedule, x_start, x_t, t)

    @staticmethod
    def _no_self_cond(x_self_cond) -> None:
        if x_self_cond is not None:
            raise NotImplementedError("self-conditioning (x_self_cond) is not supported; the model is "
                                      "called as model(x_t, t)")

    def model_predictions(self, x, t, x_self_cond=None, clip_x_start=False, rederive_pred_noise=False):
        """(ε̂, x̂_0) from the network at (x_t, t), as a ModelPrediction(pred_noise, pred_x_start)."""
        self._no_self_cond(x_self_cond)
        eps, x0 = reference.model_predictions(self.schedule, sampling.model_output(self.model, x, t), x, t,
                                              self.objective, clip_x_start, rederive_pred_noise)
        return ModelPrediction(eps, x0)

    def p_mean_variance(self, x, t, x_self_cond=None, clip_denoised=True):
        """Mean, variance and log-variance of p_θ(x_{t−1} | x_t) (with this Diffusion's variance), and x̂_0."""
        _, x0 = self.model_predictions(x, t, x_self_cond, clip_x_start=clip_denoised)
        mean, var, log_var = self.q_posterior(x0, x, t)
        if self.variance == "fixed_large":  # σ² = β_t; the log takes β̃ at the first step, as the DDPM code
            var = reference.extract(self.schedule.betas, t, x)
            log_var = torch.where(t.reshape(var.shape) == 0, log_var, var.log())
        return mean, var, log_var, x0

    @torch.no_grad()
    def p_sample(self, x, t: int, x_self_cond=None, generator: torch.Generator | None = None):
        """One ancestral step from x_t at the integer step t; returns (x_{t−1}, x̂_0)."""
        self._no_self_cond(x_self_cond)
        self._check_images(x, "x")
        t = _as_int(t, "t")
        if not 0 <= t < self.num_timesteps:
            raise ValueError(f"t must be an int in [0, {self.num_timesteps}), got {t}")
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        in_kernel = draws_noise_in_kernel("p_sample_step", self.device, self.backend)
        noise, seed = sampling.step_noise(in_kernel, x.shape, x.device, generator)
        noise = noise.to(x.dtype) if noise is not None else None
        out = sampling.model_output(self.model, x.to(sampling.model_dtype(self.model, x.dtype)), tt)
        x_prev, x0, _ = _p_sample_step_op(self.schedule, out, x, tt, noise, seed=seed,
                                          objective=self.objective, variance=self.variance,
                                          clip_denoised=self.clip_denoised, backend=self.backend,
                                          check=False)
        return x_prev, x0

    @torch.no_grad()
    def p_sample_loop(self, shape, return_all_timesteps: bool = False, generator=None, progress: bool = True,
                      cuda_graph: bool = False):
        """The T-step ancestral loop from x_T ~ N(0, I); returns x_0 in the model's range ([-1, 1])."""
        return sampling.ancestral_loop(self, tuple(shape), generator, return_all_timesteps, progress,
                                       cuda_graph)

    @torch.no_grad()
    def ddim_sample(self, shape, return_all_timesteps: bool = False, generator=None, progress: bool = True,
                    cuda_graph: bool = False):
        """DDIM in ``sampling_timesteps`` steps (η = ddim_sampling_eta); returns x_0 in the model's range."""
        return sampling.ddim_loop(self, tuple(shape), generator, return_all_timesteps, progress, cuda_graph)

    @torch.no_grad()
    def sample(self, batch_size: int = 16, return_all_timesteps: bool = False,
               generator: torch.Generator | None = None, progress: bool = True, cuda_graph: bool = False):
        """Images from the reverse process, [B, C, H, W] ([0, 1] with auto_normalize).

        With ``return_all_timesteps`` the result is [B, steps + 1, C, H, W], x_T first. A ``generator``
        (on the model's device) makes the samples reproducible; without one torch's global RNG is used.
        ``cuda_graph=True`` (CUDA, Triton backend) captures one whole step (network + fused reverse step) in a
        CUDA graph and replays it for every t; it falls back to the eager loop, with one warning, when capture
        is not possible. The same seed gives the same samples either way.
        """
        shape = (_positive_int(batch_size, "batch_size"), self.channels, *self.image_size)
        loop = self.ddim_sample if self.is_ddim_sampling else self.p_sample_loop
        return self.unnormalize(loop(shape, return_all_timesteps, generator, progress, cuda_graph))

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (the network's weights) to ``directory``.

        Both are written into a temporary folder inside ``directory`` (so on the same file system) and then
        renamed into place, the weights first: each file is replaced atomically, never half-written. Both
        carry one save id, by which ``from_pretrained`` recognises a pair from two different saves (a kill
        between the two renames). The weights get config.json's permissions (which follow the umask).
        """
        from safetensors.torch import save_file

        config = getattr(self.model, "config", None)
        if not isinstance(config, dict):
            raise TypeError(f"{type(self.model).__name__} has no `config` dict to rebuild it from; save its "
                            f"state_dict yourself, or use fastddpm.UNet")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_id = uuid.uuid4().hex
        meta = {"diffusion": self.config, "model": {"class": type(self.model).__name__, "config": config},
                "save_id": save_id}
        tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=directory))
        try:
            with open(tmp / CONFIG_NAME, "w") as f:
                f.write(json.dumps(meta, indent=2) + "\n")
            try:
                save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "save_id": save_id})
            except Exception as e:  # safetensors reports a full disk as its own error type
                if isinstance(e, OSError):
                    raise
                raise OSError(f"cannot write {directory / WEIGHTS_NAME}: {e}") from e
            os.chmod(tmp / WEIGHTS_NAME, stat.S_IMODE(os.stat(tmp / CONFIG_NAME).st_mode))
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                with open(tmp / name, "rb+") as f:
                    os.fsync(f.fileno())
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(tmp / name, directory / name)
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model: nn.Module | None = None,
                        device: str | torch.device | None = None, **overrides) -> Diffusion:
        """Load what :meth:`save_pretrained` wrote (or a training output folder holding it in ``model/``), or
        a diffusers DDPM pipeline folder or ``UNet2DModel`` folder.

        ``model`` is needed only for networks other than :class:`fastddpm.UNet`; ``overrides`` replace
        constructor arguments (e.g. ``sampling_timesteps=50``).
        """
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        from fastddpm import diffusers_folders
        from fastddpm.nn import UNet

        if device is not None:  # a device this torch cannot use fails here, before any loading
            device = _extension.check_device(device)
        # A diffusers pipeline or UNet2DModel folder: its U-Net converted, settings from its scheduler config.
        if (found := diffusers_folders.find(directory)) is not None:
            return diffusers_folders.load(cls, found, model=model, device=device, **overrides)
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() and (directory / "model" / CONFIG_NAME).is_file():
            directory = directory / "model"
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"no saved fastddpm model at {directory}: {path.name} is missing")
        try:
            meta = json.loads(config_path.read_text(encoding="utf-8"))
            diffusion_config, model_meta = meta["diffusion"], meta["model"]
        except UnicodeDecodeError as e:
            raise ValueError(f"{config_path} is not UTF-8 text, so not a fastddpm config: {e}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{config_path} is not a fastddpm config: {e}") from e
        own_model = model is not None
        if not own_model:
            if model_meta.get("class") != "UNet":
                raise ValueError(f"{config_path} describes a {model_meta.get('class')!r} network; "
                                 f"pass model= to from_pretrained to load it")
            try:
                model = UNet(**model_meta["config"])
            except (TypeError, ValueError, KeyError) as e:
                raise ValueError(f"{config_path}: cannot build the UNet it describes: {e}") from e
        elif isinstance(getattr(model, "config", None), dict) and isinstance(model_meta.get("config"), dict):
            changed = changed_settings(model_meta["config"], model.config)
            if changed:
                raise ValueError(f"{config_path} describes a network with other settings than the model "
                                 f"given (saved vs given): {changed}")
        try:
            with safe_open(str(weights_path), "pt") as f:
                weights_id = (f.metadata() or {}).get("save_id")
            state = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{weights_path} is corrupted or not a safetensors file: {e}") from e
        if meta.get("save_id") and weights_id and meta["save_id"] != weights_id:
            raise ValueError(f"{directory}: {CONFIG_NAME} and {WEIGHTS_NAME} come from two different saves "
                             f"(one was interrupted between them); save the model again")
        mismatch = state_dict_mismatch(model, state)
        if mismatch:
            raise ValueError(f"{weights_path} does not fit the network: {mismatch}")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{weights_path} does not fit the network: {e}") from e
        try:
            diffusion = cls(model, **{**diffusion_config, **overrides})
        except TypeError as e:
            raise ValueError(f"{config_path}: bad diffusion settings: {e}") from e
        if device is None:  # a model of the caller's stays where it is; a rebuilt one goes to the CPU
            device = (next(model.parameters()).device if own_model and any(True for _ in model.parameters())
                      else "cpu")
        return diffusion.to(device)


# The schedule's tables, readable as attributes under GaussianDiffusion's names (diffusion.betas, …).
for _name in NoiseSchedule.TABLES:
    setattr(Diffusion, _name, property(lambda self, _n=_name: getattr(self.schedule, _n),
                                       doc=f"schedule.{_name}"))
del _name
