"""Benchmark: this project's U-Net against peer U-Nets on the demo's own task, in one run.

    pip install -r benchmarks/requirements.txt
    python benchmarks/benchmark.py                    # about 30 minutes on 2 CPU cores
    python benchmarks/benchmark.py --precision bf16   # every model under the same bf16 autocast
    python benchmarks/benchmark.py --quick            # a smoke test: 32 px, a few steps

The task is the one ddpm_train.py does: fit ONE image under linear-interpolation
noising, x_t = (1 - w) x0 + w eps, with x0 as the target, batch 1. Every model
is trained by the same loop (ddpm/training.py: Adam, warm-up, cosine decay,
clipping) from the same seed, so each sees the same sequence of t and eps.
For each image size and each model it reports:

* parameters, and FLOPs per training step as torch.utils.flop_counter counts
  them (convolutions, matrix multiplies and attention, forward and backward;
  elementwise work and the optimizer are not counted; CPU_ATTENTION_FLOPS
  gives it the attention kernel of the CPU, which it would count as 0);
* the median step time over timed rounds, with its spread (25th-75th
  percentile). The models take turns within every round, and the ratio of each
  model's time to ours is taken round by round, so drift of the machine
  (clock, other load) falls on both sides of each ratio. Ours runs in the
  channels_last layout, as ddpm_train.py runs it; each peer in whichever of
  channels_last and the default layout a short trial finds faster for it;
* achieved FLOP/s and its fraction of the matrix-multiply peak measured at the
  start of the same run (on a CPU at the run's --precision, fp32 or bf16; bf16
  on a GPU); and the same from the step time of an uninterrupted training run
  (the equal-steps run below), which is what training really gets: in the
  rounds each model starts every few steps with caches full of another
  model's data;
* quality: PSNR of the one-step output at t = 500 against the image, after the
  same number of steps and after the same wall time (each model gets as many
  steps as fit in the time ours needed, from the measured step times);
* peak memory of a training step, measured in a child process per model
  (resident memory on a CPU, Linux only; allocated memory on a GPU);
* the end-to-end time of ``python ddpm_infer.py`` divided by the time of
  merely importing it (``python -c "import ddpm_infer"``: the script and every
  library it loads).

With --precision bf16 every model, ours and the peers, trains under the same bf16
autocast as ``ddpm_train.py --precision bf16`` (ddpm/precision.py), so the
ratios compare like with like.

Results are printed as a table and written to a JSON file (--json).
"""

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: ddpm/, models/ and benchmarks/ import

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402

from benchmarks import peers  # noqa: E402
from ddpm.cli import (MAX_SEED, RUNS_FOLDER, ArgumentParser, add_device_argument, at_defaults,  # noqa: E402
                      int_in_range, keep_freed_memory, pick_device, route_outputs, run, warn)
from ddpm.diffusion import NoiseSchedule, denoise, seeded_noise, training_losses  # noqa: E402
from ddpm.errors import UserError  # noqa: E402
from ddpm.files import check_writable, write_json  # noqa: E402
from ddpm.imaging import load_image  # noqa: E402
from ddpm.machine import cpu_name  # noqa: E402
from ddpm.metrics import psnr  # noqa: E402
from ddpm.precision import add_precision_argument, check_precision  # noqa: E402
from ddpm.training import Trainer  # noqa: E402
from models.unet_model import side_fits  # noqa: E402

IMAGE = REPO / "images" / "demo.png"
EVAL_T = 500  # quality is the one-step PSNR from this timestep, as ddpm_infer.py's default
LR = 1e-3  # ddpm_train.py's default
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# the shipped records: the default run, and the same run with --precision bf16
SHIPPED_RESULTS = {"fp32": str(REPO / "benchmarks" / "results.json"),
                   "bf16": str(REPO / "benchmarks" / "results_bf16.json")}


