"""Unit tier: the network's global-context options (attention, coordinates, canvas) and what they break on purpose."""

import pytest
import torch

from conftest import train
from ddpm import NoiseSchedule, denoise, load_image, psnr
from models import UNet
from ddpm.checkpoint import load_checkpoint, save_checkpoint
from models.unet_model import AttentionBlock, coordinate_channels

OPTIONS = [{}, {"attention": True}, {"coords": True}, {"canvas_size": 32}, {"attention": True, "coords": True}]


def perturbed(model, seed=0):
    """The model with every parameter nudged, so zero-initialised parts (attention's output, the canvas) act."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("shape", [(2, 8, 4, 4), (1, 16, 2, 6), (3, 32, 8, 8)])
def test_attention_block_keeps_the_shape_and_starts_as_the_identity(shape):
    x = torch.randn(shape)
    block = AttentionBlock(shape[1])
    assert torch.equal(block(x), x)  # the output projection starts at zero, as in DDPM
    assert perturbed(block)(x).shape == shape


def test_attention_block_knows_no_position():
    """Permuting the H * W positions of its input permutes its output the same way: attention alone
    cannot tell the middle of the picture from anywhere else; only what is in the features can."""
    block = perturbed(AttentionBlock(8))
    x = torch.randn(2, 8, 4, 6)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    permute = lambda t: t.flatten(2)[:, :, order].reshape(t.shape)  # noqa: E731
    assert torch.allclose(block(permute(x)), permute(block(x)), atol=1e-5)
    assert not torch.allclose(block(x), x, atol=1e-3)  # and it does mix positions


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_every_option_keeps_shapes_and_each_image_to_itself(options):
    """The output has the input's shape, and each image's output depends on that image alone:
    permuting the batch permutes the outputs (GroupNorm and attention work within one image)."""
    model = perturbed(UNet(3, 8, (1, 2, 4), **options))
    x_t, t = torch.randn(3, 3, 32, 32), torch.tensor([0, 500, 1000])
    out = model(x_t, t)
    assert out.shape == (3, 3, 32, 32)
    order = torch.tensor([2, 0, 1])
    assert torch.allclose(model(x_t[order], t[order]), out[order], atol=1e-5)


def test_plain_unet_is_translation_equivariant_away_from_the_borders_and_coords_or_canvas_are_not():
    """A convolution treats every place alike: shift the input by a multiple of the stride and the output
    shifts with it, except within a receptive field of the border (zero padding) and for GroupNorm's
    whole-image statistics, which move a little. Coordinates and the canvas break this on purpose:
    they tell the network where it is, which is the point of them."""
    torch.manual_seed(0)
    x_t, t = torch.randn(1, 3, 96, 96), torch.tensor([700])
    shifted = torch.roll(x_t, shifts=(4, 4), dims=(2, 3))
    middle = slice(32, 60)  # more than the receptive field's reach (24 px) from every border, shifted or not

    def interior_change(model):
        out, out_shifted = model(x_t, t), model(shifted, t)
        return (out_shifted[..., 36:64, 36:64] - out[..., middle, middle]).abs().mean().item()

    plain = interior_change(perturbed(UNet(3, 8, (1, 2))))  # outputs have a standard deviation near 0.6
    assert plain < 0.015, plain
    for options in ({"coords": True}, {"canvas_size": 96}):
        assert interior_change(perturbed(UNet(3, 8, (1, 2), **options))) > 4 * plain, options


def test_canvas_adds_a_learned_picture_to_the_output():
    """x0_hat = unet(x_t, t) + B, exactly."""
    torch.manual_seed(0)
    with_canvas = UNet(3, 8, (1, 2), canvas_size=16)
    plain = UNet(3, 8, (1, 2))
    plain.load_state_dict({k: v for k, v in with_canvas.state_dict().items() if k != "canvas"})
    canvas = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        with_canvas.canvas.copy_(canvas)
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    assert torch.allclose(with_canvas(x_t, t), plain(x_t, t) + canvas, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit this U-Net's 16x16 canvas"):
        with_canvas(torch.randn(1, 3, 24, 24), torch.tensor([1]))


def test_coordinate_channels_run_from_minus_one_to_one():
    grid = coordinate_channels(torch.zeros(2, 3, 5, 9))
    assert grid.shape == (2, 2, 5, 9)
    assert grid[0, 0, :, 0].tolist() == pytest.approx([-1, -0.5, 0, 0.5, 1])  # y down the rows
    assert grid[1, 1, 0, [0, 4, 8]].tolist() == pytest.approx([-1, 0, 1])  # x along the columns


def test_options_are_recorded_and_rebuild_the_model(tmp_path):
    model = perturbed(UNet(3, 8, (1, 2), attention=True, coords=True, canvas_size=16))
    path = str(tmp_path / "m.pth")
    save_checkpoint(path, model, NoiseSchedule(max_noise=1.0), data={"img_size": 16}, train_info={})
    loaded, _, checkpoint = load_checkpoint(path)
    assert checkpoint["model_config"] == {"in_channels": 3, "base_channels": 8, "channel_mults": [1, 2],
                                          "attention": True, "coords": True, "canvas_size": 16, "num_classes": None}
    x_t, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    assert torch.equal(loaded(x_t, t), model(x_t, t))


def test_a_checkpoint_from_before_the_options_loads_as_the_plain_network(tmp_path):
    """Older files have only in_channels, base_channels and channel_mults in their model_config."""
    model = perturbed(UNet(3, 8, (1, 2)))
    path = str(tmp_path / "old.pth")
    save_checkpoint(path, model, NoiseSchedule(), data={"img_size": 16}, train_info={})
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_config"] = {"in_channels": 3, "base_channels": 8, "channel_mults": [1, 2]}
    torch.save(checkpoint, path)
    loaded, _, _ = load_checkpoint(path)
    assert loaded.config["attention"] is False and loaded.config["canvas_size"] is None
    assert loaded.config["num_classes"] is None and loaded.null_class is None
    x_t, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    assert torch.equal(loaded(x_t, t), model(x_t, t))


def test_plain_network_has_the_same_weights_as_before_the_options():
    """The default network's parameter names are those of every shipped checkpoint (nothing added)."""
    names = set(UNet().state_dict())
    assert not any("attention" in name or "canvas" in name for name in names)
    assert UNet().conv_in.in_channels == 3


