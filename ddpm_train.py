"""Train the U-Net on ONE image (a denoiser) or on a folder of images (a generator), and save a
self-describing checkpoint.

    python ddpm_train.py                      # the shipped model: 256 px, 3000 steps
    python ddpm_train.py --image_path my_photo.jpg --img_size 128    # -> model_ckpt/my_photo_unet.pth
    python ddpm_train.py --image_dir my_photos/ --img_size 32         # -> model_ckpt/my_photos_unet.pth
    torchrun --standalone --nproc_per_node 2 ddpm_train.py --image_dir my_photos/ --img_size 32
    python ddpm_train.py --digits S1 --snr_gamma 5 --t_density linear --ema_decay 0   # -> model_ckpt/digits_unet.pth
    python ddpm_train.py --digits S1 --class_conditional              # -> model_ckpt/digits_cond_unet.pth
    python ddpm_train.py --image_dir pets/ --class_conditional        # pets/cat/, pets/dog/: one class each
    python ddpm_train.py --resume model_ckpt/demo_unet.resume.pth    # continue a stopped run

Each step noises the image as x_t = (1 - w) * x0 + w * eps at a random t and
teaches the network to return x0 (ddpm/diffusion.py has the formulas,
ddpm/training.py the loop).

While it runs, a resumable snapshot is kept beside the checkpoint
(demo_unet.resume.pth for demo_unet.pth): every --save_every steps, and when
you press Ctrl-C. The finished model replaces the checkpoint only at the
end, and the snapshot is then deleted.

With --class_conditional the model also learns each image's class (the
digits' labels, or the sub-folder of --image_dir it lies in) and, at the rate
--label_dropout, to draw with no class: what classifier-free guidance needs
(ddpm/guidance.py; ddpm_sample.py --label --guidance asks for a class).

Each picture (or folder) gets its own checkpoint, model_ckpt/<stem>_unet.pth
(<stem>_cond_unet.pth with classes), unless --model_save_path says otherwise;
without that flag a run replaces only a checkpoint of the same pictures and
settings (so `python ddpm_train.py` remakes the shipped model, and
`python ddpm_train.py --train_steps 100` is refused there).

Under torchrun every process runs this script: each trains on its own share
of every batch, with its own images and noise, DistributedDataParallel
averages the gradients, and process 0 alone prints and writes files.
"""

import argparse
import os
import sys

import torch

from ddpm.cli import (EXIT_INTERRUPTED, MAX_SEED, ArgumentParser, add_device_argument, at_least_one, below_one,
                      channel_multipliers, fraction, int_in_range, keep_freed_memory, pick_device, positive_float, run,
                      say, stop_on_sigint, warn)
from ddpm.data import (DIGIT_SPLITS, DIGITS_SIDE, TRAINING_HALVES, DigitsData, TrainingData, check_same_data,
                       choose_images)
from ddpm.diffusion import DEFAULT_MAX_NOISE, T_DENSITIES, NoiseSchedule
from ddpm.distributed import is_main_process, join_processes, launcher, rank_and_world_size, wait_for_everyone
from ddpm.errors import UserError
from ddpm.files import check_writable
from ddpm.guidance import LABEL_DROPOUT
from ddpm.precision import add_precision_argument, check_precision
from ddpm.machine import available_memory
from ddpm.training import WARMUP_STEPS, NonFiniteLoss, Trainer, rank_seed, step_activation_bytes
from ddpm.training_run import (EVAL_T, SCRIPT, RunRecord, companion_paths, continue_from, keep_another_models,
                               open_snapshot)
from models.unet_model import UNet, check_image_size

# What a folder changes: a generator starts from pure noise, and averages its weights
FOLDER_DEFAULTS = {"max_noise": 1.0, "batch_size": 16, "ema_decay": 0.999}
IMAGE_DEFAULTS = {"max_noise": DEFAULT_MAX_NOISE, "batch_size": 1, "ema_decay": 0.0}
# The shipped digits at 28 px: three levels (28 -> 14 -> 7), self-attention at 7 x 7, and the rest of the recipe
# that both shipped digit models share (model_ckpt/digits_unet.pth adds --snr_gamma 5 --t_density linear --ema_decay 0)
DIGITS_DEFAULTS = {"channel_mults": [1, 2, 4], "attention": True, "batch_size": 64, "train_steps": 2500, "lr": 2e-3}
MODEL_FOLDER = "model_ckpt"  # where a picture's model goes by default: <folder>/<image stem>_unet.pth


