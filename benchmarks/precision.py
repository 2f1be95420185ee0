"""bf16 against fp32: how much faster each step is, what it costs in quality, and which layers must stay fp32.

    python benchmarks/precision.py --recipes fp32,bf16 --seeds 0,1   # the shipped benchmarks/precision.json
    python benchmarks/precision.py                  # speed, inference, and five whole default runs
    python benchmarks/precision.py --parts speed    # speed only: about 5 minutes

Three parts, written together to one JSON record with the machine they ran on: benchmarks/precision.json
from the shipped record's command, runs/precision/precision.json from any other (--output to choose):

* speed: median milliseconds per step of each workload in fp32 and under bf16 autocast
  (ddpm/precision.py), the two taking turns round by round so that drift of the machine cancels:
  the default training step (256 px, batch 1), the 28 px digit generator's step at the width
  model_ckpt/digits_unet.pth has (base 16) and at twice it, each also under plain autocast (the
  GroupNorms and the output layer left to it), and one forward pass of each shipped network for
  inference;
* inference: the shipped denoiser's PSNR, and the shipped digit generator's samples, in bf16 against fp32;
* quality: the whole default run of ``python ddpm_train.py`` (3,000 steps), once per recipe and seed
  (--seeds; the seed sets the initial weights and every t and eps, as ddpm_train.py --seed does),
  ending with the PSNR of one-step denoising at t = 500 that the run record quotes. The recipes:
  fp32; bf16 as ddpm/precision.py runs it (every GroupNorm and the output layer in float32); bf16 with
  the GroupNorms left to autocast; with the output layer left to it; and with both (plain autocast).

bf16 is fast only on hardware that has it: see ``cpu_flags`` in the record (avx512_bf16 or amx_bf16).
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.benchmark import write_results  # noqa: E402
from ddpm.checkpoint import load_checkpoint  # noqa: E402
from ddpm.cli import (MAX_SEED, RUNS_FOLDER, ArgumentParser, int_in_range, keep_freed_memory, route_outputs, run,  # noqa: E402
                      settings_of)
from ddpm.diffusion import NoiseSchedule, denoise, generate, seeded_noise  # noqa: E402
from ddpm.files import check_writable  # noqa: E402
from ddpm.imaging import load_image  # noqa: E402
from ddpm.machine import describe  # noqa: E402
from ddpm.metrics import psnr  # noqa: E402
from ddpm.precision import autocast, native_bf16  # noqa: E402
from ddpm.training import Trainer  # noqa: E402
from ddpm.training_run import EVAL_NOISE_SEED, EVAL_T  # noqa: E402
from models.unet_model import GroupNorm, UNet  # noqa: E402

IMAGE = REPO / "images" / "demo.png"
DEMO, DIGITS = REPO / "model_ckpt" / "demo_unet.pth", REPO / "model_ckpt" / "digits_unet.pth"
CPU = torch.device("cpu")

# the default run of ddpm_train.py (its defaults with --image_path)
DEFAULT_RUN = {"img_size": 256, "train_steps": 3000, "lr": 1e-3, "seed": 0, "base_channels": 16,
               "channel_mults": (1, 2, 4, 8), "max_noise": 0.8}
# the recipes of the quality part: precision, GroupNorm in float32, output layer in float32
RECIPES = {
    "fp32": ("fp32", True, True),
    "bf16": ("bf16", True, True),  # as ddpm/precision.py runs it
    "bf16-groupnorm-bf16": ("bf16", False, True),
    "bf16-output-bf16": ("bf16", True, False),
    "bf16-plain-autocast": ("bf16", False, False),
}


@contextlib.contextmanager
def layers_in_fp32(norms, output):
    """Inside: the network's GroupNorms and output layer run in float32 (True) or as autocast casts them."""
    saved = GroupNorm.in_fp32, UNet.output_in_fp32
    GroupNorm.in_fp32, UNet.output_in_fp32 = norms, output
    try:
        yield
    finally:
        GroupNorm.in_fp32, UNet.output_in_fp32 = saved


