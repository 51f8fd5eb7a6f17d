"""The dispatcher path a CUDA call takes, rehearsed on the CPU.

On CUDA tensors each op's kernel is its Triton implementation, registered with
``torch.library.register_kernel(..., "cuda")``: the dispatcher hands it the schema's arguments and expects
the schema's outputs, the fake must agree with it, and torch.compile traces the op around it. No GPU here:
for each test, the same implementations are registered as the ops' CPU kernels too (in place of the C++
ones, restored after), and run on CPU tensors under the Triton interpreter. (What this cannot rehearse: the
launch traced into a graph through wrap_triton, which passes the interpreter's kernels through untraced; the
GPU runs tests/ops' compile tests on CUDA tensors. GroupNorm+SiLU's CUDA kernel is C++:
tests/test_cuda_group_norm_silu.py emulates it.)
"""
import contextlib
import warnings

import pytest
import torch

from fastddpm import _extension
from fastddpm.ops import diffusion_loss as loss_module
from fastddpm.ops import q_sample as q_sample_module
from fastddpm.ops import reverse_step as step_module

from ..conftest import needs_triton_interpreter, rel_err
from ..kernel_grid import data, timesteps
from .conftest import device

pytestmark = [
    needs_triton_interpreter,
    pytest.mark.skipif(not _extension.cpu_built(), reason="fastddpm._C is not built: the ops do not exist"),
    pytest.mark.skipif(device().type != "cpu", reason="on a GPU the ops' CUDA kernels run for real"),
]

# What each op's CUDA kernel is (fastddpm/ops/<op>.py registers these for "cuda").
CUDA_KERNELS = {
    "q_sample": q_sample_module._q_sample_triton,
    "diffusion_loss": loss_module._diffusion_loss_triton,
    "diffusion_loss_backward": loss_module._diffusion_loss_backward_triton,
    "p_sample_step": step_module._p_sample_step_triton,
    "ddim_step": step_module._ddim_step_triton,
}


@contextlib.contextmanager
def cuda_kernels_on_the_cpu():
    """Within the block, each op's CPU kernel is its CUDA kernel; yields the calls per op."""
    calls = {name: 0 for name in CUDA_KERNELS}
    lib = torch.library.Library("fastddpm", "IMPL")

    def counted(name, fn):
        def kernel(*args):
            calls[name] += 1
            return fn(*args)
        return kernel

    try:
        with warnings.catch_warnings():  # (torch warns, once a process, that C++ kernels are overridden)
            warnings.simplefilter("ignore", UserWarning)
            for name, fn in CUDA_KERNELS.items():
                lib.impl(name, counted(name, fn), "CPU")
        yield calls
    finally:
        lib._destroy()


def op_calls(sched):
    """(op name, the op's arguments) for every op and each way it draws or takes its noise."""
    x, o, n = data((3, 2, 5, 7)), data((3, 2, 5, 7)), data((3, 2, 5, 7))
    t, seed = timesteps(3), torch.tensor([7])
    tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    table, ac = sched.reverse_table(), sched.alphas_cumprod
    t_prev = (t - 9).clamp(min=-1)
    return [
        ("q_sample", (x, t, *tables, n, None, 0, False)),
        ("q_sample", (x, t, *tables, None, seed, 5, True)),
        ("diffusion_loss", (o, x, t, *tables, None, seed, 0, 0, None, 0, False)),
        ("diffusion_loss", (o, x, t, *tables, n, None, 0, 2, 5.0, 1, True)),
        ("diffusion_loss_backward", (torch.rand(3), o, x, t, *tables, None, seed, 0, 1, None, 0)),
        ("p_sample_step", (o, x, t, table, None, seed, 0, 0, 1.0, None, True, True)),
        ("p_sample_step", (o, x, t, table, n, None, 0, 2, None, torch.rand(3) + 1, False, False)),
        ("ddim_step", (o, x, t, t_prev, table, ac, None, seed, 3, 0, 0.5, 1.0, 1.0, None, True, True, True)),
        ("ddim_step", (o, x, t, t_prev, table, ac, n, None, 0, 1, 0.0, 1.0, None, None, False, True, False)),
    ]


def outputs(result):
    return result if isinstance(result, (tuple, list)) else (result,)


def test_each_op_through_its_cuda_kernel_gives_the_cpp_results(sched):
    """The op called through the dispatcher runs the CUDA kernel (counted), with the C++ kernel's outputs
    (shape, dtype, strides) and values: DESIGN.md's fp32 tolerances between the two (1e-5 elementwise, 1e-4
    for the loss's reduction and gradient)."""
    cases = op_calls(sched)
    expected = [outputs(getattr(torch.ops.fastddpm, name).default(*args)) for name, args in cases]
    with cuda_kernels_on_the_cpu() as calls:
        got = [outputs(getattr(torch.ops.fastddpm, name).default(*args)) for name, args in cases]
    assert calls == {"q_sample": 2, "diffusion_loss": 2, "diffusion_loss_backward": 1, "p_sample_step": 2,
                     "ddim_step": 2}
    for (name, _), want, have in zip(cases, expected, got):
        assert len(want) == len(have), name
        for a, b in zip(want, have):
            assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride(), name
            if a.numel():
                assert rel_err(b, a) <= (1e-4 if name.startswith("diffusion_loss") else 1e-5), name
    # the C++ kernels are back
    again = [outputs(getattr(torch.ops.fastddpm, name).default(*args)) for name, args in cases]
    assert all(torch.equal(a, b) for want, have in zip(expected, again) for a, b in zip(want, have))


def test_opcheck_through_the_cuda_kernels(sched):
    """Schema, fake and kernel agree (torch.library.opcheck) with the CUDA kernels, as on a GPU."""
    with cuda_kernels_on_the_cpu() as calls:
        for name, args in op_calls(sched):
            torch.library.opcheck(getattr(torch.ops.fastddpm, name).default, args)
    assert all(calls.values()), calls


def test_entries_and_compile_through_the_cuda_kernels(sched):
    """The Python entries' op path (backend='cpp' calls the op) and a torch.compile(fullgraph=True) graph
    around the ops run the CUDA kernels and give the eager results."""
    from fastddpm.ops.diffusion_loss import diffusion_loss
    from fastddpm.ops.q_sample import q_sample
    from fastddpm.ops.reverse_step import ddim_step, p_sample_step

    x, o, t, seed = data((2, 3, 6, 6)), data((2, 3, 6, 6)), timesteps(2), torch.tensor([3])

    def chain(o, x, t):
        with torch.no_grad():
            x_t = q_sample(sched, x, t, seed=seed, backend="cpp", check=False)[0]
            loss = diffusion_loss(sched, o, x, t, seed=seed, backend="cpp", check=False)
            a = p_sample_step(sched, o, x_t, t, seed=seed, backend="cpp", check=False)[0]
            return loss, ddim_step(sched, o, a, t, t - 1, eta=0.5, seed=seed, backend="cpp", check=False)[0]

    with cuda_kernels_on_the_cpu() as calls:
        eager = chain(o, x, t)
        assert all(calls[name] == 1 for name in ("q_sample", "diffusion_loss", "p_sample_step", "ddim_step"))
        compiled = torch.compile(chain, fullgraph=True, backend="aot_eager")(o, x, t)
        assert calls["ddim_step"] == 2
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
