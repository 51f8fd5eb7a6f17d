"""fastddpm.DDPMScheduler / DDIMScheduler against diffusers' classes of the same names (diffusers 0.42)."""

import contextlib
import copy
import itertools
import json
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

from fastddpm import schedulers as S
from fastddpm.schedulers import DDIMScheduler, DDPMScheduler
from fastddpm.schedules import get_beta_schedule
from tests.conftest import rel_err

diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

D_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")  # diffusers' DDPMScheduler
DDIM_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # diffusers' DDIMScheduler
SPACINGS = ("leading", "trailing", "linspace")
TOL = 1e-5


def inputs(shape=(3, 3, 6, 5), seed=0, channels_out=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    out_shape = (shape[0], channels_out or shape[1], *shape[2:])
    m = torch.randn(out_shape, generator=g)
    return x.to(dtype), m.to(dtype)


def with_variance_channels(m, variance_type, seed=1):
    """Append the model's variance channels: a positive variance ('learned') or v ∈ [−1, 1]
    ('learned_range')."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(m.shape, generator=g, dtype=m.dtype)
    v = 1e-4 + 0.02 * v if variance_type == "learned" else 2 * v - 1
    return torch.cat([m, v], dim=1)


def as_float64(sched):
    """diffusers' own formulas evaluated in float64 on the same alphas_cumprod (the exact value of its
    step)."""
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod).double()
    return sched


def gen(seed=1234):
    return torch.Generator().manual_seed(seed)


def step_both(ours, theirs, m, t, x, **kw):
    a = theirs.step(m, t, x, generator=gen(), **kw)
    b = ours.step(m, t, x, generator=gen(), **kw)
    return a, b


# ----------------------------------------------------------------------------- schedules and config
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("beta_schedule", D_SCHEDULES + ("laplace",))
def test_betas_and_alphas_cumprod_bit_identical(beta_schedule, rescale):
    kw = dict(beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale, num_train_timesteps=500)
    theirs, ours = diffusers.DDPMScheduler(**kw), DDPMScheduler(**kw)
    assert torch.equal(ours.betas, theirs.betas)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    if beta_schedule in DDIM_SCHEDULES:
        theirs, ours = diffusers.DDIMScheduler(**kw), DDIMScheduler(**kw)
        assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
        assert torch.equal(torch.as_tensor(ours.final_alpha_cumprod),
                           torch.as_tensor(theirs.final_alpha_cumprod))


@pytest.mark.parametrize("diffusers_name, name", [("linear", "linear"), ("scaled_linear", "quad"),
                                                  ("sigmoid", "sigmoid"), ("squaredcos_cap_v2", "cosine")])
def test_diffusers_beta_schedules_are_those_of_schedules_py(diffusers_name, name):
    """The betas built in float32 as diffusers builds them are fastddpm.schedules' float64 ones, rounded."""
    for timesteps in (1, 2, 7, 50, 880, 1000):
        kw = {} if name == "cosine" else dict(beta_start=0.00085, beta_end=0.012)
        ours = DDPMScheduler(num_train_timesteps=timesteps, beta_schedule=diffusers_name, **kw).betas
        assert ours.dtype == torch.float32
        assert rel_err(ours, get_beta_schedule(name, timesteps, **kw)) < 1e-6, timesteps


def test_trained_betas_and_attributes():
    betas = torch.linspace(1e-3, 0.05, 50).tolist()
    theirs, ours = diffusers.DDPMScheduler(trained_betas=betas), DDPMScheduler(trained_betas=betas)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod) and len(ours) == 1000 == len(theirs)
    assert ours.config.trained_betas == betas
    assert ours.init_noise_sigma == theirs.init_noise_sigma == 1.0 and ours.order == theirs.order == 1
    x = torch.randn(2, 3, 4, 4)
    assert ours.scale_model_input(x, 5) is x
    with pytest.raises(NotImplementedError):
        DDPMScheduler(beta_schedule="nope")
    with pytest.raises(ValueError):
        DDPMScheduler(variance_type="nope")
    with pytest.raises(ValueError):
        DDIMScheduler(prediction_type="nope")


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("beta_schedule", D_SCHEDULES)
def test_add_noise_and_get_velocity(beta_schedule, rescale):
    kw = dict(beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale)
    theirs, ours = diffusers.DDPMScheduler(**kw), DDPMScheduler(**kw)
    x, noise = inputs((6, 3, 5, 4))
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    assert rel_err(ours.add_noise(x, noise, t), theirs.add_noise(x, noise, t)) < 1e-6
    assert rel_err(ours.get_velocity(x, noise, t), theirs.get_velocity(x, noise, t)) < 1e-6
    # one timestep for the whole batch, and other ranks
    t1 = torch.tensor(700)
    assert rel_err(ours.add_noise(x, noise, t1), theirs.add_noise(x, noise, t1)) < 1e-6
    x2, n2 = x.flatten(1), noise.flatten(1)
    assert rel_err(ours.add_noise(x2, n2, t), theirs.add_noise(x2, n2, t)) < 1e-6
    # half precision computes in fp32 and returns the input dtype
    half = ours.add_noise(x.half(), noise.half(), t)
    assert half.dtype == torch.float16
    assert rel_err(half, theirs.add_noise(x.half().float(), noise.half().float(), t)) < 1e-3


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_set_timesteps_all_spacings(cls):
    for spacing, offset in itertools.product(SPACINGS, (0, 1)):
        kw = dict(timestep_spacing=spacing, steps_offset=offset)
        theirs, ours = getattr(diffusers, cls)(**kw), getattr(S, cls)(**kw)
        for n in (1, 3, 7, 10, 50, 999):
            theirs.set_timesteps(n)
            ours.set_timesteps(n)
            assert torch.equal(ours.timesteps, theirs.timesteps), (spacing, offset, n)
            assert ours.timesteps.dtype == torch.int64 and ours.num_inference_steps == n
    ours = getattr(S, cls)()
    with pytest.raises(ValueError):
        ours.set_timesteps(1001)
    with pytest.raises(ValueError):
        getattr(S, cls)(timestep_spacing="nope").set_timesteps(10)


