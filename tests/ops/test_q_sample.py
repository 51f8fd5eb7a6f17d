"""q_sample (fastddpm/ops/q_sample.py, csrc/cpu/q_sample.cpp, kernels/q_sample.py) on every backend present,
against fastddpm.reference in float64: ε given or drawn in-kernel (the Philox stream of fastddpm.contracts),
layouts, gradients, the one op's fake and autograd (opcheck), and bad inputs."""
import pytest
import torch

from fastddpm import _extension, reference
from fastddpm.ops.q_sample import philox_noise_like, q_sample
from fastddpm.schedules import NoiseSchedule, get_beta_schedule

from ..conftest import rel_err
from ..kernel_grid import T, close_to_stream, data, in_low_precision, layouts, on_grid, timesteps, tolerance
from .conftest import OpLog, backends_present, device

BACKENDS = backends_present("q_sample")
DEVICE = device()
needs_op = pytest.mark.skipif(_extension.load() is None, reason="fastddpm._C is not built")
needs_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="no C++ kernel of q_sample for this device")
needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="Triton needs CUDA or TRITON_INTERPRET=1")
by_backend = pytest.mark.parametrize("backend", BACKENDS)


def tables(sched):
    return sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod


# ----------------------------------------------------------------------------- values on the grid
@by_backend
@on_grid
def test_given_noise(sched, backend, shape, dtype):
    with torch.device(DEVICE):
        for cl in layouts(shape):
            x, n, t = data(shape, dtype, cl), data(shape, dtype, cl), timesteps(shape[0])
            out = q_sample(sched, x, t, n, backend=backend)
            ref = reference.q_sample(sched, x.double(), t, n.double())
            assert out.dtype == dtype and out.shape == x.shape
            if backend != "reference":  # (the reference's layout is PyTorch's broadcasting's)
                assert out.stride() == x.stride()  # the layout is kept
            native = in_low_precision(reference.q_sample, sched, x, t, n)
            assert rel_err(out, ref) <= tolerance(ref, dtype, native=native)


@by_backend
@on_grid
def test_drawn_noise(sched, backend, shape, dtype):
    with torch.device(DEVICE):
        for cl in layouts(shape):
            x, t, seed = data(shape, dtype, cl), timesteps(shape[0]), torch.randint(0, 2**62, (1,))
            out, eps = q_sample(sched, x, t, seed=seed, offset=17, write_noise=True, backend=backend)
            assert out.dtype == eps.dtype == dtype and out.shape == x.shape
            assert out.stride() == eps.stride() == x.stride()
            # the ε written is the reference Philox stream, and x_t is q_sample with it
            expected = philox_noise_like(x, seed, 17)
            assert close_to_stream(eps, expected)
            ref = reference.q_sample(sched, x.double(), t, expected.double())
            native = in_low_precision(reference.q_sample, sched, x, t, expected.to(dtype))
            assert rel_err(out, ref) <= tolerance(ref, dtype, native=native)
            out2, none = q_sample(sched, x, t, seed=seed, offset=17, backend=backend)
            assert none.numel() == 0 and torch.equal(out2, out)  # same (seed, offset) → same noise


@by_backend
def test_odd_layout_is_made_dense(sched, backend):
    """Inputs that are not batch-outer dense: outputs come back contiguous, with the values of dense
    inputs."""
    with torch.device(DEVICE):
        x = torch.randn(4, 6, 5, 3)[:, ::2]  # not dense
        n, t, seed = torch.randn_like(x), timesteps(4), torch.tensor([4])
        out = q_sample(sched, x, t, n, backend=backend)
        assert rel_err(out, reference.q_sample(sched, x.double(), t, n.double())) < 1e-6
        out, eps = q_sample(sched, x, t, seed=seed, write_noise=True, backend=backend)
        assert out.is_contiguous() and eps.is_contiguous()
        assert rel_err(out, reference.q_sample(sched, x.double(), t, eps.double())) < 1e-6


@by_backend
def test_strided_timesteps(sched, backend):
    """t as an expanded (stride 0) or strided view reads the right value for every sample."""
    with torch.device(DEVICE):
        x, n = data((4, 2, 3, 3)), data((4, 2, 3, 3))
        for t in (torch.tensor(7).expand(4), torch.arange(8)[::2] * 100):
            assert torch.equal(q_sample(sched, x, t, n, backend=backend),
                               q_sample(sched, x, t.contiguous(), n, backend=backend))


