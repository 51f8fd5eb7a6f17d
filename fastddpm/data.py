"""Datasets for training: the 8×8 digits bundled with scikit-learn, and folders of images; sample grids."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def load_digits(image_size: int = 8) -> torch.Tensor:
    """The 1,797 handwritten 8×8 digits of scikit-learn (UCI; bundled, no download): [N, 1, S, S] in
    [0, 1]."""
    from sklearn.datasets import load_digits as _load

    images = torch.from_numpy(_load().images).float().div_(16.0).unsqueeze(1)  # pixel values 0…16
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True,
                               align_corners=False).clamp_(0, 1)
    return images


class ImageFolder(torch.utils.data.Dataset):
    """Every image under ``root`` (recursively), resized on its short side and centre-cropped to a square,
    as [channels, S, S] floats in [0, 1]."""

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int = 3):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.files = sorted(p for p in self.root.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                                    f"found under {str(root)!r}")
        for path in self.files:  # reading the headers is cheap, and names a bad file before any worker starts
            try:
                with Image.open(path):
                    pass
            except OSError as e:
                raise OSError(f"cannot read image {path}: {e}") from e
        self.image_size, self.channels = int(image_size), channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                w, h = im.size
                scale = self.image_size / min(w, h)
                size = (max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale)))
                im = im.resize(size, Image.Resampling.BICUBIC)
                w, h = im.size
                left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
                im = im.crop((left, top, left + self.image_size, top + self.image_size))
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except OSError as e:
            raise OSError(f"cannot read image {path}: {e}") from e
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr))


def get_dataset(data: str, image_size: int | None = None, channels: int = 3):
    """'digits' → the bundled digits tensor; anything else is a folder of images."""
    if data == "digits":
        return load_digits(image_size or 8)
    return ImageFolder(data, image_size or 32, channels)


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2,
               scale: int = 1) -> Image.Image:
    """A PIL image of a batch [B, C, H, W] in [0, 1] laid out in a grid (nearest-neighbour upscaled)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, 1 or 3, H, W], got {list(images.shape)}")
    b, c, h, w = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(b)))
    ncol = int(np.ceil(b / nrow))
    grid = torch.ones(c, ncol * (h + padding) + padding, nrow * (w + padding) + padding)
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y:y + h, x:x + w] = img
    arr = (grid * 255).round().byte().permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    if scale != 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    return pil


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, **kwargs).save(path)
    return path