def sync(device):
    """Wait for queued GPU work, so that the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_rate(work, flops, device, repeats=10):
    """FLOP/s of the fastest of ``repeats`` calls of work(), after three warm-up calls."""
    for _ in range(3):
        work()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        sync(device)
        times.append(time.perf_counter() - start)
    return flops / min(times)


def matmul_peak(device, precision="fp32", side=64, channels=1024):
    """The matrix-multiply peak of this machine at ``precision``, FLOP/s, measured now.

    On a CPU: a (side^2 x channels) matrix times a (channels x channels) one
    (4096 x 1024 times 1024 x 1024 by default), as torch.mm (MKL's GEMM) and
    as the same product written as a 1x1 convolution over a side x side image
    (oneDNN's GEMM, the library that runs the network's convolutions; on some
    CPUs, AMD's among them, it is twice as fast as MKL's), in fp32, and for
    bf16 also with both operands in bf16 (what autocast hands those kernels).
    The peak is the fastest at the run's precision, so the fraction of peak is
    never flattered by a slow reference. On a GPU: bf16, 8192 x 8192 times
    8192 x 8192.
    """
    if device.type == "cuda":
        n = 8192
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        rate = best_rate(lambda: a @ b, 2 * n**3, device)
        return {"rates": {"torch.mm bf16": rate}, "peak": rate, "shape": [n, n, n]}
    m, k = side * side, channels
    a, b = torch.randn(m, k), torch.randn(k, k)
    image, kernel = matmul_as_conv(a, b, side)
    flops = 2 * m * k * k
    rates = {"torch.mm fp32": best_rate(lambda: a @ b, flops, device),
             "1x1 conv fp32": best_rate(lambda: F.conv2d(image, kernel), flops, device)}
    if precision == "bf16":
        a16, b16, image16, kernel16 = (x.to(torch.bfloat16) for x in (a, b, image, kernel))
        rates["torch.mm bf16"] = best_rate(lambda: a16 @ b16, flops, device)
        rates["1x1 conv bf16"] = best_rate(lambda: F.conv2d(image16, kernel16), flops, device)
    peak = max(rate for name, rate in rates.items() if name.endswith(precision))
    return {"rates": rates, "peak": peak, "shape": [m, k, k]}


def matmul_as_conv(a, b, side):
    """a (side^2, K) and b (K, N) as a 1x1 convolution: an image (1, K, side, side) in channels_last
    layout (pixel p's channels are row p of a, no copy) and a kernel (N, K, 1, 1) = b transposed.
    conv2d(image, kernel) permuted to (side^2, N) is a @ b."""
    image = a.view(1, side, side, a.shape[1]).permute(0, 3, 1, 2)
    kernel = b.t().contiguous().view(b.shape[1], b.shape[0], 1, 1)
    return image, kernel


def eval_input(x0, schedule, seed):
    """The noisy image every model is judged on: x0 noised to t = 500 with seeded eps (as ddpm_infer.py)."""
    return schedule.add_noise(x0, torch.tensor([EVAL_T]), seeded_noise(x0, seed))


def new_trainer(model, x0, schedule, steps, seed, device, precision="fp32"):
    """The training loop of ddpm_train.py, its random draws (every t and eps) seeded; ``precision`` bf16 runs
    the forward pass under ddpm_train.py's bf16 autocast, whichever network it is."""
    return Trainer(model, x0, schedule, steps, LR, generator=torch.Generator(device=device).manual_seed(seed),
                   precision=precision)


# torch's FlopCounterMode has formulas for the attention kernels of CUDA, but not for the one that
# F.scaled_dot_product_attention runs on a CPU, which it would count as 0 FLOPs. These give that kernel
# torch's own formulas for attention: softmax(q k^T) v is two batched matrix products forward; the
# backward pass is five, since this flash kernel recomputes q k^T rather than keep the attention matrix.
aten = torch.ops.aten
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, query, key, value, *args, out_shape=None, **kwargs:
            sdpa_backward_flop_count(grad_out, query, key, value),
}


def flops_per_step(model, x0, schedule, device):
    """FLOPs of one forward and backward pass of the training loss, on a copy of the model."""
    model = copy.deepcopy(model)
    generator = torch.Generator(device=device).manual_seed(0)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        losses, _ = training_losses(model, x0, schedule, generator=generator)
        losses.mean().backward()
    return counter.get_total_flops()


def time_steps(trainer, steps, device):
    """Seconds per training step, averaged over ``steps`` steps."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync(device)
    return (time.perf_counter() - start) / steps


def pick_memory_format(name, x0, schedule, device, seed, precision, rounds=3, steps=2):
    """The memory format this model trains in: ours as ddpm_train.py runs it (channels_last); each peer
    in whichever of the two formats is faster for it, by a short trial in which the formats alternate."""
    if name == peers.OURS:
        return "channels_last"
    trainers = {}
    for label, memory_format in MEMORY_FORMATS.items():
        model = peers.build(name, seed).to(device, memory_format=memory_format)
        trainers[label] = new_trainer(model, x0, schedule, 3 + rounds * steps, seed, device, precision)
        time_steps(trainers[label], 3, device)  # warm-up
    trials = {label: [] for label in trainers}
    for _ in range(rounds):
        for label, trainer in trainers.items():
            trials[label].append(time_steps(trainer, steps, device))
    return min(trials, key=lambda label: statistics.median(trials[label]))


def timed_rounds(names, formats, x0, schedule, device, seed, precision, rounds, steps_per_round, warmup):
    """Per model, the step time of every round; the models take turns within each round."""
    trainers = {}
    for name in names:
        model = peers.build(name, seed).to(device, memory_format=MEMORY_FORMATS[formats[name]])
        trainers[name] = new_trainer(model, x0, schedule, warmup + rounds * steps_per_round, seed, device,
                                     precision)
        trainers[name].model.train()
        time_steps(trainers[name], warmup, device)
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # who goes first rotates
        for name in order:
            times[name].append(time_steps(trainers[name], steps_per_round, device))
    return times


def train_and_score(name, fmt, x0, x_t, schedule, device, seed, precision, steps):
    """Train a fresh model for ``steps`` steps; return (PSNR of its one-step output at t = 500, seconds)."""
    model = peers.build(name, seed).to(device, memory_format=MEMORY_FORMATS[fmt])
    trainer = new_trainer(model, x0, schedule, steps, seed, device, precision)
    sync(device)
    start = time.perf_counter()
    trainer.run(show_progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    x0_hat = denoise(model, x_t.to(device), EVAL_T, schedule).cpu()
    return psnr(x0_hat, x0.cpu()), seconds


def memory_probe(name, size, device, fmt, seed, precision):
    """Run in a child process: the memory three training steps take above what was in use before, MiB."""
    schedule = NoiseSchedule()
    x0 = load_image(str(IMAGE), size).to(device)
    model = peers.build(name, seed).to(device, memory_format=MEMORY_FORMATS[fmt])  # imports its library
    # One step of a throwaway one-conv model first: what torch loads lazily on the first optimizer step
    # (tens of MB of modules) must not count against whichever model happens to come first.
    new_trainer(OneConv().to(device), x0[..., :8, :8], schedule, 1, seed, device).train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = resident_memory(reset_peak=True)["now"]
    trainer = new_trainer(model, x0, schedule, 3, seed, device, precision)
    trainer.run(show_progress=False)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resident_memory()["peak"]
    return (peak - before) / 2**20


class OneConv(torch.nn.Module):
    """The smallest network with our interface: x0_hat = conv1x1(x_t)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x_t, t):
        return self.conv(x_t)


