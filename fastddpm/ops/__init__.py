"""fastddpm's custom ops (namespace ``fastddpm``): what every op file (fastddpm/ops/<op>.py) shares.

Each op has one schema (csrc/fastddpm.cpp) and up to three implementations: ``reference`` (PyTorch, always
there), ``triton`` (kernels/: CUDA tensors, or CPU tensors through the Triton interpreter) and ``cpp``
(csrc/: CPU, and CUDA where written). This module holds
  * the backend table (IMPLEMENTATIONS) and the choice per call (choose_backend, private to fastddpm/ops:
    callers above ask draws_noise_in_kernel);
  * how an op file calls an implementation: call_op, runs_eagerly, launcher, autograd_function, register_fake;
  * the Philox key of the in-kernel noise (new_seed), the dense layouts the kernels stream, the input checks.
The private CPython/PyTorch interfaces these read on every call live in fastddpm/ops/_dispatch.py.
"""

from __future__ import annotations

import os
import warnings

import torch

from fastddpm import _extension
from fastddpm.ops._dispatch import (
    WRAP_TRITON_TAKES_INTERPRETED,
    BelowAutograd,
    backend_environment,
    dispatch_mode_depth,
    graph_building_mode_active,
    peek_interpreter_stack,
)

# ----------------------------------------------------------------------------- backends
BACKENDS = ("auto", "reference", "triton", "cpp")

# The compiled implementations per op and device type. "triton" runs on CUDA tensors, and on CPU tensors
# through the Triton interpreter (TRITON_INTERPRET=1); "cpp" is csrc/ (csrc/cpu, csrc/cuda).
_TRITON = ("cuda", "cpu")
IMPLEMENTATIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "q_sample": {"cpp": ("cpu",), "triton": _TRITON},
    "diffusion_loss": {"cpp": ("cpu",), "triton": _TRITON},
    "p_sample_step": {"cpp": ("cpu",), "triton": _TRITON},
    "ddim_step": {"cpp": ("cpu",), "triton": _TRITON},
    "group_norm_silu": {"cpp": ("cpu", "cuda"), "triton": ()},
}

# Ops whose autograd torch.func transforms (grad, vjp, vmap of a gradient) refuse: a C++
# torch::autograd::Function (csrc/autograd.cpp), or torch.library.register_autograd's (for which functorch
# asks a setup_context it does not have). Under a transform their "cpp" choice runs the reference.
_NO_FUNCTORCH_AUTOGRAD = ("group_norm_silu", "diffusion_loss", "q_sample")

