"""Unit tier: the checkpoint round trip, and every way a file can fail to be one of ours."""

import errno
import os
import pickle

import pytest
import torch

from ddpm.checkpoint import FORMAT, VERSION, load_checkpoint, save_checkpoint, weights_digest
from ddpm.diffusion import NoiseSchedule
from ddpm.errors import UserError
from models.unet_model import UNet


def make_checkpoint(path, **overrides):
    torch.manual_seed(0)
    model = UNet(3, 8, (1, 2))
    save_checkpoint(str(path), model, NoiseSchedule(max_noise=0.6),
                    data={"img_size": 16}, train_info={"args": {"lr": 1e-3}, "step": 3, "loss_history": [0.5]})
    return model


def rewrite(path, change):
    """Load our checkpoint, let ``change`` edit the dict, save it back with plain torch.save."""
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)


def test_round_trip_rebuilds_the_same_network(tmp_path):
    path = tmp_path / "m.pth"
    model = make_checkpoint(path)
    loaded, schedule, checkpoint = load_checkpoint(str(path))
    assert schedule == NoiseSchedule(max_noise=0.6)
    assert checkpoint["format"] == FORMAT and checkpoint["version"] == VERSION
    assert checkpoint["data"]["img_size"] == 16 and checkpoint["train"]["step"] == 3
    assert not loaded.training
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x_t, t), model(x_t, t))


def test_a_checkpoint_from_before_the_networks_options_loads_as_the_plain_unet(tmp_path):
    """A model_config written before attention, coordinates, the canvas and classes existed names only the
    first three arguments; it loads as the plain U-Net it was, with the same outputs."""
    path = tmp_path / "old.pth"
    model = make_checkpoint(path)
    rewrite(path, lambda c: c.update(model_config={k: c["model_config"][k]
                                                   for k in ("in_channels", "base_channels", "channel_mults")}))
    loaded, _, _ = load_checkpoint(str(path))
    assert not loaded.config["attention"] and not loaded.config["coords"]
    assert loaded.config["canvas_size"] is None and loaded.null_class is None
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x_t, t), model(x_t, t))


def test_the_file_is_plain_data_for_the_safe_loader(tmp_path):
    path = tmp_path / "m.pth"
    make_checkpoint(path)
    torch.load(path, weights_only=True)  # raises if anything but plain data and tensors is inside


def test_channels_last_weights_are_saved_contiguous(tmp_path):
    model = UNet(3, 8, (1, 2)).to(memory_format=torch.channels_last)
    path = tmp_path / "m.pth"
    save_checkpoint(str(path), model, NoiseSchedule(), data={"img_size": 16}, train_info={})
    loaded, _, _ = load_checkpoint(str(path))
    assert all(p.is_contiguous() for p in loaded.parameters())


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    make_checkpoint(path)
    before = path.read_bytes()

    def failing_save(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(UserError, match="could not write checkpoint .*No space left on device.*untouched"):
        make_checkpoint(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.pth"]


def test_digest_depends_on_every_byte():
    state = {"a": torch.zeros(3), "b": torch.ones(2)}
    flipped = {"a": torch.zeros(3), "b": torch.tensor([1.0, 1.0000001])}
    assert weights_digest(state) == weights_digest({"b": torch.ones(2), "a": torch.zeros(3)})
    assert weights_digest(state) != weights_digest(flipped)


def write_bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "does not exist"),
        (lambda p: (p.mkdir(), p)[1], "is a folder"),
        (lambda p: write_bytes(p, b""), "is empty"),
        (lambda p: write_bytes(p, os.urandom(4096)), "cannot be read safely"),
        (lambda p: write_bytes(p, b"\x89PNG\r\n\x1a\n" + bytes(200)), "cannot be read safely"),
        (lambda p: write_bytes(p, b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n"),
         "Git LFS pointer.*git lfs pull"),
    ],
    ids=["missing", "folder", "empty", "random-bytes", "png-renamed", "lfs-pointer"],
)
def test_files_that_are_not_checkpoints(tmp_path, make, message):
    path = make(tmp_path / "m.pth")
    with pytest.raises(UserError, match=message):
        load_checkpoint(str(path))


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "m.pth"
    make_checkpoint(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="cannot be read safely"):
        load_checkpoint(str(path))