@by_backend
def test_tables_are_read_in_float32_or_float64(sched, backend):
    """float64 tables that hold the float32 values give the same bits."""
    with torch.device(DEVICE):
        x, n, t, seed = data((3, 2, 5, 5)), data((3, 2, 5, 5)), timesteps(3), torch.tensor([9])
        sched64 = NoiseSchedule(get_beta_schedule("linear", T)).to(DEVICE)
        sched64.sqrt_alphas_cumprod = sched.sqrt_alphas_cumprod.double()
        sched64.sqrt_one_minus_alphas_cumprod = sched.sqrt_one_minus_alphas_cumprod.double()
        assert torch.equal(q_sample(sched, x, t, n, backend=backend),
                           q_sample(sched64, x, t, n, backend=backend))
        assert torch.equal(q_sample(sched, x, t, seed=seed, offset=3, backend=backend)[0],
                           q_sample(sched64, x, t, seed=seed, offset=3, backend=backend)[0])


# ----------------------------------------------------------------------------- the noise stream
@by_backend
def test_noise_statistics_and_streams(sched, backend):
    with torch.device(DEVICE):
        x, t = torch.zeros(8, 4, 32, 32), torch.zeros(8, dtype=torch.long)
        seed = torch.tensor([123456789])

    def eps(seed, offset):
        return q_sample(sched, x, t, seed=seed, offset=offset, write_noise=True, backend=backend)[1].flatten()

    a = eps(seed, 0)
    n = a.numel()
    assert abs(a.mean().item()) < 4 / n**0.5 and abs(a.var().item() - 1) < 4 * (2 / n) ** 0.5
    assert abs(((a - a.mean()) ** 4).mean().item() / a.var().item() ** 2 - 3) < 0.1  # Gaussian kurtosis
    assert torch.equal(a, eps(seed, 0))
    for b in (eps(seed + 1, 0), eps(seed, 1), eps(seed, n // 4)):
        assert not torch.equal(a, b)
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 4 / n**0.5
    # advancing the offset by one call's counters continues the stream: call 2 = the second half of one call
    # over twice the batch
    half = q_sample(sched, x[:4], t[:4], seed=seed, offset=4 * (x[0].numel() // 4), write_noise=True,
                    backend=backend)[1]
    assert torch.equal(half.flatten(), a[n // 2:])


@by_backend
def test_noise_is_the_reference_stream_for_any_key_and_counter(sched, backend):
    """Seeds with both key words set, offsets that carry into the counter's high word, odd sample sizes."""
    with torch.device(DEVICE):
        x = torch.zeros(3, 5, 7, 3)
        t = torch.zeros(3, dtype=torch.long)
        for seed, offset in ((0, 0), (2**62 + 12345, 3), (-7, 2**32 - 60), (1, 2**40 + 1)):
            seed = torch.tensor([seed])
            eps = q_sample(sched, x, t, seed=seed, offset=offset, write_noise=True, backend=backend)[1]
            assert close_to_stream(eps, philox_noise_like(x, seed, offset))
        big = torch.zeros(16, 3, 64, 64)  # 196608 normals: the tails of the distribution
        eps = q_sample(sched, big, torch.zeros(16, dtype=torch.long), seed=torch.tensor([99]),
                       write_noise=True, backend=backend)[1]
        expected = philox_noise_like(big, torch.tensor([99]), 0)
    slack = 4e-6 if DEVICE.type == "cuda" else 2e-6  # (close_to_stream's bound on a GPU)
    assert close_to_stream(eps, expected) and (eps - expected).abs().max() <= slack
    n = eps.numel()
    assert abs(eps.mean().item()) < 4 / n**0.5 and abs(eps.var().item() - 1) < 4 * (2 / n) ** 0.5


@needs_cpp
@needs_triton
def test_cpp_and_triton_draw_the_same_noise(sched):
    """The same (seed, offset) gives the same ε in the C++ kernel and in the Triton kernel (interpreter)."""
    x, t = data((3, 2, 9, 5)), timesteps(3)
    for seed, offset in ((torch.tensor([42]), 0), (torch.tensor([2**61 + 3]), 2**32 - 10)):
        cpp = q_sample(sched, x, t, seed=seed, offset=offset, write_noise=True, backend="cpp")
        tri = q_sample(sched, x, t, seed=seed, offset=offset, write_noise=True, backend="triton")
        assert (cpp[1] - tri[1]).abs().max() <= 1e-6
        assert (cpp[0] - tri[0]).abs().max() <= 2e-6


# ----------------------------------------------------------------------------- outputs, threads
@by_backend
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted", "strided", "3d"])
def test_every_output_element_is_written(sched, backend, layout, poisoned):
    with torch.device(DEVICE):
        base = torch.randn(5, 4, 7, 6)
        x = {"contiguous": torch.randn(3, 1, 7, 5),
             "channels_last": base.to(memory_format=torch.channels_last),
             "permuted": base.transpose(0, 1).contiguous().transpose(0, 1),
             "strided": torch.randn(5, 8, 7, 6)[:, ::2],
             "3d": torch.randn(5, 2, 9)}[layout]
        n, t, seed = torch.randn(x.shape), timesteps(x.shape[0]), torch.tensor([1])
    outs = [q_sample(sched, x, t, n, backend=backend),
            *q_sample(sched, x, t, seed=seed, offset=5, write_noise=True, backend=backend)]
    assert all(torch.isfinite(out).all() for out in outs)


@needs_cpp
def test_results_do_not_depend_on_the_thread_count(sched):
    x, n, t, seed = data((6, 3, 61, 67)), data((6, 3, 61, 67)), timesteps(6), torch.tensor([31337])
    threads = torch.get_num_threads()
    outs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            outs.append([q_sample(sched, x, t, n, backend="cpp"),
                         *q_sample(sched, x, t, seed=seed, offset=5, write_noise=True, backend="cpp")])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@by_backend
def test_out_of_range_t_without_the_host_check(sched, backend):
    """check=False (as in sampling loops): the Triton kernels and the reference clamp a bad t into the table
    (finite output, no crash); the C++ kernel checks t itself."""
    with torch.device(DEVICE):
        x, n, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([-5, 10**9])
        if backend == "cpp":
            with pytest.raises(RuntimeError, match="out of range"):
                q_sample(sched, x, t, n, backend=backend, check=False)
            return
        assert torch.isfinite(q_sample(sched, x, t, n, backend=backend, check=False)).all()


# ----------------------------------------------------------------------------- gradients and autograd
@by_backend
def test_gradients_match_the_reference(sched, backend):
    with torch.device(DEVICE):
        sched64 = NoiseSchedule(get_beta_schedule("cosine", 100)).to(DEVICE)
        x = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
        n = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
        t = torch.tensor([0, 41, 99])
        small = (x[:2, :1, :2, :3].detach().clone().requires_grad_(True),
                 n[:2, :1, :2, :3].detach().clone().requires_grad_(True))
        assert torch.autograd.gradcheck(lambda a, b: q_sample(sched64, a, t[:2], b, backend=backend), small)
        g = torch.randn_like(x)
        gx, gn = torch.autograd.grad(q_sample(sched64, x, t, n, backend=backend), (x, n), g)
        rx, rn = torch.autograd.grad(reference.q_sample(sched64, x, t, n), (x, n), g)
    assert rel_err(gx, rx) < 1e-12 and rel_err(gn, rn) < 1e-12


@by_backend
def test_no_grad_and_grad_paths_agree(sched, backend):
    """The paths that skip autograd (no grad mode, no input requiring grad) give the same values; with an
    input requiring grad the gradient still flows, for a given and for a drawn ε."""
    with torch.device(DEVICE):
        x, n, t, seed = data((2, 3, 6, 6)), data((2, 3, 6, 6)), timesteps(2), torch.tensor([3])
        with_grad = q_sample(sched, x, t, n, backend=backend)
        with torch.no_grad():
            assert torch.equal(q_sample(sched, x, t, n, backend=backend), with_grad)
        expected = reference.extract(sched.sqrt_alphas_cumprod, t, x).expand_as(x).float()
        xg = x.clone().requires_grad_(True)
        out = q_sample(sched, xg, t, n, backend=backend)
        assert out.requires_grad and torch.equal(out.detach(), with_grad)
        assert torch.equal(torch.autograd.grad(out.sum(), xg)[0], expected)
        drawn = q_sample(sched, x, t, seed=seed, backend=backend)[0]
        out, _ = q_sample(sched, xg, t, seed=seed, backend=backend)
        assert out.requires_grad and torch.equal(out.detach(), drawn)
        assert torch.equal(torch.autograd.grad(out.sum(), xg)[0], expected)


@by_backend
def test_torch_func_grad(sched, backend):
    """torch.func transforms: the C++ choice runs the reference (functorch refuses register_autograd's
    autograd), Triton its autograd.Function (which has the setup_context functorch asks for)."""
    with torch.device(DEVICE):
        x, n, t = data((3, 2, 5, 7)), data((3, 2, 5, 7)), timesteps(3)
        grad = torch.func.grad(lambda x: q_sample(sched, x, t, n, backend=backend).sum())(x)
        assert torch.equal(grad, reference.extract(sched.sqrt_alphas_cumprod, t, x).expand_as(x).float())


@needs_op
def test_opcheck_the_op(sched):
    """The one op's schema, fake (its layout contract included), autograd and AOT dispatch, on its kernel for
    this device (C++ on a CPU, the Triton implementation on a GPU)."""
    op = torch.ops.fastddpm.q_sample.default
    with torch.device(DEVICE):
        for dtype, cl in ((torch.float32, False), (torch.float64, False), (torch.float32, True),
                          (torch.bfloat16, False)):
            x, n, t, seed = data((3, 2, 5, 5), dtype, cl), data((3, 2, 5, 5), dtype, cl), timesteps(3), \
                torch.tensor([3])
            xg, ng = x.clone().requires_grad_(True), n.requires_grad_(True)
            for args in ((xg, t, *tables(sched), ng, None, 0, False),
                         (x, t, *tables(sched), None, seed, 7, True),
                         (xg, t, *tables(sched), None, seed, 0, False)):
                torch.library.opcheck(op, args)
        torch.library.opcheck(op, (data((4, 7)), timesteps(4), *tables(sched), data((4, 7)), None, 0, False))
        permuted = torch.randn(6, 3, 5, 4).transpose(0, 1)  # dense, batch not outermost: made contiguous
        t = timesteps(3)
        torch.library.opcheck(op, (permuted, t, *tables(sched), torch.randn(3, 6, 5, 4), None, 0, False))
        assert op(permuted, t, *tables(sched), None, torch.tensor([1]), 0, False)[0].is_contiguous()


@needs_triton
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted", "strided"])
def test_triton_outputs_have_the_layout_of_the_fake(sched, layout):
    """The Triton implementation (the op's CUDA kernel) returns what the fake says (opcheck runs it only on
    a GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastddpm.ops.q_sample import _fake, _q_sample_triton

    with torch.device(DEVICE):
        base = torch.randn(3, 4, 5, 6)
        x = {"contiguous": base, "channels_last": base.to(memory_format=torch.channels_last),
             "permuted": torch.randn(4, 3, 5, 6).transpose(0, 1),
             "strided": torch.randn(3, 8, 5, 6)[:, ::2]}[layout]
        args, noise, seed = (x, timesteps(3), *tables(sched)), torch.randn(x.shape), torch.tensor([2])
    for rest in ((noise, None, 0, False), (None, seed, 0, True), (None, seed, 0, False)):
        real = _q_sample_triton(*args, *rest)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = _fake(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in (*args, *rest)))
        for r, f in zip(real, fake):
            assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)


@needs_triton
def test_triton_eager_path_equals_the_autograd_path(sched):
    """The Triton implementation called plainly (no input requires grad) and through the autograd.Function
    built from the op's setup_context/backward (an input requires grad) give the same values."""
    with torch.device(DEVICE):
        x, n, t, seed = data((3, 2, 5, 7)), data((3, 2, 5, 7)), timesteps(3), torch.tensor([11])
        xg = x.clone().requires_grad_(True)
        assert torch.equal(q_sample(sched, x, t, n, backend="triton"),
                           q_sample(sched, xg, t, n, backend="triton").detach())
        for a, b in zip(q_sample(sched, x, t, seed=seed, write_noise=True, backend="triton"),
                        q_sample(sched, xg, t, seed=seed, write_noise=True, backend="triton")):
            assert torch.equal(a, b.detach())


@pytest.mark.cuda
@needs_op
def test_cuda_eager_path_equals_the_op_and_what_must_see_the_op_goes_through_it(sched):
    """On a GPU the op's kernel is the Triton implementation: called directly in eager mode (no dispatcher),
    it gives the op's values; under a dispatch mode the call goes through the op."""
    x, n, t, seed = (data((3, 2, 5, 7)).cuda(), data((3, 2, 5, 7)).cuda(), timesteps(3).cuda(),
                     torch.tensor([11], device="cuda"))
    ops = torch.ops.fastddpm
    assert torch.equal(q_sample(sched, x, t, n, backend="triton"),
                       ops.q_sample(x, t, *tables(sched), n, None, 0, False)[0])
    for a, b in zip(q_sample(sched, x, t, seed=seed, write_noise=True, backend="triton"),
                    ops.q_sample(x, t, *tables(sched), None, seed, 0, True)):
        assert torch.equal(a, b)
    with OpLog() as log:
        q_sample(sched, x, t, n, backend="triton")
    assert any("fastddpm.q_sample" in op for op in log.ops)


@needs_op
def test_compile_fullgraph_traces_the_op(sched):
    """The fake lets torch.compile trace through fastddpm::q_sample (ε given and drawn) without graph
    breaks."""
    with torch.device(DEVICE):
        x, n, t, seed = data((3, 2, 5, 5)), data((3, 2, 5, 5)), timesteps(3), torch.tensor([5])

    def f(x, n):
        given = torch.ops.fastddpm.q_sample(x, t, *tables(sched), n, None, 0, False)[0]
        drawn, eps = torch.ops.fastddpm.q_sample(x, t, *tables(sched), None, seed, 3, True)
        return given * 2 + drawn, eps

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x, n), f(x, n)):
        assert rel_err(a, b) < 1e-7


# ----------------------------------------------------------------------------- bad input
@pytest.mark.isolated
@by_backend
def test_bad_input_raises_clear_errors(sched, backend):
    with torch.device(DEVICE):
        x, n, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0, 5])
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\), got 1000"):
        q_sample(sched, x, torch.tensor([0, 1000], device=DEVICE), n, backend=backend)
    if backend == "reference":
        return  # (the reference's own errors are PyTorch's)
    with pytest.raises(RuntimeError, match="x_start must be .*float.*got .*(Long|int64)"):
        q_sample(sched, x.long(), t, seed=torch.tensor([1], device=DEVICE), backend=backend)
    with pytest.raises(RuntimeError, match=r"t must be int64"):
        q_sample(sched, x, t.int(), seed=torch.tensor([1], device=DEVICE), backend=backend)
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor"):
        q_sample(sched, x, t, seed=torch.tensor([1.0], device=DEVICE), backend=backend)
    if backend == "triton":
        with pytest.raises(RuntimeError,
                           match="x_start must be float16, bfloat16, float32 or float64, got torch.int64"):
            q_sample(sched, x.long(), t, n, backend=backend)
        with pytest.raises(RuntimeError, match=r"noise has shape \(2, 3, 4, 5\), expected \(2, 3, 4, 4\)"):
            q_sample(sched, x, t, torch.randn(2, 3, 4, 5, device=DEVICE), backend=backend)
        with pytest.raises(RuntimeError, match=r"t must be int64 of shape \[2\]"):
            q_sample(sched, x, t.int(), n, backend=backend)