def digits_recipe():
    """DIGITS_DEFAULTS as a user would type them, for --help: --channel_mults 1,2,4 --attention ..."""
    words = []
    for name, value in DIGITS_DEFAULTS.items():
        if value is True:  # a switch
            words.append(f"--{name}")
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}"
        words.append(f"--{name} {text}")
    return " ".join(words)


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
    parser.add_argument("--digits", choices=TRAINING_HALVES, default=None,
                        help=f"learn the shipped MNIST digits instead (data/mnist.png, {DIGITS_SIDE} px): one of the "
                             f"two disjoint training halves of {len(DIGIT_SPLITS['S1'])} digits each; flags left out "
                             f"take the recipe of the shipped digit models ({digits_recipe()})")
    parser.add_argument("--num_images", type=int_in_range(1, 10**8), default=None,
                        help="with --image_dir or --digits: only the first N images (default: all)")
    parser.add_argument("--class_conditional", action="store_true",
                        help="with --image_dir or --digits: learn each image's class too, so that ddpm_sample.py "
                             "--label can ask for one (the digits' labels; a folder's sub-folders are its classes, "
                             "as torchvision's ImageFolder reads them)")
    parser.add_argument("--label_dropout", type=below_one, default=None,
                        help="with --class_conditional: the share of images shown with no class, so that the same "
                             f"model also learns to draw unconditionally (default: {LABEL_DROPOUT})")
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
    parser.add_argument("--snr_gamma", type=at_least_one, default=1.0,
                        help="weight each image's x0 error by clamp(SNR(t), 1, G), SNR = ((1 - w) / w)^2: the "
                             "nearly clean steps count up to G times more, as much as their noise error "
                             "(ddpm/diffusion.py, loss_weights); 1 is the plain x0 error")
    parser.add_argument("--t_density", choices=T_DENSITIES, default="uniform",
                        help="how each image's t is drawn: uniform, or linear (density proportional to t: twice "
                             "the uniform one at t = T, more of the noisiest steps)")
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
    add_precision_argument(parser)
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


def check_flags(args, typed):
    """Flags that contradict each other; then the defaults that depend on one image or a folder."""
    if args.image_dir is not None and "image_path" in typed:
        raise UserError("--image_dir and --image_path cannot be used together: learn one image or one folder")
    if args.digits is not None and ({"image_path", "image_dir"} & typed):
        raise UserError("--digits cannot be used with --image_path or --image_dir: learn one data set at a time")
    if args.digits is not None and "img_size" in typed and args.img_size != DIGITS_SIDE:
        raise UserError(f"--img_size {args.img_size} does not fit --digits: the digits are {DIGITS_SIDE} px")
    if args.num_images is not None and args.image_dir is None and args.digits is None:
        raise UserError("--num_images needs --image_dir or --digits: it takes the first N images of a data set")
    if args.class_conditional and args.image_dir is None and args.digits is None and not args.resume:
        raise UserError("--class_conditional needs --image_dir or --digits: one image has no classes to learn")
    if args.label_dropout is not None and not args.class_conditional and not args.resume:
        raise UserError("--label_dropout needs --class_conditional: it hides the class of some training images")
    if args.class_conditional and args.label_dropout is None and not args.resume:
        args.label_dropout = LABEL_DROPOUT
    if args.image_dir is not None or args.digits is not None:
        args.image_path = None
    if args.digits is not None:
        args.img_size = DIGITS_SIDE
        for name, value in DIGITS_DEFAULTS.items():
            if name not in typed and not args.resume:
                setattr(args, name, value)
    if not args.resume:  # a resumed run takes these from its snapshot
        defaults = IMAGE_DEFAULTS if args.image_path is not None else FOLDER_DEFAULTS
        for name, value in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, value)


