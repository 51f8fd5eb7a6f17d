import json

import pytest
import torch

from fastddpm import Diffusion, UNet, reference

from .conftest import TinyNet, rel_err


def make(timesteps=20, **kw):
    torch.manual_seed(0)
    return Diffusion(TinyNet(channels=kw.pop("channels", 3), timesteps=timesteps), image_size=kw.pop("image_size", 6),
                     timesteps=timesteps, **kw)


def test_defaults_follow_the_paper():
    d = Diffusion(TinyNet(), image_size=8)
    assert d.num_timesteps == 1000 and d.objective == "pred_noise" and d.variance == "fixed_small"
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    assert not d.is_ddim_sampling and d.clip_denoised and d.auto_normalize
    assert d.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)
    # the schedule's tables are not weights
    assert all(k.startswith("model.") for k in d.state_dict())


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
@pytest.mark.parametrize("min_snr", [False, True])
def test_loss_backward_and_matches_reference(objective, min_snr):
    d = make(objective=objective, min_snr_loss_weight=min_snr)
    x0 = torch.rand(4, 3, 6, 6) * 2 - 1
    t = torch.tensor([0, 3, 11, 19])
    noise = torch.randn_like(x0)
    loss = d.p_losses(x0, t, noise)
    xt = reference.q_sample(d.schedule, x0, t, noise)
    expected = reference.diffusion_loss(d.schedule, d.model(xt, t), x0, t, noise, objective,
                                        5.0 if min_snr else None)
    assert loss.shape == () and rel_err(loss, expected) < 1e-6
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.model.parameters())
    per = d.p_losses(x0, t, noise, reduction="none")
    assert per.shape == (4,) and rel_err(per.mean(), loss) < 1e-6


def test_forward_draws_t_and_noise():
    d = make()
    img = torch.rand(8, 3, 6, 6)
    torch.manual_seed(1)
    a = d(img)
    torch.manual_seed(1)
    b = d(img)
    c = d(img)
    assert torch.isfinite(a) and a.item() == b.item() and a.item() != c.item()


def test_q_sample_uses_given_noise():
    d = make()
    x0 = torch.randn(3, 3, 6, 6)
    t = torch.tensor([0, 10, 19])
    noise = torch.randn_like(x0)
    assert rel_err(d.q_sample(x0, t, noise), reference.q_sample(d.schedule, x0, t, noise)) < 1e-6
    assert d.q_sample(x0, 5).shape == x0.shape  # an int t is broadcast


@pytest.mark.parametrize("sampling_timesteps", [None, 5])
def test_sample_is_seeded_and_in_range(sampling_timesteps):
    d = make(sampling_timesteps=sampling_timesteps)
    a = d.sample(3, generator=torch.Generator().manual_seed(0), progress=False)
    b = d.sample(3, generator=torch.Generator().manual_seed(0), progress=False)
    c = d.sample(3, generator=torch.Generator().manual_seed(1), progress=False)
    assert a.shape == (3, 3, 6, 6) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1  # clip_denoised keeps x̂_0, hence the last step, in range
    torch.manual_seed(4)
    g1 = d.sample(2, progress=False)
    torch.manual_seed(4)
    assert torch.equal(g1, d.sample(2, progress=False))


def test_sample_loop_equals_manual_p_sample_chain():
    d = make()
    gen = torch.Generator().manual_seed(3)
    out = d.sample(2, generator=gen, progress=False)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    for t in reversed(range(d.num_timesteps)):
        x, _ = d.p_sample(x, t, generator=gen)
    assert torch.equal(out, d.unnormalize(x))


def test_return_all_timesteps():
    d = make(sampling_timesteps=4)
    traj = d.sample(2, return_all_timesteps=True, progress=False)
    assert traj.shape == (2, 5, 3, 6, 6)
    assert make().sample(1, return_all_timesteps=True, progress=False).shape == (1, 21, 3, 6, 6)


