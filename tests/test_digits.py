"""Training on the shipped digits (ddpm_train.py --digits) and judging the samples (ddpm_sample.py)."""

import json
import os

import pytest

from conftest import REPO, run_in_process
from test_cli import one_error_line

TRAIN = os.path.join(REPO, "ddpm_train.py")
SAMPLE = os.path.join(REPO, "ddpm_sample.py")
INFER = os.path.join(REPO, "ddpm_infer.py")
TINY = ["--base_channels", "8", "--channel_mults", "1,2", "--train_steps", "6", "--batch_size", "8",
        "--eval_every", "3", "--save_every", "0"]

DIGITS_FLAG_ERRORS = [
    (["--digits", "S1", "--image_dir", "photos"], "--digits cannot be used with --image_path or --image_dir"),
    (["--digits", "S1", "--img_size", "32"], "--img_size 32 does not fit --digits: the digits are 28 px"),
    (["--digits", "S2", "--num_images", "2001"], "--num_images 2001 is more than the 2000 digits of S2"),
    (["--digits", "held_out"], "argument --digits: invalid choice"),
]


@pytest.mark.parametrize("args, message", DIGITS_FLAG_ERRORS, ids=[" ".join(a) for a, _ in DIGITS_FLAG_ERRORS])
def test_train_refuses_digits_flags_that_do_not_fit(tmp_path, monkeypatch, capsys, args, message):
    result = run_in_process(TRAIN, *args, "--model_save_path", tmp_path / "d.pth", monkeypatch=monkeypatch,
                            capsys=capsys)
    assert message in one_error_line(*result)
    assert not os.listdir(tmp_path)


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A tiny model of the first 64 digits of S1, trained by the real script."""
    folder = tmp_path_factory.mktemp("digits")
    path = folder / "digits_unet.pth"
    import subprocess
    import sys
    done = subprocess.run([sys.executable, TRAIN, "--digits", "S1", "--num_images", "64", *TINY,
                           "--model_save_path", str(path)], capture_output=True, text=True, cwd=folder)
    assert done.returncode == 0, done.stderr
    return path, done.stdout


@pytest.mark.slow
def test_a_digits_model_records_its_half_and_count_and_trains_at_28_px(digits_model):
    path, out = digits_model
    record = json.load(open(str(path).replace(".pth", ".json")))
    assert record["digits"] == "S1" and record["num_images"] == 64 and len(record["digits_sha256"]) == 64
    assert record["args"]["img_size"] == 28 and record["args"]["max_noise"] == 1.0
    assert "the first 64 digits of S1" in out


@pytest.mark.slow
def test_sampling_a_digits_model_judges_its_samples_against_held_out_digits(digits_model, tmp_path, monkeypatch,
                                                                         capsys):
    path, _ = digits_model
    status, out, err = run_in_process(SAMPLE, "--model_path", path, "--num_samples", 12, "--steps", 3,
                                      "--output_dir", tmp_path / "s", "--summary_only", monkeypatch=monkeypatch,
                                      capsys=capsys)
    assert status == 0, err
    assert sorted(os.listdir(tmp_path / "s")) == ["grid.png", "nearest.png", "samples.json"]  # no PNG per sample
    summary = json.load(open(tmp_path / "s" / "samples.json"))
    quality = summary["quality"]
    assert quality["samples_judged"] == 12 and quality["real"] == "the first 12 digits of S2"
    assert sum(quality["class_counts"]) == 12
    assert quality["real_fld"] < quality["fld"]  # six steps of training are far from real digits
    assert summary["samples"][0]["nearest"] == f"S1 #{summary['samples'][0]['nearest'].split('#')[1]}"
    assert "FLD" in out and "held-out digits" in out


@pytest.mark.slow
def test_inference_on_a_digits_model_points_to_sampling(digits_model, monkeypatch, capsys):
    path, _ = digits_model
    message = one_error_line(*run_in_process(INFER, "--model_path", path, monkeypatch=monkeypatch, capsys=capsys))
    assert "this model learned 64 digits of S1, not one picture" in message


@pytest.mark.slow
def test_resuming_refuses_a_default_path_holding_digits_of_another_count(digits_model, tmp_path, monkeypatch, capsys):
    """The default save path of S1 digits holds a model of 64 of them: a run on 32 may not replace it."""
    path, _ = digits_model
    folder = tmp_path / "model_ckpt"
    folder.mkdir()
    (folder / "digits_unet.pth").write_bytes(open(path, "rb").read())
    monkeypatch.chdir(tmp_path)
    message = one_error_line(*run_in_process(TRAIN, "--digits", "S1", "--num_images", "32", *TINY,
                                             monkeypatch=monkeypatch, capsys=capsys))
    assert "holds the model of another picture (digits S1)" in message


@pytest.mark.slow
def test_too_few_samples_to_judge_get_a_warning_not_a_traceback(digits_model, tmp_path, monkeypatch, capsys):
    path, _ = digits_model
    status, out, err = run_in_process(SAMPLE, "--model_path", path, "--num_samples", 3, "--steps", 2,
                                      "--output_dir", tmp_path / "s", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0 and "precision and recall need at least 4" in err
    assert "quality" not in json.load(open(tmp_path / "s" / "samples.json"))
