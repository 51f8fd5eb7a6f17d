"""fastddpm.UNet ↔ diffusers' UNet2DModel (the DDPM configs), and diffusers folders in
Diffusion.from_pretrained and `fastddpm sample`. Every folder is written by diffusers' own save_pretrained
from random weights."""

import json

import pytest
import torch

from fastddpm import Diffusion, UNet
from fastddpm.cli import main
from fastddpm.nn import diffusers_unet
from tests.conftest import rel_err

diffusers = pytest.importorskip("diffusers")

DDPM_FIELDS = dict(attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
                   freq_shift=1)
# The UNet2DModel configs of google/ddpm-cifar10-32 and of ddpm-celebahq-256 / ddpm-church-256 /
# ddpm-bedroom-256 (the three 256 models share one).
CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256],
    layers_per_block=2, down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], norm_num_groups=32,
    act_fn="silu", center_input_sample=False, mid_block_scale_factor=1, time_embedding_type="positional",
    **DDPM_FIELDS,
)  # fmt: skip
LSUN_256 = dict(
    CIFAR10, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
    down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
)  # fmt: skip
# The 256 structure (six levels, attention at 16×16) with narrow channels, cheap enough to run on the CPU.
NARROW_256 = dict(LSUN_256, block_out_channels=[16, 16, 32, 32, 64, 64], norm_num_groups=16)
SMALL = dict(
    sample_size=16, block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
    down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    **DDPM_FIELDS,
)  # fmt: skip
CONFIGS = {"small": SMALL, "cifar10": CIFAR10, "narrow_256": NARROW_256}


def random_unet2d(config, seed=0, **overrides):
    """A UNet2DModel with every parameter random (diffusers' init leaves some biases at 0)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**{**config, **overrides}).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request):
    model = random_unet2d(CONFIGS[request.param])
    return request.param, model, UNet.from_diffusers(model).eval()


@pytest.mark.parametrize("batch", [1, 4])
def test_outputs_equal_diffusers(converted, batch):
    _, model, unet = converted
    size = model.config.sample_size
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    with torch.no_grad():
        ref = model(x, t).sample
        out = unet(x, t)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-5


def test_round_trip_gives_identical_state_dict(converted):
    _, model, unet = converted
    back = unet.to_diffusers()
    assert isinstance(back, diffusers.UNet2DModel)
    ours, theirs = back.state_dict(), model.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    for key, value in model.config.items():
        if not key.startswith("_"):
            assert back.config[key] == (list(value) if isinstance(value, tuple) else value), key


def test_converted_structure(converted):
    name, model, unet = converted
    mult = {"small": [1, 2], "cifar10": [1, 2, 2, 2], "narrow_256": [1, 1, 2, 2, 4, 4]}[name]
    assert unet.config["channel_mult"] == mult
    assert unet.config["attn_resolutions"] == [{"small": 8, "cifar10": 16, "narrow_256": 16}[name]]
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in model.parameters())


def test_round_trip_keeps_dtype():
    model = random_unet2d(SMALL).to(torch.bfloat16)
    unet = UNet.from_diffusers(model)
    assert next(unet.parameters()).dtype == torch.bfloat16
    back = unet.to_diffusers()
    assert back.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("config", [CIFAR10, LSUN_256], ids=["cifar10", "lsun_256"])
def test_released_configs_map_tensor_for_tensor(config):
    """The released models' full configs, built on the meta device: every tensor has its place and shape."""
    with torch.device("meta"):
        model = diffusers.UNet2DModel(**config)
        unet = UNet(**diffusers_unet.unet_config_from_diffusers(model.config))
    state = diffusers_unet.state_dict_from_diffusers(unet, model.state_dict())
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in model.parameters())
    back = diffusers_unet.diffusers_config_from_unet(unet)
    assert all(back[k] == config[k] for k in config), [k for k in config if back[k] != config[k]]
    if config is CIFAR10:  # the paper's CIFAR-10 network, as fastddpm builds it
        assert unet.config == UNet.cifar10(dropout=0.0).config
        assert sum(p.numel() for p in unet.parameters()) == 35_746_307


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_from_folder(tmp_path, safe):
    model = random_unet2d(SMALL)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    unet = UNet.from_diffusers(tmp_path)
    ref = UNet.from_diffusers(model)
    assert not unet.training and not ref.training  # as the model, and as diffusers' from_pretrained loads one
    assert UNet.from_diffusers(model.train()).training
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), ref.state_dict().values()))


