"""How fast the explorer page runs the networks: ms per denoising step in headless Chromium, on 1 and 2 threads.

    python benchmarks/explorer.py            # about 2 minutes on 2 cores; writes benchmarks/explorer.json

It serves the page as ``python ddpm_explore.py`` does, opens it in the system's
Chromium (ddpm/chromium.py) once with ?threads=1 and once with ?threads=2, and
times, in the page itself:

* the denoiser: 256 px, one image per step (explorer.denoise, 10 steps from t = 1000);
* the conditional digit generator: 8 digits of 28 px per step, guided (S = 2, so a batch of 16);
* the unconditional digit generator: 8 digits per step (a batch of 8).

Each figure is the median of the steps after the first (which also warms the runtime up), over
``--rounds`` calls. The same networks in PyTorch on this machine's CPU are timed beside them.
"""

import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ddpm.checkpoint import load_checkpoint  # noqa: E402
from ddpm.chromium import EXPLORER_READY, Chromium, find_chromium  # noqa: E402
from ddpm.cli import RUNS_FOLDER, ArgumentParser, at_defaults, int_in_range, route_outputs, run, say  # noqa: E402
from ddpm.errors import UserError  # noqa: E402
from ddpm.files import check_writable, write_json  # noqa: E402
from ddpm.guidance import Guided  # noqa: E402
from ddpm.machine import describe  # noqa: E402

COUNT = 8  # digits per generation step
WORKLOADS = {  # name -> (what the page is asked, the checkpoint, its batch)
    "denoiser 256 px, batch 1": ("explorer.denoise({t: 1000, seed: 0, steps: 10})", "model_ckpt/demo_unet.pth", 1),
    "conditional digits, 8 guided (batch 16)":
        (f"explorer.generate({{label: 7, guidance: 2, steps: 10, seed: 0, count: {COUNT}}})",
         "model_ckpt/digits_cond_unet.pth", 2 * COUNT),
    "unconditional digits, batch 8":
        (f"explorer.generate({{label: null, steps: 10, seed: 0, count: {COUNT}}})", "model_ckpt/digits_unet.pth",
         COUNT),
}


def parse_args(argv=None):
    parser = ArgumentParser(description="Time the explorer page's networks in headless Chromium on 1 and 2 threads.")
    parser.add_argument("--rounds", type=int_in_range(1, 100), default=3, help="calls per workload and thread count")
    parser.add_argument("--json", default=None,
                        help="where to write the record (default: benchmarks/explorer.json with the default "
                             "--rounds, runs/explorer/explorer.json with any other)")
    args = parser.parse_args(argv)
    route_outputs(args, {"json": str(REPO / "benchmarks" / "explorer.json")},
                  at_defaults(parser, args, ignore=("json",)), str(REPO / RUNS_FOLDER / "explorer"))
    return args


def step_times(browser, call):
    """ms of each step after the first, as the page measures them (performance.now) in one call."""
    return browser.evaluate(f"{call}.then(result => result.step_ms.slice(1))")


def pytorch_ms(checkpoint, batch, rounds):
    """Median ms of one forward pass of the checkpoint's network in PyTorch on this CPU."""
    model, _, data = load_checkpoint(str(REPO / checkpoint))
    size = data["data"]["img_size"]
    if model.null_class is not None:
        model = Guided(model, torch.full((batch // 2,), 7), 2.0)
        batch //= 2
    x, t = torch.randn(batch, 3, size, size), torch.full((batch,), 500)
    times = []
    with torch.inference_mode():
        for _ in range(rounds * 10 + 1):
            start = time.perf_counter()
            model(x, t)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[1:])


def format_table(record):
    """The Markdown table of a record, as benchmarks/README.md shows it."""
    machine = record["machine"]
    lines = [f"`{record['command']}` on {machine['cpu']} ({', '.join(machine['cpu_flags'])}), {record['browser']}, "
             f"{record['runtime']}; PyTorch {machine['torch']} on {record['pytorch_threads']} threads", "",
             "| network, per denoising step | browser, 1 thread | browser, 2 threads | PyTorch, same CPU |",
             "|---|---:|---:|---:|"]
    for name, row in record["workloads"].items():
        lines.append(f"| {name} | {row['browser_1_thread_ms']:.0f} ms | {row['browser_2_thread_ms']:.0f} ms | "
                     f"{row['pytorch_cpu_ms']:.0f} ms |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    check_writable(args.json, "record")
    executable = find_chromium()
    if executable is None:
        raise UserError("no Chromium on PATH (apt-get install chromium)")
    import ddpm_explore

    server = ddpm_explore.make_server("127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/explorer/"
    rows = {name: {} for name in WORKLOADS}
    try:
        for threads in (1, 2):
            browser = Chromium(executable)
            try:
                browser.open(f"{url}?threads={threads}")
                stats = browser.evaluate(EXPLORER_READY)
                assert stats["threads"] == threads, stats
                for name, (call, _, _) in WORKLOADS.items():
                    times = [ms for _ in range(args.rounds) for ms in step_times(browser, call)]
                    rows[name][f"browser_{threads}_thread_ms"] = round(statistics.median(times), 1)
                    say(f"{name}: {threads} thread(s) {statistics.median(times):.0f} ms per step")
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()
    torch.set_num_threads(2)
    for name, (_, checkpoint, batch) in WORKLOADS.items():
        rows[name]["pytorch_cpu_ms"] = round(pytorch_ms(checkpoint, batch, args.rounds), 1)
    chromium = subprocess.run([executable, "--version"], capture_output=True, text=True).stdout.strip()
    record = {"command": "python benchmarks/explorer.py", "rounds": args.rounds, "workloads": rows,
              "browser": chromium, "runtime": stats["runtime"], "machine": describe(),
              "pytorch_threads": 2}
    write_json(args.json, record)
    say(format_table(record))


if __name__ == "__main__":
    run(main)
