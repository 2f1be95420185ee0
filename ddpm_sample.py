"""Generate new images from pure noise with a trained model, and ask of each: is it a copy?

    python ddpm_sample.py                                   # the shipped one-image full-noise model
    python ddpm_sample.py --model_path model_ckpt/my_photos_unet.pth --num_samples 16 --steps 50
    python ddpm_sample.py --model_path model_ckpt/my_photos_unet.pth --eta 1 --seed 3

Each sample starts as pure noise x_T = eps (w = 1) and is denoised in --steps
steps (ddpm/diffusion.py, generate). The script writes, into --output_dir,

    sample_000.png, sample_001.png, ...   the samples, at the trained size
    grid.png                              all of them in one picture
    nearest.png                           each sample beside its nearest training image, with d1/d2
    samples.json                          per sample: nearest training file, d1, d2, d1/d2, memorised

The last two need the training images, which the checkpoint names (with their
SHA-256): where they are not at hand, or have changed, they are skipped.
d1 and d2 are the L2 distances (pixels in [0, 1]) to the nearest and the
second-nearest training image; a sample with d1/d2 < 1/3 counts as memorised
(ddpm/metrics.py, nearest_training_images).
"""

import os

from ddpm.checkpoint import load_checkpoint
from ddpm.cli import (MAX_SEED, ArgumentParser, add_device_argument, int_in_range, keep_freed_memory, pick_device,
                      run, warn, zero_to_one)
from ddpm.data import recorded_training_data
from ddpm.diffusion import NUM_TIMESTEPS, generate
from ddpm.errors import UserError
from ddpm.figures import save_image_grid, save_nearest_pairs
from ddpm.files import check_writable, write_json
from ddpm.imaging import save_image
from ddpm.metrics import MEMORIZED_RATIO, nearest_training_images

MAX_PAIRS_SHOWN = 16  # nearest.png shows the first 16 samples


def parse_args(argv=None):
    parser = ArgumentParser(description="Generate new images from pure noise with a trained model, and measure "
                                        "how close each lies to the training images.")
    parser.add_argument("--model_path", default="model_ckpt/demo_unet_full_noise.pth",
                        help="checkpoint written by ddpm_train.py with --max_noise 1 or --image_dir")
    parser.add_argument("--num_samples", type=int_in_range(1, 4096), default=16, help="how many images to generate")
    parser.add_argument("--steps", type=int_in_range(1, NUM_TIMESTEPS), default=50,
                        help=f"denoising steps from pure noise (t = {NUM_TIMESTEPS}) down to 0")
    parser.add_argument("--eta", type=zero_to_one, default=0.0,
                        help="fresh noise per step: 0 is the deterministic DDIM step, 1 is DDPM's ancestral sampling")
    parser.add_argument("--seed", type=int_in_range(0, MAX_SEED), default=0,
                        help="seed for the starting noise (and the fresh noise of --eta above 0)")
    parser.add_argument("--output_dir", default=None,
                        help="folder for the samples and figures (default: samples/<checkpoint name>)")
    add_device_argument(parser)
    return parser.parse_args(argv)


def training_images(trained_on):
    """The images the model was trained on, if they are at hand and unchanged: (Dataset, names), else None.

    ``trained_on`` is the checkpoint's record: a folder's files and their digest, or one image and its
    SHA-256. Where the images cannot be used, a warning says why.
    """
    try:
        data = recorded_training_data(trained_on)
        return data.dataset(), data.names
    except UserError as exc:
        warn(f"{exc}: no nearest-neighbour comparison")
        return None


def main():
    # glibc keeps freed activations for reuse: the run is 22% faster (benchmarks/process_tuning.json)
    keep_freed_memory()
    args = parse_args()
    device = pick_device(args.device)
    model, schedule, checkpoint = load_checkpoint(args.model_path, device)  # the EMA weights, if kept
    size = checkpoint["data"]["img_size"]
    if schedule.max_noise < 1:
        raise UserError(f"{args.model_path!r} was trained with max_noise {schedule.max_noise:g}: it denoises, but "
                        "never saw pure noise, so it cannot generate (use ddpm_infer.py, or train with "
                        "--max_noise 1 or --image_dir)")
    output_dir = args.output_dir or os.path.join("samples", os.path.splitext(os.path.basename(args.model_path))[0])
    names = [f"sample_{i:03d}.png" for i in range(args.num_samples)] + ["grid.png", "nearest.png", "samples.json"]
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir!r} is a file, not a folder")
    for name in names:
        check_writable(os.path.join(output_dir, name), "--output_dir", inputs=[args.model_path])

    samples = generate(model, schedule, (args.num_samples, 3, size, size), args.steps, args.eta, args.seed,
                       device).cpu()
    for i, sample in enumerate(samples):
        save_image(sample, os.path.join(output_dir, names[i]))
    save_image_grid(samples, os.path.join(output_dir, "grid.png"))
    print(f"{args.num_samples} samples of {size}x{size} px from pure noise in {args.steps} steps"
          + (f" (eta={args.eta:g})" if args.eta else "") + f", seed {args.seed}, on {device}")
    print(f"saved {output_dir}/sample_000.png ... {names[args.num_samples - 1]} and grid.png")

    summary = {"model_path": args.model_path, "num_samples": args.num_samples, "steps": args.steps,
               "eta": args.eta, "seed": args.seed, "img_size": size,
               "samples": [{"file": name} for name in names[: args.num_samples]]}
    training = training_images(checkpoint["data"])
    if training is not None:
        dataset, files = training
        nearest, d1, d2, ratio = nearest_training_images(samples, dataset)
        memorized = ratio < MEMORIZED_RATIO
        for entry, i, a, b, r, m in zip(summary["samples"], nearest.tolist(), d1.tolist(), d2.tolist(), ratio.tolist(),
                                        memorized.tolist()):
            entry.update({"nearest": files[i], "d1": a, "d2": b, "ratio": r, "memorized": m})
        fraction = float(memorized.float().mean())
        summary.update({"training_images": len(dataset), "memorized_threshold": MEMORIZED_RATIO,
                        "memorized_fraction": fraction})
        pairs = [(samples[i], dataset[int(nearest[i])],
                  f"d1/d2 = {ratio[i]:.2f}" + (" (copy)" if memorized[i] else ""))
                 for i in range(min(args.num_samples, MAX_PAIRS_SHOWN))]
        save_nearest_pairs(pairs, os.path.join(output_dir, "nearest.png"),
                           f"each sample (left) beside its nearest of the {len(dataset)} training image"
                           f"{'s' if len(dataset) > 1 else ''} (right); a copy has d1/d2 < 1/3")
        rule = ("training image than to any other" if len(dataset) > 1 else
                "training image than that image lies to a flat image of its own colour")
        print(f"memorised: {int(memorized.sum())} of {args.num_samples} ({100 * fraction:.0f}%) lie 3x closer to their "
              f"{rule} (d1/d2 < 1/3; median d1/d2 {ratio.median():.2f}); saved nearest.png")
    write_json(os.path.join(output_dir, "samples.json"), summary)
    print(f"saved {output_dir}/samples.json")


if __name__ == "__main__":
    run(main)
