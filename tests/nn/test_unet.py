"""fastddpm.nn: GroupNormSiLU and the DDPM U-Net (Ho et al. 2020, Appendix B)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fastddpm.nn.group_norm_silu import GroupNormSiLU
from fastddpm.nn.unet import AttnBlock, Downsample, ResBlock, UNet, timestep_embedding

ODD = dict(in_channels=1, out_channels=2, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
           attn_resolutions=(4,), dropout=0.0, num_groups=8, image_size=8)  # fmt: skip


@pytest.fixture(scope="module")
def cifar10():
    torch.manual_seed(0)
    return UNet.cifar10().eval()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def perturb_zero_init(model, seed=0):
    """Give the zero-initialised layers random weights, so every path of the network shows in its output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def silu_after_plain_group_norm(model, *inputs):
    """Run the model; return the number of F.silu calls whose input is the output of a GroupNorm that did not
    run inside a GroupNormSiLU (nn.SiLU calls F.silu, so a separate module is caught too)."""
    depth, norm_outputs, hits = [0], [], []

    def enter(module, args):
        depth[0] += 1

    def leave(module, args, out):
        depth[0] -= 1

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is F.group_norm and depth[0] == 0:
                norm_outputs.append(out)
            if func is F.silu and any(args[0] is o for o in norm_outputs):
                hits.append(func)
            return out

    handles = []
    for m in model.modules():
        if isinstance(m, GroupNormSiLU):
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        with Watch():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return len(hits)


# --- GroupNormSiLU --------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_silu_module_state_dict_matches_group_norm(affine):
    gn, fused = nn.GroupNorm(4, 8, eps=1e-6, affine=affine), GroupNormSiLU(4, 8, eps=1e-6, affine=affine)
    assert list(fused.state_dict()) == list(gn.state_dict())
    if affine:
        with torch.no_grad():
            gn.weight.copy_(torch.randn(8))
            gn.bias.copy_(torch.randn(8))
    fused.load_state_dict(gn.state_dict(), strict=True)
    x = -2.3 + 0.5 * torch.randn(3, 8, 5, 5)
    torch.testing.assert_close(fused(x), F.silu(gn(x)))


def test_group_norm_silu_module_is_a_group_norm():
    m = GroupNormSiLU(2, 6, eps=1e-4, dtype=torch.float64)
    assert isinstance(m, nn.GroupNorm)
    assert (m.num_groups, m.num_channels, m.eps, m.weight.dtype) == (2, 6, 1e-4, torch.float64)
    with pytest.raises(ValueError, match=r"weight must be 1-D of size C=4 \(x.shape\[1\]\), got shape \(6,"):
        m(torch.randn(2, 4, 3, dtype=torch.float64))


# --- UNet: the paper's CIFAR-10 model ---------------------------------------------------------------


def test_cifar10_parameter_count(cifar10):
    assert n_params(cifar10) == 35_746_307  # the paper's 35.7M


def test_cifar10_forward_shape_and_zero_init(cifar10):
    with torch.no_grad():
        out = cifar10(torch.randn(2, 3, 32, 32), torch.tensor([0, 999]))
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    # The output conv is zero-initialised, as are each ResBlock's last conv and attention's proj_out.
    assert torch.equal(out, torch.zeros_like(out))
    zero_layers = [cifar10.conv_out]
    zero_layers += [m.conv2 for m in cifar10.modules() if isinstance(m, ResBlock)]
    zero_layers += [m.proj_out for m in cifar10.modules() if isinstance(m, AttnBlock)]
    assert len(zero_layers) == 1 + 22 + 6
    for layer in zero_layers:
        assert not layer.weight.any() and not layer.bias.any()


def test_cifar10_norm_modules(cifar10):
    # 22 ResBlocks (4·2 down, 2 middle, 4·3 up) with two GroupNormSiLU each, plus the output norm.
    assert sum(isinstance(m, GroupNormSiLU) for m in cifar10.modules()) == 2 * 22 + 1
    # The only plain GroupNorms are the attention blocks' (16×16: 2 down, 3 up, 1 middle).
    plain = [name for name, m in cifar10.named_modules() if type(m) is nn.GroupNorm]
    assert len(plain) == 6
    # tf.contrib.layers.group_norm's epsilon, as in the DDPM code.
    assert {m.eps for m in cifar10.modules() if isinstance(m, nn.GroupNorm)} == {1e-6}
    assert all(isinstance(cifar10.get_submodule(name.rsplit(".", 1)[0]), AttnBlock) for name in plain)
    # No nn.SiLU registered right after a plain GroupNorm.
    for parent in cifar10.modules():
        children = list(parent.children())
        for a, b in zip(children, children[1:]):
            assert not (type(a) is nn.GroupNorm and isinstance(b, nn.SiLU))


def test_no_silu_after_plain_group_norm_at_runtime():
    model = perturb_zero_init(UNet(**ODD))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    assert silu_after_plain_group_norm(model, x, t) == 0
    # The check finds the pattern where it is.
    norm_then_silu = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU())
    assert silu_after_plain_group_norm(norm_then_silu, torch.randn(2, 4, 3)) == 1


# --- UNet: other configurations ------------------------------------------------------------------


@pytest.mark.parametrize("image_size,hw", [(8, (8, 8)), (16, (16, 16)), (16, (8, 24))])
def test_odd_config_output_shape(image_size, hw):
    model = UNet(**{**ODD, "image_size": image_size}).eval()
    out = model(torch.randn(3, 1, *hw), torch.tensor([0, 10, 999]))
    assert out.shape == (3, 2, *hw)
    assert model.in_channels == model.channels == 1 and model.out_channels == 2
    assert model.image_size == image_size
    n_attn = sum(isinstance(m, AttnBlock) for m in model.modules())
    assert n_attn == 1 + (1 + 2 if image_size == 8 else 0)  # middle + the 4×4 level when it exists


