"""Faults that a real machine throws at the scripts: device files as targets, a full disk, a bad file in a big
folder, outputs over inputs, corrupted snapshots, another working directory, too little memory, torchrun.

Each ends in one line and exit 2 (the contract of test_cli.one_error_line), with nothing lost or replaced.
"""

import errno
import io
import json
import os
import resource
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import INFER, REPO, TINY_NET, TRAIN, run_in_process, smooth_test_image, train_until_a_power_cut
from ddpm.data import ImageFiles, list_images
from ddpm.errors import UserError
from ddpm.files import atomic_write, check_writable, staged_outputs
from test_cli import one_error_line

SAMPLE = os.path.join(REPO, "ddpm_sample.py")
QUICK = ["--img_size", 16, "--train_steps", 2, "--eval_every", 0, *TINY_NET]


def folder_of(path, count=4, names=None):
    path.mkdir()
    for i, name in enumerate(names or [f"img_{i}.png" for i in range(count)]):
        Image.fromarray(smooth_test_image(seed=i)).save(path / name)
    return path


def a_character_device(path):
    """A copy of /dev/null at ``path`` (mknod needs root), or skip."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, AttributeError, OSError):
        pytest.skip("making a device file needs root")
    return path


def tree(folder):
    """Every file under ``folder`` with its bytes: what must not change."""
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


# 1. Never replace what is not a regular file

def test_a_character_device_is_written_through_and_stays_a_device(tmp_path, tiny_checkpoint, tiny_image, monkeypatch,
                                                                    capsys):
    device = a_character_device(tmp_path / "null")
    status, out, err = run_in_process(INFER, "--model_path", tiny_checkpoint, "--image_path", tiny_image,
                                      "--result_path", device, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    assert stat.S_ISCHR(os.stat(device).st_mode)  # still the device, not a PNG put in its place
    assert sorted(os.listdir(tmp_path)) == sorted(["null", "tiny.png", "tiny.pth"])  # no temporary file left


def test_os_devnull_works_as_no_file(tmp_path, tiny_checkpoint, tiny_image, monkeypatch, capsys):
    status, _, err = run_in_process(INFER, "--model_path", tiny_checkpoint, "--image_path", tiny_image,
                                    "--result_path", os.devnull, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


@pytest.mark.parametrize("target", ["result", "companion"])
def test_a_fifo_target_is_refused_up_front_and_stays_a_fifo(tmp_path, tiny_checkpoint, tiny_image, target,
                                                            monkeypatch, capsys):
    fifo = tmp_path / ("out.png" if target == "result" else "m.json")  # m.json: the run record beside m.pth
    os.mkfifo(fifo)
    if target == "result":
        result = run_in_process(INFER, "--model_path", tiny_checkpoint, "--image_path", tiny_image, "--result_path",
                                fifo, monkeypatch=monkeypatch, capsys=capsys)
    else:
        result = run_in_process(TRAIN, "--image_path", tiny_image, "--model_save_path", tmp_path / "m.pth", *QUICK,
                                monkeypatch=monkeypatch, capsys=capsys)
    assert "is a FIFO (named pipe), not a regular file" in one_error_line(*result)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and not (tmp_path / "m.pth").exists()


def test_atomic_write_refuses_a_fifo_and_follows_a_link(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="is a FIFO"):
        with atomic_write(str(fifo)) as tmp:
            open(tmp, "w").write("x")
    real, link = tmp_path / "real.txt", tmp_path / "link.txt"
    real.write_text("old")
    link.symlink_to(real)
    with atomic_write(str(link)) as tmp:
        open(tmp, "w").write("new")
    assert link.is_symlink() and real.read_text() == "new"  # the link kept, the file it names replaced


# 2. A folder too big to decode up front

def test_a_truncated_jpeg_in_a_folder_too_big_to_keep_is_named_before_training(tmp_path):
    folder = folder_of(tmp_path / "photos", count=3)
    buffer = io.BytesIO()
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(buffer, format="JPEG")
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    with Image.open(folder / "cut.jpg") as img:
        img.verify()  # the old check let it through: only decoding finds it
    with pytest.raises(UserError, match="cut.jpg"):
        ImageFiles(list_images(str(folder)), 16, cache_bytes=0)  # nothing kept in memory, every file decoded


@pytest.mark.slow
def test_a_fifo_named_like_an_image_is_refused_not_waited_on(tmp_path):
    folder = folder_of(tmp_path / "photos", count=2)
    os.mkfifo(folder / "pipe.png")
    result = subprocess.run([sys.executable, TRAIN, "--image_dir", folder, *map(str, QUICK), "--model_save_path",
                             tmp_path / "m.pth"], capture_output=True, text=True, timeout=120)
    assert "pipe.png' is a FIFO (named pipe), not an image file" in one_error_line(result.returncode, "",
                                                                                   result.stderr)


# 3. A full disk on each write path

def small_disk(limit_bytes):
    """For subprocess: files may grow to ``limit_bytes`` at most, as on a nearly full disk (EFBIG instead of
    ENOSPC: the same failed write, with no need to mount a small file system)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return limit


