"""The Trainer's sync-free step and its fast path.

The optimizer step decides on the device whether a step applies (fused Adam's found_inf, an EMA decay of 1, a
device counter of skipped steps): checked bit for bit against the old host-side algorithm, written out here as
the oracle. The fast path's step function (static input buffers, everything on the device) run eagerly gives
the plain loop's losses exactly; on a GPU it is captured in a CUDA graph (tests marked cuda).
"""
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from fastddpm import Diffusion, UNet
from fastddpm.train import Trainer, ema_update_, ema_with_warmup


def make_trainer(out, data, device="cpu", check_inputs=True, **kw):
    torch.manual_seed(0)
    model = UNet(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(4,), dropout=0.1, image_size=8, num_groups=4)
    d = Diffusion(model, image_size=8, timesteps=50, beta_schedule="cosine", check_inputs=check_inputs)
    kw = {**dict(batch_size=8, lr=1e-3, warmup=3, ema_decay=0.9, seed=1), **kw}
    return Trainer(d, data, out=out, device=device, **kw)


@pytest.fixture(scope="module")
def data():
    return torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def old_optimizer_step(t: Trainer) -> torch.Tensor:
    """The step as it was: a host-side `if` on the gradient norm (one sync), GradScaler.step, and
    AveragedModel.update_parameters (which reads n_averaged on the host)."""
    t.scaler.unscale_(t.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(t.diffusion.model.parameters(),
                                               t.grad_clip if t.grad_clip else float("inf"))
    if torch.isfinite(grad_norm):
        t.scaler.step(t.optimizer)
        t.ema.update_parameters(t.diffusion.model)
    else:
        t.skipped += 1
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.last_lr = t.scheduler.base_lrs[0] * t.scheduler.lr_lambdas[0](t.scheduler.last_epoch)
    t.scheduler.step()
    return grad_norm.detach()


def full_state(t: Trainer) -> list[torch.Tensor]:
    adam = [v for s in t.optimizer.state.values() for v in (s["exp_avg"], s["exp_avg_sq"], s["step"])]
    return [*t.diffusion.model.state_dict().values(), *t.ema.module.state_dict().values(), *adam,
            t.ema.n_averaged, t._lr, torch.as_tensor(t.skipped), torch.as_tensor(t.scaler.get_scale())]


@pytest.mark.parametrize(("grad_clip", "amp"), [(1.0, "off"), (0.0, "off"), (1.0, "fp16")])
def test_sync_free_step_equals_the_old_step_bit_for_bit(tmp_path, data, grad_clip, amp):
    new = make_trainer(tmp_path / "new", data, grad_clip=grad_clip, amp=amp)
    old = make_trainer(tmp_path / "old", data, grad_clip=grad_clip, amp=amp)
    old.skipped = 0
    bad_steps = {2, 5}  # a non-finite gradient: early (the EMA's first copy done) and later
    for step in range(7):
        images = data[step * 5 % 32:][:8]
        norms = []
        for t, step_fn in ((new, Trainer._optimizer_step), (old, old_optimizer_step)):
            torch.manual_seed(100 + step)
            loss = t._micro_step(images)
            if step in bad_steps:
                next(t.diffusion.model.parameters()).grad.view(-1)[3] = float("inf" if step == 2 else "nan")
            norms.append(step_fn(t))
            assert torch.isfinite(loss)
        assert torch.equal(norms[0], norms[1]) or (step in bad_steps and not norms[0].isfinite())
        assert new.last_lr == old.last_lr
        for a, b in zip(full_state(new), full_state(old), strict=True):
            assert torch.equal(a, b), step
    assert int(new.skipped) == old.skipped == 2 and new.skipped.device.type == "cpu"
    assert int(new.ema.n_averaged) == 5
    assert int(new.optimizer.state[next(new.diffusion.model.parameters())]["step"]) == 5


def test_ema_update_is_update_parameters_on_the_device():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net.register_buffer("scale", torch.randn(2))  # a floating-point buffer is averaged too (use_buffers=True)
    ema = AveragedModel(net, multi_avg_fn=ema_with_warmup(0.9), use_buffers=True)
    device_ema = AveragedModel(net, multi_avg_fn=ema_with_warmup(0.9), use_buffers=True)
    floats = [t for t in (*device_ema.module.parameters(), *device_ema.module.buffers())
              if t.is_floating_point()]
    current = [t for t in (*net.parameters(), *net.buffers()) if t.is_floating_point()]
    for step in range(6):
        with torch.no_grad():
            for p in (*net.parameters(), net.scale):
                p.add_(torch.randn_like(p))
        apply = step != 3
        if apply:
            ema.update_parameters(net)
        ema_update_(floats, [c.detach() for c in current], device_ema.n_averaged, 0.9, torch.tensor(apply))
        for a, b in zip(floats, [t for t in (*ema.module.parameters(), *ema.module.buffers())
                                 if t.is_floating_point()]):
            assert torch.equal(a, b), step
        assert torch.equal(device_ema.n_averaged, ema.n_averaged)


def test_skipped_is_a_device_counter_logged_and_saved(tmp_path, data):
    t = make_trainer(tmp_path, data, log_every=2, save_every=2)
    model = t.diffusion.model
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    handle = model.register_forward_hook(poison)
    t.train(4)
    handle.remove()
    assert isinstance(t.skipped, torch.Tensor) and int(t.skipped) == 1
    import json

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 1]
    again = make_trainer(tmp_path, data)
    assert again.resume() == 4 and int(again.skipped) == 1


