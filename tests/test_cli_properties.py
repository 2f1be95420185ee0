"""Property-based tests of the command line: every invalid number is one error line and exit 2,
every valid tiny run succeeds (hypothesis draws the values)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import INFER, TINY_NET, TRAIN, run_in_process
from test_cli import one_error_line

# run_in_process uses pytest's monkeypatch and capsys, which hypothesis shares between examples:
# fine here, since every example sets sys.argv afresh and reads the captured output it produced.
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# flag -> (lowest, highest) valid integer
TRAIN_INT_FLAGS = {"--img_size": (1, 2048), "--batch_size": (1, 1024), "--train_steps": (1, 1_000_000),
                   "--seed": (0, 2**32 - 1), "--base_channels": (8, 1024), "--save_every": (0, 1_000_000),
                   "--num_images": (1, 10**8)}
INFER_INT_FLAGS = {"--t": (0, 1000), "--seed": (0, 2**32 - 1)}

not_a_number = st.text(alphabet="abcxyz_,:;!?", min_size=1)


def out_of_range(low, high):
    return st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1)).map(str)


def invalid_int_flag(flags):
    return st.sampled_from(sorted(flags)).flatmap(
        lambda flag: st.tuples(st.just(flag), st.one_of(out_of_range(*flags[flag]), not_a_number,
                                                         st.floats(allow_nan=False).filter(
                                                             lambda x: not x.is_integer()).map(repr))))


def bad_lr():
    return st.one_of(
        st.floats().filter(lambda x: not (math.isfinite(x) and x > 0)).map(repr),
        not_a_number,
    )


def ok_lr():
    return st.floats(min_value=1e-6, max_value=1e-1).map(repr)


@SETTINGS
@given(flag_value=st.one_of(invalid_int_flag(TRAIN_INT_FLAGS), st.tuples(st.just("--lr"), bad_lr())))
def test_train_any_invalid_number_is_one_error_line(tmp_path, tiny_image, monkeypatch, capsys, flag_value):
    flag, value = flag_value
    ckpt = tmp_path / "m.pth"
    result = run_in_process(TRAIN, "--image_path", tiny_image, "--model_save_path", ckpt, "--img_size", 16,
                            "--train_steps", 1, *TINY_NET, f"{flag}={value}", monkeypatch=monkeypatch, capsys=capsys)
    assert flag in one_error_line(*result)
    assert not ckpt.exists()


@SETTINGS
@pytest.mark.slow
@given(img_size=st.integers(1, 24), batch_size=st.integers(1, 3), train_steps=st.integers(1, 3), lr=ok_lr(),
       seed=st.integers(0, 2**32 - 1), save_every=st.integers(0, 3))
def test_train_any_valid_tiny_run_succeeds(tmp_path, tiny_image, monkeypatch, capsys,
                                           img_size, batch_size, train_steps, lr, seed, save_every):
    ckpt = tmp_path / "m.pth"
    status, out, err = run_in_process(
        TRAIN, "--image_path", tiny_image, "--model_save_path", ckpt, "--img_size", img_size,
        "--batch_size", batch_size, "--train_steps", train_steps, "--lr", lr, "--seed", seed,
        "--save_every", save_every, *TINY_NET, monkeypatch=monkeypatch, capsys=capsys)
    if img_size % 2 or img_size < 4:  # a two-level U-Net halves once, and keeps 2x2 at the bottom
        assert "must be a multiple of 2 and at least 4" in one_error_line(status, out, err)
        return
    assert status == 0, err
    assert torch.load(ckpt, weights_only=True)["train"]["step"] == train_steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.pth", "m_loss.png", "m_loss_by_noise.png",
                                                          "m_psnr.png", "tiny.png"]


@SETTINGS
@given(flag_value=invalid_int_flag(INFER_INT_FLAGS))
def test_infer_any_invalid_number_is_one_error_line(tmp_path, tiny_image, tiny_checkpoint, monkeypatch, capsys,
                                                    flag_value):
    flag, value = flag_value
    result = run_in_process(INFER, "--image_path", tiny_image, "--model_path", tiny_checkpoint,
                            "--result_path", tmp_path / "r.png", f"{flag}={value}", monkeypatch=monkeypatch,
                            capsys=capsys)
    assert flag in one_error_line(*result)
    assert not (tmp_path / "r.png").exists()


@pytest.mark.slow
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(t=st.integers(0, 1000), seed=st.integers(0, 2**32 - 1))
def test_infer_any_valid_t_and_seed_succeeds(tmp_path, tiny_image, tiny_checkpoint, monkeypatch, capsys, t, seed):
    status, out, err = run_in_process(INFER, "--image_path", tiny_image, "--model_path", tiny_checkpoint,
                                      "--result_path", tmp_path / "r.png", "--t", t, "--seed", seed,
                                      monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    assert f"t={t}  w={0.8 * t / 1000:.2f}" in out