def resident_memory(reset_peak=False):
    """This process's resident memory now and its peak, in bytes, from Linux's /proc/self/status.

    (Not getrusage's ru_maxrss: that survives exec, so a child started by a big parent would report
    the parent's size.) ``reset_peak`` first sets the peak to the current size (/proc/self/clear_refs).
    """
    if reset_peak:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024  # reported in kB
    return {"now": fields["VmRSS"], "peak": fields["VmHWM"]}


def measure_memory(name, size, device, fmt, seed, precision):
    """memory_probe in a fresh interpreter, so one model's peak cannot hide another's."""
    command = [sys.executable, str(Path(__file__).resolve()), "--_memory_probe", name, "--sizes", str(size),
               "--device", device.type, "--seed", str(seed), "--_format", fmt, "--precision", precision]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def infer_overhead(device, precision, repeats):
    """Median seconds of ``python ddpm_infer.py`` and of importing it, alternating; and their ratio."""
    with tempfile.TemporaryDirectory() as scratch:
        run_it = [sys.executable, "ddpm_infer.py", "--result_path", os.path.join(scratch, "result.png"),
                  "--device", device.type, "--precision", precision]
        import_it = [sys.executable, "-c", "import ddpm_infer"]
        times = {"run": [], "import": []}
        for _ in range(repeats):
            for key, command in (("import", import_it), ("run", run_it)):
                start = time.perf_counter()
                subprocess.run(command, cwd=REPO, check=True, capture_output=True)
                times[key].append(time.perf_counter() - start)
    run_s, import_s = statistics.median(times["run"]), statistics.median(times["import"])
    return {"run_s": run_s, "import_s": import_s, "ratio": run_s / import_s, "repeats": repeats}