_warned: set[tuple[str, str, str]] = set()
# choose_backend's answers, by everything they depend on: it runs on every op call, so its answer is looked up
# rather than worked out again.
_choices: dict[tuple, str] = {}


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def choose_backend(op: str, device: torch.device | str, backend: str = "auto") -> str:
    """The implementation that runs ``op`` on ``device``: 'reference', 'triton' or 'cpp'.

    ``backend`` (or, for 'auto', FASTDDPM_BACKEND) forces one; else CUDA tensors go to Triton (C++ for
    group_norm_silu) and CPU tensors to the C++ kernels, never by default to the Triton interpreter. A forced
    backend missing from this build warns once and runs the reference."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    env_backend, interpret = backend_environment()
    key = (op, device_type, backend, env_backend, interpret, _extension.load() is not None)
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _choose_backend(op, device_type, backend,
                                                 None if env_backend is None else os.fsdecode(env_backend))
    # (the C call first: torch.compiler.is_compiling is two Python calls, and this runs on every op call)
    if (choice == "cpp" and op in _NO_FUNCTORCH_AUTOGRAD and peek_interpreter_stack() is not None
            and not torch.compiler.is_compiling()):
        return "reference"  # torch.func transforms refuse C++ autograd Functions
    return choice


def draws_noise_in_kernel(op: str, device: torch.device | str, backend: str = "auto") -> bool:
    """Whether ``op`` on ``device`` draws its noise inside the kernel (from a Philox key: the Triton and C++
    kernels) rather than taking it from torch.randn (the reference): what callers above fastddpm/ops ask
    instead of which backend runs."""
    return choose_backend(op, device, backend) in ("triton", "cpp")


def _choose_backend(op: str, device_type: str, backend: str, env_backend: str | None) -> str:
    requested = check_backend(backend)
    if requested == "auto":
        requested = env_backend or "auto"
        if requested not in BACKENDS:
            raise ValueError(f"FASTDDPM_BACKEND={requested!r} is not a backend; choose one of "
                             f"{', '.join(BACKENDS)}")
    if requested == "auto":
        order = ("triton", "cpp") if device_type == "cuda" else ("cpp",)
        if op == "group_norm_silu":  # the U-Net's GroupNorm+SiLU is CUDA C++ on GPUs
            order = ("cpp",)
        for candidate in order:
            if _available(op, candidate, device_type):
                return candidate
        return "reference"
    if not _available(op, requested, device_type):
        key = (op, requested, device_type)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"fastddpm: no {requested} implementation of {op} for {device_type} tensors "
                          f"in this build; using the reference", RuntimeWarning, stacklevel=4)
        return "reference"
    return requested


def _available(op: str, backend: str, device_type: str) -> bool:
    if backend == "reference":
        return True
    if device_type not in IMPLEMENTATIONS[op][backend]:
        return False
    if backend == "cpp":
        return _extension.cuda_built() if device_type == "cuda" else _extension.cpu_built()
    return _triton_available(device_type)


def _triton_available(device_type: str) -> bool:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- calling an implementation
def call_op(op, *args):
    """op(*args), below the dispatcher's autograd layer when no gradient can flow through this call.

    ``torch.library.register_autograd`` installs a Python autograd kernel that runs on every call, even in
    no_grad or when no input requires grad, and costs several times a small op's kernel. When grad mode is off
    or no tensor argument requires grad, the call goes straight to the backend kernel
    (``_dispatch.BelowAutograd``) with the same results: outputs that require no grad, as the autograd kernel
    would return them. While torch.compile traces, the op is called plainly: the compiled graph has no
    per-call autograd kernel to skip. Ops with no autograd registered (the reverse steps) gain nothing from
    it: the dispatcher's fallback for them is C++.
    """
    if torch.is_grad_enabled():
        for a in args:  # (a loop: cheaper than any() over a generator, which matters here)
            if isinstance(a, torch.Tensor) and a.requires_grad:
                return op(*args)
    if torch.compiler.is_compiling():
        return op(*args)
    with BelowAutograd():
        return op(*args)


def runs_eagerly(*tensors) -> bool:
    """Whether a call may run an op's implementation as a plain function, skipping the dispatcher and
    torch.library's Python layers (on the Triton path those cost several times Triton's own launch): eager
    mode, plain tensors, no dispatch mode, functorch transform or trace that must see the op, and no tensor
    whose gradient autograd would have to record."""
    # (is_compiling first: Dynamo folds it to True, and cannot trace the C calls below: a graph break)
    if torch.compiler.is_compiling() or dispatch_mode_depth() or peek_interpreter_stack() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # (a loop: cheaper than any() over a generator)
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    return True


def _launch_directly(kernel):
    return kernel


def launcher(x: torch.Tensor):
    """How an implementation launches its Triton kernel for data x: through torch.library.wrap_triton while
    the op is traced (fake or functional tensors, a dispatch mode), so that the launch becomes a node of the
    graph; else directly. (wrap_triton's eager path is a plain launch behind more Python.) Before torch
    2.13 wrap_triton refuses the interpreter's kernels (CPU tensors): there a dispatch mode that builds no
    graph gets the direct launch too."""
    if type(x) is torch.Tensor and (not dispatch_mode_depth() or (
            not WRAP_TRITON_TAKES_INTERPRETED and x.device.type == "cpu"
            and not graph_building_mode_active())):
        return _launch_directly
    from torch.library import wrap_triton

    return wrap_triton


def autograd_function(name: str, impl, setup_context, backward) -> type[torch.autograd.Function]:
    """A torch.autograd.Function named ``name`` whose forward is ``impl`` and whose autograd is
    ``setup_context`` and ``backward``: the same two functions an op file gives
    torch.library.register_autograd, so that an implementation called directly (the Triton path, no
    dispatcher) and the op share one autograd. Call it as ``Function.apply(*args)`` with the op's arguments,
    positionally."""
    return type(name, (torch.autograd.Function,), {
        "__doc__": f"{name}: {impl.__name__} under the op's registered autograd.",
        "forward": staticmethod(impl),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    })


def one_device_fake(name: str, fake):
    """``fake`` for op ``name`` ("fastddpm::<op>"), after a check that its tensor arguments share one device.

    The dispatcher runs an op's fake kernel (the Meta key) whenever any argument is on the meta device: with
    the data on a CPU and, say, a meta weight, it would return uninitialised memory. The real kernels refuse
    mixed devices; so does this, naming the argument. All-meta and fake-tensor calls (torch.compile, opcheck)
    pass.
    """
    namespace, op = name.split("::")
    names = [a.name for a in getattr(getattr(torch.ops, namespace), op).default._schema.arguments]

    def checked(*args, **kwargs):
        out = fake(*args, **kwargs)  # its own checks first, for their messages (it only allocates)
        first = None
        for arg_name, arg in (*zip(names, args), *kwargs.items()):
            if isinstance(arg, torch.Tensor):
                if first is None:
                    first = (arg_name, arg.device)
                elif arg.device != first[1]:
                    raise RuntimeError(f"{op}: {arg_name} is on {arg.device}, {first[0]} on {first[1]}; all "
                                       f"tensor arguments must be on one device")
        return out

    return checked


def register_fake(name: str, fake) -> None:
    """torch.library.register_fake of :func:`one_device_fake`: each op of fastddpm registers its fake so."""
    torch.library.register_fake(name)(one_device_fake(name, fake))


# ----------------------------------------------------------------------------- noise key, layouts
def new_seed(device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh Philox key for the in-kernel noise: int64 [1] on ``device``, drawn from torch's RNG.

    Drawn on the device itself (no host sync), so ``torch.manual_seed`` makes runs reproducible and a CUDA
    graph that contains this draw gets a new key on every replay.
    """
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device, generator=generator)


