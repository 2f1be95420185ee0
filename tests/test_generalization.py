"""The generalisation experiment (two models on disjoint digits, the same noise) and the shipped generator."""

import json
import os
import re

import pytest

from conftest import REPO, run_in_process
from test_cli import one_error_line

EXPERIMENT = os.path.join(REPO, "experiments", "generalization.py")
SHIPPED = os.path.join(REPO, "images", "generalization.json")
GENERATOR_SAMPLES = os.path.join(REPO, "images", "digits_samples", "samples.json")
TINY = ["--num_images", "1,8", "--train_steps", "4", "--batch_size", "4", "--num_samples", "6", "--sample_steps", "2",
        "--base_channels", "8", "--channel_mults", "1,2"]


def run_tiny(tmp_path, monkeypatch, capsys, workers, name):
    outputs = ["--figure_path", tmp_path / f"{name}.png", "--grid_path", tmp_path / f"{name}_grid.png",
               "--json_path", tmp_path / f"{name}.json"]
    status, out, err = run_in_process(EXPERIMENT, *TINY, "--workers", workers, *outputs, monkeypatch=monkeypatch,
                                      capsys=capsys)
    assert status == 0, err
    return json.load(open(tmp_path / f"{name}.json"))


@pytest.mark.slow
def test_the_experiment_writes_a_record_per_n_and_its_figures_whatever_the_number_of_workers(tmp_path, monkeypatch,
                                                                                               capsys):
    one = run_tiny(tmp_path, monkeypatch, capsys, 1, "one")
    assert [row["num_images"] for row in one["runs"]] == [1, 8]
    for row in one["runs"]:
        for model, half in (("A", "S1"), ("B", "S2")):
            assert row[model]["trained_on"] == f"the first {row['num_images']} digits of {half}"
            assert 0 <= row[model]["memorized_fraction"] <= 1 and row[model]["fld"] > 0
        assert -1 <= row["median_cosine_a_b"] <= 1
    for figure in ("one.png", "one_grid.png"):
        assert (tmp_path / figure).stat().st_size > 0
    two = run_tiny(tmp_path, monkeypatch, capsys, 2, "two")  # each model on one thread in its own process
    for a, b in zip(one["runs"], two["runs"]):
        assert {k: v for k, v in a["A"].items() if k != "train_seconds"} == \
               {k: v for k, v in b["A"].items() if k != "train_seconds"}
        assert a["median_cosine_a_b"] == b["median_cosine_a_b"]


def test_a_model_samples_the_same_every_time_and_other_digits_make_another_model():
    """What lets A and B be compared sample by sample: each (half, N) gives the same samples to the bit."""
    import sys
    import torch
    sys.path.insert(0, os.path.dirname(EXPERIMENT))
    from generalization import train_and_sample

    settings = {"train_steps": 2, "batch_size": 2, "lr": 1e-3, "ema_decay": 0.9, "base_channels": 8,
                "channel_mults": [1, 2], "num_samples": 3, "sample_steps": 1, "seed": 0, "precision": "fp32"}
    threads = torch.get_num_threads()
    try:
        a, _ = train_and_sample(settings, "S1", 2)
        again, _ = train_and_sample(settings, "S1", 2)
        b, _ = train_and_sample(settings, "S2", 2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, again)  # the same model, the same noise: the same samples, to the bit
    assert not torch.equal(a, b)  # other digits, other weights


def test_the_experiment_refuses_an_impossible_n_before_any_work(tmp_path, monkeypatch, capsys):
    result = run_in_process(EXPERIMENT, "--num_images", "1,2001", "--json_path", tmp_path / "g.json",
                            monkeypatch=monkeypatch, capsys=capsys)
    assert "each N must be from 1 to 2000" in one_error_line(*result)
    assert not os.listdir(tmp_path)


# ---- the shipped results ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    return json.load(open(SHIPPED))


def test_the_shipped_experiment_shows_copies_at_small_n_and_one_new_digit_at_large_n(shipped):
    runs = sorted(shipped["runs"], key=lambda row: row["num_images"])
    assert [row["num_images"] for row in runs] == [1, 4, 16, 64, 256, 1024, 2000]
    small, large = runs[0], runs[-1]
    for model in "AB":  # the smallest N: both copy, and each agrees more with its own digit than with the other
        assert small[model]["memorized_fraction"] >= 0.9
        assert small["median_cosine_a_b"] < small[model]["median_nearest_cosine"]
    for model in "AB":  # N = 2,000: no copies, and the two models agree more with each other than with their data
        assert large[model]["memorized_fraction"] <= 0.05
        assert large["median_cosine_a_b"] > large[model]["median_nearest_cosine"]
    assert large["median_cosine_a_b"] >= 0.9
    assert shipped["wall_time_s"] <= 40 * 60
    assert shipped["command"] == "python experiments/generalization.py"  # the defaults, as documented
    assert {"cpu", "cores", "torch"} <= set(shipped["machine"])


