"""``Diffusion.from_pretrained`` for folders written by diffusers: a pipeline folder (``model_index.json``,
``unet/``, ``scheduler/``; the released DDPM models also keep the U-Net's and the scheduler's files at the top
level) or a bare ``UNet2DModel`` folder.

The U-Net converts to :class:`fastddpm.UNet` (:mod:`fastddpm.nn.diffusers_unet`); the ``Diffusion``
arguments come from ``scheduler_config.json`` where there is one (β schedule, T, variance type, prediction
type, clipping), else from the defaults of diffusers' ``DDPMScheduler`` (those of the DDPM paper). Neither
needs diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastddpm.nn.diffusers_unet import (
    UNET2D_CLASS,
    UNET2D_CONFIG_NAME,
    from_config_and_state,
    read_unet2d_folder,
)

PIPELINE_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"

# diffusers' names → Diffusion's.
_OBJECTIVES = {"epsilon": "pred_noise", "sample": "pred_x0", "v_prediction": "pred_v"}
_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
              "fixed_large_log": "fixed_large"}
_NAMED_SCHEDULES = {"linear": "linear", "scaled_linear": "quad"}  # the same formulas, built in float64 here


def _class_name(config_path: Path):
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # (JSONDecodeError and UnicodeDecodeError: not a diffusers config)
        return None
    return config.get("_class_name") if isinstance(config, dict) else None


def find(directory: Path) -> tuple[Path, Path | None] | None:
    """(the U-Net's folder, the scheduler config or None) when ``directory`` is a diffusers folder, else None.
    A pipeline folder without a ``UNet2DModel`` raises ``ValueError``."""
    directory = Path(directory)
    unet_dir = directory / "unet"
    if (unet_dir / UNET2D_CONFIG_NAME).is_file():
        name = _class_name(unet_dir / UNET2D_CONFIG_NAME)
        if name != UNET2D_CLASS:
            raise ValueError(f"{unet_dir}: the pipeline's U-Net is a {name!r}; fastddpm loads a "
                             f"{UNET2D_CLASS} (the DDPM pipelines')")
        scheduler = directory / "scheduler" / SCHEDULER_CONFIG
        return unet_dir, scheduler if scheduler.is_file() else None
    if _class_name(directory / UNET2D_CONFIG_NAME) == UNET2D_CLASS:
        scheduler = directory / SCHEDULER_CONFIG
        return directory, scheduler if scheduler.is_file() else None
    if (directory / PIPELINE_INDEX).is_file():
        raise ValueError(f"{directory} is a diffusers pipeline folder without a U-Net "
                         f"(no unet/{UNET2D_CONFIG_NAME})")
    return None


def diffusion_kwargs(scheduler_config: dict | None) -> dict:
    """``Diffusion`` arguments from a diffusers scheduler config (None: diffusers' DDPMScheduler defaults); a
    ``ValueError`` names a setting ``Diffusion`` does not have."""
    from fastddpm.schedulers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler_config or {})
    c = scheduler.config
    variance = _VARIANCES.get(c.variance_type)
    if variance is None:
        raise ValueError(f"scheduler variance_type={c.variance_type!r}: Diffusion samples with a fixed "
                         f"variance ({', '.join(_VARIANCES)}); use fastddpm.DDPMScheduler for learned "
                         f"variances")
    if c.thresholding:
        raise ValueError("scheduler thresholding=True: Diffusion has no dynamic thresholding; use "
                         "fastddpm.DDPMScheduler")
    if c.clip_sample and c.clip_sample_range != 1.0:
        raise ValueError(f"scheduler clip_sample_range={c.clip_sample_range!r}: "
                         f"Diffusion clips x̂₀ to [-1, 1]")
    name = _NAMED_SCHEDULES.get(c.beta_schedule)
    if name is not None and c.trained_betas is None and not c.rescale_betas_zero_snr:
        schedule = dict(beta_schedule=name,
                        schedule_fn_kwargs=dict(beta_start=c.beta_start, beta_end=c.beta_end))
    else:  # the scheduler's own float32 betas, exactly as diffusers builds them
        schedule = dict(beta_schedule=scheduler.betas.tolist())
    return dict(timesteps=c.num_train_timesteps, objective=_OBJECTIVES[c.prediction_type], variance=variance,
                clip_denoised=bool(c.clip_sample), **schedule)


def load(cls, found: tuple[Path, Path | None], model=None, device=None, **overrides):
    """``cls`` (Diffusion) around the converted U-Net of a folder :func:`find` recognised, on ``device`` (CPU
    by default); ``overrides`` replace the arguments read from the scheduler config."""
    unet_dir, scheduler_path = found
    if model is not None:
        raise ValueError(f"{unet_dir} holds a diffusers {UNET2D_CLASS}, which loads into fastddpm.UNet: "
                         f"leave out model=")
    scheduler_config = None
    if scheduler_path is not None:
        try:
            scheduler_config = json.loads(scheduler_path.read_text(encoding="utf-8"))
        except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError)
            raise ValueError(f"{scheduler_path} is not valid UTF-8 JSON: {e}") from None
        if not isinstance(scheduler_config, dict):
            raise ValueError(f"{scheduler_path} does not hold a JSON object")
    try:
        kwargs = diffusion_kwargs(scheduler_config)
    except (ValueError, NotImplementedError) as e:
        raise ValueError(f"{scheduler_path}: {e}") from e
    unet = from_config_and_state(*read_unet2d_folder(unet_dir)).float()
    kwargs = {"image_size": unet.image_size, **kwargs, **overrides}
    return cls(unet, **kwargs).to("cpu" if device is None else device)
