"""The reference math against independent computations of the paper's formulas."""
import pytest
import torch

from fastddpm import reference
from fastddpm.schedules import NoiseSchedule, get_beta_schedule

from .conftest import rel_err


@pytest.fixture(scope="module")
def sched64():
    return NoiseSchedule(get_beta_schedule("linear", 1000), dtype=torch.float64)


def rand_t(B, T=1000, gen=None):
    t = torch.randint(0, T, (B,), generator=gen)
    t[0], t[-1] = 0, T - 1  # always hit both ends
    return t


def test_q_sample_formula(sched64):
    x0, eps = torch.randn(5, 3, 7, 9, dtype=torch.float64), torch.randn(5, 3, 7, 9, dtype=torch.float64)
    t = rand_t(5)
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].view(-1, 1, 1, 1)
    expected = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    assert rel_err(reference.q_sample(sched64, x0, t, eps), expected) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_q_sample_low_precision_returns_input_dtype(sched64, dtype):
    sched = NoiseSchedule(get_beta_schedule("linear", 1000))
    x0, eps = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = rand_t(4)
    out = reference.q_sample(sched, x0.to(dtype), t, eps.to(dtype))
    assert out.dtype == dtype
    exact = reference.q_sample(sched64, x0.to(dtype).double(), t, eps.to(dtype).double())
    # computed in fp32, rounded once to the output dtype
    assert rel_err(out, exact) <= {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]


def test_q_sample_marginal_statistics(sched64):
    # Over many draws of ε, x_t has mean √ᾱ_t x_0 and variance 1 − ᾱ_t, per sample (eq. 4).
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 250, 999])
    x0 = torch.tensor([0.7, -0.3, 0.9], dtype=torch.float64).view(3, 1)
    n = 200_000
    eps = torch.randn(3, n, generator=gen, dtype=torch.float64)
    xt = reference.q_sample(sched64, x0.expand(3, n), t, eps)
    ab = sched64.alphas_cumprod[t]
    se = (1 - ab).sqrt() / n**0.5
    assert ((xt.mean(1) - ab.sqrt() * x0.view(3)).abs() < 5 * se + 1e-12).all()
    assert torch.allclose(xt.var(1), 1 - ab, rtol=0.02)


def test_predictions_invert_each_other(sched64):
    x0, eps = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randn(6, 2, 4, 4, dtype=torch.float64)
    t = rand_t(6)
    xt = reference.q_sample(sched64, x0, t, eps)
    assert rel_err(reference.predict_start_from_noise(sched64, xt, t, eps), x0) < 1e-9
    assert rel_err(reference.predict_noise_from_start(sched64, xt, t, x0)[1:], eps[1:]) < 1e-9
    v = reference.predict_v(sched64, x0, t, eps)
    ab = sched64.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert rel_err(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0) < 1e-12
    assert rel_err(reference.predict_start_from_v(sched64, xt, t, v), x0) < 1e-9
    assert rel_err(reference.predict_noise_from_v(sched64, xt, t, v), eps) < 1e-9
    for objective, out in [("pred_noise", eps), ("pred_x0", x0), ("pred_v", v)]:
        e, s = reference.model_predictions(sched64, out, xt, t, objective)
        assert rel_err(s, x0) < 1e-9, objective


