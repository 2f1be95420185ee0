"""Generate new images from pure noise with a trained model, and ask of each: is it a copy?

    python ddpm_sample.py                                   # the shipped one-image full-noise model
    python ddpm_sample.py --model_path model_ckpt/my_photos_unet.pth --num_samples 16 --steps 50
    python ddpm_sample.py --model_path model_ckpt/my_photos_unet.pth --eta 1 --seed 3
    python ddpm_sample.py --model_path model_ckpt/digits_unet.pth --num_samples 1000   # judged digits
    python ddpm_sample.py --model_path model_ckpt/digits_cond_unet.pth --label 7 --guidance 2   # sevens

Each sample starts as pure noise x_T = eps (w = 1) and is denoised in --steps
steps (ddpm/diffusion.py, generate). The script writes, into --output_dir,

    sample_000.png, sample_001.png, ...   the samples, at the trained size
    grid.png                              the first 128 of them in one picture
    nearest.png                           each sample beside its nearest training image, with d1/d2
    samples.json                          per sample: nearest training file, d1, d2, d1/d2, memorised

The last two need the training images, which the checkpoint names (with their
SHA-256): where they are not at hand, or have changed, they are skipped.
--summary_only leaves out the one PNG per sample.

A model trained with --class_conditional draws the class --label names (a
name, or an index into the classes the checkpoint records), or every class
equally often without it, one column per class in grid.png. --guidance S mixes
its predictions with and without the class (ddpm/guidance.py):
x0_guided = x0_uncond + S * (x0_cond - x0_uncond); S = 0 ignores the class,
S = 1 is the plain conditional model, larger S follows the class more closely.

A model of the shipped digits (ddpm_train.py --digits) is also judged
(ddpm/quality.py): the FLD, precision and recall of its samples against the
1,000 held-out digits, beside the same numbers for as many real digits it
never saw (the other training half), the digits the judge sees, and how near
the samples lie to their nearest training digit compared with held-out digits.
d1 and d2 are the L2 distances (pixels in [0, 1]) to the nearest and the
second-nearest training image; a sample with d1/d2 < 1/3 counts as memorised
(ddpm/metrics.py, nearest_training_images).
"""

import os

import torch

from ddpm.checkpoint import load_checkpoint
from ddpm.cli import (MAX_SEED, ArgumentParser, add_device_argument, guidance_scale, int_in_range, keep_freed_memory,
                      pick_device, run, warn, zero_to_one)
from ddpm.data import DIGIT_SPLITS, DIGITS_LABELS, DIGITS_SHEET, digits, other_half, recorded_training_data
from ddpm.diffusion import NUM_TIMESTEPS, InBatches, generate
from ddpm.errors import UserError
from ddpm.figures import save_image_grid, save_nearest_pairs
from ddpm.files import check_outputs, staged_outputs, write_json
from ddpm.guidance import DEFAULT_GUIDANCE, Guided, balanced_labels
from ddpm.precision import add_precision_argument, autocast, check_precision
from ddpm.imaging import save_image
from ddpm.machine import describe
from ddpm.metrics import MEMORIZED_RATIO, nearest_training_images
from ddpm.quality import JUDGE_NAME, JUDGE_PATH, K_NEAREST, class_accuracy, digit_quality, load_judge

MAX_PAIRS_SHOWN = 16  # nearest.png shows the first 16 samples
MAX_GRID = 128  # grid.png shows at most the first 128, 16 to a row
BATCH_SIZE = 128  # images per forward pass of the network, by default


