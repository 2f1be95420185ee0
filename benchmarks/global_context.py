"""Ablation: which kind of global context lets the U-Net generate the 256 px picture from pure noise?

    python benchmarks/global_context.py                  # 5 variants x 300 steps: about 90 min on 2 cores
    python benchmarks/global_context.py --train_steps 100 --variants plain,canvas   # a quick look

Each variant is trained by ddpm_train.py itself, with the full-noise recipe
(--max_noise 1 --batch_size 4) and one extra network option, into --out_dir
(one checkpoint per variant, reused on a rerun when its settings match). Then,
for each, from the same pure noise (t = T, seed 0):

* PSNR of the generated picture after 1, 50 and 200 denoising steps;
* the time of one training step (batch 4), taken in alternating rounds so that
  drift of the machine hits every variant alike;
* the number of parameters.

It prints a Markdown table, writes the numbers to --json, and draws
--figure: each variant's FIRST prediction x0_hat = unet(eps, T) beside the
picture, which shows where a plain U-Net cannot tell where it is.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.benchmark import write_results  # noqa: E402
from ddpm.checkpoint import load_checkpoint  # noqa: E402
from ddpm.cli import RUNS_FOLDER, ArgumentParser, at_defaults, int_in_range, route_outputs, run  # noqa: E402
from ddpm.diffusion import NoiseSchedule, generate  # noqa: E402
from ddpm.errors import UserError  # noqa: E402
from ddpm.figures import save_triptych  # noqa: E402
from ddpm.files import check_writable  # noqa: E402
from ddpm.imaging import load_image  # noqa: E402
from ddpm.machine import cpu_name  # noqa: E402
from ddpm.metrics import psnr  # noqa: E402
from ddpm.training import Trainer  # noqa: E402

IMAGE = "images/demo.png"
SIZE = 256
RECIPE = ["--max_noise", "1", "--batch_size", "4"]  # the full-noise model's recipe, but for its length
VARIANTS = {  # name -> the ddpm_train.py flags that build it
    "plain": [],
    "attention": ["--attention"],
    "coords": ["--coords"],
    "five levels": ["--channel_mults", "1,2,4,8,8"],
    "canvas": ["--canvas"],
}
SAMPLE_STEPS = (1, 50, 200)
NOISE_SEED = 0
# what the shipped run writes; a run with other settings writes the same names in OWN_FOLDER
SHIPPED_OUTPUTS = {"json": "benchmarks/global_context.json", "figure": "images/first_prediction.png"}
OWN_FOLDER = os.path.join(RUNS_FOLDER, "global_context")


def train_variant(name, flags, train_steps, out_dir):
    """The checkpoint of one variant: trained now by ddpm_train.py, or an earlier one with the same settings."""
    path = os.path.join(out_dir, name.replace(" ", "_") + ".pth")
    command = [sys.executable, "ddpm_train.py", "--image_path", IMAGE, "--img_size", str(SIZE), *RECIPE,
               "--train_steps", str(train_steps), *flags, "--eval_every", "0", "--save_every", "0",
               "--model_save_path", path]
    record = os.path.splitext(path)[0] + ".json"  # ddpm_train.py's run record, written last
    if os.path.exists(path) and os.path.exists(record):
        with open(record, encoding="utf-8") as f:
            if json.load(f)["command"].split()[2:] == command[2:]:  # the same flags: the same run
                print(f"{name}: reusing {path}")
                return path
    print(f"{name}: training {train_steps} steps -> {path}", flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    return path


def step_times(checkpoints, x0, rounds, steps, warmup):
    """Median seconds per training step (batch 4) of each variant, timed in alternating rounds."""
    trainers = {}
    for name, path in checkpoints.items():
        model, schedule, _ = load_checkpoint(path)
        model = model.train().to(memory_format=torch.channels_last)
        trainers[name] = Trainer(model, x0, schedule, 10**6, 1e-4, batch_size=4,
                                 generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in trainers}
    for trainer in trainers.values():
        for _ in range(warmup):
            trainer.train_step()
    for r in range(rounds):
        for name in (list(trainers) if r % 2 == 0 else list(reversed(trainers))):
            start = time.perf_counter()
            for _ in range(steps):
                trainers[name].train_step()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(values) for name, values in times.items()}


def format_table(rows, train_steps):
    lines = [f"| network ({train_steps} steps, batch 4) | parameters | s per training step "
             "| PSNR from noise, 1 step | 50 steps | 200 steps |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['parameters']:,} | {r['seconds_per_step']:.2f} | "
                     + " | ".join(f"{r['psnr_db'][str(s)]:.2f} dB" for s in SAMPLE_STEPS) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = ArgumentParser(description="Measure each kind of global context for generation from pure noise.")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--train_steps", type=int_in_range(1, 100_000), default=300, help="training steps per variant")
    parser.add_argument("--out_dir", default="model_ckpt/global_context", help="where the variants' checkpoints go")
    parser.add_argument("--rounds", type=int_in_range(1, 100), default=6, help="alternating timing rounds")
    parser.add_argument("--timing_steps", type=int_in_range(1, 100), default=3, help="training steps per variant per round")
    parser.add_argument("--json", default=None,
                        help=f"where to write the results (default: {SHIPPED_OUTPUTS['json']} for the shipped run, "
                             f"every other setting at its default; {OWN_FOLDER}/ for any other)")
    parser.add_argument("--figure", default=None,
                        help=f"the first prediction from pure noise of each variant (default: "
                             f"{SHIPPED_OUTPUTS['figure']}, or {OWN_FOLDER}/ as for --json)")
    args = parser.parse_args(argv)
    route_outputs(args, SHIPPED_OUTPUTS, at_defaults(parser, args, ignore=(*SHIPPED_OUTPUTS, "out_dir")), OWN_FOLDER)
    names = [name.strip() for name in args.variants.split(",")]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(map(repr, unknown))} (choose from {', '.join(VARIANTS)})")
    args.variants = names
    return args


def main():
    args = parse_args()
    os.chdir(REPO)
    for flag, path in (("--json", args.json), ("--figure", args.figure)):
        check_writable(path, flag, [IMAGE])
    os.makedirs(args.out_dir, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    checkpoints = {name: train_variant(name, VARIANTS[name], args.train_steps, args.out_dir) for name in args.variants}

    x0 = load_image(IMAGE, SIZE)
    rows, firsts = {}, []
    for name, path in checkpoints.items():
        model, schedule, checkpoint = load_checkpoint(path)
        if schedule != NoiseSchedule(max_noise=1.0):
            raise UserError(f"{path!r} was not trained with --max_noise 1; delete it to retrain")
        # from pure noise x_T = eps (t = T, w = 1), the same eps for every variant
        outputs = {steps: generate(model, schedule, x0.shape, steps, seed=NOISE_SEED) for steps in SAMPLE_STEPS}
        firsts.append((name, outputs[1]))
        rows[name] = {"flags": VARIANTS[name], "parameters": sum(p.numel() for p in model.parameters()),
                      "psnr_db": {str(steps): round(psnr(out, x0), 2) for steps, out in outputs.items()},
                      "train_wall_time_s": checkpoint["train"]["wall_time_s"], "checkpoint": path}
        print(f"{name}: " + ", ".join(f"{s} steps {rows[name]['psnr_db'][str(s)]:.2f} dB" for s in SAMPLE_STEPS),
              flush=True)
    for name, seconds in step_times(checkpoints, x0, args.rounds, args.timing_steps, warmup=2).items():
        rows[name]["seconds_per_step"] = round(seconds, 3)

    table = format_table(rows, args.train_steps)
    print("\n" + table)
    save_triptych([("Ground Truth", x0)] + [(f"{name}: first x0_hat\nPSNR {psnr(image, x0):.2f} dB", image)
                                            for name, image in firsts], args.figure)
    print(f"saved {args.figure}")
    write_results(args.json, {
        "command": " ".join(["python", "benchmarks/global_context.py", *sys.argv[1:]]),
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": str(torch.__version__)},
        "recipe": RECIPE + ["--train_steps", str(args.train_steps)], "image": IMAGE, "img_size": SIZE,
        "noise_seed": NOISE_SEED, "variants": rows, "table": table,
    })


if __name__ == "__main__":
    run(main)
