"""Shared fixtures: tiny images, tiny checkpoints, and a way to run the real scripts."""

import io
import os
import re
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "ddpm_train.py")
INFER = os.path.join(REPO, "ddpm_infer.py")

# The smallest network the tests train: two levels, 8 channels (16 px images work).
TINY_NET = ["--base_channels", "8", "--channel_mults", "1,2"]


def smooth_test_image(height=24, width=20, seed=0):
    """A smooth colour picture (gradients plus a blob) as uint8 (H, W, 3): easy to learn."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    cy, cx = rng.uniform(0.3, 0.7, size=2)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)
    rgb = np.stack([xx, yy, blob], axis=2)
    return (rgb * 255).round().astype(np.uint8)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow: the whole suite, as .ci/run runs it")


def pytest_collection_modifyitems(config, items):
    """Without --run-slow, leave out the tests marked slow (they show as deselected), so that the quick suite
    takes a few minutes at most."""
    if config.getoption("--run-slow"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        items[:] = [item for item in items if "slow" not in item.keywords]
        config.hook.pytest_deselected(items=slow)


def pytest_report_header(config):
    if not config.getoption("--run-slow"):
        return "tests marked slow are left out: python -m pytest --run-slow runs everything"


@pytest.fixture(autouse=True)
def work_in_a_temporary_folder(tmp_path, monkeypatch):
    """Every test runs in its own empty folder, so a default output path (images/..., model_ckpt/...)
    can never overwrite the repository's shipped files."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def tiny_image(tmp_path):
    """Path of a 20x24 px RGB PNG."""
    path = tmp_path / "tiny.png"
    Image.fromarray(smooth_test_image()).save(path)
    return str(path)


def run_script(script, *args, cwd=None):
    """Run a script as a user would, in a fresh Python process. Returns CompletedProcess."""
    return subprocess.run(
        [sys.executable, script, *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )


def run_in_process(script, *args, monkeypatch, capsys):
    """Run a script's __main__ in this process (fast, for the error paths).

    Returns (exit status, stdout, stderr). An uncaught exception is not caught
    here: a traceback fails the test, as it would fail the user.
    """
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    try:
        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_image):
    """A checkpoint of a tiny network trained for a few steps at 16 px (made in-process, fast)."""
    from ddpm import NoiseSchedule, load_image, save_checkpoint
    from models import UNet

    torch.manual_seed(0)
    model = UNet(3, 8, (1, 2))
    x0 = load_image(tiny_image, 16)
    losses = train(model, x0, NoiseSchedule(), train_steps=5, lr=1e-3, show_progress=False)
    path = tmp_path / "tiny.pth"
    save_checkpoint(str(path), model, NoiseSchedule(), data={"img_size": 16, "image_path": tiny_image},
                    train_info={"args": {}, "step": 5, "loss_history": losses})
    return str(path)


def bad_image(tmp_path, kind):
    """A file at tmp_path/bad.png that is a folder, empty, text, or a PNG cut in half."""
    path = tmp_path / "bad.png"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not-an-image":
        path.write_text("hello, I am text\n")
    elif kind == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            buffer, format="PNG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def read_until_a_step(process, total):
    """Read the training's stderr until its progress bar shows a step done (of ``total``); returns what was read.

    A sign, not a sleep: a Ctrl-C sent then lands inside the training loop on a slow machine and a fast one."""
    seen = ""
    while True:
        char = process.stderr.read(1)
        if not char:  # the process ended first
            return seen
        seen += char
        counts = [int(n) for n in re.findall(rf"(\d+)/{total}\b", seen)]
        if counts and max(counts) >= 1:
            return seen


def train_until_a_power_cut(*args, at_step, monkeypatch, capsys):
    """Run ddpm_train.py in this process until the machine "loses power" before step ``at_step`` + 1
    (an exception the script does not catch), so only its periodic snapshots survive."""
    import ddpm.training

    real_step = ddpm.training.Trainer.train_step

    def crash(self):
        if self.step == at_step:
            raise RuntimeError("power cut")
        real_step(self)

    monkeypatch.setattr(ddpm.training.Trainer, "train_step", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        run_in_process(TRAIN, *args, monkeypatch=monkeypatch, capsys=capsys)
    monkeypatch.setattr(ddpm.training.Trainer, "train_step", real_step)


def train(model, data, schedule, train_steps, lr, batch_size=1, generator=None, show_progress=True):
    """Train ``model`` in place on ``data``: one image (1, C, H, W), several (N, C, H, W) or a Dataset.

    Returns the per-step losses. ``generator`` drives every random draw of t and eps, so a seeded
    run repeats exactly. The tests' shortcut to the library's Trainer.
    """
    from ddpm.training import Trainer

    trainer = Trainer(model, data, schedule, train_steps, lr, batch_size=batch_size, generator=generator)
    trainer.run(show_progress=show_progress)
    return trainer.loss_history()
