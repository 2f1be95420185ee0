"""More than one process: torchrun + DistributedDataParallel on the CPU (gloo), two processes of one thread.

What must hold: process 0 alone writes (one checkpoint, one voice), the result is the single-process
run with the same global batch (each process's images and noise, the gradients averaged), and
Ctrl-C and --resume work across processes.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import REPO, TINY_NET, TRAIN, read_until_a_step, smooth_test_image
from ddpm import NoiseSchedule
from models import UNet
from ddpm.data import ImageFiles, batch_stream, list_images, per_process_batch
from ddpm.diffusion import training_losses
from ddpm.errors import UserError
from ddpm.training import EMA, GRAD_CLIP_NORM, learning_rate_factor, parameter_groups, rank_seed

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch has no gloo backend")

SAMPLE = os.path.join(REPO, "ddpm_sample.py")
SETTINGS = {"img_size": 16, "batch_size": 4, "train_steps": 4, "lr": 3e-3, "seed": 0, "ema_decay": 0.9}


def torchrun(*args, processes=2, **popen):
    """``torchrun --standalone --nproc_per_node 2 ddpm_train.py ...``, each process on one thread."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               TRAIN, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(command, env=env, text=True, **popen)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def folder_of(tmp_path, count=4):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(count):
        Image.fromarray(smooth_test_image(seed=i)).save(folder / f"img_{i}.png")
    return folder


def flags(settings=SETTINGS):
    return [f for name, value in settings.items() for f in (f"--{name}", value)] + TINY_NET


def single_process_reference(paths, settings, world_size):
    """The same global batch in one process: for each step, every process's images and noise, the gradient of
    the mean loss over all of them (accumulated process by process), then the one optimizer step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process had: the kernels then add up in the same order
    try:
        dataset = ImageFiles(paths, settings["img_size"])
        torch.manual_seed(settings["seed"])
        model = UNet(3, 8, (1, 2)).to(memory_format=torch.channels_last)
        ema = EMA(model, settings["ema_decay"])
        optimizer = torch.optim.Adam(parameter_groups(model, settings["lr"]), lr=settings["lr"], fused=True)
        steps = settings["train_steps"]
        lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, steps))
        share = settings["batch_size"] // world_size
        streams = [batch_stream(len(dataset), share, settings["seed"], rank, world_size) for rank in range(world_size)]
        noise = [torch.Generator().manual_seed(rank_seed(settings["seed"], rank)) for rank in range(world_size)]
        schedule = NoiseSchedule(max_noise=1.0)
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            for rank in range(world_size):
                x0 = torch.stack([dataset[i] for i in next(streams[rank])])
                losses, _ = training_losses(model, x0, schedule, generator=noise[rank])
                (losses.mean() / world_size).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM, foreach=True)
            optimizer.step()
            lr_schedule.step()
            ema.update(model, step)
        return model.state_dict(), ema.model.state_dict()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_processes_write_one_checkpoint_equal_to_one_process_with_the_same_global_batch(tmp_path):
    folder = folder_of(tmp_path)
    out = tmp_path / "out"
    result = torchrun("--image_dir", folder, *flags(), "--model_save_path", out / "m.pth")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["m.json", "m.pth", "m_loss.png", "m_loss_by_noise.png", "m_psnr.png"]
    assert result.stdout.count("trained 4 steps") == 1  # process 0 alone speaks
    record = json.load(open(out / "m.json"))
    assert record["processes"] == 2 and record["command"].startswith("torchrun --nproc_per_node 2 ddpm_train.py")

    # Exactly the single-process run: each process's share is an exact half of the batch, DDP divides each
    # gradient by 2 (exact in binary) and adds the two (the order of two numbers does not matter), and each
    # side computes its half with the same one-threaded kernels.
    checkpoint = torch.load(out / "m.pth", weights_only=True)
    weights, averaged = single_process_reference(list_images(str(folder)), SETTINGS, world_size=2)
    for name, weight in weights.items():
        assert torch.equal(checkpoint["model"][name], weight), name
        assert torch.equal(checkpoint["ema"][name], averaged[name]), name

    sampled = subprocess.run([sys.executable, SAMPLE, *map(str, ["--model_path", out / "m.pth", "--num_samples", 2,
                              "--steps", 2, "--output_dir", tmp_path / "samples"])], capture_output=True, text=True)
    assert sampled.returncode == 0, sampled.stderr
    assert json.load(open(tmp_path / "samples" / "samples.json"))["training_images"] == 4


@pytest.mark.slow
def test_ctrl_c_stops_every_process_at_the_same_step_and_resume_ends_as_one_process_would(tmp_path, tiny_image):
    """One image on two processes (each draws its own noise levels), stopped by Ctrl-C and resumed: the result
    is still the single-process run with the same global batch."""
    out = tmp_path / "out"
    settings = {**SETTINGS, "batch_size": 2, "train_steps": 200, "ema_decay": 0}
    process = torchrun("--image_path", tiny_image, *flags(settings), "--max_noise", 1.0, "--model_save_path",
                       out / "m.pth", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert "Ctrl-C saves a snapshot" in process.stdout.readline()
    before = read_until_a_step(process, 200)  # a step done: both processes are in the training loop
    process.send_signal(signal.SIGINT)  # what Ctrl-C does to torchrun, which passes it on to every process
    _, err = process.communicate(timeout=120)
    err = before + err
    snapshot = out / "m.resume.pth"
    assert snapshot.exists() and not (out / "m.pth").exists(), err[-3000:]
    assert "continue with: torchrun --nproc_per_node 2 ddpm_train.py --resume" in err
    assert err.count("stopping after this step") == 1  # one voice, though every process got the signal
    # torchrun itself then ends with its own report of the signal, and status 1 (docs/reference.md shows it)
    assert process.returncode == 1 and "SignalException" in err
    state = torch.load(snapshot, weights_only=True)
    stopped_at = state["train"]["step"]
    assert 0 < stopped_at < 200 and len(state["resume"]["random_states"]) == 2

    resumed = torchrun("--resume", snapshot)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at} of 200" in resumed.stdout
    assert (out / "m.pth").exists() and not snapshot.exists()
    checkpoint = torch.load(out / "m.pth", weights_only=True)
    weights, _ = single_process_reference([tiny_image], {**settings, "ema_decay": 0.5}, world_size=2)
    for name, weight in weights.items():
        assert torch.equal(checkpoint["model"][name], weight), name


def test_every_process_draws_other_noise_and_a_single_process_draws_from_the_seed_itself():
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(seed, rank) for seed in (0, 1, 2**32 - 1) for rank in range(64)}
    assert len(seeds) == 3 * 64 and max(seeds) < 2**32
    draws = [torch.rand(4, generator=torch.Generator().manual_seed(rank_seed(0, rank))) for rank in range(3)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_a_batch_that_does_not_split_evenly_across_processes_is_refused():
    assert per_process_batch(6, 2) == 3
    with pytest.raises(UserError, match="cannot be split evenly across 4 processes"):
        per_process_batch(6, 4)
