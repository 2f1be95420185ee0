"""Train the U-Net to denoise ONE image, and save a self-describing checkpoint.

    python ddpm_train.py                      # the shipped model: 256 px, 3000 steps
    python ddpm_train.py --image_path my_photo.jpg --img_size 128    # -> model_ckpt/my_photo_unet.pth
    python ddpm_train.py --resume model_ckpt/demo_unet.resume.pth    # continue a stopped run

Each step noises the image as x_t = (1 - w) * x0 + w * eps at a random t and
teaches the network to return x0 (models/diffusion.py has the formulas,
models/training.py the loop).

While it runs, a resumable snapshot is kept beside the checkpoint
(demo_unet.resume.pth for demo_unet.pth): every --save_every steps, and when
you press Ctrl-C. The finished model replaces the checkpoint only at the
end, and the snapshot is then deleted.

Each picture gets its own checkpoint, model_ckpt/<image stem>_unet.pth,
unless --model_save_path says otherwise; a checkpoint of another picture is
never replaced without that flag.
"""

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch

from models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from models.cli import (MAX_SEED, ArgumentParser, add_device_argument, channel_multipliers, fraction,
                        int_in_range, pick_device, positive_float, run, stop_on_sigint, warn)
from models.diffusion import DEFAULT_MAX_NOISE, NoiseSchedule, denoise, seeded_noise
from models.errors import UserError
from models.figures import save_loss_by_noise, save_loss_curve, save_quality_curve
from models.files import atomic_write, check_writable, file_sha256
from models.imaging import load_image
from models.metrics import psnr
from models.training import WARMUP_STEPS, NonFiniteLoss, Trainer
from models.unet_model import UNet, check_image_size

# The flags that define a run: a resumed run takes them from its checkpoint.
RUN_SETTINGS = ("img_size", "batch_size", "train_steps", "lr", "image_path", "seed", "base_channels",
                "channel_mults", "max_noise")
CONTEXT_SETTINGS = ("attention", "coords", "canvas")  # network options; runs that predate them had them off
EXIT_INTERRUPTED = 130  # the shell's code for "stopped by Ctrl-C"
MODEL_FOLDER = "model_ckpt"  # where a picture's model goes by default: <folder>/<image stem>_unet.pth
EVAL_T, EVAL_NOISE_SEED = 500, 0  # the quality check denoises what `python ddpm_infer.py` does by default
PSNR_MILESTONES = (30.0, 35.0, 38.0)  # dB; the summary says when the run first reached each


def build_parser():
    parser = ArgumentParser(description="Train the time-embedded U-Net to denoise one image.")
    parser.add_argument("--img_size", type=int_in_range(1, 2048), default=256,
                        help="side of the square training image, px; with L levels a multiple of 2^(L-1), "
                             "at least 2^L")
    parser.add_argument("--batch_size", type=int_in_range(1, 64), default=1,
                        help="noisy copies of the image per step, each at its own t")
    parser.add_argument("--train_steps", type=int_in_range(1, 1_000_000), default=3000, help="optimizer steps")
    parser.add_argument("--lr", type=positive_float, default=1e-3,
                        help=f"peak learning rate: linear warm-up over min({WARMUP_STEPS} steps, 10%% of the run), "
                             "then cosine decay to 0")
    parser.add_argument("--image_path", default="images/demo.png", help="the image to learn")
    parser.add_argument("--model_save_path", default=None,
                        help="where to write the checkpoint; each picture gets its own, so the shipped model "
                             f"stays as it is (default: {MODEL_FOLDER}/<image stem>_unet.pth)")
    parser.add_argument("--seed", type=int_in_range(0, MAX_SEED), default=0, help="seed for the weights, t and noise")
    parser.add_argument("--base_channels", type=int_in_range(8, 1024), default=16,
                        help="U-Net width at full resolution, a multiple of 8")
    parser.add_argument("--channel_mults", type=channel_multipliers, default="1,2,4,8",
                        help="width of each U-Net level as a multiple of base_channels; one level per entry")
    parser.add_argument("--max_noise", type=fraction, default=DEFAULT_MAX_NOISE,
                        help="noise weight at t = T: w(t) = max_noise * t / T. Below 1 the model is a denoiser; "
                             "with 1 it also learns to start from pure noise")
    context = parser.add_argument_group(
        "global context", "what the network may know beyond its receptive field; needed to generate "
        "a 256 px picture from pure noise (--max_noise 1), off for the denoiser")
    context.add_argument("--attention", action="store_true",
                         help="self-attention at the lowest level of the U-Net (DDPM's AttnBlock)")
    context.add_argument("--coords", action="store_true",
                         help="give the network each pixel's (y, x) position as two extra input channels")
    context.add_argument("--canvas", action="store_true",
                         help="add a learned full-size image B to the output, x0_hat = unet(x_t, t) + B: "
                              "the network may store the picture itself")
    add_device_argument(parser)
    parser.add_argument("--save_every", type=int_in_range(0, 1_000_000), default=500,
                        help="steps between resumable snapshots (0: only on Ctrl-C)")
    parser.add_argument("--eval_every", type=int_in_range(0, 1_000_000), default=100,
                        help=f"steps between quality checks: PSNR of the one-step output at t={EVAL_T}, "
                             "as ddpm_infer.py shows it, logged with the time so far (0: never)")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="continue the run saved in this snapshot exactly (default: start a new run)")
    return parser


