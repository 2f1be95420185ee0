"""From memorising one image to generating new ones: train on N = 1, 2, 4, ... digits and count the copies.

    python experiments/memorization.py        # about 21 minutes on 2 CPU cores; writes the shipped results

For each N, a small U-Net is trained on the first N of the 1,797 handwritten
digits in data/digits.png (16 px, in a fixed shuffled order), with the same
budget for every N: the same network, steps, batch and learning rate. Every
--eval_every steps it draws --num_samples samples from pure noise and asks of
each: is it a copy? A sample is memorised when its nearest training digit is
less than 1/3 as far away (L2, pixels in [0, 1]) as the second nearest
(ddpm/metrics.py; for N = 1, where there is no second digit, the distance
from that digit to a flat image of its mean colour stands in for it).

"Not a copy" is not yet "a new digit": noise is not a copy either. So beside
the fraction it reports how close the samples come to the training digits
(the median d1) compared with how close real digits that were never trained
on come (held-out digits, the last HELD_OUT of the shuffled order, which no
run below N = 1,797 sees).

Writes images/memorization.png (the fraction against N, and against training
steps), images/memorization_samples.png (samples beside their nearest training
digits, for a small and a large N) and images/memorization.json.
"""

import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from ddpm.cli import ArgumentParser, int_in_range, run  # noqa: E402
from ddpm.data import digits  # noqa: E402
from ddpm.diffusion import NoiseSchedule, generate  # noqa: E402
from ddpm.figures import save_memorization, save_nearest_pairs  # noqa: E402
from ddpm.files import check_writable, write_json  # noqa: E402
from ddpm.machine import cpu_name  # noqa: E402
from ddpm.metrics import MEMORIZED_RATIO, nearest_training_images  # noqa: E402
from ddpm.training import Trainer  # noqa: E402
from models.unet_model import UNet  # noqa: E402

HELD_OUT = 256  # real digits kept out of every run below N = 1,797, to compare the samples with
ALL = 1797
SMALL_N_SHOWN = 4  # the samples figure shows the smallest N from 4 up (N = 1 has only one digit to copy)


