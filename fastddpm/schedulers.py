"""Schedulers with the API of diffusers' ``DDPMScheduler`` and ``DDIMScheduler`` (diffusers 0.42).

Swap ``from diffusers import DDPMScheduler`` for ``from fastddpm import DDPMScheduler``: the constructor
arguments, ``config`` (with ``_use_default_values``; config keys also read as attributes, with diffusers'
FutureWarning), ``scheduler_config.json`` files (both ways), ``set_timesteps``, ``step`` (its output an
ordered dict, as diffusers'), ``_get_variance``, ``add_noise``, ``get_velocity`` and ``compatibles`` behave as
diffusers' do, and a seeded ``torch.Generator`` draws the same noise, so a sampling loop gives the same
images. Beyond diffusers:

- ``step`` takes per-sample timesteps (an integer tensor of shape [B] on any device) as well as an int or a
  0-d tensor, and never syncs the device with the host: no ``.item()``, no Python branch on a tensor's value;
  "no noise at t = 0" is a mask. With a tensor timestep the noise is therefore always drawn (and multiplied by
  0 where t = 0), so the generator advances one draw further than diffusers' at the very last step.
- The per-timestep coefficients live in tables on the sample's device (built once per schedule and device,
  in float64 from ``alphas_cumprod``, stored float32), and fp16/bf16 inputs are computed in float32.
- Where diffusers is wrong we are right (see the README, "Using fastddpm with diffusers"): the
  ``fixed_large_log`` variance (NaN in diffusers), DDIM's previous timestep for spacings that are not a
  uniform stride, and ``sqrt`` of a rounding-negative DDIM direction coefficient.
- With ``rescale_betas_zero_snr`` (ᾱ = 0 at the last timestep) an ε-prediction says nothing of x̂₀ there:
  both steps give NaN at that timestep, where diffusers clips its ±inf x̂₀ to ±1. Zero terminal SNR needs
  ``v_prediction`` (Lin et al. 2024, §3.2).

``alphas_cumprod`` is built as diffusers builds it (float32 betas, float32 cumulative product), so it is
bit-identical to diffusers'; only what is derived from it is computed in float64.

The math is not written here: the DDPM step is the fused reverse-step op
(:func:`fastddpm.ops.reverse_step.p_sample_step`) on a table of the respaced schedule
(:func:`fastddpm.schedules.reverse_table`); the DDIM step, ``add_noise`` and ``get_velocity`` are
:mod:`fastddpm.reference`'s. The config surface is :mod:`fastddpm.scheduler_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fastddpm import contracts, reference
from fastddpm.ops.reverse_step import p_sample_step
from fastddpm.scheduler_config import (
    DIFFUSERS_VERSION,  # noqa: F401 (the diffusers release these follow)
    BaseOutput,
    ConfigMixin,
    FrozenDict,
    register_to_config,
)
from fastddpm.schedules import reverse_table

__all__ = ["DDPMScheduler", "DDIMScheduler", "DDPMSchedulerOutput", "DDIMSchedulerOutput", "FrozenDict"]

# diffusers' names of the β schedules these schedulers build (see _diffusers_betas).
DIFFUSERS_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
# diffusers' prediction types, in the order of contracts.OBJECTIVES (ε, x_0, v), and the objective of each.
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
OBJECTIVE_OF_PREDICTION_TYPE = dict(zip(PREDICTION_TYPES, contracts.OBJECTIVES))
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                  "learned_range")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class DDPMSchedulerOutput(BaseOutput):
    """prev_sample: x_{t_prev}; pred_original_sample: the x̂₀ it was computed from."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass
class DDIMSchedulerOutput(BaseOutput):
    """prev_sample: x_{t_prev}; pred_original_sample: the x̂₀ it was computed from."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


# ----------------------------------------------------------------------------- β schedules
def _betas_from_alpha_bar(alpha_bar, num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    # β_i = 1 − ᾱ((i+1)/T) / ᾱ(i/T), capped at max_beta (Nichol & Dhariwal 2021, §3.2); Python floats, as
    # diffusers.
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
             for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def _cosine_alpha_bar(s):
    # ᾱ(s) = cos²((s + 0.008)/1.008 · π/2), the squaredcos_cap_v2 schedule (Nichol & Dhariwal 2021, eq. 17).
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(s):
    # Laplace noise schedule (Hang et al. 2024): log-SNR λ(s) = −½·sign(½ − s)·log(1 − 2|½ − s| + 1e-6).
    log_snr = -0.5 * math.copysign(1, 0.5 - s) * math.log(1 - 2 * math.fabs(0.5 - s) + 1e-6)
    snr = math.exp(log_snr)
    return math.sqrt(snr / (1 + snr))


def _diffusers_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas) -> torch.Tensor:
    """float32 betas, built with diffusers' own float32 operations so that ᾱ is bit-identical to diffusers' (a
    diffusers checkpoint then samples the same images).

    linear, scaled_linear, sigmoid and squaredcos_cap_v2 are :mod:`fastddpm.schedules`' linear, quad, sigmoid
    and cosine (tests/test_diffusers_schedulers.py holds them to it), but schedules.py builds in float64 by
    design, and its betas rounded to float32 differ from diffusers' in the last bit (linear: 338 of T = 1000;
    cosine, vectorised in float64: one at T = 880), so they cannot stand in here. laplace is diffusers'
    only."""
    if trained_betas is not None:
        return torch.tensor(np.asarray(trained_betas, dtype=np.float64).tolist(), dtype=torch.float32)
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # √β linear, then squared (Stable Diffusion's)
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _betas_from_alpha_bar(_cosine_alpha_bar, n)
    if beta_schedule == "laplace":
        return _betas_from_alpha_bar(_laplace_alpha_bar, n)
    if beta_schedule == "sigmoid":  # β-space sigmoid of linspace(−6, 6), rescaled to [beta_start, beta_end]
        sigmoid = torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float32))
        return sigmoid * (beta_end - beta_start) + beta_start
    raise NotImplementedError(f"beta_schedule {beta_schedule!r} is not implemented; choose one of "
                              f"{', '.join(DIFFUSERS_BETA_SCHEDULES)} or pass trained_betas")


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose ᾱ ends at exactly 0 (Lin et al. 2024, 'Common Diffusion Noise Schedules and Sample Steps
    are Flawed', Algorithm 1): shift √ᾱ so that its last value is 0, scale it so that its first is
    unchanged."""
    sqrt_ac = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac -= last
    sqrt_ac *= first / (first - last)
    ac = sqrt_ac**2
    alphas = torch.cat([ac[0:1], ac[1:] / ac[:-1]])
    return 1 - alphas


def _spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str,
                      steps_offset: int) -> np.ndarray:
    """The inference timesteps (descending int64) for a spacing of Lin et al. 2024, Table 2, as diffusers."""
    n, steps = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        stride = n // steps
        return (np.arange(0, steps) * stride).round()[::-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not supported; choose one of "
                     f"{', '.join(TIMESTEP_SPACINGS)}")


