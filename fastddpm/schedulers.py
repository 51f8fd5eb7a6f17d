"""Schedulers with the API of diffusers' ``DDPMScheduler`` and ``DDIMScheduler`` (diffusers 0.42).

Swap ``from diffusers import DDPMScheduler`` for ``from fastddpm import DDPMScheduler``: the constructor
arguments, ``config`` (with ``_use_default_values``; config keys also read as attributes, with diffusers'
FutureWarning), ``scheduler_config.json`` files (both ways), ``set_timesteps``, ``step`` (its output an ordered
dict, as diffusers'), ``_get_variance``, ``add_noise``, ``get_velocity`` and ``compatibles`` behave as diffusers'
do, and a seeded ``torch.Generator`` draws the same noise, so a sampling loop gives the same images. Beyond
diffusers:

- ``step`` takes per-sample timesteps (an integer tensor of shape [B] on any device) as well as an int or a
  0-d tensor, and never syncs the device with the host: no ``.item()``, no Python branch on a tensor's value;
  "no noise at t = 0" is a mask. With a tensor timestep the noise is therefore always drawn (and multiplied by
  0 where t = 0), so the generator advances one draw further than diffusers' at the very last step.
- The per-timestep coefficients live in tables on the sample's device (built once per schedule and device,
  in float64 from ``alphas_cumprod``, stored float32), and fp16/bf16 inputs are computed in float32.
- Where diffusers is wrong we are right (see the README, "Using fastddpm with diffusers"): the
  ``fixed_large_log`` variance (NaN in diffusers), DDIM's previous timestep for spacings that are not a
  uniform stride, and ``sqrt`` of a rounding-negative DDIM direction coefficient.

``alphas_cumprod`` is built as diffusers builds it (float32 betas, float32 cumulative product), so it is
bit-identical to diffusers'; only what is derived from it is computed in float64.

The common case of each ``step`` runs through one function of tensors, :func:`_ddpm_update` or
:func:`_ddim_update`, which a fused reverse-step op can replace.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from fastddpm.ops.reverse_step import ddim_step as _fused_ddim_step
from fastddpm.ops.reverse_step import p_sample_step as _fused_p_sample_step

__all__ = ["DDPMScheduler", "DDIMScheduler", "DDPMSchedulerOutput", "DDIMSchedulerOutput", "FrozenDict"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "scheduler_config.json"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose schedulers these follow (written to the config)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_OBJECTIVES = {"epsilon": "pred_noise", "sample": "pred_x0", "v_prediction": "pred_v"}
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Keyword arguments of diffusers' from_pretrained that concern downloading, not the scheduler.
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision",
               "use_auth_token", "resume_download", "user_agent", "_from_pipeline", "_commit_hash")


# ----------------------------------------------------------------------------- config and outputs
class FrozenDict(OrderedDict):
    """A read-only ordered dict whose keys are also attributes (``config.num_train_timesteps``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._frozen = True

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no key {name!r}") from None

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise TypeError(f"{type(self).__name__} is read-only; build a new scheduler with from_config(config, "
                            f"{name}=...)")
        super().__setattr__(name, value)

    def _read_only(self, *args, **kwargs):
        if getattr(self, "_frozen", False):
            raise TypeError(f"{type(self).__name__} is read-only; build a new scheduler with from_config(config, "
                            f"key=value)")

    def __setitem__(self, key, value):
        self._read_only()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._read_only()
        super().__delitem__(key)

    def pop(self, *args, **kwargs):
        self._read_only()
        return super().pop(*args, **kwargs)

    def popitem(self, *args, **kwargs):
        self._read_only()
        return super().popitem(*args, **kwargs)

    def setdefault(self, *args, **kwargs):
        self._read_only()
        return super().setdefault(*args, **kwargs)

    def update(self, *args, **kwargs):
        self._read_only()
        return super().update(*args, **kwargs)

    def clear(self):
        self._read_only()
        super().clear()

    def __reduce__(self):  # copy/deepcopy/pickle rebuild through __init__
        return type(self), (list(self.items()),)


class _Output(OrderedDict):
    """As diffusers' BaseOutput: an ordered dict of the fields that are not None, whose values are also read by
    attribute (``out.prev_sample``) and by position (``out[0]``, ``out.to_tuple()``). Keys cannot be removed."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value

    def _no_removal(self, *args, **kwargs):
        raise TypeError(f"a {type(self).__name__}'s fields cannot be removed or replaced in bulk")

    __delitem__ = setdefault = pop = popitem = update = clear = _no_removal

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def __setattr__(self, name, value) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __reduce__(self):  # copy/pickle rebuild through the dataclass's __init__
        rebuild, _, *rest = super().__reduce__()
        return (rebuild, tuple(getattr(self, f.name) for f in fields(self)), *rest)

    def to_tuple(self) -> tuple:
        return tuple(self[k] for k in self.keys())


@dataclass
class DDPMSchedulerOutput(_Output):
    """prev_sample: x_{t_prev}; pred_original_sample: the x̂₀ it was computed from."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass
class DDIMSchedulerOutput(_Output):
    """prev_sample: x_{t_prev}; pred_original_sample: the x̂₀ it was computed from."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _json_value(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _register_to_config(init):
    """Wrap a scheduler's ``__init__`` as diffusers' ``@register_to_config`` does: before it runs, ``config`` holds
    every argument (defaults filled in) and, under ``_use_default_values``, the names of those left at their
    defaults, which another class's ``from_config`` then replaces by its own defaults (diffusers' rule)."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        passed = set(bound.arguments)
        bound.apply_defaults()
        config = {name: _json_value(value) for name, value in list(bound.arguments.items())[1:]}
        defaults = [name for name in config if name not in passed]
        if defaults:
            config["_use_default_values"] = defaults
        self._internal_dict = FrozenDict(config)
        init(self, *args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------- β schedules
def _betas_from_alpha_bar(alpha_bar, num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    # β_i = 1 − ᾱ((i+1)/T) / ᾱ(i/T), capped at max_beta (Nichol & Dhariwal 2021, §3.2); Python floats, as diffusers.
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def _cosine_alpha_bar(s):
    # ᾱ(s) = cos²((s + 0.008)/1.008 · π/2), the squaredcos_cap_v2 schedule (Nichol & Dhariwal 2021, eq. 17).
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(s):
    # Laplace noise schedule (Hang et al. 2024): log-SNR λ(s) = −½·sign(½ − s)·log(1 − 2|½ − s| + 1e-6).
    log_snr = -0.5 * math.copysign(1, 0.5 - s) * math.log(1 - 2 * math.fabs(0.5 - s) + 1e-6)
    snr = math.exp(log_snr)
    return math.sqrt(snr / (1 + snr))


def _make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas) -> torch.Tensor:
    """float32 betas, built with the same float32 operations as diffusers (so ᾱ is bit-identical)."""
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
        return torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float32)) * (beta_end - beta_start) + beta_start
    raise NotImplementedError(f"beta_schedule {beta_schedule!r} is not implemented; choose one of "
                              f"{', '.join(BETA_SCHEDULES)} or pass trained_betas")


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose ᾱ ends at exactly 0 (Lin et al. 2024, 'Common Diffusion Noise Schedules and Sample Steps are
    Flawed', Algorithm 1): shift √ᾱ so that its last value is 0, scale it so that its first is unchanged."""
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
    raise ValueError(f"timestep_spacing {spacing!r} is not supported; choose one of {', '.join(TIMESTEP_SPACINGS)}")


# ----------------------------------------------------------------------------- noise
def _randn(shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise drawn exactly as diffusers' ``randn_tensor`` draws it, so a seed gives the same
    numbers: on the generator's device when that is the CPU (then moved), one draw of the whole shape, or with a
    list of generators one draw of shape [1, ...] per sample from its own generator."""
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


# ----------------------------------------------------------------------------- the reverse-step math
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[..., B] → [..., B, 1, …, 1] to broadcast against a [B, …] tensor."""
    return values.reshape(*values.shape, *((1,) * (like.dim() - 1)))


def _limit_x0(x0: torch.Tensor, clip_range, threshold) -> torch.Tensor:
    """Clip x̂₀ to ±clip_range, or dynamic thresholding (Saharia et al. 2022, §2.3) when ``threshold`` =
    (ratio, max_value): s = the ratio-quantile of |x̂₀| per sample, clamped to [1, max_value]; x̂₀ ← clamp(x̂₀, ±s)/s."""
    if threshold is not None:
        ratio, max_value = threshold
        flat = x0.reshape(x0.shape[0], -1)
        s = torch.quantile(flat.abs(), ratio, dim=1)
        s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)
    if clip_range is not None:
        return x0.clamp(-clip_range, clip_range)
    return x0


# Rows of the DDPM step table, per timestep t (with t' = the previous timestep of the schedule, ᾱ_{−1} = 1).
DDPM_TABLE_ROWS = (
    "sqrt_recip_alphas_cumprod",  # 0  √(1/ᾱ_t)
    "sqrt_recipm1_alphas_cumprod",  # 1  √(1/ᾱ_t − 1)
    "sqrt_alphas_cumprod",  # 2  √ᾱ_t
    "sqrt_one_minus_alphas_cumprod",  # 3  √(1 − ᾱ_t)
    "posterior_mean_coef1",  # 4  √ᾱ_t' β_t / (1 − ᾱ_t),   β_t = 1 − ᾱ_t/ᾱ_t'
    "posterior_mean_coef2",  # 5  √(ᾱ_t/ᾱ_t') (1 − ᾱ_t') / (1 − ᾱ_t)
    "sigma",  # 6  σ_t, the standard deviation of the added noise (per variance_type)
)


def _ddpm_x0_and_mean(model_output, sample, t, table, prediction_type, clip_range, threshold):
    """(x̂₀, μ̃) in the compute dtype; the part of the DDPM step shared with the learned-variance path."""
    cd = _compute_dtype(sample.dtype)
    c = _per_sample(table[:, t].to(cd), sample)  # [7, B, 1, …]
    x, out = sample.to(cd), model_output.to(cd)
    if prediction_type == "epsilon":  # x̂₀ = √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε̂  (Ho et al. eq. 4 solved for x₀)
        x0 = c[0] * x - c[1] * out
    elif prediction_type == "v_prediction":  # x̂₀ = √ᾱ_t x_t − √(1 − ᾱ_t) v̂  (Salimans & Ho 2022)
        x0 = c[2] * x - c[3] * out
    elif prediction_type == "sample":
        x0 = out
    else:
        raise ValueError(f"prediction_type {prediction_type!r} must be one of {', '.join(PREDICTION_TYPES)}")
    x0 = _limit_x0(x0, clip_range, threshold)
    mean = c[4] * x0 + c[5] * x  # μ̃_t(x_t, x̂₀), Ho et al. eq. 7
    return x0, mean, c


def _ddpm_update(model_output, sample, t, table, prediction_type, clip_range, threshold, noise, seed=None):
    """One DDPM step x_t → x_{t'} for per-sample timesteps; returns (prev_sample, pred_original_sample).

    ``t``: int64 [B] on the sample's device; ``table``: float32 [7, T] on that device, rows as
    :data:`DDPM_TABLE_ROWS`, indexed by the timestep value; ``clip_range``: a float or None; ``threshold``:
    (dynamic_thresholding_ratio, sample_max_value) or None (it takes precedence over clipping); ``noise``: a
    standard normal tensor of the sample's shape, or None for no noise (or for noise drawn in-kernel from the
    Philox key ``seed``). x_{t'} = μ̃ + (t > 0)·σ_t·noise.
    Computes in float32 (float64 stays float64) and returns the sample's dtype. Tensors only: no host sync.
    """
    if noise is not None or seed is not None:  # the fused reverse-step op (Triton on CUDA, C++/reference on CPU)
        prev, x0, _ = _fused_p_sample_step(
            None, model_output, sample, t, noise, seed=seed, objective=_OBJECTIVES[prediction_type],
            clip_denoised=False if clip_range is None else clip_range, threshold=threshold, table=table, check=False)
        return prev, x0
    x0, prev, _ = _ddpm_x0_and_mean(model_output, sample, t, table, prediction_type, clip_range, threshold)
    return prev.to(sample.dtype), x0.to(sample.dtype)


def _ddim_update(model_output, sample, t, t_prev, alphas_cumprod, final_alpha_cumprod, prediction_type, eta,
                 clip_range, threshold, use_clipped_model_output, noise, fused=None):
    """One DDIM step x_t → x_{t_prev} (Song et al. 2021, eq. 12) for per-sample t and t_prev (int64 [B]);
    t_prev < 0 reads ``final_alpha_cumprod`` (a 0-d tensor). Returns (prev_sample, pred_original_sample).
    With ``fused`` = (x̂_0 table [4, T], ᾱ_final as a Python float) the step runs the fused DDIM op.

        x_prev = √ᾱ_prev x̂₀ + √(1 − ᾱ_prev − σ²) ε̂ + σ·noise,
        σ = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)   (eq. 16)

    ``noise`` is None for no noise term. Computes in float32 and returns the sample's dtype; no host sync.
    """
    if fused is not None:  # (x̂_0 table [4, T], ᾱ_final as a float): the fused DDIM op
        x0_table, final = fused
        prev, x0, _ = _fused_ddim_step(
            None, model_output, sample, t, t_prev, noise, objective=_OBJECTIVES[prediction_type], eta=eta,
            clip_denoised=False if clip_range is None else clip_range, threshold=threshold,
            rederive_noise=use_clipped_model_output, final_alpha_cumprod=final, table=x0_table,
            alphas_cumprod=alphas_cumprod, check=False)
        return prev, x0
    cd = _compute_dtype(sample.dtype)
    x, out = sample.to(cd), model_output.to(cd)
    ac = _per_sample(alphas_cumprod[t].to(cd), sample)
    ac_prev = torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp(min=0)], final_alpha_cumprod.to(alphas_cumprod))
    ac_prev = _per_sample(ac_prev.to(cd), sample)
    sqrt_ac, sqrt_1m_ac = ac.sqrt(), (1 - ac).sqrt()
    if prediction_type == "epsilon":
        x0, eps = (x - sqrt_1m_ac * out) / sqrt_ac, out
    elif prediction_type == "sample":
        x0 = out
        eps = (x - sqrt_ac * x0) / sqrt_1m_ac
    elif prediction_type == "v_prediction":
        x0, eps = sqrt_ac * x - sqrt_1m_ac * out, sqrt_ac * out + sqrt_1m_ac * x
    else:
        raise ValueError(f"prediction_type {prediction_type!r} must be one of {', '.join(PREDICTION_TYPES)}")
    x0 = _limit_x0(x0, clip_range, threshold)
    if use_clipped_model_output:  # ε̂ re-derived from the clipped x̂₀ (as in Song et al.'s code)
        eps = (x - sqrt_ac * x0) / sqrt_1m_ac
    variance = (1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)
    std = eta * variance.sqrt()
    # 1 − ᾱ_prev − σ² ≥ 0 for η ≤ 1; clamp its rounding error (diffusers takes √ of a tiny negative: NaN).
    prev = ac_prev.sqrt() * x0 + (1 - ac_prev - std**2).clamp(min=0).sqrt() * eps
    if noise is not None:
        prev = prev + std * noise.to(cd)
    return prev.to(sample.dtype), x0.to(sample.dtype)


