"""Train the U-Net on ONE image (a denoiser) or on a folder of images (a generator), and save a
self-describing checkpoint.

    python ddpm_train.py                      # the shipped model: 256 px, 3000 steps
    python ddpm_train.py --image_path my_photo.jpg --img_size 128    # -> model_ckpt/my_photo_unet.pth
    python ddpm_train.py --image_dir my_photos/ --img_size 32         # -> model_ckpt/my_photos_unet.pth
    torchrun --standalone --nproc_per_node 2 ddpm_train.py --image_dir my_photos/ --img_size 32
    python ddpm_train.py --resume model_ckpt/demo_unet.resume.pth    # continue a stopped run

Each step noises the image as x_t = (1 - w) * x0 + w * eps at a random t and
teaches the network to return x0 (models/diffusion.py has the formulas,
models/training.py the loop).

While it runs, a resumable snapshot is kept beside the checkpoint
(demo_unet.resume.pth for demo_unet.pth): every --save_every steps, and when
you press Ctrl-C. The finished model replaces the checkpoint only at the
end, and the snapshot is then deleted.

Each picture (or folder) gets its own checkpoint, model_ckpt/<stem>_unet.pth,
unless --model_save_path says otherwise; a checkpoint of other pictures is
never replaced without that flag.

Under torchrun every process runs this script: each trains on its own share
of every batch, with its own images and noise, DistributedDataParallel
averages the gradients, and process 0 alone prints and writes files.
"""

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch
import torch.distributed as dist

from models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from models.cli import (MAX_SEED, ArgumentParser, add_device_argument, below_one, channel_multipliers, fraction,
                        int_in_range, is_main_process, pick_device, positive_float, run, stop_on_sigint, warn)
from models.data import ImageFiles, choose_images, dataset_digest
from models.diffusion import DEFAULT_MAX_NOISE, NoiseSchedule, denoise, seeded_noise
from models.errors import UserError
from models.figures import save_loss_by_noise, save_loss_curve, save_quality_curve
from models.files import atomic_write, check_writable, file_sha256
from models.metrics import psnr
from models.training import WARMUP_STEPS, NonFiniteLoss, Trainer, rank_seed
from models.unet_model import UNet, check_image_size

# The flags that define a run: a resumed run takes them from its checkpoint.
RUN_SETTINGS = ("img_size", "batch_size", "train_steps", "lr", "image_path", "seed", "base_channels",
                "channel_mults", "max_noise")
# settings added later, with the value that runs which predate them had
LATER_SETTINGS = {"attention": False, "coords": False, "canvas": False, "image_dir": None, "num_images": None,
                  "ema_decay": 0.0}
# What a folder changes: a generator starts from pure noise, and averages its weights
FOLDER_DEFAULTS = {"max_noise": 1.0, "batch_size": 16, "ema_decay": 0.999}
IMAGE_DEFAULTS = {"max_noise": DEFAULT_MAX_NOISE, "batch_size": 1, "ema_decay": 0.0}
EVAL_IMAGES = 8  # with a folder, the quality check denoises its first 8 images
EXIT_INTERRUPTED = 130  # the shell's code for "stopped by Ctrl-C"
MODEL_FOLDER = "model_ckpt"  # where a picture's model goes by default: <folder>/<image stem>_unet.pth
EVAL_T, EVAL_NOISE_SEED = 500, 0  # the quality check denoises what `python ddpm_infer.py` does by default
PSNR_MILESTONES = (30.0, 35.0, 38.0)  # dB; the summary says when the run first reached each


