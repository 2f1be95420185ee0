"""Mixed precision (--precision bf16): what stays float32, exact resume, the default untouched, and the hardware checks.

These run on any CPU: where it has no native bf16, autocast emulates it (slower, but the same rules).
"""

import json
import os

import pytest
import torch

from conftest import INFER, REPO, TINY_NET, TRAIN, run_in_process
from ddpm import NoiseSchedule, load_image
from ddpm.diffusion import training_losses
from ddpm.errors import UserError
from ddpm.precision import autocast, check_precision
from ddpm.training import Trainer
from models import UNet
from models.unet_model import GroupNorm
from test_cli import one_error_line

SAMPLE = os.path.join(REPO, "ddpm_sample.py")
CPU = torch.device("cpu")


def new_trainer(image_path, precision, steps=12, seed=0):
    torch.manual_seed(seed)
    model = UNet(3, 8, (1, 2), attention=True)
    return Trainer(model, load_image(image_path, 16), NoiseSchedule(max_noise=1.0), steps, lr=3e-3, batch_size=2,
                   generator=torch.Generator().manual_seed(seed), precision=precision)


def test_under_bf16_the_convolutions_run_in_bf16_and_the_norms_the_prediction_and_the_loss_in_float32():
    torch.manual_seed(0)
    model = UNet(3, 8, (1, 2), attention=True)
    seen = {}

    def note_dtype(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)  # returns None: the output is left as it is
        return hook

    for name, module in model.named_modules():
        if name in ("conv_in", "encoder.0.norm1", "middle_attention.qkv", "conv_out"):
            module.register_forward_hook(note_dtype(name))
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    with autocast("bf16", CPU):
        losses, _ = training_losses(model, x0, NoiseSchedule(), generator=torch.Generator().manual_seed(0))
        x0_hat = model(x0, torch.tensor([10, 20]))
    assert seen == {"conv_in": torch.bfloat16, "encoder.0.norm1": torch.float32,
                    "middle_attention.qkv": torch.bfloat16, "conv_out": torch.float32}
    assert x0_hat.dtype == losses.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast casts copies, never the weights


def test_outside_autocast_our_group_norm_and_output_layer_are_the_plain_float32_ones_to_the_bit():
    torch.manual_seed(0)
    ours, plain = GroupNorm(8, 16), torch.nn.GroupNorm(8, 16)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(ours(x), plain(x))
    model = UNet(3, 8, (1, 2))
    h = torch.randn(1, 8, 16, 16)
    direct = model.conv_out(torch.nn.functional.silu(model.norm_out(h)))
    assert torch.equal(model.output_layer(h), direct)
    with autocast("fp32", CPU):  # fp32 enters no autocast at all
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_training_learns_and_keeps_weights_and_adam_in_float32(tiny_image):
    trainer = new_trainer(tiny_image, "bf16", steps=60)
    trainer.run(show_progress=False)
    losses = trainer.loss_history()
    assert sum(losses[-10:]) < sum(losses[:10]) / 2
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    moments = [s for state in trainer.optimizer.state.values() for s in (state["exp_avg"], state["exp_avg_sq"])]
    assert moments and all(m.dtype == torch.float32 for m in moments)


def test_bf16_is_not_fp32(tiny_image):
    """The flag does something: the same run in bf16 ends with other weights than in fp32."""
    runs = {p: new_trainer(tiny_image, p, steps=3) for p in ("fp32", "bf16")}
    for trainer in runs.values():
        trainer.run(show_progress=False)
    fp32, bf16 = (dict(runs[p].model.named_parameters()) for p in ("fp32", "bf16"))
    assert any(not torch.equal(fp32[name], bf16[name]) for name in fp32)


def test_a_bf16_run_stopped_and_resumed_ends_exactly_like_one_never_stopped(tiny_image, tmp_path, monkeypatch,
                                                                          capsys):
    common = ["--image_path", tiny_image, "--img_size", 16, "--train_steps", 12, "--save_every", 5,
              "--precision", "bf16", *TINY_NET]
    straight = tmp_path / "straight.pth"
    assert run_in_process(TRAIN, *common, "--model_save_path", straight, monkeypatch=monkeypatch, capsys=capsys)[0] == 0
    stopped = tmp_path / "stopped.pth"

    original_run = Trainer.run

    def stop_at_first_snapshot(trainer, **kwargs):  # what a Ctrl-C at step 5 does
        on_save = kwargs["on_save"]
        return original_run(trainer, **{**kwargs, "on_save": lambda t: (on_save(t), t.request_stop())})

    monkeypatch.setattr(Trainer, "run", stop_at_first_snapshot)
    status, _, err = run_in_process(TRAIN, *common, "--model_save_path", stopped, monkeypatch=monkeypatch,
                                    capsys=capsys)
    assert status == 130, err
    monkeypatch.setattr(Trainer, "run", original_run)
    snapshot = tmp_path / "stopped.resume.pth"
    # the resumed run takes its precision from the snapshot; a contradicting flag is refused
    status, out, err = run_in_process(TRAIN, "--resume", snapshot, "--precision", "fp32", monkeypatch=monkeypatch,
                                      capsys=capsys)
    assert "--precision fp32 disagrees with the run being resumed, which used bf16" in one_error_line(status, out, err)
    assert run_in_process(TRAIN, "--resume", snapshot, monkeypatch=monkeypatch, capsys=capsys)[0] == 0
    a, b = (torch.load(path, weights_only=True) for path in (straight, stopped))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["train"]["loss_history"] == b["train"]["loss_history"]
    record = json.loads((tmp_path / "stopped.json").read_text())
    assert record["precision"] == "bf16" and record["args"]["precision"] == "bf16"
    assert record["machine"]["cpu_flags"] is not None