def parse_args(argv=None):
    parser = ArgumentParser(description="Generate new images from pure noise with a trained model, and measure "
                                        "how close each lies to the training images.")
    parser.add_argument("--model_path", default="model_ckpt/demo_unet_full_noise.pth",
                        help="checkpoint written by ddpm_train.py with --max_noise 1 or --image_dir")
    parser.add_argument("--num_samples", type=int_in_range(1, 4096), default=16, help="how many images to generate")
    parser.add_argument("--batch_size", type=int_in_range(1, 4096), default=BATCH_SIZE,
                        help="the most images the network runs on at once; smaller needs less memory, and "
                             "the samples stay the same up to float rounding (their noise is drawn for all together)")
    parser.add_argument("--steps", type=int_in_range(1, NUM_TIMESTEPS), default=50,
                        help=f"denoising steps from pure noise (t = {NUM_TIMESTEPS}) down to 0")
    parser.add_argument("--eta", type=zero_to_one, default=0.0,
                        help="fresh noise per step: 0 is the deterministic DDIM step, 1 is DDPM's ancestral sampling")
    parser.add_argument("--seed", type=int_in_range(0, MAX_SEED), default=0,
                        help="seed for the starting noise (and the fresh noise of --eta above 0)")
    parser.add_argument("--output_dir", default=None,
                        help="folder for the samples and figures (default: samples/<checkpoint name>)")
    parser.add_argument("--summary_only", action="store_true",
                        help="write grid.png, nearest.png and samples.json, but not one PNG per sample")
    classes = parser.add_argument_group("classes", "for a model trained with --class_conditional")
    classes.add_argument("--label", default=None,
                         help="the class to draw: its name or its index (default: every class equally often)")
    classes.add_argument("--guidance", type=guidance_scale, default=None,
                         help="classifier-free guidance scale S: x0_uncond + S * (x0_cond - x0_uncond); 0 ignores "
                              f"the class, 1 is plain conditional, above 1 follows it more closely "
                              f"(default: {DEFAULT_GUIDANCE:g})")
    add_device_argument(parser)
    add_precision_argument(parser)
    return parser.parse_args(argv)


def training_images(trained_on):
    """The images the model was trained on, if they are at hand and unchanged: (Dataset, names, TrainingData),
    else None.

    ``trained_on`` is the checkpoint's record: a folder's files and their digest, or one image and its
    SHA-256. Where the images cannot be used, a warning says why.
    """
    try:
        data = recorded_training_data(trained_on)
        return data.dataset(), data.names, data
    except UserError as exc:
        warn(f"{exc}: no nearest-neighbour comparison")
        return None


def check_output_dir(output_dir, names, model_path, training):
    """Refuse, before sampling, an --output_dir whose files would replace a file the run reads (the checkpoint,
    the judge, the digits, a training image), or that lies in the training folder: the samples would become
    training images of the next run there."""
    read = [model_path, JUDGE_PATH, DIGITS_SHEET, DIGITS_LABELS]
    if training is not None:
        data = training[2]
        read += data.paths
        folder = data.image_dir
        if folder is not None and _inside(output_dir, folder):
            raise UserError(f"--output_dir {output_dir!r} lies in the training folder {folder!r}: the samples "
                            "would join the training images (choose a folder outside it)")
    check_outputs([os.path.join(output_dir, name) for name in names], "--output_dir", inputs=read)


