"""Classifier-free guidance: the conditional network, label dropout, classes from data, and sampling by class."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_in_process
from ddpm import NoiseSchedule, load_checkpoint, save_checkpoint
from ddpm.data import TrainingData, choose_images, folder_classes
from ddpm.errors import UserError
from ddpm.guidance import Guided, balanced_labels, drop_labels, guided_x0
from ddpm.training import Trainer
from models import UNet
from test_cli import one_error_line

TRAIN = os.path.join(REPO, "ddpm_train.py")
SAMPLE = os.path.join(REPO, "ddpm_sample.py")
TINY = ["--base_channels", "8", "--channel_mults", "1,2", "--train_steps", "6", "--batch_size", "8",
        "--eval_every", "3", "--save_every", "0"]


def conditional_net(num_classes=3, seed=0):
    torch.manual_seed(seed)
    model = UNet(3, 8, (1, 2), num_classes=num_classes).eval()
    with torch.no_grad():  # the class vectors start at zero; make the classes differ, as training would
        model.class_embedding.weight.normal_()
    return model


# ---- the network and the formula ------------------------------------------------------------

def test_guidance_at_zero_and_one_is_exactly_the_unconditional_and_the_conditional_prediction():
    model = conditional_net()
    x, t, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 300, 700, 1000]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        uncond, cond = model(x, t), model(x, t, y)
        assert torch.equal(uncond, model(x, t, torch.full_like(y, model.null_class)))  # None is the null class
        assert torch.equal(Guided(model, y, 0.0)(x, t), uncond)
        assert torch.equal(Guided(model, y, 1.0)(x, t), cond)
        assert not torch.allclose(uncond, cond)
        # S = 3: the one batched pass over (x, y) and (x, null) gives x0_uncond + 3 (x0_cond - x0_uncond)
        assert torch.allclose(Guided(model, y, 3.0)(x, t), uncond + 3 * (cond - uncond), atol=1e-5)
    assert torch.equal(guided_x0(uncond, cond, 0), uncond) and torch.equal(guided_x0(uncond, cond, 1), cond)


def test_guiding_x0_is_guiding_eps_under_linear_interpolation():
    """eps_hat = (x_t - (1 - w) x0_hat) / w is affine in x0_hat, so both ways give the same sampler step."""
    x_t, x0_u, x0_c, w, s = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), 0.6, 2.5

    def eps(x0):
        return (x_t - (1 - w) * x0) / w

    assert torch.allclose(eps(guided_x0(x0_u, x0_c, s)), guided_x0(eps(x0_u), eps(x0_c), s), atol=1e-5)


def test_an_unconditional_network_refuses_a_class_and_num_classes_is_checked():
    model = UNet(3, 8, (1, 2))
    assert model.null_class is None and "class_embedding.weight" not in model.state_dict()
    with pytest.raises(ValueError, match="has no classes"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([5]), torch.tensor([0]))
    with pytest.raises(ValueError, match="num_classes must be an integer of at least 2"):
        UNet(3, 8, (1, 2), num_classes=1)


def test_a_class_vector_per_class_plus_a_learned_null_class():
    model = UNet(3, 8, (1, 2), num_classes=10)
    assert model.null_class == 10 and model.class_embedding.weight.shape == (11, 4 * 8)
    assert model.class_embedding.weight.requires_grad  # "no class" is learned, not a fixed zero


def test_old_checkpoints_load_unchanged_as_unconditional_models(tmp_path):
    """A model_config from before classes lacks num_classes; its weights load into the same network."""
    torch.manual_seed(0)
    model = UNet(3, 8, (1, 2))
    path = str(tmp_path / "old.pth")
    save_checkpoint(path, model, NoiseSchedule(), data={"img_size": 16}, train_info={})
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["model_config"]["num_classes"]
    torch.save(checkpoint, path)
    loaded, _, _ = load_checkpoint(path)
    assert loaded.null_class is None
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([400])), model.eval()(x, torch.tensor([400])))
    shipped, _, _ = load_checkpoint(os.path.join(REPO, "model_ckpt", "digits_unet.pth"))
    assert shipped.null_class is None


# ---- label dropout --------------------------------------------------------------------------

def test_label_dropout_draws_the_null_class_at_the_set_rate():
    labels = torch.arange(200_000) % 10
    dropped = drop_labels(labels, 10, 0.1, generator=torch.Generator().manual_seed(0))
    hidden = dropped == 10
    assert abs(hidden.double().mean().item() - 0.1) < 0.003
    assert torch.equal(dropped[~hidden], labels[~hidden])  # the others keep their class
    assert drop_labels(labels, 10, 0.0) is labels


class ClassSpy(torch.nn.Module):
    """A conditional network that records the classes training shows it."""

    def __init__(self):
        super().__init__()
        self.net = UNet(3, 8, (1, 2), num_classes=4)
        self.seen = []

    @property
    def null_class(self):
        return self.net.null_class

    def forward(self, x_t, t, y=None):
        self.seen.append(y.clone())
        return self.net(x_t, t, y)


def test_training_shows_each_image_its_class_and_hides_it_at_the_dropout_rate():
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    spy = ClassSpy()
    trainer = Trainer(spy, images, NoiseSchedule(max_noise=1.0), 40, 1e-3, batch_size=8,
                      generator=torch.Generator().manual_seed(0), labels=labels, label_dropout=0.25)
    trainer.run(show_progress=False)
    seen = torch.cat(spy.seen)
    assert abs((seen == 4).double().mean().item() - 0.25) < 0.07
    assert set(seen.tolist()) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="trains with labels"):
        Trainer(UNet(3, 8, (1, 2), num_classes=4), images, NoiseSchedule(), 5, 1e-3)


def test_a_conditional_run_stopped_and_resumed_ends_exactly_like_one_never_stopped(tmp_path):
    """The dropout draws come from the run's generator, so resuming stays bitwise."""
    images, labels = torch.rand(6, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])

    def new_trainer(seed=0):
        torch.manual_seed(seed)
        return Trainer(UNet(3, 8, (1, 2), num_classes=3), images, NoiseSchedule(max_noise=1.0), 10, 3e-3,
                       batch_size=3, generator=torch.Generator().manual_seed(seed), labels=labels, label_dropout=0.3)

    straight = new_trainer()
    straight.run(show_progress=False)
    stopped = new_trainer()
    stopped.run(save_every=4, on_save=lambda t: t.request_stop(), show_progress=False)
    state, losses, noise = stopped.state_dict(), stopped.loss_history(), stopped.noise_history()
    resumed = new_trainer(seed=7)
    resumed.model.load_state_dict(stopped.model.state_dict())
    resumed.load_state_dict(state, losses, noise)
    resumed.run(show_progress=False)
    assert resumed.loss_history() == straight.loss_history()
    for name, weight in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], weight), name