def test_resume_of_a_foreach_adam_checkpoint(tmp_path, data):
    """A checkpoint of the foreach Adam (step counts on the CPU, a float rate) resumes into the fused one."""
    t = make_trainer(tmp_path, data, save_every=2)
    t.train(2)
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    group.update(lr=float(group["lr"]), foreach=True, fused=None, capturable=False)
    for s in state["optimizer"]["state"].values():
        s["step"] = s["step"].cpu()
    torch.save(state, tmp_path / "checkpoint" / "state.pt")
    again = make_trainer(tmp_path, data)
    assert again.resume() == 2
    group = again.optimizer.param_groups[0]
    assert group["lr"] is again._lr and group["fused"] and not group["foreach"]
    assert float(again._lr) == pytest.approx(float(t._lr))
    again.train(3)  # the fused kernel runs on what was loaded
    assert int(again.optimizer.state[next(again.diffusion.model.parameters())]["step"]) == 3


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_training_steps_never_sync(tmp_path, data, amp):
    """A whole training step (loss, backward, clip, Adam, EMA, the skip decision, the rate schedule) issues no
    device→host sync, including a step with a non-finite gradient."""
    t = make_trainer(tmp_path, data, device="cuda", amp=amp)
    images = data[:8].cuda()
    t._micro_step(images)
    t._optimizer_step()  # warm-up: the optimizer's state, allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            t._micro_step(images)
            if step == 1:
                next(t.diffusion.model.parameters()).grad.view(-1)[0] = float("nan")
            t._optimizer_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(t.skipped) == 1 and int(t.ema.n_averaged) == 3


# ----------------------------------------------------------------------------- the fast path
@pytest.mark.parametrize("kw", [dict(), dict(grad_accum=2, hflip=True)], ids=["plain", "accum-flips"])
def test_fast_step_run_eagerly_gives_the_plain_losses(tmp_path, data, kw):
    """On a CPU the fast path runs its step function (static buffers, the device-side update) eagerly: the
    same losses, weights, EMA and optimizer state as the plain loop, bit for bit."""
    plain = make_trainer(tmp_path / "plain", data, **kw)
    fast = make_trainer(tmp_path / "fast", data, fast_path=True, **kw)
    torch.manual_seed(7)
    expected = plain.train(6)
    torch.manual_seed(7)
    assert fast.train(6) == expected
    assert fast._static_images is not None and fast._graph is None  # the fast step ran, eagerly
    assert fast._static_images.shape == (kw.get("grad_accum", 1), 8, 1, 8, 8)
    for a, b in zip(full_state(fast), full_state(plain), strict=True):
        assert torch.equal(a, b)


def test_fast_path_resumes_exactly(tmp_path, data):
    full = make_trainer(tmp_path / "a", data, fast_path=True)
    torch.manual_seed(3)
    losses = full.train(6)
    first = make_trainer(tmp_path / "b", data, fast_path=True, save_every=3)
    torch.manual_seed(3)
    assert first.train(3) == losses[:3]
    second = make_trainer(tmp_path / "b", data, fast_path=True)
    second.resume()
    assert second.train(6) == losses[3:]