def test_the_shipped_generator_draws_new_digits_of_every_kind_near_real_ones():
    """The quality it ships with, measured by ddpm_sample.py on 1,000 samples against the held-out digits:
    no copies, as near the training digits as real digits are, every digit drawn (recall as real digits'),
    precision 0.8 or more, and an FLD within 3 times that of real digits of the same number."""
    summary = json.load(open(GENERATOR_SAMPLES))
    quality = summary["quality"]
    assert summary["model_path"] == "model_ckpt/digits_unet.pth" and summary["num_samples"] == 1000
    assert summary["eta"] == 1.0 and summary["steps"] == 100 and quality["samples_judged"] == 1000
    assert summary["memorized_fraction"] <= 0.05
    assert quality["median_d1"] <= 1.1 * quality["held_out_median_d1"]
    assert quality["recall"] >= 0.6 and quality["recall"] >= quality["real_recall"] - 0.05
    assert quality["precision"] >= 0.8 and quality["fld"] <= 3 * quality["real_fld"]
    assert min(quality["class_counts"]) >= 50  # of 1,000: every digit, none starved


def readme(name):
    return open(os.path.join(REPO, name), encoding="utf-8").read()


@pytest.mark.parametrize("name", ["README.md", "README.en.md"])
def test_the_readmes_quote_the_shipped_numbers(shipped, name):
    text = readme(name)
    large = max(shipped["runs"], key=lambda row: row["num_images"])
    small = min(shipped["runs"], key=lambda row: row["num_images"])
    for value in (large["median_cosine_a_b"], large["A"]["median_nearest_cosine"], small["median_cosine_a_b"]):
        assert f"{value:.2f}" in text
    assert f"{shipped['wall_time_s'] / 60:.0f}" in text
    quality = json.load(open(GENERATOR_SAMPLES))["quality"]
    for key in ("fld", "real_fld"):
        assert f"{quality[key]:.1f}" in text
    for key in ("precision", "recall", "median_d1", "held_out_median_d1"):
        assert f"{quality[key]:.2f}" in text
    trained = json.load(open(os.path.join(REPO, "model_ckpt", "digits_unet.json")))
    assert f"{trained['wall_time_s'] / 60:.1f}" in text and trained["command"] in text
    assert re.search(r"images/generalization_grid\.png", text) and "images/generalization.png" in text


TABLE_LABELS = {"en": ("N", "memorised, A / B", "cosine A vs B", "cosine to nearest training digit, A / B",
                       "FLD, A / B"),
                "zh": ("N", "复制品比例 A / B", "A 与 B 的相似度", "与最近训练数字的相似度 A / B", "FLD A / B")}


def format_table(runs, language):
    """The README's table: a column per N; copies, agreement and FLD of the two models."""
    n, memorized, agreement, nearest, fld = TABLE_LABELS[language]
    rows = [[n, *(f"{row['num_images']:,}" for row in runs)],
            ["---", *("---:" for _ in runs)],
            [memorized, *(f"{100 * row['A']['memorized_fraction']:.0f}% / {100 * row['B']['memorized_fraction']:.0f}%"
                          for row in runs)],
            [agreement, *(f"{row['median_cosine_a_b']:.2f}" for row in runs)],
            [nearest, *(f"{row['A']['median_nearest_cosine']:.2f} / {row['B']['median_nearest_cosine']:.2f}"
                        for row in runs)],
            [fld, *(f"{row['A']['fld']:.0f} / {row['B']['fld']:.0f}" for row in runs)]]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


@pytest.mark.parametrize("name, language", [("README.md", "zh"), ("README.en.md", "en")])
def test_the_readmes_show_the_shipped_table(shipped, name, language):
    runs = sorted(shipped["runs"], key=lambda row: row["num_images"])
    assert format_table(runs, language) in readme(name)


def test_the_shipped_generator_was_trained_by_its_documented_command_within_ten_minutes():
    record = json.load(open(os.path.join(REPO, "model_ckpt", "digits_unet.json")))
    assert record["command"] == "python ddpm_train.py --digits S1 --snr_gamma 5 --t_density linear --ema_decay 0"
    assert record["digits"] == "S1" and record["args"]["snr_gamma"] == 5 and record["args"]["t_density"] == "linear"
    assert record["num_images"] == 2000 and record["wall_time_s"] <= 600
    assert {"cpu", "cores", "torch"} <= set(record["machine"])