def test_balanced_labels_draw_every_class_equally_often():
    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert torch.bincount(balanced_labels(1000, 10)).tolist() == [100] * 10


# ---- classes from a folder (torchvision's ImageFolder) ----------------------------------------

def make_pets(root, classes=("dog", "cat"), per_class=3, extra=()):
    """root/<class>/<i>.png, small coloured squares, one colour per class; ``extra`` adds more relative paths."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            pixels = np.full((16, 16, 3), 40 + 90 * c, dtype=np.uint8) + rng.integers(0, 20, (16, 16, 3), np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    for relative in extra:
        os.makedirs((root / relative).parent, exist_ok=True)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / relative)
    return root


def test_folder_classes_are_the_sub_folders_in_sorted_order(tmp_path):
    pets = make_pets(tmp_path / "pets", classes=("dog", "cat", "bird"), per_class=2, extra=["cat/kittens/k.png"])
    os.makedirs(pets / ".cache")  # hidden: not a class
    paths = choose_images(str(pets))
    classes, labels = folder_classes(str(pets), paths)
    assert classes == ["bird", "cat", "dog"]
    names = [os.path.relpath(p, pets) for p in paths]
    assert [classes[i] for i in labels] == [name.split(os.sep)[0] for name in names]  # nested: its top folder
    data = TrainingData(paths, 16, image_dir=str(pets), class_conditional=True)
    assert data.record["classes"] == ["bird", "cat", "dog"] and torch.equal(data.labels, labels)
    assert "classes" not in TrainingData(paths, 16, image_dir=str(pets)).record  # unconditional, as before


@pytest.mark.parametrize("layout, message", [
    ({"classes": ("cat",)}, "needs at least two classes"),
    ({"extra": ["loose.png"]}, "lies in no class folder"),
], ids=["one class", "an image outside the classes"])
def test_folder_classes_refuse_folders_that_are_not_classes(tmp_path, layout, message):
    pets = make_pets(tmp_path / "pets", **layout)
    with pytest.raises(UserError, match=message):
        folder_classes(str(pets), choose_images(str(pets)))


TRAIN_ERRORS = [
    (["--class_conditional"], "--class_conditional needs --image_dir or --digits"),
    (["--digits", "S1", "--label_dropout", "0.2"], "--label_dropout needs --class_conditional"),
    (["--digits", "S1", "--class_conditional", "--label_dropout", "1"], "argument --label_dropout: must be"),
    (["--digits", "S1", "--class_conditional", "--num_images", "5"], "hold no"),
    (["--image_dir", "pets", "--class_conditional"], "class 'fish'"),
]


@pytest.mark.parametrize("args, message", TRAIN_ERRORS, ids=[" ".join(a) for a, _ in TRAIN_ERRORS])
def test_train_refuses_classes_it_cannot_learn_in_one_line(tmp_path, monkeypatch, capsys, args, message):
    pets = make_pets(tmp_path / "pets")
    os.makedirs(pets / "fish")  # a class with no images
    before = sorted(os.listdir(tmp_path))
    result = run_in_process(TRAIN, *args, "--model_save_path", tmp_path / "m.pth", monkeypatch=monkeypatch,
                            capsys=capsys)
    assert message in one_error_line(*result)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


@pytest.fixture(scope="module")
def pets_model(tmp_path_factory):
    """A tiny conditional model of a folder of two classes, trained by the real script."""
    root = tmp_path_factory.mktemp("pets_run")
    make_pets(root / "pets")
    done = subprocess.run([sys.executable, TRAIN, "--image_dir", "pets", "--class_conditional", "--img_size", "16",
                           *TINY], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr
    return root, root / "model_ckpt" / "pets_cond_unet.pth"


@pytest.mark.slow
def test_a_folder_of_class_folders_trains_a_conditional_model_that_records_its_classes(pets_model):
    root, path = pets_model
    model, _, checkpoint = load_checkpoint(str(path))
    assert checkpoint["data"]["classes"] == ["cat", "dog"] and model.null_class == 2
    assert checkpoint["train"]["args"]["label_dropout"] == 0.1 and checkpoint["train"]["args"]["class_conditional"]
    assert json.load(open(root / "model_ckpt" / "pets_cond_unet.json"))["classes"] == ["cat", "dog"]


@pytest.mark.slow
@pytest.mark.parametrize("label, expected", [("dog", "dog"), ("0", "cat"), (None, None)])
def test_sampling_a_conditional_model_draws_the_class_asked_for(pets_model, tmp_path, monkeypatch, capsys, label,
                                                                expected):
    _, path = pets_model
    flags = [] if label is None else ["--label", label]
    status, out, err = run_in_process(SAMPLE, "--model_path", path, "--num_samples", 4, "--steps", 2, *flags,
                                      "--guidance", 3, "--output_dir", tmp_path / "s", monkeypatch=monkeypatch,
                                      capsys=capsys)
    assert status == 0, err
    summary = json.load(open(tmp_path / "s" / "samples.json"))
    assert summary["guidance"] == 3 and summary["classes"] == ["cat", "dog"]
    asked = [sample["class"] for sample in summary["samples"]]
    assert asked == ([expected] * 4 if label else ["cat", "dog", "cat", "dog"])  # without --label: every class
    assert "guidance S = 3" in out


SAMPLE_ERRORS = [
    ("pets", ["--label", "fish"], "--label 'fish' is not a class"),
    ("pets", ["--label", "2"], "--label '2' is not a class"),
    ("pets", ["--guidance", "-1"], "argument --guidance: must be a number from 0"),
    ("digits", ["--label", "7"], "learned no classes"),
    ("digits", ["--guidance", "2"], "learned no classes"),
]


@pytest.mark.slow
@pytest.mark.parametrize("model, args, message", SAMPLE_ERRORS, ids=[" ".join(a) for _, a, _ in SAMPLE_ERRORS])
def test_sampling_refuses_labels_a_model_does_not_know(pets_model, tmp_path, monkeypatch, capsys, model, args,
                                                       message):
    path = pets_model[1] if model == "pets" else os.path.join(REPO, "model_ckpt", "digits_unet.pth")
    result = run_in_process(SAMPLE, "--model_path", path, *args, "--output_dir", tmp_path / "s",
                            monkeypatch=monkeypatch, capsys=capsys)
    assert message in one_error_line(*result)
    assert not os.path.exists(tmp_path / "s")


# ---- the sweep, and the shipped conditional model --------------------------------------------

GUIDANCE = os.path.join(REPO, "experiments", "guidance.py")
COND_DIGITS = os.path.join(REPO, "model_ckpt", "digits_cond_unet.pth")
SWEEP = os.path.join(REPO, "images", "guidance.json")


def tiny_digits_model(folder, class_conditional=True):
    path = folder / ("cond.pth" if class_conditional else "plain.pth")
    done = subprocess.run([sys.executable, TRAIN, "--digits", "S1", "--num_images", "100", *TINY,
                           *(["--class_conditional"] if class_conditional else []), "--model_save_path", str(path)],
                          capture_output=True, text=True, cwd=folder)
    assert done.returncode == 0, done.stderr
    return path


@pytest.mark.slow
def test_the_sweep_runs_end_to_end_and_writes_its_record_and_figures(tmp_path):
    model = tiny_digits_model(tmp_path)
    out = [f"--{kind}_path" for kind in ("figure", "grid", "json")]
    files = [tmp_path / name for name in ("g.png", "grid.png", "g.json")]
    done = subprocess.run([sys.executable, GUIDANCE, "--model_path", model, "--scales", "0,2", "--num_samples", "20",
                           "--steps", "2", *[x for pair in zip(out, files) for x in map(str, pair)]],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.load(open(files[2]))
    assert [row["guidance"] for row in record["runs"]] == [0, 2] and record["samples_per_class"] == 2
    for row in record["runs"]:
        assert 0 <= row["accuracy"] <= 1 and sum(row["class_counts"]) == 20 and row["real_fld"] < row["fld"]
    assert record["machine"]["cores"] >= 1 and all(Image.open(f).format == "PNG" for f in files[:2])


def test_the_sweep_refuses_a_model_without_classes_in_one_line(tmp_path, monkeypatch, capsys):
    result = run_in_process(GUIDANCE, "--model_path", os.path.join(REPO, "model_ckpt", "digits_unet.pth"),
                            "--json_path", tmp_path / "g.json", monkeypatch=monkeypatch, capsys=capsys)
    assert "is not a class-conditional model of the shipped digits" in one_error_line(*result)
    assert not os.path.exists(tmp_path / "g.json")


def test_the_shipped_conditional_model_draws_sevens_when_asked(tmp_path, monkeypatch, capsys):
    status, out, err = run_in_process(SAMPLE, "--model_path", COND_DIGITS, "--label", "7", "--guidance", "2",
                                      "--num_samples", 20, "--eta", 1, "--summary_only", "--output_dir", tmp_path / "s",
                                      monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    summary = json.load(open(tmp_path / "s" / "samples.json"))
    assert {sample["class"] for sample in summary["samples"]} == {"7"}
    assert summary["quality"]["accuracy"] >= 0.9  # the judge reads them as sevens


def sweep():
    return json.load(open(SWEEP))


def test_the_shipped_sweep_is_the_documented_command_on_the_shipped_model():
    record = sweep()
    assert record["command"] == "python experiments/guidance.py" and record["model_path"] == \
        "model_ckpt/digits_cond_unet.pth"
    assert [row["guidance"] for row in record["runs"]] == [0, 1, 2, 3, 4, 8]
    assert record["settings"]["num_samples"] == 1000 and record["samples_per_class"] == 100
    assert record["machine"]["cpu"]
    train = json.load(open(COND_DIGITS.replace(".pth", ".json")))
    assert train["command"] == "python ddpm_train.py --digits S1 --class_conditional"
    assert train["checkpoint"] == "model_ckpt/digits_cond_unet.pth" and train["classes"] == list("0123456789")


def test_the_shipped_sweep_meets_the_guidance_targets():
    runs = {row["guidance"]: row for row in sweep()["runs"]}
    assert max(runs[s]["accuracy"] for s in runs if s <= 3) >= 0.97  # drawing what was asked
    assert runs[0]["accuracy"] < runs[1]["accuracy"] < runs[2]["accuracy"]  # guidance makes it follow the label
    unconditional = json.load(open(os.path.join(REPO, "images", "digits_samples", "samples.json")))["quality"]
    assert min(row["fld"] for row in runs.values()) <= unconditional["fld"]  # same budget, no worse
    assert runs[8]["recall"] < max(row["recall"] for row in runs.values())  # variety falls at large S


def sweep_rows():
    """The README table's cells from the shipped record: a row per measure, a column per S."""
    runs = sweep()["runs"]
    return {"accuracy": [f"{100 * row['accuracy']:.1f}%" for row in runs],
            "fld": [f"{row['fld']:.1f}" for row in runs],
            "precision": [f"{row['precision']:.2f}" for row in runs],
            "recall": [f"{row['recall']:.2f}" for row in runs]}


@pytest.mark.parametrize("name", ["README.md", "README.en.md"])
def test_the_readmes_quote_the_sweep_as_its_record_has_it(name):
    text = open(os.path.join(REPO, name), encoding="utf-8").read()
    for measure, cells in sweep_rows().items():
        assert " | ".join(cells) + " |" in text, (name, measure)
    for figure in ("images/guidance.png", "images/guidance_grid.png"):
        assert figure in text
    assert "python experiments/guidance.py" in text and "--label 7 --guidance 2" in text
