"""fastddpm::ddim_step, the DDIM step, on every backend present (tests/ops/conftest.py), against
fastddpm.reference in float64; the one op (opcheck, CUDA kernel = the Triton implementation)."""
import itertools

import pytest
import torch

from fastddpm import _extension, reference
from fastddpm.ops import reverse_step
from fastddpm.ops.q_sample import philox_noise_like
from fastddpm.ops.reverse_step import ddim_step, p_sample_step

from ..kernel_grid import (
    OBJECTIVES,
    check_step,
    close_to_stream,
    data,
    in_low_precision,
    layouts,
    on_grid,
    timesteps,
)
from .conftest import backends_present, check_triton_path

BACKENDS = backends_present("ddim_step")
needs_ops = pytest.mark.skipif(not _extension.cpu_built(),
                               reason="fastddpm._C is not built: the op does not exist")


pytestmark = pytest.mark.usefixtures("tensors_on_device")


def impl(backend):
    """The implementation a backend runs, called with the op's arguments."""
    if backend == "cpp":
        return torch.ops.fastddpm.ddim_step
    return reverse_step._ddim_step_triton if backend == "triton" else reverse_step._ddim_step_reference


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("backend", BACKENDS)
@on_grid
def test_shapes_dtypes_layouts(sched, shape, dtype, backend):
    for cl in layouts(shape):
        x, o, n = data(shape, dtype, cl, 2), data(shape, dtype, cl), data(shape, dtype, cl)
        t = timesteps(shape[0])
        t_prev = (t - 20).clamp(min=-1)
        out = ddim_step(sched, o, x, t, t_prev, n, objective="pred_noise", eta=0.5, backend=backend)
        assert out[0].stride() == out[1].stride() == x.stride()
        ref = reference.ddim_step(sched, o.double(), x.double(), t, t_prev, n.double(), "pred_noise", 0.5)
        native = in_low_precision(reference.ddim_step, sched, o, x, t, t_prev, n, "pred_noise", 0.5)
        check_step(out[:2], ref, dtype, native)


