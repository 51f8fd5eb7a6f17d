"""diffusion_loss: L_simple (DDPM eq. 14) with the target formed in-kernel, forward and backward.

Op ``fastddpm::diffusion_loss`` (C++ schema in csrc/fastddpm.cpp; CPU impl csrc/cpu/diffusion_loss.cpp, or the
reference math here in a build without it; CUDA impl = the Triton kernels) and its Triton twin
``fastddpm::diffusion_loss_triton`` (kernels/loss.py; CUDA, or CPU through the interpreter). Both take ε
given (``noise``) or regenerate it from the (``seed``, ``offset``) q_sample_philox drew it with (``noised`` below
decides which, per backend). The backward is one sweep (``diffusion_loss_backward``) that recomputes the target;
on the CPU, a loss whose gradient goes to the prediction alone runs the training pair instead
(``diffusion_loss_train``: the forward writes the gradient in the same pass, the backward scales or returns it).
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from fastddpm import _extension, reference
from fastddpm.ops import (as_layout_of, call_op, check_data, check_index, check_seed, check_table, check_timesteps,
                          check_triton_device, choose_backend, dense, launcher, new_seed, register_fake, require,
                          runs_eagerly)
from fastddpm.ops.q_sample import _Tables, philox_noise_like, q_sample

NAME = "diffusion_loss"
OBJECTIVES = {"pred_noise": 0, "pred_x0": 1, "pred_v": 2}
REDUCTIONS = {"none": 0, "mean": 1}


def _prepare(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, objective, reduction, min_snr_gamma):
    """Checks (no host sync) and the tensors in one batch-outer dense layout: (pred, x_start, noise)."""
    check_data(NAME, "model_output", model_output)
    check_index(NAME, "t", t, model_output)
    check_table(NAME, "sqrt_alphas_cumprod", sqrt_ac, model_output)
    check_table(NAME, "sqrt_one_minus_alphas_cumprod", sqrt_1m_ac, model_output)
    require(objective in (0, 1, 2), lambda: f"{NAME}: objective must be 0 (ε), 1 (x_0) or 2 (v), got {objective}")
    require(reduction in (0, 1), lambda: f"{NAME}: reduction must be 0 (none) or 1 (mean), got {reduction}")
    require(model_output.shape[0] > 0, lambda: f"{NAME}: empty batch")
    require(min_snr_gamma is None or min_snr_gamma > 0,
            lambda: f"{NAME}: min_snr_gamma must be > 0 (or None), got {min_snr_gamma}")
    if objective != 0:
        require(x_start is not None, lambda: f"{NAME}: the x_0 and v objectives need x_start")
    if x_start is not None:
        check_data(NAME, "x_start", x_start, model_output)
    if objective != 1:
        require((noise is None) != (seed is None), lambda: f"{NAME}: give exactly one of noise and seed")
    if noise is not None:
        check_data(NAME, "noise", noise, model_output)
    if seed is not None:
        check_seed(NAME, seed, model_output)
    pred = dense(model_output)
    return pred, as_layout_of(x_start, pred), as_layout_of(noise, pred)


def _loss_dtype(pred):
    return torch.float64 if pred.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- Triton
def _diffusion_loss_triton(model_output: torch.Tensor, x_start: torch.Tensor | None, t: torch.Tensor,
                           sqrt_alphas_cumprod: torch.Tensor, sqrt_one_minus_alphas_cumprod: torch.Tensor,
                           noise: torch.Tensor | None, seed: torch.Tensor | None, offset: int, objective: int,
                           min_snr_gamma: float | None, reduction: int) -> torch.Tensor:
    from fastddpm.kernels.loss import chunks, launch_loss

    pred, x0, eps = _prepare(model_output, x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                             noise, seed, objective, reduction, min_snr_gamma)
    check_triton_device(NAME, pred)
    dtype = _loss_dtype(pred)
    partial = torch.empty(pred.shape[0], chunks(pred), dtype=dtype, device=pred.device)
    per_sample = torch.empty(pred.shape[0], dtype=dtype, device=pred.device)
    mean = torch.empty((), dtype=dtype, device=pred.device)
    launch_loss(pred, x0, t.contiguous(), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, partial, per_sample, mean,
                objective=objective, noise=eps, seed=seed, offset=offset, min_snr_gamma=min_snr_gamma,
                wrap=launcher(pred))
    return mean if reduction == 1 else per_sample


def _diffusion_loss_backward_triton(grad: torch.Tensor, model_output: torch.Tensor, x_start: torch.Tensor | None,
                                    t: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
                                    sqrt_one_minus_alphas_cumprod: torch.Tensor, noise: torch.Tensor | None,
                                    seed: torch.Tensor | None, offset: int, objective: int,
                                    min_snr_gamma: float | None, reduction: int) -> torch.Tensor:
    from fastddpm.kernels.loss import launch_loss_backward

    pred, x0, eps = _prepare(model_output, x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                             noise, seed, objective, reduction, min_snr_gamma)
    check_triton_device(NAME, pred)
    grad_pred = torch.empty_like(pred)
    launch_loss_backward(grad.contiguous(), pred, x0, t.contiguous(), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                         grad_pred, objective=objective, reduction=reduction, noise=eps, seed=seed, offset=offset,
                         min_snr_gamma=min_snr_gamma, wrap=launcher(pred))
    return grad_pred


diffusion_loss_triton = triton_op("fastddpm::diffusion_loss_triton", _diffusion_loss_triton, mutates_args=())
diffusion_loss_backward_triton = triton_op("fastddpm::diffusion_loss_backward_triton",
                                           _diffusion_loss_backward_triton, mutates_args=())


class _EagerTritonLoss(torch.autograd.Function):
    """The Triton loss in eager mode with its gradient to model_output alone (x_start and noise need none): the
    same implementations as diffusion_loss_triton's forward and backward, without the dispatcher and
    torch.library's Python autograd layers around each."""

    @staticmethod
    def forward(ctx, model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset, objective, min_snr_gamma,
                reduction):
        ctx.save_for_backward(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed)
        ctx.args = (offset, objective, min_snr_gamma, reduction)
        return _diffusion_loss_triton(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset, objective,
                                      min_snr_gamma, reduction)

    @staticmethod
    def backward(ctx, grad):
        _refuse_double_backward()
        grad_pred = _diffusion_loss_backward_triton(grad, *ctx.saved_tensors, *ctx.args)
        return (grad_pred.to(ctx.saved_tensors[0].dtype),) + (None,) * 10


