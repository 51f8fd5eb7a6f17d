"""GPU-only checks of the reference path (skipped without a CUDA device; tools/device_check.sh runs them)."""
import pytest
import torch

from fastddpm import Diffusion, UNet

pytestmark = pytest.mark.cuda


def small_diffusion(**kw):
    torch.manual_seed(0)
    model = UNet(in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                 dropout=0.0, image_size=8)
    return Diffusion(model, image_size=8, timesteps=50, beta_schedule="cosine", **kw).cuda()


@pytest.mark.parametrize("sampling_timesteps", [None, 10])
def test_sampling_loop_never_syncs(sampling_timesteps):
    d = small_diffusion(sampling_timesteps=sampling_timesteps)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device→host sync inside the loop raises
    try:
        out = d.sample(4, generator=torch.Generator("cuda").manual_seed(0), progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (4, 1, 8, 8) and out.is_cuda


def test_cuda_sampling_is_seeded_and_loss_trains():
    d = small_diffusion()
    a = d.sample(2, generator=torch.Generator("cuda").manual_seed(1), progress=False)
    b = d.sample(2, generator=torch.Generator("cuda").manual_seed(1), progress=False)
    assert torch.equal(a, b)
    loss = d(torch.rand(8, 1, 8, 8, device="cuda"))
    loss.backward()
    assert torch.isfinite(loss)