def default_trainer(x0, steps, precision, settings=DEFAULT_RUN, seed=None):
    """The Trainer of ``python ddpm_train.py`` (with ``--seed seed``, if given): the same initial weights,
    recipe and random draws."""
    seed = settings["seed"] if seed is None else seed
    torch.manual_seed(seed)
    model = UNet(3, settings["base_channels"], settings["channel_mults"]).to(memory_format=torch.channels_last)
    return Trainer(model, x0, NoiseSchedule(max_noise=settings["max_noise"]), steps, settings["lr"],
                   generator=torch.Generator().manual_seed(seed), precision=precision)


def digits_trainer(base_channels, precision, steps):
    """A trainer of the digit generator's shape (model_ckpt/digits_unet.json): 28 px, batch 64, three levels,
    attention, RGB; random images stand in for the digits, which does not change the time of a step."""
    torch.manual_seed(0)
    model = UNet(3, base_channels, (1, 2, 4), attention=True).to(memory_format=torch.channels_last)
    images = torch.rand(256, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return Trainer(model, images, NoiseSchedule(max_noise=1.0), steps, 2e-3, batch_size=64,
                   generator=torch.Generator().manual_seed(0), precision=precision)


def interleaved(work, rounds, repeats):
    """Median milliseconds of work["fp32"]() and work["bf16"](), taking turns for ``rounds`` rounds of
    ``repeats`` calls each (after one warm-up round), and the median of the per-round speed-ups."""
    for run_once in work.values():
        run_once()
    times = {name: [] for name in work}
    for r in range(rounds):
        for name in list(work)[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            for _ in range(repeats):
                work[name]()
            times[name].append((time.perf_counter() - start) / repeats * 1e3)
    speedups = [a / b for a, b in zip(times["fp32"], times["bf16"])]
    return {"fp32_ms": statistics.median(times["fp32"]), "bf16_ms": statistics.median(times["bf16"]),
            "speedup": statistics.median(speedups), "speedup_min": min(speedups), "speedup_max": max(speedups)}


def forward_pass(model, x, t):
    def once(precision):
        with torch.no_grad(), autocast(precision, CPU):
            model(x, t)
    return {"fp32": lambda: once("fp32"), "bf16": lambda: once("bf16")}


def training_steps(make_trainer, recipe, rounds):
    """interleaved() for training steps: fp32 against bf16 as ``recipe`` runs it, each on its own trainer."""
    _, norms, output = RECIPES[recipe]
    train = {p: make_trainer(p) for p in ("fp32", "bf16")}

    def bf16_step():
        with layers_in_fp32(norms, output):
            train["bf16"].train_step()
    return interleaved({"fp32": train["fp32"].train_step, "bf16": bf16_step}, rounds, 2)


def speed(rounds, log):
    x0 = load_image(str(IMAGE), DEFAULT_RUN["img_size"])
    rows = {}
    steps = (rounds + 1) * 2 * 2  # every round and the warm-up, two steps each, and room to spare
    workloads = {"training step, 256 px, batch 1, base 16 (the default run)":
                 lambda p: default_trainer(x0, steps, p)}
    for base in (16, 32):
        workloads[f"training step, 28 px digits, batch 64, base {base}"] = (
            lambda p, base=base: digits_trainer(base, p, steps))
    for name, make_trainer in workloads.items():
        rows[name] = training_steps(make_trainer, "bf16", rounds)
        rows[f"{name}, plain autocast"] = training_steps(make_trainer, "bf16-plain-autocast", rounds)
        log(rows)
    demo = load_checkpoint(str(DEMO))[0].to(memory_format=torch.channels_last)
    rows["denoiser forward, 256 px, batch 1 (ddpm_infer.py)"] = interleaved(
        forward_pass(demo, x0, torch.tensor([EVAL_T])), rounds, 4)
    digits = load_checkpoint(str(DIGITS))[0].to(memory_format=torch.channels_last)
    rows["generator forward, 28 px, batch 100 (ddpm_sample.py)"] = interleaved(
        forward_pass(digits, torch.randn(100, 3, 28, 28), torch.full((100,), 1000)), rounds, 4)
    log(rows)
    return rows


def inference_quality():
    """The shipped networks run in bf16 against fp32, on ddpm_infer.py's and ddpm_sample.py's default inputs."""
    model, schedule, _ = load_checkpoint(str(DEMO))
    model = model.to(memory_format=torch.channels_last)
    x0 = load_image(str(IMAGE), DEFAULT_RUN["img_size"])
    t = torch.tensor([EVAL_T])
    x_t = schedule.add_noise(x0, t, seeded_noise(x0, EVAL_NOISE_SEED))
    result = {}
    for steps in (1, 10):
        out = {}
        for precision in ("fp32", "bf16"):
            with torch.no_grad(), autocast(precision, CPU):
                out[precision] = denoise(model, x_t, EVAL_T, schedule, steps)
        result[f"denoiser, {steps} step{'s' if steps > 1 else ''}: PSNR dB"] = {
            **{p: psnr(x, x0) for p, x in out.items()}, "bf16_against_fp32": psnr(out["bf16"], out["fp32"])}
    model, schedule, _ = load_checkpoint(str(DIGITS))
    model = model.to(memory_format=torch.channels_last)
    samples = {}
    for precision in ("fp32", "bf16"):
        with torch.no_grad(), autocast(precision, CPU):
            samples[precision] = generate(model, schedule, (100, 3, 28, 28), 50, seed=0)
    difference = (samples["bf16"] - samples["fp32"]).abs() / 2  # on the [0, 1] scale of the pictures
    result["digit generator, 100 samples, 50 steps, same noise"] = {
        "mean_abs_difference": difference.mean().item(), "max_abs_difference": difference.max().item(),
        "bf16_against_fp32_psnr_db": psnr(samples["bf16"], samples["fp32"])}
    return result


def whole_run(recipe, steps, seed, log):
    """The default run with one recipe and seed: the PSNR of one-step denoising at t = 500 at its end (in
    fp32), its seconds and its final loss."""
    precision, norms, output = RECIPES[recipe]
    x0 = load_image(str(IMAGE), DEFAULT_RUN["img_size"])
    trainer = default_trainer(x0, steps, precision, seed=seed)
    start = time.perf_counter()
    with layers_in_fp32(norms, output):
        trainer.run(show_progress=False)
    seconds = time.perf_counter() - start
    x_t = trainer.schedule.add_noise(x0, torch.tensor([EVAL_T]), seeded_noise(x0, EVAL_NOISE_SEED))
    value = psnr(denoise(trainer.model.eval(), x_t, EVAL_T, trainer.schedule), x0)
    log(f"{recipe}, seed {seed}: {value:.2f} dB after {steps} steps, {seconds:.0f} s")
    return {"seed": seed, "psnr_db": value, "wall_time_s": round(seconds, 1), "final_loss": trainer.final_loss()}


def recipe_runs(recipe, steps, seeds, log):
    """Every seed's whole run with one recipe, and the mean PSNR."""
    precision, norms, output = RECIPES[recipe]
    runs = [whole_run(recipe, steps, seed, log) for seed in seeds]
    return {"precision": precision, "groupnorm_fp32": norms, "output_fp32": output, "runs": runs,
            "psnr_db_mean": statistics.mean(r["psnr_db"] for r in runs)}


def format_report(report):
    lines = [f"`{report['command']}` on {report['machine']['cpu']} ({', '.join(report['machine']['cpu_flags'])}; "
             f"native bf16: {report['native_bf16']}), torch {report['machine']['torch']}", ""]
    if "speed" in report:
        lines += ["| workload | fp32 ms | bf16 ms | speed-up (min-max) |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {r['fp32_ms']:.1f} | {r['bf16_ms']:.1f} | {r['speedup']:.2f}x "
                  f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) |" for name, r in report["speed"].items()]
    if "inference" in report:
        lines += ["", "| inference | fp32 | bf16 | bf16 against fp32 |", "|---|---:|---:|---:|"]
        for name, r in report["inference"].items():
            if "fp32" in r:
                lines.append(f"| {name} | {r['fp32']:.2f} | {r['bf16']:.2f} | {r['bf16_against_fp32']:.1f} dB |")
            else:
                lines.append(f"| {name} | | | mean {r['mean_abs_difference']:.4f}, max {r['max_abs_difference']:.3f}"
                             f" ({r['bf16_against_fp32_psnr_db']:.1f} dB) |")
    if "quality" in report:
        seeds = " / ".join(f"seed {s}" for s in report["quality_seeds"])
        lines += ["", f"| whole default run ({report['quality_steps']} steps), recipe | GroupNorm | output layer | "
                  f"PSNR at t = {EVAL_T}, dB: {seeds} | mean |", "|---|---|---|---:|---:|"]
        lines += [f"| {name} | {'fp32' if r['groupnorm_fp32'] else 'bf16'} | {'fp32' if r['output_fp32'] else 'bf16'} "
                  f"| {' / '.join(format(run['psnr_db'], '.2f') for run in r['runs'])} | {r['psnr_db_mean']:.2f} |"
                  for name, r in report["quality"].items()]
    return "\n".join(lines)


def seed_list(text):
    """--seeds: distinct seeds, comma-separated, each one as --seed takes it (0 to MAX_SEED)."""
    seeds = [int_in_range(0, MAX_SEED)(s) for s in text.split(",")]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"must be distinct seeds, got {text!r}")
    return seeds


SHIPPED_ARGV = ["--recipes", "fp32,bf16", "--seeds", "0,1"]  # the command of benchmarks/precision.json


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--parts", default="speed,inference,quality",
                        help="comma-separated: speed, inference, quality (default: all three)")
    parser.add_argument("--rounds", type=int_in_range(1, 1000), default=8, help="timed rounds per workload")
    parser.add_argument("--quality_steps", type=int_in_range(1, 100_000), default=DEFAULT_RUN["train_steps"],
                        help="steps of each whole run (default: the default run's 3000)")
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help="comma-separated recipes of the quality part (default: all five)")
    parser.add_argument("--seeds", type=seed_list, default=[DEFAULT_RUN["seed"]],
                        help="comma-separated seeds of the quality part's runs (default: 0, the default run's)")
    parser.add_argument("--output", default=None,
                        help="where to write the JSON results (default: benchmarks/precision.json for the shipped "
                             f"record's command, python benchmarks/precision.py {' '.join(SHIPPED_ARGV)}; "
                             "runs/precision/precision.json for any other)")
    args = parser.parse_args(argv)
    route_outputs(args, {"output": str(REPO / "benchmarks" / "precision.json")},
                  settings_of(parser, args, SHIPPED_ARGV, ignore=("output",)), str(REPO / RUNS_FOLDER / "precision"))
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [p for p in args.parts if p not in ("speed", "inference", "quality")]
    unknown += [r for r in args.recipes if r not in RECIPES]
    if unknown or not args.parts:
        parser.error(f"unknown part or recipe: {', '.join(unknown) or '(none given)'} (parts: speed, inference, "
                     f"quality; recipes: {', '.join(RECIPES)})")
    return args


def main(argv=None):
    keep_freed_memory()  # as ddpm_train.py does
    args = parse_args(argv)
    check_writable(args.output, "--output")
    report = {"command": " ".join(["python", "benchmarks/precision.py", *(sys.argv[1:] if argv is None else argv)]),
              "machine": describe(), "native_bf16": native_bf16(CPU), "torch_threads": torch.get_num_threads()}
    if not report["native_bf16"]:
        print("warning: this CPU has no native bf16: the bf16 times below are of an emulation", file=sys.stderr)
    if "speed" in args.parts:
        report["speed"] = speed(args.rounds, lambda rows: print(f"speed: {len(rows)} workloads done", flush=True))
    if "inference" in args.parts:
        report["inference"] = inference_quality()
    if "quality" in args.parts:
        report["quality_steps"], report["quality_seeds"] = args.quality_steps, args.seeds
        report["quality"] = {r: recipe_runs(r, args.quality_steps, args.seeds, lambda s: print(s, flush=True))
                             for r in args.recipes}
    print(format_report(report))
    write_results(args.output, report)


if __name__ == "__main__":
    run(main)
