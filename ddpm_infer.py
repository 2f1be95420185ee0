"""Noise the image, denoise it with the trained U-Net, and show the three side by side.

    python ddpm_infer.py                       # the shipped model and image, t = 500 (w = 0.40)
    python ddpm_infer.py --model_path model_ckpt/my_photo_unet.pth   # your own model, on its own picture:
                                               # its figure goes to runs/my_photo_unet/inference_result.png
    python ddpm_infer.py --steps 10            # denoise in 10 steps; also draws the trajectory: the shipped
                                               # model's figures at settings other than the README's go to
                                               # runs/demo_unet/
    python ddpm_infer.py --sweep               # also sweep the noise level from w = 0 to 1
    python ddpm_infer.py --model_path model_ckpt/demo_unet_full_noise.pth --t 1000 --steps 50
    python ddpm_infer.py --model_path model_ckpt/demo_unet_full_noise.pth --t 1000 --steps 50 --eta 1
                                               # DDPM's ancestral sampling: fresh noise at every step

Everything about the network comes from the checkpoint, and so does the
picture: without --image_path it is the one the model was trained on (the
checkpoint records its path and SHA-256). The figure has three panels:
Ground Truth / Noisy Input / Inference Output, with PSNR and SSIM.
"""

import os

import torch

from ddpm.checkpoint import load_checkpoint
from ddpm.cli import (MAX_SEED, ArgumentParser, add_device_argument, int_in_range, model_folder, pick_device,
                      route_outputs, run, settings_of, warn, zero_to_one)
from ddpm.data import recorded_training_data
from ddpm.diffusion import NUM_TIMESTEPS, denoise, noise_stream, timestep_grid
from ddpm.errors import UserError
from ddpm.figures import save_sweep, save_trajectory, save_trajectory_gif, save_triptych
from ddpm.files import check_writable, file_sha256, same_place
from ddpm.imaging import load_image, save_image
from ddpm.metrics import psnr, ssim
from ddpm.precision import add_precision_argument, autocast, check_precision

SHIPPED_MODEL = "model_ckpt/demo_unet.pth"
# the shipped model's figures, each with the settings of the README command that draws it; another model's
# figures, or the shipped model's at other settings, go to runs/<checkpoint name>/, under the same names
SHIPPED_FIGURES = {"result_path": "images/inference_result.png", "trajectory_path": "images/denoise_trajectory.png",
                   "sweep_path": "images/noise_sweep.png"}
SHIPPED_SETTINGS = {"result_path": [], "trajectory_path": ["--t", "1000", "--steps", "10"], "sweep_path": ["--sweep"]}
# flags that choose where the figures go, or which are drawn, but change none of them
WHERE_AND_WHICH = ("result_path", "output_path", "trajectory_path", "gif", "sweep", "sweep_path")
SWEEP_WEIGHTS = [i / 10 for i in range(11)]  # w = 0, 0.1, ..., 1
SWEEP_STEPS = 10  # the sweep's multi-step curve, unless --steps says otherwise


def parse_args(argv=None):
    parser = ArgumentParser(description="Denoise the image with a trained U-Net and draw the result.")
    parser.add_argument("--img_size", type=int_in_range(1, 2048), default=None,
                        help="side of the square image, px (default: the size the model was trained at)")
    parser.add_argument("--image_path", default=None,
                        help="the ground-truth image (default: the one the model was trained on, as its "
                             "checkpoint records it)")
    parser.add_argument("--model_path", default=SHIPPED_MODEL, help="checkpoint written by ddpm_train.py")
    parser.add_argument("--result_path", default=None,
                        help=f"where to write the figure (default: {SHIPPED_FIGURES['result_path']} for the shipped "
                             "model at the default settings, runs/<checkpoint name>/inference_result.png "
                             "otherwise)")
    parser.add_argument("--output_path", default=None,
                        help="also save the denoised image alone as a PNG here (default: not saved)")
    parser.add_argument("--t", type=int_in_range(0, NUM_TIMESTEPS), default=500,
                        help=f"noise level as a timestep 0..{NUM_TIMESTEPS}; w = max_noise * t / {NUM_TIMESTEPS}")
    parser.add_argument("--steps", type=int_in_range(1, NUM_TIMESTEPS), default=None,
                        help="denoising steps from t down to 0, at most t (default: 1, the original one-step "
                             f"denoising; the sweep's multi-step curve uses {SWEEP_STEPS})")
    parser.add_argument("--trajectory_path", default=None,
                        help="where the trajectory figure goes when --steps is above 1 (default: "
                             f"{SHIPPED_FIGURES['trajectory_path']} for the shipped model with --t 1000 --steps 10, "
                             "runs/<checkpoint name>/ otherwise)")
    parser.add_argument("--gif", default=None, metavar="PATH",
                        help="also save the trajectory as an animated GIF here (default: not saved)")
    parser.add_argument("--sweep", action="store_true",
                        help="also denoise at every noise level w = 0, 0.1, ..., 1 and plot PSNR against w")
    parser.add_argument("--sweep_path", default=None,
                        help=f"where the sweep figure goes (default: {SHIPPED_FIGURES['sweep_path']} for the shipped "
                             "model at the default settings, runs/<checkpoint name>/ otherwise)")
    parser.add_argument("--eta", type=zero_to_one, default=0.0,
                        help="fresh noise per step: 0 is the deterministic DDIM step, 1 is DDPM's ancestral "
                             "sampling (ddpm/diffusion.py, ddim_step)")
    parser.add_argument("--seed", type=int_in_range(0, MAX_SEED), default=0,
                        help="seed for the noise eps, and for the fresh noise of --eta above 0")
    add_device_argument(parser)
    add_precision_argument(parser)
    args = parser.parse_args(argv)
    for name, path in SHIPPED_FIGURES.items():  # each shipped figure is redrawn only by the command that drew it
        shipped_run = (same_place(args.model_path, SHIPPED_MODEL)
                       and settings_of(parser, args, SHIPPED_SETTINGS[name], ignore=("model_path", *WHERE_AND_WHICH)))
        route_outputs(args, {name: path}, shipped_run, model_folder(args.model_path))
    return args


