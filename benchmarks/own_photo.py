"""How long the first command of "Train on your own photo" takes at each size, and how good it gets.

    python benchmarks/own_photo.py           # 64, 128 and 256 px: about 30 minutes on 2 cores; writes benchmarks/own_photo.json

For each --img_size it runs, as a learner would,

    python ddpm_train.py --image_path images/astronaut.png --img_size S --model_save_path runs/own_photo/...

(3,000 steps, the default recipe) and reads the run record that the training wrote: the wall
time, the PSNR of one-step denoising at t = 500 at the end (what ``ddpm_infer.py`` prints for that
model) and when it first passed 38 dB. The table goes to benchmarks/own_photo.json with the machine.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ddpm.cli import RUNS_FOLDER, ArgumentParser, run, say  # noqa: E402
from ddpm.files import check_writable, write_json  # noqa: E402
from ddpm.machine import describe  # noqa: E402

PHOTO = "images/astronaut.png"
SIZES = (64, 128, 256)
TARGET_DB = 38.0  # the milestone the table quotes


def parse_args(argv=None):
    parser = ArgumentParser(description="Time the own-photo training command at 64, 128 and 256 px.")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "own_photo.json"), help="where to write the record")
    return parser.parse_args(argv)


def train(size):
    """Run the learner's command at ``size`` px; return its run record."""
    model = REPO / RUNS_FOLDER / "own_photo" / f"astronaut_{size}_unet.pth"
    subprocess.run([sys.executable, "ddpm_train.py", "--image_path", PHOTO, "--img_size", str(size),
                    "--model_save_path", str(model)], cwd=REPO, check=True)
    return json.loads(model.with_suffix(".json").read_text())


def row(size, record):
    passed = next((m["seconds"] for m in record["psnr_milestones"] if m["psnr_db"] == TARGET_DB), None)
    return {"img_size": size, "train_steps": record["train_steps"], "wall_time_s": record["wall_time_s"],
            "final_psnr_db": record["quality"]["psnr_db"][-1], "passed_38_db_after_s": passed,
            "machine": record["machine"]}


# the table's header, "never" and the unit of seconds, in the two languages of docs/reference
LABELS = {"en": ("`--img_size`", "3,000 steps", "PSNR at the end", "passed 38 dB after", "never", "{:,.0f} s"),
          "zh": ("`--img_size`", "3000 步", "结束时的 PSNR", "超过 38 dB 用时", "从未", "{:.0f} 秒")}


def format_table(record, language="en"):
    """The Markdown table of a record, as docs/reference.md (or .zh.md) shows it."""
    *header, never, seconds = LABELS[language]
    lines = ["| " + " | ".join(header) + " |", "| ---: | ---: | ---: | ---: |"]
    for r in record["rows"]:
        passed = seconds.format(r["passed_38_db_after_s"]) if r["passed_38_db_after_s"] is not None else never
        lines.append(f"| {r['img_size']} | {seconds.format(r['wall_time_s'])} | {r['final_psnr_db']:.2f} dB | {passed} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    check_writable(args.json, "record")
    rows = []
    for size in SIZES:
        rows.append(row(size, train(size)))
        say(f"{size} px: {rows[-1]['wall_time_s']:.0f} s, {rows[-1]['final_psnr_db']:.2f} dB")
    record = {"command": "python benchmarks/own_photo.py", "photo": PHOTO, "rows": rows, "machine": describe()}
    write_json(args.json, record)
    say(format_table(record))


if __name__ == "__main__":
    run(main)
