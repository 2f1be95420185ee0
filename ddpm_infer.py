"""Noise the image, denoise it with the trained U-Net, and show the three side by side.

    python ddpm_infer.py                       # the shipped model and image, t = 500 (w = 0.40)
    python ddpm_infer.py --t 800 --output_path denoised.png

Everything about the network comes from the checkpoint. The figure has three
panels: Ground Truth / Noisy Input / Inference Output, with PSNR in the titles.
"""

import sys

import torch

from models.checkpoint import load_checkpoint
from models.cli import MAX_SEED, ArgumentParser, add_device_argument, int_in_range, pick_device, run
from models.diffusion import NUM_TIMESTEPS, denoise_one_step
from models.errors import UserError
from models.files import check_writable
from models.imaging import load_image, save_image, save_triptych
from models.metrics import psnr


def parse_args(argv=None):
    parser = ArgumentParser(description="Denoise the image with a trained U-Net and draw the result.")
    parser.add_argument("--img_size", type=int_in_range(1, 2048), default=None,
                        help="side of the square image, px (default: the size the model was trained at)")
    parser.add_argument("--image_path", default="images/demo.png", help="the ground-truth image")
    parser.add_argument("--model_path", default="model_ckpt/demo_unet.pth", help="checkpoint written by ddpm_train.py")
    parser.add_argument("--result_path", default="images/inference_result.png", help="where to write the figure")
    parser.add_argument("--output_path", default=None,
                        help="also save the denoised image alone as a PNG here (default: not saved)")
    parser.add_argument("--t", type=int_in_range(0, NUM_TIMESTEPS), default=500,
                        help=f"noise level as a timestep 0..{NUM_TIMESTEPS}; w = max_noise * t / {NUM_TIMESTEPS}")
    parser.add_argument("--seed", type=int_in_range(0, MAX_SEED), default=0, help="seed for the noise eps")
    add_device_argument(parser)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    device = pick_device(args.device)
    model, schedule, checkpoint = load_checkpoint(args.model_path, device)
    img_size = resolve_img_size(args.img_size, checkpoint["data"]["img_size"])
    check_outputs(args)
    x0 = load_image(args.image_path, img_size, warn=lambda m: print(f"warning: {m}", file=sys.stderr))

    t = torch.tensor([args.t])
    x_t = schedule.add_noise(x0, t, noise_like(x0, args.seed))  # (1, 3, H, W)
    x0_hat = denoise_one_step(model, x_t.to(device), t.to(device)).cpu()

    report(args, schedule.w(t).item(), x0, x_t, x0_hat, f"img_size={img_size}  device={device}")


def noise_like(x0, seed):
    """eps ~ N(0, I), drawn on the CPU so that every device sees the same noisy input."""
    return torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))


def check_outputs(args):
    """Refuse output paths that cannot be written or would overwrite an input, before any work."""
    inputs = [args.image_path, args.model_path]
    check_writable(args.result_path, "--result_path", inputs)
    if args.output_path is not None:
        check_writable(args.output_path, "--output_path", inputs)


def report(args, w, x0, x_t, x0_hat, setting):
    """Measure PSNR, draw the triptych, save the requested files, print a short summary."""
    noisy_shown = x_t.clamp(-1, 1)  # what a screen can show, and what PSNR is measured on
    psnr_noisy, psnr_out = psnr(noisy_shown, x0), psnr(x0_hat, x0)
    save_triptych(
        [
            (f"Ground Truth\n{x0.shape[-1]}x{x0.shape[-2]} px", x0),
            (f"Noisy Input (t={args.t}, w={w:.2f})\nPSNR {psnr_noisy:.2f} dB", noisy_shown),
            (f"Inference Output (1 step)\nPSNR {psnr_out:.2f} dB", x0_hat),
        ],
        args.result_path,
    )
    if args.output_path is not None:
        save_image(x0_hat, args.output_path)
    print(f"t={args.t}  w={w:.2f}  {setting}")
    print(f"PSNR noisy input:      {psnr_noisy:6.2f} dB")
    print(f"PSNR inference output: {psnr_out:6.2f} dB")
    print(f"saved {args.result_path}" + (f" and {args.output_path}" if args.output_path else ""))


def resolve_img_size(requested, trained):
    """The size to run at: the trained one, unless --img_size asks for it explicitly."""
    if requested is not None and requested != trained:
        raise UserError(
            f"--img_size {requested} disagrees with the checkpoint, which was trained at {trained} "
            f"(leave --img_size out, or pass {trained})"
        )
    return trained


if __name__ == "__main__":
    run(main)
