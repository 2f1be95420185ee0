"""From memorising to generalising: two models on disjoint digits, sampled from the same noise.

    python experiments/generalization.py        # 34 minutes on 2 CPU cores; writes the shipped results

The test of Kadkhodaie, Guth, Simoncelli and Mallat (ICLR 2024). For each N,
model A learns the first N digits of S1 and model B the first N digits of S2,
two halves of data/mnist.png that share no digit (data.DIGIT_SPLITS), with the
same network, budget and seed. Both then denoise the same starting noises with
the deterministic sampler (eta = 0), so any difference between their samples
comes from their data alone.

- Small N: each model returns its own training digits, so A and B disagree;
  each sample is closer to its own nearest training digit than to the other
  model's sample.
- Large N: A and B return nearly the same image, which is in neither training
  set: both learned the same density, not their digits.

For each N it reports, for each model, the memorised fraction (d1/d2 < 1/3,
ddpm/metrics.py), the median cosine similarity of a sample to its nearest
training digit, and the FLD, precision and recall against the 1,000 held-out
digits (ddpm/quality.py, beside real digits of the same number); and the median
cosine similarity between A's and B's samples from the same noise.

Every model trains in a process of its own on one thread, --workers at a time,
so the results do not depend on --workers. Writes images/generalization.json
(a record per N), images/generalization.png (the curves against N) and
images/generalization_grid.png (nearest S1 digit / A / B / nearest S2 digit).
"""

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from ddpm.cli import (RUNS_FOLDER, ArgumentParser, at_defaults, channel_multipliers, int_in_range,  # noqa: E402
                      positive_float, route_outputs, run, warn)
from ddpm.data import DIGIT_SPLITS, DIGITS_LABELS, DIGITS_SHEET, digits  # noqa: E402
from ddpm.diffusion import NoiseSchedule, generate  # noqa: E402
from ddpm.figures import save_generalization_curves, save_generalization_grid  # noqa: E402
from ddpm.files import check_writable, write_json  # noqa: E402
from ddpm.machine import describe  # noqa: E402
from ddpm.precision import add_precision_argument, autocast, check_precision  # noqa: E402
from ddpm.metrics import (MEMORIZED_RATIO, cosine_similarity, nearest_cosine_similarity,  # noqa: E402
                          nearest_training_images)
from ddpm.quality import JUDGE_NAME, JUDGE_PATH, digit_quality, load_judge  # noqa: E402
from ddpm.training import Trainer  # noqa: E402
from models.unet_model import UNet  # noqa: E402

HALVES = {"A": "S1", "B": "S2"}  # model -> the half of the digits it learns
SEEDS_SHOWN = 4  # starting noises per N in the grid figure
MAX_N = len(DIGIT_SPLITS["S1"])
# what the shipped experiment writes; a run with other settings writes the same names in OWN_FOLDER
SHIPPED_OUTPUTS = {"figure_path": "images/generalization.png", "grid_path": "images/generalization_grid.png",
                   "json_path": "images/generalization.json"}
OWN_FOLDER = os.path.join(RUNS_FOLDER, "generalization")


def parse_args(argv=None):
    parser = ArgumentParser(description="Train two models on disjoint sets of N digits each, sample both from the "
                                        "same noise, and measure copies, agreement and quality for each N.")
    parser.add_argument("--num_images", default="1,4,16,64,256,1024,2000",
                        type=lambda text: sorted({int(n) for n in text.split(",")}),
                        help=f"the values of N, comma-separated, each 1 to {MAX_N}")
    parser.add_argument("--train_steps", type=int_in_range(1, 10**6), default=1000, help="steps for every model")
    parser.add_argument("--batch_size", type=int_in_range(1, 1024), default=64, help="digits per step")
    parser.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="EMA of the weights, used for sampling")
    parser.add_argument("--base_channels", type=int_in_range(8, 256), default=16, help="U-Net width")
    parser.add_argument("--channel_mults", type=channel_multipliers, default="1,2,2", help="U-Net levels")
    parser.add_argument("--num_samples", type=int_in_range(2, 2000), default=250,
                        help="samples per model, from the same noises for A and B")
    parser.add_argument("--sample_steps", type=int_in_range(1, 1000), default=25, help="deterministic sampling steps")
    parser.add_argument("--seed", type=int_in_range(0, 2**32 - 1), default=0, help="seed for everything")
    parser.add_argument("--workers", type=int_in_range(1, 64), default=2, help="models trained at once")
    add_precision_argument(parser)
    for name, path in SHIPPED_OUTPUTS.items():
        parser.add_argument(f"--{name}", default=None,
                            help=f"(default: {path} for the shipped run, every other setting at its default; "
                                 f"{OWN_FOLDER}/{os.path.basename(path)} for any other)")
    args = parser.parse_args(argv)
    route_outputs(args, SHIPPED_OUTPUTS, at_defaults(parser, args, ignore=(*SHIPPED_OUTPUTS, "workers")), OWN_FOLDER)
    if not all(1 <= n <= MAX_N for n in args.num_images):
        parser.error(f"--num_images: each N must be from 1 to {MAX_N}")
    return args