def test_early_attention_names(tmp_path):
    """The released DDPM weights name the attention layers query/key/value/proj_attn; diffusers reads them."""
    model = random_unet2d(SMALL)
    model.save_pretrained(tmp_path, safe_serialization=False)
    weights = tmp_path / "diffusion_pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state.items():
        for new, name in old.items():
            key = key.replace(f".{new}.", f".{name}.")
        renamed[key] = value
    assert renamed.keys() != state.keys()
    torch.save(renamed, weights)
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    unet = UNet.from_diffusers(tmp_path).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():
        assert rel_err(unet(x, t), theirs(x, t).sample) <= 1e-5


@pytest.mark.parametrize("field, value", [
    ("freq_shift", 0), ("flip_sin_to_cos", True), ("downsample_padding", 1), ("norm_eps", 1e-5),
    ("attention_head_dim", 8), ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"), ("center_input_sample", True), ("mid_block_scale_factor", 2),
    ("act_fn", "gelu"), ("num_class_embeds", 10),
    ("block_out_channels", [16, 24]), ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
    ("down_block_types", ["DownBlock2D", "SkipDownBlock2D"]), ("attn_norm_num_groups", 4),
    ("sample_size", None), ("time_embedding_dim", 32),
])  # fmt: skip
def test_unrepresentable_config_names_the_field(field, value):
    config = {**SMALL, field: value}
    if field == "down_block_types":
        config["up_block_types"] = ["SkipUpBlock2D", "UpBlock2D"]
    with pytest.raises(ValueError, match=rf"^UNet2DModel config {field}="):
        UNet.from_diffusers(diffusers.UNet2DModel(**config))


def test_to_diffusers_needs_first_multiplier_one():
    with pytest.raises(ValueError, match=r"channel_mult\[0\] must be 1"):
        UNet.small(channel_mult=(2, 2, 4)).to_diffusers()


def test_from_diffusers_rejects_other_inputs(tmp_path):
    with pytest.raises(TypeError, match="UNet2DModel"):
        UNet.from_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="config.json"):
        UNet.from_diffusers(tmp_path)


# ----------------------------------------------------------------------------- diffusers folders in Diffusion
# Diffusion warns about schedules that end far from N(0, I); these tests use short ones on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:the .* schedule ends at")


def write_pipeline(path, scheduler=None, seed=0, layout="pipeline"):
    model = random_unet2d(SMALL, seed=seed)
    if layout == "bare":
        model.save_pretrained(path)
    else:
        scheduler = scheduler or diffusers.DDPMScheduler()
        diffusers.DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(path)
        # the released DDPM repositories also hold the unet's and scheduler's files on top
        if layout == "flat":
            for sub in ("unet", "scheduler"):
                for f in (path / sub).iterdir():
                    f.rename(path / f.name)
                (path / sub).rmdir()
    return model


def same_network(diffusion, model):
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([0, 150])
    with torch.no_grad():
        return rel_err(diffusion.model(x, t), model(x, t).sample) <= 1e-5


@pytest.mark.parametrize("layout", ["pipeline", "flat"])
def test_from_pretrained_pipeline_folder(tmp_path, layout):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=200, beta_start=2e-4, beta_end=0.04,
                                        variance_type="fixed_large", prediction_type="v_prediction",
                                        clip_sample=False)
    model = write_pipeline(tmp_path, scheduler, layout=layout)
    diffusion = Diffusion.from_pretrained(tmp_path)
    assert isinstance(diffusion.model, UNet) and same_network(diffusion, model)
    assert diffusion.num_timesteps == 200 and diffusion.image_size == (16, 16) and diffusion.channels == 3
    assert ((diffusion.objective, diffusion.variance, diffusion.clip_denoised)
            == ("pred_v", "fixed_large", False))
    assert torch.allclose(diffusion.schedule.alphas_cumprod.double(), scheduler.alphas_cumprod.double(),
                          rtol=1e-6, atol=0)
    assert Diffusion.from_pretrained(tmp_path, sampling_timesteps=10).sampling_timesteps == 10


