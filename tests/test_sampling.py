"""Generating from pure noise (ddpm_sample.py) and telling copies from new images (the d1/d2 ratio)."""

import json
import os

import pytest
import torch
from PIL import Image

from conftest import REPO, run_in_process, smooth_test_image
from ddpm import NoiseSchedule, save_checkpoint
from models import UNet
from ddpm.data import dataset_digest, list_images
from ddpm.metrics import MEMORIZED_RATIO, nearest_training_images
from test_cli import one_error_line

SAMPLE = os.path.join(REPO, "ddpm_sample.py")


# ---- the memorisation ratio on constructed cases ---------------------------------------------

def random_images(count, seed=0):
    return torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_an_exact_copy_has_ratio_zero_and_a_midpoint_between_two_images_has_ratio_one():
    training = random_images(5)
    index, d1, d2, ratio = nearest_training_images(training[[3, 1]], training)
    assert index.tolist() == [3, 1] and d1.tolist() == [0.0, 0.0] and ratio.tolist() == [0.0, 0.0]
    midpoint = (training[0] + training[2]) / 2
    _, d1, d2, ratio = nearest_training_images(midpoint[None], training[[0, 2]])
    assert ratio.item() == pytest.approx(1.0, abs=1e-12)
    # d1 is the L2 distance on the [0, 1] scale: half the [-1, 1] distance
    assert d1.item() == pytest.approx(float(torch.dist(midpoint, training[0])) / 2)


def test_a_sample_near_one_image_counts_as_memorised_and_one_between_two_does_not():
    training = random_images(4)
    near = training[1] + 0.05 * (training[2] - training[1])  # 5% of the way to another image
    between = 0.6 * training[1] + 0.4 * training[2]
    ratio = nearest_training_images(torch.stack([near, between]), training)[3]
    assert (ratio < MEMORIZED_RATIO).tolist() == [True, False]


def test_with_one_training_image_its_flat_colour_stands_in_for_the_second_neighbour():
    image = random_images(1)
    flat = image.mean(dim=(-2, -1), keepdim=True).expand_as(image)
    ratio = nearest_training_images(torch.cat([image, flat]), image)[3]
    assert ratio[0].item() == 0.0 and ratio[1].item() == pytest.approx(1.0)


def test_the_training_set_may_be_read_in_chunks():
    training, samples = random_images(37), random_images(6, seed=1)
    whole = nearest_training_images(samples, training, chunk=100)
    chunked = nearest_training_images(samples, training, chunk=5)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


# ---- ddpm_sample.py --------------------------------------------------------------------------

def generator_checkpoint(tmp_path, max_noise=1.0, folder=True):
    """A tiny, barely trained checkpoint that records a folder of 3 images (or one image) it was trained on."""
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    for i in range(3):
        Image.fromarray(smooth_test_image(seed=i)).save(photos / f"img_{i}.png")
    paths = list_images(str(photos))
    if folder:
        data = {"img_size": 16, "image_dir": str(photos), "num_images": 3,
                "files": [os.path.basename(p) for p in paths], "dataset_sha256": dataset_digest(str(photos), paths)}
    else:
        from ddpm.files import file_sha256
        data = {"img_size": 16, "image_path": paths[0], "image_sha256": file_sha256(paths[0])}
    torch.manual_seed(0)
    model = UNet(3, 8, (1, 2))
    path = tmp_path / "gen.pth"
    save_checkpoint(str(path), model, NoiseSchedule(max_noise=max_noise), data=data, train_info={"args": {}})
    return path, photos


def sample(*args, monkeypatch, capsys):
    return run_in_process(SAMPLE, *args, "--device", "cpu", monkeypatch=monkeypatch, capsys=capsys)


