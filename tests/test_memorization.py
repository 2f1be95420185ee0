"""The memorisation experiment: its script on a tiny budget, and the shipped result."""

import json
import os

from conftest import REPO, run_in_process
from test_cli import one_error_line

EXPERIMENT = os.path.join(REPO, "experiments", "memorization.py")
SHIPPED = os.path.join(REPO, "images", "memorization.json")


def test_the_experiment_writes_its_figures_and_one_run_per_n(tmp_path, monkeypatch, capsys):
    status, out, err = run_in_process(
        EXPERIMENT, "--num_images", "1,2", "--img_size", 8, "--train_steps", 4, "--eval_every", 2, "--batch_size", 4,
        "--num_samples", 3, "--sample_steps", 2, "--base_channels", 8, "--channel_mults", "1,2",
        "--figure_path", tmp_path / "m.png", "--samples_figure_path", tmp_path / "ms.png",
        "--json_path", tmp_path / "m.json", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    result = json.load(open(tmp_path / "m.json"))
    assert [run["num_images"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert 0 <= run["memorized_fraction"] <= 1 and run["curve"]["step"] == [2, 4]
        assert "held_out_median_d1" in run
    assert (tmp_path / "m.png").stat().st_size > 0 and (tmp_path / "ms.png").stat().st_size > 0


def test_the_experiment_refuses_an_impossible_n(tmp_path, monkeypatch, capsys):
    result = run_in_process(EXPERIMENT, "--num_images", "1,5000", "--json_path", tmp_path / "m.json",
                            monkeypatch=monkeypatch, capsys=capsys)
    assert "each N must be from 1 to 1797" in one_error_line(*result)
    assert not (tmp_path / "m.json").exists()


def test_the_shipped_experiment_shows_the_transition_from_copies_to_new_digits():
    result = json.load(open(SHIPPED))
    runs = sorted(result["runs"], key=lambda run: run["num_images"])
    assert runs[0]["num_images"] == 1 and runs[-1]["num_images"] == 1797
    assert runs[0]["memorized_fraction"] >= 0.9
    assert all(run["memorized_fraction"] <= 0.2 for run in runs if run["num_images"] >= 1000)
    assert result["wall_time_s"] <= 30 * 60


TABLE_LABELS = {"en": ("N", "memorised", "median d1/d2"), "zh": ("N", "被记住的比例", "d1/d2 中位数")}


def format_table(runs, language="en"):
    """The README's table: N against the memorised fraction and the median d1/d2, one column per N."""
    n, memorized, ratio = TABLE_LABELS[language]
    rows = [[n, *(f"{run['num_images']:,}" for run in runs)],
            ["---", *("---:" for _ in runs)],
            [memorized, *(f"{100 * run['memorized_fraction']:.0f}%" for run in runs)],
            [ratio, *(f"{run['median_ratio']:.2f}" for run in runs)]]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def test_the_readmes_show_the_shipped_table_and_time_and_the_chapter_has_its_notes():
    result = json.load(open(SHIPPED))
    minutes = f"{result['wall_time_s'] / 60:.0f}"
    english = open(os.path.join(REPO, "README.en.md"), encoding="utf-8").read()
    chinese = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert format_table(result["runs"], "en") in english
    assert format_table(result["runs"], "zh") in chinese
    assert f"It took {minutes} minutes on 2 cores" in english and f"用了 {minutes} 分钟" in chinese
    assert "## From memorising one image to generating new ones" in english
    assert result["command"] == "python experiments/memorization.py"  # the README's command, defaults
    for name in ("memorization.md", "memorization.zh.md"):
        note = open(os.path.join(REPO, "assay", name), encoding="utf-8").read()
        assert all(author in note for author in ("Kadkhodaie", "Yoon", "Gu", "Bonnaire")) and "1/3" in note


def test_the_readmes_describe_the_shipped_runs_as_they_came_out():
    runs = json.load(open(SHIPPED))["runs"]
    assert all(run["memorized_fraction"] == 1 for run in runs if run["num_images"] <= 4)  # "up to 4 ... a copy"
    assert all(run["memorized_fraction"] == 0 for run in runs if run["num_images"] >= 64)  # "from 64 on, none"
    large = [run for run in runs if run["num_images"] >= 128]
    samples = [run["median_d1"] for run in large]
    real = [run["held_out_median_d1"] for run in large if "held_out_median_d1" in run]
    english = " ".join(open(os.path.join(REPO, "README.en.md"), encoding="utf-8").read().split())
    assert (f"samples lie {min(samples):.1f} to {max(samples):.1f} away, unseen real digits "
            f"{min(real):.1f} to {max(real):.1f}") in english
    chinese = "".join(open(os.path.join(REPO, "README.md"), encoding="utf-8").read().split())
    assert f"样本的距离是{min(samples):.1f}到{max(samples):.1f}，没见过的真实数字是{min(real):.1f}到{max(real):.1f}" in chinese


def test_the_training_curves_shown_are_those_around_the_switch():
    from ddpm.figures import transition_runs

    runs = [{"num_images": n, "memorized_fraction": f} for n, f in [(1, 1.0), (4, 1.0), (8, 0.9), (16, 0.5),
                                                                    (64, 0.0), (128, 0.0)]]
    assert [run["num_images"] for run in transition_runs(runs)] == [4, 8, 16, 64]
