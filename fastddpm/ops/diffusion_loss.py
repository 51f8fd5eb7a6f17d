"""diffusion_loss: L_simple (DDPM eq. 14) with the target formed in-kernel, forward and backward.

Op ``fastddpm::diffusion_loss`` (schema in csrc/fastddpm.cpp; CPU kernel csrc/cpu/diffusion_loss.cpp, or the
reference math here in a build without it; CUDA kernel = the Triton implementation here, kernels/loss.py)
and its backward op ``fastddpm::diffusion_loss_backward``, one sweep that recomputes the target. Both take ε
given (``noise``) or regenerated from the (``seed``, ``offset``) q_sample drew it with (``noised`` below
decides which). With ``keep_grad`` (a CPU loss whose gradient goes to the prediction alone) the forward also
returns ∂loss/∂pred for an incoming gradient of one, written by the pass that sums the loss; the backward
then scales or returns it.

Which autograd runs where:
  * CPU tensors (the C++ kernels): the op's C++ autograd kernel (AutogradCPU, in csrc/cpu/diffusion_loss.cpp),
    which takes precedence there over the Python one; the entry point calls the op. It saves and computes
    what the Python autograd does, without its Python frames: those cost several times the CPU training
    step's loss forward and backward at small sizes, so the C++ node is what keeps that step's per-call cost.
    (torch.func refuses C++ autograd nodes: under its transforms, choose_backend picks the reference.)
  * Every other device (CUDA) and the eager Triton path: one Python autograd (``_setup_context``,
    ``_make_backward``), registered on the op and reached without the dispatcher by the eager paths
    (``_autograd_function``).
"""

from __future__ import annotations

import torch