def percentile(values, q):
    """The q-quantile (0..1) of values, linearly interpolated."""
    values = sorted(values)
    position = q * (len(values) - 1)
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def bench_size(size, names, args, device, peak, log):
    """Every measurement at one image size. Returns name -> dict of results."""
    schedule = NoiseSchedule()
    x0 = load_image(str(IMAGE), size).to(device)
    x_t = eval_input(x0.cpu(), schedule, args.seed)
    results = {name: {"description": peers.MODELS[name][0]} for name in names}
    for name in names:
        model = peers.build(name, args.seed).to(device)
        results[name]["params"] = peers.parameter_count(model)
        results[name]["flops_per_step"] = flops_per_step(model, x0, schedule, device)
        results[name]["memory_format"] = pick_memory_format(name, x0, schedule, device, args.seed, args.precision)
    peers.check_parameter_budget({name: r["params"] for name, r in results.items()})
    log(f"{size} px: timing {args.rounds} rounds of {args.steps_per_round} steps")

    formats = {name: r["memory_format"] for name, r in results.items()}
    times = timed_rounds(names, formats, x0, schedule, device, args.seed, args.precision, args.rounds,
                         args.steps_per_round, args.warmup)
    for name in names:
        step_s = statistics.median(times[name])
        ratios = [mine / ours for mine, ours in zip(times[name], times[peers.OURS])]
        results[name].update({
            "step_ms": step_s * 1e3,
            "step_ms_p25": percentile(times[name], 0.25) * 1e3,
            "step_ms_p75": percentile(times[name], 0.75) * 1e3,
            "ratio_to_ours": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "flops_per_s": results[name]["flops_per_step"] / step_s,
            "fraction_of_peak": results[name]["flops_per_step"] / step_s / peak,
        })

    ours_step_s = results[peers.OURS]["step_ms"] / 1e3
    for name in names:
        log(f"{size} px: training {name}")
        r = results[name]
        r["psnr_equal_steps"], r["seconds_equal_steps"] = train_and_score(
            name, r["memory_format"], x0, x_t, schedule, device, args.seed, args.precision, args.quality_steps)
        r["step_ms_continuous"] = r["seconds_equal_steps"] / args.quality_steps * 1e3
        r["fraction_of_peak_continuous"] = r["flops_per_step"] / (r["step_ms_continuous"] / 1e3) / peak
        if name == peers.OURS:
            r["steps_equal_time"], r["psnr_equal_time"] = args.quality_steps, r["psnr_equal_steps"]
        else:  # as many steps as fit in the time ours took for quality_steps, by the measured step times
            r["steps_equal_time"] = max(1, round(args.quality_steps * ours_step_s / (r["step_ms"] / 1e3)))
            r["psnr_equal_time"], _ = train_and_score(
                name, r["memory_format"], x0, x_t, schedule, device, args.seed, args.precision,
                r["steps_equal_time"])
        if not args.skip_memory:
            r["peak_memory_mb"] = measure_memory(name, size, device, r["memory_format"], args.seed, args.precision)
    return results