# ----------------------------------------------------------------------------- CPU (reference math)
_OBJECTIVE_NAMES = {v: k for k, v in OBJECTIVES.items()}


def _reference_noise(pred, noise, seed, offset):
    if noise is not None or seed is None:
        return noise
    return philox_noise_like(pred, seed, offset)


def _diffusion_loss_cpu(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset, objective,
                        min_snr_gamma, reduction):
    pred, x0, eps = _prepare(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, objective, reduction,
                             min_snr_gamma)
    eps = _reference_noise(pred, eps, seed, offset)
    return _reference_loss(pred, x0, t, sqrt_ac, sqrt_1m_ac, eps, objective, min_snr_gamma, reduction)


def _reference_loss(pred, x0, t, sqrt_ac, sqrt_1m_ac, eps, objective, min_snr_gamma, reduction):
    tables = _Tables(sqrt_ac, sqrt_1m_ac)
    tables.snr = sqrt_ac.double().square() / sqrt_1m_ac.double().square()
    x0 = x0 if x0 is not None else pred  # unused by the ε objective
    eps = eps if eps is not None else pred  # unused by the x_0 objective
    out = reference.diffusion_loss(tables, pred, x0, t, eps, _OBJECTIVE_NAMES[objective], min_snr_gamma,
                                   "mean" if reduction == 1 else "none")
    return out.to(_loss_dtype(pred))


def _diffusion_loss_backward_cpu(grad, model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset,
                                 objective, min_snr_gamma, reduction):
    pred, x0, eps = _prepare(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, objective, reduction,
                             min_snr_gamma)
    eps = _reference_noise(pred, eps, seed, offset)
    with torch.enable_grad():
        p = pred.detach().requires_grad_(True)
        loss = _reference_loss(p, x0, t, sqrt_ac, sqrt_1m_ac, eps, objective, min_snr_gamma, reduction)
        (g,) = torch.autograd.grad(loss, p, grad.to(loss.dtype))
    return torch.empty_like(pred).copy_(g)


# ----------------------------------------------------------------------------- fake impls and autograd
def _fake_loss(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset, objective, min_snr_gamma,
               reduction):
    pred, _, _ = _prepare(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, objective, reduction,
                          min_snr_gamma)
    shape = () if reduction == 1 else (pred.shape[0],)
    return pred.new_empty(shape, dtype=_loss_dtype(pred))


