"""The ``fastddpm`` command: train, sample, demo, info."""

from __future__ import annotations

import argparse
import datetime
import json
import os
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


def _int_list(value) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    try:
        return tuple(int(v) for v in str(value).replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {value!r}") from None


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastddpm", description="Denoising Diffusion Probabilistic Models (Ho et al. 2020) with fused kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a U-Net DDPM on the bundled digits or a folder of images",
                           description="Train a DDPM. Defaults are the paper's CIFAR-10 recipe; with --data digits "
                           "a small U-Net and faster settings. Under `torchrun --nproc_per_node N -m fastddpm "
                           "train ...` it trains with DDP (NCCL on GPUs, gloo on CPU).")
    train.add_argument("--config", help="a TOML (or YAML, with PyYAML) file whose keys are these flags' names; "
                       "flags on the command line win")
    train.add_argument("--data", default="digits", help="'digits' (8×8 digits bundled with scikit-learn) or a "
                       "folder of images (default: digits)")
    train.add_argument("--out", help="output folder (required); it loads with Diffusion.from_pretrained(DIR)")
    train.add_argument("--image-size", type=_positive, default=None,
                       help="image side in pixels (default: 8 for digits, 32 for folders)")
    train.add_argument("--channels", type=int, choices=[1, 3], default=3, help="image channels of a folder (default 3)")
    train.add_argument("--steps", type=_positive, default=800_000, help="optimisation steps (default: 800000)")
    train.add_argument("--batch-size", type=_positive, default=128, help="batch size per process (default: 128)")
    train.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: 2e-4; 1e-3 for digits)")
    train.add_argument("--warmup", type=_non_negative, default=None, help="learning-rate warm-up steps (default: "
                       "5000, or a tenth of --steps if less)")
    train.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip, 0 for none (default: 1)")
    train.add_argument("--ema-decay", type=float, default=None, help="EMA decay (default: 0.9999; 0.999 for digits)")
    train.add_argument("--grad-accum", type=_positive, default=1, help="micro-batches per step (default: 1)")
    train.add_argument("--save-every", type=_non_negative, default=1000,
                       help="write OUT/checkpoint/ every N steps and at the end (default: 1000; 0: never)")
    train.add_argument("--sample-every", type=_non_negative, default=0,
                       help="write OUT/samples/step_N.png and OUT/loss.png every N steps (default: 0, never)")
    train.add_argument("--log-every", type=_positive, default=50, help="append to OUT/metrics.jsonl every N steps")
    train.add_argument("--num-samples", type=_non_negative, default=64,
                       help="samples in each grid and OUT/samples.png at the end (default: 64; 0 for none)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                       help="autocast dtype (fp16 with a GradScaler; default: off)")
    train.add_argument("--compile", action="store_true", help="torch.compile the model's loss")
    train.add_argument("--num-workers", type=_non_negative, default=0, help="DataLoader workers for folders")
    train.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                       help="random horizontal flips (default: on for folders, off for digits)")
    train.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint/")
    model = train.add_argument_group("model and diffusion (defaults: the paper's CIFAR-10 U-Net; small for digits)")
    model.add_argument("--model-channels", type=_positive, default=None)
    model.add_argument("--channel-mult", type=_int_list, default=None, help="e.g. 1,2,2,2")
    model.add_argument("--num-res-blocks", type=_positive, default=None)
    model.add_argument("--attn-resolutions", type=_int_list, default=None, help="e.g. 16 (empty for none)")
    model.add_argument("--dropout", type=float, default=None)
    model.add_argument("--timesteps", type=_positive, default=1000, help="diffusion steps T (default: 1000)")
    model.add_argument("--beta-schedule", default="linear", choices=sorted(BETA_SCHEDULES),
                       help="β schedule (default: linear, the paper's; scaled by 1000/T when T != 1000)")
    model.add_argument("--objective", default="pred_noise", choices=["pred_noise", "pred_x0", "pred_v"])

    sample = sub.add_parser("sample", help="sample images from a trained model into a PNG grid or a folder")
    sample.add_argument("--checkpoint", required=True, help="a folder written by `fastddpm train` or save_pretrained")
    sample.add_argument("--num", type=_positive, default=64, help="number of images (default: 64)")
    sample.add_argument("--out", required=True, help="FILE.png for a grid, or a folder for one PNG per image")
    steps = sample.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=_positive, default=None,
                       help="K respaced ancestral steps (DDIM with η = 1; default: all T steps)")
    steps.add_argument("--ddim", type=_positive, default=None, help="K deterministic DDIM steps (η = 0)")
    sample.add_argument("--batch-size", type=_positive, default=256, help="images per sampling batch (default: 256)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")

    evaluate = sub.add_parser("eval", help="FID of a trained model's samples against a folder of images")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--fid", required=True, metavar="REF_DIR", help="folder of reference images")
    evaluate.add_argument("--num", type=_positive, default=10_000, help="samples to draw (default: 10000)")
    evaluate.add_argument("--batch-size", type=_positive, default=256)
    evaluate.add_argument("--ddim", type=_positive, default=None, help="sample with K DDIM steps")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")

    demo = sub.add_parser("demo", help="train a small U-Net on the bundled 8×8 digits and write a sample grid")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--steps", type=_positive, default=2500, help="training steps (default: 2500)")
    demo.add_argument("--num-samples", type=_positive, default=64, help="samples in the grid (default: 64)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")

    sub.add_parser("info", help="print what this installation runs (versions, extensions, backends) as JSON")
    return parser


