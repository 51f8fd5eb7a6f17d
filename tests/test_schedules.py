import math

import numpy as np
import pytest
import torch

from fastddpm.schedules import BETA_SCHEDULES, NoiseSchedule, get_beta_schedule


@pytest.mark.parametrize("name", sorted(BETA_SCHEDULES))
@pytest.mark.parametrize("timesteps", [1, 2, 7, 1000])
def test_every_schedule_is_valid_float64(name, timesteps):
    betas = get_beta_schedule(name, timesteps)
    assert betas.dtype == torch.float64 and betas.shape == (timesteps,)
    assert torch.isfinite(betas).all() and (betas > 0).all() and (betas <= 1).all()


def test_linear_matches_paper_closed_form():
    betas = get_beta_schedule("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    # ᾱ_T = ∏(1 − β_t), computed independently in numpy: ≈ 4.04e-5 (the paper's linear schedule)
    alpha_bar_T = np.prod(1 - np.linspace(1e-4, 0.02, 1000))
    assert alpha_bar_T == pytest.approx(4.0358e-5, rel=1e-3)
    sched = NoiseSchedule(betas, dtype=torch.float64)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(alpha_bar_T, rel=1e-10)


def test_linear_scale_with_timesteps():
    assert torch.equal(get_beta_schedule("linear", 1000, scale_with_timesteps=True),
                       get_beta_schedule("linear", 1000))
    scaled = get_beta_schedule("linear", 4000, scale_with_timesteps=True)
    assert scaled[0].item() == pytest.approx(2.5e-5) and scaled[-1].item() == pytest.approx(0.005)


def test_quad_is_linear_in_sqrt_beta():
    betas = get_beta_schedule("quad", 500, beta_start=1e-4, beta_end=0.02)
    root = betas.sqrt()
    assert torch.allclose(root.diff().diff(), torch.zeros(498, dtype=torch.float64), atol=1e-15)
    assert root[0].item() == pytest.approx(0.01) and betas[-1].item() == pytest.approx(0.02)


def test_sigmoid_beta_space_symmetry():
    # σ(x) + σ(−x) = 1 ⇒ β_t + β_{T−1−t} = β_start + β_end
    betas = get_beta_schedule("sigmoid", 301, beta_start=1e-4, beta_end=0.02)
    assert torch.allclose(betas + betas.flip(0), torch.full_like(betas, 0.0201), rtol=1e-12)
    assert (betas.diff() > 0).all()


def test_schedules_coincide_where_they_should():
    lin = get_beta_schedule("linear", 100, beta_start=0.01, beta_end=0.01)
    assert torch.allclose(lin, get_beta_schedule("quad", 100, beta_start=0.01, beta_end=0.01), rtol=1e-12)
    assert torch.allclose(lin, get_beta_schedule("const", 100, beta_end=0.01), rtol=1e-12)
    assert torch.allclose(lin, get_beta_schedule("sigmoid", 100, beta_start=0.01, beta_end=0.01), rtol=1e-12)
    warm = get_beta_schedule("warmup10", 1000)
    assert torch.allclose(warm[:100], torch.linspace(1e-4, 0.02, 100, dtype=torch.float64))
    assert (warm[100:] == 0.02).all()
    assert torch.allclose(get_beta_schedule("warmup50", 10)[:5],
                          torch.linspace(1e-4, 0.02, 5, dtype=torch.float64))


def test_cosine_closed_form():
    T, s = 1000, 0.008
    sched = NoiseSchedule(get_beta_schedule("cosine", T), dtype=torch.float64)

    def f(step):
        return math.cos((step / T + s) / (1 + s) * math.pi / 2) ** 2

    for t in [0, 1, 10, 500, 900]:  # away from the β = 0.999 clip at the very end
        assert sched.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert sched.betas.max().item() == pytest.approx(0.999)


def test_sigmoid_alpha_bar_closed_form():
    T = 200
    sched = NoiseSchedule(get_beta_schedule("sigmoid_alpha_bar", T), dtype=torch.float64)

    def sig(v):
        return 1 / (1 + math.exp(-v))

    def ab(step):  # Chen 2023: start −3, end 3, τ 1
        return (sig(3) - sig((step / T) * 6 - 3)) / (sig(3) - sig(-3))

    for t in [0, 5, 100, 180]:
        assert sched.alphas_cumprod[t].item() == pytest.approx(ab(t + 1) / ab(0), rel=1e-9)


def test_jsd_closed_form():
    # β_t = 1/(T − t) ⇒ ᾱ_t = 1 − (t + 1)/T, reaching 0 at the last step
    T = 50
    sched = NoiseSchedule(get_beta_schedule("jsd", T), dtype=torch.float64)
    expected = 1 - torch.arange(1, T + 1, dtype=torch.float64) / T
    assert torch.allclose(sched.alphas_cumprod, expected, atol=1e-14)
    assert sched.zero_terminal_snr


def test_user_betas():
    betas = get_beta_schedule([0.1, 0.2, 0.3])
    assert betas.dtype == torch.float64 and betas.tolist() == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="3 betas given but timesteps=4"):
        get_beta_schedule([0.1, 0.2, 0.3], 4)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        get_beta_schedule([0.1, 0.0])
    with pytest.raises(ValueError, match="NaN or Inf"):
        get_beta_schedule(torch.tensor([0.1, float("nan")]))


