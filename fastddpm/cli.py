"""The ``fastddpm`` command: train, sample, demo, info.

torch is imported only by the commands that run (``fastddpm --help`` and ``--version`` answer without it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path


class CommandError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _device(name: str | None):
    import torch

    name = name or _default_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda, but no CUDA GPU is available (torch {torch.__version__}); "
                         f"use --device cpu")
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastddpm")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown (not installed)"


# The settings of a training run. `fastddpm train` resolves each one (the flag if given, else the default,
# some of which depend on --data), stores them in OUT/run.json, and `--resume` takes them from there.
# FIXED ones shape the model or the optimisation: a flag that changes one on resume is refused.
FIXED_SETTINGS = ("data", "image_size", "channels", "batch_size", "lr", "warmup", "grad_clip", "ema_decay",
                  "grad_accum", "seed", "amp", "flip", "model_channels", "channel_mult", "num_res_blocks",
                  "attn_resolutions", "dropout", "num_groups", "timesteps", "beta_schedule", "objective")
# CHANGEABLE ones may change on resume (with a notice); the new value is stored.
CHANGEABLE_SETTINGS = ("steps", "save_every", "sample_every", "log_every", "num_samples")
# Per invocation, never stored: --device, --compile, --num-workers, --fast-path, --channels-last.
RUN_FILE = "run.json"
MODEL_SETTINGS = ("model_channels", "channel_mult", "num_res_blocks", "attn_resolutions", "dropout",
                  "num_groups")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastddpm",
        description="Denoising Diffusion Probabilistic Models (Ho et al. 2020) with fused kernels.")
    parser.add_argument("--version", action="version", version=f"fastddpm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Training flags default to None, so that a flag the user gave (on the command line or in --config) is
    # told apart from a default: on --resume the stored settings take the place of the defaults. Each help
    # text names the default.
    train = sub.add_parser("train", help="train a U-Net DDPM on the bundled digits or a folder of images",
                           description="Train a DDPM. Defaults are the paper's CIFAR-10 recipe; with --data "
                           "digits a small U-Net and faster settings. Under `torchrun --nproc_per_node N -m "
                           "fastddpm train ...` it trains with DDP (NCCL on GPUs, gloo on CPU). `--out DIR "
                           "--resume` continues a run with the settings stored in DIR/run.json (a larger "
                           "--steps trains further); a flag that would change a stored setting is "
                           "refused.")
    train.add_argument("--config", help="a TOML (or YAML, with PyYAML) file whose keys are these flags' "
                       "names; flags on the command line win")
    train.add_argument("--data", help="'digits' (8×8 digits bundled with scikit-learn) or a "
                       "folder of images (default: digits)")
    train.add_argument("--out", help="output folder (required); it loads with Diffusion.from_pretrained(DIR)")
    train.add_argument("--image-size", type=_positive,
                       help="image side in pixels (default: 8 for digits, 32 for folders)")
    train.add_argument("--channels", type=int, choices=[1, 3],
                       help="image channels of a folder (default: 3; the digits have 1)")
    train.add_argument("--steps", type=_positive, help="train until this step (default: 800000)")
    train.add_argument("--batch-size", type=_positive, help="batch size per process (default: 128)")
    train.add_argument("--lr", type=float, help="Adam learning rate (default: 2e-4; 1e-3 for digits)")
    train.add_argument("--warmup", type=_non_negative, help="linear learning-rate warm-up steps (default: "
                       "5000, the paper's; 250 for digits)")
    train.add_argument("--grad-clip", type=float, help="gradient-norm clip, 0 for none (default: 1)")
    train.add_argument("--ema-decay", type=float, help="EMA decay (default: 0.9999; 0.999 for digits)")
    train.add_argument("--grad-accum", type=_positive, help="micro-batches per step (default: 1)")
    train.add_argument("--save-every", type=_non_negative,
                       help="write OUT/checkpoint/ every N steps and at the end (default: 1000; 0: never)")
    train.add_argument("--sample-every", type=_non_negative,
                       help="write OUT/samples/step_N.png and OUT/loss.png every N steps (default: 0, never)")
    train.add_argument("--log-every", type=_positive,
                       help="append to OUT/metrics.jsonl every N steps (default: 50)")
    train.add_argument("--num-samples", type=_non_negative,
                       help="samples in each grid and OUT/samples.png at the end (default: 64; 0 for none)")
    train.add_argument("--seed", type=int,
                       help="seed of the weights, the data order and the noise (default: 0)")
    train.add_argument("--device", choices=["cpu", "cuda"],
                       help="default: cuda when a GPU is available, else cpu")
    train.add_argument("--amp", choices=["off", "bf16", "fp16"],
                       help="autocast dtype (fp16 with a GradScaler; default: off)")
    train.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile the network (default: off)")
    train.add_argument("--num-workers", type=_non_negative,
                       help="DataLoader workers for folders (default: 0)")
    train.add_argument("--fast-path", action=argparse.BooleanOptionalAction,
                       help="run each training step as one CUDA graph (loss, backward, clipping, Adam, EMA; "
                       "no host sync) (default: on with a GPU in one process; off on CPU, where there is no "
                       "graph to capture, and under torchrun)")
    train.add_argument("--channels-last", action="store_true", default=None,
                       help="channels-last weights and activations, the fast layout on GPUs with --amp bf16 "
                       "(default: off)")
    train.add_argument("--flip", action=argparse.BooleanOptionalAction,
                       help="random horizontal flips (default: on for folders, off for digits)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in OUT from OUT/checkpoint/, with its stored settings")
    model = train.add_argument_group("model and diffusion (defaults: the paper's CIFAR-10 U-Net; small for "
                                     "digits)")
    model.add_argument("--model-channels", type=_positive,
                       help="base channel count (default: 128; 16 for digits)")
    model.add_argument("--channel-mult", type=_int_list,
                       help="channel multiplier per resolution (default: 1,2,2,2; 1,1,2 for digits)")
    model.add_argument("--num-res-blocks", type=_positive,
                       help="residual blocks per resolution (default: 2; 1 for digits)")
    model.add_argument("--attn-resolutions", type=_int_list,
                       help="resolutions with self-attention, e.g. 16, empty for none (default: 16 for "
                       "images of 16 pixels or more, else none; 4 for digits)")
    model.add_argument("--dropout", type=float,
                       help="dropout in the residual blocks (default: 0.1; 0 for digits)")
    model.add_argument("--num-groups", type=_positive,
                       help="GroupNorm groups; must divide --model-channels (default: 32; 4 for digits)")
    model.add_argument("--timesteps", type=_positive, help="diffusion steps T (default: 1000)")
    model.add_argument("--beta-schedule",
                       help="β schedule: linear, cosine, quad, sigmoid, ... (default: linear, the paper's; "
                       "scaled by 1000/T when T != 1000)")
    model.add_argument("--objective", choices=["pred_noise", "pred_x0", "pred_v"],
                       help="what the network predicts (default: pred_noise)")

    device_help = "default: cuda when a GPU is available, else cpu"
    sample = sub.add_parser("sample", help="sample images from a trained model into a PNG grid or a folder")
    sample.add_argument("--checkpoint", required=True,
                        help="a folder written by `fastddpm train` or save_pretrained")
    sample.add_argument("--num", type=_positive, default=64, help="number of images (default: 64)")
    sample.add_argument("--out", required=True,
                        help="FILE.png for a grid, or a folder for one PNG per image (written batch by "
                             "batch; a rerun writes only the images missing)")
    steps = sample.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=_positive, default=None,
                       help="K respaced ancestral steps (DDIM with η = 1; default: all T steps)")
    steps.add_argument("--ddim", type=_positive, default=None,
                       help="K deterministic DDIM steps (η = 0; default: ancestral sampling)")
    sample.add_argument("--batch-size", type=_positive, default=256,
                        help="images per sampling batch (default: 256)")
    sample.add_argument("--seed", type=int, default=0,
                        help="seed of the sampling noise; batch b of a folder draws from seed + b × batch "
                             "size (default: 0)")
    sample.add_argument("--device", choices=["cpu", "cuda"], default=None, help=device_help)
    graph_help = "replay each sampling step as one CUDA graph (default: on with a GPU; off on CPU)"
    sample.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None, help=graph_help)

    evaluate = sub.add_parser("eval", help="FID of a trained model's samples against a folder of images")
    evaluate.add_argument("--checkpoint", required=True, help="a folder written by `fastddpm train`")
    evaluate.add_argument("--fid", required=True, metavar="REF_DIR", help="folder of reference images")
    evaluate.add_argument("--num", type=_positive, default=10_000, help="samples to draw (default: 10000)")
    evaluate.add_argument("--batch-size", type=_positive, default=256,
                          help="images per sampling batch (default: 256)")
    evaluate.add_argument("--ddim", type=_positive, default=None,
                          help="sample with K DDIM steps (default: ancestral sampling)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default: 0)")
    evaluate.add_argument("--device", choices=["cpu", "cuda"], default=None, help=device_help)
    evaluate.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                          help=graph_help)

    demo = sub.add_parser("demo",
                          help="train a small U-Net on the bundled 8×8 digits and write a sample grid")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--steps", type=_positive, default=2500, help="training steps (default: 2500)")
    demo.add_argument("--num-samples", type=_positive, default=64, help="samples in the grid (default: 64)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the whole run (default: 0)")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None, help=device_help)

    sub.add_parser("info", help="print what this installation runs (versions, extensions, backends) as JSON")
    return parser


def _init_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group; each process gets its own GPU."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    # Rank 0 alone draws sample grids while the others wait: allow that an hour.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _json_like(value):
    return [_json_like(v) for v in value] if isinstance(value, (tuple, list)) else value


def _given(args) -> dict:
    """The settings the user gave, on the command line or in --config (argparse leaves the others None)."""
    return {k: _json_like(getattr(args, k)) for k in (*FIXED_SETTINGS, *CHANGEABLE_SETTINGS)
            if getattr(args, k) is not None}


def _defaults(data: str) -> dict:
    """Each setting's default for a new run on ``data``; the model's come from UNet (see _train). None depends
    on --steps, so that a run trained to N steps and resumed to M is the run trained to M steps at once."""
    digits = data == "digits"
    return {"data": "digits", "image_size": 8 if digits else 32, "channels": 1 if digits else 3,
            "steps": 800_000, "batch_size": 128, "lr": 1e-3 if digits else 2e-4,
            "warmup": 250 if digits else 5000, "grad_clip": 1.0, "ema_decay": 0.999 if digits else 0.9999,
            "grad_accum": 1, "seed": 0, "amp": "off", "flip": not digits, "save_every": 1000,
            "sample_every": 0, "log_every": 50, "num_samples": 64, "timesteps": 1000,
            "beta_schedule": "linear", "objective": "pred_noise"}


def _read_run(out: Path) -> dict | None:
    """The settings stored in OUT/run.json, or None for a run that has none (an older fastddpm's)."""
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))["settings"]
        missing = [k for k in (*FIXED_SETTINGS, *CHANGEABLE_SETTINGS) if k not in settings]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is damaged ({e}); it holds the run's settings") from None
    if missing:
        raise ValueError(f"{path} lacks the settings {', '.join(missing)}")
    return settings


