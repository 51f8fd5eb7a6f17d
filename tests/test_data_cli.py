import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastddpm import Diffusion
from fastddpm.cli import main
from fastddpm.data import ImageFolder, get_dataset, image_grid, load_digits


def test_digits_are_bundled_images_in_unit_range():
    d = load_digits()
    assert d.shape == (1797, 1, 8, 8) and d.dtype == torch.float32
    assert d.min() == 0 and d.max() == 1 and d.mean() > 0.2
    assert load_digits(16).shape == (1797, 1, 16, 16)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 20), dtype=np.uint8)).save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path, image_size=16)
    assert len(ds) == 2
    for img in ds:
        assert img.shape == (3, 16, 16) and 0 <= img.min() and img.max() <= 1
    assert ImageFolder(tmp_path, 8, channels=1)[0].shape == (1, 8, 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_dataset(str(tmp_path / "missing"), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path / "empty", 16)


def test_image_grid():
    grid = image_grid(torch.rand(5, 3, 4, 4), nrow=3, padding=1, scale=2)
    assert grid.size == ((3 * 5 + 1) * 2, (2 * 5 + 1) * 2) and grid.mode == "RGB"
    assert image_grid(torch.rand(4, 1, 4, 4)).mode == "L"
    with pytest.raises(ValueError, match="images must be"):
        image_grid(torch.rand(4, 2, 4, 4))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastddpm", *args], capture_output=True, text=True,
                          env={"FASTDDPM_NO_PROGRESS": "1", "PATH": "/usr/bin:/bin"})


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for word in ["train", "sample", "demo", "info"]:
        assert word in r.stdout


def test_train_then_sample_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDDPM_NO_PROGRESS", "1")
    out = tmp_path / "run"
    main(["train", "--data", "digits", "--out", str(out), "--steps", "3", "--batch-size", "8",
          "--timesteps", "10", "--beta-schedule", "cosine", "--num-samples", "4"])
    assert (out / "samples.png").is_file() and Image.open(out / "samples.png").size[0] > 32
    d = Diffusion.from_pretrained(out)
    assert d.num_timesteps == 10 and d.image_size == (8, 8) and d.channels == 1
    png = tmp_path / "s.png"
    main(["sample", "--checkpoint", str(out), "--num", "3", "--out", str(png), "--ddim", "5"])
    assert Image.open(png).mode == "L"
    main(["sample", "--checkpoint", str(out), "--num", "2", "--out", str(tmp_path / "single"),
          "--steps", "4"])
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["000000.png", "000001.png"]
    assert Image.open(tmp_path / "single" / "000000.png").size == (8, 8)


def test_cli_errors_are_clear(tmp_path):
    r = run_cli("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--steps", "1")
    assert r.returncode != 0 and "no such folder" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("sample", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png"))
    assert r.returncode != 0 and "no such folder" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("sample", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png"))
    assert r.returncode != 0 and "config.json is missing" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", "--out", str(tmp_path / "o"), "--steps", "0")
    assert r.returncode == 2 and "must be >= 1" in r.stderr
    r = run_cli("train", "--out", str(tmp_path / "o"), "--num-samples", "-1")
    assert r.returncode == 2 and "must be >= 0" in r.stderr
    r = run_cli("sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.jpg"))
    assert r.returncode == 2 and "give FILE.png for a grid or a folder" in r.stderr
    r = run_cli("sample", "--checkpoint", str(tmp_path), "--out", "x.png", "--steps", "3", "--ddim", "3")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
    r = run_cli("train", "--out", str(tmp_path / "o"), "--timesteps", "10")
    assert r.returncode == 2 and "would need beta_end" in r.stderr and "Traceback" not in r.stderr


def test_info_reports_backends(capsys):
    main(["info"])
    out = capsys.readouterr().out
    assert '"torch"' in out and '"backends"' in out and '"q_sample"' in out


def test_eval_says_what_is_missing(tmp_path):
    try:
        import torchmetrics  # noqa: F401
        has_torchmetrics = True
    except ImportError:
        has_torchmetrics = False
    r = run_cli("eval", "--checkpoint", str(tmp_path), "--fid", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    if not has_torchmetrics:
        assert "FID needs torchmetrics" in r.stderr


def test_demo_runs_twice_in_the_same_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDDPM_NO_PROGRESS", "1")
    for _ in range(2):
        assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--num-samples", "2"]) == 0
    assert (tmp_path / "demo" / "samples.png").is_file()
    assert (tmp_path / "demo" / "model" / "config.json").is_file()
