"""save_pretrained / from_pretrained: atomic pairs, permissions, readable mismatches; the training dtype; the
command line's own polish (--version, --help without torch, defaults in the help)."""

import os
import stat
import subprocess
import sys

import pytest
import torch

from fastddpm import Diffusion, UNet
from fastddpm.cli import build_parser, main


def small_diffusion(**model_kw):
    torch.manual_seed(0)
    return Diffusion(UNet.small(**model_kw), image_size=8, timesteps=20, beta_schedule="cosine")


def test_save_pretrained_writes_both_files_with_the_umask_and_leaves_nothing_else(tmp_path):
    old = os.umask(0o027)
    try:
        small_diffusion().save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "model.safetensors"]  # no temporary folder left
    modes = {name: stat.S_IMODE(os.stat(tmp_path / "m" / name).st_mode) for name in files}
    assert modes == {"config.json": 0o640, "model.safetensors": 0o640}


def test_an_interrupted_save_is_recognised_and_the_old_pair_survives_a_failed_one(tmp_path, monkeypatch):
    first, second = small_diffusion(), small_diffusion(model_channels=8, num_groups=2)
    first.save_pretrained(tmp_path)
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # a full disk: the old pair stays, whole
        m.setattr(safetensors.torch, "save_file", full)
        with pytest.raises(OSError, match="No space left"):
            second.save_pretrained(tmp_path)
    loaded = Diffusion.from_pretrained(tmp_path)
    assert loaded.model.config["model_channels"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]

    real_replace, calls = os.replace, []

    def killed_after_the_weights(src, dst):  # a kill between the two renames
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed_after_the_weights)
        with pytest.raises(KeyboardInterrupt):
            second.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="come from two different saves"):
        Diffusion.from_pretrained(tmp_path)
    second.save_pretrained(tmp_path)
    assert Diffusion.from_pretrained(tmp_path).model.config["model_channels"] == 8


def test_loading_into_another_network_names_the_settings(tmp_path):
    small_diffusion().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"other settings .*model_channels: 16 vs 32") as e:
        Diffusion.from_pretrained(tmp_path, model=UNet.small(model_channels=32))
    assert len(str(e.value)) < 400


def test_loading_weights_that_do_not_fit_a_config_less_network_is_short(tmp_path):
    small_diffusion().save_pretrained(tmp_path)

    class Wrapped(torch.nn.Module):  # no `config`: only the weights can be compared
        def __init__(self):
            super().__init__()
            self.net = UNet.small(model_channels=32)
            self.channels = 1

        def forward(self, x, t):
            return self.net(x, t)

    with pytest.raises(ValueError, match="weights missing") as e:
        Diffusion.from_pretrained(tmp_path, model=Wrapped())
    assert len(str(e.value)) < 600  # counts and two examples, not every key


def test_resuming_a_trainer_with_another_network_names_the_settings(tmp_path):
    from fastddpm.train import Trainer

    data = torch.rand(16, 1, 8, 8)
    Trainer(small_diffusion(), data, out=tmp_path, batch_size=8, save_every=1).train(1)
    other = Trainer(small_diffusion(model_channels=32), data, out=tmp_path, batch_size=8)
    expected = r"other model settings \(saved vs now\): model_channels: 16 vs 32"
    with pytest.raises(ValueError, match=expected) as e:
        other.resume()
    assert len(str(e.value)) < 400


def test_non_utf8_config_names_the_file(tmp_path, capsys):
    small_diffusion().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes(b'{"diffusion": "\xff\xfe"}')
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'} is not UTF-8"):
        Diffusion.from_pretrained(tmp_path)
    assert main(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "s.png")]) == 2
    assert str(tmp_path / "config.json") in capsys.readouterr().err


def test_a_float64_model_trains_on_float32_images():
    d = small_diffusion().double()
    loss = d(torch.rand(4, 1, 8, 8))  # float32 images, as a DataLoader gives them
    loss.backward()
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in d.model.parameters())


# ---------------------------------------------------------------------------------------------------- CLI
def run(*args, code="from fastddpm.cli import main; sys.exit(main())"):
    return subprocess.run([sys.executable, "-c", f"import sys; {code}", *args], capture_output=True,
                          text=True, env={**os.environ, "FASTDDPM_NO_PROGRESS": "1"}, timeout=300)


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("fastddpm 0.")


def test_help_does_not_import_torch():
    code = ("from fastddpm.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    for args in (["--help"], ["train", "--help"], ["--version"]):
        r = run(*args, code=code)
        assert r.returncode == 0 and r.stdout.rstrip().endswith("no torch"), (args, r.stdout[-300:], r.stderr)


def test_every_flag_says_its_default():
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if not action.option_strings or action.dest in ("help", "config", "resume", "checkpoint", "fid"):
                continue
            if action.dest == "out" and name != "demo":  # required
                continue
            assert action.help and "default" in action.help, (name, action.dest)


def test_train_without_out_prints_trains_usage():
    r = run("train", "--steps", "3")
    assert r.returncode == 2
    assert r.stderr.startswith("usage: fastddpm train") and "--out is required" in r.stderr


def test_num_groups_and_the_final_loss_window(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTDDPM_NO_PROGRESS", "1")
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--out", str(out), "--steps", "3", "--batch-size", "8",
                 "--timesteps", "20", "--beta-schedule", "cosine", "--num-samples", "0",
                 "--model-channels", "8", "--num-groups", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "final loss (mean of last 3)" in stdout
    assert Diffusion.from_pretrained(out).model.config["num_groups"] == 2
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / f"{i}.png")
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "f"), "--steps", "1",
                 "--batch-size", "2", "--image-size", "8", "--model-channels", "16"]) == 2
    err = capsys.readouterr().err
    assert "must be divisible by num_groups (32)" in err and "--num-groups" in err


def test_non_utf8_scheduler_config_names_the_file(tmp_path):
    from fastddpm import DDPMScheduler

    DDPMScheduler().save_config(tmp_path)
    (tmp_path / "scheduler_config.json").write_bytes(b'{"beta_start": "\xff"}')
    with pytest.raises(ValueError, match="scheduler_config.json is not valid UTF-8 JSON"):
        DDPMScheduler.from_pretrained(tmp_path)