def _write_run(out: Path, settings: dict) -> None:
    tmp = out / (RUN_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps({"fastddpm": _version(), "settings": settings}, indent=2) + "\n")
        os.replace(tmp, out / RUN_FILE)  # atomic: a kill leaves the old file or the new one
    except BaseException as e:  # a full disk: no partial file stays, and the message names the file
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(f"cannot write {out / RUN_FILE}: {e.strerror or e}") from e
        raise


def _resolve(args, stored: dict | None) -> tuple[dict, list[str]]:
    """The run's settings and the notices to print: a new run takes the flags given and the defaults; a
    resumed one its stored settings, where only CHANGEABLE_SETTINGS may be changed by flags."""
    given = _given(args)
    if stored is None:
        data = given.get("data", "digits")
        if data == "digits" and given.get("channels", 1) != 1:
            raise CommandError(f"--channels {given['channels']}: the digits have 1 channel")
        return {**_defaults(data), **given}, []
    refused = [f"{_flag(k)} {stored[k]!r} (stored) vs {v!r} (given)" for k, v in given.items()
               if k in FIXED_SETTINGS and v != stored[k]]
    if refused:
        raise CommandError(f"--resume continues {args.out} with its stored settings ({RUN_FILE}), which "
                           f"these flags would change: {'; '.join(refused)}; leave them out, or train into "
                           f"another --out")
    notices = [f"{_flag(k)}: {v} (was {stored[k]})" for k, v in given.items()
               if k in CHANGEABLE_SETTINGS and v != stored[k]]
    return {**stored, **given}, notices


