"""Generate new images from pure noise with a trained model, and ask of each: is it a copy?

    python ddpm_sample.py                                   # the shipped one-image full-noise model
    python ddpm_sample.py --model_path model_ckpt/my_photos_unet.pth --num_samples 16 --steps 50
    python ddpm_sample.py --model_path model_ckpt/my_photos_unet.pth --eta 1 --seed 3

Each sample starts as pure noise x_T = eps (w = 1) and is denoised in --steps
steps (models/diffusion.py, generate). The script writes, into --output_dir,

    sample_000.png, sample_001.png, ...   the samples, at the trained size
    grid.png                              all of them in one picture
    nearest.png                           each sample beside its nearest training image, with d1/d2
    samples.json                          per sample: nearest training file, d1, d2, d1/d2, memorised

The last two need the training images, which the checkpoint names (with their
SHA-256): where they are not at hand, or have changed, they are skipped.
d1 and d2 are the L2 distances (pixels in [0, 1]) to the nearest and the
second-nearest training image; a sample with d1/d2 < 1/3 counts as memorised
(models/metrics.py, nearest_training_images).
"""

import json
import os


from models.checkpoint import load_checkpoint
from models.cli import (MAX_SEED, ArgumentParser, add_device_argument, int_in_range, pick_device, run, warn,
                        zero_to_one)
from models.data import ImageFiles, dataset_digest
from models.diffusion import NUM_TIMESTEPS, generate
from models.errors import UserError
from models.figures import save_image_grid, save_nearest_pairs
from models.files import atomic_write, check_writable, file_sha256
from models.imaging import save_image
from models.metrics import MEMORIZED_RATIO, nearest_training_images

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


def training_images(data):
    """The images the model was trained on, as a Dataset, if they are at hand and unchanged; else None.

    ``data`` is the checkpoint's record: a folder's files and their digest, or one image and its SHA-256.
    Returns (dataset, names) or None, having said why.
    """
    if "image_dir" in data:
        folders = [data["image_dir"], data.get("image_dir_absolute")]
        folder = next((f for f in folders if f and os.path.isdir(f)), None)
        if folder is None:
            warn(f"the training images ({data['image_dir']}) are not here: no nearest-neighbour comparison")
            return None
        paths = [os.path.join(folder, name) for name in data["files"]]
        if not all(os.path.isfile(path) for path in paths) or dataset_digest(folder, paths) != data["dataset_sha256"]:
            warn(f"the images in {folder!r} have changed since training: no nearest-neighbour comparison")
            return None
        names = list(data["files"])
    else:
        path = data.get("image_path")
        if not path or not os.path.isfile(path) or file_sha256(path) != data.get("image_sha256"):
            warn(f"the training image ({path}) is not here, or has changed: no nearest-neighbour comparison")
            return None
        paths, names = [path], [path]
    try:
        return ImageFiles(paths, data["img_size"]), names
    except UserError as exc:
        warn(f"{exc}: no nearest-neighbour comparison")
        return None


def main():
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
    with atomic_write(os.path.join(output_dir, "samples.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    print(f"saved {output_dir}/samples.json")


if __name__ == "__main__":
    run(main)
