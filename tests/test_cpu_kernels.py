"""The fused C++ CPU kernels (csrc/cpu/) against the float64 reference, on the grids of tests/test_kernels.py.

Every op is called through its C++ op (fastddpm::<op>) by forcing backend='cpp'; the checks tests/test_kernels.py
runs too are in tests/kernel_grid.py. The in-kernel noise is checked against fastddpm.reference.philox_normal and
against the Triton kernel's (through the interpreter) for the same (seed, offset); outputs must not depend on the
thread count; unwritten output elements show as NaN (PyTorch fills fresh tensors with NaN under
torch.use_deterministic_algorithms).
"""
import itertools

import pytest
import torch

from fastddpm import _extension, reference
from fastddpm.ops import new_seed
from fastddpm.ops.diffusion_loss import diffusion_loss, noised
from fastddpm.ops.q_sample import q_sample
from fastddpm.schedules import NoiseSchedule, get_beta_schedule

from . import kernel_grid as grid
from .conftest import needs_triton_interpreter, rel_err
from .kernel_grid import OBJECTIVES, T, data, timesteps

if not _extension.cpu_built() or not torch._C._dispatch_has_kernel_for_dispatch_key("fastddpm::ddim_step", "CPU"):
    pytest.skip("fastddpm._C without the C++ CPU kernels", allow_module_level=True)

ops = torch.ops.fastddpm
BACKEND, DEVICE = "cpp", "cpu"


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule(get_beta_schedule("linear", T))


# ----------------------------------------------------------------------------- noise (checks: kernel_grid)
@needs_triton_interpreter
def test_noise_matches_the_triton_kernel(sched):
    """The same (seed, offset) gives the same ε in the C++ kernel and in the Triton kernel (interpreter)."""
    x, t = data((3, 2, 9, 5)), timesteps(3)
    for seed, offset in ((torch.tensor([42]), 0), (torch.tensor([2**61 + 3]), 2**32 - 10)):
        # the loss regenerates the ε q_sample drew, in both
        pred = torch.randn_like(x)
        for objective in OBJECTIVES:
            a = diffusion_loss(sched, pred, x, t, seed=seed, offset=offset, objective=objective, backend="cpp")
            b = diffusion_loss(sched, pred, x, t, seed=seed, offset=offset, objective=objective, backend="triton")
            assert rel_err(a, b) <= 1e-5


def test_loss_regenerates_the_noise_q_sample_drew(sched):
    grid.check_loss_regenerates_the_noise_q_sample_drew(sched, BACKEND, DEVICE)


def test_noised_stores_eps_on_cpp_and_the_loss_equals_the_regenerated_one_bit_for_bit(sched):
    """fastddpm.ops.diffusion_loss.noised on the C++ CPU kernels: q_sample writes ε (float32/float64 x_0) and the
    loss reads it; loss and gradient equal those of the loss that regenerates ε from the key, bit for bit
    (a bfloat16 network output included)."""
    x, t = data((4, 3, 8, 8)), timesteps(4)
    for dtype, pred_dtype in ((torch.float32, torch.float32), (torch.float64, torch.float64),
                              (torch.float32, torch.bfloat16)):
        x0 = x.to(dtype)
        pred = torch.randn(x.shape).to(pred_dtype).requires_grad_(True)
        x_t, kwargs = noised(sched, x0, t, backend="cpp", generator=torch.Generator().manual_seed(5))
        assert list(kwargs) == ["noise"] and kwargs["noise"].dtype == dtype and not kwargs["noise"].requires_grad
        seed = new_seed("cpu", torch.Generator().manual_seed(5))  # the key noised drew
        assert torch.equal(x_t, q_sample(sched, x0, t, seed=seed, backend="cpp")[0])
        for objective, gamma, reduction in (("pred_noise", None, "mean"), ("pred_v", 5.0, "none"),
                                            ("pred_x0", 5.0, "mean")):
            args = dict(objective=objective, min_snr_gamma=gamma, reduction=reduction, backend="cpp")
            stored = diffusion_loss(sched, pred, x0, t, **kwargs, **args)
            regenerated = diffusion_loss(sched, pred, x0, t, seed=seed, **args)
            assert torch.equal(stored, regenerated)
            grads = [torch.autograd.grad(loss.sum(), pred)[0] for loss in (stored, regenerated)]
            assert torch.equal(*grads)
    # x_0 that requires grad: ε is detached, so no gradient flows into it (and none is computed for it)
    x0 = x.clone().requires_grad_(True)
    _, kwargs = noised(sched, x0, t, backend="cpp")
    assert not kwargs["noise"].requires_grad