def test_posterior_matches_sampling_the_two_gaussians(sched64):
    # Draw x_{t−1} ~ q(x_{t−1}|x_0), then x_t ~ q(x_t|x_{t−1}); among the pairs, x_{t−1} regressed on x_t
    # has slope coef2, and its residual variance is β̃_t (Bayes' rule, checked by simulation).
    gen = torch.Generator().manual_seed(3)
    t = 40
    x0 = 0.6
    ab_prev, beta = sched64.alphas_cumprod[t - 1].item(), sched64.betas[t].item()
    n = 400_000
    x_prev = ab_prev**0.5 * x0 + (1 - ab_prev) ** 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    x_t = (1 - beta) ** 0.5 * x_prev + beta**0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    cov = torch.cov(torch.stack([x_t, x_prev]))
    slope = (cov[0, 1] / cov[0, 0]).item()
    resid_var = (cov[1, 1] - cov[0, 1] ** 2 / cov[0, 0]).item()
    tt = torch.tensor([t])
    mean, var, _ = reference.q_posterior(sched64, torch.tensor([x0], dtype=torch.float64),
                                         torch.tensor([0.0], dtype=torch.float64), tt)
    assert slope == pytest.approx(sched64.posterior_mean_coef2[t].item(), rel=0.01)
    assert resid_var == pytest.approx(var.item(), rel=0.01)
    assert (x_prev - slope * x_t).mean().item() == pytest.approx(mean.item(), abs=0.01)


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
def test_loss_against_direct_formula(sched64, objective):
    x0, eps, out = (torch.randn(5, 3, 6, 6, dtype=torch.float64) for _ in range(3))
    t = rand_t(5)
    ab = sched64.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = {"pred_noise": eps, "pred_x0": x0, "pred_v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[objective]
    per = ((out - target) ** 2).mean(dim=(1, 2, 3))
    got = reference.diffusion_loss(sched64, out, x0, t, eps, objective, reduction="none")
    assert rel_err(got, per) < 1e-12
    loss = reference.diffusion_loss(sched64, out, x0, t, eps, objective)
    assert loss.item() == pytest.approx(per.mean().item())
    with pytest.raises(ValueError, match="reduction"):
        reference.diffusion_loss(sched64, out, x0, t, eps, objective, reduction="sum")


def test_min_snr_weights_make_objectives_equivalent(sched64):
    # With ε̂ ↔ x̂_0 ↔ v̂ consistent at x_t: ‖Δx_0‖² = ‖Δε‖²/SNR and ‖Δv‖² = ‖Δε‖²/ᾱ, so min-SNR-γ weights
    # min(SNR,γ)/SNR (ε), min(SNR,γ) (x_0) and min(SNR,γ)/(SNR+1) (v) give the same per-sample loss.
    x0, eps, eps_hat = (torch.randn(8, 2, 5, 5, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([1, 3, 10, 50, 200, 500, 800, 999])
    xt = reference.q_sample(sched64, x0, t, eps)
    x0_hat = reference.predict_start_from_noise(sched64, xt, t, eps_hat)
    v_hat = reference.predict_v(sched64, x0_hat, t, eps_hat)
    losses = [reference.diffusion_loss(sched64, out, x0, t, eps, obj, min_snr_gamma=5.0, reduction="none")
              for obj, out in [("pred_noise", eps_hat), ("pred_x0", x0_hat), ("pred_v", v_hat)]]
    assert rel_err(losses[1], losses[0]) < 1e-8 and rel_err(losses[2], losses[0]) < 1e-8
    snr = sched64.snr[t]
    w = reference.loss_weight(sched64, "pred_noise", t, 5.0)
    assert torch.allclose(w, snr.clamp(max=5) / snr)
    assert (w[t < 100] < 1).all() and torch.allclose(w[t > 600], torch.ones_like(w[t > 600]))


def test_ancestral_step_formula(sched64):
    gen = torch.Generator().manual_seed(5)
    xt, out, z = (torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 1, 500, 999])
    for variance in ["fixed_small", "fixed_large"]:
        x_prev, x0 = reference.p_sample_step(sched64, out, xt, t, z, "pred_noise", variance,
                                             clip_denoised=False)
        ab = sched64.alphas_cumprod[t].view(-1, 1, 1, 1)
        ab_prev = sched64.alphas_cumprod_prev[t].view(-1, 1, 1, 1)
        beta = sched64.betas[t].view(-1, 1, 1, 1)
        # Algorithm 2: x_{t−1} = 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε̂) + σ_t z
        mean = (xt - beta / (1 - ab).sqrt() * out) / (1 - beta).sqrt()
        sigma2 = beta * (1 - ab_prev) / (1 - ab) if variance == "fixed_small" else beta
        sigma2 = sigma2 * (t > 0).view(-1, 1, 1, 1)
        assert rel_err(x_prev, mean + sigma2.sqrt() * z) < 1e-10, variance
        assert rel_err(x0, (xt - (1 - ab).sqrt() * out) / ab.sqrt()) < 1e-10
    clipped_prev, clipped_x0 = reference.p_sample_step(sched64, out, xt, t, z, "pred_noise", "fixed_small",
                                                       True)
    assert clipped_x0.abs().max() <= 1 and not torch.equal(clipped_prev, x_prev)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("objective", ["pred_noise", "pred_v"])
def test_ddim_eta1_full_chain_equals_ancestral_fixed_small(clip, objective):
    sched = NoiseSchedule(get_beta_schedule("linear", 100), dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    shape = (3, 2, 4, 4)
    x_a = x_d = torch.randn(shape, generator=gen, dtype=torch.float64)
    for step in reversed(range(100)):
        t = torch.full((3,), step)
        out = torch.randn(shape, generator=gen, dtype=torch.float64)  # stands in for the network
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        x_a, _ = reference.p_sample_step(sched, out, x_a, t, z, objective, "fixed_small", clip)
        x_d, _ = reference.ddim_step(sched, out, x_d, t, t - 1, z, objective, eta=1.0, clip_denoised=clip)
        assert rel_err(x_d, x_a) < 1e-9, step
        x_d = x_a  # compare step by step from the same state


def test_ddim_eta0_is_deterministic_and_ends_at_x0(sched64):
    xt, out = torch.randn(2, 1, 3, 3, dtype=torch.float64), torch.randn(2, 1, 3, 3, dtype=torch.float64)
    t = torch.tensor([999, 10])
    a, x0 = reference.ddim_step(sched64, out, xt, t, t - 100, torch.randn_like(xt), eta=0.0,
                                clip_denoised=False)
    b, _ = reference.ddim_step(sched64, out, xt, t, t - 100, torch.randn_like(xt), eta=0.0,
                               clip_denoised=False)
    assert torch.equal(a, b)
    end, x0 = reference.ddim_step(sched64, out, xt, t, torch.full_like(t, -1), torch.randn_like(xt), eta=1.0,
                                  clip_denoised=False)
    assert torch.allclose(end, x0)  # ᾱ_prev = 1: the last step returns x̂_0, no noise


def test_unknown_names_raise(sched64):
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="unknown objective 'pred_eps'"):
        reference.model_predictions(sched64, x, x, t, "pred_eps")
    with pytest.raises(ValueError, match="unknown variance 'learned'"):
        reference.p_sample_step(sched64, x, x, t, x, variance="learned")