def parse_args(argv=None):
    """The flags, and the set of flag names the user actually typed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # argparse fills in a default only where the namespace has no value yet
    typed = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args), _NOT_TYPED)))
    return args, {name for name, value in vars(typed).items() if value is not _NOT_TYPED}


_NOT_TYPED = object()


def companion_paths(model_save_path):
    """The files a run writes beside its checkpoint, named after it (model.pth -> model.*)."""
    root, ext = os.path.splitext(model_save_path)
    return {
        "snapshot": f"{root}.resume{ext or '.pth'}",  # resumable, while the run is unfinished
        "loss_curve": f"{root}_loss.png",
        "loss_by_noise": f"{root}_loss_by_noise.png",
        "quality_curve": f"{root}_psnr.png",
        "record": f"{root}.json",
    }


def default_save_path(image_path):
    """model_ckpt/<image stem>_unet.pth: one model per picture (images/demo.png -> model_ckpt/demo_unet.pth)."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return os.path.join(MODEL_FOLDER, f"{stem}_unet.pth")


def keep_another_pictures_model(path, image_sha256):
    """Refuse a default save path that holds the model of another picture (a photo that shares its file name)."""
    if not os.path.exists(path):
        return
    keep = "so it is kept; choose where this model goes with --model_save_path"
    try:
        trained_on = read_checkpoint(path)["data"]
    except UserError:  # not a checkpoint of ours: not ours to replace either
        raise UserError(f"{path!r} exists and is not a checkpoint of this project, {keep}") from None
    if trained_on.get("image_sha256") != image_sha256:
        raise UserError(f"{path!r} holds the model of another picture ({trained_on.get('image_path')}), {keep}")


def new_model(args):
    """Check the settings against each other and build a freshly initialised network."""
    torch.manual_seed(args.seed)  # the initial weights
    try:
        model = UNet(in_channels=3, base_channels=args.base_channels, channel_mults=args.channel_mults,
                     attention=args.attention, coords=args.coords, canvas_size=args.img_size if args.canvas else None)
        check_image_size(args.img_size, args.channel_mults)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return model


def open_snapshot(args, typed, device):
    """For --resume: load the snapshot, take the run's settings from it, check typed flags agree."""
    model, _, checkpoint = load_checkpoint(args.resume, device)
    if "resume" not in checkpoint:
        raise UserError(f"{args.resume!r} is a finished model, not a snapshot of a run in progress: "
                        "there is nothing to resume")
    saved = checkpoint["train"].get("args", {})
    missing = [name for name in (*RUN_SETTINGS, "model_save_path") if name not in saved]
    if missing:
        raise UserError(f"snapshot {args.resume!r} does not record its run's settings ({', '.join(missing)})")
    saved = {**dict.fromkeys(CONTEXT_SETTINGS, False), **saved}
    for name in (*RUN_SETTINGS, *CONTEXT_SETTINGS):
        if name in typed and getattr(args, name) != saved[name]:
            raise UserError(f"--{name} {getattr(args, name)} disagrees with the run being resumed, which used "
                            f"{saved[name]} (leave --{name} out to continue that run)")
        setattr(args, name, saved[name])
    if "model_save_path" not in typed:
        args.model_save_path = saved["model_save_path"]
    if file_sha256(args.image_path) != checkpoint["data"]["image_sha256"]:
        raise UserError(f"image {args.image_path!r} has changed since the run started, so it cannot "
                        "continue exactly (restore the image, or start a new run)")
    return model, checkpoint


