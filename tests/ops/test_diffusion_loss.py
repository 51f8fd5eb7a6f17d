"""diffusion_loss (fastddpm/ops/diffusion_loss.py) on every backend present, against the float64 reference:
the loss and its gradients over shapes × dtypes × layouts, objectives, min-SNR-γ weights and reductions, ε
given or regenerated from q_sample's key; the training forward (keep_grad) and where it runs; the op's
registration (opcheck), its eager paths, torch.func and bad inputs."""
import itertools

import pytest
import torch

from fastddpm import _extension, contracts, reference
from fastddpm.ops import diffusion_loss as loss_module
from fastddpm.ops import new_seed
from fastddpm.ops.diffusion_loss import diffusion_loss, noised
from fastddpm.ops.q_sample import philox_noise_like, q_sample

from .. import kernel_grid as grid
from ..conftest import needs_triton_interpreter, rel_err
from ..kernel_grid import OBJECTIVES, data, in_low_precision, layouts, timesteps, tolerance
from .conftest import OpLog, backends_present, device

BACKENDS = backends_present("diffusion_loss")
DEVICE = device()
ops = torch.ops.fastddpm
needs_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="fastddpm._C without the C++ CPU kernels")


def tables(sched):
    return sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod


# ----------------------------------------------------------------------------- against the float64 reference
def loss_case(sched, shape, dtype, cl, objective, gamma, reduction, drawn, backend):
    """The loss and its gradient on ``backend`` against the float64 reference (ε given or drawn)."""
    x, t = data(shape, dtype, cl), timesteps(shape[0])
    pred = data(shape, dtype, cl).requires_grad_(True)
    seed = torch.randint(0, 2**62, (1,))
    noise = None if drawn else data(shape, dtype, cl)
    eps64 = (philox_noise_like(x, seed, 3) if drawn else noise).double()
    loss = diffusion_loss(sched, pred, x, t, noise, seed=seed if drawn else None, offset=3,
                          objective=objective, min_snr_gamma=gamma, reduction=reduction, backend=backend)
    pred64 = pred.detach().double().requires_grad_(True)
    ref = reference.diffusion_loss(sched, pred64, x.double(), t, eps64, objective, gamma, reduction)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert rel_err(loss, ref) <= 1e-4 if dtype != torch.float32 else rel_err(loss, ref) <= 1e-5
    g = torch.rand_like(ref)
    (grad,) = torch.autograd.grad(loss, pred, g.float())
    (grad_ref,) = torch.autograd.grad(ref, pred64, g)
    assert grad.dtype == dtype
    if backend != "reference":  # the kernels write the gradient in the prediction's layout
        assert grad.stride() == pred.stride()
    native = None
    if dtype != torch.float32:
        pred_lp = pred.detach().clone().requires_grad_(True)
        loss_lp = in_low_precision(reference.diffusion_loss, sched, pred_lp, x, t, eps64.to(dtype), objective,
                                   gamma, reduction)
        (native,) = torch.autograd.grad(loss_lp, pred_lp, g.to(loss_lp.dtype))
    assert rel_err(grad, grad_ref) <= tolerance(grad_ref, dtype, 1e-4, native=native)