def test_bare_state_dict(tmp_path):
    path = tmp_path / "m.pth"
    torch.save(UNet(3, 8, (1, 2)).state_dict(), path)
    with pytest.raises(UserError, match="bare state_dict"):
        load_checkpoint(str(path))


def test_another_projects_checkpoint(tmp_path):
    path = tmp_path / "m.pth"
    torch.save({"epoch": 3, "model_state": {"w": torch.zeros(1)}, "optimizer": {}}, path)
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        load_checkpoint(str(path))


def test_newer_format_version(tmp_path):
    path = tmp_path / "m.pth"
    make_checkpoint(path)
    rewrite(path, lambda c: c.update(version=VERSION + 1))
    with pytest.raises(UserError, match="newer than this code reads"):
        load_checkpoint(str(path))


def test_flipped_weight_is_caught_by_the_digest(tmp_path):
    path = tmp_path / "m.pth"
    make_checkpoint(path)
    rewrite(path, lambda c: c["model"]["conv_in.weight"].view(-1)[0].add_(1e-3))
    with pytest.raises(UserError, match="corrupted.*SHA-256"):
        load_checkpoint(str(path))


def test_weights_that_do_not_fit_the_described_network(tmp_path):
    path = tmp_path / "m.pth"
    make_checkpoint(path)

    def widen(c):
        c["model_config"]["base_channels"] = 16

    rewrite(path, widen)
    with pytest.raises(UserError, match="do not fit the network it describes"):
        load_checkpoint(str(path))


def test_config_that_cannot_be_built(tmp_path):
    path = tmp_path / "m.pth"
    make_checkpoint(path)
    rewrite(path, lambda c: c["model_config"].update(base_channels=12))
    with pytest.raises(UserError, match="cannot build"):
        load_checkpoint(str(path))


class RunsCodeWhenLoaded:
    """A pickle payload: unpickling it would create a file (a stand-in for any command)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "m.pth"
    torch.save({"format": FORMAT, "version": VERSION, "x": RunsCodeWhenLoaded(str(marker))}, path)
    with pytest.raises(UserError, match="safe load refuses"):
        load_checkpoint(str(path))
    assert not marker.exists()
    # and the file really was dangerous: an unsafe load runs the payload
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_file_is_refused(tmp_path):
    path = tmp_path / "m.pth"
    path.write_bytes(pickle.dumps({"format": FORMAT}))
    with pytest.raises(UserError, match="cannot be read safely"):
        load_checkpoint(str(path))


def test_checkpoint_without_its_image_size(tmp_path):
    path = tmp_path / "m.pth"
    make_checkpoint(path)
    rewrite(path, lambda c: c["data"].pop("img_size"))
    with pytest.raises(UserError, match="does not record the image size"):
        load_checkpoint(str(path))


def test_save_into_a_folder_that_cannot_be_written(tmp_path, monkeypatch):
    import ddpm.files

    path = tmp_path / "m.pth"
    make_checkpoint(path)
    before = path.read_bytes()

    def refuse(*args, **kwargs):  # what mkstemp raises in a read-only folder (as root, chmod cannot show it)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ddpm.files.tempfile, "mkstemp", refuse)
    with pytest.raises(UserError, match="could not write checkpoint .*Permission denied"):
        make_checkpoint(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.pth"]


def test_a_real_png_renamed_to_pth(tmp_path):
    from PIL import Image

    path = tmp_path / "m.pth"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path, format="PNG")
    with pytest.raises(UserError, match="cannot be read safely"):
        load_checkpoint(str(path))


def test_resume_state_travels_in_the_checkpoint(tmp_path):
    model = UNet(3, 8, (1, 2))
    path = tmp_path / "m.pth"
    resume = {"step": 3, "optimizer": {"state": {}, "param_groups": []}, "generator": torch.ones(3, dtype=torch.uint8)}
    save_checkpoint(str(path), model, NoiseSchedule(), data={"img_size": 16}, train_info={}, resume=resume)
    _, _, checkpoint = load_checkpoint(str(path))
    assert checkpoint["resume"]["step"] == 3 and torch.equal(checkpoint["resume"]["generator"], resume["generator"])
