"""The ``fastddpm`` command: train, sample, demo, info."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fastddpm.schedules import BETA_SCHEDULES


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda, but no CUDA GPU is available (torch {torch.__version__}); use --device cpu")
    return torch.device(name)


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _png_path(value: str) -> str:
    if not value.lower().endswith(".png") or Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"must be a .png file path, got {value!r}")
    return value


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastddpm", description="Denoising Diffusion Probabilistic Models (Ho et al. 2020) with fused kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a U-Net DDPM on the bundled digits or a folder of images")
    train.add_argument("--data", default="digits", help="'digits' (8×8 digits bundled with scikit-learn) or a "
                       "folder of images (default: digits)")
    train.add_argument("--out", required=True, help="output folder; it loads with Diffusion.from_pretrained(DIR)")
    train.add_argument("--steps", type=_positive, default=4000, help="optimisation steps (default: 4000)")
    train.add_argument("--batch-size", type=_positive, default=128, help="batch size (default: 128)")
    train.add_argument("--image-size", type=_positive, default=None,
                       help="image side in pixels (default: 8 for digits, 32 for folders)")
    train.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: 1e-3 for digits, "
                       "2e-4 otherwise, the paper's)")
    train.add_argument("--timesteps", type=_positive, default=1000, help="diffusion steps T (default: 1000)")
    train.add_argument("--beta-schedule", default="linear", choices=sorted(BETA_SCHEDULES),
                       help="β schedule (default: linear, the paper's; scaled by 1000/T when T != 1000)")
    train.add_argument("--num-samples", type=_non_negative, default=64,
                       help="samples written to OUT/samples.png at the end (default: 64; 0 for none)")
    train.add_argument("--save-every", type=_non_negative, default=1000,
                       help="write OUT/checkpoint/ every N steps and at the end (default: 1000; 0: never)")
    train.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint/")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")

    sample = sub.add_parser("sample", help="sample images from a trained model into a PNG grid")
    sample.add_argument("--checkpoint", required=True, help="a folder written by `fastddpm train` or save_pretrained")
    sample.add_argument("--num", type=_positive, default=64, help="number of images (default: 64)")
    sample.add_argument("--out", required=True, type=_png_path, help="PNG file to write")
    sample.add_argument("--sampling-timesteps", type=_positive, default=None,
                        help="DDIM steps (default: all T steps, ancestral sampling)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")

    demo = sub.add_parser("demo", help="train a small U-Net on the bundled 8×8 digits and write a sample grid")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--steps", type=_positive, default=2500, help="training steps (default: 2500)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")

    sub.add_parser("info", help="print what this installation runs (versions, extensions, backends) as JSON")
    return parser


def cmd_train(args) -> Path:
    from fastddpm import Diffusion, UNet
    from fastddpm.data import get_dataset
    from fastddpm.train import Trainer

    device = _device(args.device)
    torch.manual_seed(args.seed)
    digits = args.data == "digits"
    if not digits and not Path(args.data).is_dir():
        raise FileNotFoundError(f"--data {args.data!r}: no such folder (give 'digits' or a folder of images)")
    data = get_dataset(args.data, args.image_size, channels=3)
    size = args.image_size or (8 if digits else 32)
    if digits:
        model = UNet.small(in_channels=1, image_size=size)
    else:
        attn = (16,) if size >= 16 else ()
        model = UNet(in_channels=3, image_size=size, attn_resolutions=attn)
    schedule_kwargs = {"scale_with_timesteps": True} if args.beta_schedule == "linear" else {}
    diffusion = Diffusion(model, image_size=size, timesteps=args.timesteps, beta_schedule=args.beta_schedule,
                          schedule_fn_kwargs=schedule_kwargs)
    lr = args.lr if args.lr is not None else (1e-3 if digits else 2e-4)
    trainer = Trainer(diffusion, data, out=args.out, batch_size=args.batch_size, lr=lr,
                      warmup=min(5000, args.steps // 10), ema_decay=0.999 if digits else 0.9999,
                      seed=args.seed, device=device, save_every=args.save_every)
    if args.resume:
        print(f"resuming from {trainer.checkpoint_dir} at step {trainer.resume()}")
    start, first = time.perf_counter(), trainer.step
    losses = trainer.train(args.steps)
    if losses:
        print(f"trained steps {first + 1}–{trainer.step} in {time.perf_counter() - start:.0f} s; "
              f"final loss (mean of last 100) {sum(losses[-100:]) / len(losses[-100:]):.4f}")
    grid = trainer.save(num_samples=args.num_samples, seed=args.seed)
    print(f"model saved to {args.out}" + (f"; samples in {grid}" if grid else ""))
    return Path(args.out)


def cmd_sample(args) -> Path:
    from fastddpm import Diffusion
    from fastddpm.data import save_image_grid

    device = _device(args.device)
    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r}: no such folder")
    overrides = {"sampling_timesteps": args.sampling_timesteps} if args.sampling_timesteps else {}
    diffusion = Diffusion.from_pretrained(args.checkpoint, device=device, **overrides)
    diffusion.eval()
    images = diffusion.sample(args.num, generator=torch.Generator(device).manual_seed(args.seed))
    path = save_image_grid(images, args.out, scale=max(1, 512 // (8 * (images.shape[-1] + 2))))
    print(f"wrote {args.num} samples to {path}")
    return path


def cmd_demo(args) -> Path:
    out = Path(args.out)
    train_args = build_parser().parse_args(["train", "--data", "digits", "--out", str(out), "--steps",
                                            str(args.steps), "--seed", str(args.seed), "--device", args.device])
    print("fastddpm demo: training a small U-Net DDPM on the 8×8 digits bundled with scikit-learn")
    cmd_train(train_args)
    print(f"open {out / 'samples.png'}: 64 digits sampled with 1000 ancestral steps from the EMA weights")
    return out / "samples.png"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from fastddpm import build_info
        print(json.dumps(build_info(), indent=2))
        return 0
    try:
        {"train": cmd_train, "sample": cmd_sample, "demo": cmd_demo}[args.command](args)
    except (FileNotFoundError, ValueError, OSError) as e:  # bad paths and files: a message, not a traceback
        print(f"fastddpm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