def test_ddpm_custom_timesteps_and_previous_timestep():
    theirs, ours = diffusers.DDPMScheduler(), DDPMScheduler()
    for t in (999, 500, 1, 0):  # no schedule: t − 1
        assert ours.previous_timestep(t) == theirs.previous_timestep(t)
    custom = [900, 700, 400, 120, 5]
    theirs.set_timesteps(timesteps=custom)
    ours.set_timesteps(timesteps=custom)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.custom_timesteps
    for spacing, n in itertools.product(SPACINGS, (3, 7, 10)):
        theirs, ours = (diffusers.DDPMScheduler(timestep_spacing=spacing),
                        DDPMScheduler(timestep_spacing=spacing))
        theirs.set_timesteps(n)
        ours.set_timesteps(n)
        for t in ours.timesteps.tolist():
            assert ours.previous_timestep(t) == int(theirs.previous_timestep(t))
        prev = ours.previous_timestep(ours.timesteps)  # a tensor in, a tensor out, looked up on its device
        assert prev.tolist() == ours.timesteps.tolist()[1:] + [-1]
    with pytest.raises(ValueError):
        ours.set_timesteps(timesteps=[5, 10])
    with pytest.raises(ValueError):
        ours.set_timesteps(10, timesteps=[10, 5])
    with pytest.raises(ValueError):
        ours.set_timesteps(timesteps=[1000, 5])


