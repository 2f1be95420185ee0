"""Where the time of one default training step goes: torch.profiler, grouped by kind of work.

    python benchmarks/profile_step.py            # 256 px, 20 profiled steps, ~20 s; writes benchmarks/profile_step.json

Prints the share of the step spent in convolutions (forward, backward),
GroupNorm, SiLU, the optimizer and everything else; then, for every
convolution shape in the network, the forward and backward FLOP/s of that
convolution timed alone (the narrow full-resolution layers are where the
FLOP rate is lost), beside this machine's matrix-multiply peak measured in
the same run (benchmark.py's matmul_peak). The record names the machine.
Profiling adds a little overhead of its own; benchmark.py has the clean times.
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.benchmark import matmul_peak  # noqa: E402
from ddpm.cli import RUNS_FOLDER, at_defaults, keep_freed_memory, route_outputs  # noqa: E402
from ddpm.files import write_json  # noqa: E402
from ddpm.machine import describe  # noqa: E402
from ddpm.diffusion import NoiseSchedule  # noqa: E402
from ddpm.imaging import load_image  # noqa: E402
from ddpm.training import Trainer  # noqa: E402
from models.unet_model import UNet  # noqa: E402

# Kinds of work, by the name of the profiled operator (self time, so nothing is counted twice).
KINDS = [
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("mkldnn_convolution", "_convolution", "conv2d")),
    ("GroupNorm backward", ("native_group_norm_backward",)),
    ("GroupNorm forward", ("native_group_norm",)),
    ("SiLU backward", ("silu_backward",)),
    ("SiLU forward", ("aten::silu",)),
    ("optimizer and clipping", ("Optimizer.", "_fused_adam", "_foreach", "linalg_vector_norm", "clip_grad")),
]


def kind_of(name):
    for kind, keys in KINDS:
        if any(key in name for key in keys):
            return kind
    return "everything else (adds, concat, upsampling, copies, loss, ...)"


def format_tables(record):
    """The two Markdown tables of a record, as benchmarks/README.md shows them."""
    total = sum(record["ms_per_step"].values())
    lines = ["| kind of work | ms/step | share |", "|---|---:|---:|"]
    for kind, ms in sorted(record["ms_per_step"].items(), key=lambda item: -item[1]):
        lines.append(f"| {kind} | {ms:.1f} | {100 * ms / total:.0f}% |")
    lines += ["", "| convolution (in -> out channels, kernel, input side) | layers | forward GFLOP/s | backward GFLOP/s |",
              "|---|---:|---:|---:|"]
    for row in record["convolutions"]:
        cin, cout, kernel, stride, side = row["shape"]
        lines.append(f"| {cin} -> {cout}, {kernel}x{kernel}{', stride 2' if stride == 2 else ''}, {side} px "
                     f"| {row['layers']} | {row['forward_flops'] / 1e9:.0f} | {row['backward_flops'] / 1e9:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side, px")
    parser.add_argument("--steps", type=int, default=20, help="profiled training steps")
    parser.add_argument("--json", default=None,
                        help="where to write the record (default: benchmarks/profile_step.json at the default "
                             "settings, runs/profile_step/profile_step.json at any other, so that the shipped "
                             "record stays the documented command's)")
    args = parser.parse_args(argv)
    route_outputs(args, {"json": str(REPO / "benchmarks" / "profile_step.json")},
                  at_defaults(parser, args, ignore=("json",)), str(REPO / RUNS_FOLDER / "profile_step"))
    return args


def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory()  # as ddpm_train.py does

    torch.manual_seed(0)
    model = UNet().to(memory_format=torch.channels_last)
    x0 = load_image(str(REPO / "images" / "demo.png"), args.size)
    trainer = Trainer(model, x0, NoiseSchedule(), args.steps + 5, 1e-3, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        trainer.train_step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            trainer.train_step()

    by_kind = defaultdict(float)
    for event in prof.key_averages():
        by_kind[kind_of(event.key)] += event.self_cpu_time_total / 1e3 / args.steps  # ms per step
    convolutions = []
    for (cin, cout, kernel, stride, side), layers in conv_layers(model, x0).items():
        fwd, bwd = conv_rates(cin, cout, kernel, stride, side)
        convolutions.append({"shape": [cin, cout, kernel, stride, side], "layers": layers,
                             "forward_flops": fwd, "backward_flops": bwd})
    peak = matmul_peak(torch.device("cpu"))
    record = {"command": "python benchmarks/profile_step.py" + (f" --size {args.size}" if args.size != 256 else ""),
              "img_size": args.size, "profiled_steps": args.steps, "ms_per_step": dict(by_kind),
              "convolutions": convolutions, "peak_flops": peak["peak"], "peak_rates": peak["rates"],
              "machine": describe()}
    print(f"default training step at {args.size} px under the profiler: {sum(by_kind.values()):.1f} ms "
          f"({torch.get_num_threads()} threads, torch {torch.__version__}); matrix-multiply peak "
          f"{peak['peak'] / 1e9:.0f} GFLOP/s\n")
    print(format_tables(record))
    write_json(args.json, record)
    return record


def conv_layers(model, x0):
    """(in, out, kernel, stride, input side) -> how many of the network's convolutions have that shape."""
    shapes = defaultdict(int)

    def record(module, inputs, output):
        shapes[(module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0],
                inputs[0].shape[-1])] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x0.to(memory_format=torch.channels_last), torch.tensor([500]))
    for hook in hooks:
        hook.remove()
    return dict(sorted(shapes.items(), key=lambda item: (-item[0][4], item[0][0], item[0][1])))


def conv_rates(cin, cout, kernel, stride, side, repeats=10):
    """Forward and backward FLOP/s of one such convolution alone (backward: input and weight gradients)."""
    conv = torch.nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2).to(memory_format=torch.channels_last)
    x = torch.randn(1, cin, side, side).to(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn_like(conv(x))
    flops = 2 * cin * cout * kernel * kernel * (side // stride) ** 2
    forward, backward = [], []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        y = conv(x)
        middle = time.perf_counter()
        y.backward(grad)
        forward.append(middle - start)
        backward.append(time.perf_counter() - middle)
    return flops / statistics.median(forward[2:]), 2 * flops / statistics.median(backward[2:])


if __name__ == "__main__":
    main()