def format_table(size, results, quality_steps):
    """The results at one size as a Markdown table."""
    lines = [
        f"**{size} x {size} px**, batch 1; PSNR at t = {EVAL_T} after {quality_steps} steps, and after "
        f"the wall time ours needs for {quality_steps} steps",
        "",
        "| model | params | GFLOP/step | ms/step (p25-p75) | time vs ours (min-max) | GFLOP/s | % of peak "
        "| ms/step, % of peak in a run | PSNR, equal steps | PSNR, equal time (steps) | peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        memory = f"{r['peak_memory_mb']:.0f}" if "peak_memory_mb" in r else "-"
        lines.append(
            f"| {name} | {r['params']:,} | {r['flops_per_step'] / 1e9:.2f} "
            f"| {r['step_ms']:.1f} ({r['step_ms_p25']:.1f}-{r['step_ms_p75']:.1f}) "
            f"| {r['ratio_to_ours']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) "
            f"| {r['flops_per_s'] / 1e9:.0f} | {100 * r['fraction_of_peak']:.0f}% "
            f"| {r['step_ms_continuous']:.1f}, {100 * r['fraction_of_peak_continuous']:.0f}% "
            f"| {r['psnr_equal_steps']:.2f} dB | {r['psnr_equal_time']:.2f} dB ({r['steps_equal_time']}) "
            f"| {memory} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,128,256",
                        help="image sides to measure, comma-separated (multiples of 8 from 16 to 1024)")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated subset of {','.join(peers.MODELS)} (default: all installed)")
    parser.add_argument("--rounds", type=int_in_range(1, 1000), default=12,
                        help="timed rounds; every model runs in each")
    parser.add_argument("--steps_per_round", type=int_in_range(1, 1000), default=3,
                        help="training steps per model per round")
    parser.add_argument("--warmup", type=int_in_range(0, 1000), default=5,
                        help="untimed steps per model before the rounds")
    parser.add_argument("--quality_steps", type=int_in_range(1, 100_000), default=300,
                        help="training steps for the equal-steps PSNR")
    parser.add_argument("--infer_repeats", type=int_in_range(1, 100), default=5, help="runs of ddpm_infer.py to time")
    parser.add_argument("--skip_memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--skip_infer", action="store_true", help="do not time ddpm_infer.py")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 32 px, 2 rounds, 10 quality steps, 1 inference run")
    parser.add_argument("--seed", type=int_in_range(0, MAX_SEED), default=0,
                        help="seed of the weights and of every t and eps")
    add_device_argument(parser)
    add_precision_argument(parser)
    parser.add_argument("--json", default=None,
                        help="where to write the results (default: benchmarks/results.json for the default "
                             "settings, benchmarks/results_bf16.json for them with --precision bf16; the same "
                             "name under runs/benchmark/ for any other, so that a shipped record stays the "
                             "documented command's)")
    parser.add_argument("--_memory_probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_format", default="contiguous", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # the shipped record's run: every setting at its default (or bf16) and every peer installed
    shipped_run = at_defaults(parser, args, ignore=("json", "precision")) and peers.available() == list(peers.MODELS)
    route_outputs(args, {"json": SHIPPED_RESULTS[args.precision]}, shipped_run, str(REPO / RUNS_FOLDER / "benchmark"))
    if args.quick:
        args.sizes, args.rounds, args.quality_steps, args.warmup, args.infer_repeats = "32", 2, 10, 1, 1
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    bad = [s for s in args.sizes if not (16 <= s <= 1024 and side_fits(s, levels=4))]
    if bad:
        parser.error(f"--sizes: {bad[0]} does not fit the four-level U-Nets (a multiple of 8 from 16 to 1024)")
    names = args.models.split(",") if args.models else peers.available()
    unknown = [n for n in names if n not in peers.MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(peers.MODELS)}")
    missing = [n for n in names if n not in peers.available()]
    if missing:
        parser.error(f"{missing[0]!r} needs {peers.MODELS[missing[0]][1]}: pip install -r benchmarks/requirements.txt")
    args.models = [peers.OURS] + [n for n in names if n != peers.OURS]  # ours is the reference
    return args


def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory()  # as ddpm_train.py does, for every model alike
    device = pick_device(args.device)
    if args._memory_probe:
        print(memory_probe(args._memory_probe, args.sizes[0], device, args._format, args.seed, args.precision))
        return None
    check_writable(args.json, "--json")  # before half an hour of work, not after
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    check_precision(args.precision, device, warn)
    peak = matmul_peak(device, args.precision)
    log("matmul peak " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak["rates"].items()))
    report = {
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])]),
        "machine": {"device": str(device), "platform": platform.platform(), "processor": cpu_name(),
                    "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **{peers.MODELS[n][1]: library_version(peers.MODELS[n][1]) for n in args.models[1:]}},
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "json"},
        "matmul_peak": peak,
        "sizes": {},
    }
    for size in args.sizes:
        report["sizes"][str(size)] = bench_size(size, args.models, args, device, peak["peak"], log)
    if not args.skip_infer:
        log("timing ddpm_infer.py")
        report["infer"] = infer_overhead(device, args.precision, args.infer_repeats)
    report["seconds"] = time.perf_counter() - started

    print(format_report(report))
    write_results(args.json, report)
    return report


