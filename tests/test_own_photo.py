"""A learner's own photo: its own checkpoint, its own ground truth, and a notice for a picture the model never saw."""

import os
import shutil

import numpy as np
from PIL import Image

import ddpm.training_run
from conftest import INFER, TINY_NET, TRAIN, run_in_process, smooth_test_image

QUICK = ["--img_size", 16, "--train_steps", 2, "--eval_every", 0, *TINY_NET]


def photo(path, seed):
    """A small picture at ``path``; another seed gives another picture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(smooth_test_image(seed=seed)).save(path)
    return path


def train(*args, monkeypatch, capsys):
    return run_in_process(TRAIN, *QUICK, *args, monkeypatch=monkeypatch, capsys=capsys)


def infer(*args, monkeypatch, capsys):
    return run_in_process(INFER, "--result_path", "result.png", *args, monkeypatch=monkeypatch, capsys=capsys)


def test_training_on_a_photo_writes_its_own_model_and_leaves_the_demo_model_alone(tmp_path, monkeypatch, capsys):
    demo = photo(tmp_path / "images" / "demo.png", seed=0)
    status, _, err = train("--image_path", demo, "--model_save_path", "model_ckpt/demo_unet.pth",
                           monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    demo_model = open("model_ckpt/demo_unet.pth", "rb").read()

    status, out, err = train("--image_path", photo(tmp_path / "my_photo.png", seed=1),
                             monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    assert "the model will go to model_ckpt/my_photo_unet.pth" in out
    assert f"saved {os.path.abspath('model_ckpt/my_photo_unet.pth')}" in out
    assert os.path.exists("model_ckpt/my_photo_unet.json") and os.path.exists("model_ckpt/my_photo_unet_loss.png")
    assert open("model_ckpt/demo_unet.pth", "rb").read() == demo_model

    # and inference, with no --image_path, denoises that photo: the one the checkpoint names
    status, out, err = infer("--model_path", "model_ckpt/my_photo_unet.pth", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0 and err == "", err
    assert "PSNR inference output" in out and os.path.exists("result.png")


def test_the_default_image_still_trains_the_default_model(tmp_path, monkeypatch, capsys):
    photo(tmp_path / "images" / "demo.png", seed=0)
    status, out, err = train(monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    assert "the model will go to model_ckpt/demo_unet.pth" in out
    # retraining the same picture may replace its own model: that is how the shipped one is remade
    status, _, err = train(monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err


def test_a_photo_with_the_same_file_name_never_replaces_another_pictures_model(tmp_path, monkeypatch, capsys):
    assert train("--image_path", photo(tmp_path / "a" / "photo.png", seed=1),
                 monkeypatch=monkeypatch, capsys=capsys)[0] == 0
    before = {name: open(os.path.join("model_ckpt", name), "rb").read() for name in os.listdir("model_ckpt")}

    status, out, err = train("--image_path", photo(tmp_path / "b" / "photo.png", seed=2),
                             monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "holds the model of another picture" in err and "--model_save_path" in err
    after = {name: open(os.path.join("model_ckpt", name), "rb").read() for name in os.listdir("model_ckpt")}
    assert after == before  # nothing written, nothing lost

    # naming the path is a deliberate choice, and works
    status, _, err = train("--image_path", tmp_path / "b" / "photo.png", "--model_save_path", "model_ckpt/b.pth",
                           monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err


def test_other_settings_never_replace_the_model_of_the_same_picture(tmp_path, monkeypatch, capsys):
    """`python ddpm_train.py --train_steps 100` would otherwise replace the shipped model: only the run that made
    a model may remake it at its default path; another run must name its own."""
    demo = photo(tmp_path / "images" / "demo.png", seed=0)
    assert train(monkeypatch=monkeypatch, capsys=capsys)[0] == 0
    before = {name: open(os.path.join("model_ckpt", name), "rb").read() for name in os.listdir("model_ckpt")}

    for other in (["--train_steps", 3], ["--channel_mults", "1,1"], ["--precision", "bf16"]):
        status, out, err = train(*other, monkeypatch=monkeypatch, capsys=capsys)
        lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]  # no native bf16
        assert status == 2 and len(lines) == 1, err
        assert "'model_ckpt/demo_unet.pth' holds a model of the same data trained with other settings" in err
        assert f"--{other[0][2:]} " in err and "--model_save_path" in err
    assert "--train_steps 2 where this run has 3" in train("--train_steps", 3, monkeypatch=monkeypatch,
                                                          capsys=capsys)[2]
    with monkeypatch.context() as patch:  # the same command under torchrun, in two processes
        patch.setattr(ddpm.training_run, "rank_and_world_size", lambda: (0, 2))
        status, _, err = train(monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2 and "(1 process where this run has 2)" in err, err
    after = {name: open(os.path.join("model_ckpt", name), "rb").read() for name in os.listdir("model_ckpt")}
    assert after == before  # nothing written, nothing lost

    status, _, err = train("--train_steps", 3, "--model_save_path", "model_ckpt/longer.pth",
                           monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    assert os.path.exists(demo)


def test_a_file_that_is_not_a_checkpoint_is_not_replaced_either(tmp_path, monkeypatch, capsys):
    os.makedirs("model_ckpt")
    with open("model_ckpt/photo_unet.pth", "wb") as f:
        f.write(b"someone's notes")
    status, _, err = train("--image_path", photo(tmp_path / "photo.png", seed=1), monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "exists and is not a checkpoint of this project, so it is kept" in err and "--model_save_path" in err
    assert open("model_ckpt/photo_unet.pth", "rb").read() == b"someone's notes"


def trained_model(tmp_path, monkeypatch, capsys):
    image = photo(tmp_path / "pictures" / "cat.png", seed=1)
    assert train("--image_path", image, monkeypatch=monkeypatch, capsys=capsys)[0] == 0
    return image, "model_ckpt/cat_unet.pth"


def test_inference_refuses_when_the_training_image_has_moved(tmp_path, monkeypatch, capsys):
    image, model = trained_model(tmp_path, monkeypatch, capsys)
    shutil.move(image, tmp_path / "elsewhere.png")
    status, _, err = infer("--model_path", model, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"the model was trained on {str(image)!r}, which is not there" in err and "--image_path" in err
    assert not os.path.exists("result.png")
    # passing the picture where it now is works
    status, _, err = infer("--model_path", model, "--image_path", tmp_path / "elsewhere.png",
                           monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0 and err == "", err


def test_inference_refuses_when_the_training_image_has_changed(tmp_path, monkeypatch, capsys):
    image, model = trained_model(tmp_path, monkeypatch, capsys)
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] ^= 1  # one bit of one pixel
    Image.fromarray(pixels).save(image)
    status, _, err = infer("--model_path", model, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "has changed since the model was trained on it" in err and "--image_path" in err
    assert not os.path.exists("result.png")


def test_a_picture_the_model_never_saw_gets_a_notice_and_is_denoised_anyway(tmp_path, monkeypatch, capsys):
    image, model = trained_model(tmp_path, monkeypatch, capsys)
    other = photo(tmp_path / "dog.png", seed=5)
    status, out, err = infer("--model_path", model, "--image_path", other, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0
    assert err.strip().splitlines() == [
        f"warning: this model was trained on {str(image)!r}, not on {str(other)!r}: it memorised that picture "
        "and will pull the output towards it"]
    assert "PSNR inference output" in out and os.path.exists("result.png")
