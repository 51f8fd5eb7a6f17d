"""fastddpm::p_sample_step, the ancestral step, on every backend present (tests/ops/conftest.py), against
fastddpm.reference in float64; the stacked table it reads (NoiseSchedule.reverse_table, rows
contracts.REVERSE_TABLE); the one op (opcheck, CUDA kernel = the Triton implementation)."""
import pytest
import torch

from fastddpm import _extension, contracts, reference
from fastddpm.ops import reverse_step
from fastddpm.ops.q_sample import philox_noise_like
from fastddpm.ops.reverse_step import p_sample_step
from fastddpm.schedules import NoiseSchedule, get_beta_schedule

from ..conftest import rel_err
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

BACKENDS = backends_present("p_sample_step")
needs_ops = pytest.mark.skipif(not _extension.cpu_built(),
                               reason="fastddpm._C is not built: the op does not exist")


pytestmark = pytest.mark.usefixtures("tensors_on_device")


def impl(backend):
    """The implementation a backend runs, called with the op's arguments."""
    if backend == "cpp":
        return torch.ops.fastddpm.p_sample_step
    if backend == "triton":
        return reverse_step._p_sample_step_triton
    return reverse_step._p_sample_step_reference


# ----------------------------------------------------------------------------- the table
def test_reverse_table_rows_are_the_contracts_rows():
    """Row r of the stacked table is contracts.REVERSE_TABLE[r] (sigma: √ of the variance's table)."""
    sched = NoiseSchedule(get_beta_schedule("cosine", 50), dtype=torch.float64)
    for variance, var in (("fixed_small", sched.posterior_variance), ("fixed_large", sched.betas)):
        table = sched.reverse_table(variance)
        assert table.shape == (contracts.REVERSE_TABLE_ROWS, 50)
        for row, name in enumerate(contracts.REVERSE_TABLE):
            want = var.sqrt() if name == "sigma" else getattr(sched, name)
            torch.testing.assert_close(table[row], want, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("backend", BACKENDS)
@on_grid
def test_shapes_dtypes_layouts(sched, shape, dtype, backend):
    for cl in layouts(shape):
        x, o, n = data(shape, dtype, cl, 2), data(shape, dtype, cl), data(shape, dtype, cl)
        t = timesteps(shape[0])
        x_prev, x0, none = p_sample_step(sched, o, x, t, n, objective="pred_v", write_noise=True,
                                         backend=backend)
        assert x_prev.stride() == x0.stride() == x.stride() and none.numel() == 0  # noise given: not written
        ref = reference.p_sample_step(sched, o.double(), x.double(), t, n.double(), "pred_v")
        native = in_low_precision(reference.p_sample_step, sched, o, x, t, n, "pred_v")
        check_step((x_prev, x0), ref, dtype, native)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_objectives_variances_limits(sched, objective, variance, backend):
    for clip, threshold in ((True, None), (False, None), (2.5, None), (True, (0.9, 1.5))):
        x, o, n, t = data((4, 3, 5, 6), scale=2), data((4, 3, 5, 6)), data((4, 3, 5, 6)), timesteps(4)
        out = p_sample_step(sched, o, x, t, n, objective=objective, variance=variance, clip_denoised=clip,
                            threshold=threshold, backend=backend)
        ref = reference.p_sample_step(sched, o.double(), x.double(), t, n.double(), objective, variance, clip,
                                      threshold)
        check_step(out[:2], ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drawn_noise_and_t0(sched, backend):
    x, o, t, seed = data((4, 3, 6, 6)), data((4, 3, 6, 6)), timesteps(4), torch.tensor([9])
    x_prev, x0, z = p_sample_step(sched, o, x, t, seed=seed, offset=11, write_noise=True, backend=backend)
    assert close_to_stream(z, philox_noise_like(x, seed, 11))
    ref = reference.p_sample_step(sched, o.double(), x.double(), t, z.double())
    check_step((x_prev, x0), ref, torch.float32)
    # t = 0 (sample 0): x_{t−1} is the posterior mean alone, whatever z
    mean0 = (sched.posterior_mean_coef1[0].double() * x0[0].double()
             + sched.posterior_mean_coef2[0].double() * x[0])
    assert rel_err(x_prev[0], mean0) < 1e-6 and rel_err(x_prev[0], ref[0][0]) < 1e-6
    _, x0_none, z_none = p_sample_step(sched, o, x, t, seed=seed, write_x0=False, backend=backend)
    assert x0_none.numel() == 0 and z_none.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_data(sched, backend):
    x, o, n = (torch.randn(3, 2, 5, 5, dtype=torch.float64) for _ in range(3))
    t = timesteps(3)
    out = p_sample_step(sched, o, x, t, n, objective="pred_x0", clip_denoised=False, backend=backend)
    ref = reference.p_sample_step(sched, o, x, t, n, "pred_x0", clip_denoised=False)
    assert out[0].dtype == torch.float64 and rel_err(out[0], ref[0]) < 1e-6  # the tables are float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_layout_is_made_dense(sched, backend):
    """Inputs that are not batch-outer dense: outputs come back contiguous."""
    x, o = torch.randn(4, 6, 5, 3)[:, ::2], torch.randn(4, 6, 5, 3)[:, ::2]  # not dense
    n, t = torch.randn(4, 3, 5, 3), timesteps(4)
    x_prev, x0, _ = p_sample_step(sched, o, x, t, n, backend=backend)
    assert x_prev.is_contiguous() and x0.is_contiguous()
    ref = reference.p_sample_step(sched, o.double(), x.double(), t, n.double())
    check_step((x_prev, x0), ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_timesteps(sched, backend):
    """t as an expanded (stride 0) or strided view reads the right value for every sample."""
    x, o, n = data((4, 2, 3, 3)), data((4, 2, 3, 3)), data((4, 2, 3, 3))
    for t in (torch.tensor(7).expand(4), torch.arange(8)[::2] * 100):
        assert torch.equal(p_sample_step(sched, o, x, t, n, backend=backend)[0],
                           p_sample_step(sched, o, x, t.contiguous(), n, backend=backend)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_element_is_written(sched, backend, poisoned):
    outs = []
    for shape, cl in (((3, 1, 7, 5), False), ((2, 3, 5, 5), True), ((5, 2, 9), False)):
        x, o, t = data(shape, channels_last=cl), data(shape, channels_last=cl), timesteps(shape[0])
        outs += p_sample_step(sched, o, x, t, seed=torch.tensor([1]), write_noise=True, backend=backend)
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
    for other in (table.double(), column_major):
        for a, b in zip(ops.p_sample_step(o, x, t, table, n, None, 0, 0, 1.0, None, True, False),
                        ops.p_sample_step(o, x, t, other, n, None, 0, 0, 1.0, None, True, False)):
            assert torch.equal(a, b)


def test_drawn_noise_is_the_same_on_every_backend(sched):
    """The same (seed, offset) gives the same z on every backend present."""
    x, t = data((3, 2, 9, 5)), timesteps(3)
    pred = torch.randn_like(x)
    for seed, offset in ((torch.tensor([42]), 0), (torch.tensor([2**61 + 3]), 2**32 - 10)):
        zs = [p_sample_step(sched, pred, x, t, seed=seed, offset=offset, write_noise=True, backend=b)[2]
              for b in BACKENDS]
        for z in zs[1:]:
            assert close_to_stream(z, zs[0])


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
        for args in [(n, x, t, table, None, seed, 0, 0, 1.0, None, True, True),
                     (n, x, t, table, n, None, 0, 2, None, torch.rand(3) + 1, False, False)]:
            torch.library.opcheck(ops.p_sample_step.default, args)


@needs_ops
def test_compile_fullgraph_traces_the_entry_point(sched):
    """torch.compile(fullgraph=True) traces the entry point on the backend the device defaults to."""
    def sample(o, x, t):
        with torch.no_grad():
            return p_sample_step(sched, o, x, t, seed=torch.tensor([3]), check=False)[0]

    x, o, t = data((2, 3, 6, 6)), data((2, 3, 6, 6)), timesteps(2)
    compiled = torch.compile(sample, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(o, x, t), sample(o, x, t))


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton here (no GPU, no TRITON_INTERPRET=1)")
def test_triton_backend_runs_the_triton_kernel(sched, monkeypatch):
    """backend='triton' launches the Triton kernel, eagerly or (CUDA tensors under a dispatch mode) through
    the op, whose CUDA kernel is the same implementation: the same results either way."""
    from fastddpm.kernels import reverse_step as kernels

    x, o, t, seed = data((3, 2, 5, 7)), data((3, 2, 5, 7)), timesteps(3), torch.tensor([11])
    check_triton_path(monkeypatch, kernels, "launch_p_sample",
                      lambda: p_sample_step(sched, o, x, t, seed=seed, write_noise=True, backend="triton"),
                      "p_sample_step")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.isolated
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_clear_errors(sched, backend):
    x, n, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0, 5])
    with pytest.raises(ValueError, match="got -1"):
        p_sample_step(sched, x, x, torch.tensor([-1, 3]), n, backend=backend)
    with pytest.raises(ValueError, match="got 1000"):
        p_sample_step(sched, x, x, torch.tensor([0, 1000]), n, backend=backend)
    with pytest.raises(ValueError, match="unknown objective 'eps'"):
        p_sample_step(sched, x, x, t, n, objective="eps", backend=backend)
    table, op = sched.reverse_table(), impl(backend)
    cases = [
        (r"table must be \[7, T\]",
         lambda: op(x, x, t, sched.betas, n, None, 0, 0, None, None, False, False)),
        (r"threshold_scale must be a float tensor of shape \[2\]",
         lambda: op(x, x, t, table, n, None, 0, 0, None, torch.ones(3), False, False)),
        ("clip must be positive", lambda: op(x, x, t, table, n, None, 0, 0, -1.0, None, False, False)),
        ("give exactly one of noise and seed",
         lambda: op(x, x, t, table, n, torch.tensor([1]), 0, 0, None, None, False, False)),
        ("objective must be 0", lambda: op(x, x, t, table, n, None, 0, 3, None, None, False, False)),
        (r"model_output has shape .2, 3, 4, 5., expected .2, 3, 4, 4.",
         lambda: op(torch.randn(2, 3, 4, 5), x, t, table, n, None, 0, 0, None, None, False, False)),
    ]
    if backend == "cpp":  # (the C++ kernel reads t on the host: the op itself names the bad value)
        cases.append((r"got t\[1\] = 4000",
                      lambda: op(x, x, torch.tensor([0, 4000]), table, n, None, 0, 0, None, None, False,
                                 False)))
    for message, call in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
