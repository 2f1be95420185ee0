"""Train the U-Net to denoise ONE image, and save a self-describing checkpoint.

    python ddpm_train.py                      # the shipped model: 256 px, 3000 steps
    python ddpm_train.py --img_size 64 --train_steps 500 --model_save_path model_ckpt/small.pth

Each step noises the image as x_t = (1 - w) * x0 + w * eps at a random t and
teaches the network to return x0 (models/diffusion.py has the formulas,
models/training.py the loop).
"""

import os
import platform
import sys
import time

import torch

from models.checkpoint import save_checkpoint
from models.cli import (ArgumentParser, add_device_argument, int_list, non_negative_int, pick_device,
                        positive_float, positive_int, run)
from models.diffusion import NoiseSchedule
from models.errors import UserError
from models.files import check_writable, file_sha256
from models.imaging import load_image
from models.training import train
from models.unet_model import UNet, check_image_size


def parse_args(argv=None):
    parser = ArgumentParser(description="Train the time-embedded U-Net to denoise one image.")
    parser.add_argument("--img_size", type=positive_int, default=256, help="side of the square training image, px")
    parser.add_argument("--batch_size", type=positive_int, default=1,
                        help="noisy copies of the image per step, each at its own t")
    parser.add_argument("--train_steps", type=positive_int, default=3000, help="optimizer steps")
    parser.add_argument("--lr", type=positive_float, default=1e-3,
                        help="peak learning rate (warm-up, then cosine decay to 0)")
    parser.add_argument("--image_path", default="images/demo.png", help="the image to learn")
    parser.add_argument("--model_save_path", default="model_ckpt/demo_unet.pth", help="where to write the checkpoint")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed for the weights, t and noise")
    parser.add_argument("--base_channels", type=positive_int, default=16,
                        help="U-Net width at full resolution (a multiple of 8)")
    parser.add_argument("--channel_mults", type=int_list, default=[1, 2, 4, 8],
                        help="width of each U-Net level as a multiple of base_channels; one level per entry")
    add_device_argument(parser)
    return parser.parse_args(argv)


def build_model(args):
    """Check the settings against each other and build the network, or raise UserError."""
    try:
        model = UNet(in_channels=3, base_channels=args.base_channels, channel_mults=args.channel_mults)
        check_image_size(args.img_size, args.channel_mults)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return model


def run_record(args, losses, wall_time, device):
    """What the checkpoint remembers about how it was made."""
    return {
        "args": vars(args), "step": args.train_steps, "loss_history": losses,
        "wall_time_s": wall_time, "device": str(device),
        "torch_version": str(torch.__version__), "python_version": platform.python_version(),
    }


def main():
    args = parse_args()
    device = pick_device(args.device)
    torch.manual_seed(args.seed)  # the initial weights
    model = build_model(args)
    check_writable(args.model_save_path, "--model_save_path", inputs=[args.image_path])
    x0 = load_image(args.image_path, args.img_size, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    image_sha256 = file_sha256(args.image_path)

    # channels_last lets the CPU and GPU convolution kernels skip layout shuffles
    model = model.to(device, memory_format=torch.channels_last)
    schedule = NoiseSchedule()
    generator = torch.Generator(device=device).manual_seed(args.seed)  # every t and eps

    start = time.perf_counter()
    losses = train(model, x0.to(device), schedule, args.train_steps, args.lr,
                   batch_size=args.batch_size, generator=generator)
    wall_time = time.perf_counter() - start

    save_checkpoint(
        args.model_save_path, model, schedule,
        data={"img_size": args.img_size, "image_path": args.image_path, "image_sha256": image_sha256},
        train_info=run_record(args, losses, wall_time, device),
    )
    final_loss = sum(losses[-100:]) / len(losses[-100:])
    print(f"trained {args.train_steps} steps in {wall_time:.1f} s on {device}; "
          f"final loss {final_loss:.6f} (mean of the last {len(losses[-100:])} steps)")
    print(f"saved {os.path.abspath(args.model_save_path)}")


if __name__ == "__main__":
    run(main)