def train_and_sample(settings, half, n):
    """One model: learn the first n digits of ``half`` on one thread, then sample. Returns (samples, record)."""
    torch.set_num_threads(1)  # the same arithmetic whichever worker runs it, and however many run at once
    train = digits(half)[0][:n]
    torch.manual_seed(settings["seed"])  # the same initial weights for A and B
    model = UNet(3, settings["base_channels"], settings["channel_mults"]).to(memory_format=torch.channels_last)
    schedule = NoiseSchedule(max_noise=1.0)
    trainer = Trainer(model, train, schedule, settings["train_steps"], settings["lr"],
                      batch_size=settings["batch_size"], generator=torch.Generator().manual_seed(settings["seed"]),
                      ema_decay=settings["ema_decay"], data_seed=settings["seed"], precision=settings["precision"])
    began = time.perf_counter()
    trainer.run(show_progress=False)
    seconds = time.perf_counter() - began
    shape = (settings["num_samples"], 3, *train.shape[-2:])
    with autocast(settings["precision"], torch.device("cpu")):
        samples = generate(trainer.sampling_model(), schedule, shape, settings["sample_steps"], eta=0.0,
                           seed=settings["seed"])  # the same starting noise for every model
    return samples, {"train_seconds": round(seconds, 1), "final_loss": trainer.final_loss()}


def measure(n, samples, judged, classifier, held_out):
    """The record of one N from the two models' samples; and the quads the grid figure shows."""
    row, nearest_shown = {"num_images": n}, {}
    for model, half in HALVES.items():
        train = digits(half)[0][:n]
        nearest, d1, _, ratio = nearest_training_images(samples[model], train)
        other_half = HALVES["B" if model == "A" else "A"]  # real digits this model never saw
        quality = digit_quality(classifier, samples[model], held_out, digits(other_half)[0][: len(samples[model])])
        row[model] = {"trained_on": f"the first {n} digits of {half}", **judged[model],
                      "memorized_fraction": round(float((ratio < MEMORIZED_RATIO).double().mean()), 4),
                      "median_ratio": round(float(ratio.median()), 4),
                      "median_nearest_cosine": round(float(nearest_cosine_similarity(samples[model], train).median()),
                                                     4),
                      "median_d1": round(float(d1.median()), 4),
                      "held_out_median_d1": round(float(nearest_training_images(held_out, train)[1].median()), 4),
                      **quality}
        nearest_shown[model] = train[nearest[:SEEDS_SHOWN]]
    row["median_cosine_a_b"] = round(float(cosine_similarity(samples["A"], samples["B"]).median()), 4)
    quads = [(nearest_shown["A"][i], samples["A"][i], samples["B"][i], nearest_shown["B"][i])
             for i in range(min(SEEDS_SHOWN, len(samples["A"])))]
    return row, quads


def run_all(args):
    """Train and sample every (model, N), --workers at a time; yields (n, model, samples, record) as each ends."""
    settings = {key: getattr(args, key) for key in ("train_steps", "batch_size", "lr", "ema_decay", "base_channels",
                                                    "channel_mults", "num_samples", "sample_steps", "seed", "precision")}
    jobs = [(model, half, n) for n in args.num_images for model, half in HALVES.items()]
    if args.workers == 1:
        threads = torch.get_num_threads()
        try:
            for model, half, n in jobs:
                yield (n, model, *train_and_sample(settings, half, n))
        finally:
            torch.set_num_threads(threads)
        return
    # spawn: fresh processes, none of this one's thread pools copied into them
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(train_and_sample, settings, half, n): (model, n) for model, half, n in jobs}
        for future in as_completed(futures):
            model, n = futures[future]
            yield (n, model, *future.result())


def main():
    args = parse_args()
    check_precision(args.precision, torch.device("cpu"), warn)
    for path in (args.figure_path, args.grid_path, args.json_path):
        check_writable(path, "output", inputs=[DIGITS_SHEET, DIGITS_LABELS, JUDGE_PATH])  # what it reads
    classifier = load_judge()  # before the long work: a missing judge costs nothing
    held_out = digits("held_out")[0]
    began = time.perf_counter()
    finished = {n: {} for n in args.num_images}
    rows, shown = [], []
    with tqdm(total=2 * len(args.num_images), desc="generalization", unit="model") as bar:
        for n, model, samples, record in run_all(args):
            finished[n][model] = (samples, record)
            bar.update()
            if len(finished[n]) == 2:
                samples = {m: finished[n][m][0] for m in HALVES}
                row, quads = measure(n, samples, {m: finished[n][m][1] for m in HALVES}, classifier, held_out)
                rows.append(row)
                shown.append((n, quads))
                bar.write(f"N={n:5,d}: memorised A {row['A']['memorized_fraction']:.0%} B "
                          f"{row['B']['memorized_fraction']:.0%}; cosine A-B {row['median_cosine_a_b']:.2f}, "
                          f"to nearest training digit {row['A']['median_nearest_cosine']:.2f} / "
                          f"{row['B']['median_nearest_cosine']:.2f}; FLD {row['A']['fld']:.1f} / {row['B']['fld']:.1f}"
                          f" (real {row['A']['real_fld']:.1f})")
    rows.sort(key=lambda row: row["num_images"])
    shown.sort(key=lambda item: item[0])
    result = {"command": " ".join(["python", "experiments/generalization.py", *sys.argv[1:]]),
              "settings": {key: value for key, value in vars(args).items() if not key.endswith("path")},
              "judge": JUDGE_NAME, "memorized_ratio": MEMORIZED_RATIO, "halves": HALVES,
              "reference": f"the {len(held_out)} held-out digits", "cosine_scale": "pixels in [0, 1]",
              "wall_time_s": round(time.perf_counter() - began, 1), "machine": describe(), "runs": rows}
    save_generalization_curves(rows, args.figure_path)
    save_generalization_grid(shown, args.grid_path)
    write_json(args.json_path, result)
    print(f"saved {args.figure_path}, {args.grid_path} and {args.json_path} ({result['wall_time_s'] / 60:.1f} min)")


if __name__ == "__main__":
    run(main)