# ----------------------------------------------------------------------------- noise
def _randn(shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise drawn exactly as diffusers' ``randn_tensor`` draws it, so a seed gives the same
    numbers: on the generator's device when that is the CPU (then moved), one draw of the whole shape, or with
    a list of generators one draw of shape [1, ...] per sample from its own generator."""
    device = torch.device(device)
    draw_device = device
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, (list, tuple)) else generator).device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise ValueError(f"cannot draw noise for a {device} tensor from a {gen_type} generator")
            draw_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        one = (1, *shape[1:])
        draws = [torch.randn(one, generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(draws, dim=0).to(device)
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


# ----------------------------------------------------------------------------- the shared scheduler machinery
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _as_python_int(value):
    """value as a Python int when it is a host integer (int, numpy integer), else None. Never reads a
    tensor."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    return None


class _ReferenceTables:
    """The per-timestep tables :mod:`fastddpm.reference` reads: the rows of a stacked table, named as
    contracts.REVERSE_TABLE, and ᾱ."""

    def __init__(self, table: torch.Tensor, alphas_cumprod: torch.Tensor):
        for name, row in zip(contracts.REVERSE_TABLE, table):
            setattr(self, name, row)
        self.alphas_cumprod = alphas_cumprod


class _Scheduler(ConfigMixin):
    """What both schedulers share: diffusers' SchedulerMixin surface, the schedule, the tables, the forward
    process."""

    order = 1
    has_compatibles = True
    init_noise_sigma = 1.0

    def register_to_config(self, **kwargs) -> None:
        """Change config values after construction, as diffusers' ``register_to_config`` (what ``step`` reads
        from the config follows; the β schedule does not: build a new scheduler for that)."""
        super().register_to_config(**kwargs)
        self._tables.clear()

    @property
    def compatibles(self) -> list[type]:
        """The scheduler classes that can be built from this one's config: fastddpm's (:data:`SCHEDULERS`)
        and, where diffusers is installed, the classes diffusers lists for its scheduler of the same name."""
        ours = list(SCHEDULERS)
        try:
            import diffusers
        except ImportError:
            return ours
        theirs = getattr(diffusers, type(self).__name__, None)
        return ours + list(theirs._get_compatibles()) if theirs is not None else ours

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --------------------------------------------------------------- schedule
    def _init_schedule(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                       rescale_betas_zero_snr) -> None:
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)) \
                or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}")
        self._tables: dict = {}
        self.betas = _diffusers_betas(int(num_train_timesteps), beta_start, beta_end, beta_schedule,
                                      trained_betas)
        if self.betas.dim() != 1 or self.betas.numel() < 1:
            raise ValueError(f"trained_betas must be a non-empty 1-D sequence, got shape "
                             f"{tuple(self.betas.shape)}")
        if rescale_betas_zero_snr:
            self.betas = _rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.num_inference_steps = None
        self._timesteps_host = np.arange(0, self.alphas_cumprod.shape[0])[::-1].copy().astype(np.int64)
        self._timesteps = torch.from_numpy(self._timesteps_host.copy())

    @property
    def timesteps(self) -> torch.Tensor:
        """The timesteps of the current schedule, descending (int64)."""
        return self._timesteps

    @timesteps.setter
    def timesteps(self, value) -> None:
        value = torch.as_tensor(value)
        self._timesteps_host = value.detach().cpu().numpy().astype(np.int64).reshape(-1)
        self._timesteps = value
        self._tables.clear()

    def _set_timesteps(self, num_inference_steps, device, timesteps) -> np.ndarray | None:
        """set_timesteps of both schedulers: checks, the host and device timesteps, a fresh table cache.
        Returns the custom timesteps when given (else sets num_inference_steps and returns None)."""
        num_train = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass either num_inference_steps or timesteps, not both")
        custom = None
        if timesteps is not None:
            steps = custom = np.asarray([int(s) for s in timesteps], dtype=np.int64)
            if steps.ndim != 1 or steps.size == 0:
                raise ValueError("timesteps must be a non-empty sequence of integers")
            if np.any(steps[1:] >= steps[:-1]):
                raise ValueError("custom timesteps must be in strictly descending order")
            if steps[0] >= num_train:
                raise ValueError(f"timesteps must start below num_train_timesteps={num_train}, "
                                 f"got {steps[0]}")
            if steps[-1] < 0:
                raise ValueError(f"timesteps must be >= 0, got {steps[-1]}")
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps or timesteps")
            n = _as_python_int(num_inference_steps)
            if n is None or n < 1:
                raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
            if n > num_train:
                raise ValueError(f"num_inference_steps={n} cannot exceed num_train_timesteps={num_train}: "
                                 f"the model was trained on {num_train} timesteps only")
            self.num_inference_steps = n
            steps = _spaced_timesteps(num_train, n, self.config.timestep_spacing, self.config.steps_offset)
        self._timesteps_host = steps
        self._timesteps = torch.from_numpy(steps.copy()).to(device)
        self._tables.clear()
        return custom

    def _prev_host(self) -> np.ndarray:
        """Previous timestep of every t ∈ [0, T) under the current schedule (−1: the end)."""
        raise NotImplementedError(f"{type(self).__name__} does not say which timestep follows which: a "
                                  f"scheduler subclass defines _prev_host (DDPMScheduler, DDIMScheduler do)")

    def _on_schedule(self):
        """bool [T]: which timesteps the current inference schedule holds; None when every timestep is
        valid."""
        return None

    def previous_timestep(self, timestep):
        """The timestep that follows ``timestep`` in the current schedule (−1 after the last). An int gives an
        int; a tensor (0-d or [B]) gives an int64 tensor on its device, looked up without a host sync."""
        value = _as_python_int(timestep)
        prev = self._prev_host()
        if value is not None:
            if not 0 <= value < prev.shape[0]:
                raise ValueError(f"timestep must lie in [0, {prev.shape[0]}), got {value}")
            return int(prev[value])
        if not isinstance(timestep, torch.Tensor):
            raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")
        return self._prev_table(timestep.device)[timestep.long()]

    # --------------------------------------------------------------- tables (per device)
    def _cached(self, name: str, device: torch.device, build):
        """A table built on the host by ``build()`` and kept per device, rebuilt when ᾱ or the schedule
        changes."""
        ac = self.alphas_cumprod
        key = (name, device, id(ac), ac._version, getattr(self, "variance_type", None))
        table = self._tables.get(key)
        if table is None:
            stale = [k for k in self._tables if k[:2] == (name, device)]
            for k in stale:
                del self._tables[k]
            table = build().to(device, non_blocking=True)
            self._tables[key] = table
        return table

    def _prev_table(self, device) -> torch.Tensor:
        return self._cached("prev", torch.device(device), lambda: torch.from_numpy(self._prev_host().copy()))

    def _reference_tables(self, device) -> _ReferenceTables:
        """The x̂₀ rows of contracts.REVERSE_TABLE (√(1/ᾱ_t), √(1/ᾱ_t − 1), √ᾱ_t, √(1 − ᾱ_t); built in
        float64, stored float32) and ᾱ itself, on ``device``, for :mod:`fastddpm.reference`."""
        def build():
            ac = self.alphas_cumprod.double()
            step_rows = torch.zeros_like(ac)  # the posterior and σ rows belong to a step, not to ᾱ_t alone
            return reverse_table(ac, step_rows, step_rows, step_rows)[:contracts.DDIM_TABLE_ROWS].float()
        device = torch.device(device)
        return _ReferenceTables(self._cached("x0_rows", device, build),
                                self._cached("alphas_cumprod", device, lambda: self.alphas_cumprod.clone()))

    # --------------------------------------------------------------- inputs
    def _check_prediction_type(self) -> str:
        prediction_type = self.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} must be one of "
                             f"{', '.join(PREDICTION_TYPES)}")
        return prediction_type

    def _x0_limits(self):
        """(clip_denoised, threshold) for the reverse step from the config: ±clip_sample_range or False, and
        (ratio, max_value) for dynamic thresholding (which takes precedence) or None."""
        c = self.config
        if c.thresholding:
            return False, (float(c.dynamic_thresholding_ratio), float(c.sample_max_value))
        if c.clip_sample:
            return float(c.clip_sample_range), None
        return False, None

    def _timestep_tensor(self, timestep, sample: torch.Tensor, check_schedule: bool) -> torch.Tensor:
        """timestep (int, 0-d or [B] integer tensor) as int64 [B] on the sample's device, without a host sync.

        A Python int is checked on the host (range, and membership of the current schedule when
        ``check_schedule``); a tensor is not read."""
        batch = sample.shape[0]
        num_train = self.alphas_cumprod.shape[0]
        value = _as_python_int(timestep)
        if value is not None:
            if not 0 <= value < num_train:
                raise ValueError(f"timestep must lie in [0, {num_train}), got {value}")
            on = self._on_schedule() if check_schedule else None
            if on is not None and not on[value]:
                raise ValueError(f"timestep {value} is not in the current schedule "
                                 f"{self._timesteps_host.tolist()}")
            return torch.full((batch,), value, dtype=torch.int64, device=sample.device)
        if not isinstance(timestep, torch.Tensor):
            raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")
        if timestep.is_floating_point() or timestep.is_complex() or timestep.dtype == torch.bool:
            raise TypeError(f"timestep must be an integer tensor, got dtype {timestep.dtype}")
        if timestep.dim() == 0 or tuple(timestep.shape) == (1,):
            return timestep.reshape(()).to(sample.device, torch.int64, non_blocking=True).expand(batch)
        if tuple(timestep.shape) != (batch,):
            raise ValueError(f"a timestep tensor must be 0-d or of shape [{batch}] (one per sample), "
                             f"got {list(timestep.shape)}")
        return timestep.to(sample.device, torch.int64, non_blocking=True)

    def _check_step_inputs(self, model_output, sample) -> None:
        for name, value in (("model_output", model_output), ("sample", sample)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {value.dtype}")
        if sample.dim() < 1:
            raise ValueError("sample must have a batch dimension")

    # --------------------------------------------------------------- forward process
    def _timesteps_for(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        """timesteps ([B], or one for the whole batch) as int64 [B] on like's device."""
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps)
        timesteps = timesteps.to(like.device, non_blocking=True).long()
        return timesteps.expand(like.shape[0]) if timesteps.dim() == 0 else timesteps

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε (Ho et al. eq. 4) for timesteps of shape [B] (or one for all)."""
        t = self._timesteps_for(timesteps, original_samples)
        return reference.q_sample(self._reference_tables(original_samples.device), original_samples, t, noise)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target v = √ᾱ_t ε − √(1 − ᾱ_t) x₀ (Salimans & Ho 2022), ``sample`` being x₀."""
        cd = _compute_dtype(sample.dtype)
        t = self._timesteps_for(timesteps, sample)
        v = reference.predict_v(self._reference_tables(sample.device), sample.to(cd), t, noise.to(cd))
        return v.to(sample.dtype)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model's input is the sample itself for these schedulers (kept for API compatibility)."""
        return sample


# ----------------------------------------------------------------------------- DDPM
# Rows of DDPMScheduler's variance table: the values diffusers' _get_variance returns per variance_type, and
# log β̃_t.
_VARIANCE_ROWS = {"fixed_small": 0, "fixed_small_log": 1, "fixed_large": 2, "fixed_large_log": 3,
                  "log_small": 4}


class DDPMScheduler(_Scheduler):
    """Ancestral sampling of DDPM (Ho et al. 2020), with the constructor, config and methods of diffusers'
    ``DDPMScheduler``.

    Arguments (diffusers' names and defaults): ``num_train_timesteps`` T; ``beta_start``, ``beta_end``;
    ``beta_schedule`` linear | scaled_linear | squaredcos_cap_v2 | sigmoid | laplace; ``trained_betas``
    (overrides the schedule); ``variance_type``: σ_t² = β̃_t (fixed_small, fixed_small_log), β_t (fixed_large,
    fixed_large_log), or from the model's extra output channels (learned: the variance itself; learned_range:
    the interpolation fraction v ∈ [−1, 1] between log β̃_t and log β_t, Nichol & Dhariwal 2021 eq. 15);
    ``clip_sample`` / ``clip_sample_range``: clamp x̂₀; ``prediction_type`` epsilon | sample | v_prediction;
    ``thresholding`` with ``dynamic_thresholding_ratio`` and ``sample_max_value`` (Saharia et al. 2022);
    ``timestep_spacing`` leading | trailing | linspace and ``steps_offset`` for ``set_timesteps``;
    ``rescale_betas_zero_snr`` (Lin et al. 2024).

    ``fixed_large_log`` differs from diffusers on purpose: σ_t = exp(½·log β_t) = √β_t, the same as
    ``fixed_large``. diffusers takes the square root of log β_t itself, which is negative, so every noisy
    step returns NaN there.
    """

    _compatibles = ["DDIMScheduler"]

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type {variance_type!r} must be one of {', '.join(VARIANCE_TYPES)}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} must be one of "
                             f"{', '.join(PREDICTION_TYPES)}")
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr)
        self.one = torch.tensor(1.0)
        self.custom_timesteps = False
        self.variance_type = variance_type

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> None:
        """Choose the inference timesteps: ``num_inference_steps`` spaced per ``timestep_spacing``, or your
        own strictly descending ``timesteps``. ``device``: where ``self.timesteps`` goes."""
        self.custom_timesteps = self._set_timesteps(num_inference_steps, device, timesteps) is not None

    @_Scheduler.timesteps.setter
    def timesteps(self, value) -> None:
        _Scheduler.timesteps.fset(self, value)
        self.custom_timesteps = True

    @property
    def _scheduled(self) -> bool:
        return bool(self.custom_timesteps or self.num_inference_steps)

    def _on_schedule(self):
        if not self._scheduled:
            return None
        on = np.zeros(self.alphas_cumprod.shape[0], dtype=bool)
        steps = self._timesteps_host
        on[steps[(steps >= 0) & (steps < on.shape[0])]] = True
        return on

    def _prev_host(self) -> np.ndarray:
        num_train = self.alphas_cumprod.shape[0]
        prev = np.arange(num_train, dtype=np.int64) - 1  # training-time convention: t − 1
        if self._scheduled:
            steps = self._timesteps_host
            nxt = np.append(steps[1:], -1)
            keep = (steps >= 0) & (steps < num_train)
            prev[steps[keep]] = nxt[keep]
        return prev

    def _step_terms(self):
        """float64 [T] each, for the step t → t' (the previous timestep of the current schedule, ᾱ_{−1} = 1):
        ᾱ_t, ᾱ_t', β_t = 1 − ᾱ_t/ᾱ_t' and β̃_t = (1 − ᾱ_t')/(1 − ᾱ_t)·β_t (eq. 7, clamped at 1e-20 as
        diffusers)."""
        ac = self.alphas_cumprod.double()
        prev = torch.from_numpy(self._prev_host())
        ac_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.ones_like(ac))
        beta_t = 1 - ac / ac_prev
        small = ((1 - ac_prev) / (1 - ac) * beta_t).clamp(min=1e-20)
        return ac, ac_prev, beta_t, small

    def _step_table(self, device) -> torch.Tensor:
        """[7, T] float32 on ``device``, rows as contracts.REVERSE_TABLE, for the step t → t' of the current
        schedule, built in float64; NaN columns for timesteps outside the schedule."""
        def build():
            ac, ac_prev, beta_t, small = self._step_terms()
            if self.variance_type in ("fixed_large", "fixed_large_log"):
                sigma = beta_t.sqrt()  # fixed_large_log: exp(½·log β_t), the same number
            elif self.variance_type in ("fixed_small", "fixed_small_log"):
                sigma = small.sqrt()
            else:  # learned variances: the noise step() hands the op is σ_t·z already
                sigma = torch.ones_like(ac)
            # μ̃_t = √ᾱ_t' β_t/(1 − ᾱ_t) · x̂₀ + √(ᾱ_t/ᾱ_t') (1 − ᾱ_t')/(1 − ᾱ_t) · x_t  (Ho et al. eq. 7)
            table = reverse_table(ac, ac_prev.sqrt() * beta_t / (1 - ac),
                                  (ac / ac_prev).sqrt() * (1 - ac_prev) / (1 - ac), sigma)
            on = self._on_schedule()
            if on is not None:
                table[:, torch.from_numpy(~on)] = float("nan")
            return table.float()
        return self._cached("ddpm_step", torch.device(device), build)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """x_t → x_{t'} (t' the previous timestep of the schedule): x̂₀ from the model output, clipped or
        thresholded, the posterior mean μ̃_t(x_t, x̂₀) and, where t > 0, σ_t·z with z drawn as diffusers draws
        it.

        ``timestep``: an int, a 0-d tensor or an integer tensor [B] of per-sample timesteps (on any device).
        Returns a :class:`DDPMSchedulerOutput` (prev_sample, pred_original_sample), or a tuple with
        ``return_dict=False``.
        """
        self._check_step_inputs(model_output, sample)
        predicted_variance = None
        if self.variance_type in ("learned", "learned_range"):
            if model_output.dim() < 2 or model_output.shape[1] != 2 * sample.shape[1]:
                raise ValueError(f"variance_type={self.variance_type!r} needs a model output with twice the "
                                 f"sample's channels (prediction and variance), got "
                                 f"{list(model_output.shape)} for a sample of {list(sample.shape)}")
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output must have the sample's shape {list(sample.shape)}, "
                             f"got {list(model_output.shape)}")
        prediction_type = self._check_prediction_type()
        t = self._timestep_tensor(timestep, sample, check_schedule=True)
        clip_denoised, threshold = self._x0_limits()
        if _as_python_int(timestep) == 0:  # no noise at t = 0, and none drawn (as diffusers)
            noise = torch.zeros_like(sample)
        else:  # a tensor timestep is never read: its noise is masked where t = 0
            noise = _randn(model_output.shape, generator, model_output.device, model_output.dtype)
            if predicted_variance is not None:
                sigma = self._learned_sigma(predicted_variance, t, sample)
                noise = sigma * noise.to(sigma.dtype)
        prev, x0, _ = p_sample_step(None, model_output, sample, t, noise,
                                    objective=OBJECTIVE_OF_PREDICTION_TYPE[prediction_type],
                                    clip_denoised=clip_denoised, threshold=threshold,
                                    table=self._step_table(sample.device), check=False)
        if not return_dict:
            return prev, x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _learned_sigma(self, predicted_variance, t, sample) -> torch.Tensor:
        """σ_t from the model's variance channels, in the compute dtype: learned: √v (v the variance);
        learned_range: exp(½(f·log β_t + (1 − f)·log β̃_t)), f = (v + 1)/2 (Nichol & Dhariwal 2021, eq.
        15)."""
        v = predicted_variance.to(_compute_dtype(sample.dtype))
        if self.variance_type == "learned":
            return v.sqrt()
        table = self._variances(sample.device)
        log_small = reference.extract(table[_VARIANCE_ROWS["log_small"]], t, sample)
        log_large = reference.extract(table[_VARIANCE_ROWS["fixed_large_log"]], t, sample)
        frac = (v + 1) / 2
        return torch.exp(0.5 * (frac * log_large + (1 - frac) * log_small))

    def _variances(self, device) -> torch.Tensor:
        """[5, T] float32, rows as :data:`_VARIANCE_ROWS`, for the (t, previous t) pairs of the current
        schedule, computed in float64."""
        def build():
            _, _, beta_t, small = self._step_terms()
            return torch.stack([small, small.sqrt(), beta_t, beta_t.log(), small.log()]).float()
        return self._cached("ddpm_variances", torch.device(device), build)

    def _get_variance(self, t, predicted_variance: torch.Tensor | None = None,
                      variance_type: str | None = None):
        """The variance term of the step at timestep ``t`` (an int, or an integer tensor looked up on its
        device), in the form diffusers' ``_get_variance`` returns for ``variance_type`` (default: the
        config's): fixed_small β̃_t; fixed_small_log √β̃_t; fixed_large β_t; fixed_large_log log β_t; learned
        the ``predicted_variance`` itself; learned_range the log-variance f·log β_t + (1 − f)·log β̃_t with f
        = (predicted_variance + 1)/2. The previous timestep is that of the current schedule; float64 math,
        float32 result."""
        variance_type = self.config.variance_type if variance_type is None else variance_type
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type {variance_type!r} must be one of {', '.join(VARIANCE_TYPES)}")
        if variance_type == "learned":
            return predicted_variance
        if variance_type == "learned_range" and predicted_variance is None:
            raise ValueError("variance_type='learned_range' needs the model's predicted_variance")
        value = _as_python_int(t)
        if value is not None:
            num_train = self.alphas_cumprod.shape[0]
            if not 0 <= value < num_train:
                raise ValueError(f"timestep must lie in [0, {num_train}), got {value}")
            on = self._on_schedule()
            if on is not None and not on[value]:
                raise ValueError(f"timestep {value} is not in the current schedule "
                                 f"{self._timesteps_host.tolist()}")
            index, device = torch.tensor(value), torch.device("cpu")
        elif isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex()
                                                  or t.dtype == torch.bool):
            index, device = t.long(), t.device
        else:
            raise TypeError(f"timestep must be an int or an integer tensor, got {t!r}")
        if predicted_variance is not None:
            device = predicted_variance.device
        table = self._variances(device)
        index = index.to(device)
        if variance_type == "learned_range":
            frac = (predicted_variance + 1) / 2
            return (frac * table[_VARIANCE_ROWS["fixed_large_log"]][index]
                    + (1 - frac) * table[_VARIANCE_ROWS["log_small"]][index])
        return table[_VARIANCE_ROWS[variance_type]][index]


