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


def make_trainer(out, data, device="cpu", **kw):
    torch.manual_seed(0)
    model = UNet(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(4,), dropout=0.1, image_size=8, num_groups=4)
    d = Diffusion(model, image_size=8, timesteps=50, beta_schedule="cosine")
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