def _fake_backward(grad, model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset, objective,
                   min_snr_gamma, reduction):
    pred, _, _ = _prepare(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, objective, reduction,
                          min_snr_gamma)
    return torch.empty_like(pred)


def _setup(ctx, inputs, output):
    model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, *_ = inputs
    ctx.args = inputs[7:]  # offset, objective, min_snr_gamma, reduction
    ctx.save_for_backward(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed)


DOUBLE_BACKWARD_ERROR = ("diffusion_loss: the fused loss has no double backward (a backward with "
                         "create_graph=True); use backend='reference' for higher-order gradients")


def _refuse_double_backward() -> None:
    """Inside a backward, grad mode is on only with create_graph=True: the fused backward is not differentiable,
    and its result would be a constant (silently wrong second derivatives)."""
    torch._check(not torch.is_grad_enabled() or torch.compiler.is_compiling(), lambda: DOUBLE_BACKWARD_ERROR)


def _make_backward(backward_op):
    def backward(ctx, grad):
        _refuse_double_backward()
        model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed = ctx.saved_tensors
        offset, objective, min_snr_gamma, reduction = ctx.args
        grad_pred = backward_op(grad, model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset,
                                objective, min_snr_gamma, reduction)
        # The target depends on ε and x_0: ∂L/∂target = −∂L/∂pred; ε (ε objective) or x_0 (x_0 objective)
        # directly, v = √ᾱ ε − √(1 − ᾱ) x_0 through its coefficients.
        # (−∂L/∂pred is formed only where an input needs it: a full pass over the data.)
        grad_x0 = grad_noise = None
        if ctx.needs_input_grad[1] and objective in (1, 2):
            grad_x0 = -grad_pred if objective == 1 else reference.extract(sqrt_1m_ac, t, grad_pred) * grad_pred
            grad_x0 = grad_x0.to(x_start.dtype)
        if ctx.needs_input_grad[5] and objective in (0, 2):
            grad_noise = -grad_pred if objective == 0 else -reference.extract(sqrt_ac, t, grad_pred) * grad_pred
            grad_noise = grad_noise.to(noise.dtype)
        return (grad_pred.to(model_output.dtype), grad_x0, None, None, None, grad_noise) + (None,) * 5
    return backward


# ----------------------------------------------------------------------------- the CPU training pair
# diffusion_loss_train(...) -> (loss, g): g = ∂loss/∂model_output for an incoming gradient of one, written by
# the same pass that sums the loss. Its autograd is C++ (csrc/autograd.cpp): the backward scales g by the
# incoming gradient, or returns g itself for the usual `loss.backward()` (a mean loss, gradient exactly 1, read
# on the host: free for a CPU tensor). On a CPU this replaces the backward's whole pass over the prediction,
# x_0 and ε by nothing; it holds g (the prediction's size) from forward to backward, as eager autograd of an
# MSE holds its input and target. (C++ rather than register_autograd: the Python layer cost more than the
# backward's own work; benchmarks/RESULTS.md.)
def _fake_loss_train(*args):
    loss = _fake_loss(*args)
    return loss, torch.empty_like(dense(args[0]))


def _use_train_op(model_output, x_start, noise) -> bool:
    """The training pair serves a CPU loss whose gradient flows to the prediction alone, in float32/64."""
    return (torch.is_grad_enabled() and model_output.requires_grad and model_output.device.type == "cpu"
            and model_output.dtype in (torch.float32, torch.float64)
            and not (x_start is not None and x_start.requires_grad)
            and not (noise is not None and noise.requires_grad))


def _register() -> None:
    ops = [("fastddpm::diffusion_loss_triton", torch.ops.fastddpm.diffusion_loss_backward_triton)]
    register_fake("fastddpm::diffusion_loss_backward_triton", _fake_backward)
    if _extension.load() is not None:
        ops.append(("fastddpm::diffusion_loss", torch.ops.fastddpm.diffusion_loss_backward))
        for op, triton_fn, cpu_fn in (("diffusion_loss", _diffusion_loss_triton, _diffusion_loss_cpu),
                                      ("diffusion_loss_backward", _diffusion_loss_backward_triton,
                                       _diffusion_loss_backward_cpu)):
            torch.library.register_kernel(f"fastddpm::{op}", "cuda", triton_fn)
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastddpm::{op}", "CPU"):
                torch.library.register_kernel(f"fastddpm::{op}", "cpu", cpu_fn)
        register_fake("fastddpm::diffusion_loss_backward", _fake_backward)
    for name, backward_op in ops:
        register_fake(name, _fake_loss)
        torch.library.register_autograd(name, _make_backward(backward_op), setup_context=_setup)
    if _extension.cpu_built():
        register_fake("fastddpm::diffusion_loss_train", _fake_loss_train)