def main():
    args = parse_args()
    device = pick_device(args.device)
    check_precision(args.precision, device, warn)
    model, schedule, checkpoint = load_checkpoint(args.model_path, device)
    img_size = resolve_img_size(args.img_size, checkpoint["data"]["img_size"])
    args.image_path = resolve_image_path(args.image_path, checkpoint["data"])
    steps = args.steps or 1
    check_steps(args.t, steps)
    check_outputs(args, steps)
    x0 = load_image(args.image_path, img_size, warn=warn)
    noise = noise_stream(args.seed)  # eps first, then the sampler's fresh noise (with --eta above 0)
    eps = torch.randn(x0.shape, generator=noise)

    x_t = schedule.add_noise(x0, torch.tensor([args.t]), eps)  # (1, 3, H, W)
    trajectory = []
    with autocast(args.precision, device):
        x0_hat = denoise(model, x_t.to(device), args.t, schedule, steps, trajectory, eta=args.eta,
                         generator=noise).cpu()
    report(args, steps, schedule.w(args.t), x0, x_t, x0_hat,
           (f"eta={args.eta:g}  " if args.eta else "") + f"img_size={img_size}  device={device}"
           + (f"  precision={args.precision}" if args.precision != "fp32" else ""))
    if steps > 1:
        save_trajectory(trajectory, args.trajectory_path)
        print(f"saved {args.trajectory_path}")
    if args.gif:
        save_trajectory_gif(trajectory, args.gif)
        print(f"saved {args.gif}")
    if args.sweep:
        with autocast(args.precision, device):
            sweep(model, schedule, x0, eps, device, args.steps or SWEEP_STEPS, args.sweep_path, args.eta, noise)


def resolve_img_size(requested, trained):
    """The size to run at: the trained one, unless --img_size asks for it explicitly."""
    if requested is not None and requested != trained:
        raise UserError(
            f"--img_size {requested} disagrees with the checkpoint, which was trained at {trained} "
            f"(leave --img_size out, or pass {trained})"
        )
    return trained


def resolve_image_path(requested, trained_on):
    """The picture to noise and compare with: --image_path, or else the one the model was trained on.

    ``trained_on`` is the checkpoint's "data": the training image's path and SHA-256. A model has
    memorised its own picture; shown another one, it pulls the output towards its own (a warning).
    """
    if requested is not None:
        sha256 = trained_on.get("image_sha256")  # None for a folder's model
        if sha256 and os.path.isfile(requested) and file_sha256(requested) != sha256:
            warn(f"this model was trained on {trained_on['image_path']!r}, not on {requested!r}: it memorised "
                 "that picture and will pull the output towards it")
        return requested
    if "image_dir" in trained_on or "digits" in trained_on:
        what = (f"a folder ({trained_on.get('num_images')} images of {trained_on['image_dir']})"
                if "image_dir" in trained_on else f"{trained_on.get('num_images')} digits of {trained_on['digits']}")
        raise UserError(f"this model learned {what}, not one picture: pass the picture to noise with --image_path, "
                        "or generate with ddpm_sample.py")
    return recorded_training_data(trained_on, fix="restore it, or pass the picture with --image_path").paths[0]


