"""Ablations: what each speed measure of the training step is worth, measured, one at a time.

    python benchmarks/ablations.py              # about 4 minutes on 2 CPU cores: runs/ablations/ablations.json
    python benchmarks/ablations.py --compile    # also torch.compile (5 minutes in all): benchmarks/ablations.json

Each row compares the default training step of ddpm_train.py (256 px, batch 1)
with the same step with ONE measure switched off (or, for torch.compile,
switched on). The two variants take turns for several rounds and the ratio is
taken round by round, as in benchmark.py, so drift of the machine cancels.

* channels_last memory layout of the network vs PyTorch's default (NCHW);
* GroupNorm computed on default-layout copies (its CPU backward kernel is
  faster there) vs on the channels_last tensors;
* fused Adam and one multi-tensor gradient norm vs per-tensor Adam and clipping;
* keep_freed_memory() (glibc malloc keeps freed activations) vs malloc's
  defaults: a process setting, so each variant runs in its own child process,
  alternating, and the page faults per step are reported too;
* torch.compile of the network (opt-in, --compile).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.benchmark import write_results  # noqa: E402
from ddpm.cli import (RUNS_FOLDER, ArgumentParser, int_in_range, keep_freed_memory, route_outputs, run,  # noqa: E402
                      settings_of)
from ddpm.files import check_writable  # noqa: E402
from ddpm.machine import describe  # noqa: E402
from ddpm.diffusion import NoiseSchedule  # noqa: E402
from ddpm.imaging import load_image  # noqa: E402
from ddpm.training import Trainer  # noqa: E402
from models.unet_model import UNet, side_fits  # noqa: E402

IMAGE = REPO / "images" / "demo.png"


class PerTensorTrainer(Trainer):
    """The Trainer with torch's per-tensor Adam and per-tensor gradient norm (the pre-fused way)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.multi_tensor = False  # train_step's clipping then takes one norm per tensor
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.optimizer.defaults["lr"], foreach=False)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_schedule.lr_lambdas[0])


class GroupNormOnNCHW(torch.nn.GroupNorm):
    """GroupNorm computed on a default-layout copy, its result copied back to channels_last: PyTorch's CPU
    GroupNorm backward is much faster on the default layout; do the copies cost less than that saves?"""

    def forward(self, x):
        y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
        return y.contiguous(memory_format=torch.channels_last)


def default_trainer(x0, steps, channels_last=True, trainer_class=Trainer, compiled=False, nchw_group_norm=False):
    torch.manual_seed(0)
    model = UNet()
    if nchw_group_norm:
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.__class__ = GroupNormOnNCHW  # same parameters, another forward
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainer = trainer_class(model, x0, NoiseSchedule(), steps, 1e-3, generator=torch.Generator().manual_seed(0))
    if compiled:
        # the forward pass runs trainer.network; trainer.model, the optimizer and clipping keep the parameters
        trainer.network = torch.compile(trainer.network)
    return trainer


def seconds_per_step(trainer, steps):
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - start) / steps


def in_process_pair(baseline, variant, rounds, steps, warmup):
    """Median seconds per step of each, and the median of the per-round ratios variant / baseline."""
    for trainer in (baseline, variant):
        seconds_per_step(trainer, warmup)
    times = {"baseline": [], "variant": []}
    for r in range(rounds):
        order = [("baseline", baseline), ("variant", variant)]
        for key, trainer in order if r % 2 == 0 else reversed(order):
            times[key].append(seconds_per_step(trainer, steps))
    ratios = [v / b for b, v in zip(times["baseline"], times["variant"])]
    return summary(times, ratios)


def summary(times, ratios):
    return {"baseline_ms": statistics.median(times["baseline"]) * 1e3,
            "variant_ms": statistics.median(times["variant"]) * 1e3,
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def allocator_child(mode, size, steps, warmup):
    """In a child process: seconds per step and page faults per step, with or without keep_freed_memory."""
    if mode == "kept":
        keep_freed_memory()
    trainer = default_trainer(load_image(str(IMAGE), size), warmup + steps)
    seconds_per_step(trainer, warmup)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = seconds_per_step(trainer, steps)
    return {"seconds": seconds, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps}


def allocator_pair(size, rounds, steps, warmup):
    times, faults, ratios = {"baseline": [], "variant": []}, {"baseline": [], "variant": []}, []
    for r in range(rounds):
        result = {}
        for key, mode in (("baseline", "kept"), ("variant", "default"))[:: 1 if r % 2 == 0 else -1]:
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_allocator_child", mode,
                                   "--size", str(size), "--steps", str(steps), "--warmup", str(warmup)],
                                  capture_output=True, text=True, check=True)
            result[key] = json.loads(done.stdout)
            times[key].append(result[key]["seconds"])
            faults[key].append(result[key]["faults"])
        ratios.append(result["variant"]["seconds"] / result["baseline"]["seconds"])
    row = summary(times, ratios)
    row.update(baseline_faults_per_step=statistics.median(faults["baseline"]),
               variant_faults_per_step=statistics.median(faults["variant"]))
    return row


