"""Reverse steps: the ancestral DDPM update (``p_sample_step``) and the DDIM update (``ddim_step``).

One op each, ``fastddpm::p_sample_step`` and ``fastddpm::ddim_step`` (schemas in csrc/fastddpm.cpp): the CPU
kernel is C++ (csrc/cpu/reverse_step.cpp), the CUDA kernel the Triton implementation below
(kernels/reverse_step.py), registered for "cuda"; one fake each. ``backend='triton'`` calls the Triton
implementation directly (CUDA tensors in eager mode, or CPU tensors through the interpreter), 'reference' the
reference math on the table's rows. Both read model output and x_t once and write x_{t−1} (+ x̂_0 and the
noise drawn, on request). Sampling is not differentiated: no autograd is registered.
"""

from __future__ import annotations

import torch

from fastddpm import _extension, contracts, reference
from fastddpm.ops import (
    as_layout_of,
    check_data,
    check_index,
    check_positive_values,
    check_seed,
    check_table,
    check_timesteps,
    check_triton_device,
    choose_backend,
    dense,
    launcher,
    new_seed,
    register_fake,
    require,
    runs_eagerly,
)
from fastddpm.ops.q_sample import philox_noise_like

_OBJECTIVE_CODES = (contracts.PRED_NOISE, contracts.PRED_X0, contracts.PRED_V)


def _prepare(name, model_output, x_t, t, table, noise, seed, objective, clip, threshold_scale):
    check_data(name, "x_t", x_t)
    check_data(name, "model_output", model_output, x_t)
    check_index(name, "t", t, x_t)
    rows = contracts.REVERSE_TABLE_ROWS if name == "p_sample_step" else contracts.DDIM_TABLE_ROWS
    check_table(name, "table", table, x_t, rows=rows)
    require(objective in _OBJECTIVE_CODES,
            lambda: f"{name}: objective must be 0 (ε), 1 (x_0) or 2 (v), got {objective}")
    require(clip is None or clip > 0, lambda: f"{name}: clip must be positive, got {clip}")
    if noise is not None:
        check_data(name, "noise", noise, x_t)
    if seed is not None:
        check_seed(name, seed, x_t)
    if threshold_scale is not None:
        require(threshold_scale.shape == (x_t.shape[0],) and threshold_scale.is_floating_point(),
                lambda: f"{name}: threshold_scale must be a float tensor of shape [{x_t.shape[0]}]")
        require(threshold_scale.device == x_t.device,
                lambda: f"{name}: threshold_scale is on {threshold_scale.device}, the data on {x_t.device}")
        check_positive_values(name, "threshold_scale", threshold_scale)  # x̂_0 is divided by it
    x = dense(x_t)
    return x, as_layout_of(model_output, x), as_layout_of(noise, x)


def _outputs(x, write_x0, write_noise):
    """x_prev, and x̂_0 and z or empty tensors (distinct ones: outputs of an op must not alias)."""
    return (torch.empty_like(x), torch.empty_like(x) if write_x0 else x.new_empty(0),
            torch.empty_like(x) if write_noise else x.new_empty(0))