def build_parser():
    parser = ArgumentParser(description="Train the time-embedded U-Net on one image (a denoiser) or on a folder "
                                        "of images (a generator).")
    parser.add_argument("--img_size", type=int_in_range(1, 2048), default=256,
                        help="side of the square training image, px; with L levels a multiple of 2^(L-1), "
                             "at least 2^L")
    parser.add_argument("--batch_size", type=int_in_range(1, 1024), default=None,
                        help="images per step, each at its own t, across all processes (default: 1 with "
                             f"--image_path, {FOLDER_DEFAULTS['batch_size']} with --image_dir); one image is "
                             "used that many times")
    parser.add_argument("--train_steps", type=int_in_range(1, 1_000_000), default=3000, help="optimizer steps")
    parser.add_argument("--lr", type=positive_float, default=1e-3,
                        help=f"peak learning rate: linear warm-up over min({WARMUP_STEPS} steps, 10%% of the run), "
                             "then cosine decay to 0")
    parser.add_argument("--image_path", default="images/demo.png", help="the image to learn")
    parser.add_argument("--image_dir", default=None,
                        help="learn every image in this folder and its sub-folders instead, in sorted order "
                             "(default: one image, --image_path)")
    parser.add_argument("--num_images", type=int_in_range(1, 10**8), default=None,
                        help="with --image_dir: only the first N images (default: all)")
    parser.add_argument("--model_save_path", default=None,
                        help="where to write the checkpoint; each picture gets its own, so the shipped model "
                             f"stays as it is (default: {MODEL_FOLDER}/<image stem>_unet.pth)")
    parser.add_argument("--seed", type=int_in_range(0, MAX_SEED), default=0, help="seed for the weights, t and noise")
    parser.add_argument("--base_channels", type=int_in_range(8, 1024), default=16,
                        help="U-Net width at full resolution, a multiple of 8")
    parser.add_argument("--channel_mults", type=channel_multipliers, default="1,2,4,8",
                        help="width of each U-Net level as a multiple of base_channels; one level per entry")
    parser.add_argument("--max_noise", type=fraction, default=None,
                        help="noise weight at t = T: w(t) = max_noise * t / T. Below 1 the model is a denoiser; "
                             f"with 1 it also learns to start from pure noise (default: {DEFAULT_MAX_NOISE} with "
                             "--image_path, 1 with --image_dir)")
    parser.add_argument("--ema_decay", type=below_one, default=None,
                        help="keep an exponential moving average of the weights with this decay and sample with "
                             "it; 0 is off (default: 0 with --image_path, "
                             f"{FOLDER_DEFAULTS['ema_decay']} with --image_dir)")
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


def check_flags(args, typed):
    """Flags that contradict each other; then the defaults that depend on one image or a folder."""
    if args.image_dir is not None and "image_path" in typed:
        raise UserError("--image_dir and --image_path cannot be used together: learn one image or one folder")
    if args.num_images is not None and args.image_dir is None:
        raise UserError("--num_images needs --image_dir: it takes the first N images of a folder")
    if args.image_dir is not None:
        args.image_path = None
    if not args.resume:  # a resumed run takes these from its snapshot
        defaults = FOLDER_DEFAULTS if args.image_dir is not None else IMAGE_DEFAULTS
        for name, value in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, value)


def default_save_path(source):
    """model_ckpt/<stem>_unet.pth: one model per picture or folder (images/demo.png -> model_ckpt/demo_unet.pth)."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
    return os.path.join(MODEL_FOLDER, f"{stem}_unet.pth")


class TrainingData:
    """What a run learns, one image or a folder: its Dataset, and how the checkpoint records it.

    ``record`` goes into the checkpoint's "data": for one image its path and SHA-256, for a
    folder its files (relative to the folder) and one digest of them all (data.dataset_digest).
    ``identity`` is the digest that says whether two runs saw the same data.
    """

    def __init__(self, args, paths):
        self.dataset = ImageFiles(paths, args.img_size, warn=warn)
        if args.image_dir is not None:
            self.identity = dataset_digest(args.image_dir, paths)
            self.record = {"img_size": args.img_size, "image_dir": args.image_dir,
                           "image_dir_absolute": os.path.abspath(args.image_dir), "num_images": len(paths),
                           "files": [os.path.relpath(path, args.image_dir) for path in paths],
                           "dataset_sha256": self.identity}
            self.name = f"{len(paths)} images of {args.image_dir}"
        else:
            self.identity = file_sha256(args.image_path)
            self.record = {"img_size": args.img_size, "image_path": args.image_path, "image_sha256": self.identity}
            self.name = args.image_path

    def eval_images(self):
        """The clean images the quality check denoises: the picture, or a folder's first EVAL_IMAGES."""
        return torch.stack([self.dataset[i] for i in range(min(len(self.dataset), EVAL_IMAGES))])


