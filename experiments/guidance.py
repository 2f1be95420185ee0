"""Classifier-free guidance, measured: fidelity against diversity as the scale S grows.

    python experiments/guidance.py        # 36 minutes on 2 CPU cores; writes the shipped results

The conditional digit generator (python ddpm_train.py --digits S1 --class_conditional,
shipped as model_ckpt/digits_cond_unet.pth) draws 1,000 digits, 100 of each
class, at every guidance scale S of --scales (ddpm/guidance.py):

    x0_guided = x0_uncond + S * (x0_cond - x0_uncond)

from the same starting noise and sampler noise at every S, so that only S
changes. For each S the judge (ddpm/quality.py) reports

- accuracy: the share of samples it reads as the digit they were asked for (fidelity);
- FLD, precision and recall against the 1,000 held-out digits, beside as many real
  digits the model never saw (quality, and recall for variety);
- the share of copies of a training digit (d1/d2 < 1/3, ddpm/metrics.py).

Writes images/guidance.json (a record per S), images/guidance.png (the curves
against S) and images/guidance_grid.png (a row per digit, a block per S).
"""

import os
import sys
import time

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import torch  # noqa: E402

from ddpm.checkpoint import load_checkpoint  # noqa: E402
from ddpm.cli import (RUNS_FOLDER, ArgumentParser, at_defaults, guidance_scale, int_in_range, route_outputs, run,  # noqa: E402
                      warn, zero_to_one)
from ddpm.data import digits, other_half  # noqa: E402
from ddpm.diffusion import generate  # noqa: E402
from ddpm.errors import UserError  # noqa: E402
from ddpm.figures import save_guidance_curves, save_guidance_grid  # noqa: E402
from ddpm.files import check_writable, write_json  # noqa: E402
from ddpm.guidance import Guided, balanced_labels  # noqa: E402
from ddpm.machine import describe  # noqa: E402
from ddpm.metrics import MEMORIZED_RATIO, nearest_training_images  # noqa: E402
from ddpm.precision import add_precision_argument, autocast, check_precision  # noqa: E402
from ddpm.quality import JUDGE_NAME, JUDGE_PATH, digit_quality, judge_held_out_accuracy, load_judge  # noqa: E402

# what the shipped sweep writes; a sweep with other settings, or of another model, writes the same names in OWN_FOLDER
SHIPPED_OUTPUTS = {"figure_path": "images/guidance.png", "grid_path": "images/guidance_grid.png",
                   "json_path": "images/guidance.json"}
OWN_FOLDER = os.path.join(RUNS_FOLDER, "guidance")
SHOWN_PER_CELL = 4  # samples of one class at one S in the grid figure


def parse_args(argv=None):
    parser = ArgumentParser(description="Sample a conditional digit generator at several guidance scales and "
                                        "measure accuracy, FLD, precision and recall at each.")
    parser.add_argument("--model_path", default="model_ckpt/digits_cond_unet.pth",
                        help="a model of the shipped digits trained with --class_conditional")
    parser.add_argument("--scales", default="0,1,2,3,4,8",
                        type=lambda text: sorted({guidance_scale(value) for value in text.split(",")}),
                        help="the guidance scales S, comma-separated")
    parser.add_argument("--num_samples", type=int_in_range(10, 2000), default=1000,
                        help="samples per scale, every digit equally often")
    parser.add_argument("--steps", type=int_in_range(1, 1000), default=50, help="sampling steps")
    parser.add_argument("--eta", type=zero_to_one, default=1.0, help="fresh noise per step (1: DDPM's sampler)")
    parser.add_argument("--seed", type=int_in_range(0, 2**32 - 1), default=0, help="the same noise at every S")
    add_precision_argument(parser)
    for name, path in SHIPPED_OUTPUTS.items():
        parser.add_argument(f"--{name}", default=None,
                            help=f"(default: {path} for the shipped run, every other setting at its default; "
                                 f"{OWN_FOLDER}/{os.path.basename(path)} for any other)")
    args = parser.parse_args(argv)
    route_outputs(args, SHIPPED_OUTPUTS, at_defaults(parser, args, ignore=SHIPPED_OUTPUTS), OWN_FOLDER)
    return args


