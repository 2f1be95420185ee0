"""The learning made visible: multi-step trajectories, the noise sweep, training plots and records."""

import json
import re

import pytest
import torch
from PIL import Image

from conftest import TINY_NET, TRAIN, run_in_process
from test_cli import infer, one_error_line


def test_multi_step_writes_the_trajectory_and_gif(tmp_path, tiny_image, tiny_checkpoint, monkeypatch, capsys):
    trajectory, gif = tmp_path / "trajectory.png", tmp_path / "steps.gif"
    status, out, err = infer(tmp_path, tiny_image, tiny_checkpoint, "--t", 600, "--steps", 3,
                             "--trajectory_path", trajectory, "--gif", gif, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    assert "t=600  w=0.48  steps=3" in out
    assert re.search(r"PSNR inference output:\s+[\d.]+ dB   SSIM -?[\d.]+", out)
    assert Image.open(trajectory).format == "PNG" and Image.open(trajectory).width == 1500
    animation = Image.open(gif)
    assert animation.format == "GIF" and animation.n_frames == 3


def test_one_step_writes_no_trajectory(tmp_path, tiny_image, tiny_checkpoint, monkeypatch, capsys):
    status, out, err = infer(tmp_path, tiny_image, tiny_checkpoint, "--trajectory_path", tmp_path / "tr.png",
                             monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0 and "steps=1" in out
    assert not (tmp_path / "tr.png").exists()


@pytest.mark.parametrize("t, steps, allowed", [(20, 21, "1 to 20"), (0, 2, "1 to 1")])
def test_more_steps_than_timesteps_is_one_error_line(tmp_path, tiny_image, tiny_checkpoint, monkeypatch, capsys,
                                                     t, steps, allowed):
    result = infer(tmp_path, tiny_image, tiny_checkpoint, "--t", t, "--steps", steps,
                   monkeypatch=monkeypatch, capsys=capsys)
    assert f"--steps {steps} is more than --t {t} allows: choose {allowed} steps" in one_error_line(*result)
    assert not (tmp_path / "result.png").exists()


def test_sweep_prints_the_table_and_draws_the_figure(tmp_path, tiny_image, tiny_checkpoint, monkeypatch, capsys):
    sweep = tmp_path / "sweep.png"
    status, out, err = infer(tmp_path, tiny_image, tiny_checkpoint, "--sweep", "--sweep_path", sweep,
                             "--steps", 2, "--trajectory_path", tmp_path / "tr.png", monkeypatch=monkeypatch,
                             capsys=capsys)
    assert status == 0, err
    assert (tmp_path / "tr.png").exists()
    assert "noise sweep (max_noise = 0.8; t above 1000 was never trained on)" in out
    rows = re.findall(r"^\s*([\d.]+)\s+(\d+)\s+(inf|[\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)", out, re.M)
    assert [(float(w), int(t)) for w, t, *_ in rows] == [
        (0.0, 0), (0.1, 125), (0.2, 250), (0.3, 375), (0.4, 500), (0.5, 625), (0.6, 750), (0.7, 875), (0.8, 1000),
        (0.9, 1125), (1.0, 1250)]
    noisy_psnr = [float(row[2]) for row in rows[1:]]
    assert noisy_psnr == sorted(noisy_psnr, reverse=True)  # more noise, lower PSNR of the input
    figure = Image.open(sweep)
    assert figure.format == "PNG" and figure.width == 1500


def test_sweep_path_is_checked_before_any_work(tmp_path, tiny_image, tiny_checkpoint, monkeypatch, capsys):
    result = infer(tmp_path, tiny_image, tiny_checkpoint, "--sweep", "--sweep_path", tmp_path,
                   monkeypatch=monkeypatch, capsys=capsys)
    assert "--sweep_path" in one_error_line(*result)
    assert not (tmp_path / "result.png").exists()


QUICK = ["--img_size", 16, "--train_steps", 30, *TINY_NET]


def test_training_writes_plots_and_a_run_record(tmp_path, tiny_image, monkeypatch, capsys):
    status, out, err = run_in_process(TRAIN, "--image_path", tiny_image, "--model_save_path", tmp_path / "m.pth",
                                      *QUICK, "--seed", 5, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    for name in ("m_loss.png", "m_loss_by_noise.png", "m_psnr.png"):
        assert Image.open(tmp_path / name).format == "PNG"
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["seed"] == 5 and record["train_steps"] == 30 and record["device"] == "cpu"
    assert record["args"]["lr"] == 1e-3 and record["args"]["max_noise"] == 0.8
    assert record["torch_version"] == str(torch.__version__) and re.match(r"3\.\d+\.\d+", record["python_version"])
    assert record["wall_time_s"] > 0 and record["final_loss"] > 0
    assert re.fullmatch(r"[0-9a-f]{64}", record["image_sha256"])
    checkpoint = torch.load(tmp_path / "m.pth", weights_only=True)
    assert record["image_sha256"] == checkpoint["data"]["image_sha256"]
    history = checkpoint["train"]["noise_history"]
    assert len(history["t"]) == len(history["loss"]) == 30 and all(0 <= t <= 1000 for t in history["t"])


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan", "inf", "lots"])
def test_max_noise_outside_zero_to_one_is_one_error_line(tmp_path, tiny_image, monkeypatch, capsys, value):
    result = run_in_process(TRAIN, "--image_path", tiny_image, "--model_save_path", tmp_path / "m.pth", *QUICK,
                            f"--max_noise={value}", monkeypatch=monkeypatch, capsys=capsys)
    assert "--max_noise" in one_error_line(*result)
    assert not (tmp_path / "m.pth").exists()


def test_max_noise_is_stored_and_inference_uses_it(tmp_path, tiny_image, monkeypatch, capsys):
    ckpt = tmp_path / "full.pth"
    status, _, err = run_in_process(TRAIN, "--image_path", tiny_image, "--model_save_path", ckpt, *QUICK,
                                    "--max_noise", "1.0", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    assert torch.load(ckpt, weights_only=True)["noise_config"]["max_noise"] == 1.0
    status, out, err = infer(tmp_path, tiny_image, ckpt, "--t", 1000, "--steps", 4,
                             "--trajectory_path", tmp_path / "tr.png", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    assert "t=1000  w=1.00  steps=4" in out
    assert re.search(r"PSNR noisy input:\s+[\d.]+ dB", out)


def test_long_trajectories_are_thinned_evenly():
    from ddpm.figures import pick_steps

    assert pick_steps(5, 10) == [0, 1, 2, 3, 4]
    assert pick_steps(50, 10) == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49]
    assert len(pick_steps(1000, 25)) == 25 and pick_steps(1000, 25)[-1] == 999


@pytest.mark.parametrize("flag", ["--gif", "--trajectory_path", "--sweep_path", "--output_path"])
def test_every_output_flag_refuses_a_folder_before_any_work(tmp_path, tiny_image, tiny_checkpoint, monkeypatch,
                                                            capsys, flag):
    result = infer(tmp_path, tiny_image, tiny_checkpoint, "--steps", 2, "--sweep", flag, tmp_path,
                   monkeypatch=monkeypatch, capsys=capsys)
    assert f"{flag} {str(tmp_path)!r} is a folder" in one_error_line(*result)
    assert not (tmp_path / "result.png").exists()


@pytest.mark.parametrize("value", ["0", "1001", "two"])
def test_steps_outside_its_range_is_one_error_line(tmp_path, tiny_image, tiny_checkpoint, monkeypatch, capsys, value):
    result = infer(tmp_path, tiny_image, tiny_checkpoint, "--steps", value, monkeypatch=monkeypatch, capsys=capsys)
    assert "--steps" in one_error_line(*result)