def data_identity(data_record):
    """The digest of what a checkpoint was trained on (a folder's, or one image's), or None."""
    return data_record.get("dataset_sha256") or data_record.get("image_sha256")


def keep_another_models(path, data):
    """Refuse a default save path that holds the model of other pictures (a photo that shares its file name)."""
    if not os.path.exists(path):
        return
    keep = "so it is kept; choose where this model goes with --model_save_path"
    try:
        trained_on = read_checkpoint(path)["data"]
    except UserError:  # not a checkpoint of ours: not ours to replace either
        raise UserError(f"{path!r} exists and is not a checkpoint of this project, {keep}") from None
    if data_identity(trained_on) != data.identity:
        source = trained_on.get("image_dir") or trained_on.get("image_path")
        raise UserError(f"{path!r} holds the model of another picture ({source}), {keep}")


def new_model(args):
    """Check the settings against each other and build a freshly initialised network."""
    torch.manual_seed(args.seed)  # the initial weights: the same in every process
    try:
        model = UNet(in_channels=3, base_channels=args.base_channels, channel_mults=args.channel_mults,
                     attention=args.attention, coords=args.coords, canvas_size=args.img_size if args.canvas else None)
        check_image_size(args.img_size, args.channel_mults)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return model


def open_snapshot(args, typed, device):
    """For --resume: load the snapshot, take the run's settings from it, check typed flags agree."""
    model, _, checkpoint = load_checkpoint(args.resume, device, ema=False)  # the weights training continues
    if "resume" not in checkpoint:
        raise UserError(f"{args.resume!r} is a finished model, not a snapshot of a run in progress: "
                        "there is nothing to resume")
    saved = checkpoint["train"].get("args", {})
    missing = [name for name in (*RUN_SETTINGS, "model_save_path") if name not in saved]
    if missing:
        raise UserError(f"snapshot {args.resume!r} does not record its run's settings ({', '.join(missing)})")
    saved = {**LATER_SETTINGS, **saved}
    for name in (*RUN_SETTINGS, *LATER_SETTINGS):
        if name in typed and getattr(args, name) != saved[name]:
            raise UserError(f"--{name} {getattr(args, name)} disagrees with the run being resumed, which used "
                            f"{saved[name]} (leave --{name} out to continue that run)")
        setattr(args, name, saved[name])
    if "model_save_path" not in typed:
        args.model_save_path = saved["model_save_path"]
    return model, checkpoint


def check_same_data(args, checkpoint, data):
    """A resumed run must see the very files (and bytes) it started with."""
    if data_identity(checkpoint["data"]) != data.identity:
        if args.image_dir is not None:
            raise UserError(f"the images in {args.image_dir!r} have changed since the run started (files added, "
                            "removed, renamed or edited), so it cannot continue exactly (restore them, or start "
                            "a new run)")
        raise UserError(f"image {args.image_path!r} has changed since the run started, so it cannot "
                        "continue exactly (restore the image, or start a new run)")


