"""`fastddpm sample --out FOLDER`: batch by batch, an image per file, a rerun writes only what is missing."""
import os

import pytest

from fastddpm import Diffusion, UNet
from fastddpm.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    Diffusion(UNet.small(image_size=8, model_channels=16), image_size=8, channels=1, timesteps=20,
              beta_schedule="cosine").save_pretrained(d)
    return d


def sample(checkpoint, out, num=5, batch_size=2, seed=3, capsys=None):
    args = ["sample", "--checkpoint", str(checkpoint), "--out", str(out), "--num", str(num),
            "--batch-size", str(batch_size), "--seed", str(seed), "--ddim", "4"]
    assert main(args) == 0


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_rerun_writes_only_the_missing_images_and_they_are_the_same(checkpoint, tmp_path, capsys):
    whole = tmp_path / "whole"
    sample(checkpoint, whole)
    first = files(whole)
    assert list(first) == [f"{i:06d}.png" for i in range(5)]
    assert len(set(first.values())) == 5  # different images
    assert "wrote 5 samples" in capsys.readouterr().out

    # a run killed in its second batch: image 3 missing, a partial file of it left behind
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("000000.png", "000001.png", "000002.png", "000004.png"):
        (partial / name).write_bytes(first[name])
    (partial / ".000003.partial.png").write_bytes(b"truncated")
    untouched = {n: (partial / n).stat().st_mtime_ns for n in ("000000.png", "000001.png", "000004.png")}
    sample(checkpoint, partial)
    assert "wrote 1 samples" in capsys.readouterr().out
    assert files(partial) == first  # (the partial file was replaced by the finished image)
    assert all((partial / n).stat().st_mtime_ns == t for n, t in untouched.items())

    # all there: nothing sampled again
    sample(checkpoint, partial)
    assert "wrote 0 samples" in capsys.readouterr().out


def test_images_depend_on_the_seed(checkpoint, tmp_path):
    sample(checkpoint, tmp_path / "a", num=2, seed=0)
    sample(checkpoint, tmp_path / "b", num=2, seed=1)
    assert files(tmp_path / "a") != files(tmp_path / "b")
    assert not any(name.startswith(".") for name in os.listdir(tmp_path / "a"))
