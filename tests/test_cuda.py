"""The CUDA path: training, inference and the benchmark on an NVIDIA GPU.

Skipped, as a whole, where torch sees no CUDA device; the rest of the suite
covers the same code on the CPU.
"""

import json
import re

import pytest
import torch

from conftest import INFER, REPO, TINY_NET, TRAIN, run_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def test_trainer_on_cuda_uses_fused_adam_and_learns(tiny_image):
    from ddpm import NoiseSchedule, load_image
    from models import UNet
    from ddpm.training import Trainer

    torch.manual_seed(0)
    model = UNet(3, 8, (1, 2)).cuda().to(memory_format=torch.channels_last)
    x0 = load_image(tiny_image, 16).cuda()
    trainer = Trainer(model, x0, NoiseSchedule(), 200, lr=3e-3, batch_size=4,
                      generator=torch.Generator(device="cuda").manual_seed(0))
    assert trainer.optimizer.defaults["fused"]
    trainer.run(show_progress=False)
    losses = trainer.loss_history()
    assert sum(losses[-20:]) < sum(losses[:20]) / 10


def test_train_and_infer_scripts_on_cuda(tmp_path, tiny_image):
    ckpt = tmp_path / "m.pth"
    trained = run_script(TRAIN, "--img_size", 16, "--train_steps", 30, "--eval_every", 10, "--image_path",
                         tiny_image, "--model_save_path", ckpt, "--device", "cuda", *TINY_NET, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "on cuda" in trained.stdout
    quality = json.loads((tmp_path / "m.json").read_text())["quality"]
    inferred = run_script(INFER, "--image_path", tiny_image, "--model_path", ckpt, "--result_path",
                          tmp_path / "r.png", "--device", "cuda", cwd=tmp_path)
    assert inferred.returncode == 0, inferred.stderr
    assert "device=cuda" in inferred.stdout
    shown = float(re.search(r"PSNR inference output:\s+([\d.]+) dB", inferred.stdout).group(1))
    assert shown == pytest.approx(quality["psnr_db"][-1], abs=0.01)


def test_shipped_model_denoises_on_cuda_as_on_the_cpu(tmp_path):
    """Same checkpoint, same noise (drawn on the CPU): the GPU's PSNR matches the README's within 0.05 dB."""
    outputs = {}
    for device in ("cpu", "cuda"):
        done = run_script(INFER, "--image_path", f"{REPO}/images/demo.png", "--model_path",
                          f"{REPO}/model_ckpt/demo_unet.pth", "--result_path", tmp_path / f"{device}.png",
                          "--device", device, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        outputs[device] = float(re.search(r"PSNR inference output:\s+([\d.]+) dB", done.stdout).group(1))
    assert outputs["cuda"] == pytest.approx(outputs["cpu"], abs=0.05)


def test_benchmark_quick_run_on_cuda(tmp_path):
    from benchmarks import benchmark

    report = benchmark.main(["--quick", "--models", "ours", "--device", "cuda", "--skip_infer",
                             "--json", str(tmp_path / "r.json")])
    assert set(report["matmul_peak"]["rates"]) == {"torch.mm bf16"}
    ours = report["sizes"]["32"]["ours"]
    assert ours["step_ms"] > 0 and ours["peak_memory_mb"] > 0 and 0 < ours["fraction_of_peak"]


def test_bf16_autocast_trains_on_cuda_with_float32_weights_and_a_float32_prediction(tiny_image):
    from ddpm import NoiseSchedule, load_image
    from ddpm.precision import autocast, native_bf16
    from ddpm.training import Trainer
    from models import UNet

    if not native_bf16(torch.device("cuda")):
        pytest.skip("this GPU has no native bf16 (compute capability below 8.0)")
    torch.manual_seed(0)
    model = UNet(3, 8, (1, 2), attention=True).cuda().to(memory_format=torch.channels_last)
    x0 = load_image(tiny_image, 16).cuda()
    trainer = Trainer(model, x0, NoiseSchedule(), 200, lr=3e-3, batch_size=4,
                      generator=torch.Generator(device="cuda").manual_seed(0), precision="bf16")
    trainer.run(show_progress=False)
    losses = trainer.loss_history()
    assert sum(losses[-20:]) < sum(losses[:20]) / 10
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad(), autocast("bf16", torch.device("cuda")):
        assert model(x0, torch.tensor([100], device="cuda")).dtype == torch.float32