class RunRecord:
    """What every checkpoint of this run says about it, and the one place that writes them."""

    def __init__(self, args, device, data, earlier=None):
        self.args, self.device, self.data = args, device, data
        earlier = earlier or {}  # the "train" part of the snapshot being resumed
        self.earlier_time = earlier.get("wall_time_s", 0.0)  # seconds spent before a resume
        self.quality = copy.deepcopy(earlier.get("quality", {"t": EVAL_T, "step": [], "seconds": [], "psnr_db": []}))
        self.start = time.perf_counter()
        self.eval_input = None

    def evaluate(self, trainer):
        """Log the PSNR of one-step denoising at t = EVAL_T against the time so far; returns it for display.

        With a folder, the PSNR is over its first EVAL_IMAGES images; with EMA, of the averaged weights.
        Process 0 alone measures (the others return at once).
        """
        if not is_main_process():
            return {}
        if self.eval_input is None:  # x_t of ddpm_infer.py's default noise, made once
            self.eval_x0 = self.data.eval_images().to(trainer.device)
            eps = seeded_noise(self.eval_x0, EVAL_NOISE_SEED).to(trainer.device)
            t = torch.full((len(self.eval_x0),), EVAL_T, device=trainer.device)
            self.eval_input = trainer.schedule.add_noise(self.eval_x0, t, eps)
        value = psnr(denoise(trainer.sampling_model(), self.eval_input, EVAL_T, trainer.schedule), self.eval_x0)
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
            "command": " ".join(self.command()),
            "args": dict(vars(self.args)),
            "seed": self.args.seed, "device": str(self.device), "processes": trainer.world_size,
            "torch_version": str(torch.__version__), "python_version": platform.python_version(),
            "wall_time_s": round(self.elapsed(), 2), "train_steps": trainer.step,
            "final_loss": trainer.final_loss(),
            "quality": self.quality,
            "psnr_milestones": [{"psnr_db": db, "step": step, "seconds": sec} for db, step, sec in self.milestones()],
            **{key: value for key, value in self.data.record.items()
               if key not in ("img_size", "files", "image_dir_absolute")},
            "checkpoint": self.args.model_save_path,
        }
        with atomic_write(paths["record"]) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")

    def command(self):
        """The command line that started this process, as a user would type it."""
        return [*launcher(), *sys.argv[1:]]

    def save(self, path, trainer, resumable):
        """Write a checkpoint of the run. Every process must call it (the random states are gathered
        from all); process 0 alone writes."""
        resume = trainer.state_dict() if resumable else None
        if not is_main_process():
            return
        save_checkpoint(
            path, trainer.model, trainer.schedule,
            data=self.data.record,
            train_info={
                "args": {k: v for k, v in vars(self.args).items() if k != "resume"}, "step": trainer.step,
                "loss_history": trainer.loss_history(), "noise_history": trainer.noise_history(),
                "wall_time_s": self.elapsed(), "quality": self.quality, "processes": trainer.world_size,
                "device": str(self.device), "torch_version": str(torch.__version__),
                "python_version": platform.python_version(),
            },
            resume=resume, ema=trainer.ema.model if trainer.ema is not None else None,
        )


def make_trainer(args, model, data, device, snapshot):
    """A Trainer for a new run, or one that continues the run in ``snapshot``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    # each process draws its own t and eps; a single process draws from --seed itself
    generator = torch.Generator(device=device).manual_seed(rank_seed(args.seed, rank))
    try:
        trainer = Trainer(model, data.dataset, NoiseSchedule(max_noise=args.max_noise), args.train_steps, args.lr,
                          batch_size=args.batch_size, generator=generator, ema_decay=args.ema_decay,
                          data_seed=args.seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if snapshot is not None:
        try:
            trainer.load_state_dict(snapshot["resume"], snapshot["train"]["loss_history"],
                                    snapshot["train"]["noise_history"])
            if trainer.ema is not None:
                trainer.ema.model.load_state_dict(snapshot["ema"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise UserError(f"snapshot {args.resume!r} cannot be continued here ({exc})") from None
        say(f"resuming {args.resume} at step {trainer.step} of {args.train_steps}")
    return trainer


def launcher():
    """How this script was started: python ddpm_train.py, or torchrun --nproc_per_node K ddpm_train.py."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return (["python"] if world_size == 1 else ["torchrun", "--nproc_per_node", str(world_size)]) + ["ddpm_train.py"]


def say(message, **kwargs):
    """print() in process 0 only: the one voice of a run, however many processes it has."""
    if is_main_process():
        print(message, **kwargs)


