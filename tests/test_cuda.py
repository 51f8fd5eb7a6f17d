"""GPU-only checks of the reference path (skipped without a CUDA device; tools/device_check.sh runs them)."""
import pytest
import torch

from fastddpm import Diffusion, UNet

pytestmark = pytest.mark.cuda


def small_diffusion(dropout=0.0, **kw):
    torch.manual_seed(0)
    model = UNet(in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(4,), dropout=dropout, image_size=8)
    # The DDPM U-Net zero-initialises its output conv (and each block's second conv): a fresh one outputs 0,
    # and a test of the sampling loop would never see the network. Every parameter gets a random part.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
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


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_training_step_never_syncs(backend):
    """Diffusion's input checks (image range, t) run on the device: a training step with check_inputs=True
    issues no device→host sync, so the host runs ahead of the GPU."""
    d = small_diffusion(backend=backend)
    images = torch.rand(8, 1, 8, 8, device="cuda")
    d(images).backward()  # warm-up (first-call allocations, autotuning)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = d(images)
        loss.backward()
        d.p_losses(images * 2 - 1, torch.randint(0, 50, (8,), device="cuda")).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


@pytest.mark.isolated(alone=True)  # a device-side assert ends the process's CUDA context
@pytest.mark.parametrize("case", ["t", "images"])
def test_bad_values_fail_on_the_device(case):
    d = small_diffusion()
    images = torch.rand(4, 1, 8, 8, device="cuda")
    with pytest.raises(RuntimeError, match="device-side assert"):
        if case == "t":
            d.p_losses(images, torch.tensor([0, 1, 2, 50], device="cuda"))
        else:
            d(images + 1.5)
        torch.cuda.synchronize()


def test_cuda_sampling_is_seeded_and_loss_trains():
    d = small_diffusion()
    a = d.sample(2, generator=torch.Generator("cuda").manual_seed(1), progress=False)
    b = d.sample(2, generator=torch.Generator("cuda").manual_seed(1), progress=False)
    assert torch.equal(a, b)
    loss = d(torch.rand(8, 1, 8, 8, device="cuda"))
    loss.backward()
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- the Triton ops on a GPU
def _op_cases():
    from fastddpm.schedules import NoiseSchedule, get_beta_schedule

    sched = NoiseSchedule(get_beta_schedule("linear", 1000)).cuda()
    x = torch.randn(3, 2, 5, 5, device="cuda")
    p, n = torch.randn_like(x, requires_grad=True), torch.randn_like(x)
    t = torch.tensor([0, 1, 999], device="cuda")
    seed = torch.tensor([3], device="cuda")
    tables = (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)
    ops = torch.ops.fastddpm
    return [(ops.q_sample.default, (x.clone().requires_grad_(True), t, *tables, n, None, 0, False)),
            (ops.q_sample.default, (x, t, *tables, None, seed, 0, True)),
            (ops.diffusion_loss.default, (p, x, t, *tables, None, seed, 0, 2, 5.0, 1, False)),
            (ops.diffusion_loss.default, (p, None, t, *tables, n, None, 0, 0, None, 0, True)),
            # (one op per operation, its CUDA kernel the Triton implementation)
            (ops.p_sample_step.default, (n, x, t, sched.reverse_table(), None, seed, 0, 0, 1.0, None, True,
                                         True)),
            (ops.ddim_step.default, (n, x, t, t - 1, sched.reverse_table(), sched.alphas_cumprod, n, None, 0,
                                     2, 0.5, 1.0, None, None, True, True, False))]


def test_triton_ops_full_opcheck():
    """Including the AOT-dispatch test that the CPU interpreter cannot run."""
    for op, args in _op_cases():
        torch.library.opcheck(op, args)


def test_compile_fullgraph_training_step_with_the_triton_ops():
    """A training step of a small U-Net with in-kernel noise, the fused loss and its backward compiles with
    fullgraph=True (inductor, which sees the Triton kernels through wrap_triton) and matches eager."""
    d = small_diffusion(backend="triton")
    x0 = torch.rand(4, 1, 8, 8, device="cuda") * 2 - 1
    t = torch.tensor([0, 1, 25, 49], device="cuda")

    def step(x0, t, seed):
        from fastddpm.ops.diffusion_loss import diffusion_loss
        from fastddpm.ops.q_sample import q_sample

        x_t, _ = q_sample(d.schedule, x0, t, seed=seed, backend="triton", check=False)
        return diffusion_loss(d.schedule, d.model(x_t, t), x0, t, seed=seed, backend="triton", check=False)

    seed = torch.tensor([11], device="cuda")
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x0, t, seed)
    loss.backward()
    assert torch.allclose(loss, step(x0, t, seed), rtol=1e-4, atol=1e-6)


