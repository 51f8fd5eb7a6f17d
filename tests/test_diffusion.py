"""Diffusion: its settings, checks, losses, samplers and save/load. The tests whose numbers come from the ops
(losses, q_sample, the ancestral and DDIM chains, seeded sampling, a save/load round trip that samples) run on
every backend present for CPU tensors; those of argument checks, tables, configs and keys run once."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from fastddpm import Diffusion, UNet, _extension, reference
from fastddpm.ops import IMPLEMENTATIONS

from .conftest import TinyNet, rel_err

_OPS = ("q_sample", "diffusion_loss", "p_sample_step", "ddim_step")  # the ops Diffusion runs


def _cpu_backends() -> list[str]:
    """The backends that run Diffusion's ops on CPU tensors here: the reference, the C++ kernels where
    fastddpm._C is built, Triton where its interpreter runs CPU tensors (TRITON_INTERPRET=1, which conftest.py
    sets on machines without a GPU)."""
    present = ["reference"]
    if all("cpu" in IMPLEMENTATIONS[op]["cpp"] for op in _OPS) and _extension.cpu_built():
        present.append("cpp")
    if (all("cpu" in IMPLEMENTATIONS[op]["triton"] for op in _OPS)
            and os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None):
        present.append("triton")
    return present


@pytest.fixture(params=_cpu_backends())
def backend(request):
    """Each backend present, passed as Diffusion(..., backend=backend)."""
    return request.param


def make(timesteps=20, **kw):
    torch.manual_seed(0)
    kw.setdefault("beta_schedule", "cosine")  # reaches ᾱ_T ≈ 0 with few steps, unlike the paper's linear
    return Diffusion(TinyNet(channels=kw.pop("channels", 3)), image_size=kw.pop("image_size", 6),
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
def test_loss_backward_and_matches_reference(objective, min_snr, backend):
    d = make(objective=objective, min_snr_loss_weight=min_snr, backend=backend)
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


def test_forward_draws_t_and_noise(backend):
    d = make(backend=backend)
    img = torch.rand(8, 3, 6, 6)
    torch.manual_seed(1)
    a = d(img)
    torch.manual_seed(1)
    b = d(img)
    c = d(img)
    assert torch.isfinite(a) and a.item() == b.item() and a.item() != c.item()


def test_q_sample_uses_given_noise(backend):
    d = make(backend=backend)
    x0 = torch.randn(3, 3, 6, 6)
    t = torch.tensor([0, 10, 19])
    noise = torch.randn_like(x0)
    assert rel_err(d.q_sample(x0, t, noise), reference.q_sample(d.schedule, x0, t, noise)) < 1e-6
    assert d.q_sample(x0, 5).shape == x0.shape  # an int t is broadcast


@pytest.mark.parametrize("sampling_timesteps", [None, 5])
def test_sample_is_seeded_and_in_range(sampling_timesteps, backend):
    d = make(sampling_timesteps=sampling_timesteps, backend=backend)
    a = d.sample(3, generator=torch.Generator().manual_seed(0), progress=False)
    b = d.sample(3, generator=torch.Generator().manual_seed(0), progress=False)
    c = d.sample(3, generator=torch.Generator().manual_seed(1), progress=False)
    assert a.shape == (3, 3, 6, 6) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1  # clip_denoised keeps x̂_0, hence the last step, in range
    torch.manual_seed(4)
    g1 = d.sample(2, progress=False)
    torch.manual_seed(4)
    assert torch.equal(g1, d.sample(2, progress=False))


def test_sample_loop_equals_manual_p_sample_chain(backend):
    d = make(backend=backend)
    gen = torch.Generator().manual_seed(3)
    out = d.sample(2, generator=gen, progress=False)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    for t in reversed(range(d.num_timesteps)):
        x, _ = d.p_sample(x, t, generator=gen)
    assert torch.equal(out, d.unnormalize(x))


def test_return_all_timesteps(backend):
    d = make(sampling_timesteps=4, backend=backend)
    traj = d.sample(2, return_all_timesteps=True, progress=False)
    assert traj.shape == (2, 5, 3, 6, 6)
    full = make(backend=backend).sample(1, return_all_timesteps=True, progress=False)
    assert full.shape == (1, 21, 3, 6, 6)


def test_ddim_full_steps_eta1_matches_ancestral_sampling(backend):
    # sampling_timesteps == timesteps uses the ancestral loop; DDIM over all T steps with η = 1 draws the
    # same noise and is the same chain (fixed_small), so the images agree within float tolerance.
    d = make(timesteps=20, backend=backend)
    anc = d.sample(2, generator=torch.Generator().manual_seed(9), progress=False)
    from fastddpm import sampling
    ddim = Diffusion(d.model, image_size=6, timesteps=20, beta_schedule="cosine", ddim_sampling_eta=1.0,
                     backend=backend)
    x = sampling.ddim_loop(ddim, (2, 3, 6, 6), generator=torch.Generator().manual_seed(9), progress=False)
    assert rel_err(ddim.unnormalize(x), anc) < 1e-5


def test_save_load_round_trip(tmp_path, backend):
    torch.manual_seed(0)
    model = UNet(in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                 dropout=0.0, image_size=8)
    d = Diffusion(model, image_size=8, timesteps=10, objective="pred_v", beta_schedule="cosine",
                  backend=backend)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # away from the zero init
    d.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["diffusion"]["objective"] == "pred_v" and cfg["model"]["class"] == "UNet"
    e = Diffusion.from_pretrained(tmp_path, backend=backend)  # (the backend is a setting of this process)
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
    Diffusion(model, image_size=4, timesteps=10, beta_schedule="cosine").save_pretrained(tmp_path)
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
    (dict(timesteps=0), ValueError, "timesteps must be >= 1"),
    (dict(timesteps=2.5), TypeError, "timesteps must be an integer"),
    (dict(ddim_sampling_eta=1.5), ValueError, r"ddim_sampling_eta must lie in \[0, 1\]"),
    (dict(min_snr_gamma=0), ValueError, "min_snr_gamma must be > 0"),
    (dict(image_size=6.5), TypeError, "image_size must be an integer"),
    (dict(image_size=True), TypeError, "image_size must be an integer"),
    (dict(sampling_timesteps=2.7), TypeError, "sampling_timesteps must be an integer"),
    (dict(offset_noise_strength=-1), ValueError, "offset_noise_strength must be >= 0"),
    (dict(objective="eps"), ValueError, "unknown objective 'eps'"),
    (dict(variance="learned"), ValueError, "unknown variance"),
    (dict(sampling_timesteps=50), ValueError, r"sampling_timesteps must lie in \[1, timesteps=20\]"),
    (dict(backend="cuda"), ValueError, "unknown backend 'cuda'"),
    (dict(beta_schedule="jsd"), ValueError, "zero terminal SNR"),
])
@pytest.mark.isolated
def test_bad_construction(kwargs, err, match):
    with pytest.raises(err, match=match):
        make(**kwargs)


def test_zero_terminal_snr_ok_with_v(backend):
    d = make(beta_schedule="jsd", objective="pred_v", backend=backend)
    assert torch.isfinite(d.sample(2, progress=False)).all()


@pytest.mark.isolated
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


@pytest.mark.isolated
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

    d = Diffusion(Wrong(), image_size=6, timesteps=10, beta_schedule="cosine")
    with pytest.raises(ValueError, match=r"must return a tensor of x_t's shape"):
        d(torch.rand(2, 3, 6, 6))


def test_table_attributes_like_gaussian_diffusion():
    d = make()
    for name in ["betas", "alphas_cumprod", "sqrt_alphas_cumprod", "posterior_variance",
                 "posterior_mean_coef1", "posterior_log_variance_clipped", "sqrt_recip_alphas_cumprod",
                 "snr"]:
        assert getattr(d, name) is getattr(d.schedule, name)
    assert d.to(torch.float64).betas.dtype == torch.float64


@pytest.mark.parametrize("objective", ["pred_v", "pred_x0"])
def test_zero_terminal_snr_ddim_is_finite(objective, backend):
    d = make(beta_schedule="jsd", objective=objective, sampling_timesteps=5, backend=backend)
    assert torch.isfinite(d.sample(2, progress=False)).all()


def test_short_unscaled_linear_schedule_warns():
    with pytest.warns(UserWarning, match=r"ends at ᾱ_T = 0\.6"):
        make(timesteps=50, beta_schedule="linear")
    scaled = make(timesteps=50, beta_schedule="linear", schedule_fn_kwargs={"scale_with_timesteps": True})
    assert scaled.alphas_cumprod[-1] < 1e-4


def test_p_mean_variance_follows_variance():
    x = torch.randn(3, 3, 6, 6)
    t = torch.tensor([0, 5, 19])
    small, large = make(), make(variance="fixed_large")
    _, var_s, logvar_s, _ = small.p_mean_variance(x, t)
    _, var_l, logvar_l, _ = large.p_mean_variance(x, t)
    assert torch.allclose(var_s.flatten(), small.posterior_variance[t])
    assert torch.allclose(var_l.flatten(), large.betas[t])
    assert torch.allclose(logvar_l.flatten()[1:], large.betas[t[1:]].log())
    # β̃_1 at the first step, as the DDPM code
    assert torch.allclose(logvar_l.flatten()[0], logvar_s.flatten()[0])


def test_sampling_with_fixed_large_and_pred_x0(backend):
    for kw in [dict(variance="fixed_large"), dict(objective="pred_x0"), dict(objective="pred_v")]:
        out = make(**kw, backend=backend).sample(2, generator=torch.Generator().manual_seed(0),
                                                 progress=False)
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_low_precision_model_keeps_float32_tables_and_samples(backend):
    d = make(backend=backend).to(torch.bfloat16)
    assert d.betas.dtype == torch.float32 and d.model.conv_in.weight.dtype == torch.bfloat16
    assert d.alphas_cumprod[-1].item() == make().alphas_cumprod[-1].item()
    out = d.sample(2, progress=False, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_method_inputs_checked():
    d = make()
    with pytest.raises(TypeError, match="x_start must be floating point"):
        d.q_sample(torch.ones(2, 3, 6, 6, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"x_start must have shape \[B, 3, 6, 6\]"):
        d.p_losses(torch.randn(2, 3, 5, 6), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="noise must match x_start"):
        d.q_sample(torch.randn(2, 3, 6, 6), 3, noise=torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match="noise must match x_start"):
        d.p_losses(torch.randn(2, 3, 6, 6), 3, noise=torch.randn(2, 3, 6, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"t \(an int or an int64 tensor of shape \[2\]\) must be an integer"):
        d.q_sample(torch.randn(2, 3, 6, 6), True)
    with pytest.raises(ValueError, match=r"x must have shape"):
        d.p_sample(torch.randn(2, 1, 6, 6), 3)
    with pytest.raises(NotImplementedError, match="self-conditioning"):
        d.p_sample(torch.randn(2, 3, 6, 6), 3, torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        d.sample(0, progress=False)
    assert d.sample(np.int64(1), progress=False).shape == (1, 3, 6, 6)
    assert d.p_sample(torch.randn(2, 3, 6, 6), np.int64(3))[0].shape == (2, 3, 6, 6)


def test_gaussian_diffusion_style_state_dict_loads():
    # GaussianDiffusion checkpoints carry the schedule's tables as buffers: they are derived here and dropped.
    d = make()
    state = {**d.state_dict(), "betas": torch.zeros(20), "alphas_cumprod": torch.zeros(20),
             "loss_weight": torch.ones(20)}
    d.load_state_dict(state)  # strict
    assert d.betas.abs().sum() > 0


def test_user_betas_set_timesteps():
    d = Diffusion(TinyNet(), image_size=6, beta_schedule=torch.linspace(0.01, 0.5, 30))
    assert d.num_timesteps == 30 and len(d.beta_schedule) == 30
    with pytest.raises(ValueError, match="30 betas given but timesteps=10"):
        Diffusion(TinyNet(), image_size=6, timesteps=10, beta_schedule=torch.linspace(0.01, 0.5, 30))
    with pytest.raises(ValueError, match="1-D"):
        Diffusion(TinyNet(), image_size=6, beta_schedule=[[0.1, 0.2], [0.3, 0.4]])


def test_offset_noise_changes_the_loss_only_when_drawn(backend):
    d = make(offset_noise_strength=0.1, backend=backend)
    x0, t = torch.rand(4, 3, 6, 6) * 2 - 1, torch.tensor([1, 2, 3, 4])
    noise = torch.randn_like(x0)
    # given noise is used as is
    assert d.p_losses(x0, t, noise).item() == make(backend=backend).p_losses(x0, t, noise).item()
    assert torch.isfinite(d(torch.rand(4, 3, 6, 6)))


def test_loss_weight_and_aliases(backend):
    d = make(min_snr_loss_weight=True, backend=backend)
    assert d.loss_weight.shape == (20,) and (d.loss_weight <= 1).all()
    assert d.p_sample_loop((1, 3, 6, 6), progress=False).shape == (1, 3, 6, 6)
    assert make(sampling_timesteps=4, backend=backend).ddim_sample((1, 3, 6, 6), return_all_timesteps=True,
                                                  progress=False).shape == (1, 5, 3, 6, 6)


def test_from_pretrained_keeps_a_given_model_where_it_is(tmp_path):
    model = UNet(in_channels=1, model_channels=32, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                 image_size=4).double()
    Diffusion(model, image_size=4, timesteps=10, beta_schedule="cosine").save_pretrained(tmp_path)
    other = UNet(**model.config).double()
    d = Diffusion.from_pretrained(tmp_path, model=other)
    assert d.model is other and other.conv_in.weight.dtype == torch.float64


def test_cuda_graph_request_on_cpu_warns_once_and_samples_eagerly(backend, monkeypatch):
    from fastddpm import sampling

    # (the warning is given once a process: a fresh record lets each backend's run see it)
    monkeypatch.setattr(sampling, "_graph_warnings", set())
    d = make(backend=backend)
    g = torch.Generator().manual_seed(3)
    with pytest.warns(RuntimeWarning, match="cuda_graph=True needs CUDA tensors"):
        a = d.sample(2, generator=g, progress=False, cuda_graph=True)
    b = d.sample(2, generator=torch.Generator().manual_seed(3), progress=False)
    assert torch.equal(a, b)


def test_cuda_graph_key_changes_with_what_the_graph_depends_on():
    """The key of the captured-step cache (computed the same on any device): it changes with the network's
    train/eval mode, a moved or replaced parameter or buffer, inference mode, the shape, the sampler's
    settings; not with an in-place weight update (the graph reads the new values)."""
    from fastddpm import sampling

    d = make(sampling_timesteps=5)
    x = torch.zeros(2, *d.model.conv_in.weight.shape[1:2], *d.image_size)

    def key():
        return sampling._graph_key(d, "ddim_step", x, torch.float32)

    base = key()
    assert key() == base
    with torch.no_grad():
        d.model.conv_in.weight.mul_(2)
    assert key() == base
    d.model.eval()
    assert key() != base
    d.model.train()
    assert key() == base
    with torch.inference_mode():
        assert key() != base
    d.model.conv_in.weight.data = d.model.conv_in.weight.data.clone()  # what .to() does to a parameter
    moved = key()
    assert moved != base
    d.schedule.sqrt_alphas_cumprod.data = d.schedule.sqrt_alphas_cumprod.data.clone()  # a schedule buffer
    assert key() != moved
    moved = key()
    d.ddim_sampling_eta = 0.5
    assert key() != moved
    assert sampling._graph_key(d, "ddim_step", x[:1], torch.float32) != key()


def test_cuda_graph_key_reads_flags_that_raise():
    """A legacy TF32 flag raises once torch's new fp32_precision API is used: the key holds the error's
    text."""
    from fastddpm import sampling

    class Flags:
        @property
        def allow_tf32(self):
            raise RuntimeError("mix of the legacy and new APIs")

        def get_precision(self):
            return "tf32"

    assert sampling._setting(Flags(), "allow_tf32") == "unreadable: mix of the legacy and new APIs"
    assert sampling._setting(Flags(), "get_precision") == "tf32"
    assert sampling._setting(Flags(), "missing") is None
    sampling._backend_settings()  # readable in this process