def test_the_default_run_is_fp32_and_says_so(tiny_image, tmp_path, monkeypatch, capsys):
    status, _, err = run_in_process(TRAIN, "--image_path", tiny_image, "--img_size", 16, "--train_steps", 3,
                                    *TINY_NET, "--model_save_path", tmp_path / "m.pth", monkeypatch=monkeypatch,
                                    capsys=capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["precision"] == "fp32"
    assert torch.load(tmp_path / "m.pth", weights_only=True)["train"]["precision"] == "fp32"


def test_a_cpu_without_native_bf16_runs_bf16_with_one_warning(tiny_image, tmp_path, monkeypatch, capsys):
    import ddpm.precision

    monkeypatch.setattr(ddpm.precision, "native_bf16", lambda device: False)
    status, _, err = run_in_process(TRAIN, "--image_path", tiny_image, "--img_size", 16, "--train_steps", 3,
                                    *TINY_NET, "--precision", "bf16", "--model_save_path", tmp_path / "m.pth",
                                    monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no native bf16" in warnings[0] and "slower" in warnings[0]


def test_a_cpu_with_native_bf16_warns_of_nothing(monkeypatch):
    import ddpm.precision

    monkeypatch.setattr(ddpm.precision, "native_bf16", lambda device: True)
    said = []
    check_precision("bf16", CPU, said.append)
    check_precision("fp32", CPU, said.append)
    assert said == []


def test_a_cuda_gpu_without_bf16_is_refused_in_one_line(monkeypatch, tiny_checkpoint, tmp_path, capsys):
    import ddpm.precision

    monkeypatch.setattr(ddpm.precision, "native_bf16", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(UserError, match="compute capability 8.0 or higher; Tesla T4 is 7.5"):
        check_precision("bf16", torch.device("cuda"), print)
    check_precision("fp32", torch.device("cuda"), print)  # fp32 asks nothing of the GPU
    with pytest.raises(UserError, match="not on mps"):
        check_precision("bf16", torch.device("mps"), print)

    # through a script, on a machine that seems to have such a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    status, out, err = run_in_process(INFER, "--model_path", tiny_checkpoint, "--device", "cuda", "--precision", "bf16",
                                      "--result_path", tmp_path / "r.png", monkeypatch=monkeypatch, capsys=capsys)
    assert "compute capability 8.0" in one_error_line(status, out, err)
    assert not (tmp_path / "r.png").exists()


@pytest.mark.slow
def test_bf16_inference_and_sampling_stay_close_to_fp32(tmp_path, monkeypatch, capsys):
    import re

    shown = {}
    for precision in ("fp32", "bf16"):
        status, out, err = run_in_process(INFER, "--model_path", f"{REPO}/model_ckpt/demo_unet.pth", "--image_path",
                                          f"{REPO}/images/demo.png", "--precision", precision, "--result_path",
                                          tmp_path / f"{precision}.png", monkeypatch=monkeypatch, capsys=capsys)
        assert status == 0, err
        shown[precision] = float(re.search(r"PSNR inference output:\s+([\d.]+) dB", out).group(1))
    assert shown["bf16"] == pytest.approx(shown["fp32"], abs=0.1)
    status, out, err = run_in_process(SAMPLE, "--model_path", f"{REPO}/model_ckpt/digits_unet.pth", "--num_samples", 4,
                                      "--steps", 5, "--precision", "bf16", "--output_dir", tmp_path / "s",
                                      monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["precision"] == "bf16"


@pytest.mark.slow
def test_the_precision_benchmark_measures_each_recipe_and_seed_and_puts_the_layers_back(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "precision.json"
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "precision.py"), "--parts", "quality",
                           "--quality_steps", "2", "--recipes", "fp32,bf16-plain-autocast", "--seeds", "0,3",
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert list(report["quality"]) == ["fp32", "bf16-plain-autocast"] and report["quality_steps"] == 2
    assert report["quality_seeds"] == [0, 3]
    plain, fp32 = report["quality"]["bf16-plain-autocast"], report["quality"]["fp32"]
    assert plain == {**plain, "precision": "bf16", "groupnorm_fp32": False, "output_fp32": False}
    assert [run["seed"] for run in plain["runs"]] == [run["seed"] for run in fp32["runs"]] == [0, 3]
    assert plain["psnr_db_mean"] == pytest.approx(sum(run["psnr_db"] for run in plain["runs"]) / 2)
    assert fp32["runs"][0]["psnr_db"] != plain["runs"][0]["psnr_db"]  # the recipe reached the run
    assert fp32["runs"][0]["psnr_db"] != fp32["runs"][1]["psnr_db"]  # and so did the seed
    assert "cpu_flags" in report["machine"] and isinstance(report["native_bf16"], bool)
    assert "| bf16-plain-autocast | bf16 | bf16 |" in done.stdout

    bad = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "precision.py"), "--recipes", "fp16"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown part or recipe: fp16" in bad.stderr
    bad = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "precision.py"), "--seeds", "0,0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--seeds: must be distinct seeds" in bad.stderr


def test_layers_in_fp32_puts_the_network_back_as_it_was():
    from benchmarks.precision import layers_in_fp32

    with layers_in_fp32(norms=False, output=False):
        assert not GroupNorm.in_fp32 and not UNet.output_in_fp32
    assert GroupNorm.in_fp32 and UNet.output_in_fp32