@pytest.mark.parametrize("bad, match", [
    (dict(name="lineer", timesteps=10), "unknown beta schedule 'lineer'"),
    (dict(name="linear", timesteps=0), "timesteps must be an integer >= 1"),
    (dict(name="linear", timesteps=2.5), "timesteps must be an integer >= 1"),
    (dict(name="linear", timesteps=10, beta_start=0.1, beta_end=0.01), "beta_start <= beta_end"),
])
def test_bad_schedule_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        get_beta_schedule(**bad)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="unexpected options"):
        get_beta_schedule("linear", 10, s=0.1)


@pytest.mark.parametrize("name", ["linear", "cosine", "quad"])
def test_posterior_tables_match_bayes_rule(name):
    # q(x_{t−1}|x_0) = N(√ᾱ_{t−1} x_0, 1 − ᾱ_{t−1}) and q(x_t|x_{t−1}) = N(√α_t x_{t−1}, β_t):
    # the product of Gaussians gives precision 1/(1 − ᾱ_{t−1}) + α_t/β_t and
    # mean var·(√ᾱ_{t−1} x_0/(1 − ᾱ_{t−1}) + √α_t x_t/β_t).
    T = 300
    betas = get_beta_schedule(name, T).numpy()
    alphas = 1 - betas
    ab = np.cumprod(alphas)
    sched = NoiseSchedule(torch.from_numpy(betas), dtype=torch.float64)
    for t in range(1, T):
        var = 1 / (1 / (1 - ab[t - 1]) + alphas[t] / betas[t])
        c1 = var * math.sqrt(ab[t - 1]) / (1 - ab[t - 1])
        c2 = var * math.sqrt(alphas[t]) / betas[t]
        assert sched.posterior_variance[t].item() == pytest.approx(var, rel=1e-9)
        assert sched.posterior_mean_coef1[t].item() == pytest.approx(c1, rel=1e-9)
        assert sched.posterior_mean_coef2[t].item() == pytest.approx(c2, rel=1e-9)
    # at the first step x_{−1} is x_0 itself: the mean is x_0 and the variance 0
    assert sched.posterior_mean_coef1[0].item() == pytest.approx(1.0)
    assert sched.posterior_mean_coef2[0].item() == pytest.approx(0.0, abs=1e-15)
    assert sched.posterior_variance[0].item() == 0.0
    assert (sched.posterior_log_variance_clipped[0].item()
            == pytest.approx(math.log(sched.posterior_variance[1].item())))


def test_derived_tables():
    sched = NoiseSchedule(get_beta_schedule("linear", 1000), dtype=torch.float64)
    ab = sched.alphas_cumprod
    assert torch.allclose(sched.sqrt_alphas_cumprod ** 2, ab, rtol=1e-12)
    assert torch.allclose(sched.sqrt_one_minus_alphas_cumprod ** 2 + ab, torch.ones_like(ab), rtol=1e-12)
    assert torch.allclose(sched.sqrt_recip_alphas_cumprod * sched.sqrt_alphas_cumprod, torch.ones_like(ab))
    assert torch.allclose(sched.sqrt_recipm1_alphas_cumprod ** 2, 1 / ab - 1, rtol=1e-10)
    assert torch.allclose(sched.snr, ab / (1 - ab), rtol=1e-12)
    assert torch.allclose(sched.alphas_cumprod_prev[1:], ab[:-1]) and sched.alphas_cumprod_prev[0] == 1
    assert torch.allclose(sched.log_one_minus_alphas_cumprod.exp(), 1 - ab, rtol=1e-12)


def test_tables_float32_buffers_not_in_state_dict():
    sched = NoiseSchedule(get_beta_schedule("linear", 10))
    assert all(getattr(sched, n).dtype == torch.float32 for n in NoiseSchedule.TABLES)
    assert sched.state_dict() == {}
    assert sched.num_timesteps == 10