# ----------------------------------------------------------------------------- DDPM step
@pytest.mark.parametrize("prediction_type", S.PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", S.VARIANCE_TYPES)
@pytest.mark.parametrize("beta_schedule", D_SCHEDULES)
def test_ddpm_step_matches_diffusers(beta_schedule, variance_type, prediction_type):
    kw = dict(beta_schedule=beta_schedule, variance_type=variance_type, prediction_type=prediction_type)
    # fixed_large_log: diffusers' step is NaN (√ of log β); ours is σ = exp(½ log β) = √β, i.e. fixed_large's.
    reference_kw = {**kw, "variance_type": "fixed_large"} if variance_type == "fixed_large_log" else kw
    x, m = inputs()
    if variance_type.startswith("learned"):
        m = with_variance_channels(m, variance_type)

    # 1) a respaced schedule (10 steps, every spacing), float32 against float32, same seed.
    for spacing in SPACINGS:
        theirs = diffusers.DDPMScheduler(**reference_kw, timestep_spacing=spacing)
        ours = DDPMScheduler(**kw, timestep_spacing=spacing)
        theirs.set_timesteps(10)
        ours.set_timesteps(10)
        for t in ours.timesteps.tolist():
            a, b = step_both(ours, theirs, m, t, x)
            assert torch.isfinite(b.prev_sample).all()
            assert rel_err(b.prev_sample, a.prev_sample) < TOL, (spacing, t)
            assert rel_err(b.pred_original_sample, a.pred_original_sample) < TOL, (spacing, t)
            if spacing == "leading":  # a 0-d tensor timestep: the same numbers
                c, d = step_both(ours, theirs, m, torch.tensor(t), x)
                assert rel_err(d.prev_sample, c.prev_sample) < TOL

    # 2) the 1000-step schedule at every kind of t, against diffusers' formulas evaluated in float64 (same
    #    seed; float32 diffusers loses digits in 1 − ᾱ_t/ᾱ_{t−1} at small t, see test_ddpm_small_t_accuracy).
    theirs, ours = as_float64(diffusers.DDPMScheduler(**reference_kw)), DDPMScheduler(**kw)
    x64, m64 = x.double(), m.double()
    for t in (999, 998, 600, 100, 12, 2, 1, 0):
        a, b = step_both(ours, theirs, m64, t, x64)
        assert rel_err(b.prev_sample, a.prev_sample) < 1e-6, t
        assert rel_err(b.pred_original_sample, a.pred_original_sample) < 1e-6, t


@pytest.fixture
def diffusers_float32_noise(monkeypatch):
    """diffusers' DDPM step draws its noise in float32 (then casts), as ours does for float32 samples, so that
    a float64 evaluation of its formulas can be compared with our float32 step under the same seed."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    def randn_float32(shape, generator=None, device=None, dtype=None, layout=None):
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    monkeypatch.setattr(ddpm_module, "randn_tensor", randn_float32)


@pytest.mark.parametrize("beta_schedule", D_SCHEDULES)
def test_ddpm_small_t_accuracy(beta_schedule, diffusers_float32_noise):
    """At small t of a 1000-step schedule β_t = 1 − ᾱ_t/ᾱ_{t−1} cancels. We compute it in float64: our float32
    step stays within 1e-6 of diffusers' formula evaluated in float64, where diffusers' own float32 step is up
    to ~1e-4 off."""
    exact = as_float64(diffusers.DDPMScheduler(beta_schedule=beta_schedule))
    ours = DDPMScheduler(beta_schedule=beta_schedule)
    x, m = inputs()
    for t in range(1, 30):
        b = ours.step(m, t, x, generator=gen()).prev_sample
        e = exact.step(m.double(), t, x.double(), generator=gen()).prev_sample
        assert rel_err(b, e) < 1e-6, t


@pytest.mark.parametrize("variance_type", ["fixed_large_log", "fixed_small_log"])
def test_log_variance_types_are_finite_and_right(variance_type):
    ours = DDPMScheduler(variance_type=variance_type)
    plain = DDPMScheduler(variance_type=variance_type.replace("_log", ""))
    x, m = inputs()
    for t in (999, 500, 20, 1):
        a = ours.step(m, t, x, generator=gen()).prev_sample
        assert torch.isfinite(a).all()
        assert rel_err(a, plain.step(m, t, x, generator=gen()).prev_sample) < 1e-6
    # σ_t = exp(½·log β_t) (fixed_large_log) or exp(½·log β̃_t) (fixed_small_log), from the float64 definitions
    ac = ours.alphas_cumprod.double()
    beta = 1 - ac[1:] / ac[:-1]
    sigma = beta if variance_type == "fixed_large_log" else beta * (1 - ac[:-1]) / (1 - ac[1:])
    table = ours._step_table("cpu")
    assert rel_err(table[6, 1:], torch.exp(0.5 * sigma.log())) < 1e-6


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("option", ["clip2", "no_clip", "threshold", "threshold_low", "zero_snr"])
def test_step_x0_options(cls, option):
    kw = {"clip2": dict(clip_sample_range=2.0), "no_clip": dict(clip_sample=False),
          "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0),
          "threshold_low": dict(thresholding=True, sample_max_value=0.5),
          "zero_snr": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                           timestep_spacing="trailing")}[option]
    theirs, ours = getattr(diffusers, cls)(**kw), getattr(S, cls)(**kw)
    theirs.set_timesteps(10)
    ours.set_timesteps(10)
    x, m = inputs()
    x, m = 3 * x, 4 * m
    extra = dict(eta=0.8) if cls == "DDIMScheduler" else {}
    for t in ours.timesteps.tolist():
        a, b = step_both(ours, theirs, m, t, x, **extra)
        assert rel_err(b.prev_sample, a.prev_sample) < TOL, t
        assert rel_err(b.pred_original_sample, a.pred_original_sample) < TOL, t


def test_ddpm_per_sample_timesteps_equal_per_sample_loop():
    for variance_type in ("fixed_small", "learned_range"):
        ours = DDPMScheduler(variance_type=variance_type, prediction_type="v_prediction")
        ours.set_timesteps(10, device="cpu")
        x, m = inputs((5, 3, 4, 4))
        if variance_type == "learned_range":
            m = with_variance_channels(m, variance_type)
        t = torch.tensor([900, 0, 500, 100, 0])
        batched = ours.step(m, t, x, generator=[gen(i) for i in range(5)])
        for i in range(5):
            one = ours.step(m[i:i + 1], int(t[i]), x[i:i + 1], generator=gen(i))
            assert torch.allclose(batched.prev_sample[i:i + 1], one.prev_sample, rtol=1e-6, atol=1e-7)
            assert torch.allclose(batched.pred_original_sample[i:i + 1], one.pred_original_sample, rtol=1e-6,
                                  atol=1e-7)
        # and equal to diffusers' per-sample steps with the same per-sample generators
        theirs = diffusers.DDPMScheduler(variance_type=variance_type, prediction_type="v_prediction")
        theirs.set_timesteps(10)
        for i in range(5):
            one = theirs.step(m[i:i + 1], int(t[i]), x[i:i + 1], generator=gen(i))
            assert rel_err(batched.prev_sample[i:i + 1], one.prev_sample) < TOL


def test_ddpm_tuple_output_and_errors():
    ours = DDPMScheduler()
    x, m = inputs()
    prev, x0 = ours.step(m, 10, x, generator=gen(), return_dict=False)
    out = ours.step(m, 10, x, generator=gen())
    assert (torch.equal(prev, out.prev_sample) and torch.equal(out[1], x0)
            and torch.equal(out["prev_sample"], prev))
    with pytest.raises(ValueError):
        ours.step(m[:, :2], 10, x)
    with pytest.raises(ValueError):
        ours.step(m, 1000, x)
    with pytest.raises(TypeError):
        ours.step(m, torch.tensor(10.0), x)
    with pytest.raises(ValueError):
        ours.step(m, torch.tensor([1, 2]), x)  # batch of 3
    with pytest.raises(ValueError):
        DDPMScheduler(variance_type="learned").step(m, 10, x)  # no variance channels
    ours.set_timesteps(10)
    with pytest.raises(ValueError, match="not in the current schedule"):
        ours.step(m, 901, x)
    # a tensor timestep is never read on the host: off the schedule the step is NaN (diffusers raises)
    assert torch.isnan(ours.step(m, torch.tensor(901), x).prev_sample).all()


def test_half_precision_computes_in_fp32():
    for dtype in (torch.float16, torch.bfloat16):
        x, m = inputs(dtype=dtype)
        exact = diffusers.DDPMScheduler(prediction_type="v_prediction")
        ours = DDPMScheduler(prediction_type="v_prediction")
        for t in (0, 300):  # deterministic parts: t = 0 adds no noise; at 300 compare x̂0
            a = ours.step(m, t, x, generator=gen())
            ref = exact.step(m.float(), t, x.float(), generator=gen())
            low = exact.step(m, t, x, generator=gen())  # diffusers computes in the input dtype
            assert a.prev_sample.dtype == dtype and a.pred_original_sample.dtype == dtype
            ours_err = rel_err(a.pred_original_sample, ref.pred_original_sample)
            assert ours_err <= rel_err(low.pred_original_sample, ref.pred_original_sample) * 1.01 + 1e-7
            if t == 0:
                assert (rel_err(a.prev_sample, ref.prev_sample)
                        <= rel_err(low.prev_sample, ref.prev_sample) * 1.01)
        ddim, ddim_theirs = DDIMScheduler(), diffusers.DDIMScheduler()
        ddim.set_timesteps(10)
        ddim_theirs.set_timesteps(10)
        a = ddim.step(m, 500, x)
        ref = ddim_theirs.step(m.float(), 500, x.float())
        low = ddim_theirs.step(m, 500, x)
        assert a.prev_sample.dtype == dtype
        assert (rel_err(a.prev_sample, ref.prev_sample)
                <= rel_err(low.prev_sample, ref.prev_sample) * 1.01 + 1e-7)


# ----------------------------------------------------------------------------- DDIM step
@pytest.mark.parametrize("prediction_type", S.PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", DDIM_SCHEDULES)
def test_ddim_step_matches_diffusers(beta_schedule, prediction_type):
    x, m = inputs()
    for set_alpha_to_one, spacing, n in itertools.product((True, False), ("leading", "trailing"), (10, 4)):
        if spacing == "trailing" and 1000 % n:
            continue  # diffusers steps between the schedule's timesteps there: test_ddim_non_uniform_spacing
        kw = dict(beta_schedule=beta_schedule, prediction_type=prediction_type,
                  set_alpha_to_one=set_alpha_to_one, timestep_spacing=spacing,
                  steps_offset=1 if spacing == "leading" else 0)
        theirs, ours = diffusers.DDIMScheduler(**kw), DDIMScheduler(**kw)
        theirs.set_timesteps(n)
        ours.set_timesteps(n)
        for t, eta, clipped in itertools.product(ours.timesteps.tolist(), (0.0, 0.6, 1.0), (False, True)):
            a, b = step_both(ours, theirs, m, t, x, eta=eta, use_clipped_model_output=clipped)
            assert rel_err(b.prev_sample, a.prev_sample) < TOL, (kw, t, eta, clipped)
            assert rel_err(b.pred_original_sample, a.pred_original_sample) < TOL
        noise = torch.randn(x.shape, generator=gen(5))
        t = int(ours.timesteps[1])
        a = theirs.step(m, t, x, eta=0.5, variance_noise=noise)
        b = ours.step(m, t, x, eta=0.5, variance_noise=noise)
        assert rel_err(b.prev_sample, a.prev_sample) < TOL


def test_ddim_non_uniform_spacing_steps_to_the_next_timestep():
    """'linspace' (and 'trailing' with a step count that does not divide T): we step to the schedule's next
    timestep; diffusers steps by T // N and lands between them."""
    for spacing, n in (("linspace", 10), ("trailing", 3), ("linspace", 7)):
        ours = DDIMScheduler(timestep_spacing=spacing, prediction_type="sample", clip_sample=False)
        ours.set_timesteps(n)
        steps = ours.timesteps.tolist()
        ac = ours.alphas_cumprod.double()
        x, m = inputs()
        for t, t_next in zip(steps, steps[1:] + [-1]):
            assert ours.previous_timestep(t) == t_next
            out = ours.step(m, t, x)
            # DDIM with η = 0 (Song et al. eq. 12) to ᾱ of the next timestep, in float64
            a_t, a_prev = ac[t], (ac[t_next] if t_next >= 0 else torch.tensor(1.0, dtype=torch.float64))
            eps = (x.double() - a_t.sqrt() * m.double()) / (1 - a_t).sqrt()
            expected = a_prev.sqrt() * m.double() + (1 - a_prev).sqrt() * eps
            assert rel_err(out.prev_sample, expected) < TOL, (spacing, t)
    # a timestep off the schedule steps by T // N, as diffusers
    ours, theirs = (DDIMScheduler(timestep_spacing="linspace"),
                    diffusers.DDIMScheduler(timestep_spacing="linspace"))
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    a, b = step_both(ours, theirs, m, 505, x)
    assert rel_err(b.prev_sample, a.prev_sample) < TOL


def test_ddim_per_sample_timesteps_equal_per_sample_loop_and_errors():
    ours = DDIMScheduler(prediction_type="epsilon")
    x, m = inputs((4, 3, 4, 4))
    with pytest.raises(ValueError, match="set_timesteps"):
        ours.step(m, 10, x)
    ours.set_timesteps(20)
    t = torch.tensor([950, 0, 500, 50])
    noise = torch.randn(x.shape, generator=gen(3))
    batched = ours.step(m, t, x, eta=0.7, variance_noise=noise)
    for i in range(4):
        one = ours.step(m[i:i + 1], int(t[i]), x[i:i + 1], eta=0.7, variance_noise=noise[i:i + 1])
        assert torch.allclose(batched.prev_sample[i:i + 1], one.prev_sample, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        ours.step(m, 10, x, eta=0.5, generator=gen(), variance_noise=noise)
    with pytest.raises(TypeError):
        ours.step(m, 10, x, eta=torch.tensor(0.5))


# ----------------------------------------------------------------------------- no host sync
@contextlib.contextmanager
def no_host_reads():
    """Inside, every way of reading a tensor's value on the host raises."""
    names = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def forbid(name):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} was called: a host sync in step")
        return raiser

    try:
        for name in names:
            setattr(torch.Tensor, name, forbid(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_step_reads_no_tensor_value(cls):
    kw = dict(thresholding=True) if cls == "DDPMScheduler" else dict(clip_sample=True)
    ours = getattr(S, cls)(**kw)
    ours.set_timesteps(10)
    x, m = inputs()
    t = torch.tensor([900, 0, 400])
    extra = dict(eta=1.0) if cls == "DDIMScheduler" else {}
    expected = ours.step(m, t, x, generator=gen(), **extra).prev_sample  # builds the tables
    with no_host_reads():
        out = ours.step(m, t, x, generator=gen(), **extra)
        out2 = ours.step(m, torch.tensor(500), x, **extra)  # a 0-d tensor is not read either
    assert out2.prev_sample.shape == x.shape
    assert torch.equal(out.prev_sample, expected)


def test_learned_range_step_reads_no_tensor_value():
    ours = DDPMScheduler(variance_type="learned_range")
    x, m = inputs()
    m = with_variance_channels(m, "learned_range")
    t = torch.tensor([999, 0, 10])
    expected = ours.step(m, t, x, generator=gen()).prev_sample
    with no_host_reads():
        out = ours.step(m, t, x, generator=gen()).prev_sample
    assert torch.equal(out, expected)


def test_no_host_reads_catches_a_read():
    with pytest.raises(AssertionError, match="host sync"):
        with no_host_reads():
            if torch.tensor(1) > 0:
                pass


@pytest.mark.cuda
def test_step_does_not_sync_on_gpu():
    device = torch.device("cuda")
    for cls, extra in (("DDPMScheduler", {}), ("DDIMScheduler", {"eta": 1.0})):
        ours = getattr(S, cls)(thresholding=True)
        ours.set_timesteps(50, device=device)
        x, m = (v.to(device) for v in inputs())
        g = torch.Generator(device).manual_seed(0)
        t = torch.tensor([980, 0, 500], device=device)
        ours.step(m, t, x, generator=g, **extra)  # warm-up: tables go to the device
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step_t in (t, ours.timesteps[3]):
                ours.step(m, step_t, x, generator=g, **extra)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        theirs = getattr(diffusers, cls)(thresholding=True)
        theirs.set_timesteps(50)
        a = theirs.step(m, int(ours.timesteps[3]), x, generator=torch.Generator(device).manual_seed(1),
                        **extra)
        b = ours.step(m, ours.timesteps[3], x, generator=torch.Generator(device).manual_seed(1), **extra)
        assert rel_err(b.prev_sample, a.prev_sample) < TOL


# ----------------------------------------------------------------------------- config files
def arguments(config) -> dict:
    """A config without ``_use_default_values`` (which a config read from a file holding every key has
    not)."""
    return {k: v for k, v in config.items() if k != "_use_default_values"}


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_config_round_trip_with_diffusers(cls, tmp_path):
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
              prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=1, clip_sample=False,
              rescale_betas_zero_snr=True)
    ours = getattr(S, cls)(**kw)
    ours.save_config(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == cls and saved["_diffusers_version"] == S.DIFFUSERS_VERSION
    assert "_use_default_values" not in saved and "_use_default_values" in ours.config  # as diffusers
    theirs = getattr(diffusers, cls).from_pretrained(tmp_path / "ours")  # ours → diffusers
    for key, value in arguments(ours.config).items():
        assert theirs.config[key] == value, key
    getattr(diffusers, cls)(**kw, trained_betas=None).save_config(tmp_path / "theirs")
    back = getattr(S, cls).from_pretrained(tmp_path / "theirs")  # diffusers → ours
    assert dict(back.config) == arguments(ours.config)
    assert dict(getattr(S, cls).from_config(theirs.config).config) == arguments(ours.config)
    assert torch.equal(back.alphas_cumprod, theirs.alphas_cumprod)
    # subfolder, a file path, overrides, unused keys
    (tmp_path / "pipe" / "scheduler").mkdir(parents=True)
    ours.save_pretrained(tmp_path / "pipe" / "scheduler")
    sub = getattr(S, cls).from_pretrained(tmp_path / "pipe", subfolder="scheduler", prediction_type="epsilon")
    assert sub.config.prediction_type == "epsilon" and sub.config.steps_offset == 1
    same = getattr(S, cls).from_pretrained(tmp_path / "ours" / "scheduler_config.json")
    assert dict(same.config) == arguments(ours.config)
    _, unused = getattr(S, cls).from_config({**ours.config, "skip_prk_steps": True},
                                            return_unused_kwargs=True, foo=1)
    assert unused == {"skip_prk_steps": True, "foo": 1}
    with pytest.raises(OSError):
        getattr(S, cls).from_pretrained(tmp_path / "missing_folder_in_tmp")


def test_config_across_classes_and_frozen():
    ours = DDPMScheduler(variance_type="fixed_large", beta_schedule="squaredcos_cap_v2")
    ddim = DDIMScheduler.from_config(ours.config)  # our DDPM config → our DDIM
    assert ddim.config.beta_schedule == "squaredcos_cap_v2" and "variance_type" not in ddim.config
    theirs = diffusers.DDIMScheduler.from_config(ours.config)  # → diffusers' DDIM
    assert theirs.config.beta_schedule == "squaredcos_cap_v2"
    ours_from_theirs = DDPMScheduler.from_config(diffusers.DDIMScheduler(beta_end=0.03).config)
    assert ours_from_theirs.config.beta_end == 0.03
    config = ours.config
    assert config.num_train_timesteps == config["num_train_timesteps"] == 1000
    with pytest.raises(TypeError):
        config["beta_end"] = 1.0
    with pytest.raises(TypeError):
        config.beta_end = 1.0
    with pytest.raises(TypeError):
        config.pop("beta_end")
    assert dict(copy.deepcopy(ours).config) == dict(config)
    assert dict(pickle.loads(pickle.dumps(ours)).config) == dict(config)
    assert "DDPMScheduler" in repr(ours)
    ours.register_to_config(prediction_type="sample")
    assert ours.config.prediction_type == "sample"


# ----------------------------------------------------------------------------- sampling loops
class FixedConv(torch.nn.Module):
    """A tiny deterministic 'network': a seeded random 3×3 convolution."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.copy_(torch.randn(3, generator=g) * 0.1)

    def forward(self, x, t):
        return self.conv(x)


def sample_loop(sched, model, steps, seed, dtype=torch.float32, shape=(2, 3, 8, 8), **step_kw):
    g = gen(seed)
    x = randn_tensor(shape, generator=g, dtype=dtype)
    sched.set_timesteps(steps)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x, generator=g, **step_kw).prev_sample
    return x


@pytest.mark.parametrize("case", [
    ("DDPMScheduler", dict(), 25, {}),
    ("DDPMScheduler", dict(prediction_type="v_prediction", variance_type="fixed_large",
                           beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"), 10, {}),
    ("DDIMScheduler", dict(), 25, dict(eta=0.0)),
    ("DDIMScheduler", dict(prediction_type="sample", set_alpha_to_one=False, thresholding=True), 20,
     dict(eta=1.0)),
], ids=["ddpm", "ddpm-v-cosine", "ddim", "ddim-eta1"])
def test_sampling_loop_same_image_as_diffusers(case):
    cls, kw, steps, step_kw = case
    model = FixedConv()
    a = sample_loop(getattr(diffusers, cls)(**kw), model, steps, seed=11, **step_kw)
    b = sample_loop(getattr(S, cls)(**kw), model, steps, seed=11, **step_kw)
    assert rel_err(b, a) < TOL
    c = sample_loop(getattr(S, cls)(**kw), model, steps, seed=12, **step_kw)
    assert rel_err(c, a) > 1e-2  # another seed, another image


@pytest.mark.parametrize("beta_schedule", ["squaredcos_cap_v2"])
def test_full_1000_step_ddpm_loop(beta_schedule, diffusers_float32_noise):
    """The 1000-step loop: ours in float32 against diffusers' formulas evaluated in float64 with the same
    noise (diffusers' float32 loop is ~2e-4 off that with the cosine schedule, from its small-t
    cancellation)."""
    shape = (2, 3, 4, 4)
    ours = sample_loop(DDPMScheduler(beta_schedule=beta_schedule), FixedConv(), 1000, seed=3, shape=shape)
    model64 = FixedConv().double()
    g = gen(3)
    x = randn_tensor(shape, generator=g, dtype=torch.float32).double()
    exact = as_float64(diffusers.DDPMScheduler(beta_schedule=beta_schedule))
    exact.set_timesteps(1000)
    with torch.no_grad():
        for t in exact.timesteps:
            x = exact.step(model64(x, t), t, x, generator=g).prev_sample
    assert rel_err(ours, x) < TOL


def test_ddpm_pipeline_with_our_scheduler():
    """diffusers' DDPMPipeline runs with our scheduler and gives diffusers' image."""
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                 layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2).eval()
    images = []
    for sched in (diffusers.DDPMScheduler(), DDPMScheduler()):
        pipe = diffusers.DDPMPipeline(unet=unet, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(batch_size=2, generator=gen(0), num_inference_steps=3, output_type="np").images)
    assert abs(images[0] - images[1]).max() < 1e-5


# ---------------------------------------------------------------------------- the rest of diffusers' contract
@pytest.mark.parametrize("variance_type", S.VARIANCE_TYPES)
@pytest.mark.parametrize("schedule", ["train", "leading", "trailing", "custom"])
def test_ddpm_get_variance_as_diffusers(variance_type, schedule):
    """diffusers' pipelines call scheduler._get_variance(t, predicted_variance): the same values as diffusers'
    formulas evaluated in float64 (and a tensor timestep gives them per sample)."""
    kw = dict(variance_type=variance_type, beta_schedule="squaredcos_cap_v2", timestep_spacing=schedule)
    if schedule in ("train", "custom"):
        kw.pop("timestep_spacing")
    ours, exact = DDPMScheduler(**kw), as_float64(diffusers.DDPMScheduler(**kw))
    if schedule == "custom":
        for s in (ours, exact):
            s.set_timesteps(timesteps=[900, 640, 333, 90, 7, 0])
    elif schedule != "train":
        for s in (ours, exact):
            s.set_timesteps(20)
    steps = ([int(t) for t in exact.timesteps][:: max(1, len(exact.timesteps) // 7)]
             + [int(exact.timesteps[-1])])
    # learned: a variance > 0; learned_range: v ∈ [−1, 1]
    v = torch.rand(len(steps), generator=gen(2)) * 2 - 1
    predicted = v.abs() * 0.02 + 1e-4 if variance_type == "learned" else v
    for i, t in enumerate(steps):
        a = ours._get_variance(t, predicted_variance=predicted[i])
        b = exact._get_variance(t, predicted_variance=predicted[i].double())
        assert a.dtype == torch.float32 and a.shape == b.shape == ()
        assert rel_err(a, b) <= 1e-6, (t, float(a), float(b))
    per_sample = ours._get_variance(torch.tensor(steps), predicted_variance=predicted)
    assert torch.equal(per_sample,
                       torch.stack([ours._get_variance(t, predicted[i]) for i, t in enumerate(steps)]))
    if variance_type != "learned":
        # the variance_type argument
        other = "fixed_large" if variance_type != "fixed_large" else "fixed_small"
        assert rel_err(ours._get_variance(steps[0], predicted[0], variance_type=other),
                       exact._get_variance(steps[0], predicted[0].double(), variance_type=other)) <= 1e-6


def test_ddpm_get_variance_refuses_bad_timesteps():
    ours = DDPMScheduler()
    ours.set_timesteps(10)
    with pytest.raises(ValueError, match="not in the current schedule"):
        ours._get_variance(5)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1000\)"):
        ours._get_variance(1000)
    with pytest.raises(TypeError, match="integer tensor"):
        ours._get_variance(torch.tensor(3.0))
    with pytest.raises(ValueError, match="predicted_variance"):
        DDPMScheduler(variance_type="learned_range")._get_variance(3)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_get_variance_as_diffusers(set_alpha_to_one):
    kw = dict(beta_schedule="scaled_linear", set_alpha_to_one=set_alpha_to_one)
    ours, exact = DDIMScheduler(**kw), as_float64(diffusers.DDIMScheduler(**kw))
    pairs = [(999, 979), (500, 480), (21, 1), (20, 0), (20, -1), (0, -1), (7, 3)]
    for t, prev in pairs:
        a, b = ours._get_variance(t, prev), exact._get_variance(t, prev)
        assert a.dtype == torch.float32 and a.shape == ()
        assert abs(float(a) - float(b)) <= 1e-6 * abs(float(b)) + 1e-30, (t, prev, float(a), float(b))
    t, prev = (torch.tensor(p) for p in zip(*pairs))
    assert torch.equal(ours._get_variance(t, prev), torch.stack([ours._get_variance(*p) for p in pairs]))
    with pytest.raises(ValueError, match="timestep must lie"):
        ours._get_variance(1000, 980)


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("kw", [{}, dict(timestep_spacing="leading", beta_end=0.03), dict(steps_offset=1)])
def test_config_records_default_values_as_diffusers(cls, kw):
    """config["_use_default_values"] names the arguments left at their defaults, so that another class's
    from_config takes its own defaults for them (EulerDiscreteScheduler: 'linspace' spacing, not
    'leading')."""
    ours, theirs = getattr(S, cls)(**kw), getattr(diffusers, cls)(**kw)
    assert set(ours.config["_use_default_values"]) == set(theirs.config["_use_default_values"])
    euler_ours = diffusers.EulerDiscreteScheduler.from_config(ours.config)
    euler_theirs = diffusers.EulerDiscreteScheduler.from_config(theirs.config)
    assert euler_ours.config.timestep_spacing == euler_theirs.config.timestep_spacing
    assert euler_ours.config.timestep_spacing == kw.get("timestep_spacing", "linspace")
    assert arguments(euler_ours.config) == arguments(euler_theirs.config)
    ours_again = getattr(S, cls).from_config(ours.config)  # → our class: the recorded defaults stay defaults
    assert set(ours_again.config["_use_default_values"]) == set(ours.config["_use_default_values"])
    assert dict(ours_again.config) == dict(ours.config)


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_step_output_is_an_ordered_dict_as_diffusers(cls):
    x, m = inputs()
    outs = []
    for module in (diffusers, S):
        sched = getattr(module, cls)()
        sched.set_timesteps(10)
        outs.append(sched.step(m, int(sched.timesteps[3]), x, generator=gen()))
    theirs, ours = outs
    assert isinstance(ours, dict) and isinstance(theirs, dict)
    assert list(ours.keys()) == list(theirs.keys()) == ["prev_sample", "pred_original_sample"]
    assert len(ours) == len(theirs) == 2
    assert [k for k, _ in ours.items()] == list(ours) and len(list(ours.values())) == 2
    assert ours[0] is ours["prev_sample"] is ours.prev_sample and ours[1] is ours.pred_original_sample
    assert ours[-1:] == ours.to_tuple()[-1:] and len(ours.to_tuple()) == 2
    assert rel_err(ours.prev_sample, theirs.prev_sample) < TOL
    for method in ("pop", "setdefault", "update", "__delitem__"):
        with pytest.raises(Exception):
            getattr(theirs, method)("prev_sample")
        with pytest.raises(TypeError):
            getattr(ours, method)("prev_sample")
    replaced = copy.copy(ours)
    replaced.prev_sample = x  # an attribute set keeps the dict in step, as diffusers'
    assert replaced["prev_sample"] is x and replaced[0] is x
    for again in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(again) is type(ours) and list(again) == list(ours)
        assert torch.equal(again.prev_sample, ours.prev_sample) and torch.equal(again[1], ours[1])
    only = S.DDPMSchedulerOutput(prev_sample=x)  # None fields are left out, as diffusers'
    assert list(only) == ["prev_sample"] and only.to_tuple() == (x,)


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_config_attribute_access_warns_as_diffusers(cls):
    ours, theirs = getattr(S, cls)(), getattr(diffusers, cls)()
    messages = []
    for sched in (theirs, ours):
        with pytest.warns(FutureWarning, match=r"e\.g\. 'scheduler\.config\.num_train_timesteps'") as record:
            assert sched.num_train_timesteps == 1000
        assert len(record) == 1
        messages.append(str(record[0].message))
    assert messages[0] == messages[1]
    assert record[0].filename == __file__  # it points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.betas, ours.config.num_train_timesteps, len(ours)  # attributes and config reads stay silent
    assert ours._deprecated_kwargs == theirs._deprecated_kwargs == []
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ours.nope


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_compatibles_list_what_diffusers_lists(cls):
    ours, theirs = getattr(S, cls)(), getattr(diffusers, cls)()
    assert set(theirs.compatibles) <= set(ours.compatibles)
    assert set(ours.compatibles) - set(theirs.compatibles) == {DDPMScheduler, DDIMScheduler}
    assert diffusers.EulerDiscreteScheduler in ours.compatibles


def test_compatibles_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "from fastddpm import DDPMScheduler, DDIMScheduler\n"
            "assert DDPMScheduler().compatibles == [DDPMScheduler, DDIMScheduler]\n"
            "assert DDIMScheduler().compatibles == [DDPMScheduler, DDIMScheduler]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
