"""Do the two process-wide tunings pay, and for which script? gc.freeze() and keep_freed_memory(), measured.

    python benchmarks/process_tuning.py          # about 12 minutes on 2 CPU cores

* gc.freeze() (in ddpm/cli.py, run): moves every object alive when the script starts its work (the
  ~10^5 that importing torch and matplotlib create) out of reach of Python's cycle collector, which
  would otherwise rescan them at every full collection;
* keep_freed_memory() (ddpm/cli.py): glibc's malloc keeps freed blocks of up to 32 MiB for reuse
  instead of handing each back to the kernel and faulting it in again.

Each script runs end to end, as a user runs it, in a fresh process: as the code is, and with one
tuning flipped (taken away where the code applies it, added where it does not). The variants take
turns for several rounds; the table gives the median seconds and the median of the round-by-round
ratio flipped / as is (above 1: the code's choice is the faster one).
"""

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.benchmark import write_results  # noqa: E402
from ddpm.cli import RUNS_FOLDER, ArgumentParser, at_defaults, int_in_range, route_outputs, run  # noqa: E402
from ddpm.files import check_writable  # noqa: E402
from ddpm.machine import describe  # noqa: E402

# Runs one script in this process with one tuning flipped; argv: flip, script, KEEPS_FREED_MEMORY, script args
FLIP = """
import gc, runpy, sys
flip, script, APPLIED = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
sys.path.insert(0, ".")  # the repository, as a script run with python <script> from there finds it
import ddpm.cli
if flip == "gc.freeze":
    gc.freeze = lambda: None  # the scripts' run() would freeze; now it cannot
elif flip == "keep_freed_memory":
    if script in APPLIED:  # applied there: take it away
        ddpm.cli.keep_freed_memory = lambda: None
    else:  # not applied there: add it, as early as the training script does
        ddpm.cli.keep_freed_memory()
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
"""
TUNINGS = ("gc.freeze", "keep_freed_memory")
# the scripts whose main() calls keep_freed_memory(); gc.freeze() is in run(), which every script calls
KEEPS_FREED_MEMORY = ("ddpm_train.py", "ddpm_sample.py")


def commands(scratch):
    """The scripts as a learner runs them, writing to a scratch folder: what each tuning is judged on."""
    return {
        "python ddpm_infer.py": ["ddpm_infer.py", "--result_path", f"{scratch}/result.png"],
        "python ddpm_sample.py --num_samples 4 --steps 10": [
            "ddpm_sample.py", "--num_samples", "4", "--steps", "10", "--output_dir", f"{scratch}/samples"],
        "python ddpm_train.py --train_steps 40": [
            "ddpm_train.py", "--train_steps", "40", "--eval_every", "0", "--save_every", "0",
            "--model_save_path", f"{scratch}/model.pth"],
    }


def seconds(flip, argv):
    """Wall time of one whole run of the script, in a fresh process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLIP, flip, argv[0], ",".join(KEEPS_FREED_MEMORY), *argv[1:]], cwd=REPO,
                   check=True, capture_output=True)
    return time.perf_counter() - start


def measure(argv, rounds):
    """Per tuning: median seconds as is and flipped, and the median round-by-round ratio flipped / as is."""
    times = {name: [] for name in ("as is", *TUNINGS)}
    ratios = {name: [] for name in TUNINGS}
    seconds("none", argv)  # warm the file cache
    for r in range(rounds):
        order = ["as is", *TUNINGS]
        this_round = {name: seconds(name if name != "as is" else "none", argv)
                      for name in (order if r % 2 == 0 else order[::-1])}
        for name, value in this_round.items():
            times[name].append(value)
        for name in TUNINGS:
            ratios[name].append(this_round[name] / this_round["as is"])
    return {"as_is_s": statistics.median(times["as is"]),
            **{name: {"flipped_s": statistics.median(times[name]), "ratio": statistics.median(ratios[name]),
                      "ratio_min": min(ratios[name]), "ratio_max": max(ratios[name])} for name in TUNINGS}}


def format_table(rows):
    lines = ["| script | as is, s | without / with gc.freeze() | keep_freed_memory() flipped, ratio |",
             "|---|---:|---:|---:|"]
    for command, r in rows.items():
        cells = [f"{r[name]['ratio']:.3f} ({r[name]['ratio_min']:.2f}-{r[name]['ratio_max']:.2f})"
                 for name in TUNINGS]
        lines.append(f"| `{command}` | {r['as_is_s']:.2f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int_in_range(1, 100), default=5, help="alternating rounds per script")
    parser.add_argument("--json", default=None,
                        help="where to write the results (default: benchmarks/process_tuning.json with the "
                             "default --rounds, runs/process_tuning/process_tuning.json with any other)")
    args = parser.parse_args(argv)
    route_outputs(args, {"json": str(REPO / "benchmarks" / "process_tuning.json")},
                  at_defaults(parser, args, ignore=("json",)), str(REPO / RUNS_FOLDER / "process_tuning"))
    return args


def main(argv=None):
    args = parse_args(argv)
    check_writable(args.json, "--json")
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for command, script_argv in commands(scratch).items():
            print(f"{command} ...", file=sys.stderr, flush=True)
            rows[command] = measure(script_argv, args.rounds)
    table = format_table(rows)
    print(table)
    write_results(args.json, {
        "command": " ".join(["python", "benchmarks/process_tuning.py", *(argv or sys.argv[1:])]),
        "machine": describe(),
        "rounds": args.rounds, "keeps_freed_memory": list(KEEPS_FREED_MEMORY), "rows": rows, "table": table,
    })
    return rows


if __name__ == "__main__":
    run(main)