def train_until_done_or_stopped(trainer, args, record, snapshot_path):
    """Run the trainer with periodic snapshots; True if it finished, False if Ctrl-C stopped it."""
    try:
        with stop_on_sigint(trainer):
            say(f"training {args.train_steps - trainer.step} steps on {record.data.name}, on {record.device}"
                + (f" in {trainer.world_size} processes" if trainer.world_size > 1 else "")
                + f"; the model will go to {args.model_save_path}; Ctrl-C saves a snapshot to {snapshot_path}",
                flush=True)
            return trainer.run(save_every=args.save_every,
                               on_save=lambda t: record.save(snapshot_path, t, resumable=True),
                               eval_every=args.eval_every, on_eval=record.evaluate)
    except NonFiniteLoss as exc:
        raise UserError(f"{exc}: training diverged (try a lower --lr, such as {args.lr / 10:g}); "
                        "nothing was saved, earlier checkpoints are untouched") from None


def join_processes(device):
    """Under torchrun (WORLD_SIZE > 1 in the environment): join the process group. Returns the device.

    torchrun starts one copy of this script per process and tells each its RANK, LOCAL_RANK,
    WORLD_SIZE and where to meet (MASTER_ADDR, MASTER_PORT). Pitfalls worth knowing:
    * the backend: gloo runs on CPUs, NCCL on CUDA GPUs (one GPU per process, cuda:LOCAL_RANK);
    * threads: K processes on a C-core machine should use C / K threads each, or they fight for
      the cores. torchrun sets OMP_NUM_THREADS=1 unless you set it; on 2 cores, 2 processes of 1
      thread is right. Set OMP_NUM_THREADS yourself on bigger machines;
    * the rendezvous address: on one machine it is the loopback address, 127.0.0.1, and a port
      (29500 by default). Two runs at once need different ports (torchrun --standalone picks a
      free one), and where gloo picks a network card the others cannot reach, set
      GLOO_SOCKET_IFNAME=lo.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"more than one process runs on CPUs (gloo) or CUDA GPUs (NCCL), not on {device.type}")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def main():
    args, typed = parse_args()
    check_flags(args, typed)
    device = join_processes(pick_device(args.device))
    model, snapshot = open_snapshot(args, typed, device) if args.resume else (new_model(args), None)
    chosen_path = args.model_save_path is not None  # typed, or the resumed run's
    source = args.image_dir if args.image_dir is not None else args.image_path
    args.model_save_path = args.model_save_path or default_save_path(source)
    paths = companion_paths(args.model_save_path)
    snapshot_path = paths["snapshot"]
    # the files to learn: listed now, so that no output may overwrite one; decoded after the checks
    images = choose_images(args.image_dir, args.num_images) if args.image_dir is not None else [args.image_path]
    for name, path in {"--model_save_path": args.model_save_path, **paths}.items():
        check_writable(path, name, inputs=images)
    data = TrainingData(args, images)
    if snapshot is not None:
        check_same_data(args, snapshot, data)
    if not chosen_path:
        keep_another_models(args.model_save_path, data)
    record = RunRecord(args, device, data, earlier=snapshot["train"] if snapshot else None)

    # channels_last lets the CPU and GPU convolution kernels skip layout shuffles
    model = model.to(device, memory_format=torch.channels_last)
    trainer = make_trainer(args, model, data, device, snapshot)
    if not train_until_done_or_stopped(trainer, args, record, snapshot_path):
        if trainer.step == 0:
            say("stopped before the first step; nothing to save", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        record.save(snapshot_path, trainer, resumable=True)
        say(f"stopped at step {trainer.step} of {args.train_steps}; saved {snapshot_path}\n"
            f"continue with: {' '.join(launcher())} --resume {snapshot_path}", file=sys.stderr)
        if dist.is_initialized():
            dist.barrier()  # no process leaves before process 0 has written the snapshot
        sys.exit(EXIT_INTERRUPTED)

    record.save(args.model_save_path, trainer, resumable=False)
    if not is_main_process():
        return
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