_register()


# ----------------------------------------------------------------------------- the Python entry point
def diffusion_loss(schedule, model_output: torch.Tensor, x_start: torch.Tensor | None, t: torch.Tensor,
                   noise: torch.Tensor | None = None, *, seed: torch.Tensor | None = None, offset: int = 0,
                   objective: str = "pred_noise", min_snr_gamma: float | None = None, reduction: str = "mean",
                   backend: str = "auto", check: bool = True) -> torch.Tensor:
    """L_simple for the objective, with ε given (``noise``) or regenerated from (``seed``, ``offset``).

    Returns the mean loss, or per-sample losses [B] with ``reduction='none'``; float32 (float64 for float64
    inputs). Differentiable in model_output (and x_start / noise where the target uses them).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if min_snr_gamma is not None and not min_snr_gamma > 0:
        raise ValueError(f"{NAME}: min_snr_gamma must be > 0 (or None), got {min_snr_gamma}")
    if check:
        check_timesteps(NAME, t, schedule.sqrt_alphas_cumprod.shape[0])
    if objective == "pred_x0":
        noise = seed = None  # the target is x_0 alone
    args = (model_output, x_start, t, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod,
            noise, seed, offset, OBJECTIVES[objective], min_snr_gamma, REDUCTIONS[reduction])
    backend = choose_backend(NAME, model_output.device, backend)
    if backend == "triton":
        if type(model_output) is torch.Tensor and runs_eagerly(x_start, noise):  # (model_output may need grad)
            if torch.is_grad_enabled() and model_output.requires_grad:
                return _EagerTritonLoss.apply(*args)
            return _diffusion_loss_triton(*args)
        return torch.ops.fastddpm.diffusion_loss_triton(*args)
    if backend == "cpp" and _extension.cpu_built():
        if _use_train_op(model_output, x_start, noise):
            return torch.ops.fastddpm.diffusion_loss_train.default(*args)[0]
        return call_op(torch.ops.fastddpm.diffusion_loss.default, *args)
    if seed is not None:
        check_seed(NAME, seed, model_output)
        noise = philox_noise_like(dense(model_output), seed, offset)
    return reference.diffusion_loss(schedule, model_output, x_start if x_start is not None else model_output, t,
                                    noise if noise is not None else model_output, objective, min_snr_gamma,
                                    reduction)


# ----------------------------------------------------------------------------- q_sample → loss: where ε lives
def noised(schedule, x_start: torch.Tensor, t: torch.Tensor, *, backend: str = "auto",
           generator: torch.Generator | None = None, check: bool = True) -> tuple[torch.Tensor, dict]:
    """x_t = q_sample(x_0, t) with ε drawn in-kernel, and how the loss gets that same ε: ``(x_t, noise_kwargs)``,
    to be passed on as ``diffusion_loss(schedule, model(x_t, t), x_start, t, **noise_kwargs)``.

    The one place that decides whether ε is stored or regenerated (Diffusion and the benchmarks call it):
      * ``{"noise": ε}``: q_sample writes ε and the loss forward and backward read it. On the CPU (C++ kernels,
        or the reference) drawing ε (Philox + Box–Muller) costs several times streaming it, so one draw and
        two reads beat three draws.
      * ``{"seed": key}``: the loss regenerates ε from the Philox key q_sample drew it with. The Triton
        kernels (GPUs: bandwidth-bound, where recomputing is cheaper than a round trip through memory), and
        float16/bfloat16 x_0 on any backend: a stored ε would be rounded to x_0's dtype and change the loss
        target, regenerated it stays the float32 draw.
    Both give the loss the same ε, bit for bit.
    """
    backend = choose_backend("q_sample", x_start.device, backend)
    seed = new_seed(x_start.device, generator)
    if backend == "triton" or x_start.dtype not in (torch.float32, torch.float64):
        x_t, _ = q_sample(schedule, x_start, t, seed=seed, backend=backend, check=check)
        return x_t, {"seed": seed}
    x_t, eps = q_sample(schedule, x_start, t, seed=seed, write_noise=True, backend=backend, check=check)
    # ε does not depend on x_0: detached, so that a loss with x_start requiring grad sends no gradient to it
    return x_t, {"noise": eps.detach()}
