"""Unit tier: the network's shapes and its shape contract."""

import os
import re

import pytest
import torch

from models.unet_model import UNet, check_image_size, timestep_embedding


@pytest.mark.parametrize(
    "base, mults, size",
    [(8, (1,), 8), (8, (1,), 2), (8, (1, 2), 4), (8, (1, 2), 24), (16, (1, 2, 4, 8), 16), (8, (1, 1, 2), 12),
     (24, (1, 2), 10)],
)
def test_output_has_the_input_shape(base, mults, size):
    model = UNet(3, base, mults)
    x_t = torch.randn(2, 3, size, size)
    t = torch.tensor([0, 1000])
    assert model(x_t, t).shape == (2, 3, size, size)


def test_other_channel_counts_and_rectangles():
    model = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2))
    assert model(torch.randn(3, 1, 8, 14), torch.tensor([1, 2, 3])).shape == (3, 1, 8, 14)


def test_time_changes_the_output():
    torch.manual_seed(0)
    model = UNet(3, 8, (1, 2))
    x_t = torch.randn(1, 3, 16, 16)
    out_a, out_b = model(x_t, torch.tensor([0])), model(x_t, torch.tensor([900]))
    assert not torch.allclose(out_a, out_b)


def test_config_is_what_rebuilds_the_model():
    model = UNet(3, 16, (1, 2, 4))
    clone = UNet(**model.config)
    assert model.config == {"in_channels": 3, "base_channels": 16, "channel_mults": [1, 2, 4],
                            "attention": False, "coords": False, "canvas_size": None,
                            "num_classes": None}
    assert clone.load_state_dict(model.state_dict()).missing_keys == []


def test_parameter_count_of_the_default_network_is_stable():
    # pins the default architecture: a change here means retraining the shipped checkpoint
    assert sum(p.numel() for p in UNet().parameters()) == 1_881_907


def test_sinusoidal_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 1]), 4)  # frequencies 1 and 1/100
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0],
                             [torch.sin(torch.tensor(1.0)), torch.sin(torch.tensor(0.01)),
                              torch.cos(torch.tensor(1.0)), torch.cos(torch.tensor(0.01))]])
    assert torch.allclose(emb, expected, atol=1e-6)


def test_size_not_divisible_is_refused_before_the_network_runs():
    model = UNet(3, 8, (1, 2, 4, 8))
    with pytest.raises(ValueError, match="multiples of 8 and at least 16"):
        model(torch.randn(1, 3, 20, 20), torch.tensor([1]))
    with pytest.raises(ValueError, match="multiples of 8 and at least 16"):
        model(torch.randn(1, 3, 8, 8), torch.tensor([1]))  # the 1x1 bottom would break GroupNorm


@pytest.mark.parametrize("size, nearest", [(250, "248 or 256"), (4, "16"), (8, "16"), (12, "16"), (20, "16 or 24")])
def test_image_size_check_names_sizes_that_work(size, nearest):
    with pytest.raises(ValueError, match=f"multiple of 8 and at least 16 \\(nearest: {nearest}\\)"):
        check_image_size(size, [1, 2, 4, 8])


def test_image_size_check_accepts_multiples():
    for size in (16, 64, 256):
        check_image_size(size, [1, 2, 4, 8])
    check_image_size(2, [1])  # one level: no halving, and 2x2 is enough for GroupNorm


@pytest.mark.parametrize(
    "kwargs, message",
    [({"base_channels": 12}, "multiple of 8"), ({"base_channels": 0}, "multiple of 8"),
     ({"channel_mults": ()}, "at least one level"), ({"channel_mults": (1, 0)}, "at least 1"),
     ({"in_channels": 0}, "in_channels")],
)
def test_bad_configs_are_refused_in_words(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(**kwargs)


def traced_shapes(model, x_t, t):
    """The output shape (C, H, W) of each ResBlock of ``model`` on x_t, in the order they run: encoder, middle, decoder."""
    blocks = list(model.encoder) + list(model.middle) + list(model.decoder)
    shapes = {}

    def record(block, args, out):
        shapes[block] = tuple(out.shape[1:])  # returns None: the output is left as it is

    hooks = [block.register_forward_hook(record) for block in blocks]
    output = model(x_t, t)
    for hook in hooks:
        hook.remove()
    return [shapes[block] for block in blocks], tuple(output.shape[1:])


@pytest.mark.parametrize("name", ["README.md", "README.en.md"])
def test_the_readme_diagram_shows_the_default_networks_shapes(name):
    """The U of section 2: each level's ResBlock on the way down and up, as UNet() computes them at 256 px."""
    text = open(os.path.join(os.path.dirname(__file__), "..", name), encoding="utf-8").read()
    diagram = text[text.index("x_t 3x256x256"):]
    diagram = diagram[:diagram.index("```")]
    model = UNet().to("meta")  # shapes only: no memory, no arithmetic
    blocks, output = traced_shapes(model, torch.zeros(1, 3, 256, 256, device="meta"), torch.zeros(1, device="meta"))
    levels = len(model.encoder)
    down, middle, up = blocks[:levels], blocks[levels:levels + 2], blocks[levels + 2:]
    assert up == down[::-1]  # each level comes back up at the shape it went down with
    rows = [re.findall(r"ResBlock (\d+)x(\d+)x(\d+)", line) for line in diagram.splitlines()]
    rows = [[tuple(map(int, block)) for block in row] for row in rows if row]
    assert rows == [[shape, shape] for shape in down]  # left: on the way down, right: on the way up
    assert middle == [down[-1]] * 2 and "the middle" in diagram
    assert f"x0_hat {'x'.join(map(str, output))}" in diagram
    assert f"temb ({model.time_mlp[-1].out_features} numbers)" in diagram