# ----------------------------------------------------------------------------- Triton (the CUDA kernel)
def _p_sample_step_triton(model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
                          noise: torch.Tensor | None, seed: torch.Tensor | None, offset: int, objective: int,
                          clip: float | None, threshold_scale: torch.Tensor | None, write_x0: bool,
                          write_noise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastddpm.kernels import reverse_step as kernels

    x, out, eps = _prepare("p_sample_step", model_output, x_t, t, table, noise, seed, objective, clip,
                           threshold_scale)
    require((noise is None) != (seed is None), lambda: "p_sample_step: give exactly one of noise and seed")
    check_triton_device("p_sample_step", x)
    x_prev, x0, noise_out = _outputs(x, write_x0, write_noise and noise is None)
    kernels.launch_p_sample(
        out, x, t.contiguous(), table, x_prev, objective=objective, noise=eps, seed=seed, offset=offset,
        clip=clip, threshold_scale=None if threshold_scale is None else threshold_scale.contiguous(),
        x0_out=x0 if write_x0 else None, noise_out=noise_out if noise_out.numel() else None, wrap=launcher(x))
    return x_prev, x0, noise_out


def _ddim_step_triton(model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                      table: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None,
                      seed: torch.Tensor | None, offset: int, objective: int, eta: float,
                      final_alpha_cumprod: float, clip: float | None, threshold_scale: torch.Tensor | None,
                      rederive_noise: bool, write_x0: bool,
                      write_noise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastddpm.kernels import reverse_step as kernels

    x, out, eps = _prepare("ddim_step", model_output, x_t, t, table, noise, seed, objective, clip,
                           threshold_scale)
    _check_ddim(x, t_prev, alphas_cumprod, table, noise, seed, eta, final_alpha_cumprod)
    check_triton_device("ddim_step", x)
    x_prev, x0, noise_out = _outputs(x, write_x0, write_noise and noise is None and eta != 0)
    kernels.launch_ddim(
        out, x, t.contiguous(), t_prev.contiguous(), table, alphas_cumprod, x_prev, objective=objective,
        eta=eta, final_alpha_cumprod=final_alpha_cumprod,
        rederive_noise=rederive_noise and (clip is not None or threshold_scale is not None),
        noise=eps if eta != 0 else None, seed=seed, offset=offset, clip=clip,
        threshold_scale=None if threshold_scale is None else threshold_scale.contiguous(),
        x0_out=x0 if write_x0 else None, noise_out=noise_out if noise_out.numel() else None, wrap=launcher(x))
    return x_prev, x0, noise_out


def _check_ddim(x, t_prev, alphas_cumprod, table, noise, seed, eta, final_alpha_cumprod):
    check_index("ddim_step", "t_prev", t_prev, x)
    check_table("ddim_step", "alphas_cumprod", alphas_cumprod, x)
    require(alphas_cumprod.shape[0] == table.shape[1],
            lambda: "ddim_step: alphas_cumprod and table must cover the same timesteps")
    require(eta >= 0, lambda: f"ddim_step: eta must be >= 0, got {eta}")
    require(0 <= final_alpha_cumprod <= 1,
            lambda: f"ddim_step: final_alpha_cumprod (ᾱ after the last step) must lie in [0, 1], got "
                    f"{final_alpha_cumprod}")
    require(eta == 0 or (noise is None) != (seed is None),
            lambda: "ddim_step: with eta > 0 give exactly one of noise and seed")


# ----------------------------------------------------------------------------- the reference math
class _Schedule:
    """The tables reference.p_sample_step / ddim_step read, rebuilt from the kernels' stacked table (rows:
    contracts.REVERSE_TABLE)."""

    def __init__(self, table, alphas_cumprod=None):
        rows = table.double()
        self.sqrt_recip_alphas_cumprod = rows[contracts.ROW_SQRT_RECIP_AC]
        self.sqrt_recipm1_alphas_cumprod = rows[contracts.ROW_SQRT_RECIPM1_AC]
        self.sqrt_alphas_cumprod = rows[contracts.ROW_SQRT_AC]
        self.sqrt_one_minus_alphas_cumprod = rows[contracts.ROW_SQRT_1M_AC]
        if table.shape[0] >= contracts.REVERSE_TABLE_ROWS:
            self.posterior_mean_coef1 = rows[contracts.ROW_POSTERIOR_COEF_X0]
            self.posterior_mean_coef2 = rows[contracts.ROW_POSTERIOR_COEF_XT]
            self.posterior_variance = rows[contracts.ROW_SIGMA].square()
            self.posterior_log_variance_clipped = self.posterior_variance  # read by q_posterior, unused here
        if alphas_cumprod is not None:
            self.alphas_cumprod = alphas_cumprod


def _step_noise(x, eps, seed, offset):
    return eps if eps is not None else philox_noise_like(x, seed, offset)


def _finish(x, x_prev, x0, z, write_x0, write_noise):
    out = _outputs(x, write_x0, write_noise)
    for dst, src in zip(out, (x_prev, x0, z)):
        if dst.numel():
            dst.copy_(src)
    return out


def _p_sample_step_reference(model_output, x_t, t, table, noise, seed, offset, objective, clip,
                             threshold_scale, write_x0, write_noise):
    x, out, eps = _prepare("p_sample_step", model_output, x_t, t, table, noise, seed, objective, clip,
                           threshold_scale)
    require((noise is None) != (seed is None), lambda: "p_sample_step: give exactly one of noise and seed")
    z = _step_noise(x, eps, seed, offset)
    x_prev, x0 = reference.p_sample_step(_Schedule(table), out, x, t, z, contracts.OBJECTIVES[objective],
                                         "fixed_small", clip, threshold_scale)
    return _finish(x, x_prev, x0, z, write_x0, write_noise and noise is None)


def _ddim_step_reference(model_output, x_t, t, t_prev, table, alphas_cumprod, noise, seed, offset, objective,
                         eta, final_alpha_cumprod, clip, threshold_scale, rederive_noise, write_x0,
                         write_noise):
    x, out, eps = _prepare("ddim_step", model_output, x_t, t, table, noise, seed, objective, clip,
                           threshold_scale)
    _check_ddim(x, t_prev, alphas_cumprod, table, noise, seed, eta, final_alpha_cumprod)
    stochastic = eta != 0
    z = _step_noise(x, eps, seed, offset) if stochastic else torch.zeros_like(x, dtype=torch.float32)
    x_prev, x0 = reference.ddim_step(_Schedule(table, alphas_cumprod), out, x, t, t_prev, z,
                                     contracts.OBJECTIVES[objective], eta, clip, threshold_scale,
                                     rederive_noise, final_alpha_cumprod)
    return _finish(x, x_prev, x0, z, write_x0, write_noise and noise is None and stochastic)


# ----------------------------------------------------------------------------- the ops' fakes, CUDA kernels
def _fake_p_sample_step(model_output, x_t, t, table, noise, seed, offset, objective, clip, threshold_scale,
                        write_x0, write_noise):
    x, _, _ = _prepare("p_sample_step", model_output, x_t, t, table, noise, seed, objective, clip,
                       threshold_scale)
    return _outputs(x, write_x0, write_noise and noise is None)


def _fake_ddim_step(model_output, x_t, t, t_prev, table, alphas_cumprod, noise, seed, offset, objective, eta,
                    final_alpha_cumprod, clip, threshold_scale, rederive_noise, write_x0, write_noise):
    x, _, _ = _prepare("ddim_step", model_output, x_t, t, table, noise, seed, objective, clip,
                       threshold_scale)
    _check_ddim(x, t_prev, alphas_cumprod, table, noise, seed, eta, final_alpha_cumprod)
    return _outputs(x, write_x0, write_noise and noise is None and eta != 0)


def _register() -> None:
    """The ops exist when the C++ extension is built (their schemas and CPU kernels are C++)."""
    if _extension.load() is None:
        return
    for op, triton_fn, fake in [("p_sample_step", _p_sample_step_triton, _fake_p_sample_step),
                                ("ddim_step", _ddim_step_triton, _fake_ddim_step)]:
        register_fake(f"fastddpm::{op}", fake)
        torch.library.register_kernel(f"fastddpm::{op}", "cuda", triton_fn)


_register()


# ----------------------------------------------------------------------------- the Python entry points
def _threshold_scale(sched_like, model_output, x_t, t, objective, threshold):
    """Per-sample s of dynamic thresholding, from x̂_0 computed on the side (a quantile needs the whole
    sample)."""
    if threshold is None:
        return None
    _, x0 = reference.model_predictions(sched_like, model_output, x_t, t, objective)
    return reference.dynamic_threshold(x0, *threshold)[1].float()


def _clip_value(clip):
    if clip is None or clip is False:
        return None
    return 1.0 if clip is True else float(clip)


def p_sample_step(schedule, model_output, x_t, t, noise=None, *, objective="pred_noise",
                  variance="fixed_small", clip_denoised=True, threshold=None, seed=None, offset=0,
                  generator=None, table=None, write_x0=True, write_noise=False, backend="auto", check=True):
    """One ancestral step x_t → x_{t−1} on the chosen backend; returns (x_{t−1}, x̂_0, z).

    ``noise`` given, or z drawn in-kernel from (``seed``, ``offset``) (a fresh seed from torch's RNG when both
    are None). ``clip_denoised``: True (±1), a number (±c) or False; ``threshold`` = (ratio, max_value) for
    dynamic thresholding instead. ``table`` overrides ``schedule.reverse_table(variance)`` (respaced
    schedules). x̂_0 and z are empty tensors unless ``write_x0`` / ``write_noise``.
    """
    code = contracts.objective_code(objective)
    if table is None:
        table = schedule.reverse_table(variance)
    else:
        schedule = _Schedule(table)  # the x̂_0 rows, for the threshold's quantile
    if check:
        check_timesteps("p_sample_step", t, table.shape[1])
    if noise is None and seed is None:
        seed = new_seed(x_t.device, generator)
    scale = _threshold_scale(schedule, model_output, x_t, t, objective, threshold)
    args = (model_output, x_t, t, table, noise, seed, offset, code, _clip_value(clip_denoised), scale,
            write_x0, write_noise)
    backend = choose_backend("p_sample_step", x_t.device, backend)
    if backend == "triton":
        # the op (its CUDA kernel is this implementation) where a trace, a dispatch mode or a tensor subclass
        # must see it; else the implementation directly (and always on CPU tensors, in the interpreter)
        if x_t.is_cuda and not runs_eagerly(model_output, x_t, noise) and _extension.load() is not None:
            return torch.ops.fastddpm.p_sample_step.default(*args)
        return _p_sample_step_triton(*args)
    if backend == "cpp":
        # (a plain call, not fastddpm.ops.call_op: no Python autograd kernel is registered for the steps,
        # and the dispatcher's C++ fallback costs less than scanning 12 arguments for requires_grad)
        return torch.ops.fastddpm.p_sample_step.default(*args)
    return _p_sample_step_reference(*args)


def ddim_step(schedule, model_output, x_t, t, t_prev, noise=None, *, objective="pred_noise", eta=0.0,
              clip_denoised=True, threshold=None, rederive_noise=True, final_alpha_cumprod=1.0, seed=None,
              offset=0, generator=None, table=None, alphas_cumprod=None, write_x0=True, write_noise=False,
              backend="auto", check=True):
    """One DDIM step x_t → x_{t_prev} on the chosen backend; returns (x_prev, x̂_0, z). See p_sample_step;
    ``table`` ([≥4, T], rows √(1/ᾱ), √(1/ᾱ − 1), √ᾱ, √(1 − ᾱ)) and ``alphas_cumprod`` replace the
    schedule's."""
    code = contracts.objective_code(objective)
    if not 0 <= final_alpha_cumprod <= 1:
        raise ValueError(f"final_alpha_cumprod (ᾱ after the last step) must lie in [0, 1], "
                         f"got {final_alpha_cumprod}")
    if table is None:
        table, alphas_cumprod = schedule.reverse_table("fixed_small"), schedule.alphas_cumprod
    else:
        schedule = _Schedule(table, alphas_cumprod)
    if check:
        check_timesteps("ddim_step", t, table.shape[1])
        check_timesteps("ddim_step", t_prev, table.shape[1], allow_negative=True)
    if noise is None and seed is None and eta != 0:
        seed = new_seed(x_t.device, generator)
    scale = _threshold_scale(schedule, model_output, x_t, t, objective, threshold)
    args = (model_output, x_t, t, t_prev, table, alphas_cumprod, noise, seed, offset, code, float(eta),
            float(final_alpha_cumprod), _clip_value(clip_denoised), scale, rederive_noise, write_x0,
            write_noise)
    backend = choose_backend("ddim_step", x_t.device, backend)
    if backend == "triton":  # (as in p_sample_step)
        if x_t.is_cuda and not runs_eagerly(model_output, x_t, noise) and _extension.load() is not None:
            return torch.ops.fastddpm.ddim_step.default(*args)
        return _ddim_step_triton(*args)
    if backend == "cpp":
        return torch.ops.fastddpm.ddim_step.default(*args)  # (plain: see p_sample_step)
    return _ddim_step_reference(*args)