@pytest.mark.parametrize("canvas_size", [0, -3, 2.5])
def test_bad_canvas_is_refused_in_words(canvas_size):
    with pytest.raises(ValueError, match="canvas_size must be a positive integer"):
        UNet(3, 8, (1, 2), canvas_size=canvas_size)


def test_tiny_full_noise_model_regenerates_its_image_from_pure_noise(tiny_image):
    """Trained with max_noise = 1, a tiny network paints its one picture from noise it has never seen."""
    torch.manual_seed(0)
    model = UNet(3, 8, (1, 2), canvas_size=16)
    x0 = load_image(tiny_image, 16)
    schedule = NoiseSchedule(max_noise=1.0)
    train(model, x0, schedule, train_steps=300, lr=3e-3, batch_size=4,
          generator=torch.Generator().manual_seed(0), show_progress=False)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(12345))  # not a training draw
    x_T = schedule.add_noise(x0, torch.tensor([1000]), eps)
    assert torch.equal(x_T, eps)  # at w = 1 nothing of the picture is left
    paths = {}
    for steps in (1, 20, 100):
        paths[steps] = []
        denoise(model, x_T, 1000, schedule, steps, trajectory=paths[steps])
    quality = {steps: psnr(path[-1][3], x0) for steps, path in paths.items()}
    assert quality[1] > 30 and quality[20] > 40 and quality[100] > 40, quality  # measured: 38.2, 50.1, 49.1 dB
    # Predictions right from the start: a fine path and a coarse one predict the same picture wherever
    # they meet (every 50 timesteps), so the step count only decides where the last prediction is made.
    coarse = {t: psnr(x0_hat, x0) for t, _, _, x0_hat in paths[20]}
    met = [(t, coarse[t], psnr(x0_hat, x0)) for t, _, _, x0_hat in paths[100] if t in coarse]
    assert len(met) == 20 and all(abs(a - b) < 0.1 for _, a, b in met), met