# ----------------------------------------------------------------------------- the shared scheduler machinery
def _as_python_int(value):
    """value as a Python int when it is a host integer (int, numpy integer), else None. Never reads a tensor."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    return None


class _Scheduler:
    """Config handling (diffusers' ConfigMixin/SchedulerMixin surface) and what both schedulers share."""

    config_name = CONFIG_NAME
    order = 1
    has_compatibles = True
    init_noise_sigma = 1.0
    _deprecated_kwargs: list[str] = []  # constructor arguments diffusers deprecates (none for these classes)

    # --------------------------------------------------------------- config

    @property
    def config(self) -> FrozenDict:
        """The constructor arguments, read-only, by key or attribute (``scheduler.config.prediction_type``)."""
        return self._internal_dict

    def register_to_config(self, **kwargs) -> None:
        """Change config values after construction, as diffusers' ``register_to_config`` (what ``step`` reads from
        the config follows; the β schedule does not: build a new scheduler for that)."""
        self._internal_dict = FrozenDict({**self._internal_dict, **{k: _json_value(v) for k, v in kwargs.items()}})
        self._tables.clear()

    def __getattr__(self, name):
        # diffusers still lets config values be read as attributes, with a FutureWarning: scheduler.num_train_timesteps
        config = self.__dict__.get("_internal_dict")
        if config is not None and name in config:
            cls = type(self).__name__
            warnings.warn(f"Accessing config attribute `{name}` directly via '{cls}' object attribute is deprecated. "
                          f"Please access '{name}' over '{cls}'s config object instead, e.g. "
                          f"'scheduler.config.{name}'.", FutureWarning, stacklevel=2)
            return config[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def _init_keys(cls) -> list[str]:
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """A scheduler from a config dict (ours or diffusers', of this or another scheduler class); keyword
        arguments override config values. Keys this class does not take are ignored (and, with
        ``return_unused_kwargs``, returned with the unused keyword arguments)."""
        if config is None:
            config = kwargs.pop("pretrained_model_name_or_path", None)
        if config is None:
            raise ValueError("from_config needs a config dict as its first argument")
        if not isinstance(config, dict):
            config, kwargs = cls.load_config(config, return_unused_kwargs=True, **kwargs)
        defaults = set(config.get("_use_default_values", ()))  # diffusers: keys it filled with its defaults
        known = cls._init_keys()
        init, ignored = {}, {}
        for key, value in config.items():
            if key.startswith("_") or key in defaults:
                continue
            (init if key in known else ignored)[key] = value
        unused = {}
        for key, value in kwargs.items():
            (init if key in known else unused)[key] = value
        if ignored:
            logger.info("%s ignores config keys it does not take: %s", cls.__name__, sorted(ignored))
        scheduler = cls(**init)
        if return_unused_kwargs:
            return scheduler, {**ignored, **unused}
        if unused:
            logger.warning("%s.from_config: unused keyword arguments %s", cls.__name__, sorted(unused))
        return scheduler

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, return_unused_kwargs: bool = False, subfolder=None,
                    **kwargs):
        """The config dict of a ``scheduler_config.json``: a file, a folder holding it (or ``subfolder`` of a
        folder), or — when huggingface_hub is installed — a Hub repository id."""
        path = os.fspath(pretrained_model_name_or_path)
        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        if os.path.isfile(path):
            config_file = path
        elif os.path.isdir(path):
            config_file = os.path.join(path, subfolder or "", cls.config_name)
            if not os.path.isfile(config_file):
                raise OSError(f"no {cls.config_name} in {os.path.join(path, subfolder or '')}")
        else:
            if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
                raise OSError(f"{path} is neither a file nor a folder")
            try:
                from huggingface_hub import hf_hub_download
            except ImportError:
                raise OSError(f"{path!r} is neither a file nor a folder (install huggingface_hub to load "
                              f"from the Hub)") from None
            hub = {k: v for k, v in hub.items() if not k.startswith("_") and k not in ("use_auth_token",)}
            config_file = hf_hub_download(path, cls.config_name, subfolder=subfolder, **hub)
        try:
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError)
            raise ValueError(f"{config_file} is not valid UTF-8 JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} does not hold a JSON object")
        return (config, kwargs) if return_unused_kwargs else config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False,
                        **kwargs):
        """Load a ``scheduler_config.json`` written by :meth:`save_config` or by diffusers."""
        config, kwargs = cls.load_config(pretrained_model_name_or_path, return_unused_kwargs=True,
                                         subfolder=subfolder, **kwargs)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_json_string(self) -> str:
        config = {k: _json_value(v) for k, v in self.config.items() if k != "_use_default_values"}  # as diffusers
        config["_class_name"] = type(self).__name__
        config["_diffusers_version"] = DIFFUSERS_VERSION
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path) -> None:
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """Write ``scheduler_config.json`` (diffusers' format, readable by diffusers) into ``save_directory``."""
        if push_to_hub:
            raise NotImplementedError("push_to_hub is not supported; upload the folder with huggingface_hub")
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_config needs a folder")
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, self.config_name))

    save_pretrained = save_config

    @property
    def compatibles(self) -> list[type]:
        """The scheduler classes that can be built from this one's config: fastddpm's two and, where diffusers is
        installed, the classes diffusers lists for its scheduler of the same name."""
        ours = [DDPMScheduler, DDIMScheduler]
        try:
            import diffusers
        except ImportError:
            return ours
        theirs = getattr(diffusers, type(self).__name__, None)
        return ours + list(theirs._get_compatibles()) if theirs is not None else ours

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --------------------------------------------------------------- schedule
    def _init_schedule(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                       rescale_betas_zero_snr) -> None:
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)) \
                or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}")
        self._tables: dict = {}
        self.betas = _make_betas(int(num_train_timesteps), beta_start, beta_end, beta_schedule, trained_betas)
        if self.betas.dim() != 1 or self.betas.numel() < 1:
            raise ValueError(f"trained_betas must be a non-empty 1-D sequence, got shape {tuple(self.betas.shape)}")
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
                raise ValueError(f"timesteps must start below num_train_timesteps={num_train}, got {steps[0]}")
            if steps[-1] < 0:
                raise ValueError(f"timesteps must be >= 0, got {steps[-1]}")
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps or timesteps")
            n = _as_python_int(num_inference_steps)
            if n is None or n < 1:
                raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
            if n > num_train:
                raise ValueError(f"num_inference_steps={n} cannot exceed num_train_timesteps={num_train}: the "
                                 f"model was trained on {num_train} timesteps only")
            self.num_inference_steps = n
            steps = _spaced_timesteps(num_train, n, self.config.timestep_spacing, self.config.steps_offset)
        self._timesteps_host = steps
        self._timesteps = torch.from_numpy(steps.copy()).to(device)
        self._tables.clear()
        return custom

    def _check_prediction_type(self) -> str:
        prediction_type = self.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} must be one of {', '.join(PREDICTION_TYPES)}")
        return prediction_type

    def _x0_limits(self):
        """(clip_range or None, (ratio, max_value) or None) from the config."""
        c = self.config
        if c.thresholding:
            return None, (float(c.dynamic_thresholding_ratio), float(c.sample_max_value))
        if c.clip_sample:
            return float(c.clip_sample_range), None
        return None, None

    def _cached(self, name: str, device: torch.device, build):
        """A table built on the host by ``build()`` and kept per device, rebuilt when ᾱ or the schedule changes."""
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

    def _sqrt_tables(self, device) -> torch.Tensor:
        """[2, T] float32: √ᾱ_t and √(1 − ᾱ_t), computed in float64."""
        def build():
            ac = self.alphas_cumprod.double()
            return torch.stack([ac.sqrt(), (1 - ac).sqrt()]).float()
        return self._cached("sqrt", torch.device(device), build)

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
                raise ValueError(f"timestep {value} is not in the current schedule {self._timesteps_host.tolist()}")
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

    def _timesteps_for(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps)
        return timesteps.to(like.device, non_blocking=True).long()

    # --------------------------------------------------------------- forward process
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε (Ho et al. eq. 4) for timesteps of shape [B] (or one for all)."""
        cd = _compute_dtype(original_samples.dtype)
        t = self._timesteps_for(timesteps, original_samples)
        c = self._sqrt_tables(original_samples.device)[:, t].reshape(2, -1, *((1,) * (original_samples.dim() - 1)))
        c = c.to(cd)
        noisy = c[0] * original_samples.to(cd) + c[1] * noise.to(cd)
        return noisy.to(original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target v = √ᾱ_t ε − √(1 − ᾱ_t) x₀ (Salimans & Ho 2022), ``sample`` being x₀."""
        cd = _compute_dtype(sample.dtype)
        t = self._timesteps_for(timesteps, sample)
        c = self._sqrt_tables(sample.device)[:, t].reshape(2, -1, *((1,) * (sample.dim() - 1))).to(cd)
        return (c[0] * noise.to(cd) - c[1] * sample.to(cd)).to(sample.dtype)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model's input is the sample itself for these schedulers (kept for API compatibility)."""
        return sample

    def _check_step_inputs(self, model_output, sample) -> None:
        for name, value in (("model_output", model_output), ("sample", sample)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {value.dtype}")
        if sample.dim() < 1:
            raise ValueError("sample must have a batch dimension")

    def _prev_host(self) -> np.ndarray:
        """Previous timestep of every t ∈ [0, T) under the current schedule (−1: the end)."""
        raise NotImplementedError

    def _on_schedule(self):
        """bool [T]: which timesteps the current inference schedule holds; None when every timestep is valid."""
        return None

    def previous_timestep(self, timestep):
        """The timestep that follows ``timestep`` in the current schedule (−1 after the last). An int gives an int;
        a tensor (0-d or [B]) gives an int64 tensor on its device, looked up without a host sync."""
        value = _as_python_int(timestep)
        prev = self._prev_host()
        if value is not None:
            if not 0 <= value < prev.shape[0]:
                raise ValueError(f"timestep must lie in [0, {prev.shape[0]}), got {value}")
            return int(prev[value])
        if not isinstance(timestep, torch.Tensor):
            raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")
        table = self._cached("prev", timestep.device, lambda: torch.from_numpy(prev.copy()))
        return table[timestep.long()]


# ----------------------------------------------------------------------------- DDPM
# Rows of DDPMScheduler's variance table: the values diffusers' _get_variance returns per variance_type, and log β̃_t.
_VARIANCE_ROWS = {"fixed_small": 0, "fixed_small_log": 1, "fixed_large": 2, "fixed_large_log": 3, "log_small": 4}

class DDPMScheduler(_Scheduler):
    """Ancestral sampling of DDPM (Ho et al. 2020), with the constructor, config and methods of diffusers'
    ``DDPMScheduler``.

    Arguments (diffusers' names and defaults): ``num_train_timesteps`` T; ``beta_start``, ``beta_end``;
    ``beta_schedule`` linear | scaled_linear | squaredcos_cap_v2 | sigmoid | laplace; ``trained_betas`` (overrides
    the schedule); ``variance_type``: σ_t² = β̃_t (fixed_small, fixed_small_log), β_t (fixed_large,
    fixed_large_log), or from the model's extra output channels (learned: the variance itself; learned_range: the
    interpolation fraction v ∈ [−1, 1] between log β̃_t and log β_t, Nichol & Dhariwal 2021 eq. 15);
    ``clip_sample`` / ``clip_sample_range``: clamp x̂₀; ``prediction_type`` epsilon | sample | v_prediction;
    ``thresholding`` with ``dynamic_thresholding_ratio`` and ``sample_max_value`` (Saharia et al. 2022);
    ``timestep_spacing`` leading | trailing | linspace and ``steps_offset`` for ``set_timesteps``;
    ``rescale_betas_zero_snr`` (Lin et al. 2024).

    ``fixed_large_log`` differs from diffusers on purpose: σ_t = exp(½·log β_t) = √β_t, the same as
    ``fixed_large``. diffusers takes the square root of log β_t itself, which is negative, so every noisy
    step returns NaN there.
    """

    _compatibles = ["DDIMScheduler"]

    @_register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type {variance_type!r} must be one of {', '.join(VARIANCE_TYPES)}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} must be one of {', '.join(PREDICTION_TYPES)}")
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr)
        self.one = torch.tensor(1.0)
        self.custom_timesteps = False
        self.variance_type = variance_type

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> None:
        """Choose the inference timesteps: ``num_inference_steps`` spaced per ``timestep_spacing``, or your own
        strictly descending ``timesteps``. ``device``: where ``self.timesteps`` goes."""
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

    def _step_table(self, device) -> torch.Tensor:
        """[7, T] float32 on ``device``: the rows of :data:`DDPM_TABLE_ROWS` for the (t, previous t) pairs of the
        current schedule, computed in float64; NaN columns for timesteps outside the schedule."""
        def build():
            ac = self.alphas_cumprod.double()
            prev = torch.from_numpy(self._prev_host())
            ac_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.ones_like(ac))
            beta_prod, beta_prod_prev = 1 - ac, 1 - ac_prev
            alpha_t = ac / ac_prev  # α_t of the (possibly respaced) step t → t'
            beta_t = 1 - alpha_t
            posterior_variance = (beta_prod_prev / beta_prod * beta_t).clamp(min=1e-20)  # β̃_t, eq. 7
            if self.variance_type in ("fixed_large", "fixed_large_log"):
                sigma = beta_t.sqrt()  # fixed_large_log: exp(½·log β_t), the same number
            elif self.variance_type in ("fixed_small", "fixed_small_log"):
                sigma = posterior_variance.sqrt()
            else:  # learned variances add their own noise term
                sigma = torch.zeros_like(ac)
            table = torch.stack([
                (1 / ac).sqrt(), (1 / ac - 1).sqrt(), ac.sqrt(), (1 - ac).sqrt(),
                ac_prev.sqrt() * beta_t / beta_prod, alpha_t.sqrt() * beta_prod_prev / beta_prod, sigma,
            ])
            on = self._on_schedule()
            if on is not None:
                table[:, torch.from_numpy(~on)] = float("nan")
            return table.float()
        return self._cached("ddpm_step", torch.device(device), build)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """x_t → x_{t'} (t' the previous timestep of the schedule): x̂₀ from the model output, clipped or
        thresholded, the posterior mean μ̃_t(x_t, x̂₀) and, where t > 0, σ_t·z with z drawn as diffusers draws it.

        ``timestep``: an int, a 0-d tensor or an integer tensor [B] of per-sample timesteps (on any device).
        Returns a :class:`DDPMSchedulerOutput` (prev_sample, pred_original_sample), or a tuple with
        ``return_dict=False``.
        """
        self._check_step_inputs(model_output, sample)
        predicted_variance = None
        if self.variance_type in ("learned", "learned_range"):
            if model_output.dim() < 2 or model_output.shape[1] != 2 * sample.shape[1]:
                raise ValueError(f"variance_type={self.variance_type!r} needs a model output with twice the "
                                 f"sample's channels (prediction and variance), got {list(model_output.shape)} for "
                                 f"a sample of {list(sample.shape)}")
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output must have the sample's shape {list(sample.shape)}, "
                             f"got {list(model_output.shape)}")
        prediction_type = self._check_prediction_type()
        t = self._timestep_tensor(timestep, sample, check_schedule=True)
        table = self._step_table(sample.device)
        clip_range, threshold = self._x0_limits()
        host_t = _as_python_int(timestep)
        noise = None
        if host_t is None or host_t > 0:  # a tensor timestep is never read: its noise is masked where t = 0
            noise = _randn(model_output.shape, generator, model_output.device, model_output.dtype)
        if predicted_variance is None:
            prev, x0 = _ddpm_update(model_output, sample, t, table, prediction_type, clip_range, threshold, noise)
        else:
            prev, x0 = self._learned_variance_step(model_output, predicted_variance, sample, t, table,
                                                   prediction_type, clip_range, threshold, noise)
        if not return_dict:
            return prev, x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _learned_variance_step(self, model_output, predicted_variance, sample, t, table, prediction_type,
                               clip_range, threshold, noise):
        """The step with a variance from the model (plain PyTorch): learned: σ² = the output itself;
        learned_range: log σ² = f·log β_t + (1 − f)·log β̃_t, f = (v + 1)/2 (Nichol & Dhariwal 2021, eq. 15)."""
        x0, prev, c = _ddpm_x0_and_mean(model_output, sample, t, table, prediction_type, clip_range, threshold)
        if noise is not None:
            cd = prev.dtype
            v = predicted_variance.to(cd)
            if self.variance_type == "learned":
                sigma = v.sqrt()
            else:
                log_small, log_large = self._log_variances(sample.device)
                log_small = _per_sample(log_small[t].to(cd), sample)
                log_large = _per_sample(log_large[t].to(cd), sample)
                frac = (v + 1) / 2
                sigma = torch.exp(0.5 * (frac * log_large + (1 - frac) * log_small))
            nonzero = _per_sample((t > 0).to(cd), sample)
            prev = prev + nonzero * sigma * noise.to(cd)
        return prev.to(sample.dtype), x0.to(sample.dtype)

    def _log_variances(self, device):
        """(log β̃_t clamped at 1e-20, log β_t) [T] float32 for the current schedule, computed in float64."""
        table = self._variances(device)
        return table[_VARIANCE_ROWS["log_small"]], table[_VARIANCE_ROWS["fixed_large_log"]]

    def _variances(self, device) -> torch.Tensor:
        """[5, T] float32, rows as :data:`_VARIANCE_ROWS`, for the (t, previous t) pairs of the current schedule,
        computed in float64."""
        def build():
            ac = self.alphas_cumprod.double()
            prev = torch.from_numpy(self._prev_host())
            ac_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.ones_like(ac))
            beta_t = 1 - ac / ac_prev
            small = ((1 - ac_prev) / (1 - ac) * beta_t).clamp(min=1e-20)  # β̃_t (eq. 7), clamped as diffusers
            return torch.stack([small, small.sqrt(), beta_t, beta_t.log(), small.log()]).float()
        return self._cached("ddpm_variances", torch.device(device), build)

    def _get_variance(self, t, predicted_variance: torch.Tensor | None = None, variance_type: str | None = None):
        """The variance term of the step at timestep ``t`` (an int, or an integer tensor looked up on its device),
        in the form diffusers' ``_get_variance`` returns for ``variance_type`` (default: the config's):
        fixed_small β̃_t; fixed_small_log √β̃_t; fixed_large β_t; fixed_large_log log β_t; learned the
        ``predicted_variance`` itself; learned_range the log-variance f·log β_t + (1 − f)·log β̃_t with
        f = (predicted_variance + 1)/2. The previous timestep is that of the current schedule; float64 math,
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
                raise ValueError(f"timestep {value} is not in the current schedule {self._timesteps_host.tolist()}")
            index, device = torch.tensor(value), torch.device("cpu")
        elif isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
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
    """DDIM sampling (Song et al. 2021), with the constructor, config and methods of diffusers' ``DDIMScheduler``.

    Arguments as diffusers': ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` (also
    sigmoid and laplace here), ``trained_betas``, ``clip_sample``, ``set_alpha_to_one`` (ᾱ after the last step is
    1, else ᾱ_0), ``steps_offset``, ``prediction_type``, ``thresholding``, ``dynamic_thresholding_ratio``,
    ``clip_sample_range``, ``sample_max_value``, ``timestep_spacing``, ``rescale_betas_zero_snr``.

    The step goes from t to the *next timestep of the schedule*. diffusers instead steps to
    t − num_train_timesteps // num_inference_steps, which is the same for 'leading' spacing (and for 'trailing'
    when the step count divides num_train_timesteps) but lands between the schedule's timesteps otherwise
    ('linspace'; 'trailing' with e.g. 3 steps of 1000), so that the next model call sees a sample of another
    noise level. A timestep outside the schedule steps by that stride, as in diffusers.
    """

    _compatibles = ["DDPMScheduler"]

    @_register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} must be one of {', '.join(PREDICTION_TYPES)}")
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._final_alpha_host = float(self.final_alpha_cumprod)  # a CPU tensor here: no device sync

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> None:
        """Choose ``num_inference_steps`` timesteps spaced per ``timestep_spacing`` (or, beyond diffusers, your own
        strictly descending ``timesteps``). ``device``: where ``self.timesteps`` goes."""
        custom = self._set_timesteps(num_inference_steps, device, timesteps)
        if custom is not None:
            self.num_inference_steps = int(custom.size)

    @_Scheduler.timesteps.setter
    def timesteps(self, value) -> None:
        _Scheduler.timesteps.fset(self, value)

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

    def _x0_table(self, device) -> torch.Tensor:
        """[4, T] float32, built in float64: √(1/ᾱ_t), √(1/ᾱ_t − 1), √ᾱ_t, √(1 − ᾱ_t) (the fused DDIM op's x̂_0 rows)."""
        def build():
            ac = self.alphas_cumprod.double()
            return torch.stack([(1 / ac).sqrt(), (1 / ac - 1).sqrt(), ac.sqrt(), (1 - ac).sqrt()]).float()
        return self._cached("x0_table", torch.device(device), build)

    def _device_tables(self, device):
        device = torch.device(device)
        prev = self._cached("prev", device, lambda: torch.from_numpy(self._prev_host().copy()))
        ac = self._cached("alphas_cumprod", device, lambda: self.alphas_cumprod.clone())
        final = self._cached("final_alpha_cumprod", device,
                             lambda: torch.as_tensor(self.final_alpha_cumprod, dtype=torch.float32).clone())
        return prev, ac, final

    def _get_variance(self, timestep, prev_timestep) -> torch.Tensor:
        """σ_t²/η² of the step ``timestep`` → ``prev_timestep`` (Song et al. 2021, eq. 16):
        (1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev), with ᾱ_prev = ``final_alpha_cumprod`` for a negative
        ``prev_timestep``, as diffusers' ``_get_variance``. Ints or integer tensors (looked up on their device);
        float64 math, float32 result."""
        num_train = self.alphas_cumprod.shape[0]
        device = next((v.device for v in (timestep, prev_timestep) if isinstance(v, torch.Tensor)), None)
        device = torch.device("cpu") if device is None else device
        index = []
        for name, value in (("timestep", timestep), ("prev_timestep", prev_timestep)):
            host = _as_python_int(value)
            if host is not None and (host >= num_train or (name == "timestep" and host < 0)):
                raise ValueError(f"{name} must lie in [0, {num_train}), got {host} (a negative prev_timestep: "
                                 f"the end of the schedule)")
            if host is None and (not isinstance(value, torch.Tensor) or value.is_floating_point()
                                 or value.is_complex() or value.dtype == torch.bool):
                raise TypeError(f"{name} must be an int or an integer tensor, got {value!r}")
            index.append(torch.as_tensor(value, device=device).long())
        t, t_prev = index
        ac = self._cached("alphas_cumprod_float64", device, lambda: self.alphas_cumprod.double())
        ac_t = ac[t]
        ac_prev = torch.where(t_prev >= 0, ac[t_prev.clamp(min=0)], torch.tensor(self._final_alpha_host,
                                                                                  dtype=ac.dtype, device=device))
        return ((1 - ac_prev) / (1 - ac_t) * (1 - ac_t / ac_prev)).float()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True):
        """x_t → x_{t_prev} by DDIM (Song et al. 2021, eq. 12) with noise scale ``eta`` (0: deterministic, 1: DDPM's
        σ). ``use_clipped_model_output`` re-derives ε̂ from the clipped x̂₀; ``variance_noise`` replaces the drawn
        noise (not together with ``generator``). ``timestep``: an int, a 0-d tensor or an integer tensor [B];
        ``eta`` a Python number. Returns a :class:`DDIMSchedulerOutput` or, with ``return_dict=False``, a tuple.
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
        prev_table, ac, final = self._device_tables(sample.device)
        t_prev = prev_table[t]
        clip_range, threshold = self._x0_limits()
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = _randn(model_output.shape, generator, model_output.device, model_output.dtype)
            elif variance_noise.shape != sample.shape:
                raise ValueError(f"variance_noise must have the sample's shape {list(sample.shape)}, "
                                 f"got {list(variance_noise.shape)}")
            noise = variance_noise
        # The plain-PyTorch update (float32, as diffusers): the fused DDIM op computes σ in float64 and its C++
        # CPU kernel differs from diffusers' float32 rounding by more than the 1e-5 these tests hold it to.
        prev, x0 = _ddim_update(model_output, sample, t, t_prev, ac, final, prediction_type, eta, clip_range,
                                threshold, bool(use_clipped_model_output), noise)
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