def _init_distributed(device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): join the process group; each process gets its own GPU."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    # Rank 0 alone draws sample grids while the others wait: allow that an hour.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def cmd_train(args) -> Path:
    from fastddpm import Diffusion, UNet
    from fastddpm.data import get_dataset
    from fastddpm.train import SEED_NOISE, Trainer, derive_seed

    if (Path(args.out) / "checkpoint").exists() and not args.resume:
        raise ValueError(f"{args.out} already holds a training run (checkpoint/): continue it with --resume, "
                         f"or give another --out")
    device = _init_distributed(_device(args.device))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(args.seed)  # the same initial weights on every process
    digits = args.data == "digits"
    if not digits and not Path(args.data).is_dir():
        raise FileNotFoundError(f"--data {args.data!r}: no such folder (give 'digits' or a folder of images)")
    data = get_dataset(args.data, args.image_size, channels=args.channels)
    size = args.image_size or (8 if digits else 32)
    model_kwargs = {k: v for k, v in dict(model_channels=args.model_channels, channel_mult=args.channel_mult,
                                          num_res_blocks=args.num_res_blocks, attn_resolutions=args.attn_resolutions,
                                          dropout=args.dropout).items() if v is not None}
    if digits:
        model = UNet.small(in_channels=1, image_size=size, **model_kwargs)
    else:
        model_kwargs.setdefault("attn_resolutions", (16,) if size >= 16 else ())
        model = UNet(in_channels=args.channels, image_size=size, **model_kwargs)
    schedule_kwargs = {"scale_with_timesteps": True} if args.beta_schedule == "linear" else {}
    diffusion = Diffusion(model, image_size=size, timesteps=args.timesteps, beta_schedule=args.beta_schedule,
                          schedule_fn_kwargs=schedule_kwargs, objective=args.objective)
    trainer = Trainer(
        diffusion, data, out=args.out, batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else (1e-3 if digits else 2e-4),
        warmup=args.warmup if args.warmup is not None else min(5000, args.steps // 10),
        grad_clip=args.grad_clip, ema_decay=args.ema_decay if args.ema_decay is not None else (
            0.999 if digits else 0.9999),
        seed=args.seed, device=device, save_every=args.save_every, grad_accum=args.grad_accum, amp=args.amp,
        log_every=args.log_every, sample_every=args.sample_every, num_samples=args.num_samples,
        compile=args.compile, num_workers=args.num_workers,
        hflip=args.flip if args.flip is not None else not digits)
    torch.manual_seed(derive_seed(args.seed, SEED_NOISE, rank))  # each process draws its own t and ε
    if args.resume:
        step = trainer.resume()
        if rank == 0:
            print(f"resuming from {trainer.checkpoint_dir} at step {step}")
    start, first = time.perf_counter(), trainer.step
    losses = trainer.train(args.steps)
    grid = trainer.save()
    if rank == 0:
        if losses:
            print(f"trained steps {first + 1}–{trainer.step} in {time.perf_counter() - start:.0f} s; "
                  f"final loss (mean of last 100) {sum(losses[-100:]) / len(losses[-100:]):.4f}")
        print(f"model saved to {Path(args.out) / 'model'}" + (f"; samples in {grid}" if grid else ""))
    return Path(args.out)


def _load_for_sampling(args):
    from fastddpm import Diffusion

    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r}: no such folder")
    k, eta = (args.ddim, 0.0) if getattr(args, "ddim", None) else (getattr(args, "steps", None), 1.0)
    overrides = {"sampling_timesteps": k, "ddim_sampling_eta": eta} if k else {}
    diffusion = Diffusion.from_pretrained(args.checkpoint, device=_device(args.device), **overrides).eval()
    return diffusion, bool(k)  # with K steps asked for, the DDIM loop runs even for K = T


def _draw(diffusion, use_ddim: bool, num: int, batch_size: int, seed: int) -> torch.Tensor:
    """``num`` images in [0, 1], drawn ``batch_size`` at a time from one seeded generator."""
    gen = torch.Generator(diffusion.device).manual_seed(seed)
    loop = diffusion.ddim_sample if use_ddim else diffusion.p_sample_loop
    out = []
    for start in range(0, num, batch_size):
        shape = (min(batch_size, num - start), diffusion.channels, *diffusion.image_size)
        out.append(diffusion.unnormalize(loop(shape, generator=gen)).cpu())
    return torch.cat(out)