def cmd_train(args, fresh: bool = False) -> Path:
    """Train as ``args`` say; ``fresh`` (the demo) first removes the metrics of an earlier run in OUT."""
    from fastddpm.train import lock_output_dir

    out = Path(args.out)
    # One training per folder: rank 0 holds OUT/train.lock for the whole run (torchrun's other ranks share
    # it).
    if int(os.environ.get("RANK", "0")) == 0:
        with lock_output_dir(out):
            if fresh:
                (out / "metrics.jsonl").unlink(missing_ok=True)
            return _train(args, out)
    return _train(args, out)


def _train(args, out: Path) -> Path:
    import torch

    from fastddpm import Diffusion, UNet
    from fastddpm.data import get_dataset
    from fastddpm.schedules import BETA_SCHEDULES
    from fastddpm.train import SEED_NOISE, Trainer, derive_seed

    rank = int(os.environ.get("RANK", "0"))
    stored = None
    if not args.resume and (out / "checkpoint").exists():
        raise ValueError(f"{out} already holds a training run (checkpoint/): continue it with --resume, "
                         f"or give another --out")
    if args.resume:
        if not (out / "checkpoint").is_dir() and not (out / "checkpoint.old").is_dir():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from ({out / 'checkpoint'} does not "
                                    f"exist)")
        stored = _read_run(out)
        if stored is None and rank == 0:
            print(f"note: {out / RUN_FILE} is missing (a run of an older fastddpm): its settings come from "
                  f"the flags and their defaults")
    s, notices = _resolve(args, stored)
    if s["beta_schedule"] not in BETA_SCHEDULES:
        raise ValueError(f"--beta-schedule {s['beta_schedule']!r}: unknown; choose one of "
                         f"{', '.join(BETA_SCHEDULES)}")
    device = _init_distributed(_device(args.device))
    torch.manual_seed(s["seed"])  # the same initial weights on every process
    digits = s["data"] == "digits"
    if not digits and not Path(s["data"]).is_dir():
        raise FileNotFoundError(f"--data {s['data']!r}: no such folder (give 'digits' or a folder of images)")
    data = get_dataset(s["data"], s["image_size"], channels=s["channels"])
    size = s["image_size"]
    model_kwargs = {k: tuple(s[k]) if isinstance(s[k], list) else s[k]
                    for k in MODEL_SETTINGS if s.get(k) is not None}
    try:
        if digits:
            model = UNet.small(in_channels=1, image_size=size, **model_kwargs)
        else:
            model_kwargs.setdefault("attn_resolutions", (16,) if size >= 16 else ())
            model = UNet(in_channels=s["channels"], image_size=size, **model_kwargs)
    except ValueError as e:
        raise ValueError(f"cannot build the U-Net: {e} (see --model-channels, --num-groups, --channel-mult, "
                         f"--image-size)") from None
    s.update({k: model.config[k] for k in MODEL_SETTINGS})  # stored, so that resume rebuilds this model
    schedule_kwargs = {"scale_with_timesteps": True} if s["beta_schedule"] == "linear" else {}
    diffusion = Diffusion(model, image_size=size, timesteps=s["timesteps"], beta_schedule=s["beta_schedule"],
                          schedule_fn_kwargs=schedule_kwargs, objective=s["objective"])
    trainer = Trainer(
        diffusion, data, out=out, batch_size=s["batch_size"], lr=s["lr"], warmup=s["warmup"],
        grad_clip=s["grad_clip"], ema_decay=s["ema_decay"], seed=s["seed"], device=device,
        save_every=s["save_every"], grad_accum=s["grad_accum"], amp=s["amp"], log_every=s["log_every"],
        sample_every=s["sample_every"], num_samples=s["num_samples"], compile=bool(args.compile),
        num_workers=args.num_workers or 0, hflip=s["flip"], fast_path=_fast_path(args, device),
        channels_last=bool(args.channels_last))
    torch.manual_seed(derive_seed(s["seed"], SEED_NOISE, rank))  # each process draws its own t and ε
    if args.resume:
        step = trainer.resume()
        if s["steps"] < step:
            raise CommandError(f"{out} is at step {step} already, past --steps {s['steps']}: give a --steps "
                               f"larger than {step} to train further")
        if s["steps"] == step:
            if rank == 0:
                print(f"{out} is at step {step} already, which is --steps: nothing to train (give a larger "
                      f"--steps to train further)")
            return out
        if rank == 0:
            print(f"resuming from {trainer.checkpoint_dir} at step {step}")
    if rank == 0:
        for notice in notices:
            print(f"note: {notice}")
        _write_run(out, s)
    start, first = time.perf_counter(), trainer.step
    losses = trainer.train(s["steps"])
    grid = trainer.save()
    if rank == 0:
        if losses:
            last = losses[-100:]
            print(f"trained steps {first + 1}–{trainer.step} in {time.perf_counter() - start:.0f} s; "
                  f"final loss (mean of last {len(last)}) {sum(last) / len(last):.4f}")
        print(f"model saved to {out / 'model'}" + (f"; samples in {grid}" if grid else ""))
    return out


