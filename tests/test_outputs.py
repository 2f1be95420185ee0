"""No learner's run replaces a shipped file: a model other than the shipped one, or an experiment with other
settings, writes its figures and records under runs/, and only the run that made a shipped file writes it."""

import os
import runpy

import pytest

from conftest import INFER, REPO, run_in_process

EXPERIMENTS = os.path.join(REPO, "experiments")
SCRIPTS = {"infer": INFER, "guidance": os.path.join(EXPERIMENTS, "guidance.py"),
           "generalization": os.path.join(EXPERIMENTS, "generalization.py"),
           "global_context": os.path.join(REPO, "benchmarks", "global_context.py"),
           "digit_classifier": os.path.join(EXPERIMENTS, "digit_classifier.py"),
           "ablations": os.path.join(REPO, "benchmarks", "ablations.py"),
           "precision": os.path.join(REPO, "benchmarks", "precision.py"),
           "process_tuning": os.path.join(REPO, "benchmarks", "process_tuning.py")}


def parse(script, *argv):
    """The script's parse_args, called as its command line would be, without running it."""
    return runpy.run_path(SCRIPTS[script])["parse_args"](list(argv))


def test_the_shipped_model_writes_the_shipped_figures_and_any_other_its_own(monkeypatch):
    monkeypatch.chdir(REPO)  # where the README's commands run
    shipped = parse("infer")
    assert shipped.result_path == "images/inference_result.png"
    assert parse("infer", "--sweep").sweep_path == "images/noise_sweep.png"
    assert parse("infer", "--sweep").result_path == "images/inference_result.png"  # the same figure
    assert parse("infer", "--t", "1000", "--steps", "10", "--result_path", "images/inference_result_10_steps.png",
                 "--gif", "images/denoise_trajectory.gif").trajectory_path == "images/denoise_trajectory.png"
    # the shipped model at other settings draws other figures: they go to its own folder
    for other in (["--t", "300"], ["--steps", "10"], ["--sweep", "--seed", "1"], ["--precision", "bf16"]):
        own = parse("infer", *other)
        assert (own.result_path, own.trajectory_path, own.sweep_path) == (
            "runs/demo_unet/inference_result.png", "runs/demo_unet/denoise_trajectory.png",
            "runs/demo_unet/noise_sweep.png"), other
    for model in ("model_ckpt/my_photo_unet.pth", "model_ckpt/demo_unet_full_noise.pth"):
        own = parse("infer", "--model_path", model)
        folder = os.path.join("runs", os.path.splitext(os.path.basename(model))[0])
        assert (own.result_path, own.trajectory_path, own.sweep_path) == (
            os.path.join(folder, "inference_result.png"), os.path.join(folder, "denoise_trajectory.png"),
            os.path.join(folder, "noise_sweep.png"))
    typed = parse("infer", "--model_path", "model_ckpt/my_photo_unet.pth", "--result_path", "here.png")
    assert typed.result_path == "here.png"  # a path the user gives is used as given


@pytest.mark.parametrize("script, shipped, other, outputs", [
    ("guidance", [], ["--scales", "0,1"], ("images/guidance.png", "images/guidance_grid.png", "images/guidance.json")),
    ("generalization", ["--workers", "1"], ["--train_steps", "10"],
     ("images/generalization.png", "images/generalization_grid.png", "images/generalization.json")),
    ("global_context", ["--out_dir", "elsewhere"], ["--train_steps", "5"],
     ("benchmarks/global_context.json", "images/first_prediction.png")),
])
def test_an_experiment_writes_its_shipped_record_only_with_the_shipped_settings(script, shipped, other, outputs):
    args = vars(parse(script, *shipped))  # settings that do not change the numbers still make the shipped run
    assert sorted(path for path in args.values() if path in outputs) == sorted(outputs)
    args = vars(parse(script, *other))
    own = sorted(path for path in args.values() if isinstance(path, str) and path.startswith("runs" + os.sep))
    assert own == sorted(os.path.join("runs", script, os.path.basename(path)) for path in outputs)


@pytest.mark.parametrize("script, flag, shipped, others, path", [
    ("digit_classifier", "model_path", [], [["--epochs", "5"], ["--seed", "1"]], "model_ckpt/digit_classifier.pth"),
    ("ablations", "json", ["--compile"], [[], ["--compile", "--rounds", "2"]], "benchmarks/ablations.json"),
    ("precision", "output", ["--recipes", "fp32,bf16", "--seeds", "0,1"],
     [[], ["--parts", "speed"], ["--recipes", "fp32,bf16", "--seeds", "0"]], "benchmarks/precision.json"),
    ("process_tuning", "json", [], [["--rounds", "1"]], "benchmarks/process_tuning.json"),
])
def test_a_record_is_written_only_by_its_command(script, flag, shipped, others, path, monkeypatch):
    """A benchmark's record, or the judge of every quality number, is rewritten only by the command that made it
    (`python benchmarks/precision.py --parts speed` would otherwise replace the whole record with a part)."""
    monkeypatch.chdir(REPO)

    def written(*argv):
        return os.path.relpath(os.path.join(REPO, getattr(parse(script, *argv), flag)), REPO)
    assert written(*shipped) == path
    for other in others:
        assert written(*other) == os.path.join("runs", script, os.path.basename(path)), other
    assert written(*others[0], f"--{flag}", "mine.json") == "mine.json"  # a path the user gives is used as given


def test_a_learners_model_run_end_to_end_leaves_images_alone(tmp_path, tiny_checkpoint, tiny_image, monkeypatch,
                                                             capsys):
    status, out, err = run_in_process(INFER, "--model_path", tiny_checkpoint, "--image_path", tiny_image,
                                      "--steps", 2, "--sweep",
                                      monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    assert sorted(os.listdir(tmp_path / "runs" / "tiny")) == ["denoise_trajectory.png", "inference_result.png",
                                                              "noise_sweep.png"]
    assert not (tmp_path / "images").exists()
    assert "saved runs/tiny/inference_result.png" in out