@needs_op
@pytest.mark.isolated
def test_the_op_refuses_bad_arguments(sched):
    ops = torch.ops.fastddpm
    with torch.device(DEVICE):
        x, n = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        t, seed = torch.tensor([0, 5]), torch.tensor([1])
    a, s = tables(sched)
    cases = [
        ("give exactly one of noise and seed", lambda: ops.q_sample(x, t, a, s, n, seed, 0, False)),
        ("give exactly one of noise and seed", lambda: ops.q_sample(x, t, a, s, None, None, 0, False)),
        (f"table sqrt_alphas_cumprod is on meta, the data on {DEVICE.type}",  # (meta tensors meet the fake)
         lambda: ops.q_sample(x, t, a.to("meta"), s, n, None, 0, False)),
        (f"noise is on meta, the data on {DEVICE.type}",
         lambda: ops.q_sample(x, t, a, s, n.to("meta"), None, 0, False)),
        (f"seed is on meta, the data on {DEVICE.type}",
         lambda: ops.q_sample(x, t, a, s, None, seed.to("meta"), 0, True)),
        ("seed must be an int64 tensor",
         lambda: ops.q_sample(x, t, a, s, None, torch.tensor([1.0], device=DEVICE), 0, False)),
        ("table sqrt_alphas_cumprod must be float32 or float64",
         lambda: ops.q_sample(x, t, a.half(), s, None, seed, 0, False)),
    ]
    if DEVICE.type == "cpu":  # the C++ kernel's words (on a GPU the Triton implementation's, tested above)
        cases += [
            (r"timesteps must lie in \[0, 1000\), got t\[1\] = 1000",
             lambda: ops.q_sample(x, torch.tensor([0, 1000]), a, s, None, seed, 0, False)),
            ("x_start must be float16, bfloat16, float32 or float64, got Long",
             lambda: ops.q_sample(x.long(), t, a, s, None, seed, 0, False)),
            (r"t must be int64 of shape \[2\]", lambda: ops.q_sample(x, t.int(), a, s, None, seed, 0, False)),
        ]
    for message, call in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