from fastddpm import _extension, contracts, reference
from fastddpm.ops import (
    as_layout_of,
    call_op,
    check_data,
    check_index,
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
from fastddpm.ops._dispatch import buffers
from fastddpm.ops.q_sample import _Tables, philox_noise_like, q_sample

NAME = "diffusion_loss"


def _prepare(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, objective, reduction, min_snr_gamma):
    """Checks (no host sync) and the tensors in one batch-outer dense layout: (pred, x_start, noise)."""
    check_data(NAME, "model_output", model_output)
    check_index(NAME, "t", t, model_output)
    check_table(NAME, "sqrt_alphas_cumprod", sqrt_ac, model_output)
    check_table(NAME, "sqrt_one_minus_alphas_cumprod", sqrt_1m_ac, model_output)
    require(objective in (contracts.PRED_NOISE, contracts.PRED_X0, contracts.PRED_V),
            lambda: f"{NAME}: objective must be 0 (ε), 1 (x_0) or 2 (v), got {objective}")
    require(reduction in (contracts.REDUCTION_NONE, contracts.REDUCTION_MEAN),
            lambda: f"{NAME}: reduction must be 0 (none) or 1 (mean), got {reduction}")
    require(model_output.shape[0] > 0, lambda: f"{NAME}: empty batch")
    require(min_snr_gamma is None or min_snr_gamma > 0,
            lambda: f"{NAME}: min_snr_gamma must be > 0 (or None), got {min_snr_gamma}")
    if objective != contracts.PRED_NOISE:
        require(x_start is not None, lambda: f"{NAME}: the x_0 and v objectives need x_start")
    if x_start is not None:
        check_data(NAME, "x_start", x_start, model_output)
    if objective != contracts.PRED_X0:
        require((noise is None) != (seed is None), lambda: f"{NAME}: give exactly one of noise and seed")
    if noise is not None:
        check_data(NAME, "noise", noise, model_output)
    if seed is not None:
        check_seed(NAME, seed, model_output)
    pred = dense(model_output)
    return pred, as_layout_of(x_start, pred), as_layout_of(noise, pred)


def _loss_dtype(pred):
    return torch.float64 if pred.dtype == torch.float64 else torch.float32


def _ones_like_loss(pred, reduction):
    """The incoming gradient of one (the scalar for mean, [B] for none) that keep_grad's gradient is for."""
    shape = () if reduction == contracts.REDUCTION_MEAN else (pred.shape[0],)
    return torch.ones(shape, dtype=_loss_dtype(pred), device=pred.device)


# ----------------------------------------------------------------------------- Triton (the CUDA kernels)
def _diffusion_loss_triton(model_output: torch.Tensor, x_start: torch.Tensor | None, t: torch.Tensor,
                           sqrt_alphas_cumprod: torch.Tensor, sqrt_one_minus_alphas_cumprod: torch.Tensor,
                           noise: torch.Tensor | None, seed: torch.Tensor | None, offset: int, objective: int,
                           min_snr_gamma: float | None, reduction: int,
                           keep_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from fastddpm.kernels.loss import chunks, launch_loss

    pred, x0, eps = _prepare(model_output, x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                             noise, seed, objective, reduction, min_snr_gamma)
    check_triton_device(NAME, pred)
    dtype = _loss_dtype(pred)
    partial = torch.empty(pred.shape[0], chunks(pred), dtype=dtype, device=pred.device)
    per_sample = torch.empty(pred.shape[0], dtype=dtype, device=pred.device)
    mean = torch.empty((), dtype=dtype, device=pred.device)
    launch_loss(pred, x0, t.contiguous(), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, partial,
                per_sample, mean, objective=objective, noise=eps, seed=seed, offset=offset,
                min_snr_gamma=min_snr_gamma, wrap=launcher(pred))
    loss = mean if reduction == contracts.REDUCTION_MEAN else per_sample
    if not keep_grad:
        return loss, model_output.new_empty(0)
    # (the eager paths never ask it here: a GPU recomputes the target in the backward, fewer bytes moved)
    grad = _diffusion_loss_backward_triton(_ones_like_loss(pred, reduction), model_output, x_start, t,
                                           sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise, seed,
                                           offset, objective, min_snr_gamma, reduction)
    return loss, grad


def _diffusion_loss_backward_triton(grad: torch.Tensor, model_output: torch.Tensor,
                                    x_start: torch.Tensor | None, t: torch.Tensor,
                                    sqrt_alphas_cumprod: torch.Tensor,
                                    sqrt_one_minus_alphas_cumprod: torch.Tensor, noise: torch.Tensor | None,
                                    seed: torch.Tensor | None, offset: int, objective: int,
                                    min_snr_gamma: float | None, reduction: int) -> torch.Tensor:
    from fastddpm.kernels.loss import launch_loss_backward

    pred, x0, eps = _prepare(model_output, x_start, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                             noise, seed, objective, reduction, min_snr_gamma)
    check_triton_device(NAME, pred)
    grad_pred = torch.empty_like(pred)
    launch_loss_backward(grad.contiguous(), pred, x0, t.contiguous(), sqrt_alphas_cumprod,
                         sqrt_one_minus_alphas_cumprod, grad_pred, objective=objective, reduction=reduction,
                         noise=eps, seed=seed, offset=offset, min_snr_gamma=min_snr_gamma,
                         wrap=launcher(pred))
    return grad_pred


# ----------------------------------------------------------------------------- CPU (reference math)
def _reference_noise(pred, noise, seed, offset):
    if noise is not None or seed is None:
        return noise
    return philox_noise_like(pred, seed, offset)


def _diffusion_loss_cpu(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset, objective,
                        min_snr_gamma, reduction, keep_grad):
    """The CPU kernel of a build whose extension has the schema but no C++ CPU kernels."""
    pred, x0, eps = _prepare(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, objective, reduction,
                             min_snr_gamma)
    eps = _reference_noise(pred, eps, seed, offset)
    loss = _reference_loss(pred, x0, t, sqrt_ac, sqrt_1m_ac, eps, objective, min_snr_gamma, reduction)
    if not keep_grad:
        return loss, model_output.new_empty(0)
    grad = _diffusion_loss_backward_cpu(_ones_like_loss(pred, reduction), model_output, x_start, t, sqrt_ac,
                                        sqrt_1m_ac, noise, seed, offset, objective, min_snr_gamma, reduction)
    return loss, grad


def _reference_loss(pred, x0, t, sqrt_ac, sqrt_1m_ac, eps, objective, min_snr_gamma, reduction):
    tables = _Tables(sqrt_ac, sqrt_1m_ac)
    tables.snr = sqrt_ac.double().square() / sqrt_1m_ac.double().square()
    x0 = x0 if x0 is not None else pred  # unused by the ε objective
    eps = eps if eps is not None else pred  # unused by the x_0 objective
    out = reference.diffusion_loss(tables, pred, x0, t, eps, contracts.OBJECTIVES[objective], min_snr_gamma,
                                   contracts.REDUCTIONS[reduction])
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


# ----------------------------------------------------------------------------- fake impls
def _fake_loss(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset, objective, min_snr_gamma,
               reduction, keep_grad):
    pred, _, _ = _prepare(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, objective, reduction,
                          min_snr_gamma)
    shape = () if reduction == contracts.REDUCTION_MEAN else (pred.shape[0],)
    grad = torch.empty_like(pred) if keep_grad else model_output.new_empty(0)
    return pred.new_empty(shape, dtype=_loss_dtype(pred)), grad


def _fake_backward(grad, model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset, objective,
                   min_snr_gamma, reduction):
    pred, _, _ = _prepare(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, objective, reduction,
                          min_snr_gamma)
    return torch.empty_like(pred)


# ----------------------------------------------------------------------------- the autograd
def _setup_context(ctx, inputs, output):
    """Saves what the backward reads: the inputs; or, with keep_grad, the gradient the forward wrote (a
    constant of the node) and what ∂L/∂x_0 and ∂L/∂ε are formed from (t and the tables)."""
    model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, *_ = inputs
    ctx.args = inputs[7:]  # offset, objective, min_snr_gamma, reduction, keep_grad
    ctx.dtypes = (model_output.dtype, None if x_start is None else x_start.dtype,
                  None if noise is None else noise.dtype)
    kept = output[1]
    ctx.mark_non_differentiable(kept)
    ctx.set_materialize_grads(False)
    if inputs[11]:
        # (an attribute, not save_for_backward, whose bookkeeping costs more than this backward's work: kept
        # is a non-differentiable output, with no grad_fn to hold ctx in a cycle; freed with the graph, and
        # still there for a second backward of a retained graph)
        ctx.kept = (kept, t, sqrt_ac, sqrt_1m_ac)
    else:
        ctx.save_for_backward(model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed)


DOUBLE_BACKWARD_ERROR = ("diffusion_loss: the fused loss has no double backward (a backward with "
                         "create_graph=True); use backend='reference' for higher-order gradients")


def _refuse_double_backward() -> None:
    """Inside a backward, grad mode is on only with create_graph=True: the fused backward is not
    differentiable, and its result would be a constant (silently wrong second derivatives)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _is_one_on_host(grad: torch.Tensor) -> bool:
    """Whether grad is a plain CPU tensor equal to 1 (the usual ``loss.backward()`` of a mean loss): read on
    the host, which is free for a CPU tensor; never for a fake, functional or functorch tensor of a trace."""
    return (type(grad) is torch.Tensor and grad.device.type == "cpu" and not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is None and grad.item() == 1.0)


def _make_backward(backward_impl):
    """The backward of the loss, with ``backward_impl`` (the backward op, or an implementation of it) forming
    ∂L/∂pred where the forward did not keep it."""
    def backward(ctx, grad, _grad_kept=None):
        if grad is None:  # only the kept gradient (a constant) reached the output
            return (None,) * 12
        _refuse_double_backward()
        offset, objective, min_snr_gamma, reduction, keep_grad = ctx.args
        pred_dtype, x_start_dtype, noise_dtype = ctx.dtypes
        if keep_grad:  # ∂L/∂pred for a gradient of one, times the gradient that came (per sample for none)
            kept, t, sqrt_ac, sqrt_1m_ac = ctx.kept
            if reduction == contracts.REDUCTION_NONE:
                grad_pred = kept * grad.to(kept.dtype).reshape((-1,) + (1,) * (kept.dim() - 1))
            else:
                grad_pred = kept if _is_one_on_host(grad) else kept * grad.to(kept.dtype)
        else:
            model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed = ctx.saved_tensors
            grad_pred = backward_impl(grad, model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed,
                                      offset, objective, min_snr_gamma, reduction)
        # The target depends on ε and x_0: ∂L/∂target = −∂L/∂pred; ε (ε objective) or x_0 (x_0 objective)
        # directly, v = √ᾱ ε − √(1 − ᾱ) x_0 through its coefficients.
        # (−∂L/∂pred is formed only where an input needs it: a full pass over the data.)
        grad_x0 = grad_noise = None
        if ctx.needs_input_grad[1] and objective != contracts.PRED_NOISE:
            grad_x0 = (-grad_pred if objective == contracts.PRED_X0
                       else reference.extract(sqrt_1m_ac, t, grad_pred) * grad_pred)
            grad_x0 = grad_x0.to(x_start_dtype)
        if ctx.needs_input_grad[5] and objective != contracts.PRED_X0:
            grad_noise = (-grad_pred if objective == contracts.PRED_NOISE
                          else -reference.extract(sqrt_ac, t, grad_pred) * grad_pred)
            grad_noise = grad_noise.to(noise_dtype)
        if grad_pred.dtype != pred_dtype:
            grad_pred = grad_pred.to(pred_dtype)
        return (grad_pred, grad_x0, None, None, None, grad_noise) + (None,) * 6
    return backward


def _autograd_function(name: str, forward_impl, setup_context, backward, tensor_args: int):
    """A torch.autograd.Function that runs ``forward_impl`` with an op's ``setup_context`` and ``backward``
    (those given to register_autograd): the op's autograd without the dispatcher and torch.library's layers,
    for the eager paths. ``apply(*args)`` takes the op's arguments; the first ``tensor_args`` (those that may
    be tensors) reach autograd as they are, the rest as one tuple (each argument costs apply). Old-style
    (forward calls setup_context): its apply binds no signature per call."""
    def forward(ctx, *args):
        args = args[:-1] + args[-1]
        output = forward_impl(*args)
        setup_context(ctx, args, output)
        return output

    def backward_packed(ctx, *grads):
        return backward(ctx, *grads)[:tensor_args] + (None,)

    function = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                       "backward": staticmethod(backward_packed),
                                                       "forward_impl": staticmethod(forward_impl)})
    apply = function.apply
    function.run = staticmethod(lambda *args: apply(*args[:tensor_args], args[tensor_args:]))
    return function


_TritonLoss = _autograd_function("_TritonLoss", _diffusion_loss_triton, _setup_context,
                                 _make_backward(_diffusion_loss_backward_triton), tensor_args=7)


def _register() -> bool:
    """Registers the op's kernels, fake impls and autograd. False without the extension, where the ops do not
    exist: CUDA tensors take the Triton implementation directly."""
    if _extension.load() is None:
        return False
    backward_op = torch.ops.fastddpm.diffusion_loss_backward.default
    for name, triton_fn, cpu_fn in (("diffusion_loss", _diffusion_loss_triton, _diffusion_loss_cpu),
                                    ("diffusion_loss_backward", _diffusion_loss_backward_triton,
                                     _diffusion_loss_backward_cpu)):
        torch.library.register_kernel(f"fastddpm::{name}", "cuda", triton_fn)
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastddpm::{name}", "CPU"):
            torch.library.register_kernel(f"fastddpm::{name}", "cpu", cpu_fn)
    register_fake("fastddpm::diffusion_loss", _fake_loss)
    register_fake("fastddpm::diffusion_loss_backward", _fake_backward)
    # (every device but the CPU, whose C++ autograd kernel takes precedence: see the module docstring)
    torch.library.register_autograd("fastddpm::diffusion_loss", _make_backward(backward_op),
                                    setup_context=_setup_context)
    return True


_HAS_OP = _register()


# ----------------------------------------------------------------------------- the Python entry point
# contracts' codes by name, looked up on every call
_OBJECTIVE_CODES = {name: contracts.objective_code(name) for name in contracts.OBJECTIVES}
_REDUCTION_CODES = {name: contracts.reduction_code(name) for name in contracts.REDUCTIONS}

def _keep_grad(model_output, x_start, noise) -> bool:
    """Whether the forward writes ∂loss/∂pred too: a CPU loss whose gradient flows to the prediction alone, in
    float32/64. On a CPU this replaces the backward's whole pass over the prediction, x_0 and ε by nothing;
    it holds that gradient (the prediction's size) from forward to backward, as eager autograd of an MSE
    holds its input and target."""
    return (torch.is_grad_enabled() and model_output.requires_grad and model_output.device.type == "cpu"
            and model_output.dtype in (torch.float32, torch.float64)
            and not (x_start is not None and x_start.requires_grad)
            and not (noise is not None and noise.requires_grad))


def _eager(model_output, x_start, noise) -> bool:
    """Whether the call may skip the dispatcher (ops.runs_eagerly; model_output may need grad: the
    autograd.Function's). Nothing to ask while torch.compile traces (the op must be seen)."""
    return (not torch.compiler.is_compiling() and type(model_output) is torch.Tensor
            and runs_eagerly(x_start, noise))


def _run_directly(function, args, model_output, x_start, noise) -> torch.Tensor:
    """The loss from ``function.forward_impl`` called directly, through ``function`` (the autograd.Function of
    ``_autograd_function``) when a gradient must flow."""
    if torch.is_grad_enabled() and (model_output.requires_grad
                                    or (x_start is not None and x_start.requires_grad)
                                    or (noise is not None and noise.requires_grad)):
        return function.run(*args)[0]
    return function.forward_impl(*args)[0]


def diffusion_loss(schedule, model_output: torch.Tensor, x_start: torch.Tensor | None, t: torch.Tensor,
                   noise: torch.Tensor | None = None, *, seed: torch.Tensor | None = None, offset: int = 0,
                   objective: str = "pred_noise", min_snr_gamma: float | None = None, reduction: str = "mean",
                   backend: str = "auto", check: bool = True) -> torch.Tensor:
    """L_simple for the objective, with ε given (``noise``) or regenerated from (``seed``, ``offset``).

    Returns the mean loss, or per-sample losses [B] with ``reduction='none'``; float32 (float64 for float64
    inputs). Differentiable in model_output (and x_start / noise where the target uses them).
    """
    objective_code, reduction_code = _OBJECTIVE_CODES.get(objective), _REDUCTION_CODES.get(reduction)
    if objective_code is None or reduction_code is None:  # (raises, naming the choices)
        contracts.objective_code(objective), contracts.reduction_code(reduction)
    if min_snr_gamma is not None and not min_snr_gamma > 0:
        raise ValueError(f"{NAME}: min_snr_gamma must be > 0 (or None), got {min_snr_gamma}")
    sqrt_ac, sqrt_1m_ac = buffers(schedule, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
    if check:
        check_timesteps(NAME, t, sqrt_ac.shape[0])
    if objective_code == contracts.PRED_X0:
        noise = seed = None  # the target is x_0 alone
    args = (model_output, x_start, t, sqrt_ac, sqrt_1m_ac, noise, seed, offset, objective_code, min_snr_gamma,
            reduction_code)
    backend = choose_backend(NAME, model_output.device, backend)
    # The eager paths call the implementation directly; otherwise the op, whose kernel the dispatcher picks by
    # device.
    if backend == "triton":
        # (CPU tensors: the interpreter, as the op's CPU kernel is C++; a build without the op: no other way)
        if model_output.device.type != "cuda" or not _HAS_OP or _eager(model_output, x_start, noise):
            return _run_directly(_TritonLoss, (*args, False), model_output, x_start, noise)
        return call_op(torch.ops.fastddpm.diffusion_loss.default, *args, False)[0]
    if backend == "cpp" and _HAS_OP:  # CPU tensors: the C++ kernel, and the C++ autograd if a gradient flows
        return call_op(torch.ops.fastddpm.diffusion_loss.default, *args,
                       _keep_grad(model_output, x_start, noise))[0]
    if seed is not None:
        check_seed(NAME, seed, model_output)
        noise = philox_noise_like(dense(model_output), seed, offset)
    return reference.diffusion_loss(schedule, model_output,
                                    x_start if x_start is not None else model_output, t,
                                    noise if noise is not None else model_output, objective, min_snr_gamma,
                                    reduction)


# ----------------------------------------------------------------------------- q_sample → loss: where ε lives
def noised(schedule, x_start: torch.Tensor, t: torch.Tensor, *, backend: str = "auto",
           generator: torch.Generator | None = None, check: bool = True) -> tuple[torch.Tensor, dict]:
    """x_t = q_sample(x_0, t) with ε drawn in-kernel, and how the loss gets that same ε:
    ``(x_t, noise_kwargs)``, to be passed on as
    ``diffusion_loss(schedule, model(x_t, t), x_start, t, **noise_kwargs)``.

    The one place that decides whether ε is stored or regenerated (Diffusion and the benchmarks call it):
      * ``{"noise": ε}``: q_sample writes ε and the loss forward and backward read it. On the CPU (C++
        kernels, or the reference) drawing ε (Philox + Box–Muller) costs several times streaming it, so one
        draw and two reads beat three draws.
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
