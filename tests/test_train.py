import json

import torch
from torch.optim.swa_utils import AveragedModel

from fastddpm.train import ema_with_warmup


def test_ema_update_formula_with_warmup():
    # ema ← d·ema + (1 − d)·θ with d = min(decay, (1 + n)/(10 + n)), n = updates done before this one
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = AveragedModel(net, multi_avg_fn=ema_with_warmup(0.9), use_buffers=True)
    expected = [p.detach().clone() for p in net.parameters()]
    for step in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(net)
        if step == 0:  # AveragedModel copies the weights on its first update
            expected = [p.detach().clone() for p in net.parameters()]
            continue
        d = min(0.9, (1 + step) / (10 + step))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, net.parameters())]
    for e, p in zip(expected, ema.module.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-6)


import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from fastddpm import Diffusion, UNet  # noqa: E402
from fastddpm.train import EpochBatchSampler, Trainer  # noqa: E402


def tiny_trainer(out, data, **kw):
    torch.manual_seed(0)
    model = UNet(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(4,), dropout=0.1, image_size=8, num_groups=4)
    d = Diffusion(model, image_size=8, timesteps=50, beta_schedule="cosine")
    return Trainer(d, data, out=out, batch_size=8, lr=1e-3, warmup=3, ema_decay=0.9, seed=1, **kw)


@pytest.fixture(scope="module")
def data():
    return torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_batch_sampler_is_a_function_of_step():
    s = EpochBatchSampler(10, 3, seed=4)
    seen = torch.cat([s.indices(k) for k in range(3)])
    assert sorted(seen.tolist()) == sorted(set(seen.tolist())) and len(seen) == 9  # an epoch: no repeats
    assert not torch.equal(s.indices(0), s.indices(3))  # the next epoch is reshuffled
    resumed = iter(EpochBatchSampler(10, 3, seed=4, start_step=5))
    assert next(resumed) == s.indices(5).tolist()


def test_resume_is_exact(tmp_path, data):
    full = tiny_trainer(tmp_path / "a", data)
    losses = full.train(8)
    first = tiny_trainer(tmp_path / "b", data, save_every=4)
    assert first.train(4) == losses[:4]
    second = tiny_trainer(tmp_path / "b", data)
    torch.manual_seed(123)  # whatever happens to the global RNG in between is restored from the checkpoint
    assert second.resume() == 4
    assert second.train(8) == losses[4:]  # bit-identical, loss by loss
    for a, b in zip(full.ema.module.parameters(), second.ema.module.parameters()):
        assert torch.equal(a, b)
    assert not (tmp_path / "b" / "checkpoint.tmp").exists()