def write_results(path, data):
    """Write the results as JSON, atomically; a failure is one error line (the tables are printed already)."""
    try:
        write_json(path, data)
    except OSError as exc:
        raise UserError(f"could not write {path!r} ({exc.strerror or exc}); the results are printed above") from None
    print(f"\nwrote {path}")


def library_version(package):
    from importlib.metadata import version

    return version(package.replace("_", "-"))


def format_report(report):
    """The whole report as Markdown: machine, peak, one table per size, the inference overhead."""
    m, peak = report["machine"], report["matmul_peak"]
    precision = report["settings"].get("precision", "fp32")  # records older than --precision are fp32
    header = [
        f"`{report['command']}` on {m['gpu'] or m['processor'] or m['platform']} "
        f"({m['device']}, {m['torch_threads']} threads, {precision}), "
        f"torch {report['versions']['torch']}",
        "",
        "Matrix-multiply peak, measured in this run: "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak["rates"].items())
        + f"; peak at {precision} = {peak['peak'] / 1e9:.0f} GFLOP/s",
    ]
    tables = [format_table(size, results, report["settings"]["quality_steps"])
              for size, results in report["sizes"].items()]
    footer = []
    if "infer" in report:
        i = report["infer"]
        footer = [f"`python ddpm_infer.py` end to end: {i['run_s']:.2f} s; `python -c \"import ddpm_infer\"`: "
                  f"{i['import_s']:.2f} s; ratio {i['ratio']:.2f} (medians of {i['repeats']})"]
    footer.append(f"Benchmark wall time: {report['seconds'] / 60:.1f} min")
    return "\n\n".join(["\n".join(header), *tables, *footer])


if __name__ == "__main__":
    run(main)
