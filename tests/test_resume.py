"""Training that survives: exact resume, snapshots, Ctrl-C, divergence, failed saves."""

import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import TINY_NET, TRAIN, read_until_a_step, run_in_process, train_until_a_power_cut
from ddpm import NoiseSchedule, load_checkpoint, load_image, save_checkpoint
from models import UNet
from ddpm.training import NonFiniteLoss, Trainer
from test_cli import one_error_line


def new_trainer(image_path, steps=12, seed=0):
    torch.manual_seed(seed)
    model = UNet(3, 8, (1, 2))
    return Trainer(model, load_image(image_path, 16), NoiseSchedule(), steps, lr=3e-3, batch_size=2,
                   generator=torch.Generator().manual_seed(seed))


def test_a_run_stopped_and_resumed_ends_exactly_like_one_never_stopped(tiny_image, tmp_path):
    straight = new_trainer(tiny_image)
    assert straight.run(show_progress=False)

    stopped = new_trainer(tiny_image)
    assert not stopped.run(save_every=5, on_save=lambda t: t.request_stop(), show_progress=False)
    assert stopped.step == 5
    path = str(tmp_path / "snapshot.pth")
    save_checkpoint(path, stopped.model, NoiseSchedule(), data={"img_size": 16},
                    train_info={"loss_history": stopped.loss_history(), "noise_history": stopped.noise_history()},
                    resume=stopped.state_dict())

    model, _, checkpoint = load_checkpoint(path)
    resumed = new_trainer(tiny_image, seed=99)  # different weights and generator, all to be replaced
    resumed.model.load_state_dict(model.state_dict())
    resumed.load_state_dict(checkpoint["resume"], checkpoint["train"]["loss_history"],
                            checkpoint["train"]["noise_history"])
    torch.rand(10)  # the global RNG moves on; the run must not depend on it
    assert resumed.run(show_progress=False)

    assert resumed.loss_history() == straight.loss_history()
    assert resumed.noise_history() == straight.noise_history()
    for name, weight in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], weight), name


def test_resume_state_of_another_length_is_refused(tiny_image):
    trainer = new_trainer(tiny_image, steps=4)
    trainer.run(save_every=2, on_save=lambda t: t.request_stop(), show_progress=False)
    with pytest.raises(ValueError, match="does not fit"):
        new_trainer(tiny_image, steps=4).load_state_dict(trainer.state_dict(), [0.1], {"t": [5], "loss": [0.1]})


class NanAfter(torch.nn.Module):
    """Returns x_t until ``calls`` forwards have run, then nan."""

    def __init__(self, calls):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.calls, self.count = calls, 0

    def forward(self, x_t, t):
        self.count += 1
        return x_t * self.scale * (float("nan") if self.count > self.calls else 1.0)


def test_a_non_finite_loss_names_its_step_and_nothing_is_saved(tiny_image):
    saves = []
    trainer = Trainer(NanAfter(calls=6), load_image(tiny_image, 16), NoiseSchedule(), 50, lr=1e-3)
    with pytest.raises(NonFiniteLoss, match="nan at step 7"):
        trainer.run(save_every=5, on_save=lambda t: saves.append(t.step), show_progress=False)
    assert saves == [5]  # the snapshot before the divergence, none after it


# ---- the real script ------------------------------------------------------------------------

