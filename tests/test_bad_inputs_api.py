"""Bad inputs at the op and API level: mixed meta/CPU arguments, double backward, torch.func, value checks."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastddpm
from fastddpm import Diffusion, UNet, reference
from fastddpm.ops import choose_backend, reverse_step
from fastddpm.ops.diffusion_loss import diffusion_loss
from fastddpm.ops.q_sample import q_sample
from fastddpm.ops.reverse_step import ddim_step
from fastddpm.schedules import NoiseSchedule, get_beta_schedule

from .conftest import TinyNet, rel_err

T = 20


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule(get_beta_schedule("cosine", T))


# ----------------------------------------------------------------------------- 1. meta arguments
def op_args(sched):
    """Valid CPU arguments of every op with a fake impl, by op name."""
    torch.manual_seed(0)
    x, pred, noise = (torch.randn(2, 4, 3, 3) for _ in range(3))
    t, t_prev = torch.tensor([3, 7]), torch.tensor([1, -1])
    tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    scale = torch.full((2,), 1.5)
    w, b = torch.randn(4), torch.randn(4)
    y, mean, rstd, _ = torch.ops.fastddpm.group_norm_silu(x, 2, w, b, 1e-5)
    loss = (pred, x, t, *tables, noise, None, 0, 2, 5.0, 1)
    p_step = (pred, x, t, sched.reverse_table(), noise, None, 0, 0, 1.0, scale, True, False)
    ddim = (pred, x, t, t_prev, sched.reverse_table(), sched.alphas_cumprod, noise, None, 0, 0, 0.5, 1.0,
            None, scale, True, True, False)
    args = {
        "q_sample": (x, t, *tables, noise, None, 0, False),
        "diffusion_loss": (*loss, True),
        "diffusion_loss_backward": (torch.tensor(1.0), *loss),
        "p_sample_step": p_step,
        "ddim_step": ddim,
    }

    args.update({
        "group_norm_silu": (x, 2, w, b, 1e-5, True),  # save_silu_grad: silu_grad x-sized, not empty
        "group_norm_silu_backward": (y, x, mean, rstd, w, b, 2, y, None),
    })
    return args


OPS = sorted(op_args(NoiseSchedule(get_beta_schedule("cosine", T))))


def _to(a, device):
    return a.to(device) if isinstance(a, torch.Tensor) else a


@pytest.mark.parametrize("op", OPS)
def test_one_argument_on_meta_raises(op, sched):
    """With one argument on meta the dispatcher runs the fake impl: it must refuse, not return garbage."""
    args = op_args(sched)[op]
    names = [a.name for a in getattr(torch.ops.fastddpm, op).default._schema.arguments]
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    assert len(positions) >= 3
    for i in positions:
        mixed = [_to(a, "meta") if j == i else a for j, a in enumerate(args)]
        with pytest.raises(RuntimeError, match=rf"{names[i]} is on meta|{names[i]} on meta|is on cpu"):
            getattr(torch.ops.fastddpm, op)(*mixed)


@pytest.mark.parametrize("op", OPS)
def test_all_meta_still_runs_the_fake(op, sched):
    args = [_to(a, "meta") for a in op_args(sched)[op]]
    out = getattr(torch.ops.fastddpm, op)(*args)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(o.device.type == "meta" for o in outs)
    assert outs[0].shape in ((), (2,), (2, 4, 3, 3))


def test_module_built_on_meta_refuses_cpu_data():
    with torch.device("meta"):
        m = fastddpm.GroupNormSiLU(4, 8)
    with pytest.raises(RuntimeError, match="weight is on meta, x on cpu"):
        m(torch.randn(2, 8, 4, 4))


def test_ddim_step_meta_alphas_cumprod_raises(sched):
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="alphas_cumprod is on meta"):
        ddim_step(sched, torch.randn_like(x), x, torch.tensor([5, 6]), torch.tensor([2, 3]),
                  table=sched.reverse_table(), alphas_cumprod=sched.alphas_cumprod.to("meta"))


# ----------------------------------------------------------------------------- 2. double backward
def _gns(x, w=None, b=None):
    return fastddpm.functional.group_norm_silu(x, 2, w, b)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_gradgradcheck(affine, channels_last):
    assert choose_backend("group_norm_silu", "cpu") == "cpp"  # the fused op, not the reference
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    inputs = [x.requires_grad_()]
    if affine:
        inputs += [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradgradcheck(_gns, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_silu_double_backward_matches_reference(dtype):
    torch.manual_seed(0)
    x64 = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    w64, b64 = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    v = torch.randn(3, 8, 5, 5, dtype=torch.float64)

    def second_order(fn, x, w, b):
        x, w, b = (a.detach().requires_grad_() for a in (x, w, b))
        y = fn(x, 4, w, b)
        (gx,) = torch.autograd.grad(y, x, v.to(y.dtype), create_graph=True)
        return torch.autograd.grad(gx.float().square().sum(), (x, w, b))

    ref = second_order(reference.group_norm_silu, x64, w64, b64)
    ours = second_order(fastddpm.functional.group_norm_silu, x64.to(dtype), w64.to(dtype), b64.to(dtype))
    if dtype == torch.float32:
        bounds = [1e-4] * 3
    else:  # 2× the error of PyTorch's own ops at this dtype
        torch_ = second_order(reference.group_norm_silu, x64.to(dtype), w64.to(dtype), b64.to(dtype))
        bounds = [2 * rel_err(g, r) for g, r in zip(torch_, ref)]
    for g, r, bound in zip(ours, ref, bounds):
        assert g is not None and g.dtype == dtype
        assert rel_err(g, r) <= bound


# x_start_grad: False keeps ∂L/∂pred from the forward (keep_grad), True runs the backward op
@pytest.mark.parametrize("x_start_grad", [False, True])
def test_diffusion_loss_double_backward_raises(x_start_grad, sched):
    """The fused loss's backward is a constant of the graph: differentiating it again would give wrong (zero)
    second derivatives, so a backward with create_graph=True raises; the reference supports it."""
    torch.manual_seed(0)
    pred, n = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4)
    x, t = torch.randn(2, 3, 4, requires_grad=x_start_grad), torch.tensor([3, 9])
    loss = diffusion_loss(sched, pred, x, t, n, objective="pred_v")
    with pytest.raises(RuntimeError, match="the fused loss has no double backward"):
        torch.autograd.grad(loss, pred, create_graph=True)
    (g,) = torch.autograd.grad(loss, pred)  # the first order is unaffected
    loss = diffusion_loss(sched, pred, x, t, n, objective="pred_v", backend="reference")
    (g_ref,) = torch.autograd.grad(loss, pred, create_graph=True)
    assert rel_err(g, g_ref) <= 1e-5
    (gg,) = torch.autograd.grad(g_ref.square().sum(), pred)
    assert gg.abs().sum() > 0


# ----------------------------------------------------------------------------- 3. argument values
def test_model_image_size_must_match():
    with pytest.raises(ValueError, match=r"image_size=\(32, 32\) does not match .*UNet.image_size=16"):
        Diffusion(UNet.small(image_size=16), image_size=32)
    assert Diffusion(UNet.small(image_size=16), image_size=16).image_size == (16, 16)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_seed_must_have_one_element(backend, sched):
    x, t = torch.randn(2, 3, 4), torch.tensor([1, 2])
    seed = torch.tensor([1, 2, 3, 4])
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor with one element"):
        q_sample(sched, x, t, seed=seed, backend=backend)
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor with one element"):
        diffusion_loss(sched, x, x, t, seed=seed, backend=backend)
    x_t, _ = q_sample(sched, x, t, seed=torch.tensor(7), backend=backend)  # a 0-d seed is one element
    assert x_t.shape == x.shape


def test_raw_cpp_op_seed_must_have_one_element(sched):
    x, t = torch.randn(2, 3, 4), torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor with one element"):
        tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
        torch.ops.fastddpm.q_sample(x, t, *tables, None, torch.tensor([1, 2, 3, 4]), 0, False)


@pytest.mark.parametrize("bad", [0.0, -2.0, float("nan")])
def test_threshold_scale_must_be_positive(bad, sched):
    x, out, n = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t, t_prev, scale = torch.tensor([5, 6]), torch.tensor([2, 3]), torch.tensor([1.5, bad])
    table, ac = sched.reverse_table(), sched.alphas_cumprod
    for p_step, ddim in ((torch.ops.fastddpm.p_sample_step, torch.ops.fastddpm.ddim_step),
                         (reverse_step._p_sample_step_triton, reverse_step._ddim_step_triton)):
        with pytest.raises(RuntimeError, match="threshold_scale must be > 0"):
            p_step(out, x, t, table, n, None, 0, 0, None, scale, True, False)
        with pytest.raises(RuntimeError, match="threshold_scale must be > 0"):
            ddim(out, x, t, t_prev, table, ac, n, None, 0, 0, 0.5, 1.0, None, scale, True, True, False)


@pytest.mark.parametrize("final", [-0.1, 1.5])
def test_final_alpha_cumprod_must_lie_in_unit_interval(final, sched):
    x, out, n = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t, t_prev = torch.tensor([5, 6]), torch.tensor([-1, -1])
    for backend in ("cpp", "triton", "reference"):
        with pytest.raises(ValueError, match=r"final_alpha_cumprod .* must lie in \[0, 1\]"):
            ddim_step(sched, out, x, t, t_prev, n, eta=0.5, final_alpha_cumprod=final, backend=backend)
    with pytest.raises(ValueError, match=r"final_alpha_cumprod .* must lie in \[0, 1\]"):
        reference.ddim_step(sched, out, x, t, t_prev, n, final_alpha_cumprod=final)
    for op in (torch.ops.fastddpm.ddim_step, reverse_step._ddim_step_triton):
        with pytest.raises(RuntimeError, match=r"final_alpha_cumprod .* must lie in \[0, 1\]"):
            op(out, x, t, t_prev, sched.reverse_table(), sched.alphas_cumprod, n, None, 0, 0, 0.5, final,
               None, None, True, True, False)


def test_reference_clamps_timesteps_as_the_kernels(sched):
    """Unchecked t outside [0, T) reads the nearest end of the tables (as the Triton kernels), never wraps."""
    x, n = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    bad, clamped = torch.tensor([-1, T]), torch.tensor([0, T - 1])
    ref = q_sample(sched, x, clamped, n, backend="reference")
    exact = dict(rtol=0, atol=0)
    torch.testing.assert_close(q_sample(sched, x, bad, n, backend="reference", check=False), ref, **exact)
    torch.testing.assert_close(q_sample(sched, x, bad, n, backend="triton", check=False), ref)
    kw = dict(min_snr_gamma=5.0, reduction="none", backend="reference")
    loss = diffusion_loss(sched, x, x, bad, n, check=False, **kw)
    torch.testing.assert_close(loss, diffusion_loss(sched, x, x, clamped, n, **kw), **exact)
    d = Diffusion(TinyNet(timesteps=T), image_size=4, timesteps=T, beta_schedule="cosine",
                  backend="reference", check_inputs=False)
    x = torch.randn(2, 3, 4, 4)
    n = torch.randn_like(x)
    torch.testing.assert_close(d.q_sample(x, torch.tensor([-1, -1]), n), d.q_sample(x, 0, n), **exact)


# ----------------------------------------------------------------------------- 4. torch.func
@pytest.fixture
def diffusion():
    torch.manual_seed(0)
    return Diffusion(TinyNet(timesteps=T), image_size=4, timesteps=T, beta_schedule="cosine")


def test_vmap_over_p_losses(diffusion):
    torch.manual_seed(1)
    xs = torch.rand(3, 2, 3, 4, 4) * 2 - 1
    ts = torch.randint(0, T, (3, 2))
    ns = torch.randn_like(xs)
    out = torch.func.vmap(diffusion.p_losses)(xs, ts, ns)
    plain = torch.stack([diffusion.p_losses(x, t, n) for x, t, n in zip(xs, ts, ns)])
    assert rel_err(out, plain) <= 1e-5


def test_vmap_keeps_the_timestep_check_outside_transforms(diffusion):
    with pytest.raises(ValueError, match="t must lie in"):
        diffusion.p_losses(torch.rand(2, 3, 4, 4), torch.tensor([0, T]))


def test_func_grad_of_p_losses(diffusion):
    torch.manual_seed(1)
    x, t = torch.rand(2, 3, 4, 4) * 2 - 1, torch.tensor([3, 15])
    n = torch.randn_like(x)
    params = {k: v.detach() for k, v in diffusion.model.named_parameters()}

    class PLosses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion = diffusion

        def forward(self, x):
            return self.diffusion.p_losses(x, t, n)

    def loss(params, x):
        named = {f"diffusion.model.{k}": v for k, v in params.items()}
        return torch.func.functional_call(PLosses(), named, (x,))

    grads_p, grad_x = torch.func.grad(loss, argnums=(0, 1))(params, x)
    x_ = x.clone().requires_grad_()
    plain = diffusion.p_losses(x_, t, n)
    expected = torch.autograd.grad(plain, [x_, *diffusion.model.parameters()])
    assert rel_err(grad_x, expected[0]) <= 1e-4
    for (name, _), g in zip(diffusion.model.named_parameters(), expected[1:]):
        assert rel_err(grads_p[name], g) <= 1e-4, name


# ----------------------------------------------------------------------------- 5. clear errors
def test_sigmoid_alpha_bar_tau_zero():
    with pytest.raises(ValueError, match="tau .* must be > 0"):
        get_beta_schedule("sigmoid_alpha_bar", 10, tau=0)
    with pytest.raises(ValueError, match="need start < end"):
        get_beta_schedule("sigmoid_alpha_bar", 10, start=1.0, end=1.0)


def test_triton_op_on_cpu_without_the_interpreter():
    """Kernels imported without TRITON_INTERPRET=1 cannot take CPU tensors: a clear error, not '0 active
    drivers'."""
    script = textwrap.dedent("""
        import os
        import torch
        import fastddpm
        from fastddpm.ops.q_sample import _q_sample_triton, q_sample
        from fastddpm.schedules import NoiseSchedule, get_beta_schedule
        s = NoiseSchedule(get_beta_schedule("cosine", 10))
        x, t = torch.randn(2, 3), torch.tensor([1, 2])
        for call in (lambda: _q_sample_triton(x, t, s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod, x,
                                              None, 0, False),
                     lambda: (os.environ.__setitem__("TRITON_INTERPRET", "1"),  # too late: triton is imported
                              q_sample(s, x, t, x, backend="triton"))):
            try:
                call()
            except RuntimeError as e:
                print("ERROR:", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 2
    for line in lines:
        assert "the Triton kernels need CUDA tensors" in line and "TRITON_INTERPRET=1" in line


def test_check_device_cuda_without_cuda(monkeypatch):
    from fastddpm._extension import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        check_device("cuda")
    assert check_device("cpu") == torch.device("cpu")


def test_from_pretrained_on_a_device_this_torch_cannot_use(tmp_path, monkeypatch):
    from fastddpm import Diffusion, UNet

    Diffusion(UNet.small(image_size=8), image_size=8, channels=1, timesteps=10,
              beta_schedule="cosine").save_pretrained(tmp_path / "m")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Diffusion.from_pretrained(tmp_path / "m", device="cuda")
