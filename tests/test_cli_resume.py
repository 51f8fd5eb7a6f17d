"""`fastddpm train`: resuming with the stored settings, one trainer per folder, write failures."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastddpm.cli import main

# A quick run on the digits: every flag that keeps it small.
SMALL = ["--data", "digits", "--batch-size", "8", "--timesteps", "50", "--beta-schedule", "cosine",
         "--num-samples", "0", "--log-every", "1"]


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setenv("FASTDDPM_NO_PROGRESS", "1")


def losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_readme_resume_example_equals_an_uninterrupted_run(tmp_path, capsys):
    # README: `fastddpm train --data digits --out runs/digits --steps 4000`, then
    # `fastddpm train --out runs/digits --steps 8000 --resume`, here with 6 and 12 steps.
    split, whole = tmp_path / "split", tmp_path / "whole"
    assert main(["train", *SMALL, "--out", str(split), "--steps", "6", "--save-every", "3"]) == 0
    assert main(["train", "--out", str(split), "--steps", "12", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "at step 6" in out and "note: --steps: 12 (was 6)" in out
    assert main(["train", *SMALL, "--out", str(whole), "--steps", "12", "--save-every", "3"]) == 0
    assert [s for s, _ in losses(split)] == list(range(1, 13))
    assert losses(split) == losses(whole)  # step by step, bit for bit
    stored = json.loads((split / "run.json").read_text())["settings"]
    assert stored["steps"] == 12 and stored["warmup"] == 250 and stored["batch_size"] == 8
    assert stored["model_channels"] == 16 and stored["num_groups"] == 4


@pytest.fixture(scope="module")
def run6(tmp_path_factory):
    """A run trained to step 6 (checkpoints every 3 steps); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("run") / "run"
    os.environ["FASTDDPM_NO_PROGRESS"] = "1"
    assert main(["train", *SMALL, "--out", str(out), "--steps", "6", "--save-every", "3",
                 "--lr", "0.002"]) == 0
    return out


def copy(run, tmp_path):
    import shutil

    return shutil.copytree(run, tmp_path / "run")


@pytest.mark.parametrize("flags, named", [
    (["--lr", "0.1"], "--lr 0.002 (stored) vs 0.1 (given)"),
    (["--model-channels", "32"], "--model-channels 16 (stored) vs 32 (given)"),
    (["--warmup", "10"], "--warmup 250 (stored) vs 10 (given)"),
    (["--data", "some/folder", "--image-size", "16"], "--data 'digits' (stored) vs 'some/folder' (given)"),
    (["--timesteps", "1000", "--beta-schedule", "linear"], "--timesteps 50 (stored) vs 1000 (given)"),
])
def test_resume_refuses_a_flag_that_changes_a_stored_setting(run6, tmp_path, capsys, flags, named):
    out = copy(run6, tmp_path)
    assert main(["train", "--out", str(out), "--steps", "8", "--resume", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastddpm: error: --resume continues") and named in err and err.count("\n") == 1
    assert losses(out)[-1][0] == 6  # nothing trained


def test_resume_takes_stored_settings_and_applies_changeable_ones_with_a_notice(run6, tmp_path, capsys):
    out = copy(run6, tmp_path)
    # the stored settings repeated are fine; --log-every may change
    assert main(["train", "--out", str(out), "--resume", "--steps", "8", "--lr", "0.002", "--data", "digits",
                 "--log-every", "2"]) == 0
    assert "note: --log-every: 2 (was 1)" in capsys.readouterr().out
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5, 6, 8]
    assert json.loads((out / "run.json").read_text())["settings"]["log_every"] == 2


def test_resume_with_no_more_steps_than_done_says_so(run6, tmp_path, capsys):
    out = copy(run6, tmp_path)
    assert main(["train", "--out", str(out), "--resume", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "is at step 6 already, past --steps 3" in err and err.count("\n") == 1
    for flags in (["--steps", "6"], []):  # the stored --steps is 6: done already
        assert main(["train", "--out", str(out), "--resume", *flags]) == 0
        assert "is at step 6 already, which is --steps: nothing to train" in capsys.readouterr().out
    assert losses(out)[-1][0] == 6


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "FASTDDPM_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "fastddpm", "train", *SMALL, "--out", str(out), "--save-every", "0"]
    first = subprocess.Popen(cmd + ["--steps", "1000000"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "run.json").is_file():  # written once the run holds the folder
            if first.poll() is not None or time.monotonic() > deadline:
                first.kill()
                pytest.fail(f"the first trainer did not start: {first.communicate()[1][-2000:]}")
            time.sleep(0.1)
        second = subprocess.run(cmd + ["--steps", "2"], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr == f"fastddpm: error: {out} is in use by process {first.pid}\n"
        assert first.poll() is None  # the first one trains on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kill released the lock: the folder is free again
    third = subprocess.run(cmd + ["--steps", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr


def test_disk_full_while_writing_a_checkpoint(tmp_path, monkeypatch, capsys):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out), "--steps", "2", "--save-every", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastddpm: error: ") and "No space left on device" in err and err.count("\n") == 1
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint").exists()


def test_torch_save_failure_while_writing_a_checkpoint(tmp_path, monkeypatch, capsys):
    import torch

    def failing(*args, **kwargs):  # what torch.save raises when the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing "
                           "file")

    monkeypatch.setattr(torch, "save", failing)
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out), "--steps", "2", "--save-every", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastddpm: error: cannot write the checkpoint to {out / 'checkpoint.tmp'}")
    assert err.count("\n") == 1 and not (out / "checkpoint.tmp").exists()


def test_disk_full_while_writing_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")  # every write to /dev/full fails with ENOSPC
    assert main(["train", *SMALL, "--out", str(out), "--steps", "2", "--save-every", "0"]) == 2
    err = capsys.readouterr().err
    assert err == f"fastddpm: error: cannot write {out / 'metrics.jsonl'}: No space left on device\n"


def test_the_demo_leaves_a_folder_in_use_alone(tmp_path, capsys):
    from fastddpm.train import lock_output_dir

    out = tmp_path / "demo"
    with lock_output_dir(out):  # flock: a second open of the lock file conflicts even in this process
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
        assert main(["demo", "--out", str(out), "--steps", "1", "--num-samples", "1"]) == 2
        assert f"{out} is in use by process {os.getpid()}" in capsys.readouterr().err
        assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'  # the running run's metrics stay
    assert main(["demo", "--out", str(out), "--steps", "1", "--num-samples", "1"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_disk_full_while_writing_the_run_settings(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json.tmp").symlink_to("/dev/full")
    assert main(["train", *SMALL, "--out", str(out), "--steps", "2", "--save-every", "0"]) == 2
    assert (capsys.readouterr().err
            == f"fastddpm: error: cannot write {out / 'run.json'}: No space left on device\n")
    assert not (out / "run.json.tmp").is_symlink() and not (out / "run.json").exists()