def batch_outer_dense(x: torch.Tensor) -> bool:
    """Whether the kernels can stream x as is: dense (any dim order, e.g. channels_last), with each sample
    one contiguous block of memory."""
    from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

    if x.is_contiguous():
        return True
    if not is_non_overlapping_and_dense(x):
        return False
    return x.shape[0] <= 1 or x.stride(0) == x.numel() // x.shape[0]


def as_layout_of(y: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """y with exactly x's strides (a copy only when they differ); x itself must be batch-outer dense."""
    if y is None or y.stride() == x.stride():
        return y
    return torch.empty_like(x, dtype=y.dtype).copy_(y)


def dense(x: torch.Tensor) -> torch.Tensor:
    return x if batch_outer_dense(x) else x.contiguous()


# ----------------------------------------------------------------------------- input checks
def require(condition, message) -> None:
    """torch._check(condition, message), without its cost for a plain True (every eager call's checks)."""
    if condition is not True:
        torch._check(condition, message)


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_data(op: str, name: str, tensor: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """A floating-point data tensor of at least 1 dimension, with like's shape and device when given."""
    require(isinstance(tensor, torch.Tensor), lambda: f"{op}: {name} must be a tensor")
    require(tensor.dtype in FLOAT_DTYPES,
            lambda: f"{op}: {name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")
    require(tensor.dim() >= 1, lambda: f"{op}: {name} must have a batch dimension, got a 0-d tensor")
    if like is not None:
        require(tensor.shape == like.shape,
                lambda: f"{op}: {name} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)}")
        require(tensor.device == like.device,
                lambda: f"{op}: {name} is on {tensor.device}, the data on {like.device}")


def check_index(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    require(t.dtype == torch.int64 and t.dim() == 1 and t.shape[0] == x.shape[0],
            lambda: f"{op}: {name} must be int64 of shape [{x.shape[0]}] (one per sample), "
                    f"got {t.dtype} {tuple(t.shape)}")
    require(t.device == x.device, lambda: f"{op}: {name} is on {t.device}, the data on {x.device}")


def check_table(op: str, name: str, table: torch.Tensor, x: torch.Tensor, rows: int | None = None) -> None:
    require(table.dtype in (torch.float32, torch.float64),
            lambda: f"{op}: table {name} must be float32 or float64, got {table.dtype}")
    require(table.device == x.device,
            lambda: f"{op}: table {name} is on {table.device}, the data on {x.device}; move the schedule "
                    f"with .to(device)")
    require(table.is_contiguous(), lambda: f"{op}: table {name} must be contiguous")
    if rows is None:
        require(table.dim() == 1 and table.shape[0] >= 1, lambda: f"{op}: table {name} must be 1-D")
    else:
        require(table.dim() == 2 and table.shape[0] >= rows,
                lambda: f"{op}: table {name} must be [{rows}, T], got {tuple(table.shape)}")


def check_seed(op: str, seed: torch.Tensor, x: torch.Tensor) -> None:
    require(seed.dtype == torch.int64 and seed.numel() == 1,
            lambda: f"{op}: seed must be an int64 tensor with one element, got {seed.dtype} "
                    f"{tuple(seed.shape)}")
    require(seed.device == x.device, lambda: f"{op}: seed is on {seed.device}, the data on {x.device}")


def check_timesteps(op: str, t: torch.Tensor, num_timesteps: int, allow_negative: bool = False) -> None:
    """t ∈ [0, T) (or [−1, T) for an end marker). A CPU t is read on the host (a ValueError names the bad
    value); a CUDA t is checked on the device (torch._assert_async: no host sync, the kernels keep
    streaming; a bad value fails the next synchronisation with a device-side assert). Skipped while
    torch.compile traces and inside a CUDA graph capture; the kernels clamp every table read anyway."""
    if torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    low = -1 if allow_negative else 0
    if t.is_cuda:
        assert_on_device(t.ge(low).logical_and_(t.lt(num_timesteps)).all(),
                         f"{op}: timesteps must lie in [{low}, {num_timesteps})")
        return
    bad = (t < low) | (t >= num_timesteps)
    if bool(bad.any()):
        raise ValueError(f"{op}: timesteps must lie in [{low}, {num_timesteps}), got {t[bad][0].item()}")


def check_positive_values(op: str, name: str, tensor: torch.Tensor) -> None:
    """Every element of tensor > 0 (NaN fails): read on a CPU, asserted on the device on a GPU (no host sync).
    Skipped where values cannot be read: fake tensors (torch.compile, opcheck) and torch.func transforms."""
    if (torch.compiler.is_compiling() or peek_interpreter_stack() is not None
            or torch._subclasses.fake_tensor.is_fake(tensor)):
        return
    if tensor.device.type == "cpu":
        if not bool((tensor > 0).all()):
            raise RuntimeError(f"{op}: {name} must be > 0, got {tensor[~(tensor > 0)][0].item()}")
    elif tensor.is_cuda:
        assert_on_device((tensor > 0).all(), f"{op}: {name} must be > 0")


def assert_on_device(condition: torch.Tensor, message: str) -> None:
    """Fail the device's stream unless the one-element bool tensor ``condition`` holds, without a host
    sync."""
    torch._assert_async(condition, message)


def check_triton_device(op: str, x: torch.Tensor) -> None:
    """The Triton kernels take CUDA tensors, and CPU tensors only when they run in the Triton interpreter."""
    if x.device.type == "cuda":
        return
    from triton.runtime.interpreter import InterpretedFunction

    from fastddpm.kernels import common

    # (triton.jit makes an InterpretedFunction when TRITON_INTERPRET=1 at the time kernels/ was imported)
    if x.device.type != "cpu" or not isinstance(common.load_t, InterpretedFunction):
        raise RuntimeError(f"{op}: the Triton kernels need CUDA tensors, got one on {x.device}; for CPU "
                           f"tensors set TRITON_INTERPRET=1 before triton is imported (or use backend='cpp' "
                           f"or 'reference')")


# Every op file registers its op's fake impl and autograd on import: importing the package imports them all
# (in dependency order, after everything above that they use), so that no op is reachable half-registered.
from fastddpm.ops import q_sample, diffusion_loss, reverse_step, group_norm_silu  # noqa: E402, F401, I001