def _inside(path, folder):
    """Whether ``path`` (a folder, made yet or not) is ``folder`` or lies somewhere below it."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def requested_labels(args, model, classes):
    """The class of every sample (None for an unconditional model), from --label or every class in turn.

    --label and --guidance are refused, in one line, for a model without classes and for a class it does not know.
    """
    if model.null_class is None:
        if args.label is not None or args.guidance is not None:
            flag = "--label" if args.label is not None else "--guidance"
            raise UserError(f"{flag}: {args.model_path!r} learned no classes (it was trained without "
                            "--class_conditional), so it cannot be asked for one")
        return None
    if args.label is None:
        return balanced_labels(args.num_samples, len(classes))
    if args.label in classes:
        index = classes.index(args.label)
    elif args.label.isdigit() and int(args.label) < len(classes):
        index = int(args.label)
    else:
        raise UserError(f"--label {args.label!r} is not a class of {args.model_path!r}: it knows "
                        f"{', '.join(classes)} (a name, or an index 0 to {len(classes) - 1})")
    return torch.full((args.num_samples,), index, dtype=torch.long)


def judge_digits(classifier, samples, trained_on, training, d1, asked=None):
    """The quality of digit samples (ddpm/quality.py) in the eyes of ``classifier``, printed and returned
    for samples.json. ``trained_on`` names the training half ("S1" or "S2"); ``training`` holds the digits the model
    saw; ``d1`` is each sample's distance to its nearest one. ``asked``: the digit each sample was asked for, if any.
    Samples all asked for one digit are only read for it: set beside every held-out digit, they would score as
    poor digits in general.
    """
    if asked is not None and len(asked.unique()) == 1:
        accuracy = class_accuracy(classifier, samples, asked)
        print(f"the judge reads {100 * accuracy:.1f}% of the samples as the {int(asked[0])} they were asked for")
        return {"judge": JUDGE_NAME, "accuracy": round(accuracy, 4)}
    if len(samples) <= K_NEAREST:
        warn(f"no quality numbers for {len(samples)} samples: precision and recall need at least {K_NEAREST + 1}")
        return None
    unseen = other_half(trained_on)  # real digits the model never saw
    count = min(len(samples), len(DIGIT_SPLITS[unseen]))
    if count < len(samples):
        warn(f"the quality numbers use the first {count} samples: there are {count} unseen real digits to set "
             "beside them")
    held_out = digits("held_out")[0]
    quality = digit_quality(classifier, samples[:count], held_out, digits(unseen)[0][:count],
                            asked=None if asked is None else asked[:count])
    held_out_d1 = nearest_training_images(held_out, training)[1]
    quality.update({"judge": JUDGE_NAME, "samples_judged": count,
                    "reference": f"the {len(held_out)} held-out digits",
                    "real": f"the first {count} digits of {unseen}",
                    "median_d1": round(float(d1.median()), 4),
                    "held_out_median_d1": round(float(held_out_d1.median()), 4)})
    print(f"quality of {count} samples against the {len(held_out)} held-out digits, in the judge's features "
          f"({count} real digits the model never saw, for comparison): FLD {quality['fld']:.2f} "
          f"({quality['real_fld']:.2f}), precision {quality['precision']:.3f} ({quality['real_precision']:.3f}), "
          f"recall {quality['recall']:.3f} ({quality['real_recall']:.3f})")
    print(f"median distance to the nearest training digit: samples {quality['median_d1']:.3f}, held-out digits "
          f"{quality['held_out_median_d1']:.3f}; the judge reads the samples as 0-9: {quality['class_counts']}")
    if "accuracy" in quality:
        print(f"the judge reads {100 * quality['accuracy']:.1f}% of the samples as the digit they were asked for")
    return quality


def save_grid(samples, labels, classes, label, path):
    """grid.png: the first MAX_GRID samples, 16 to a row; every class in turn gets a column per class."""
    if labels is not None and label is None and len(classes) <= 16:
        columns = len(classes)
        shown = samples[: max(MAX_GRID // columns, 1) * columns]
    else:
        columns, shown = (8 if len(samples) <= 64 else 16), samples[:MAX_GRID]
    save_image_grid(shown, path, columns=columns)


def main():
    # glibc keeps freed activations for reuse: the run is 22% faster (benchmarks/process_tuning.json)
    keep_freed_memory()
    args = parse_args()
    device = pick_device(args.device)
    check_precision(args.precision, device, warn)
    model, schedule, checkpoint = load_checkpoint(args.model_path, device)  # the EMA weights, if kept
    size = checkpoint["data"]["img_size"]
    if schedule.max_noise < 1:
        raise UserError(f"{args.model_path!r} was trained with max_noise {schedule.max_noise:g}: it denoises, but "
                        "never saw pure noise, so it cannot generate (use ddpm_infer.py, or train with "
                        "--max_noise 1 or --image_dir)")
    output_dir = args.output_dir or os.path.join("samples", os.path.splitext(os.path.basename(args.model_path))[0])
    names = [f"sample_{i:03d}.png" for i in range(args.num_samples)] + ["grid.png", "nearest.png", "samples.json"]
    if args.summary_only:
        names = names[args.num_samples :]
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir!r} is a file, not a folder")
    classes = checkpoint["data"].get("classes")
    labels = requested_labels(args, model, classes)
    classifier = load_judge() if "digits" in checkpoint["data"] else None  # read now: a missing one costs nothing
    training = training_images(checkpoint["data"])  # read before sampling, and never written over
    check_output_dir(output_dir, names, args.model_path, training)

    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    network = InBatches(model, args.batch_size)  # memory: the network sees at most --batch_size images at once
    sampler = network if labels is None else Guided(network, labels, guidance)  # called as model(x_t, t)
    with autocast(args.precision, device):
        samples = generate(sampler, schedule, (args.num_samples, 3, size, size), args.steps, args.eta, args.seed,
                           device).cpu()
    with staged_outputs(output_dir, "--output_dir") as place:  # every file, or none
        write_outputs(args, samples, labels, classes, guidance, size, device, training, classifier, checkpoint,
                      place)
    print(f"saved {output_dir}/" + ("grid.png" if args.summary_only else
                                     f"sample_000.png ... {names[args.num_samples - 1]}, grid.png")
          + (", nearest.png" if training is not None else "") + " and samples.json")


def write_outputs(args, samples, labels, classes, guidance, size, device, training, classifier, checkpoint, place):
    """The samples, grid.png, nearest.png and samples.json, each to ``place(name)``, with what they say printed."""
    if not args.summary_only:
        for i, sample in enumerate(samples):
            save_image(sample, place(f"sample_{i:03d}.png"))
    save_grid(samples, labels, classes, args.label, place("grid.png"))
    drawn = "" if labels is None else (f" of class {classes[int(labels[0])]!r}" if args.label is not None else
                                       f", every class in turn ({len(classes)} classes)")
    print(f"{args.num_samples} samples{drawn} of {size}x{size} px from pure noise in {args.steps} steps"
          + (f" (eta={args.eta:g})" if args.eta else "") + (f", guidance S = {guidance:g}" if labels is not None else "")
          + f", seed {args.seed}, on {device}")

    summary = {"model_path": args.model_path, "num_samples": args.num_samples, "steps": args.steps,
               "eta": args.eta, "seed": args.seed, "img_size": size, "device": str(device), "precision": args.precision,
               "machine": describe(),
               **({} if labels is None else {"classes": classes, "label": args.label, "guidance": guidance}),
               "samples": [{"file": None if args.summary_only else f"sample_{i:03d}.png",
                            **({} if labels is None else {"class": classes[int(labels[i])]})}
                           for i in range(args.num_samples)]}
    if training is not None:
        dataset, files, _ = training
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
        save_nearest_pairs(pairs, place("nearest.png"),
                           f"each sample (left) beside its nearest of the {len(dataset)} training image"
                           f"{'s' if len(dataset) > 1 else ''} (right); a copy has d1/d2 < 1/3")
        rule = ("training image than to any other" if len(dataset) > 1 else
                "training image than that image lies to a flat image of its own colour")
        print(f"memorised: {int(memorized.sum())} of {args.num_samples} ({100 * fraction:.0f}%) lie 3x closer to their "
              f"{rule} (d1/d2 < 1/3; median d1/d2 {ratio.median():.2f})")
        if classifier is not None:
            quality = judge_digits(classifier, samples, checkpoint["data"]["digits"], dataset, d1,
                                   asked=labels)
            if quality is not None:
                summary["quality"] = quality
    write_json(place("samples.json"), summary)


if __name__ == "__main__":
    run(main, memory_hint="try a smaller --batch_size (the samples stay the same)")