class RunRecord:
    """What every checkpoint of this run says about it, and the one place that writes them."""

    def __init__(self, args, device, image_sha256, earlier=None):
        self.args, self.device, self.image_sha256 = args, device, image_sha256
        earlier = earlier or {}  # the "train" part of the snapshot being resumed
        self.earlier_time = earlier.get("wall_time_s", 0.0)  # seconds spent before a resume
        self.quality = copy.deepcopy(earlier.get("quality", {"t": EVAL_T, "step": [], "seconds": [], "psnr_db": []}))
        self.start = time.perf_counter()
        self.eval_input = None

    def evaluate(self, trainer, x0):
        """Log the PSNR of one-step denoising at t = EVAL_T against the time so far; returns it for display."""
        if self.eval_input is None:  # x_t of ddpm_infer.py's default noise, made once
            eps = seeded_noise(x0, EVAL_NOISE_SEED).to(x0.device)
            self.eval_input = trainer.schedule.add_noise(x0, torch.tensor([EVAL_T], device=x0.device), eps)
        value = psnr(denoise(trainer.model, self.eval_input, EVAL_T, trainer.schedule), x0)
        for key, item in (("step", trainer.step), ("seconds", round(self.elapsed(), 2)), ("psnr_db", value)):
            self.quality[key].append(item)
        return {"psnr": f"{value:.2f}dB"}

    def milestones(self):
        """For each PSNR_MILESTONES value, (dB, step, seconds) of the first check that reached it."""
        q = self.quality
        reached = []
        for target in PSNR_MILESTONES:
            first = next((i for i, value in enumerate(q["psnr_db"]) if value >= target), None)
            if first is not None:
                reached.append((target, q["step"][first], q["seconds"][first]))
        return reached

    def elapsed(self):
        return self.earlier_time + time.perf_counter() - self.start

    def write_reports(self, trainer, paths):
        """The loss plots and the JSON run record, beside the finished checkpoint."""
        losses, noise = trainer.loss_history(), trainer.noise_history()
        save_loss_curve(losses, paths["loss_curve"])
        save_loss_by_noise([trainer.schedule.w(t) for t in noise["t"]], noise["loss"], trainer.schedule.max_noise,
                           paths["loss_by_noise"])
        if self.quality["step"]:
            save_quality_curve(self.quality, self.milestones(), paths["quality_curve"])
        record = {
            "command": " ".join(["python", "ddpm_train.py", *sys.argv[1:]]),
            "args": dict(vars(self.args)),
            "seed": self.args.seed, "device": str(self.device),
            "torch_version": str(torch.__version__), "python_version": platform.python_version(),
            "wall_time_s": round(self.elapsed(), 2), "train_steps": trainer.step,
            "final_loss": trainer.final_loss(),
            "quality": self.quality,
            "psnr_milestones": [{"psnr_db": db, "step": step, "seconds": sec} for db, step, sec in self.milestones()],
            "image_path": self.args.image_path, "image_sha256": self.image_sha256,
            "checkpoint": self.args.model_save_path,
        }
        with atomic_write(paths["record"]) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")

    def save(self, path, trainer, resumable):
        args = self.args
        save_checkpoint(
            path, trainer.model, trainer.schedule,
            data={"img_size": args.img_size, "image_path": args.image_path, "image_sha256": self.image_sha256},
            train_info={
                "args": {k: v for k, v in vars(args).items() if k != "resume"}, "step": trainer.step,
                "loss_history": trainer.loss_history(), "noise_history": trainer.noise_history(),
                "wall_time_s": self.elapsed(), "quality": self.quality,
                "device": str(self.device), "torch_version": str(torch.__version__),
                "python_version": platform.python_version(),
            },
            resume=trainer.state_dict() if resumable else None,
        )


