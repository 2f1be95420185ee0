"""Training on a folder of images: loading, the order of batches, EMA, the checkpoint's record of the data."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_NET, TRAIN, run_in_process, smooth_test_image, train_until_a_power_cut
from ddpm import NoiseSchedule, load_checkpoint, load_image
from models import UNet
from ddpm.data import ImageFiles, batch_stream, choose_images, dataset_digest, list_images
from ddpm.diffusion import training_losses
from ddpm.training import EMA, GRAD_CLIP_NORM, Trainer, learning_rate_factor
from test_cli import one_error_line

QUICK = ["--img_size", 16, *TINY_NET]


def photo_folder(root, count=3, size=(24, 20)):
    """A folder of ``count`` small colour PNGs (different pictures), one in a sub-folder."""
    os.makedirs(root / "sub", exist_ok=True)
    for i in range(count):
        where = root / "sub" if i == count - 1 else root
        Image.fromarray(smooth_test_image(*size, seed=i)).save(where / f"img_{i}.png")
    return root


# ---- loading ---------------------------------------------------------------------------------

def test_every_image_under_the_folder_is_found_in_sorted_order_and_nothing_else(tmp_path):
    folder = photo_folder(tmp_path / "photos", count=3)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes((folder / "img_0.png").read_bytes())
    os.makedirs(folder / ".cache")
    (folder / ".cache" / "thumb.png").write_bytes((folder / "img_0.png").read_bytes())
    found = [os.path.relpath(p, folder) for p in list_images(str(folder))]
    assert found == ["img_0.png", "img_1.png", os.path.join("sub", "img_2.png")]
    assert [os.path.relpath(p, folder) for p in choose_images(str(folder), 2)] == ["img_0.png", "img_1.png"]


def test_mixed_sizes_and_modes_all_become_rgb_squares_in_minus_one_to_one(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    rgb = smooth_test_image(30, 40)
    Image.fromarray(rgb).save(folder / "a_rgb.png")
    Image.fromarray(rgb[:, :, 0]).save(folder / "b_gray.png")  # mode L
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(folder / "c_rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "d_palette.png")
    Image.fromarray((rgb[:, :, 1].astype(np.uint16) * 257)).save(folder / "e_16bit.png")  # mode I;16
    Image.fromarray(smooth_test_image(50, 12)).save(folder / "f_tall.jpg")
    dataset = ImageFiles(list_images(str(folder)), 16)
    assert len(dataset) == 6
    for i in range(6):
        image = dataset[i]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert -1 <= image.min() and image.max() <= 1
    gray = dataset[1]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # gray stays gray, in 3 channels


def test_a_folder_too_big_for_memory_is_read_image_by_image_with_the_same_result(tmp_path):
    paths = list_images(str(photo_folder(tmp_path / "photos", count=3)))
    cached, lazy = ImageFiles(paths, 16), ImageFiles(paths, 16, cache_bytes=0)
    assert cached.images is not None and lazy.images is None
    for i in range(3):
        assert torch.equal(cached[i], lazy[i])
        assert torch.equal(lazy[i], load_image(paths[i], 16)[0])


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_an_unreadable_image_in_the_folder_is_named_in_one_line(tmp_path, monkeypatch, capsys, kind):
    folder = photo_folder(tmp_path / "photos")
    bad = folder / "sub" / "broken.png"
    if kind == "truncated":
        data = (folder / "img_0.png").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_text("I am not a picture")
    result = run_in_process(TRAIN, "--image_dir", folder, *QUICK, "--train_steps", 2,
                            monkeypatch=monkeypatch, capsys=capsys)
    line = one_error_line(*result)
    assert "broken.png" in line and "cannot be read as an image" in line
    assert not os.path.exists("model_ckpt")  # nothing written


@pytest.mark.parametrize("args, message", [
    (["--num_images", 5], "--num_images 5 is more than the 3 images found in"),
    (["--image_path", "x.png"], "--image_dir and --image_path cannot be used together"),
])
def test_folder_flags_that_cannot_work_are_refused_in_one_line(tmp_path, monkeypatch, capsys, args, message):
    folder = photo_folder(tmp_path / "photos")
    result = run_in_process(TRAIN, "--image_dir", folder, *args, *QUICK, monkeypatch=monkeypatch, capsys=capsys)
    assert message in one_error_line(*result)
    assert not os.path.exists("model_ckpt")


def test_an_empty_or_missing_folder_and_num_images_without_a_folder_are_refused(tmp_path, tiny_image, monkeypatch,
                                                                                 capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    cases = [(["--image_dir", tmp_path / "empty"], "holds no image files"),
             (["--image_dir", tmp_path / "nowhere"], "does not exist"),
             (["--image_dir", tiny_image], "is a file, not a folder"),
             (["--image_path", tiny_image, "--num_images", 2], "--num_images needs --image_dir")]
    for args, message in cases:
        result = run_in_process(TRAIN, *args, *QUICK, monkeypatch=monkeypatch, capsys=capsys)
        assert message in one_error_line(*result)


def test_the_digest_names_the_files_and_their_bytes(tmp_path):
    folder = photo_folder(tmp_path / "photos")
    paths = list_images(str(folder))
    before = dataset_digest(str(folder), paths)
    assert dataset_digest(str(folder), paths) == before
    os.rename(folder / "img_1.png", folder / "img_1b.png")
    assert dataset_digest(str(folder), list_images(str(folder))) != before
    os.rename(folder / "img_1b.png", folder / "img_1.png")
    with open(folder / "img_0.png", "ab") as f:
        f.write(b"\0")
    assert dataset_digest(str(folder), paths) != before


# ---- the order of batches --------------------------------------------------------------------

def test_each_epoch_shows_every_image_once_and_processes_share_them_out():
    stream = batch_stream(6, 3, seed=0)
    epochs = [sorted(next(stream) + next(stream)) for _ in range(3)]
    assert epochs == [list(range(6))] * 3
    ranks = [batch_stream(6, 3, seed=0, rank=r, world_size=2) for r in range(2)]
    first = [next(s) for s in ranks]
    assert sorted(first[0] + first[1]) == list(range(6))  # an epoch, split between the processes
    assert next(batch_stream(1, 4, seed=0)) == [0, 0, 0, 0]  # one image: B copies of it


def test_a_small_folder_on_many_processes_repeats_images_to_pad_the_epoch():
    per_rank = [next(batch_stream(6, 2, seed=0, rank=r, world_size=4)) for r in range(4)]
    seen = sum(per_rank, [])
    assert len(seen) == 8 and sorted(set(seen)) == list(range(6))  # 8 slots for 6 images: 2 seen twice


def test_the_stream_continues_where_a_resumed_run_left_off():
    straight = batch_stream(5, 3, seed=1)
    batches = [next(straight) for _ in range(7)]
    resumed = batch_stream(5, 3, seed=1, start_step=4)
    assert [next(resumed) for _ in range(3)] == batches[4:]


# ---- EMA -------------------------------------------------------------------------------------

def test_ema_moves_towards_the_weights_by_one_minus_the_warmed_up_decay():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    start = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, updates_so_far=0)  # d = min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.model.weight, 0.1 * start + 0.9 * model.weight)
    previous = ema.model.weight.clone()
    ema.update(model, updates_so_far=1000)  # d = min(0.9, 1001/1010) = 0.9
    assert torch.allclose(ema.model.weight, 0.9 * previous + 0.1 * model.weight)
    assert not ema.model.weight.requires_grad


def test_training_with_ema_keeps_the_average_and_the_checkpoint_samples_with_it(tmp_path, monkeypatch, capsys):
    folder = photo_folder(tmp_path / "photos")
    status, out, err = run_in_process(TRAIN, "--image_dir", folder, *QUICK, "--train_steps", 6, "--batch_size", 4,
                                      "--ema_decay", 0.5, "--model_save_path", tmp_path / "m.pth",
                                      monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    checkpoint = torch.load(tmp_path / "m.pth", weights_only=True)
    assert "ema" in checkpoint and set(checkpoint["ema"]) == set(checkpoint["model"])
    assert any(not torch.equal(checkpoint["ema"][k], checkpoint["model"][k]) for k in checkpoint["model"])
    sampling, _, _ = load_checkpoint(str(tmp_path / "m.pth"))
    trained, _, _ = load_checkpoint(str(tmp_path / "m.pth"), ema=False)
    for name, weight in sampling.state_dict().items():
        assert torch.equal(weight, checkpoint["ema"][name])
        assert torch.equal(trained.state_dict()[name], checkpoint["model"][name])


# ---- the checkpoint's record; the defaults of a folder; resume -------------------------------

def test_a_folder_run_records_its_files_and_defaults_to_a_generator(tmp_path, monkeypatch, capsys):
    folder = photo_folder(tmp_path / "photos")
    status, out, err = run_in_process(TRAIN, "--image_dir", folder, "--num_images", 2, *QUICK, "--train_steps", 3,
                                      monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    path = os.path.join("model_ckpt", "photos_unet.pth")  # named after the folder
    checkpoint = torch.load(path, weights_only=True)
    data = checkpoint["data"]
    assert data["files"] == ["img_0.png", "img_1.png"] and data["num_images"] == 2
    assert data["dataset_sha256"] == dataset_digest(str(folder), list_images(str(folder))[:2])
    assert checkpoint["noise_config"]["max_noise"] == 1.0
    args = checkpoint["train"]["args"]
    assert (args["batch_size"], args["ema_decay"], args["image_path"]) == (16, 0.999, None)
    record = json.load(open(os.path.join("model_ckpt", "photos_unet.json")))
    assert record["dataset_sha256"] == data["dataset_sha256"] and "files" not in record


def test_resume_of_a_folder_run_continues_exactly_and_refuses_a_changed_folder(tmp_path, monkeypatch, capsys):
    folder = photo_folder(tmp_path / "photos")
    common = ["--image_dir", folder, *QUICK, "--train_steps", 6, "--batch_size", 2, "--save_every", 3]
    straight = run_in_process(TRAIN, *common, "--model_save_path", tmp_path / "straight.pth",
                              monkeypatch=monkeypatch, capsys=capsys)
    assert straight[0] == 0, straight[2]

    train_until_a_power_cut(*common, "--model_save_path", tmp_path / "m.pth", at_step=4, monkeypatch=monkeypatch,
                            capsys=capsys)
    snapshot = tmp_path / "m.resume.pth"

    Image.fromarray(smooth_test_image(seed=9)).save(folder / "img_9.png")  # a new image joins the folder
    result = run_in_process(TRAIN, "--resume", snapshot, monkeypatch=monkeypatch, capsys=capsys)
    assert "have changed since the run started" in one_error_line(*result)
    os.remove(folder / "img_9.png")

    status, out, err = run_in_process(TRAIN, "--resume", snapshot, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    resumed, reference = (torch.load(p, weights_only=True) for p in (tmp_path / "m.pth", tmp_path / "straight.pth"))
    for key in ("model", "ema"):
        assert all(torch.equal(resumed[key][k], reference[key][k]) for k in reference[key]), key
    assert resumed["train"]["loss_history"] == reference["train"]["loss_history"]


# ---- one image: the same code path, the same numbers as before -------------------------------

def old_training_loop(model, x0, schedule, steps, lr, batch_size, generator):
    """The loop as it was before folders: the image expanded to a batch, Adam, warm-up, cosine, clipping."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, steps))
    x0_batch = x0.expand(batch_size, -1, -1, -1)
    for _ in range(steps):
        losses, _ = training_losses(model, x0_batch, schedule, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM, foreach=True)
        optimizer.step()
        lr_schedule.step()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_one_image_trains_bit_for_bit_as_the_loop_before_folders(tiny_image, batch_size):
    x0 = load_image(tiny_image, 16)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(UNet(3, 8, (1, 2)).to(memory_format=torch.channels_last))
    old_training_loop(models[0], x0, NoiseSchedule(), 8, 3e-3, batch_size, torch.Generator().manual_seed(0))
    Trainer(models[1], x0, NoiseSchedule(), 8, 3e-3, batch_size=batch_size,
            generator=torch.Generator().manual_seed(0)).run(show_progress=False)
    for name, weight in models[0].state_dict().items():
        assert torch.equal(models[1].state_dict()[name], weight), name