@needs_triton_interpreter
def test_noised_regenerates_eps_for_low_precision_data_and_on_triton(sched):
    """float16/bfloat16 x_0 (a stored ε would be rounded) and the Triton kernels (GPUs) pass the key."""
    x, t = data((2, 3, 8, 8)), timesteps(2)
    for dtype in (torch.float16, torch.bfloat16):
        x_t, kwargs = noised(sched, x.to(dtype), t, backend="cpp", generator=torch.Generator().manual_seed(1))
        assert list(kwargs) == ["seed"]
        assert torch.equal(kwargs["seed"], new_seed("cpu", torch.Generator().manual_seed(1)))
        assert torch.equal(x_t, q_sample(sched, x.to(dtype), t, seed=kwargs["seed"], backend="cpp")[0])
    _, kwargs = noised(sched, x, t, backend="triton")  # on CPU tensors through the Triton interpreter
    assert list(kwargs) == ["seed"]


def test_diffusion_on_cpp_passes_the_stored_eps_to_the_loss(monkeypatch):
    """Diffusion's fused CPU path goes through noised: the loss gets ε (not a key) for float32 data, and the
    loss is the one the key would give."""
    import fastddpm.diffusion as diffusion_module
    from fastddpm import Diffusion

    from .conftest import TinyNet

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return diffusion_loss(*args, **kwargs)

    monkeypatch.setattr(diffusion_module, "_diffusion_loss_op", spy)
    d = Diffusion(TinyNet(timesteps=20), image_size=6, timesteps=20, beta_schedule="cosine", backend="cpp")
    x0, t = torch.rand(2, 3, 6, 6) * 2 - 1, torch.tensor([3, 17])
    torch.manual_seed(2)
    loss = d.p_losses(x0, t)
    assert calls[-1].get("noise") is not None and calls[-1].get("seed") is None
    torch.manual_seed(2)
    seed = new_seed("cpu")
    x_t = q_sample(d.schedule, x0, t, seed=seed, backend="cpp")[0]
    assert torch.equal(loss, diffusion_loss(d.schedule, d.model(x_t, t), x0, t, seed=seed, backend="cpp"))


# ----------------------------------------------------------------------------- loss
@grid.on_grid
def test_loss_shapes_dtypes_layouts(sched, shape, dtype):
    grid.check_loss_shapes_dtypes_layouts(sched, shape, dtype, BACKEND, DEVICE)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_objectives_weights_reductions(sched, objective):
    grid.check_loss_objectives_weights_reductions(sched, objective, BACKEND, DEVICE)