def test_out_channels_defaults_to_in_channels():
    model = UNet(**{**ODD, "out_channels": None, "image_size": 8})
    assert model.out_channels == 1 and model.config["out_channels"] == 1
    assert model(torch.randn(1, 1, 8, 8), torch.tensor([1])).shape == (1, 1, 8, 8)


def test_samples_are_independent_and_t_matters():
    torch.manual_seed(0)
    model = perturb_zero_init(UNet(**ODD)).eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 900])
    with torch.no_grad():
        batch = model(x, t)
        single = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(3)])
        other_t = model(x, t + 1)
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-5)
    assert (batch - other_t).abs().max() > 1e-4


def test_all_parameters_get_gradients():
    torch.manual_seed(0)
    model = perturb_zero_init(UNet(**ODD))
    x = torch.randn(4, 1, 8, 8)
    loss = (model(x, torch.tensor([1, 2, 300, 999])) - x).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.any(), name


def test_small_preset():
    model = UNet.small()
    assert model.config["in_channels"] == 1 and model.image_size == 8
    assert model(torch.randn(2, 1, 8, 8), torch.tensor([0, 999])).shape == (2, 1, 8, 8)


# --- Pieces against their definitions ------------------------------------------------------------


def test_timestep_embedding_is_the_ddpm_sinusoid():
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, 64)
    i = torch.arange(32, dtype=torch.float64)
    angle = t.double()[:, None] * torch.exp(-math.log(10000.0) * i / 31)[None, :]
    torch.testing.assert_close(emb.double(), torch.cat([angle.sin(), angle.cos()], dim=1), rtol=0, atol=2e-4)
    assert emb.shape == (4, 64) and emb.dtype == torch.float32


def test_attention_block_against_explicit_softmax():
    torch.manual_seed(0)
    block = perturb_zero_init(AttnBlock(16, num_groups=4)).double()
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    h = block.norm(x)
    q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # [B, C, N]
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(16), dim=2)
    ref = x + block.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(x.shape))
    torch.testing.assert_close(block(x), ref)


def test_downsample_pads_like_tf_same():
    # TF 'SAME' padding with stride 2 on an even size pads one row/column at the bottom/right only, so a
    # kernel with a single 1 at its top-left corner picks x[2i, 2j].
    block = Downsample(1)
    with torch.no_grad():
        block.conv.weight.zero_()
        block.conv.weight[0, 0, 0, 0] = 1.0
    x = torch.randn(2, 1, 6, 8)
    torch.testing.assert_close(block(x), x[:, :, ::2, ::2], rtol=0, atol=0)


# --- Config, determinism, timesteps ----------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: UNet(**ODD), UNet.small])
def test_config_round_trip(make):
    model = make()
    config = json.loads(json.dumps(model.config))
    assert config == model.config
    assert all(not isinstance(v, tuple) for v in model.config.values())
    rebuilt = UNet(**config)
    assert rebuilt.config == model.config
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_cifar10_config(cifar10):
    assert cifar10.config == dict(
        in_channels=3, model_channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2, attn_resolutions=[16],
        dropout=0.1, image_size=32, out_channels=3, num_groups=32,
    )


def test_same_seed_same_init():
    def build(seed):
        torch.manual_seed(seed)
        return UNet(**ODD).state_dict()

    a, b, c = build(0), build(0), build(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_t_as_python_int_or_scalar_tensor():
    torch.manual_seed(0)
    model = perturb_zero_init(UNet(**ODD)).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref = model(x, torch.full((3,), 42, dtype=torch.int64))
        torch.testing.assert_close(model(x, 42), ref, rtol=0, atol=0)
        torch.testing.assert_close(model(x, torch.tensor(42)), ref, rtol=0, atol=0)
        torch.testing.assert_close(model(x, torch.full((3,), 42, dtype=torch.int32)), ref, rtol=0, atol=0)


# --- Bad inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x,t,exc,match",
    [
        (torch.randn(1, 8, 8), torch.tensor([1]), ValueError, "4-D"),
        (torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), ValueError, "expected 1 input channels, got 3"),
        (torch.randn(2, 1, 8, 7), torch.tensor([1, 2]), ValueError, "divisible by 2"),
        (torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]), TypeError, "must be integer"),
        (torch.randn(2, 1, 8, 8), 3.0, TypeError, "t must be an integer tensor"),
        (torch.randn(2, 1, 8, 8), torch.tensor([True, False]), TypeError, "must be integer"),
        (torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]), ValueError, r"shape \[B\] = \[2\]"),
        (torch.randn(2, 1, 8, 8), torch.tensor([[1, 2]]), ValueError, r"shape \[B\] = \[2\]"),
    ],
)
def test_bad_forward_inputs_raise(x, t, exc, match):
    model = UNet(**ODD)
    with pytest.raises(exc, match=match):
        model(x, t)


def test_bad_config_raises():
    with pytest.raises(ValueError, match=r"model_channels \(48\) must be divisible by num_groups \(32\)"):
        UNet(model_channels=48)
    with pytest.raises(
        ValueError, match=r"image_size \(12\) must be divisible by 2\^\(len\(channel_mult\) - 1\) = 8"
    ):
        UNet(image_size=12)