def test_resume_drops_a_captured_graph(tmp_path, data):
    """resume() replaces the optimizer's state tensors, which a graph captured before would go on updating:
    it drops the graph, and the fast path warms up and captures again (on a GPU: the test below)."""
    t = make_trainer(tmp_path, data, fast_path=True, save_every=2)
    t.train(2)
    t._graph, t._eager_fast_steps = object(), 7  # as after a capture
    assert t.resume() == 2
    assert t._graph is None and t._eager_fast_steps == 0


def test_trainer_state_lives_on_its_device(tmp_path, data):
    """The counters and the rate the step updates on the device (EMA count, skipped steps, learning rate) are
    on the trainer's device, where the model is."""
    t = make_trainer(tmp_path, data, fast_path=True)
    device = next(t.diffusion.model.parameters()).device
    assert {t.ema.n_averaged.device, t.skipped.device, t._lr.device} == {device}


@pytest.mark.cuda
def test_graph_resume_continues_the_graphed_run(tmp_path, data):
    """A run resumed on the fast path on a GPU (state on the device, the graph captured anew after resume)
    goes on as the run that never stopped."""
    full = make_trainer(tmp_path / "a", data, device="cuda", fast_path=True)
    torch.manual_seed(3)
    losses = full.train(10)
    assert full._graph is not None and full.ema.n_averaged.device.type == "cuda"
    part = make_trainer(tmp_path / "b", data, device="cuda", fast_path=True, save_every=5)
    torch.manual_seed(3)
    part.train(5)
    part.resume()
    assert part._graph is None
    torch.testing.assert_close(torch.tensor(part.train(10)), torch.tensor(losses[5:]), rtol=2e-3, atol=0)
    assert part._graph is not None


def test_channels_last_trains_the_same_model(tmp_path, data):
    plain = make_trainer(tmp_path / "plain", data)
    last = make_trainer(tmp_path / "last", data, fast_path=True, channels_last=True)
    conv = last.diffusion.model.down[0].res[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.manual_seed(7)
    expected = plain.train(4)
    torch.manual_seed(7)
    got = last.train(4)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=0)
    last.save_checkpoint()  # the weights are saved contiguous: they load into a plain network
    again = make_trainer(tmp_path / "last", data)
    assert again.resume() == 4


def test_fast_path_names_a_batch_of_another_shape(tmp_path, data):
    t = make_trainer(tmp_path, data, fast_path=True)
    t._fast_step([data[:8]])
    with pytest.raises(ValueError, match=r"batches all have one shape: \[8, 1, 8, 8\].*got \[4, 1, 8, 8\]"):
        t._fast_step([data[:4]])