# (the kernels only: the reference backend computes σ = η √(…(1 − ᾱ_t/ᾱ_prev)) in float32, which cancels to
# ≈ 3e-5 relative error at η = 1; the kernels compute the per-sample scalars in float64)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objectives_eta_limits(sched, objective, backend):
    for eta, clip, threshold, rederive in itertools.product((0.0, 1.0), (True, False), (None, (0.9, 1.5)),
                                                            (True, False)):
        x, o, n, t = data((3, 2, 5, 7), scale=2), data((3, 2, 5, 7)), data((3, 2, 5, 7)), timesteps(3)
        t_prev = torch.tensor([-1, 0, 949])
        out = ddim_step(sched, o, x, t, t_prev, n, objective=objective, eta=eta, clip_denoised=clip,
                        threshold=threshold, rederive_noise=rederive, backend=backend)
        ref = reference.ddim_step(sched, o.double(), x.double(), t, t_prev, n.double(), objective, eta, clip,
                                  threshold, rederive)
        check_step(out[:2], ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drawn_noise_and_final_alpha(sched, backend):
    x, o, t, seed = data((2, 3, 4, 4)), data((2, 3, 4, 4)), torch.tensor([10, 500]), torch.tensor([77])
    t_prev = torch.tensor([-1, 480])
    out = ddim_step(sched, o, x, t, t_prev, seed=seed, eta=0.8, final_alpha_cumprod=0.9999, write_noise=True,
                    backend=backend)
    assert close_to_stream(out[2], philox_noise_like(x, seed, 0))
    ref = reference.ddim_step(sched, o.double(), x.double(), t, t_prev, out[2].double(), eta=0.8,
                              final_alpha_cumprod=0.9999)
    check_step(out[:2], ref, torch.float32)
    # η = 0: deterministic, no noise drawn or written
    det = ddim_step(sched, o, x, t, t_prev, eta=0.0, write_noise=True, backend=backend)
    assert det[2].numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_timesteps(sched, backend):
    """t as an expanded (stride 0) or strided view reads the right value for every sample."""
    x, o, n = data((4, 2, 3, 3)), data((4, 2, 3, 3)), data((4, 2, 3, 3))
    for t in (torch.tensor(7).expand(4), torch.arange(8)[::2] * 100):
        ref_t = t.contiguous()
        assert torch.equal(ddim_step(sched, o, x, t, t - 1, n, eta=1.0, backend=backend)[0],
                           ddim_step(sched, o, x, ref_t, ref_t - 1, n, eta=1.0, backend=backend)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_element_is_written(sched, backend, poisoned):
    outs = []
    for shape, cl in (((3, 1, 7, 5), False), ((2, 3, 5, 5), True), ((5, 2, 9), False)):
        x, o, t = data(shape, channels_last=cl), data(shape, channels_last=cl), timesteps(shape[0])
        outs += ddim_step(sched, o, x, t, (t - 7).clamp(min=-1), seed=torch.tensor([1]), eta=1.0,
                          write_noise=True, backend=backend)
    assert all(out.numel() and torch.isfinite(out).all() for out in outs)


@needs_ops
def test_tables_are_read_in_place_in_float32_float64_or_strided(sched):
    """The C++ kernel reads float32 and float64 tables, and strided 2-D ones, where they lie: float64 tables
    that hold the float32 values give the same bits."""
    ops = torch.ops.fastddpm
    x, o, n, t = data((3, 2, 5, 5)), data((3, 2, 5, 5)), data((3, 2, 5, 5)), timesteps(3)
    table = sched.reverse_table()
    column_major = table.t().contiguous().t()
    assert not column_major.is_contiguous()
    t_prev = (t - 300).clamp(min=-1)
    ac = sched.alphas_cumprod
    for other in (table.double(), column_major):
        rest = (n, None, 0, 2, 0.5, 1.0, None, None, True, True, False)
        for a, b in zip(ops.ddim_step(o, x, t, t_prev, table, ac, *rest),
                        ops.ddim_step(o, x, t, t_prev, other, ac.double(), *rest)):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- the op
@needs_ops
def test_opcheck(sched):
    """Schema, fake, and the device's kernel (C++ on a CPU; on a GPU the Triton implementation registered for
    "cuda")."""
    ops, table = torch.ops.fastddpm, sched.reverse_table()
    for dtype, cl in ((torch.float32, False), (torch.float64, False), (torch.float32, True),
                      (torch.bfloat16, False)):
        x, n = data((3, 2, 5, 5), dtype, cl), data((3, 2, 5, 5), dtype, cl)
        t, seed = timesteps(3), torch.tensor([3])
        ac = sched.alphas_cumprod
        for args in [(n, x, t, t - 1, table, ac, n, None, 0, 2, 0.5, 1.0, None, None, True, True, False),
                     (n, x, t, t - 1, table, ac, None, seed, 0, 1, 1.0, 1.0, 1.0, None, True, False, True)]:
            torch.library.opcheck(ops.ddim_step.default, args)


@needs_ops
def test_compile_fullgraph_traces_the_entry_points(sched):
    """torch.compile(fullgraph=True) traces an ancestral then a DDIM step on the backend the device defaults
    to."""
    def sample(o, x, t):
        with torch.no_grad():
            a = p_sample_step(sched, o, x, t, seed=torch.tensor([3]), check=False)[0]
            return ddim_step(sched, o, a, t, t - 1, eta=0.5, seed=torch.tensor([4]), check=False)[0]

    x, o, t = data((2, 3, 6, 6)), data((2, 3, 6, 6)), timesteps(2)
    compiled = torch.compile(sample, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(o, x, t), sample(o, x, t))


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton here (no GPU, no TRITON_INTERPRET=1)")
def test_triton_backend_runs_the_triton_kernel(sched, monkeypatch):
    """backend='triton' launches the Triton kernel, eagerly or (CUDA tensors under a dispatch mode) through
    the op, whose CUDA kernel is the same implementation: the same results either way."""
    from fastddpm.kernels import reverse_step as kernels

    x, o, t = data((3, 2, 5, 7)), data((3, 2, 5, 7)), timesteps(3)
    t_prev = (t - 5).clamp_min(-1)
    check_triton_path(monkeypatch, kernels, "launch_ddim",
                      lambda: ddim_step(sched, o, x, t, t_prev, backend="triton"), "ddim_step")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.isolated
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_clear_errors(sched, backend):
    x, n, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0, 5])
    with pytest.raises(ValueError, match=r"timesteps must lie in \[-1, 1000\), got -2"):
        ddim_step(sched, x, x, t, torch.tensor([-2, 0]), n, backend=backend)
    with pytest.raises(ValueError, match="unknown objective 'eps'"):
        ddim_step(sched, x, x, t, t - 1, n, objective="eps", backend=backend)
    table, ac, op = sched.reverse_table(), sched.alphas_cumprod, impl(backend)
    cases = [
        ("eta must be >= 0",
         lambda: op(x, x, t, t, table, ac, n, None, 0, 0, -0.5, 1.0, None, None, True, False, False)),
        ("with eta > 0|give exactly one of noise and seed",
         lambda: op(x, x, t, t, table, ac, None, None, 0, 0, 0.5, 1.0, None, None, True, False, False)),
        ("alphas_cumprod and table must cover the same timesteps",
         lambda: op(x, x, t, t, table, ac[:500], n, None, 0, 0, 0.5, 1.0, None, None, True, False, False)),
        (r"table table must be \[4, T\]",
         lambda: op(x, x, t, t, table[:3], ac, n, None, 0, 0, 0.5, 1.0, None, None, True, False, False)),
    ]
    if backend == "cpp":  # (the C++ kernel reads t on the host: the op itself names the bad value)
        cases.append((r"timesteps must lie in \[-1, 1000\), got t_prev\[0\] = -2",
                      lambda: op(x, x, t, torch.tensor([-2, 0]), table, ac, None, None, 0, 0, 0.0, 1.0, None,
                                 None, True, False, False)))
    for message, call in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