def default_save_path(source, class_conditional=False):
    """model_ckpt/<stem>_unet.pth: one model per picture or folder (images/demo.png -> model_ckpt/demo_unet.pth),
    and <stem>_cond_unet.pth for a model of its classes."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
    return os.path.join(MODEL_FOLDER, f"{stem}{'_cond' if class_conditional else ''}_unet.pth")


def new_model(args, classes=None):
    """Check the settings against each other and build a freshly initialised network (of ``classes``, if given)."""
    torch.manual_seed(args.seed)  # the initial weights: the same in every process
    try:
        model = UNet(in_channels=3, base_channels=args.base_channels, channel_mults=args.channel_mults,
                     attention=args.attention, coords=args.coords, canvas_size=args.img_size if args.canvas else None,
                     num_classes=len(classes) if classes else None)
        check_image_size(args.img_size, args.channel_mults)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return model


def check_step_fits(model, args, device):
    """Refuse, before any work, a batch whose training step needs more memory than the machine has left.

    Left to find out, the CPU run would be killed by the kernel part-way through the first step (no error,
    no line), or die in an allocation traceback. Under torchrun the processes on the CPU share this machine's
    memory, so it is the whole batch that must fit; on GPUs each process has its own, for its share.
    """
    world_size = rank_and_world_size()[1]
    batch = args.batch_size if device.type == "cpu" else -(-args.batch_size // world_size)
    needed, have = step_activation_bytes(model, batch, args.img_size), available_memory(device)
    if have is not None and needed > have:
        raise UserError(f"a training step of --batch_size {args.batch_size} at {args.img_size} px keeps about "
                        f"{needed / 2**30:.1f} GiB for its backward pass, and the {device.type} has "
                        f"{have / 2**30:.1f} GiB available: try a smaller --batch_size or --img_size")


def make_trainer(args, model, data, dataset, device, snapshot):
    """A Trainer for a new run, or one that continues the run in ``snapshot``."""
    rank = rank_and_world_size()[0]
    # each process draws its own t and eps; a single process draws from --seed itself
    generator = torch.Generator(device=device).manual_seed(rank_seed(args.seed, rank))
    try:
        trainer = Trainer(model, dataset, NoiseSchedule(max_noise=args.max_noise), args.train_steps, args.lr,
                          batch_size=args.batch_size, generator=generator, ema_decay=args.ema_decay,
                          data_seed=args.seed, labels=data.labels, label_dropout=args.label_dropout or 0.0,
                          precision=args.precision, snr_gamma=args.snr_gamma, t_density=args.t_density)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if snapshot is not None:
        continue_from(trainer, snapshot, args.resume)
        say(f"resuming {args.resume} at step {trainer.step} of {args.train_steps}")
    return trainer


def train_until_done_or_stopped(trainer, args, record, snapshot_path):
    """Run the trainer with periodic snapshots. After Ctrl-C, save a snapshot and exit 130 (stop_with_a_snapshot).

    The Ctrl-C handler stays in place until that snapshot is saved. Under torchrun every process gets its own
    Ctrl-C, and all stop at the first step after any of them saw one, so a process may get its signal late,
    while the processes gather their random states for the snapshot: it must not kill that process then.
    """
    try:
        with stop_on_sigint(trainer):
            say(f"training {args.train_steps - trainer.step} steps on {record.data.name}, on {record.device}"
                + (f" in {trainer.world_size} processes" if trainer.world_size > 1 else "")
                + f"; the model will go to {args.model_save_path}; Ctrl-C saves a snapshot to {snapshot_path}",
                flush=True)
            finished = trainer.run(save_every=args.save_every,
                                   on_save=lambda t: record.save(snapshot_path, t, resumable=True),
                                   eval_every=args.eval_every, on_eval=record.evaluate)
            if not finished:
                stop_with_a_snapshot(trainer, args, record, snapshot_path)
    except NonFiniteLoss as exc:
        raise UserError(f"{exc}: training diverged (try a lower --lr, such as {args.lr / 10:g}); "
                        "nothing was saved, earlier checkpoints are untouched") from None


def main():
    # glibc keeps freed activations for reuse: 7.7% faster steps at 256 px (benchmarks/ablations.json)
    keep_freed_memory()
    args, typed = parse_args()
    check_flags(args, typed)
    device = join_processes(pick_device(args.device))
    model, snapshot = open_snapshot(args, typed, device) if args.resume else (None, None)
    check_precision(args.precision, device, warn)  # the resumed run's precision, if it is one
    chosen_path = args.model_save_path is not None  # typed, or the resumed run's
    paths, data = outputs_and_data(args)
    model = model or new_model(args, data.classes)
    check_step_fits(model, args, device)
    dataset = read_data(args, data, snapshot, chosen_path)
    record = RunRecord(args, device, data, dataset, earlier=snapshot["train"] if snapshot else None)
    # channels_last lets the CPU and GPU convolution kernels skip layout shuffles
    model = model.to(device, memory_format=torch.channels_last)
    trainer = make_trainer(args, model, data, dataset, device, snapshot)
    train_until_done_or_stopped(trainer, args, record, paths["snapshot"])
    record.save(args.model_save_path, trainer, resumable=False)
    if is_main_process():
        finish(args, trainer, record, paths)


def outputs_and_data(args):
    """Where the run writes, and what it learns (listed, so that no output may overwrite one; its classes found),
    all checked before any work: (paths, TrainingData or DigitsData)."""
    source = args.image_dir or args.image_path or ("digits" if args.digits == "S1" else f"digits_{args.digits}")
    args.model_save_path = args.model_save_path or default_save_path(source, args.class_conditional)
    paths = companion_paths(args.model_save_path)
    if args.digits is not None:
        data = DigitsData(args.digits, args.num_images, class_conditional=args.class_conditional)
    else:
        images = choose_images(args.image_dir, args.num_images) if args.image_dir is not None else [args.image_path]
        data = TrainingData(images, args.img_size, image_dir=args.image_dir, class_conditional=args.class_conditional)
    for name, path in {"--model_save_path": args.model_save_path, **paths}.items():
        check_writable(path, name, inputs=data.paths)
    return paths, data


def read_data(args, data, snapshot, chosen_path):
    """Decode the images to learn (finding any unreadable one), then check them against the resumed run and,
    unless the save path was ``chosen_path``, against a model already at the default one. Returns the Dataset."""
    dataset = data.dataset(warn=warn)
    if snapshot is not None:
        restore = "the image" if args.image_path is not None else "them"
        check_same_data(snapshot["data"], data, resumed=True, fix=f"restore {restore}, or start a new run")
    if not chosen_path:
        keep_another_models(args.model_save_path, data, args)
    return dataset


def stop_with_a_snapshot(trainer, args, record, snapshot_path):
    """After Ctrl-C: save where the run stands (every process takes part), say how to go on, exit 130."""
    if trainer.step == 0:
        say("stopped before the first step; nothing to save", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    record.save(snapshot_path, trainer, resumable=True)
    say(f"stopped at step {trainer.step} of {args.train_steps}; saved {snapshot_path}\n"
        f"continue with: {' '.join(launcher(SCRIPT))} --resume {snapshot_path}", file=sys.stderr)
    wait_for_everyone()  # no process leaves before process 0 has written the snapshot
    sys.exit(EXIT_INTERRUPTED)


def finish(args, trainer, record, paths):
    """Process 0, after the last step: drop the snapshot, write the plots and record, print the summary."""
    if os.path.exists(paths["snapshot"]):
        os.remove(paths["snapshot"])  # the run is finished: nothing is left to resume
    reports = record.write_reports(trainer, paths)
    print(f"trained {args.train_steps} steps in {record.elapsed():.1f} s on {record.device}; "
          f"final loss {trainer.final_loss():.6f} (mean of the last {min(trainer.step, 100)} steps)")
    if record.quality["psnr_db"]:
        reached = "; ".join(f"{db:g} dB at step {step} ({sec:.0f} s)" for db, step, sec in record.milestones())
        print(f"PSNR of one-step denoising at t={EVAL_T}: {record.quality['psnr_db'][-1]:.2f} dB at the end"
              + (f"; first reached {reached}" if reached else ""))
    print(f"saved {os.path.abspath(args.model_save_path)}, with its plots and run record "
          f"({', '.join(os.path.basename(path) for path in reports)})")


if __name__ == "__main__":
    run(main, memory_hint="try a smaller --batch_size or --img_size (or a narrower network: --base_channels)")