def test_from_pretrained_bare_unet_takes_ddpm_defaults(tmp_path):
    model = write_pipeline(tmp_path, layout="bare")
    diffusion = Diffusion.from_pretrained(tmp_path)
    assert same_network(diffusion, model)
    reference = diffusers.DDPMScheduler()
    assert diffusion.num_timesteps == 1000
    assert ((diffusion.objective, diffusion.variance, diffusion.clip_denoised)
            == ("pred_noise", "fixed_small", True))
    assert torch.allclose(diffusion.schedule.alphas_cumprod.double(), reference.alphas_cumprod.double(),
                          rtol=1e-6, atol=0)


@pytest.mark.parametrize("beta_schedule", ["squaredcos_cap_v2", "sigmoid", "scaled_linear"])
def test_from_pretrained_other_schedules(tmp_path, beta_schedule):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule=beta_schedule,
                                        beta_start=1e-3, beta_end=0.05)
    write_pipeline(tmp_path, scheduler)
    diffusion = Diffusion.from_pretrained(tmp_path)
    assert torch.allclose(diffusion.schedule.betas.double(), scheduler.betas.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kwargs, field", [
    (dict(variance_type="learned_range"), "variance_type"), (dict(thresholding=True), "thresholding"),
    (dict(clip_sample_range=2.0), "clip_sample_range"),
])  # fmt: skip
def test_from_pretrained_refuses_settings_diffusion_lacks(tmp_path, kwargs, field):
    write_pipeline(tmp_path, diffusers.DDPMScheduler(**kwargs))
    with pytest.raises(ValueError, match=rf"scheduler_config.json: scheduler {field}="):
        Diffusion.from_pretrained(tmp_path)


def test_from_pretrained_refuses_a_pipeline_without_unet2d(tmp_path):
    write_pipeline(tmp_path)
    with pytest.raises(ValueError, match="leave out model="):
        Diffusion.from_pretrained(tmp_path, model=UNet.small())
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(
        json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        Diffusion.from_pretrained(tmp_path)


@pytest.mark.parametrize("layout", ["pipeline", "bare"])
def test_cli_samples_a_diffusers_folder(tmp_path, layout, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    write_pipeline(folder, diffusers.DDPMScheduler(num_train_timesteps=20), layout=layout)
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(folder), "--num", "2", "--steps", "3", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png"]
    assert f"wrote 2 samples to {out}" in capsys.readouterr().out


# -------------------------------------------------------------------------- a converted model in DDPMPipeline
@pytest.mark.parametrize("name, steps, batch", [("small", 10, 2), ("cifar10", 2, 1)])
def test_converted_model_in_ddpm_pipeline_gives_the_same_images(name, steps, batch):
    """diffusers' DDPMPipeline with the converted UNet and fastddpm's scheduler, against the original
    UNet2DModel with diffusers' scheduler, the same generator seed: the same images to float32 rounding."""
    from fastddpm import DDPMScheduler

    model = random_unet2d(CONFIGS[name], seed=5)
    images = []
    for unet, scheduler in ((model, diffusers.DDPMScheduler()),
                            (UNet.from_diffusers(model).eval().for_diffusers_pipeline(), DDPMScheduler())):
        pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=batch, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                   output_type="np", return_dict=False)[0]
        images.append(torch.from_numpy(out))
    assert images[0].shape == (batch, model.config.sample_size, model.config.sample_size, 3)
    assert (images[0] - images[1]).abs().max() <= 1e-5
    assert images[0].std() > 0.05  # a picture, not a constant


def test_pipeline_unet_interface():
    model = random_unet2d(SMALL)
    unet = UNet.from_diffusers(model).eval()
    wrapped = unet.for_diffusers_pipeline()
    assert wrapped.unet is unet and wrapped.dtype == torch.float32 and wrapped.device == torch.device("cpu")
    assert wrapped.config.sample_size == 16 and wrapped.config.in_channels == 3
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(wrapped(x, torch.tensor(7)).sample, unet(x, 7))
        assert torch.equal(wrapped(x, 7, return_dict=False)[0], unet(x, 7))
    with pytest.raises(ValueError, match="unconditional"):
        wrapped(x, 7, class_labels=torch.tensor([0, 1]))