QUICK = ["--img_size", 16, *TINY_NET]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_ctrl_c_saves_a_snapshot_and_resume_finishes_the_same_run(tmp_path, tiny_image):
    common = ["--image_path", tiny_image, "--train_steps", 300, "--device", "cpu", *QUICK]
    ckpt = tmp_path / "run.pth"
    process = subprocess.Popen([sys.executable, TRAIN, *map(str, common), "--model_save_path", str(ckpt)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_line = process.stdout.readline()  # printed once the Ctrl-C handler is in place
    assert "Ctrl-C saves a snapshot to" in first_line
    before = read_until_a_step(process, 300)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    err = before + err
    assert process.returncode == 130, err
    snapshot = tmp_path / "run.resume.pth"
    assert f"saved {snapshot}" in err and f"--resume {snapshot}" in err
    assert snapshot.exists() and not ckpt.exists()
    stopped_at = torch.load(snapshot, weights_only=True)["train"]["step"]
    assert 0 < stopped_at < 300

    resumed = subprocess.run([sys.executable, TRAIN, "--resume", str(snapshot)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {snapshot} at step {stopped_at} of 300" in resumed.stdout
    assert ckpt.exists() and not snapshot.exists()  # finished: the snapshot has served its purpose

    straight = subprocess.run([sys.executable, TRAIN, *map(str, common), "--model_save_path",
                               str(tmp_path / "straight.pth")], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    resumed_weights, straight_weights = weights(ckpt), weights(tmp_path / "straight.pth")
    assert all(torch.equal(resumed_weights[k], straight_weights[k]) for k in straight_weights)
    history = torch.load(ckpt, weights_only=True)["train"]["loss_history"]
    assert history == torch.load(tmp_path / "straight.pth", weights_only=True)["train"]["loss_history"]
    quality = [torch.load(path, weights_only=True)["train"]["quality"] for path in (ckpt, tmp_path / "straight.pth")]
    assert quality[0]["step"] == quality[1]["step"] == list(range(100, 301, 100))  # every check, once
    assert quality[0]["psnr_db"] == quality[1]["psnr_db"]


def test_a_ctrl_c_that_arrives_after_every_process_agreed_to_stop_does_not_lose_the_snapshot(
        tmp_path, tiny_image, monkeypatch, capsys):
    """Under torchrun each process gets its own Ctrl-C, one after another, and all stop after the step in which
    the first arrived. A process whose signal comes while the snapshot is being gathered must go on saving: once
    it did not, and the other process, waiting for its random state, died with a traceback and saved nothing."""
    import ddpm.training_run

    def stop_as_another_process_asked(trainer, **_):
        trainer.train_step()
        trainer.stopping = True  # what _agree sets when another process saw Ctrl-C in this step
        return False

    real_save = ddpm.training_run.RunRecord.save

    def save_with_a_late_ctrl_c(self, path, trainer, resumable):
        signal.raise_signal(signal.SIGINT)  # this process's own Ctrl-C, late
        return real_save(self, path, trainer, resumable)

    monkeypatch.setattr(Trainer, "run", stop_as_another_process_asked)
    monkeypatch.setattr(ddpm.training_run.RunRecord, "save", save_with_a_late_ctrl_c)
    ckpt = tmp_path / "run.pth"
    status, _, err = run_in_process(TRAIN, "--image_path", tiny_image, "--train_steps", 300, *QUICK,
                                    "--model_save_path", ckpt, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 130, err
    assert "stopped at step 1 of 300" in err and "interrupted" not in err
    assert torch.load(tmp_path / "run.resume.pth", weights_only=True)["train"]["step"] == 1
    assert not ckpt.exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_save_every_writes_snapshots_and_the_finished_run_removes_them(tmp_path, tiny_image, monkeypatch, capsys):
    import ddpm.checkpoint

    written = []
    real_save = ddpm.checkpoint.torch.save

    def spy(obj, f):
        written.append((obj["train"]["step"], "resume" in obj))
        real_save(obj, f)

    monkeypatch.setattr(ddpm.checkpoint.torch, "save", spy)
    status, out, err = run_in_process(TRAIN, "--image_path", tiny_image, "--model_save_path", tmp_path / "m.pth",
                                      "--train_steps", 7, "--save_every", 3, *QUICK,
                                      monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    assert written == [(3, True), (6, True), (7, False)]
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.pth", "m_loss.png", "m_loss_by_noise.png", "m_psnr.png",
                                            "tiny.png"]


def test_divergence_is_one_error_line_and_the_old_checkpoint_survives(tmp_path, tiny_image, monkeypatch, capsys):
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"the last good checkpoint")
    result = run_in_process(TRAIN, "--image_path", tiny_image, "--model_save_path", ckpt, "--lr", "1e30",
                            "--train_steps", 60, "--save_every", 5, *QUICK, monkeypatch=monkeypatch, capsys=capsys)
    line = one_error_line(*result)
    assert "at step" in line and "lower --lr, such as 1e+29" in line
    assert ckpt.read_bytes() == b"the last good checkpoint"
    snapshot = tmp_path / "m.resume.pth"
    if snapshot.exists():  # written before the divergence, so its weights must be finite
        assert all(torch.isfinite(w).all() for w in weights(snapshot).values())


def test_a_failed_save_is_one_error_line_and_leaves_nothing_behind(tmp_path, tiny_image, monkeypatch, capsys):
    import ddpm.checkpoint

    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"the previous model")

    def disk_full(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ddpm.checkpoint.torch, "save", disk_full)
    result = run_in_process(TRAIN, "--image_path", tiny_image, "--model_save_path", ckpt, "--train_steps", 3,
                            *QUICK, monkeypatch=monkeypatch, capsys=capsys)
    assert "No space left on device" in one_error_line(*result)
    assert ckpt.read_bytes() == b"the previous model"
    assert sorted(os.listdir(tmp_path)) == ["m.pth", "tiny.png"]


@pytest.fixture
def snapshot(tmp_path, tiny_image, monkeypatch, capsys):
    """A snapshot of a 6-step run stopped after step 3 (made with --save_every and a crash)."""
    train_until_a_power_cut("--image_path", tiny_image, "--model_save_path", tmp_path / "m.pth", "--train_steps", 6,
                            "--save_every", 3, *QUICK, at_step=4, monkeypatch=monkeypatch, capsys=capsys)
    path = tmp_path / "m.resume.pth"
    assert torch.load(path, weights_only=True)["train"]["step"] == 3
    return path


def test_resume_after_a_crash(snapshot, monkeypatch, capsys):
    status, out, err = run_in_process(TRAIN, "--resume", snapshot, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    assert "at step 3 of 6" in out and not snapshot.exists()
    assert torch.load(snapshot.parent / "m.pth", weights_only=True)["train"]["step"] == 6


def test_a_weighted_run_resumes_with_its_snr_gamma_and_t_density_and_ends_as_if_never_stopped(
        tmp_path, tiny_image, monkeypatch, capsys):
    flags = ("--image_path", tiny_image, "--train_steps", 6, "--batch_size", 4, "--snr_gamma", 5,
             "--t_density", "linear", *QUICK)
    status, _, err = run_in_process(TRAIN, *flags, "--model_save_path", tmp_path / "straight.pth",
                                    monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    train_until_a_power_cut(*flags, "--model_save_path", tmp_path / "m.pth", "--save_every", 3, at_step=4,
                            monkeypatch=monkeypatch, capsys=capsys)
    status, _, err = run_in_process(TRAIN, "--resume", tmp_path / "m.resume.pth", monkeypatch=monkeypatch,
                                    capsys=capsys)  # the snapshot knows its gamma
    assert status == 0, err
    straight, resumed = (torch.load(tmp_path / name, weights_only=True) for name in ("straight.pth", "m.pth"))
    assert resumed["train"]["args"]["snr_gamma"] == 5.0 and resumed["train"]["args"]["t_density"] == "linear"
    assert resumed["model_sha256"] == straight["model_sha256"]


@pytest.mark.parametrize(
    "args, message",
    [(["--lr", "0.5"], "--lr 0.5 disagrees with the run being resumed, which used 0.001"),
     (["--train_steps", "9"], "--train_steps 9 disagrees"),
     (["--img_size", "24"], "--img_size 24 disagrees"),
     (["--snr_gamma", "5"], "--snr_gamma 5.0 disagrees with the run being resumed, which used 1.0"),
     (["--t_density", "linear"], "--t_density linear disagrees with the run being resumed, which used uniform")],
)
def test_resume_refuses_flags_that_change_the_run(snapshot, monkeypatch, capsys, args, message):
    result = run_in_process(TRAIN, "--resume", snapshot, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert message in one_error_line(*result)


def test_resume_refuses_a_changed_image(snapshot, tiny_image, monkeypatch, capsys):
    with open(tiny_image, "ab") as f:
        f.write(b"\0")
    result = run_in_process(TRAIN, "--resume", snapshot, monkeypatch=monkeypatch, capsys=capsys)
    assert "has changed since the run started" in one_error_line(*result)


def test_resume_refuses_a_finished_model(tiny_checkpoint, monkeypatch, capsys):
    result = run_in_process(TRAIN, "--resume", tiny_checkpoint, monkeypatch=monkeypatch, capsys=capsys)
    assert "finished model" in one_error_line(*result)


def test_resume_refuses_a_missing_snapshot(tmp_path, monkeypatch, capsys):
    result = run_in_process(TRAIN, "--resume", tmp_path / "nope.pth", monkeypatch=monkeypatch, capsys=capsys)
    assert "does not exist" in one_error_line(*result)