class ListDataset(torch.utils.data.Dataset):
    """A Dataset (not a tensor): batches go through a DataLoader, as for image folders."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_resume_is_exact_through_a_dataloader_with_accumulation_flips_and_fp16(tmp_path, data):
    kw = dict(grad_accum=2, hflip=True, amp="fp16")
    full = tiny_trainer(tmp_path / "a", ListDataset(data), **kw)
    losses = full.train(6)
    first = tiny_trainer(tmp_path / "b", ListDataset(data), save_every=3, **kw)
    assert first.train(3) == losses[:3]
    second = tiny_trainer(tmp_path / "b", ListDataset(data), **kw)
    torch.rand(5)  # the global RNG moves on: the checkpoint restores it
    second.resume()
    assert second.train(6) == losses[3:]
    assert second.scaler.get_scale() == full.scaler.get_scale()


def test_resume_refuses_other_diffusion_settings(tmp_path, data):
    tiny_trainer(tmp_path, data, save_every=1).train(1)
    torch.manual_seed(0)
    model = UNet(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(4,), image_size=8, num_groups=4)
    other = Trainer(Diffusion(model, image_size=8, timesteps=50, beta_schedule="cosine", objective="pred_v"),
                    data, out=tmp_path, batch_size=8)
    with pytest.raises(ValueError, match="other diffusion settings.*objective: 'pred_noise' vs 'pred_v'"):
        other.resume()


def test_corrupted_checkpoint_names_the_file(tmp_path, data):
    t = tiny_trainer(tmp_path, data, save_every=2)
    t.train(2)
    ckpt = tmp_path / "checkpoint"
    blob = (ckpt / "state.pt").read_bytes()
    (ckpt / "state.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="state.pt is corrupted"):
        tiny_trainer(tmp_path, data).resume()
    t.save_checkpoint()
    blob = (ckpt / "ema.safetensors").read_bytes()
    (ckpt / "ema.safetensors").write_bytes(blob[:100])
    with pytest.raises(ValueError, match="ema.safetensors is corrupted"):
        tiny_trainer(tmp_path, data).resume()
    (ckpt / "ema.safetensors").unlink()
    with pytest.raises(ValueError, match="ema.safetensors is missing"):
        tiny_trainer(tmp_path, data).resume()
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        tiny_trainer(tmp_path / "none", data).resume()


def test_sigkill_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastddpm", "train", "--data", "digits", "--out", str(out), "--steps",
           "100000", "--batch-size", "8", "--timesteps", "50", "--beta-schedule", "cosine", "--save-every",
           "1", "--num-samples", "0"]
    proc = subprocess.Popen(cmd, env={**os.environ, "FASTDDPM_NO_PROGRESS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint").is_dir() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # well inside the next writes
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The run's settings come from OUT/run.json: --out and --resume suffice. --steps 1 is behind the
    # checkpoint, which says at which step it is once it has loaded; one step more then trains.
    resume = [sys.executable, "-m", "fastddpm", "train", "--out", str(out), "--resume"]
    env = {**os.environ, "FASTDDPM_NO_PROGRESS": "1"}
    r = subprocess.run(resume + ["--steps", "1"], capture_output=True, text=True, env=env)
    said = r.stdout + r.stderr  # at step 1: nothing to train (exit 0); further: behind it (exit 2)
    assert r.returncode in (0, 2) and "is at step" in said and "Traceback" not in said, said
    step = int(said.split("is at step ")[1].split()[0])
    r = subprocess.run(resume + ["--steps", str(step + 1)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {out / 'checkpoint'} at step {step}" in r.stdout


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_steps_are_finite(tmp_path, data, amp):
    t = tiny_trainer(tmp_path, data, amp=amp)
    before = [p.detach().clone() for p in t.diffusion.model.parameters()]
    losses = t.train(3)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))) and t.skipped == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, t.diffusion.model.parameters()))
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in t.diffusion.model.parameters())


def test_non_finite_step_is_skipped_and_counted(tmp_path, data):
    t = tiny_trainer(tmp_path, data, log_every=1)
    model = t.diffusion.model
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 2 else output

    handle = model.register_forward_hook(poison)
    losses = t.train(3)
    handle.remove()
    assert t.skipped == 1 and t.step == 3
    assert torch.isnan(torch.tensor(losses[1])) and torch.isfinite(torch.tensor([losses[0], losses[2]])).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in t.ema.module.parameters())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["skipped"] == 1


def test_outputs_metrics_samples_loss_plot(tmp_path, data):
    t = tiny_trainer(tmp_path, data, log_every=2, sample_every=2, num_samples=4, grad_accum=2, hflip=True)
    t.train(4)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "steps_per_s", "skipped"} <= set(r) and r["loss"] > 0
    from PIL import Image

    for name in ["samples/step_2.png", "samples/step_4.png", "loss.png"]:
        assert Image.open(tmp_path / name).size[0] > 20, name
    t.save(progress=False)
    d = Diffusion.from_pretrained(tmp_path)  # the training folder: the EMA model in model/
    assert all(torch.equal(a, b)
               for a, b in zip(d.model.state_dict().values(), t.ema.module.state_dict().values()))


def test_config_file_and_flags(tmp_path):
    from fastddpm.cli import parse_args

    cfg = tmp_path / "run.toml"
    cfg.write_text('out = "x"\nsteps = 7\nchannel-mult = [1, 2]\nlr = 0.001\namp = "bf16"\nflip = false\n')
    args = parse_args(["train", "--config", str(cfg), "--steps", "9"])
    assert ((args.out, args.steps, args.channel_mult, args.lr, args.amp, args.flip)
            == ("x", 9, (1, 2), 0.001, "bf16", False))
    for bad in ['stepz = 3', 'amp = "fp8"', 'lr = "abc"', 'resume = "no"', 'steps = true', 'channels = 2']:
        cfg.write_text(f'out = "x"\n{bad}\n')
        with pytest.raises(SystemExit):
            parse_args(["train", "--config", str(cfg)])
    cfg.write_text('out = "x"\nresume = true\n')
    assert parse_args(["train", "--config", str(cfg)]).resume is True


def test_bad_images_are_named(tmp_path):
    from fastddpm.data import ImageFolder

    (tmp_path / "ok.png").write_bytes(b"")  # an empty file is not an image
    with pytest.raises(OSError, match="cannot read image .*ok.png"):
        ImageFolder(tmp_path, 8)
    r = subprocess.run([sys.executable, "-m", "fastddpm", "train", "--data", str(tmp_path), "--out",
                        str(tmp_path / "o"), "--steps", "1", "--num-workers", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "ok.png" in r.stderr and "Traceback" not in r.stderr


def test_two_process_gloo_ddp(tmp_path):
    out = tmp_path / "ddp"
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "fastddpm", "train", "--data", "digits", "--out", str(out), "--steps", "4", "--batch-size",
           "8", "--timesteps", "50", "--beta-schedule", "cosine", "--save-every", "2", "--log-every", "2",
           "--num-samples", "4", "--device", "cpu"]
    env = {**os.environ, "FASTDDPM_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("model saved to") == 1  # rank 0 alone reports and writes
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    assert (out / "checkpoint" / "state.pt").is_file() and (out / "samples.png").is_file()
    # resume the 2-process run on one process (another world size), two more steps
    r = subprocess.run([sys.executable, "-m", "fastddpm", "train", "--data", "digits", "--out", str(out),
                        "--steps", "6", "--batch-size", "8", "--timesteps", "50", "--beta-schedule", "cosine",
                        "--num-samples", "0", "--resume"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 4" in r.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6]
    r = subprocess.run([sys.executable, "-m", "fastddpm", "train", "--data", "digits", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "already holds a training run" in r.stderr


def test_resume_after_a_kill_between_the_renames(tmp_path, data):
    # save_checkpoint renames checkpoint → checkpoint.old, then checkpoint.tmp → checkpoint: a kill between
    # the two leaves .old (complete) and .tmp (maybe partial); resume takes .old.
    t = tiny_trainer(tmp_path, data, save_every=2)
    losses = t.train(4)
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp").mkdir()
    (tmp_path / "checkpoint.tmp" / "model.safetensors").write_bytes(b"partial")
    expected = tiny_trainer(tmp_path / "full", data).train(6)
    assert expected[:4] == losses
    again = tiny_trainer(tmp_path, data)
    assert again.resume() == 4
    assert again.train(6) == expected[4:]