def _fast_path(args, device) -> bool:
    """--fast-path as given, else on for a GPU in one process."""
    if args.fast_path is not None:
        return args.fast_path
    return device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) <= 1


def _load_for_sampling(args):
    from fastddpm import Diffusion

    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r}: no such folder")
    k, eta = (args.ddim, 0.0) if getattr(args, "ddim", None) else (getattr(args, "steps", None), 1.0)
    overrides = {"sampling_timesteps": k, "ddim_sampling_eta": eta} if k else {}
    diffusion = Diffusion.from_pretrained(args.checkpoint, device=_device(args.device), **overrides).eval()
    return diffusion, bool(k)  # with K steps asked for, the DDIM loop runs even for K = T


def _draw(diffusion, use_ddim: bool, num: int, batch_size: int, seed: int, progress: bool = True,
          cuda_graph: bool = False):
    """``num`` images in [0, 1], drawn ``batch_size`` at a time from one seeded generator."""
    import torch

    gen = torch.Generator(diffusion.device).manual_seed(seed)
    loop = diffusion.ddim_sample if use_ddim else diffusion.p_sample_loop
    out = []
    for start in range(0, num, batch_size):
        shape = (min(batch_size, num - start), diffusion.channels, *diffusion.image_size)
        out.append(diffusion.unnormalize(loop(shape, generator=gen, progress=progress,
                                              cuda_graph=cuda_graph)).cpu())
    return torch.cat(out)