def check_steps(t, steps):
    try:
        timestep_grid(t, steps)
    except ValueError:
        raise UserError(f"--steps {steps} is more than --t {t} allows: choose 1 to {max(t, 1)} steps") from None


def check_outputs(args, steps):
    """Refuse output paths that cannot be written or would overwrite an input, before any work."""
    inputs = [args.image_path, args.model_path]
    outputs = {"--result_path": args.result_path, "--output_path": args.output_path, "--gif": args.gif,
               "--trajectory_path": args.trajectory_path if steps > 1 else None,
               "--sweep_path": args.sweep_path if args.sweep else None}
    for flag, path in outputs.items():
        if path is not None:
            check_writable(path, flag, inputs)


def report(args, steps, w, x0, x_t, x0_hat, setting):
    """Measure PSNR and SSIM, draw the triptych, save the requested files, print a short summary."""
    noisy_shown = x_t.clamp(-1, 1)  # what a screen can show, and what the metrics measure
    noisy, out = (psnr(noisy_shown, x0), ssim(noisy_shown, x0)), (psnr(x0_hat, x0), ssim(x0_hat, x0))
    save_triptych(
        [
            (f"Ground Truth\n{x0.shape[-1]}x{x0.shape[-2]} px", x0),
            (f"Noisy Input (t={args.t}, w={w:.2f})\nPSNR {noisy[0]:.2f} dB, SSIM {noisy[1]:.3f}", noisy_shown),
            (f"Inference Output ({steps} step{'s' if steps > 1 else ''})\n"
             f"PSNR {out[0]:.2f} dB, SSIM {out[1]:.3f}", x0_hat),
        ],
        args.result_path,
    )
    if args.output_path is not None:
        save_image(x0_hat, args.output_path)
    print(f"t={args.t}  w={w:.2f}  steps={steps}  {setting}")
    print(f"PSNR noisy input:      {noisy[0]:6.2f} dB   SSIM {noisy[1]:.4f}")
    print(f"PSNR inference output: {out[0]:6.2f} dB   SSIM {out[1]:.4f}")
    print(f"saved {args.result_path}" + (f" and {args.output_path}" if args.output_path else ""))


def sweep(model, schedule, x0, eps, device, steps, path, eta=0.0, noise=None):
    """Denoise the same noise at w = 0, 0.1, ..., 1; draw the columns and PSNR against w; print the table.

    The model's timestep for a weight w is t = w * T / max_noise (schedule.timestep_for).
    Past max_noise that is above T: a noise level the model never saw in training.
    """
    columns, rows = [], []
    for target_w in SWEEP_WEIGHTS:
        t = schedule.timestep_for(target_w)
        w = schedule.w(t)
        x_t = schedule.add_noise(x0, torch.tensor([t]), eps)
        one = denoise(model, x_t.to(device), t, schedule, 1).cpu()  # one step: eta plays no part
        many = denoise(model, x_t.to(device), t, schedule, min(steps, max(t, 1)), eta=eta, generator=noise).cpu()
        noisy_shown = x_t.clamp(-1, 1)
        rows.append((w, t, *[f(img, x0) for img in (noisy_shown, one, many) for f in (psnr, ssim)]))
        columns.append((f"w={w:.1f}\nt={t}" + (" (unseen)" if t > schedule.num_timesteps else ""),
                        noisy_shown, one))
    ws = [row[0] for row in rows]
    curves = {"noisy input": (ws, [row[2] for row in rows]), "1-step output": (ws, [row[4] for row in rows]),
              f"{steps}-step output": (ws, [row[6] for row in rows])}
    save_sweep(columns, curves, schedule.max_noise, path)

    print(f"\nnoise sweep (max_noise = {schedule.max_noise:g}; t above {schedule.num_timesteps} was never trained on)")
    print(f"{'w':>5} {'t':>5}   {'PSNR noisy':>10} {'1-step':>7} {f'{steps}-step':>8}   "
          f"{'SSIM noisy':>10} {'1-step':>7} {f'{steps}-step':>8}")
    for w, t, p_noisy, s_noisy, p_one, s_one, p_many, s_many in rows:
        print(f"{w:5.2f} {t:5d}   {p_noisy:10.2f} {p_one:7.2f} {p_many:8.2f}   "
              f"{s_noisy:10.4f} {s_one:7.4f} {s_many:8.4f}")
    print(f"saved {path}")


if __name__ == "__main__":
    run(main)