def format_table(rows):
    """The comparisons as a Markdown table."""
    lines = ["| change to the default step | default ms/step | changed ms/step | changed / default (min-max) |",
             "|---|---:|---:|---:|"]
    for name, r in rows.items():
        extra = ""
        if "baseline_faults_per_step" in r:
            extra = f"; page faults per step {r['baseline_faults_per_step']:,.0f} -> {r['variant_faults_per_step']:,.0f}"
        if "compile_s" in r:
            extra = f"; first step (compiling) {r['compile_s']:.0f} s"
        lines.append(f"| {name}{extra} | {r['baseline_ms']:.1f} | {r['variant_ms']:.1f} "
                     f"| {r['ratio']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) |")
    return "\n".join(lines)


SHIPPED_ARGV = ["--compile"]  # the shipped record's command: python benchmarks/ablations.py --compile


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int_in_range(16, 1024), default=256, help="image side, px (a multiple of 8)")
    parser.add_argument("--rounds", type=int_in_range(1, 1000), default=8, help="alternating rounds per comparison")
    parser.add_argument("--steps", type=int_in_range(1, 1000), default=5, help="training steps per variant per round")
    parser.add_argument("--warmup", type=int_in_range(0, 1000), default=3, help="untimed steps first")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    parser.add_argument("--json", default=None,
                        help="where to write the results (default: benchmarks/ablations.json for the shipped "
                             "record's command, python benchmarks/ablations.py --compile; "
                             "runs/ablations/ablations.json for any other)")
    parser.add_argument("--_allocator_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not side_fits(args.size, levels=4):
        parser.error(f"--size {args.size} does not fit the four-level U-Net (a multiple of 8)")
    route_outputs(args, {"json": str(REPO / "benchmarks" / "ablations.json")},
                  settings_of(parser, args, SHIPPED_ARGV, ignore=("json", "_allocator_child")),
                  str(REPO / RUNS_FOLDER / "ablations"))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args._allocator_child:
        print(json.dumps(allocator_child(args._allocator_child, args.size, args.steps, args.warmup)))
        return None

    check_writable(args.json, "--json")
    x0 = load_image(str(IMAGE), args.size)
    total = args.warmup + args.rounds * args.steps
    rows = {}
    print("allocator (child processes)...", file=sys.stderr, flush=True)
    rows["malloc defaults instead of keep_freed_memory()"] = allocator_pair(args.size, args.rounds, args.steps,
                                                                           args.warmup)
    keep_freed_memory()  # the in-process comparisons run as ddpm_train.py does
    print("memory layout...", file=sys.stderr, flush=True)
    rows["NCHW instead of channels_last"] = in_process_pair(
        default_trainer(x0, total), default_trainer(x0, total, channels_last=False),
        args.rounds, args.steps, args.warmup)
    print("GroupNorm layout...", file=sys.stderr, flush=True)
    rows["GroupNorm on default-layout copies"] = in_process_pair(
        default_trainer(x0, total), default_trainer(x0, total, nchw_group_norm=True),
        args.rounds, args.steps, args.warmup)
    print("optimizer...", file=sys.stderr, flush=True)
    rows["per-tensor Adam and clipping instead of fused / foreach"] = in_process_pair(
        default_trainer(x0, total), default_trainer(x0, total, trainer_class=PerTensorTrainer),
        args.rounds, args.steps, args.warmup)
    if args.compile:
        print("torch.compile (compiling)...", file=sys.stderr, flush=True)
        compiled = default_trainer(x0, total + 1, compiled=True)
        start = time.perf_counter()
        compiled.train_step()  # the first step compiles forward and backward
        compile_s = time.perf_counter() - start
        rows["torch.compile of the network"] = in_process_pair(default_trainer(x0, total), compiled,
                                                               args.rounds, args.steps, args.warmup)
        rows["torch.compile of the network"]["compile_s"] = compile_s

    command = (f"`python {' '.join(['benchmarks/ablations.py', *(argv or sys.argv[1:])])}`: default training "
               f"step at {args.size} px, batch 1, torch {torch.__version__}, {torch.get_num_threads()} threads")
    lines = [command, "", format_table(rows)]
    print("\n".join(lines))
    write_results(args.json, {"command": command, "machine": describe(), "rows": rows})
    return rows


if __name__ == "__main__":
    run(main)