@pytest.mark.slow
def test_a_full_disk_under_the_checkpoint_gives_one_line_and_keeps_the_old_file(tmp_path, tiny_image):
    ckpt = tmp_path / "m.pth"
    first = subprocess.run([sys.executable, TRAIN, "--image_path", tiny_image, "--model_save_path", ckpt,
                            *map(str, QUICK)], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = tree(tmp_path)
    full = subprocess.run([sys.executable, TRAIN, "--image_path", tiny_image, "--model_save_path", ckpt,
                           *map(str, QUICK), "--seed", "1"], capture_output=True, text=True, timeout=300,
                          preexec_fn=small_disk(20_000))  # the 2-level checkpoint is about 60 kB
    line = one_error_line(full.returncode, full.stdout, full.stderr)
    assert line.startswith(f"error: could not write checkpoint {str(ckpt)!r} (the write stopped part-way")
    assert "previous file there is untouched" in line
    assert tree(tmp_path) == before  # no temporary file, the old checkpoint and its companions as they were


def fail_on_call(monkeypatch, owner, name, nth, exc):
    """Make owner.name raise ``exc`` from its ``nth`` call on (1 = the first): a disk that fills up."""
    real, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) >= nth:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


FULL = OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("what, owner, name, nth", [
    ("the snapshot", torch, "save", 1), ("the final checkpoint", torch, "save", 2),
    ("a plot", Image.Image, "save", 1), ("the record", json, "dump", 1),
], ids=["snapshot", "checkpoint", "plot", "record"])
def test_a_full_disk_on_each_write_of_training_ends_in_one_line(tmp_path, tiny_image, what, owner, name, nth,
                                                                  monkeypatch, capsys):
    # torch.save's own failure is a RuntimeError; the others OSError
    exc = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 57344 vs 57232") \
        if owner is torch else FULL
    fail_on_call(monkeypatch, owner, name, nth, exc)
    result = run_in_process(TRAIN, "--image_path", tiny_image, "--model_save_path", tmp_path / "m.pth", *QUICK,
                            "--save_every", 1, monkeypatch=monkeypatch, capsys=capsys)
    assert "could not write" in one_error_line(*result), what
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_a_full_disk_while_sampling_writes_no_file_and_keeps_the_old_ones(tmp_path, monkeypatch, capsys):
    model = train_a_folder_model(tmp_path, monkeypatch, capsys)
    out = tmp_path / "samples"
    status, _, err = run_in_process(SAMPLE, "--model_path", model, "--output_dir", out, "--num_samples", 4,
                                    "--steps", 2, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    before = tree(out)
    fail_on_call(monkeypatch, Image.Image, "save", 3, FULL)  # the disk fills at the third sample
    result = run_in_process(SAMPLE, "--model_path", model, "--output_dir", out, "--num_samples", 4, "--steps", 2,
                            "--seed", 1, monkeypatch=monkeypatch, capsys=capsys)
    line = one_error_line(*result)
    assert f"could not write image {str(out / 'sample_002.png')!r} (No space left on device)" in line
    assert tree(out) == before  # not 2 new samples among 2 old ones: every file of the earlier run, unchanged


def test_staged_outputs_remove_a_folder_they_made_when_the_block_fails(tmp_path):
    with pytest.raises(UserError):
        with staged_outputs(str(tmp_path / "new"), "--output_dir") as place:
            open(place("a.txt"), "w").write("x")
            raise UserError("half-way")
    assert os.listdir(tmp_path) == []


def train_a_folder_model(tmp_path, monkeypatch, capsys, folder=None):
    folder = folder or folder_of(tmp_path / "photos", count=4)
    model = tmp_path / "m.pth"
    status, _, err = run_in_process(TRAIN, "--image_dir", folder, "--model_save_path", model, *QUICK,
                                    "--batch_size", 2, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    return model


# 4. Sampling never overwrites its inputs

def test_sampling_into_the_training_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    folder = folder_of(tmp_path / "photos", names=["grid.png", "sample_000.png", "sample_001.png", "x.png"])
    model = train_a_folder_model(tmp_path, monkeypatch, capsys, folder)
    before = tree(folder)
    result = run_in_process(SAMPLE, "--model_path", model, "--output_dir", folder, "--num_samples", 4, "--steps", 2,
                            monkeypatch=monkeypatch, capsys=capsys)
    assert "lies in the training folder" in one_error_line(*result)
    assert tree(folder) == before
    for inside in (folder, folder / "new" / "deeper"):  # no names in common: the samples would still join the data
        result = run_in_process(SAMPLE, "--model_path", model, "--output_dir", inside, "--num_samples", 4,
                                "--steps", 2, "--summary_only", monkeypatch=monkeypatch, capsys=capsys)
        assert "lies in the training folder" in one_error_line(*result)
    assert tree(folder) == before and not (folder / "new").exists()


def test_sampling_over_the_one_training_image_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    Image.fromarray(smooth_test_image()).save(out / "grid.png")  # the picture a one-image model learns
    before = tree(out)
    status, _, err = run_in_process(TRAIN, "--image_path", out / "grid.png", "--model_save_path", tmp_path / "m.pth",
                                    *QUICK, "--max_noise", 1, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    result = run_in_process(SAMPLE, "--model_path", tmp_path / "m.pth", "--output_dir", out, "--num_samples", 4,
                            "--steps", 2, monkeypatch=monkeypatch, capsys=capsys)
    assert "grid.png' is the input file" in one_error_line(*result)
    assert tree(out) == before


# 5. The snapshot's digest covers everything it resumes

def a_snapshot(tmp_path, tiny_image, monkeypatch, capsys):
    args = ["--image_path", tiny_image, "--model_save_path", tmp_path / "m.pth", "--img_size", 16, "--train_steps",
            6, "--save_every", 2, "--ema_decay", 0.9, *TINY_NET]
    train_until_a_power_cut(*args, at_step=3, monkeypatch=monkeypatch, capsys=capsys)
    return tmp_path / "m.resume.pth"


@pytest.mark.parametrize("part", ["optimizer", "generator", "step", "ema"])
def test_a_corrupted_part_of_a_snapshot_is_refused(tmp_path, tiny_image, part, monkeypatch, capsys):
    snapshot = a_snapshot(tmp_path, tiny_image, monkeypatch, capsys)
    checkpoint = torch.load(snapshot, weights_only=True)
    if part == "optimizer":  # one value of Adam's first moment, off in its last bit
        moment = next(iter(checkpoint["resume"]["optimizer"]["state"].values()))["exp_avg"].view(-1)
        moment.view(torch.int32)[0] ^= 1
    elif part == "generator":
        checkpoint["resume"]["random_states"][0]["generator"][100] ^= 1
    elif part == "step":
        checkpoint["resume"]["step"] = 1
        checkpoint["train"]["loss_history"] = checkpoint["train"]["loss_history"][:1]
    else:
        next(iter(checkpoint["ema"].values())).view(-1).view(torch.int32)[0] ^= 1
    torch.save(checkpoint, snapshot)  # the digests as they were
    result = run_in_process(TRAIN, "--resume", snapshot, monkeypatch=monkeypatch, capsys=capsys)
    assert "is corrupted" in one_error_line(*result)
    assert not (tmp_path / "m.pth").exists()


# 6. A run resumes from anywhere

@pytest.mark.parametrize("spelling", ["left out", "absolute, with a trailing slash"])
def test_a_folder_run_resumes_from_another_working_directory(tmp_path, spelling, monkeypatch, capsys):
    start = tmp_path / "start"
    start.mkdir()
    folder_of(start / "photos", count=4)
    monkeypatch.chdir(start)
    args = ["--image_dir", "photos", "--model_save_path", "runs/m.pth", *QUICK, "--train_steps", 4,
            "--save_every", 2, "--batch_size", 2]
    train_until_a_power_cut(*args, at_step=3, monkeypatch=monkeypatch, capsys=capsys)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    typed = [] if spelling == "left out" else ["--image_dir", str(start / "photos") + os.sep]
    status, out, err = run_in_process(TRAIN, "--resume", start / "runs" / "m.resume.pth", *typed,
                                      monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    assert (start / "runs" / "m.pth").exists() and not (start / "runs" / "m.resume.pth").exists()
    assert os.listdir(elsewhere) == []  # the model went beside its snapshot, not here


def test_resuming_with_another_folder_is_still_refused(tmp_path, monkeypatch, capsys):
    folder_of(tmp_path / "photos", count=4)
    other = folder_of(tmp_path / "other", count=3)
    args = ["--image_dir", tmp_path / "photos", "--model_save_path", tmp_path / "m.pth", *QUICK, "--train_steps", 4,
            "--save_every", 2, "--batch_size", 2]
    train_until_a_power_cut(*args, at_step=3, monkeypatch=monkeypatch, capsys=capsys)
    result = run_in_process(TRAIN, "--resume", tmp_path / "m.resume.pth", "--image_dir", other,
                            monkeypatch=monkeypatch, capsys=capsys)
    assert "have changed since the run started" in one_error_line(*result)


# 7. Memory and damaged checkpoints

def test_a_step_too_big_for_the_memory_is_refused_before_any_work(tmp_path, tiny_image, monkeypatch, capsys):
    import ddpm.machine

    monkeypatch.setattr(ddpm.machine, "available_memory", lambda device: 2**30)  # a machine with 1 GiB left
    result = run_in_process(TRAIN, "--image_path", tiny_image, "--model_save_path", tmp_path / "m.pth",
                            "--img_size", 256, "--batch_size", 64, "--train_steps", 1,
                            monkeypatch=monkeypatch, capsys=capsys)
    line = one_error_line(*result)
    assert "--batch_size 64 at 256 px keeps about" in line and "1.0 GiB available" in line
    assert os.listdir(tmp_path) == ["tiny.png"]


def test_an_allocation_that_fails_mid_run_ends_in_one_line_with_a_hint(tmp_path, tiny_image, monkeypatch, capsys):
    import ddpm.training

    def no_memory(self):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 51539607552 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(ddpm.training.Trainer, "train_step", no_memory)
    result = run_in_process(TRAIN, "--image_path", tiny_image, "--model_save_path", tmp_path / "m.pth", *QUICK,
                            monkeypatch=monkeypatch, capsys=capsys)
    line = one_error_line(*result)
    assert "out of memory (one block of 48.00 GiB could not be had); try a smaller --batch_size" in line


def test_a_checkpoint_whose_data_record_lacks_a_field_is_refused_before_sampling(tmp_path, monkeypatch, capsys):
    model = train_a_folder_model(tmp_path, monkeypatch, capsys)
    checkpoint = torch.load(model, weights_only=True)
    del checkpoint["data"]["files"]
    torch.save(checkpoint, model)
    result = run_in_process(SAMPLE, "--model_path", model, "--output_dir", tmp_path / "s", "--num_samples", 4,
                            "--steps", 2, monkeypatch=monkeypatch, capsys=capsys)
    assert "its data record lacks a valid 'files'" in one_error_line(*result)
    assert not (tmp_path / "s").exists()


def test_check_writable_refuses_a_socket(tmp_path):
    import socket

    path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        with pytest.raises(UserError, match="is a socket"):
            check_writable(str(path), "--result_path")


# 8. torchrun behaves like the single process

def torchrun(*args, **kwargs):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN,
               *map(str, args)]
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, **kwargs)


def worker_tracebacks(err):
    return err.count(f'File "{TRAIN}"')  # a frame of our script: a worker's traceback, not the launcher's report


@pytest.mark.slow
def test_under_torchrun_a_flag_error_is_printed_once(tmp_path):
    result = torchrun("--lr", "-1")
    assert result.returncode != 0
    assert result.stderr.count("error: argument --lr: must be a finite number above 0") == 1, result.stderr


@pytest.mark.slow
def test_under_torchrun_resuming_another_process_count_names_it(tmp_path, tiny_image, monkeypatch, capsys):
    snapshot = a_snapshot(tmp_path, tiny_image, monkeypatch, capsys)  # one process
    result = torchrun("--resume", snapshot)
    assert result.stderr.count(f"error: snapshot {str(snapshot)!r} is of a run in 1 process, and this is 2: "
                               f"continue it exactly with python ddpm_train.py --resume") == 1, result.stderr
    assert worker_tracebacks(result.stderr) == 0


@pytest.mark.slow
def test_under_torchrun_a_full_disk_stops_every_process_with_one_line(tmp_path, tiny_image):
    result = torchrun("--image_path", tiny_image, "--model_save_path", tmp_path / "m.pth", *QUICK,
                      "--batch_size", 2, preexec_fn=small_disk(20_000))
    assert result.returncode != 0
    assert result.stderr.count("error: could not write checkpoint") == 1, result.stderr
    assert worker_tracebacks(result.stderr) == 0, result.stderr
    assert not os.path.exists(tmp_path / "m.pth")