def load_conditional_digits_model(path):
    """The model, its schedule and checkpoint; UserError unless it learned the shipped digits with their classes."""
    model, schedule, checkpoint = load_checkpoint(path)
    trained_on = checkpoint["data"]
    if "digits" not in trained_on or model.null_class is None:
        raise UserError(f"{path!r} is not a class-conditional model of the shipped digits (train one with "
                        "python ddpm_train.py --digits S1 --class_conditional)")
    return model, schedule, trained_on


def sweep_one(model, schedule, scale, labels, args, classifier, held_out, real, training):
    """Samples at guidance scale ``scale`` and their record."""
    began = time.perf_counter()
    with autocast(args.precision, torch.device("cpu")):
        samples = generate(Guided(model, labels, scale), schedule, (len(labels), 3, *held_out.shape[-2:]),
                           args.steps, args.eta, args.seed)
    seconds = time.perf_counter() - began
    quality = digit_quality(classifier, samples, held_out, real, asked=labels)
    _, d1, _, ratio = nearest_training_images(samples, training)
    return samples, {"guidance": scale, "sample_seconds": round(seconds, 1), **quality,
                     "memorized_fraction": round(float((ratio < MEMORIZED_RATIO).double().mean()), 4),
                     "median_d1": round(float(d1.median()), 4)}


def main():
    args = parse_args()
    check_precision(args.precision, torch.device("cpu"), warn)
    for path in (args.figure_path, args.grid_path, args.json_path):
        check_writable(path, "output", inputs=[args.model_path, JUDGE_PATH])
    model, schedule, trained_on = load_conditional_digits_model(args.model_path)
    classifier = load_judge()
    judge_accuracy = judge_held_out_accuracy()
    classes = trained_on["classes"]
    labels = balanced_labels(args.num_samples, len(classes))
    held_out = digits("held_out")[0]
    unseen = other_half(trained_on["digits"])  # real digits it never saw, as many as the samples (at most 2,000)
    real = digits(unseen)[0][: args.num_samples]
    training = digits(trained_on["digits"])[0][: trained_on["num_images"]]
    began = time.perf_counter()
    rows, cells = [], [[] for _ in classes]
    for scale in tqdm(args.scales, desc="guidance", unit="scale"):
        samples, row = sweep_one(model, schedule, scale, labels, args, classifier, held_out, real, training)
        rows.append(row)
        for c in range(len(classes)):
            cells[c].append(samples[labels == c][:SHOWN_PER_CELL])
        tqdm.write(f"S = {scale:g}: accuracy {100 * row['accuracy']:.1f}%, FLD {row['fld']:.2f} "
                   f"(real {row['real_fld']:.2f}), precision {row['precision']:.3f}, recall {row['recall']:.3f}, "
                   f"copies {100 * row['memorized_fraction']:.1f}% ({row['sample_seconds']:.0f} s)")
    result = {"command": " ".join(["python", "experiments/guidance.py", *sys.argv[1:]]),
              "settings": {key: value for key, value in vars(args).items() if not key.endswith("path")},
              "model_path": args.model_path, "trained_on": f"the first {trained_on['num_images']} digits of "
                                                           f"{trained_on['digits']}",
              "classes": classes, "samples_per_class": args.num_samples // len(classes),
              "judge": JUDGE_NAME, "judge_held_out_accuracy": judge_accuracy,
              "reference": f"the {len(held_out)} held-out digits",
              "real": f"the first {len(labels)} digits of {unseen}", "memorized_ratio": MEMORIZED_RATIO,
              "wall_time_s": round(time.perf_counter() - began, 1), "machine": describe(), "runs": rows}
    save_guidance_curves(rows, judge_accuracy, args.figure_path)
    save_guidance_grid(classes, args.scales, cells, args.grid_path)
    write_json(args.json_path, result)
    print(f"saved {args.figure_path}, {args.grid_path} and {args.json_path} ({result['wall_time_s'] / 60:.1f} min)")


if __name__ == "__main__":
    run(main)