def _cuda_graph(args, diffusion) -> bool:
    """--cuda-graph as given, else on for a GPU (Diffusion.sample falls back to the eager loop, with one
    warning, where a step cannot be captured)."""
    return args.cuda_graph if args.cuda_graph is not None else diffusion.device.type == "cuda"


def cmd_sample(args) -> Path:
    from fastddpm.data import save_image_grid

    out = Path(args.out)
    if out.suffix and out.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out!r}: give FILE.png for a grid or a folder for single images")
    diffusion, use_ddim = _load_for_sampling(args)
    if not out.suffix:
        written = _sample_into_folder(diffusion, use_ddim, out, args.num, args.batch_size, args.seed,
                                      _cuda_graph(args, diffusion))
        print(f"wrote {written} samples to {out} ({args.num - written} were there already)")
        return out
    images = _draw(diffusion, use_ddim, args.num, args.batch_size, args.seed,
                   cuda_graph=_cuda_graph(args, diffusion))
    save_image_grid(images, out, scale=max(1, 512 // (8 * (images.shape[-1] + 2))))
    print(f"wrote {args.num} samples to {out}")
    return out


def _sample_into_folder(diffusion, use_ddim: bool, out: Path, num: int, batch_size: int, seed: int,
                        cuda_graph: bool = False) -> int:
    """Images 000000.png … into ``out``, batch by batch, each batch b (images b·batch_size …) drawn from its
    own generator seeded with seed + b·batch_size: an image depends on (checkpoint, seed, batch size, its
    index) alone, so a run killed half-way and started again samples only the batches with a file missing and
    writes only the missing files, identical to those of an uninterrupted run. Each file is written under a
    temporary name and renamed, so a kill never leaves a truncated PNG. Returns how many files were
    written."""
    import os

    from tqdm.auto import tqdm

    from fastddpm.data import save_image_grid

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{i:06d}.png" for i in range(num)]
    starts = range(0, num, batch_size)
    todo = [b for b in starts if not all(p.is_file() for p in paths[b:b + batch_size])]
    done = sum(p.is_file() for p in paths)
    disable = os.environ.get("FASTDDPM_NO_PROGRESS", "") not in ("", "0")
    written = 0
    with tqdm(total=num, initial=done, desc="sampling", unit="img", disable=disable) as bar:
        for start in todo:
            batch = paths[start:start + batch_size]
            images = _draw(diffusion, use_ddim, len(batch), len(batch), seed + start, progress=False,
                           cuda_graph=cuda_graph)
            for path, image in zip(batch, images):
                if path.is_file():
                    continue
                tmp = path.with_name(f".{path.stem}.partial.png")
                save_image_grid(image[None], tmp, padding=0)
                os.replace(tmp, path)
                written += 1
                bar.update(1)
    return written


def cmd_eval(args) -> float:
    import torch

    from fastddpm.data import ImageFolder

    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise ValueError("FID needs torchmetrics with its image extra (pip install 'torchmetrics[image]'), "
                         "which is not installed; its Inception weights are downloaded on first "
                         "use") from None
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
        images = _draw(diffusion, use_ddim, n, n, args.seed + start, cuda_graph=_cuda_graph(args, diffusion))
        fid.update(rgb(images.to(diffusion.device)), real=False)
    score = float(fid.compute())
    print(f"FID {score:.3f} ({args.num} samples vs {len(ref)} images in {args.fid})")
    return score


def cmd_demo(args) -> Path:
    out = Path(args.out)
    train_args = parse_args(["train", "--data", "digits", "--out", str(out), "--steps", str(args.steps),
                             "--seed", str(args.seed), "--save-every", "0",
                             "--num-samples", str(args.num_samples),
                             *(["--device", args.device] if args.device else [])])
    print("fastddpm demo: training a small U-Net DDPM on the 8×8 digits bundled with scikit-learn")
    cmd_train(train_args, fresh=True)  # a demo starts afresh each time: no checkpoint, the old metrics go
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
            raise ValueError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); "
                             "or use TOML") from None
        try:
            values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"--config {path}: not valid YAML: {e}") from None
    else:
        import tomllib
        try:
            values = tomllib.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"--config {path}: not valid TOML: {e}") from None
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
    if args.command == "train" and not args.out:  # train's own usage, not the top-level one
        parser._subparsers._group_actions[0].choices["train"].error(
            "--out is required (on the command line or in --config)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "info":
        from fastddpm import build_info
        print(json.dumps(build_info(), indent=2))
        return 0
    try:
        {"train": cmd_train, "sample": cmd_sample, "demo": cmd_demo, "eval": cmd_eval}[args.command](args)
    except (CommandError, ValueError, OSError) as e:  # bad requests, paths, files, a full disk: one line
        print(f"fastddpm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