def test_loss_float64_and_gradients_reach_x_start_and_noise(sched):
    grid.check_loss_float64_and_gradients(sched, BACKEND, DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_loss_train_pair_keeps_the_backward_gradient(sched, dtype):
    """diffusion_loss_train: the loss of diffusion_loss and, from the same pass, the gradient that
    diffusion_loss_backward gives for an incoming gradient of one, bit for bit; through autograd (the entry
    point takes it for a CPU prediction that alone requires grad) any incoming gradient scales it."""
    tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    for shape, cl in (((3, 2, 5, 7), False), ((2, 3, 6, 6), True), ((4, 9), False)):
        x, o, n, t = data(shape, dtype, cl), data(shape, dtype, cl), data(shape, dtype, cl), timesteps(shape[0])
        seed = torch.tensor([29])
        for objective, gamma, reduction, given in itertools.product((0, 1, 2), (None, 5.0), (0, 1), (True, False)):
            args = (o, x, t, *tables, n if given else None, None if given else seed, 3, objective, gamma, reduction)
            loss, g = ops.diffusion_loss_train(*args)
            ones = torch.ones(()) if reduction == 1 else torch.ones(shape[0])
            assert torch.equal(loss, ops.diffusion_loss(*args))
            assert torch.equal(g, ops.diffusion_loss_backward(ones, *args)) and g.stride() == o.stride()
        name = {0: "pred_noise", 1: "pred_x0", 2: "pred_v"}
        for objective, reduction in itertools.product((0, 1, 2), ("mean", "none")):
            p = o.clone().requires_grad_(True)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                loss = diffusion_loss(sched, p, x, t, n, objective=name[objective], reduction=reduction,
                                      min_snr_gamma=5.0, backend="cpp")
            assert "fastddpm::diffusion_loss_train" in {e.name for e in prof.events()}
            grad_out = torch.rand_like(loss) + 0.5
            (grad,) = torch.autograd.grad(loss, p, grad_out)
            expected = ops.diffusion_loss_backward(grad_out, o, x, t, *tables, n, None, 0, objective, 5.0,
                                                   int(reduction == "mean"))
            assert rel_err(grad, expected) <= 4 * torch.finfo(dtype).eps  # one rounding more: scaled after
            # loss.backward() of a mean loss: the gradient the forward kept, as it is
            if reduction == "mean":
                (grad,) = torch.autograd.grad(diffusion_loss(sched, p, x, t, n, objective=name[objective],
                                                             min_snr_gamma=5.0, backend="cpp"), p)
                assert torch.equal(grad, ops.diffusion_loss_backward(torch.ones(()), o, x, t, *tables, n, None, 0,
                                                                     objective, 5.0, 1))


def test_loss_under_torch_func_grad_runs_the_reference(sched):
    """torch.func refuses the training op's C++ autograd Function: under torch.func.grad the entry point runs
    the reference (float64: its gradient to round-off)."""
    x, o, n = (data((3, 2, 5, 7), torch.float64) for _ in range(3))
    t = timesteps(3)
    for objective in OBJECTIVES:
        def loss(p):
            return diffusion_loss(sched, p, x, t, n, objective=objective, min_snr_gamma=5.0, backend="cpp")
        grad = torch.func.grad(loss)(o)
        leaf = o.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(reference.diffusion_loss(sched, leaf, x, t, n, objective, 5.0, "mean"),
                                          leaf)
        assert rel_err(grad, expected) <= 1e-12


def test_loss_train_pair_only_where_the_gradient_goes_to_the_prediction_alone(sched):
    x, o, n, t = data((2, 3, 4, 4)), data((2, 3, 4, 4)), data((2, 3, 4, 4)), timesteps(2)

    def ops_run(p, x0, noise, grad=True):
        with torch.set_grad_enabled(grad), \
                torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            diffusion_loss(sched, p, x0, t, noise, objective="pred_v", backend="cpp")
        return {e.name for e in prof.events()} & {"fastddpm::diffusion_loss", "fastddpm::diffusion_loss_train"}

    train, plain = {"fastddpm::diffusion_loss_train"}, {"fastddpm::diffusion_loss"}
    assert ops_run(o.requires_grad_(True), x, n) == train
    assert ops_run(o, x, n, grad=False) == plain
    assert ops_run(o.detach(), x, n) == plain
    assert ops_run(o, x.requires_grad_(True), n) == plain  # x_0 needs its gradient: the general backward
    assert ops_run(o, x.detach(), n.requires_grad_(True)) == plain
    assert ops_run(o.detach().bfloat16().requires_grad_(True), x.bfloat16(), n.detach().bfloat16()) == plain


def test_loss_mixed_dtypes_read_each_input_exactly(sched):
    """A bf16 network output against fp32 data: x_0 and ε are not rounded to bf16 on the way in."""
    x, t = data((3, 2, 6, 6)), timesteps(3)
    pred = data((3, 2, 6, 6), torch.bfloat16)
    n = data((3, 2, 6, 6))
    loss = diffusion_loss(sched, pred, x, t, n, objective="pred_v", backend="cpp")
    ref = reference.diffusion_loss(sched, pred.double(), x.double(), t, n.double(), "pred_v")
    assert loss.dtype == torch.float32 and rel_err(loss, ref) < 1e-6


def test_tables_are_read_in_place_in_float32_float64_or_strided(sched):
    """The per-sample table lookups read float32 and float64 tables where they lie: float64 tables that hold
    the float32 values give the same bits (the steps' 2-D tables: tests/ops/test_p_sample_step.py and
    test_ddim_step.py)."""
    x, o, n, t = data((3, 2, 5, 5)), data((3, 2, 5, 5)), data((3, 2, 5, 5)), timesteps(3)
    tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    tables64 = tuple(tab.double() for tab in tables)
    for objective in (0, 1, 2):
        assert torch.equal(ops.diffusion_loss(o, x, t, *tables, n, None, 0, objective, 5.0, 0),
                           ops.diffusion_loss(o, x, t, *tables64, n, None, 0, objective, 5.0, 0))


# ----------------------------------------------------------------------------- threads, poison, opcheck
def _every_op(sched, x, t, seed):
    o = torch.sin(x * 3)
    n = torch.cos(x * 5)
    tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    table = sched.reverse_table()
    g = torch.tensor(0.7)
    return [*(ops.diffusion_loss(o, x, t, *tables, None, seed, 5, obj, gamma, red)
              for obj, gamma, red in ((0, None, 1), (1, 5.0, 0), (2, 5.0, 1))),
            ops.diffusion_loss(o, x, t, *tables, n, None, 0, 2, None, 1),
            ops.diffusion_loss_backward(g, o, x, t, *tables, None, seed, 5, 2, 5.0, 1),
            *ops.diffusion_loss_train(o, x, t, *tables, None, seed, 5, 2, 5.0, 0),
            *ops.p_sample_step(o, x, t, table, None, seed, 5, 0, 1.0, None, True, True),
            *ops.ddim_step(o, x, t, (t - 7).clamp(min=-1), table, sched.alphas_cumprod, None, seed, 5, 2, 0.6, 1.0,
                           1.0, None, True, True, True)]


def test_results_do_not_depend_on_the_thread_count(sched):
    x, t, seed = data((6, 3, 61, 67)), timesteps(6), torch.tensor([31337])  # 12261 elements per sample
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _every_op(sched, x, t, seed)
        torch.set_num_threads(2)
        two = _every_op(sched, x, t, seed)
    finally:
        torch.set_num_threads(threads)
    assert len(one) == len(two) == 13
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_every_output_element_is_written(sched):
    """Under deterministic algorithms PyTorch fills new tensors (at::empty_like in the kernels too) with NaN."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.isnan(torch.empty(3)).all()  # the poison is on
        outs = []
        for shape, cl in (((3, 1, 7, 5), False), ((2, 3, 5, 5), True), ((5, 2, 9), False)):
            x, t, seed = data(shape, channels_last=cl), timesteps(shape[0]), torch.tensor([1])
            outs += _every_op(sched, x, t, seed)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert all(torch.isfinite(out).all() for out in outs)


def test_opcheck_every_op(sched):
    tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    for dtype, cl in ((torch.float32, False), (torch.float64, False), (torch.float32, True), (torch.bfloat16, False)):
        x = data((3, 2, 5, 5), dtype, cl)
        p, n, t, seed = data((3, 2, 5, 5), dtype, cl).requires_grad_(True), data((3, 2, 5, 5), dtype, cl), \
            timesteps(3), torch.tensor([3])
        cases = [(ops.diffusion_loss.default, (p, x, t, *tables, None, seed, 0, 2, 5.0, 1)),
                 (ops.diffusion_loss.default, (p, None, t, *tables, n, None, 0, 0, None, 0)),
                 (ops.diffusion_loss.default, (p, x, t, *tables, None, None, 0, 1, 2.0, 0)),
                 (ops.diffusion_loss_backward.default, (torch.rand(3), p.detach(), x, t, *tables, None, seed, 0, 2,
                                                        None, 0)),
                 (ops.diffusion_loss_train.default, (p, x, t, *tables, None, seed, 0, 2, 5.0, 1)),
                 (ops.diffusion_loss_train.default, (p, None, t, *tables, n, None, 0, 0, None, 0))]
        for op, args in cases:
            torch.library.opcheck(op, args)


def test_entry_points_compile_without_a_graph_break(sched):
    """torch.compile(fullgraph=True) traces the entry points (noised → network → loss) without a graph break
    (call_op's no-grad path against the autograd path: tests/ops/test_q_sample.py)."""
    x, t = data((2, 3, 6, 6)), timesteps(2)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)

    def step(x, t):
        x_t, noise_kwargs = noised(sched, x, t, backend="cpp", check=False)
        return diffusion_loss(sched, net(x_t), x, t, **noise_kwargs, objective="pred_v", backend="cpp", check=False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    loss = compiled(x, t)
    loss.backward()  # traced, the loss training op's C++ backward scales its gradient by the (fake) incoming one
    compiled_grad, net.weight.grad = net.weight.grad, None
    torch.manual_seed(3)
    eager_loss = step(x, t)
    eager_loss.backward()
    assert torch.equal(loss, eager_loss) and rel_err(compiled_grad, net.weight.grad) <= 1e-6


def test_diffusion_trains_and_samples_with_in_kernel_noise_on_cpp():
    """Diffusion on the cpp backend takes the fused path (ε drawn in q_sample, regenerated in the loss) and its
    sampling loops draw z in-kernel; both reproducible under torch.manual_seed."""
    from fastddpm import Diffusion
    from fastddpm.ops import draws_noise_in_kernel

    from .conftest import TinyNet

    d = Diffusion(TinyNet(timesteps=20), image_size=6, timesteps=20, beta_schedule="cosine", backend="cpp")
    assert draws_noise_in_kernel("p_sample_step", d.device, d.backend)
    assert draws_noise_in_kernel("ddim_step", d.device, d.backend)
    x0 = torch.rand(2, 3, 6, 6) * 2 - 1
    torch.manual_seed(1)
    a = d.p_losses(x0, torch.tensor([3, 17]))
    torch.manual_seed(1)
    b = d.p_losses(x0, torch.tensor([3, 17]))
    assert torch.equal(a, b) and torch.isfinite(a)
    a.backward()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.isolated
def test_bad_input_raises_clear_errors(sched):
    x, n, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0, 5])
    tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    seed = torch.tensor([1])
    cases = [
        (r"got t\[0\] = -1", lambda: ops.diffusion_loss(x, x, torch.tensor([-1, 3]), *tables, n, None, 0, 0, None, 1)),
        (r"x_start has shape \[2, 3, 4, 3\], expected \[2, 3, 4, 4\]",
         lambda: ops.diffusion_loss(x, x[..., :3], t, *tables, None, None, 0, 1, None, 1)),
        ("seed is on meta, the data on cpu",  # (meta tensors meet the fake impl)
         lambda: ops.diffusion_loss(x, x, t, *tables, None, seed.to("meta"), 0, 0, None, 1)),
        ("give exactly one of noise and seed", lambda: ops.diffusion_loss(x, x, t, *tables, n, seed, 0, 0, None, 1)),
        ("the x_0 and v objectives need x_start",
         lambda: ops.diffusion_loss(x, None, t, *tables, n, None, 0, 2, None, 1)),
        ("objective must be 0", lambda: ops.diffusion_loss(x, x, t, *tables, n, None, 0, 3, None, 1)),
        ("reduction must be 0", lambda: ops.diffusion_loss(x, x, t, *tables, n, None, 0, 0, None, 2)),
        (r"grad must have the loss's shape", lambda: ops.diffusion_loss_backward(torch.ones(3), x, x, t, *tables, n,
                                                                                 None, 0, 0, None, 0)),
    ]
    for message, call in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_portable_kernels_for_cpus_without_avx2():
    """The build chosen on CPUs without AVX2/FMA (forced by FASTDDPM_CPU_KERNELS=portable, read once per
    process): the same stream within float rounding, the same results, thread-count independent."""
    import subprocess
    import sys

    code = """
import torch
from fastddpm import reference
from fastddpm.ops.q_sample import philox_noise_like
from fastddpm.schedules import NoiseSchedule, get_beta_schedule
sched = NoiseSchedule(get_beta_schedule("linear", 1000))
tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
x, t, seed = torch.randn(6, 3, 61, 67), torch.tensor([0, 1, 999, 5, 500, 77]), torch.tensor([2**40 + 9])
outs = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    x_t, eps = torch.ops.fastddpm.q_sample(x, t, *tables, None, seed, 2**32 - 100, True)
    loss = torch.ops.fastddpm.diffusion_loss(x * 0.5, x, t, *tables, None, seed, 2**32 - 100, 2, 5.0, 0)
    step = torch.ops.fastddpm.ddim_step(x * 0.5, x, t, t - 1, sched.reverse_table(), sched.alphas_cumprod, None,
                                        seed, 3, 0, 0.5, 1.0, 1.0, None, True, True, True)
    outs.append([x_t, eps, loss, *step])
assert all(torch.equal(a, b) for a, b in zip(*outs))
expected = philox_noise_like(x, seed, 2**32 - 100)
assert (eps - expected).abs().max() <= 1e-6 + 6e-8 * expected.abs().max()
ref = reference.q_sample(sched, x.double(), t, expected.double())
assert ((x_t - ref).norm() / ref.norm()) < 1e-6
print("portable ok")
"""
    env = {**__import__("os").environ, "FASTDDPM_CPU_KERNELS": "portable"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "portable ok" in result.stdout, result.stderr[-2000:]