def make_trainer(args, model, x0, device, snapshot):
    """A Trainer for a new run, or one that continues the run in ``snapshot``."""
    trainer = Trainer(model, x0, NoiseSchedule(max_noise=args.max_noise), args.train_steps, args.lr,
                      batch_size=args.batch_size,
                      generator=torch.Generator(device=device).manual_seed(args.seed))  # every t and eps
    if snapshot is not None:
        try:
            trainer.load_state_dict(snapshot["resume"], snapshot["train"]["loss_history"],
                                    snapshot["train"]["noise_history"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise UserError(f"snapshot {args.resume!r} cannot be continued here ({exc})") from None
        print(f"resuming {args.resume} at step {trainer.step} of {args.train_steps}")
    return trainer


def train_until_done_or_stopped(trainer, args, record, snapshot_path, x0):
    """Run the trainer with periodic snapshots; True if it finished, False if Ctrl-C stopped it."""
    try:
        with stop_on_sigint(trainer):
            print(f"training {args.train_steps - trainer.step} steps on {record.device}; the model will go to "
                  f"{args.model_save_path}; Ctrl-C saves a snapshot to {snapshot_path}", flush=True)
            return trainer.run(save_every=args.save_every,
                               on_save=lambda t: record.save(snapshot_path, t, resumable=True),
                               eval_every=args.eval_every, on_eval=lambda t: record.evaluate(t, x0))
    except NonFiniteLoss as exc:
        raise UserError(f"{exc}: training diverged (try a lower --lr, such as {args.lr / 10:g}); "
                        "nothing was saved, earlier checkpoints are untouched") from None


def main():
    args, typed = parse_args()
    device = pick_device(args.device)
    model, snapshot = open_snapshot(args, typed, device) if args.resume else (new_model(args), None)
    chosen_path = args.model_save_path is not None  # typed, or the resumed run's
    args.model_save_path = args.model_save_path or default_save_path(args.image_path)
    paths = companion_paths(args.model_save_path)
    snapshot_path = paths["snapshot"]
    for name, path in {"--model_save_path": args.model_save_path, **paths}.items():
        check_writable(path, name, inputs=[args.image_path])
    x0 = load_image(args.image_path, args.img_size, warn=warn)
    image_sha256 = file_sha256(args.image_path)
    if not chosen_path:
        keep_another_pictures_model(args.model_save_path, image_sha256)
    record = RunRecord(args, device, image_sha256, earlier=snapshot["train"] if snapshot else None)

    # channels_last lets the CPU and GPU convolution kernels skip layout shuffles
    model = model.to(device, memory_format=torch.channels_last)
    x0 = x0.to(device)
    trainer = make_trainer(args, model, x0, device, snapshot)
    if not train_until_done_or_stopped(trainer, args, record, snapshot_path, x0):
        if trainer.step == 0:
            print("stopped before the first step; nothing to save", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        record.save(snapshot_path, trainer, resumable=True)
        print(f"stopped at step {trainer.step} of {args.train_steps}; saved {snapshot_path}\n"
              f"continue with: python ddpm_train.py --resume {snapshot_path}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)

    record.save(args.model_save_path, trainer, resumable=False)
    if os.path.exists(snapshot_path):
        os.remove(snapshot_path)  # the run is finished: nothing is left to resume
    record.write_reports(trainer, paths)
    print(f"trained {args.train_steps} steps in {record.elapsed():.1f} s on {device}; "
          f"final loss {trainer.final_loss():.6f} (mean of the last {min(trainer.step, 100)} steps)")
    if record.quality["psnr_db"]:
        reached = "; ".join(f"{db:g} dB at step {step} ({sec:.0f} s)" for db, step, sec in record.milestones())
        print(f"PSNR of one-step denoising at t={EVAL_T}: {record.quality['psnr_db'][-1]:.2f} dB at the end"
              + (f"; first reached {reached}" if reached else ""))
    reports = [paths["loss_curve"], paths["loss_by_noise"], *([paths["quality_curve"]] if record.quality["step"] else []),
               paths["record"]]
    print(f"saved {os.path.abspath(args.model_save_path)}, with its plots and run record "
          f"({', '.join(os.path.basename(path) for path in reports)})")


if __name__ == "__main__":
    run(main)