@pytest.mark.parametrize("backend", BACKENDS)
@grid.on_grid
def test_shapes_dtypes_layouts(sched, shape, dtype, backend):
    with torch.device(DEVICE):
        for cl in layouts(shape):
            loss_case(sched, shape, dtype, cl, "pred_v", 5.0, "mean", drawn=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objectives_weights_reductions(sched, objective, backend):
    with torch.device(DEVICE):
        for gamma, reduction, drawn in itertools.product((None, 5.0), ("mean", "none"), (False, True)):
            loss_case(sched, (3, 2, 5, 7), torch.float32, False, objective, gamma, reduction, drawn, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_and_gradients_reach_x_start_and_noise(sched, backend):
    """float64 data: the loss in float64, and its gradients reach x_start and ε where the reference's do."""
    with torch.device(DEVICE):
        for objective in OBJECTIVES:
            x, n, p = (torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
            t = timesteps(3)
            # min-SNR-γ: SNR from the float32 √ tables (as the kernels), the reference reads its own SNR table
            weighted = diffusion_loss(sched, p, x, t, n, objective=objective, min_snr_gamma=5.0,
                                      reduction="none", backend=backend)
            ref = reference.diffusion_loss(sched, p, x, t, n, objective, 5.0, "none")
            assert rel_err(weighted, ref) < 1e-6
            out = diffusion_loss(sched, p, x, t, n, objective=objective, reduction="none", backend=backend)
            assert out.dtype == torch.float64
            ref = reference.diffusion_loss(sched, p, x, t, n, objective, None, "none")
            assert rel_err(out, ref) < 1e-12
            g = torch.rand(3, dtype=torch.float64)
            got = torch.autograd.grad(out, (p, x, n), g, allow_unused=True)
            want = torch.autograd.grad(ref, (p, x, n), g, allow_unused=True)
            for a, b in zip(got, want):
                assert (a is None) == (b is None or b.abs().max() == 0)
                if a is not None:
                    assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_regenerates_the_noise_q_sample_drew(sched, backend):
    with torch.device(DEVICE):
        x, t, seed = data((4, 3, 8, 8)), timesteps(4), torch.tensor([42])
        _, eps = q_sample(sched, x, t, seed=seed, offset=5, write_noise=True, backend=backend)
        pred = torch.randn_like(x)
        for objective in OBJECTIVES:
            regenerated = diffusion_loss(sched, pred, x, t, seed=seed, offset=5, objective=objective,
                                         backend=backend)
            stored = diffusion_loss(sched, pred, x, t, eps, objective=objective, backend=backend)
            assert torch.equal(regenerated, stored)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_read_each_input_exactly(sched, backend):
    """A bf16 network output against fp32 data: x_0 and ε are not rounded to bf16 on the way in."""
    with torch.device(DEVICE):
        x, t = data((3, 2, 6, 6)), timesteps(3)
        pred = data((3, 2, 6, 6), torch.bfloat16)
        n = data((3, 2, 6, 6))
        loss = diffusion_loss(sched, pred, x, t, n, objective="pred_v", backend=backend)
        ref = reference.diffusion_loss(sched, pred.double(), x.double(), t, n.double(), "pred_v")
        assert loss.dtype == torch.float32 and rel_err(loss, ref) < 1e-6


# ---------------------------------------------------------------------------- the training forward: keep_grad
@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_keep_grad_writes_the_backward_gradient(sched, dtype):
    """keep_grad: the loss of the plain forward and, from the same pass, the gradient that
    diffusion_loss_backward gives for an incoming gradient of one, bit for bit; through autograd (the entry
    point keeps it for a CPU prediction that alone requires grad) any incoming gradient scales it."""
    for shape, cl in (((3, 2, 5, 7), False), ((2, 3, 6, 6), True), ((4, 9), False)):
        x, o, n = (data(shape, dtype, cl) for _ in range(3))
        t, seed = timesteps(shape[0]), torch.tensor([29])
        for objective, gamma, reduction, given in itertools.product((0, 1, 2), (None, 5.0), (0, 1),
                                                                    (True, False)):
            args = (o, x, t, *tables(sched), n if given else None, None if given else seed, 3, objective,
                    gamma, reduction)
            loss, g = ops.diffusion_loss(*args, True)
            plain, empty = ops.diffusion_loss(*args, False)
            ones = torch.ones(()) if reduction == 1 else torch.ones(shape[0])
            assert torch.equal(loss, plain) and empty.numel() == 0
            assert torch.equal(g, ops.diffusion_loss_backward(ones, *args)) and g.stride() == o.stride()
        for objective, reduction in itertools.product((0, 1, 2), ("mean", "none")):
            p = o.clone().requires_grad_(True)
            loss = diffusion_loss(sched, p, x, t, n, objective=OBJECTIVES[objective], reduction=reduction,
                                  min_snr_gamma=5.0, backend="cpp")
            grad_out = torch.rand_like(loss) + 0.5
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                (grad,) = torch.autograd.grad(loss, p, grad_out)
            assert "fastddpm::diffusion_loss_backward" not in {e.name for e in prof.events()}  # kept, scaled
            expected = ops.diffusion_loss_backward(grad_out, o, x, t, *tables(sched), n, None, 0, objective,
                                                   5.0, int(reduction == "mean"))
            assert rel_err(grad, expected) <= 4 * torch.finfo(dtype).eps  # one rounding more: scaled after
            # loss.backward() of a mean loss: the gradient the forward kept, as it is
            if reduction == "mean":
                loss = diffusion_loss(sched, p, x, t, n, objective=OBJECTIVES[objective], min_snr_gamma=5.0,
                                      backend="cpp")
                (grad,) = torch.autograd.grad(loss, p)
                assert torch.equal(grad, ops.diffusion_loss_backward(torch.ones(()), o, x, t, *tables(sched),
                                                                     n, None, 0, objective, 5.0, 1))


@needs_cpp
def test_keep_grad_only_where_the_gradient_goes_to_the_prediction_alone(sched, monkeypatch):
    x, o, n, t = data((2, 3, 4, 4)), data((2, 3, 4, 4)), data((2, 3, 4, 4)), timesteps(2)
    kept = []
    keep_grad = loss_module._keep_grad
    monkeypatch.setattr(loss_module, "_keep_grad", lambda *a: kept.append(keep_grad(*a)) or kept[-1])

    def keeps(p, x0, noise, grad=True):
        with torch.set_grad_enabled(grad), \
                torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss = diffusion_loss(sched, p, x0, t, noise, objective="pred_v", backend="cpp")
        assert "fastddpm::diffusion_loss" in {e.name for e in prof.events()}
        if loss.requires_grad:  # kept: the backward runs no backward op
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                loss.backward()
            assert ("fastddpm::diffusion_loss_backward" in {e.name for e in prof.events()}) != kept[-1]
        return kept[-1]

    assert keeps(o.requires_grad_(True), x, n)
    assert not keeps(o, x, n, grad=False)
    assert not keeps(o.detach(), x, n)
    assert not keeps(o, x.requires_grad_(True), n)  # x_0 needs its gradient: the general backward
    assert not keeps(o, x.detach(), n.requires_grad_(True))
    assert not keeps(o.detach().bfloat16().requires_grad_(True), x.bfloat16(), n.detach().bfloat16())


def below_autograd(op):
    def run(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return run


@needs_cpp
def test_cpu_autograd_is_the_cpp_node_and_equals_the_python_autograd_bit_for_bit(sched):
    """On CPU tensors the op's autograd is its C++ node (AutogradCPU, csrc/cpu/diffusion_loss.cpp), also for
    the entry point. Its gradients to the prediction, x_0 and ε equal those of the Python autograd (the other
    devices' one, run here over the same C++ kernels) bit for bit: kept or recomputed, any incoming gradient,
    mixed dtypes; and again from a retained graph."""
    python_autograd = loss_module._autograd_function(
        "PythonLoss", below_autograd(ops.diffusion_loss.default), loss_module._setup_context,
        loss_module._make_backward(below_autograd(ops.diffusion_loss_backward.default)), tensor_args=7)
    shape, t, seed = (3, 2, 5, 7), timesteps(3), torch.tensor([29])
    p = data(shape).requires_grad_(True)
    node = diffusion_loss(sched, p, data(shape), t, data(shape), backend="cpp").grad_fn.name()
    assert "DiffusionLossFunction" in node
    for keep_grad in (False, True):
        loss, _ = ops.diffusion_loss(p, None, t, *tables(sched), None, seed, 0, 0, None, 1, keep_grad)
        assert loss.grad_fn.name() == node
        with pytest.raises(RuntimeError) as refused:  # the Python autograd's message
            torch.autograd.grad(loss, p, create_graph=True)
        assert loss_module.DOUBLE_BACKWARD_ERROR in str(refused.value)
    dtypes = ((torch.float32,) * 3, (torch.float64,) * 3, (torch.bfloat16, torch.float32, torch.float64))
    wrts = ((True, False, False), (True, True, False), (True, False, True), (False, True, True))
    for (pd, xd, nd), objective, reduction, keep_grad, given, wrt in itertools.product(
            dtypes, (0, 1, 2), (0, 1), (False, True), (True, False), wrts):
        o, x, n = data(shape, pd), data(shape, xd), data(shape, nd)
        if not given and wrt[2]:
            continue
        g = torch.ones(()) if reduction == 1 and given else torch.rand(() if reduction == 1 else (3,)) + 0.5
        results = []
        for run in (ops.diffusion_loss, python_autograd.run):
            leaves = [v.clone().requires_grad_(w) for v, w in zip((o, x, n), wrt)]
            args = (leaves[0], leaves[1], t, *tables(sched), leaves[2] if given else None,
                    None if given else seed, 3, objective, 5.0 if given else None, reduction, keep_grad)
            loss, kept = run(*args)
            wanted = [v for v in leaves if v.requires_grad]
            grads = torch.autograd.grad(loss, wanted, g.to(loss.dtype), allow_unused=True,
                                        retain_graph=run is ops.diffusion_loss)
            if run is ops.diffusion_loss:  # the retained graph gives the same gradients again
                again = torch.autograd.grad(loss, wanted, g.to(loss.dtype), allow_unused=True)
                assert all(a is b is None or torch.equal(a, b) for a, b in zip(grads, again))
            results.append((loss, kept, grads))
        (loss, kept, grads), (py_loss, py_kept, py_grads) = results
        assert torch.equal(loss, py_loss) and torch.equal(kept, py_kept) and not kept.requires_grad
        for a, b in zip(grads, py_grads):
            assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and torch.equal(a, b)))
        assert not wrt[0] or grads[0].dtype == pd


@needs_cpp
def test_cpu_autograd_node_under_compiled_autograd(sched):
    """Compiled autograd traces the C++ node's backward (the kept gradient leaves it detached, not marked
    non-differentiable, which compiled autograd refuses): the eager gradients, kept or recomputed."""
    x, n, t = data((2, 3, 4)), data((2, 3, 4)), timesteps(2)
    for reduction, x_start_grad in (("mean", False), ("none", False), ("mean", True)):
        p, x0 = data((2, 3, 4)).requires_grad_(True), x.clone().requires_grad_(x_start_grad)
        loss = diffusion_loss(sched, p, x0, t, n, objective="pred_v", reduction=reduction, backend="cpp")
        loss = loss.sum()
        expected = torch.autograd.grad(loss, (p, x0) if x_start_grad else (p,), retain_graph=True)
        with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
            loss.backward()
        assert torch.equal(p.grad, expected[0]) and (not x_start_grad or torch.equal(x0.grad, expected[1]))


@needs_triton_interpreter
def test_keep_grad_on_the_triton_implementation(sched):
    """The Triton implementation honours keep_grad too (the schema's contract on every device): the
    gradient of its backward for an incoming gradient of one."""
    x, o, t = data((3, 2, 5, 7)), data((3, 2, 5, 7)), timesteps(3)
    for reduction in (0, 1):
        args = (o, x, t, *tables(sched), None, torch.tensor([7]), 3, 2, 5.0, reduction)
        loss, g = loss_module._diffusion_loss_triton(*args, True)
        plain, empty = loss_module._diffusion_loss_triton(*args, False)
        ones = torch.ones(()) if reduction == 1 else torch.ones(3)
        assert torch.equal(loss, plain) and empty.numel() == 0
        assert torch.equal(g, loss_module._diffusion_loss_backward_triton(ones, *args))


@needs_triton_interpreter
def test_python_autograd_with_keep_grad_backpropagates_a_retained_graph_twice(sched):
    """The Python autograd (what CUDA tensors and the eager Triton path run) with keep_grad: a retained graph
    gives the same gradient on a second backward (the kept gradient stays with the node until it is freed)."""
    x, t = data((3, 2, 5, 7)), timesteps(3)
    for reduction in (0, 1):
        p = data((3, 2, 5, 7)).requires_grad_(True)
        args = (p, x, t, *tables(sched), None, torch.tensor([7]), 3, 2, 5.0, reduction, True)
        loss = loss_module._TritonLoss.run(*args)[0]
        g = torch.rand_like(loss)
        first = torch.autograd.grad(loss, p, g, retain_graph=True)[0]
        second = torch.autograd.grad(loss, p, g)[0]
        want = loss_module._diffusion_loss_backward_triton(g, *args[:-1])
        assert torch.equal(first, second) and rel_err(first, want) < 1e-6  # (g scales after or inside)


# ----------------------------------------------------------------------------- ε stored or regenerated
@needs_cpp
def test_noised_stores_eps_on_cpp_and_the_loss_equals_the_regenerated_one_bit_for_bit(sched):
    """fastddpm.ops.diffusion_loss.noised on the C++ CPU kernels: q_sample writes ε (float32/float64 x_0)
    and the loss reads it; loss and gradient equal those of the loss that regenerates ε from the key, bit for
    bit (a bfloat16 network output included)."""
    x, t = data((4, 3, 8, 8)), timesteps(4)
    for dtype, pred_dtype in ((torch.float32, torch.float32), (torch.float64, torch.float64),
                              (torch.float32, torch.bfloat16)):
        x0 = x.to(dtype)
        pred = torch.randn(x.shape).to(pred_dtype).requires_grad_(True)
        x_t, kwargs = noised(sched, x0, t, backend="cpp", generator=torch.Generator().manual_seed(5))
        assert list(kwargs) == ["noise"]
        assert kwargs["noise"].dtype == dtype and not kwargs["noise"].requires_grad
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


@needs_cpp
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


@needs_cpp
def test_diffusion_on_cpp_passes_the_stored_eps_to_the_loss(monkeypatch):
    """Diffusion's fused CPU path goes through noised: the loss gets ε (not a key) for float32 data, and the
    loss is the one the key would give."""
    import fastddpm.diffusion as diffusion_module
    from fastddpm import Diffusion

    from ..conftest import TinyNet

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


# ----------------------------------------------------------------------------- the op and its eager paths
@pytest.mark.skipif(not _extension.cpu_built() and DEVICE.type == "cpu", reason="fastddpm._C not built")
def test_opcheck(sched):
    """The one op and its backward op on this machine's device (CPU: the C++ kernels; CUDA: the Triton
    implementation registered for "cuda"): schema, fake impls, autograd registration, AOT dispatch."""
    with torch.device(DEVICE):
        for dtype, cl in ((torch.float32, False), (torch.float64, False), (torch.float32, True),
                          (torch.bfloat16, False)):
            x = data((3, 2, 5, 5), dtype, cl)
            p, n = data((3, 2, 5, 5), dtype, cl).requires_grad_(True), data((3, 2, 5, 5), dtype, cl)
            t, seed = timesteps(3), torch.tensor([3])
            for keep_grad in (False, True):
                for args in ((p, x, t, *tables(sched), None, seed, 0, 2, 5.0, 1),
                             (p, None, t, *tables(sched), n, None, 0, 0, None, 0),
                             (p, x, t, *tables(sched), None, None, 0, 1, 2.0, 0)):
                    torch.library.opcheck(ops.diffusion_loss.default, (*args, keep_grad))
            args = (torch.rand(3), p.detach(), x, t, *tables(sched), None, seed, 0, 2, None, 0)
            torch.library.opcheck(ops.diffusion_loss_backward.default, args)


@needs_triton_interpreter
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_eager_triton_loss_and_gradient_equal_the_implementation(sched, objective, reduction):
    """The 'triton' backend on CPU tensors (the interpreter; the op's CPU kernel is C++) calls the Triton
    implementation directly, through the op's own autograd (setup_context and backward) for the gradient."""
    x, t, seed = torch.randn(3, 2, 5, 7), torch.tensor([0, 17, 49]), torch.tensor([11])
    code = contracts.objective_code(objective)
    pred = torch.randn_like(x, requires_grad=True)
    loss = diffusion_loss(sched, pred, x, t, seed=seed, objective=objective, min_snr_gamma=5.0,
                          reduction=reduction, backend="triton")
    args = (pred.detach(), x, t, *tables(sched), None, None if code == 1 else seed, 0, code, 5.0,
            contracts.reduction_code(reduction))
    want = loss_module._diffusion_loss_triton(*args, False)[0]
    assert torch.equal(loss, want) and loss.requires_grad
    g = torch.rand_like(loss)
    want = loss_module._diffusion_loss_backward_triton(g, *args)
    assert torch.equal(torch.autograd.grad(loss, pred, g)[0], want)


@needs_triton_interpreter
def test_eager_triton_gradient_to_x_start(sched):
    """A gradient to x_start on the eager Triton path: the op's backward (∂L/∂x_0 from ∂L/∂pred)."""
    x, n, t = torch.randn(3, 2, 5, 7), torch.randn(3, 2, 5, 7), torch.tensor([0, 17, 49])
    pred = torch.randn_like(x)
    grads = []
    for backend in ("triton", "reference"):
        x0 = x.clone().requires_grad_(True)
        loss = diffusion_loss(sched, pred, x0, t, n, objective="pred_v", backend=backend)
        grads.append(torch.autograd.grad(loss, x0)[0])
    assert grads[0].abs().sum() > 0
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() <= 1e-4


@pytest.mark.skipif("cpp" not in BACKENDS and "triton" not in BACKENDS, reason="no fused backend here")
def test_what_must_see_the_op_goes_through_it(sched):
    """A dispatch mode sees the registered op (CPU: the C++ kernels; CUDA: the Triton backend's op), not the
    implementation's inputs alone."""
    backend = "triton" if DEVICE.type == "cuda" else "cpp"
    with torch.device(DEVICE):
        x, t, seed = torch.randn(3, 2, 5, 7), torch.tensor([0, 17, 49]), torch.tensor([11])
        with OpLog() as log:
            diffusion_loss(sched, torch.randn_like(x), x, t, seed=seed, backend=backend)
    assert any("fastddpm.diffusion_loss" in op for op in log.ops)


@needs_cpp
def test_under_torch_func_grad_runs_the_reference(sched):
    """torch.func refuses the op's autograd: under torch.func.grad the entry point runs the reference
    (float64: its gradient to round-off)."""
    x, o, n = (data((3, 2, 5, 7), torch.float64) for _ in range(3))
    t = timesteps(3)
    for objective in OBJECTIVES:
        def loss(p):
            return diffusion_loss(sched, p, x, t, n, objective=objective, min_snr_gamma=5.0, backend="cpp")
        grad = torch.func.grad(loss)(o)
        leaf = o.clone().requires_grad_(True)
        ref = reference.diffusion_loss(sched, leaf, x, t, n, objective, 5.0, "mean")
        (expected,) = torch.autograd.grad(ref, leaf)
        assert rel_err(grad, expected) <= 1e-12


@pytest.mark.parametrize("gamma", [0.0, -1.0])
def test_min_snr_gamma_must_be_positive(gamma, sched):
    """The entry point (every backend), the reference's weight, and every implementation of the op."""
    x, n, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([1, 2])
    for backend in ("cpp", "triton", "reference"):
        with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
            diffusion_loss(sched, x, x, t, n, min_snr_gamma=gamma, backend=backend)
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        reference.loss_weight(sched, "pred_noise", t, gamma)
    args = (x, x, t, *tables(sched), n, None, 0, 0, gamma, 1)
    impls = [loss_module._diffusion_loss_cpu, loss_module._fake_loss, loss_module._diffusion_loss_triton]
    if _extension.cpu_built():
        impls.append(ops.diffusion_loss)
    for impl, keep_grad in itertools.product(impls, (False, True)):
        with pytest.raises(RuntimeError, match="min_snr_gamma must be > 0"):
            impl(*args, keep_grad)
    backward = [loss_module._diffusion_loss_backward_cpu, loss_module._diffusion_loss_backward_triton]
    if _extension.cpu_built():
        backward.append(ops.diffusion_loss_backward)
    for impl in backward:
        with pytest.raises(RuntimeError, match="min_snr_gamma must be > 0"):
            impl(torch.tensor(1.0), *args)