def test_sampling_writes_the_samples_a_grid_and_the_nearest_training_images(tmp_path, monkeypatch, capsys):
    model, _ = generator_checkpoint(tmp_path)
    status, out, err = sample("--model_path", model, "--num_samples", 3, "--steps", 4, "--output_dir",
                              tmp_path / "s", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    assert sorted(os.listdir(tmp_path / "s")) == ["grid.png", "nearest.png", "sample_000.png", "sample_001.png",
                                                  "sample_002.png", "samples.json"]
    assert Image.open(tmp_path / "s" / "sample_000.png").size == (16, 16)
    summary = json.load(open(tmp_path / "s" / "samples.json"))
    assert summary["training_images"] == 3 and len(summary["samples"]) == 3
    for entry in summary["samples"]:
        assert entry["nearest"] in ("img_0.png", "img_1.png", "img_2.png")
        assert entry["ratio"] == pytest.approx(entry["d1"] / entry["d2"])
        assert entry["memorized"] == (entry["ratio"] < 1 / 3)
    assert f"{sum(e['memorized'] for e in summary['samples'])} of 3" in out


def test_the_same_seed_gives_the_same_samples_and_another_seed_others(tmp_path, monkeypatch, capsys):
    model, _ = generator_checkpoint(tmp_path)
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        status, _, err = sample("--model_path", model, "--num_samples", 2, "--steps", 3, "--eta", 1, "--seed", seed,
                                "--output_dir", tmp_path / name, monkeypatch=monkeypatch, capsys=capsys)
        assert status == 0, err
    files = {name: (tmp_path / name / "sample_001.png").read_bytes() for name in "abc"}
    assert files["a"] == files["b"] and files["a"] != files["c"]


def test_a_smaller_batch_gives_the_same_samples_with_and_without_guidance(tmp_path, monkeypatch, capsys):
    """--batch_size only splits the network's forward passes: the sampler steps all samples together."""
    from ddpm.diffusion import InBatches, generate
    from ddpm.guidance import Guided

    model, _ = generator_checkpoint(tmp_path)
    runs = {}
    for size in (128, 2):
        out = tmp_path / f"b{size}"
        status, _, err = sample("--model_path", model, "--num_samples", 5, "--steps", 3, "--eta", 1, "--batch_size",
                                size, "--output_dir", out, monkeypatch=monkeypatch, capsys=capsys)
        assert status == 0, err
        runs[size] = [(out / f"sample_{i:03d}.png").read_bytes() for i in range(5)]
    assert runs[128] == runs[2]  # here to the 8-bit pixel
    torch.manual_seed(0)
    conditional = UNet(3, 8, (1, 2), num_classes=3).eval()
    labels = torch.tensor([0, 1, 2, 0, 1])
    whole = generate(Guided(conditional, labels, 2.0), NoiseSchedule(max_noise=1.0), (5, 3, 16, 16), 3, 1.0, 0)
    split = generate(Guided(InBatches(conditional, 3), labels, 2.0), NoiseSchedule(max_noise=1.0), (5, 3, 16, 16),
                     3, 1.0, 0)
    assert torch.allclose(whole, split, atol=1e-5)  # the kernels may add in another order for another batch


def test_without_the_training_images_it_still_samples_and_says_why_there_is_no_comparison(tmp_path, monkeypatch,
                                                                                        capsys):
    model, photos = generator_checkpoint(tmp_path)
    os.rename(photos, tmp_path / "moved")
    status, out, err = sample("--model_path", model, "--num_samples", 2, "--steps", 2, "--output_dir",
                              tmp_path / "s", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0 and "which is not there: no nearest-neighbour comparison" in err
    assert not (tmp_path / "s" / "nearest.png").exists() and (tmp_path / "s" / "grid.png").exists()


def test_a_one_image_full_noise_model_samples_against_its_picture(tmp_path, monkeypatch, capsys):
    model, _ = generator_checkpoint(tmp_path, folder=False)
    status, out, err = sample("--model_path", model, "--num_samples", 2, "--steps", 2, "--output_dir",
                              tmp_path / "s", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    summary = json.load(open(tmp_path / "s" / "samples.json"))
    assert summary["training_images"] == 1 and "flat image of its own colour" in out


def test_a_denoiser_cannot_generate_and_bad_outputs_are_refused(tmp_path, monkeypatch, capsys):
    denoiser, _ = generator_checkpoint(tmp_path, max_noise=0.8)
    result = sample("--model_path", denoiser, "--output_dir", tmp_path / "s", monkeypatch=monkeypatch, capsys=capsys)
    assert "never saw pure noise" in one_error_line(*result)
    generator, _ = generator_checkpoint(tmp_path)
    (tmp_path / "afile").write_text("keep me")
    result = sample("--model_path", generator, "--output_dir", tmp_path / "afile", monkeypatch=monkeypatch,
                    capsys=capsys)
    assert "is a file, not a folder" in one_error_line(*result)
    assert (tmp_path / "afile").read_text() == "keep me"
    for args, message in ((["--num_samples", 0], "--num_samples"), (["--eta", 2], "--eta"),
                          (["--model_path", tmp_path / "none.pth"], "does not exist")):
        result = sample("--model_path", generator, *args, monkeypatch=monkeypatch, capsys=capsys)
        assert message in one_error_line(*result)
    assert not os.path.exists("samples")


def test_ddpm_infer_on_a_folder_model_asks_for_a_picture_in_one_line(tmp_path, monkeypatch, capsys):
    model, _ = generator_checkpoint(tmp_path)
    result = run_in_process(os.path.join(REPO, "ddpm_infer.py"), "--model_path", model, "--result_path",
                            tmp_path / "r.png", monkeypatch=monkeypatch, capsys=capsys)
    assert "learned a folder (3 images of" in one_error_line(*result) and not (tmp_path / "r.png").exists()