def cmd_sample(args) -> Path:
    from fastddpm.data import save_image_grid

    out = Path(args.out)
    if out.suffix and out.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out!r}: give FILE.png for a grid or a folder for single images")
    diffusion, use_ddim = _load_for_sampling(args)
    images = _draw(diffusion, use_ddim, args.num, args.batch_size, args.seed)
    if out.suffix:
        save_image_grid(images, out, scale=max(1, 512 // (8 * (images.shape[-1] + 2))))
    else:
        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            save_image_grid(img[None], out / f"{i:06d}.png", padding=0)
    print(f"wrote {args.num} samples to {out}")
    return out


def cmd_eval(args) -> float:
    from fastddpm.data import ImageFolder

    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise ValueError("FID needs torchmetrics with its image extra (pip install 'torchmetrics[image]'), which is "
                         "not installed; its Inception weights are downloaded on first use") from None
    diffusion, use_ddim = _load_for_sampling(args)
    ref = ImageFolder(args.fid, diffusion.image_size[0], channels=3)
    try:
        fid = FrechetInceptionDistance(normalize=True).to(diffusion.device)
    except Exception as e:  # no network for the weights, a broken install, ...
        raise ValueError(f"cannot set up FID's Inception network: {e}") from e

    def rgb(x):
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    loader = torch.utils.data.DataLoader(ref, batch_size=args.batch_size)
    for batch in loader:
        fid.update(rgb(batch.to(diffusion.device)), real=True)
    for start in range(0, args.num, args.batch_size):
        n = min(args.batch_size, args.num - start)
        fid.update(rgb(_draw(diffusion, use_ddim, n, n, args.seed + start).to(diffusion.device)), real=False)
    score = float(fid.compute())
    print(f"FID {score:.3f} ({args.num} samples vs {len(ref)} images in {args.fid})")
    return score


def cmd_demo(args) -> Path:
    out = Path(args.out)
    # A demo run starts afresh each time: no checkpoints to continue, and the old metrics go.
    (out / "metrics.jsonl").unlink(missing_ok=True)
    train_args = parse_args(["train", "--data", "digits", "--out", str(out), "--steps", str(args.steps),
                             "--seed", str(args.seed), "--device", args.device, "--save-every", "0",
                             "--num-samples", str(args.num_samples)])
    print("fastddpm demo: training a small U-Net DDPM on the 8×8 digits bundled with scikit-learn")
    cmd_train(train_args)
    print(f"open {out / 'samples.png'}: {args.num_samples} digits sampled with 1000 ancestral steps from the "
          f"EMA weights")
    return out / "samples.png"


def _load_config(path: str) -> dict:
    """Flag values from a TOML or YAML file; keys are flag names (dashes or underscores)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path!r}: no such file")
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); or use TOML") from None
        values = yaml.safe_load(p.read_text()) or {}
    else:
        import tomllib
        try:
            values = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {path}: not valid TOML: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a table of flag = value")
    return {k.replace("-", "_"): v for k, v in values.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        try:
            values = _load_config(args.config)
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
        sub = parser._subparsers._group_actions[0].choices[args.command]
        flags = {a.dest: a for a in sub._actions if a.option_strings}
        unknown = sorted(set(values) - set(flags) - {"help", "config"})
        if unknown:
            parser.error(f"--config {args.config}: unknown keys {', '.join(unknown)}")
        # The config becomes command-line words placed before the user's own, so argparse checks types and
        # choices exactly as for flags, and a flag given on the command line comes later and wins.
        words = []
        for key, value in values.items():
            action, flag = flags[key], flags[key].option_strings[0]
            if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
                if not isinstance(value, bool):
                    parser.error(f"--config {args.config}: {key} must be true or false, got {value!r}")
                if value:
                    words.append(flag)
                elif isinstance(action, argparse.BooleanOptionalAction):
                    words.append("--no-" + flag[2:])
            elif isinstance(value, bool) or value is None or isinstance(value, dict):
                parser.error(f"--config {args.config}: {key} = {value!r} is not a valid value")
            else:
                words += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
        args = parser.parse_args([argv[0], *words, *argv[1:]])
    if args.command == "train" and not args.out:
        parser.error("train: --out is required (on the command line or in --config)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "info":
        from fastddpm import build_info
        print(json.dumps(build_info(), indent=2))
        return 0
    try:
        {"train": cmd_train, "sample": cmd_sample, "demo": cmd_demo, "eval": cmd_eval}[args.command](args)
    except (FileNotFoundError, ValueError, OSError) as e:  # bad paths and files: a message, not a traceback
        print(f"fastddpm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