def parse_args(argv=None):
    parser = ArgumentParser(description="Train on N = 1, 2, 4, ... handwritten digits with one budget and "
                                        "measure the fraction of samples that are copies of a training digit.")
    parser.add_argument("--num_images", default="1,2,4,8,16,32,64,128,256,512,1024,1797",
                        type=lambda text: sorted({int(n) for n in text.split(",")}),
                        help="the values of N, comma-separated, each 1 to 1797")
    parser.add_argument("--img_size", type=int_in_range(8, 64), default=16, help="side of the digits, px")
    parser.add_argument("--train_steps", type=int_in_range(1, 10**6), default=1200, help="steps for every N")
    parser.add_argument("--batch_size", type=int_in_range(1, 1024), default=32, help="images per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="EMA of the weights, used for sampling")
    parser.add_argument("--base_channels", type=int_in_range(8, 256), default=16, help="U-Net width")
    parser.add_argument("--channel_mults", default="1,2,2", help="U-Net levels")
    parser.add_argument("--num_samples", type=int_in_range(1, 4096), default=100, help="samples per measurement")
    parser.add_argument("--sample_steps", type=int_in_range(1, 1000), default=20, help="sampling steps")
    parser.add_argument("--eval_every", type=int_in_range(1, 10**6), default=250,
                        help="steps between measurements of the memorised fraction")
    parser.add_argument("--seed", type=int_in_range(0, 2**32 - 1), default=0, help="seed for everything")
    parser.add_argument("--figure_path", default="images/memorization.png")
    parser.add_argument("--samples_figure_path", default="images/memorization_samples.png")
    parser.add_argument("--json_path", default="images/memorization.json")
    args = parser.parse_args(argv)
    if not all(1 <= n <= ALL for n in args.num_images):
        parser.error(f"--num_images: each N must be from 1 to {ALL}")
    try:
        args.channel_mults = [int(m) for m in args.channel_mults.split(",")]
    except ValueError:
        parser.error(f"--channel_mults must be comma-separated integers, got {args.channel_mults!r}")
    return args


def memorization(model, schedule, train, held_out, args, seed):
    """Sample, find each sample's nearest training digits, and summarise. Returns (stats, samples, nearest, ratio)."""
    samples = generate(model, schedule, (args.num_samples, 3, args.img_size, args.img_size), args.sample_steps,
                       seed=seed)
    nearest, d1, _, ratio = nearest_training_images(samples, train)
    stats = {"memorized_fraction": round(float((ratio < MEMORIZED_RATIO).double().mean()), 4),
             "median_ratio": round(float(ratio.median()), 4), "median_d1": round(float(d1.median()), 4)}
    if held_out is not None:  # how far real, unseen digits lie from the same training set
        stats["held_out_median_d1"] = round(float(nearest_training_images(held_out, train)[1].median()), 4)
    return stats, samples, nearest, ratio


def run_one(n, pool, held_out, args, bar):
    """Train on the first n digits of ``pool`` and follow the memorised fraction. Returns the run's record."""
    train = pool[:n]
    torch.manual_seed(args.seed)
    model = UNet(3, args.base_channels, args.channel_mults).to(memory_format=torch.channels_last)
    schedule = NoiseSchedule(max_noise=1.0)
    trainer = Trainer(model, train, schedule, args.train_steps, args.lr, batch_size=args.batch_size,
                      generator=torch.Generator().manual_seed(args.seed), ema_decay=args.ema_decay,
                      data_seed=args.seed)
    curve = {"step": [], "memorized_fraction": []}
    start, sampling = time.perf_counter(), 0.0

    def measure(t):
        nonlocal sampling
        began = time.perf_counter()
        stats = memorization(t.sampling_model(), schedule, train, None, args, args.seed)[0]
        sampling += time.perf_counter() - began
        curve["step"].append(t.step)
        curve["memorized_fraction"].append(stats["memorized_fraction"])
        bar.update(args.eval_every if t.step % args.eval_every == 0 else t.step % args.eval_every)
        bar.set_postfix(N=n, memorized=f"{stats['memorized_fraction']:.0%}")

    trainer.run(eval_every=args.eval_every, on_eval=measure, show_progress=False)
    seconds = time.perf_counter() - start
    stats, samples, nearest, ratio = memorization(trainer.sampling_model(), schedule, train,
                                                  held_out if n < ALL else None, args, args.seed)
    record = {"num_images": n, **stats, "final_loss": trainer.final_loss(),
              "train_seconds": round(seconds - sampling, 1), "curve": curve}
    shown = [(samples[i], train[int(nearest[i])], float(ratio[i])) for i in range(min(8, len(samples)))]
    return record, shown


def main():
    args = parse_args()
    for path in (args.figure_path, args.samples_figure_path, args.json_path):
        check_writable(path, "output")
    pool = digits(args.img_size)[torch.randperm(ALL, generator=torch.Generator().manual_seed(args.seed))]
    held_out = pool[ALL - HELD_OUT:]
    began = time.perf_counter()
    runs, shown = [], {}
    with tqdm(total=len(args.num_images) * args.train_steps, desc="memorization", unit="step") as bar:
        for n in args.num_images:
            record, shown[n] = run_one(n, pool, held_out, args, bar)
            runs.append(record)
            bar.write(f"N={n:5d}: {record['memorized_fraction']:.0%} memorised, median d1/d2 "
                      f"{record['median_ratio']:.2f}, median d1 {record['median_d1']:.2f}"
                      + (f" (held-out digits: {record['held_out_median_d1']:.2f})" if "held_out_median_d1" in record
                         else "") + f", {record['train_seconds']:.0f} s")
    settings = {key: value for key, value in vars(args).items() if not key.endswith("path")}
    result = {"command": " ".join(["python", "experiments/memorization.py", *sys.argv[1:]]),
              "settings": settings, "memorized_ratio": MEMORIZED_RATIO, "held_out": HELD_OUT,
              "wall_time_s": round(time.perf_counter() - began, 1), "device": "cpu",
              "threads": torch.get_num_threads(), "processor": cpu_name(),
              "torch_version": str(torch.__version__), "runs": runs}
    save_memorization(runs, args.figure_path)
    small = next((n for n in args.num_images if n >= SMALL_N_SHOWN), args.num_images[0])
    pairs = [(sample, nearest, f"N = {n}: d1/d2 = {ratio:.2f}" + (" (copy)" if ratio < MEMORIZED_RATIO else ""))
             for n in dict.fromkeys([small, args.num_images[-1]]) for sample, nearest, ratio in shown[n]]
    save_nearest_pairs(pairs, args.samples_figure_path, "samples (left of each pair) beside their nearest training "
                       f"digit (right), for N = {small} and N = {args.num_images[-1]}")
    write_json(args.json_path, result)
    print(f"saved {args.figure_path}, {args.samples_figure_path} and {args.json_path} "
          f"({result['wall_time_s'] / 60:.1f} min)")


if __name__ == "__main__":
    run(main)