# ----------------------------------------------------------------------------- DDIM
class DDIMScheduler(_Scheduler):
    """DDIM sampling (Song et al. 2021), with the constructor, config and methods of diffusers'
    ``DDIMScheduler``.

    Arguments as diffusers': ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` (also
    sigmoid and laplace here), ``trained_betas``, ``clip_sample``, ``set_alpha_to_one`` (ᾱ after the last step
    is 1, else ᾱ_0), ``steps_offset``, ``prediction_type``, ``thresholding``, ``dynamic_thresholding_ratio``,
    ``clip_sample_range``, ``sample_max_value``, ``timestep_spacing``, ``rescale_betas_zero_snr``.

    The step goes from t to the *next timestep of the schedule*. diffusers instead steps to t −
    num_train_timesteps // num_inference_steps, which is the same for 'leading' spacing (and for 'trailing'
    when the step count divides num_train_timesteps) but lands between the schedule's timesteps otherwise
    ('linspace'; 'trailing' with e.g. 3 steps of 1000), so that the next model call sees a sample of another
    noise level. A timestep outside the schedule steps by that stride, as in diffusers.
    """

    _compatibles = ["DDPMScheduler"]

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", rescale_betas_zero_snr: bool = False):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} must be one of "
                             f"{', '.join(PREDICTION_TYPES)}")
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._final_alpha_host = float(self.final_alpha_cumprod)  # a CPU tensor here: no device sync

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> None:
        """Choose ``num_inference_steps`` timesteps spaced per ``timestep_spacing`` (or, beyond diffusers,
        your own strictly descending ``timesteps``). ``device``: where ``self.timesteps`` goes."""
        custom = self._set_timesteps(num_inference_steps, device, timesteps)
        if custom is not None:
            self.num_inference_steps = int(custom.size)

    def _prev_host(self) -> np.ndarray:
        num_train = self.alphas_cumprod.shape[0]
        stride = num_train // self.num_inference_steps if self.num_inference_steps else 1
        prev = np.arange(num_train, dtype=np.int64) - stride  # off the schedule: diffusers' uniform stride
        steps = self._timesteps_host
        if self.num_inference_steps:
            nxt = np.append(steps[1:], -1)
            keep = (steps >= 0) & (steps < num_train)
            prev[steps[keep]] = nxt[keep]
        return prev

    def _get_variance(self, timestep, prev_timestep) -> torch.Tensor:
        """σ_t²/η² of the step ``timestep`` → ``prev_timestep`` (Song et al. 2021, eq. 16): (1 − ᾱ_prev)/(1 −
        ᾱ_t)·(1 − ᾱ_t/ᾱ_prev), with ᾱ_prev = ``final_alpha_cumprod`` for a negative ``prev_timestep``, as
        diffusers' ``_get_variance``. Ints or integer tensors (looked up on their device); float64 math,
        float32 result."""
        num_train = self.alphas_cumprod.shape[0]
        device = next((v.device for v in (timestep, prev_timestep) if isinstance(v, torch.Tensor)), None)
        device = torch.device("cpu") if device is None else device
        index = []
        for name, value in (("timestep", timestep), ("prev_timestep", prev_timestep)):
            host = _as_python_int(value)
            if host is not None and (host >= num_train or (name == "timestep" and host < 0)):
                raise ValueError(f"{name} must lie in [0, {num_train}), got {host} (a negative "
                                 f"prev_timestep: the end of the schedule)")
            if host is None and (not isinstance(value, torch.Tensor) or value.is_floating_point()
                                 or value.is_complex() or value.dtype == torch.bool):
                raise TypeError(f"{name} must be an int or an integer tensor, got {value!r}")
            index.append(torch.as_tensor(value, device=device).long())
        t, t_prev = index
        ac = self._cached("alphas_cumprod_float64", device, lambda: self.alphas_cumprod.double())
        ac_t = ac[t]
        final = torch.tensor(self._final_alpha_host, dtype=ac.dtype, device=device)
        ac_prev = torch.where(t_prev >= 0, ac[t_prev.clamp(min=0)], final)
        return ((1 - ac_prev) / (1 - ac_t) * (1 - ac_t / ac_prev)).float()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        """x_t → x_{t_prev} by DDIM (Song et al. 2021, eq. 12) with noise scale ``eta`` (0: deterministic, 1:
        DDPM's σ). ``use_clipped_model_output`` re-derives ε̂ from the clipped x̂₀; ``variance_noise``
        replaces the drawn noise (not together with ``generator``). ``timestep``: an int, a 0-d tensor or an
        integer tensor [B]; ``eta`` a Python number. Returns a :class:`DDIMSchedulerOutput` or, with
        ``return_dict=False``, a tuple.
        """
        if self.num_inference_steps is None:
            raise ValueError("the number of inference steps is not set: call set_timesteps first")
        self._check_step_inputs(model_output, sample)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output must have the sample's shape {list(sample.shape)}, "
                             f"got {list(model_output.shape)}")
        if isinstance(eta, torch.Tensor):
            raise TypeError("eta must be a Python number (reading a tensor's value would sync the device)")
        eta = float(eta)
        prediction_type = self._check_prediction_type()
        t = self._timestep_tensor(timestep, sample, check_schedule=False)
        t_prev = self._prev_table(sample.device)[t]
        clip_denoised, threshold = self._x0_limits()
        noise = sample.new_zeros(())  # η = 0: no noise term
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = _randn(model_output.shape, generator, model_output.device,
                                        model_output.dtype)
            elif variance_noise.shape != sample.shape:
                raise ValueError(f"variance_noise must have the sample's shape {list(sample.shape)}, "
                                 f"got {list(variance_noise.shape)}")
            noise = variance_noise
        # The reference step computes in the sample's compute dtype (float32 for float32), σ included, as
        # diffusers does; the fused DDIM op builds σ in float64, which differs from diffusers' float32
        # rounding by more than the 1e-5 the tests hold the step to.
        tables = self._reference_tables(sample.device)
        prev, x0 = reference.ddim_step(tables, model_output, sample, t, t_prev, noise,
                                       objective=OBJECTIVE_OF_PREDICTION_TYPE[prediction_type], eta=eta,
                                       clip_denoised=clip_denoised, threshold=threshold,
                                       rederive_noise=bool(use_clipped_model_output),
                                       final_alpha_cumprod=self._final_alpha_host)
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# The scheduler classes of this module: each one's config builds any of them (``compatibles``).
SCHEDULERS = (DDPMScheduler, DDIMScheduler)
