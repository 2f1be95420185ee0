"""Train the judge: the LeNet-style digit classifier whose features measure generated digits.

    python experiments/digit_classifier.py        # under a minute on 2 CPU cores; writes the shipped judge
    python experiments/digit_classifier.py --epochs 5   # any other settings: runs/digit_classifier/

It learns the 4,000 labelled training digits of data/ (both halves, S1 and S2;
data.DIGIT_SPLITS) with Adam and random shifts of up to 2 px, and is scored on
the 1,000 held-out digits, which it never sees. Then it calibrates its own
measures (ddpm/quality.py) on real digits, so that a generator's numbers can be
read against them: half of the held-out digits against the other half, training
digits against held-out ones, and held-out digits blurred or replaced by noise.

Writes model_ckpt/digit_classifier.pth (the weights and this record) and
model_ckpt/digit_classifier.json (accuracy, calibration, time, machine).
"""

import os
import sys
import time

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from ddpm.cli import RUNS_FOLDER, ArgumentParser, at_defaults, int_in_range, positive_float, route_outputs, run  # noqa: E402
from ddpm.data import DIGITS_LABELS, DIGITS_SHEET, digits  # noqa: E402
from ddpm.files import check_writable, write_json  # noqa: E402
from ddpm.machine import describe  # noqa: E402
from ddpm.quality import JUDGE_NAME, frechet_distance, judge, judge_input, precision_recall, save_judge  # noqa: E402
from ddpm.training import learning_rate_factor  # noqa: E402
from models.digit_classifier import DigitClassifier  # noqa: E402

SHIFT = 2  # px: each training digit is moved by up to this much in x and y
BLUR_SIGMAS = (0.5, 1.0, 2.0)  # px, for the calibration


def parse_args(argv=None):
    parser = ArgumentParser(description="Train the digit classifier that judges generated digits, and calibrate "
                                        "its measures on real digits.")
    parser.add_argument("--epochs", type=int_in_range(1, 1000), default=20, help="passes over the 4,000 digits")
    parser.add_argument("--batch_size", type=int_in_range(1, 4000), default=64, help="digits per step")
    parser.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (cosine decay to 0)")
    parser.add_argument("--channels", default="6,16", help="widths of the two convolutions (LeNet-5: 6,16)")
    parser.add_argument("--seed", type=int_in_range(0, 2**32 - 1), default=0, help="seed for everything")
    parser.add_argument("--model_path", default=None,
                        help=f"where to write the classifier (default: the shipped judge, {JUDGE_NAME}, with the "
                             "default settings; runs/digit_classifier/digit_classifier.pth with any other, so that "
                             "the judge of every shipped quality number stays the shipped one)")
    parser.add_argument("--json_path", default=None, help="its record (default: beside it, .json)")
    args = parser.parse_args(argv)
    route_outputs(args, {"model_path": JUDGE_NAME}, at_defaults(parser, args, ignore=("model_path", "json_path")),
                  os.path.join(RUNS_FOLDER, "digit_classifier"))
    try:
        args.channels = [int(c) for c in args.channels.split(",")]
        assert len(args.channels) == 2 and min(args.channels) >= 1
    except (ValueError, AssertionError):
        parser.error(f"--channels must be two positive integers, like 6,16; got {args.channels!r}")
    args.json_path = args.json_path or os.path.splitext(args.model_path)[0] + ".json"
    return args


def shifted(x, generator):
    """Each image of (B, 1, 28, 28) moved by a random whole number of px, up to SHIFT, in x and y."""
    padded = F.pad(x, (SHIFT,) * 4, value=-1.0)  # paper colour
    offsets = torch.randint(0, 2 * SHIFT + 1, (len(x), 2), generator=generator)
    side = x.shape[-1]
    return torch.stack([p[:, dy : dy + side, dx : dx + side] for p, (dy, dx) in zip(padded, offsets.tolist())])


def train(args, images, labels):
    """Adam on cross-entropy, with shifted digits; returns the trained classifier."""
    torch.manual_seed(args.seed)
    model = DigitClassifier(channels=args.channels)
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = len(images) // args.batch_size
    total = args.epochs * steps_per_epoch
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, total))
    x_all = judge_input(images)
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(images), generator=generator)
        for k in range(steps_per_epoch):
            batch = order[k * args.batch_size : (k + 1) * args.batch_size]
            loss = F.cross_entropy(model(shifted(x_all[batch], generator)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def calibration(model, held_out, training):
    """The judge's numbers on real digits: what 'close to real' and 'far from real' look like."""
    half = len(held_out) // 2
    reference, other_half = held_out[half:], held_out[:half]
    ref = judge(model, reference)[0]

    def versus_reference(images):
        features = judge(model, images)[0]
        precision, recall = precision_recall(ref, features)
        return {"fld": round(frechet_distance(features, ref), 3), "precision": round(precision, 4),
                "recall": round(recall, 4)}

    noise = torch.rand(other_half.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    result = {"images": half, "reference": f"the last {half} held-out digits",
              "held_out_half": versus_reference(other_half),
              "training_digits": versus_reference(training[:half]),
              "uniform_noise": versus_reference(noise)}
    for sigma in BLUR_SIGMAS:
        result[f"blur_sigma_{sigma:g}"] = versus_reference(gaussian_blur(other_half, 2 * round(3 * sigma) + 1, sigma))
    return result


def main():
    args = parse_args()
    for path in (args.model_path, args.json_path):
        check_writable(path, "output", inputs=[DIGITS_SHEET, DIGITS_LABELS])  # the digits it learns from
    began = time.perf_counter()
    s1, s1_labels = digits("S1")
    s2, s2_labels = digits("S2")
    held_out, held_out_labels = digits("held_out")
    model = train(args, torch.cat([s1, s2]), torch.cat([s1_labels, s2_labels]))
    train_seconds = time.perf_counter() - began
    predicted = judge(model, held_out)[1]
    correct = predicted == held_out_labels
    record = {"command": " ".join(["python", "experiments/digit_classifier.py", *sys.argv[1:]]),
              "settings": {key: value for key, value in vars(args).items() if not key.endswith("path")},
              "trained_on": "S1 and S2 (4,000 digits)", "held_out_accuracy": round(float(correct.double().mean()), 4),
              "held_out_accuracy_per_digit": [round(float(correct[held_out_labels == d].double().mean()), 3)
                                              for d in range(10)],
              "train_seconds": round(train_seconds, 1), "machine": describe(),
              "calibration": calibration(model, held_out, s1)}
    save_judge(args.model_path, model, record)
    write_json(args.json_path, record)
    print(f"held-out accuracy {100 * record['held_out_accuracy']:.2f}% after {train_seconds:.0f} s of training; "
          f"saved {args.model_path} and {args.json_path}")
    for name, numbers in record["calibration"].items():
        if isinstance(numbers, dict):
            print(f"  {name:16s} FLD {numbers['fld']:8.2f}  precision {numbers['precision']:.3f}  "
                  f"recall {numbers['recall']:.3f}")


if __name__ == "__main__":
    run(main)