def test_ddim_full_steps_eta1_matches_ancestral_sampling():
    # sampling_timesteps == timesteps uses the ancestral loop; DDIM over all T steps with η = 1 draws the
    # same noise and is the same chain (fixed_small), so the images agree within float tolerance.
    d = make(timesteps=20)
    anc = d.sample(2, generator=torch.Generator().manual_seed(9), progress=False)
    from fastddpm import sampling
    ddim = Diffusion(d.model, image_size=6, timesteps=20, ddim_sampling_eta=1.0)
    x = sampling.ddim_loop(ddim, (2, 3, 6, 6), generator=torch.Generator().manual_seed(9), progress=False)
    assert rel_err(ddim.unnormalize(x), anc) < 1e-5


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = UNet(in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                 dropout=0.0, image_size=8)
    d = Diffusion(model, image_size=8, timesteps=10, objective="pred_v", beta_schedule="cosine")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # away from the zero init
    d.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["diffusion"]["objective"] == "pred_v" and cfg["model"]["class"] == "UNet"
    e = Diffusion.from_pretrained(tmp_path)
    assert e.config == d.config
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), e.state_dict().values()))
    a = d.eval().sample(2, generator=torch.Generator().manual_seed(0), progress=False)
    b = e.eval().sample(2, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(a, b)
    f = Diffusion.from_pretrained(tmp_path, sampling_timesteps=3)
    assert f.is_ddim_sampling
    # a training output folder with the model in model/
    (tmp_path / "run").mkdir()
    d.save_pretrained(tmp_path / "run" / "model")
    assert Diffusion.from_pretrained(tmp_path / "run").config == d.config


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        Diffusion.from_pretrained(tmp_path / "nothing")
    model = UNet(in_channels=1, model_channels=32, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                 image_size=4)
    Diffusion(model, image_size=4, timesteps=10).save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is corrupted"):
        Diffusion.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not a fastddpm config"):
        Diffusion.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="no `config` dict"):
        make().save_pretrained(tmp_path / "x")


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(beta_schedule="nope"), ValueError, "unknown beta schedule 'nope'"),
    (dict(timesteps=0), ValueError, "timesteps must be an integer >= 1"),
    (dict(objective="eps"), ValueError, "unknown objective 'eps'"),
    (dict(variance="learned"), ValueError, "unknown variance"),
    (dict(sampling_timesteps=50), ValueError, r"sampling_timesteps must lie in \[1, timesteps=20\]"),
    (dict(backend="cuda"), ValueError, "unknown backend 'cuda'"),
    (dict(beta_schedule="jsd"), ValueError, "zero terminal SNR"),
])
def test_bad_construction(kwargs, err, match):
    with pytest.raises(err, match=match):
        make(**kwargs)


def test_zero_terminal_snr_ok_with_v():
    d = make(beta_schedule="jsd", objective="pred_v")
    assert torch.isfinite(d.sample(2, progress=False)).all()


def test_bad_training_batches():
    d = make()
    with pytest.raises(TypeError, match="must be floating point"):
        d(torch.randint(0, 255, (2, 3, 6, 6), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"shape \[B, 3, 6, 6\], got \[2, 3, 8, 8\]"):
        d(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"shape \[B, 3, 6, 6\], got \[2, 1, 6, 6\]"):
        d(torch.rand(2, 1, 6, 6))
    bad = torch.rand(2, 3, 6, 6)
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        d(bad)
    bad[1, 0, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        d(bad)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        d(torch.rand(2, 3, 6, 6) * 2 - 1)
    assert torch.isfinite(make(auto_normalize=False)(torch.rand(2, 3, 6, 6) * 2 - 1))


def test_bad_timesteps():
    d = make()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 20\), got values in \[0, 20\]"):
        d.p_losses(x, torch.tensor([0, 20]))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 20\)"):
        d.q_sample(x, torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="int64"):
        d.p_losses(x, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"t must have shape \[2\]"):
        d.p_losses(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"t must be an int in \[0, 20\)"):
        d.p_sample(x, 20)


def test_model_output_shape_checked():
    class Wrong(torch.nn.Module):
        channels = 3

        def forward(self, x, t):
            return x[:, :1]

    d = Diffusion(Wrong(), image_size=6, timesteps=10)
    with pytest.raises(ValueError, match=r"must return a tensor of x_t's shape"):
        d(torch.rand(2, 3, 6, 6))


def test_table_attributes_like_gaussian_diffusion():
    d = make()
    for name in ["betas", "alphas_cumprod", "sqrt_alphas_cumprod", "posterior_variance", "posterior_mean_coef1",
                 "posterior_log_variance_clipped", "sqrt_recip_alphas_cumprod", "snr"]:
        assert getattr(d, name) is getattr(d.schedule, name)
    assert d.to(torch.float64).betas.dtype == torch.float64