def test_fast_path_refuses_several_processes(tmp_path, data, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    with pytest.raises(ValueError, match="fast_path=True trains in one process"):
        make_trainer(tmp_path, data, fast_path=True)


def test_cli_takes_the_fast_path_by_default_on_a_gpu_alone(monkeypatch):
    from fastddpm.cli import _fast_path, parse_args

    args = parse_args(["train", "--out", "x"])
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert _fast_path(args, cuda) and not _fast_path(args, cpu)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not _fast_path(args, cuda)  # torchrun: DDP, no graph
    monkeypatch.delenv("WORLD_SIZE")
    assert not _fast_path(parse_args(["train", "--out", "x", "--no-fast-path"]), cuda)
    assert _fast_path(parse_args(["train", "--out", "x", "--fast-path"]), cpu)


def test_cli_trains_on_the_fast_path(tmp_path, monkeypatch, capsys):
    import json

    from fastddpm.cli import main

    monkeypatch.setenv("FASTDDPM_NO_PROGRESS", "1")
    out = tmp_path / "run"
    common = ["train", "--data", "digits", "--out", str(out), "--batch-size", "8", "--timesteps", "50",
              "--beta-schedule", "cosine", "--num-samples", "0", "--log-every", "1", "--device", "cpu"]
    assert main([*common, "--steps", "2", "--fast-path", "--channels-last"]) == 0
    assert main([*common, "--steps", "3", "--resume"]) == 0  # per invocation: the plain path continues
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["skipped"] == 0 for r in rows)
    assert "fast_path" not in json.loads((out / "run.json").read_text())["settings"]


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_graph_replay_gives_the_eager_fast_steps_losses(tmp_path, data, amp):
    graphed = make_trainer(tmp_path / "g", data, device="cuda", fast_path=True, amp=amp, hflip=True)
    eager = make_trainer(tmp_path / "e", data, device="cuda", fast_path=True, cuda_graph=False, amp=amp,
                         hflip=True)
    torch.manual_seed(5)
    got = graphed.train(10)
    assert graphed._graph is not None  # captured after the warm-up, replayed since
    torch.manual_seed(5)
    expected = eager.train(10)
    assert eager._graph is None
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-3, atol=0)
    for a, b in zip(graphed.ema.module.parameters(), eager.ema.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.cuda
def test_graph_replays_never_sync_and_skip_a_non_finite_step(tmp_path, data):
    """Replays of the captured step issue no device→host sync; a NaN batch (input checks off, so that it
    reaches the loss) gives a non-finite gradient norm, and the graph leaves the weights, the EMA and Adam's
    step count as they were and counts the step."""
    t = make_trainer(tmp_path, data, device="cuda", fast_path=True, log_every=1000, check_inputs=False)
    t.train(5)  # the warm-up, the capture, replays
    assert t._graph is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            t._fast_step([data[:8]])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    weights = [p.detach().clone() for p in (*t.diffusion.model.parameters(), *t.ema.module.parameters())]
    step = t.optimizer.state[next(t.diffusion.model.parameters())]["step"].clone()
    loss, grad_norm = t._fast_step([data[:8] * float("nan")])
    assert not torch.isfinite(grad_norm) and int(t.skipped) == 1
    assert all(torch.equal(a, b) for a, b in
               zip(weights, (*t.diffusion.model.parameters(), *t.ema.module.parameters())))
    assert torch.equal(t.optimizer.state[next(t.diffusion.model.parameters())]["step"], step)
    t._fast_step([data[:8]])
    assert int(t.skipped) == 1 and not torch.equal(weights[0], next(t.diffusion.model.parameters()))


@pytest.mark.isolated  # (were a capture to fail, torch's CUDA state would stay broken for the process)
@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_a_model_that_syncs_trains_eagerly_with_one_warning(tmp_path, data, amp):
    t = make_trainer(tmp_path, data, device="cuda", fast_path=True, amp=amp, log_every=1)
    model = t.diffusion.model
    forward = model.forward

    def syncing(x, time):
        float(x.abs().max())  # a device→host read: not allowed while a graph is captured
        return forward(x, time)

    model.forward = syncing
    with pytest.warns(RuntimeWarning, match="capturing the training step in a CUDA graph failed"):
        losses = t.train(6)
    assert t._graph is None and t._graph_failed and len(losses) == 6
    assert all(torch.isfinite(torch.tensor(losses)))
    # every step applied (the one whose capture failed too) or, under fp16's first loss scales, skipped
    assert int(t.ema.n_averaged) + int(t.skipped) == 6
    assert amp == "fp16" or int(t.skipped) == 0


@pytest.mark.cuda
def test_bf16_trains_as_fp32_on_digits(tmp_path):
    """The issue's check of the fast path's bf16 autocast: on the digits, with the CLI's settings, the mean
    loss over steps 1500–2000 is within 2 % of fp32's."""
    from fastddpm.data import get_dataset

    digits = get_dataset("digits", 8, channels=1)
    means = {}
    for amp in ("off", "bf16"):
        torch.manual_seed(0)
        model = UNet.small(in_channels=1, image_size=8)
        d = Diffusion(model, image_size=8, timesteps=1000, schedule_fn_kwargs={"scale_with_timesteps": True})
        t = Trainer(d, digits, out=tmp_path / amp, batch_size=128, lr=1e-3, warmup=250, ema_decay=0.999,
                    device="cuda", amp=amp, fast_path=True, log_every=100)
        losses = t.train(2000, progress=False)
        assert t._graph is not None
        means[amp] = sum(losses[1500:]) / 500
    assert abs(means["bf16"] - means["off"]) <= 0.02 * means["off"], means