def test_triton_noise_matches_the_reference_stream_on_gpu():
    from fastddpm.ops.q_sample import philox_noise_like, q_sample
    from fastddpm.schedules import NoiseSchedule, get_beta_schedule

    sched = NoiseSchedule(get_beta_schedule("linear", 1000)).cuda()
    x = torch.zeros(4, 3, 16, 16, device="cuda")
    seed = torch.tensor([2**40 + 7], device="cuda")
    _, eps = q_sample(sched, x, torch.zeros(4, dtype=torch.long, device="cuda"), seed=seed, offset=12,
                      write_noise=True, backend="triton")
    ref = philox_noise_like(x.cpu(), seed.cpu(), 12)
    assert (eps.cpu() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("sampling_timesteps", [None, 10])
def test_cuda_graph_sampling_equals_the_eager_loop(sampling_timesteps):
    """One captured step replayed for every t gives the eager loop's samples for the same seed (the same
    kernels on the same inputs; allclose rather than equal only in case cuDNN picks another algorithm inside
    the graph), and the replay loop never syncs."""
    d = small_diffusion(sampling_timesteps=sampling_timesteps, backend="triton")
    eager = d.sample(3, generator=torch.Generator("cuda").manual_seed(5), progress=False)
    d.sample(3, generator=torch.Generator("cuda").manual_seed(5), progress=False, cuda_graph=True)  # capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graphed = d.sample(3, generator=torch.Generator("cuda").manual_seed(5), progress=False,
                           cuda_graph=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    from fastddpm import sampling

    assert sampling._graphs[d][1] is not None  # captured, not the eager fallback


def _sample(d, graph, seed=5, batch=3, captured=True):
    """d.sample; with graph=True, also that the step was captured (a failed capture warns once and samples
    eagerly, which would pass the comparisons)."""
    from fastddpm import sampling

    out = d.sample(batch, generator=torch.Generator("cuda").manual_seed(seed), progress=False,
                   cuda_graph=graph)
    if graph:
        assert (sampling._graphs[d][1] is not None) == captured
    return out


def test_the_network_is_not_trivial():
    d = small_diffusion()
    x = torch.randn(2, 1, 8, 8, device="cuda")
    assert d.model(x, torch.tensor([3, 40], device="cuda")).abs().mean() > 1e-3


def test_cuda_graph_follows_modes_and_weights():
    """A captured step keeps what it was captured with; the cache re-captures when any of it changes: the
    train/eval mode (dropout), in-place weight updates (same addresses: the graph reads the new values),
    inference mode vs no_grad (the static buffers' kind), autocast."""
    d = small_diffusion(dropout=0.5, sampling_timesteps=10, backend="triton")
    d.train()
    _sample(d, True)  # captured with dropout on
    d.eval()
    torch.testing.assert_close(_sample(d, True), _sample(d, False), rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        for p in d.model.parameters():
            p.mul_(0.9)  # an optimizer step: same tensors, new values
    torch.testing.assert_close(_sample(d, True), _sample(d, False), rtol=1e-5, atol=1e-5)

    with torch.inference_mode():
        inference = _sample(d, True)
    # no "inference tensor" error
    torch.testing.assert_close(_sample(d, True), inference, rtol=1e-5, atol=1e-5)

    full = _sample(d, True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = _sample(d, True)
        torch.testing.assert_close(low, _sample(d, False), rtol=1e-5, atol=1e-5)
    assert not torch.equal(low, full)
    # A weight update, then a new autocast block with the same key: the graph captured in the first block is
    # replayed, and must not read the bf16 weight copies autocast cached there (freed when that block ended)
    # but cast the current weights itself.
    with torch.no_grad():
        for p in d.model.parameters():
            p.mul_(1.1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(_sample(d, True), _sample(d, False), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_sample(d, True), _sample(d, False), rtol=1e-5, atol=1e-5)


def test_a_diffusion_that_sampled_with_a_graph_copies_and_saves():
    import copy
    import io

    d = small_diffusion(sampling_timesteps=10, backend="triton")
    _sample(d, True)
    twin = copy.deepcopy(d)  # e.g. an EMA copy
    torch.save(d, io.BytesIO())
    torch.testing.assert_close(_sample(twin, True), _sample(d, True), rtol=1e-5, atol=1e-5)


@pytest.mark.isolated  # (were a capture to fail, torch's CUDA state would stay broken for the process)
def test_a_model_that_syncs_falls_back_to_the_eager_loop_with_one_warning():
    import warnings

    d = small_diffusion(sampling_timesteps=10, backend="triton")
    forward = d.model.forward

    def syncing(x, t, *args, **kwargs):
        float(x.abs().max())  # a device→host read: not allowed while a graph is captured
        return forward(x, t, *args, **kwargs)

    d.model.forward = syncing
    with pytest.warns(RuntimeWarning, match="capturing the sampling step in a CUDA graph failed"):
        graphed = _sample(d, True, captured=False)
    torch.testing.assert_close(graphed, _sample(d, False), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered: no second capture, no second warning
        torch.testing.assert_close(_sample(d, True, captured=False), graphed, rtol=1e-5, atol=1e-5)
