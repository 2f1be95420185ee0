"""Shipped-assets tier: the files in the repository are the ones the README promises."""

import json
import os
import re
import subprocess

import pytest
import torch
from PIL import Image

from conftest import REPO
from ddpm import denoise, load_checkpoint, load_image, psnr, ssim
from ddpm.diffusion import noise_stream, seeded_noise

CHECKPOINT = os.path.join(REPO, "model_ckpt", "demo_unet.pth")
FULL_NOISE = os.path.join(REPO, "model_ckpt", "demo_unet_full_noise.pth")
DEMO = os.path.join(REPO, "images", "demo.png")
FIGURES = ["images/inference_result.png", "images/noise_sweep.png", "images/denoise_trajectory.png",
           "images/unseen_image.png", "images/unseen_trajectory.png",
           "images/denoise_trajectory.gif", "images/inference_result_10_steps.png", "images/full_noise_result.png",
           "images/full_noise_trajectory.png", "images/full_noise_trajectory.gif", "images/generalization.png",
           "images/generalization_grid.png", "images/digits_samples/grid.png", "images/guidance.png",
           "images/guidance_grid.png"]
OTHER_SHIPPED = ["images/first_prediction.png", "model_ckpt/digits_unet.pth", "model_ckpt/digits_unet.json",
                 "model_ckpt/digit_classifier.pth", "model_ckpt/digit_classifier.json", "data/mnist.png",
                 "data/mnist_labels.txt", "images/generalization.json", "images/digits_samples/samples.json",
                 "images/digits_samples/nearest.png", "model_ckpt/digits_cond_unet.pth", "model_ckpt/digits_cond_unet.json",
                 "images/guidance.json"]
RUN_FILES = ["model_ckpt/demo_unet_loss.png", "model_ckpt/demo_unet_loss_by_noise.png", "model_ckpt/demo_unet.json",
             "model_ckpt/demo_unet_psnr.png",
             "model_ckpt/demo_unet_full_noise_loss.png", "model_ckpt/demo_unet_full_noise_loss_by_noise.png",
             "model_ckpt/demo_unet_full_noise_psnr.png",
             "model_ckpt/demo_unet_full_noise.json"]
MAX_SHIPPED_BYTES = 20 * 1024 * 1024
DEFAULT_RUN = {"img_size": 256, "batch_size": 1, "train_steps": 3000, "lr": 1e-3, "image_path": "images/demo.png",
               "seed": 0, "base_channels": 16, "channel_mults": [1, 2, 4, 8]}


def readme(name):
    return open(os.path.join(REPO, name), encoding="utf-8").read()


def prose(text):
    """``text`` with every run of whitespace made one space: a sentence found whatever its line breaks."""
    return " ".join(text.split())


@pytest.mark.parametrize("path", ["model_ckpt/demo_unet.pth", "model_ckpt/demo_unet_full_noise.pth",
                                  "images/demo.png", "images/astronaut.png", *FIGURES, *RUN_FILES, *OTHER_SHIPPED])
def test_shipped_files_exist_and_are_small(path):
    assert os.path.getsize(os.path.join(REPO, path)) < MAX_SHIPPED_BYTES


SHOWN_IN_THE_REFERENCE = ["model_ckpt/demo_unet_psnr.png", "model_ckpt/demo_unet_full_noise_loss.png",  # with how
                          "model_ckpt/demo_unet_full_noise_loss_by_noise.png",  # the shipped models were trained
                          "model_ckpt/demo_unet_full_noise_psnr.png"]


@pytest.mark.parametrize("path", FIGURES + [p for p in RUN_FILES if p.endswith(".png")])
def test_figures_are_images_the_readme_shows(path):
    image = Image.open(os.path.join(REPO, path))
    assert image.format in ("PNG", "GIF")
    if path in SHOWN_IN_THE_REFERENCE:
        assert f"../{path}" in readme("docs/reference.md") and f"../{path}" in readme("docs/reference.zh.md")
    else:
        assert path in readme("README.md") and path in readme("README.en.md")


@pytest.mark.parametrize("path", [DEMO, os.path.join(REPO, "images", "astronaut.png")])
def test_shipped_photos_are_256_px_rgb(path):
    image = Image.open(path)
    assert image.size == (256, 256) and image.mode == "RGB"


DIGITS = os.path.join(REPO, "model_ckpt", "digits_unet.pth")
COND_DIGITS = os.path.join(REPO, "model_ckpt", "digits_cond_unet.pth")
DOCUMENTED_COMMANDS = {
    CHECKPOINT: "python ddpm_train.py",
    DIGITS: "python ddpm_train.py --digits S1 --snr_gamma 5 --t_density linear --ema_decay 0",
    COND_DIGITS: "python ddpm_train.py --digits S1 --class_conditional",
    FULL_NOISE: "python ddpm_train.py --max_noise 1.0 --batch_size 4 --train_steps 1000 --canvas "
                "--model_save_path model_ckpt/demo_unet_full_noise.pth",
}


@pytest.mark.parametrize("path", [CHECKPOINT, FULL_NOISE, DIGITS, COND_DIGITS])
def test_shipped_run_records_name_the_documented_command_and_the_shipped_path(path):
    record = json.load(open(path[: -len(".pth")] + ".json"))
    assert record["command"] == DOCUMENTED_COMMANDS[path]
    assert record["checkpoint"] == os.path.relpath(path, REPO)  # written straight to where it ships
    for name in ("README.md", "README.en.md"):
        assert DOCUMENTED_COMMANDS[path] in readme(name)


@pytest.mark.parametrize("path, max_noise, changed, canvas_size", [
    (CHECKPOINT, 0.8, {}, None),  # the denoiser: a plain U-Net
    (FULL_NOISE, 1.0, {"batch_size": 4, "train_steps": 1000}, 256),  # the generator: with a canvas
])
def test_shipped_checkpoints_were_made_by_the_documented_commands(path, max_noise, changed, canvas_size):
    model, schedule, checkpoint = load_checkpoint(path)
    args = checkpoint["train"]["args"]
    assert {k: args[k] for k in DEFAULT_RUN} == {**DEFAULT_RUN, **changed}
    assert model.config["canvas_size"] == canvas_size
    assert not model.config["attention"] and not model.config["coords"]
    assert model.null_class is None and not checkpoint["model_config"].get("num_classes")  # unconditional
    assert args["max_noise"] == max_noise and schedule.max_noise == max_noise
    assert checkpoint["train"]["step"] == args["train_steps"] and "resume" not in checkpoint
    record = json.load(open(path[: -len(".pth")] + ".json"))
    assert record["image_sha256"] == checkpoint["data"]["image_sha256"]
    assert record["args"]["max_noise"] == max_noise and record["train_steps"] == args["train_steps"]


@pytest.fixture(scope="module")
def shipped():
    model, schedule, checkpoint = load_checkpoint(CHECKPOINT)
    x0 = load_image(DEMO, checkpoint["data"]["img_size"])
    eps = seeded_noise(x0, 0)  # what ddpm_infer.py draws by default
    return model, schedule, x0, eps


def noisy_and_denoised(model, schedule, x0, eps, t, steps):
    x_t = schedule.add_noise(x0, torch.tensor([t]), eps)
    return psnr(x_t.clamp(-1, 1), x0), psnr(denoise(model, x_t, t, schedule, steps), x0)


def test_shipped_model_denoises_to_at_least_35_db(shipped):
    noisy, output = noisy_and_denoised(*shipped, t=500, steps=1)
    assert noisy < 14 and output >= 35.0


@pytest.mark.parametrize("name", ["README.md", "README.en.md"])
def test_readme_quotes_the_measured_psnr(shipped, name):
    noisy, output = noisy_and_denoised(*shipped, t=500, steps=1)
    match = re.search(r"PSNR noisy input:\s+([\d.]+) dB.*\nPSNR inference output:\s+([\d.]+) dB", readme(name))
    assert float(match.group(1)) == pytest.approx(noisy, abs=0.01)
    assert float(match.group(2)) == pytest.approx(output, abs=0.01)
    headline = re.search(r"PSNR[^\n]*?([\d.]+) dB[^\n]*?([\d.]+) dB", readme(name))
    assert (float(headline.group(1)), float(headline.group(2))) == (float(match.group(1)), float(match.group(2)))


@pytest.mark.parametrize("w", [0.4, 0.8, 0.9, 1.0])
def test_readme_sweep_table_matches_the_shipped_model(shipped, w):
    model, schedule, x0, eps = shipped
    t = schedule.timestep_for(w)
    noisy, one = noisy_and_denoised(model, schedule, x0, eps, t, steps=1)
    _, ten = noisy_and_denoised(model, schedule, x0, eps, t, steps=10)
    for name in ("README.md", "README.en.md"):
        row = re.search(rf"^\s*{w:.2f}\s+{t}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", readme(name), re.M)
        assert row, f"{name} has no sweep row for w={w}"
        assert [float(v) for v in row.groups()] == pytest.approx([noisy, one, ten], abs=0.01)


def generate_from_pure_noise(steps, eta=0.0):
    """What `python ddpm_infer.py --model_path <full-noise model> --t 1000 --steps S [--eta E]` computes."""
    model, schedule, checkpoint = load_checkpoint(FULL_NOISE)
    x0 = load_image(DEMO, checkpoint["data"]["img_size"])
    noise = noise_stream(0)  # ddpm_infer.py's default --seed: eps first, then the fresh noise of eta > 0
    eps = torch.randn(x0.shape, generator=noise)
    x_t = schedule.add_noise(x0, torch.tensor([1000]), eps)
    assert torch.equal(x_t, eps)  # w = 1 at t = T: nothing of the picture is left
    output = denoise(model, x_t, 1000, schedule, steps, eta=eta, generator=noise)
    return psnr(output, x0), ssim(output, x0)


@pytest.fixture(scope="module")
def from_pure_noise():
    return {steps: generate_from_pure_noise(steps) for steps in (1, 50, 200)}


@pytest.mark.slow
def test_full_noise_model_meets_the_generation_targets(from_pure_noise):
    """From pure noise: at least 30 dB in 50 steps, 22 dB in one, and 200 steps no worse than 50 (-0.3 dB)."""
    assert from_pure_noise[50][0] >= 30.0 and from_pure_noise[1][0] >= 22.0, from_pure_noise
    assert from_pure_noise[200][0] >= from_pure_noise[50][0] - 0.3, from_pure_noise


@pytest.mark.slow
def test_full_noise_model_regenerates_the_picture_from_pure_noise_as_quoted(from_pure_noise):
    output, structure = from_pure_noise[50]
    for name in ("README.md", "README.en.md"):
        quoted = re.search(r"(?:pure noise in 50 steps|纯噪声出发走 50 步)[^\n]*?([\d.]+) dB[^\n]*?SSIM (\d\.\d+)",
                           readme(name))
        assert quoted, f"{name} quotes no PSNR and SSIM from pure noise"
        assert float(quoted.group(1)) == pytest.approx(output, abs=0.01)
        assert float(quoted.group(2)) == pytest.approx(structure, abs=0.001)
        for steps in (1, 200):
            assert f"{from_pure_noise[steps][0]:.2f} dB" in readme(name), (name, steps)
    for name in ("assay/linear_interpolation.md", "assay/linear_interpolation.zh.md"):
        assert f"{output:.2f} dB" in readme(name), name


@pytest.mark.slow
def test_the_eta_page_quotes_ancestral_sampling_as_it_runs():
    output, structure = generate_from_pure_noise(50, eta=1.0)
    for name in ("docs/eta.md", "docs/eta.zh.md"):
        assert f"{output:.2f} dB" in readme(name) and f"SSIM {structure:.3f}" in readme(name), name


def test_ablation_of_global_context_is_shown_as_measured():
    """benchmarks/README.md shows the table that benchmarks/global_context.py wrote, and the figure it drew."""
    from benchmarks import global_context

    results = json.load(open(os.path.join(REPO, "benchmarks", "global_context.json")))
    assert results["command"] == "python benchmarks/global_context.py"  # the documented command, defaults
    assert set(results["variants"]) == set(global_context.VARIANTS)
    train_steps = int(results["recipe"][results["recipe"].index("--train_steps") + 1])
    assert global_context.format_table(results["variants"], train_steps) in readme("benchmarks/README.md")
    for name in ("docs/global_context.md", "docs/global_context.zh.md"):  # the README's deep dive on it
        assert "../images/first_prediction.png" in readme(name), name


def test_the_reference_quotes_the_training_run_as_its_record_has_it():
    """Time, loss and the PSNR milestones of the default run, as model_ckpt/demo_unet.json recorded them
    (docs/reference.md tells how the shipped model was trained; the READMEs point there)."""
    record = json.load(open(CHECKPOINT[: -len(".pth")] + ".json"))
    milestones = [(m["psnr_db"], m["step"], round(m["seconds"])) for m in record["psnr_milestones"]]
    assert [m[0] for m in milestones] == [30.0, 35.0, 38.0]
    final = record["quality"]["psnr_db"][-1]
    english = prose(readme("docs/reference.md"))
    assert f"took {round(record['wall_time_s'])} s" in english
    assert f"a loss of {record['final_loss']:.6f}" in english
    for db, step, sec in milestones:
        assert f"{db:g} dB at step {step} ({sec} s)" in english.replace("**", "")
    assert f"ended at {final:.2f} dB" in english
    assert f"On a 2-core {record['machine']['cpu']} ({', '.join(record['machine']['cpu_flags'])})" in english
    chinese = "".join(readme("docs/reference.zh.md").split())
    assert f"用时{round(record['wall_time_s'])}秒" in chinese and f"最终损失{record['final_loss']:.6f}" in chinese
    for db, step, sec in milestones:
        assert f"在第{step}步（{sec}秒）" in chinese.replace("**", "") and f"{db:g}dB" in chinese
    assert f"最后达到{final:.2f}dB" in chinese
    assert f"双核{record['machine']['cpu']}（{'、'.join(record['machine']['cpu_flags'])}）".replace(" ", "") in chinese


def test_result_figure_is_a_three_panel_png_about_1500_px_wide():
    image = Image.open(os.path.join(REPO, "images", "inference_result.png"))
    assert image.format == "PNG" and 1400 <= image.width <= 1600 and image.height < image.width / 2


def test_speed_page_shows_the_shipped_benchmark_results_as_measured():
    """The tables of benchmarks/README.md are exactly what benchmarks/benchmark.py and ablations.py wrote."""
    name = "benchmarks/README.md"
    from benchmarks import ablations, benchmark

    results = json.load(open(os.path.join(REPO, "benchmarks", "results.json")))
    assert results["command"] == "python benchmarks/benchmark.py"  # the README's command, defaults
    for size, table in results["sizes"].items():
        assert benchmark.format_table(size, table, results["settings"]["quality_steps"]) in readme(name)
    inference = results["infer"]
    assert f"ratio {inference['ratio']:.2f}" in readme(name)
    rows = json.load(open(os.path.join(REPO, "benchmarks", "ablations.json")))["rows"]
    assert ablations.format_table(rows) in readme(name)


def test_the_ablation_lessons_quote_the_ablation_record():
    """Each bullet under "What made it fast" quotes its row of benchmarks/ablations.json: the change in time,
    the page faults, the compile time and the spread of single rounds; and says which way its measure went."""
    record = json.load(open(os.path.join(REPO, "benchmarks", "ablations.json")))
    rows, page = record["rows"], readme("benchmarks/README.md")
    section = prose(page[page.index("### What made it fast"):page.index("- Reading the loss back every step")])
    assert record["machine"]["cpu"] in section
    for row in rows.values():
        assert row["ratio"] > 1  # every measure kept pays (torch.compile, not kept, is slower)
        assert f"{(row['ratio'] - 1) * 100:.1f}%" in section
    malloc = rows["malloc defaults instead of keep_freed_memory()"]
    assert (f"{malloc['variant_faults_per_step']:,.0f} page faults per step instead of "
            f"{malloc['baseline_faults_per_step']:,.0f}") in section
    assert f"spent {rows['torch.compile of the network']['compile_s']:.0f} s compiling" in section
    lowest, highest = min(r["ratio_min"] for r in rows.values()), max(r["ratio_max"] for r in rows.values())
    assert f"range from {lowest:.2f} to {highest:.2f}" in section


def test_process_tuning_is_shown_as_measured_and_kept_only_where_it_pays():
    """benchmarks/README.md shows what benchmarks/process_tuning.py wrote, and each setting is applied where the
    record says it pays: taking it away makes the script slower by more than the 3% that run-to-run noise
    moves a whole script on these machines."""
    from benchmarks import process_tuning

    results = json.load(open(os.path.join(REPO, "benchmarks", "process_tuning.json")))
    assert results["command"] == "python benchmarks/process_tuning.py"  # the README's command, defaults
    assert process_tuning.format_table(results["rows"]) in readme("benchmarks/README.md")
    commands = process_tuning.commands("scratch")
    assert set(results["rows"]) == set(commands)
    assert results["keeps_freed_memory"] == list(process_tuning.KEEPS_FREED_MEMORY)
    for command, row in results["rows"].items():
        assert row["gc.freeze"]["ratio"] > 1.03, command  # run() freezes for every script: it must pay for each
        if commands[command][0] in results["keeps_freed_memory"]:  # taking it away must cost
            assert row["keep_freed_memory"]["ratio"] > 1.03, command
    ablation = json.load(open(os.path.join(REPO, "benchmarks", "ablations.json")))["rows"]
    assert ablation["malloc defaults instead of keep_freed_memory()"]["ratio"] > 1.03  # the training step


@pytest.mark.parametrize("name", ["README.md", "README.en.md"])
def test_each_readme_stays_within_25_kb(name):
    assert os.path.getsize(os.path.join(REPO, name)) <= 25_000


def test_no_tracked_file_cites_a_scratch_path_or_a_document_readers_cannot_open():
    """Outside tests/, nothing names a /tmp path (run records included) or the team's design notes."""
    listing = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    offenders = []
    for path in listing.stdout.splitlines():
        if path.startswith("tests/") or not os.path.isfile(os.path.join(REPO, path)):
            continue
        data = open(os.path.join(REPO, path), "rb").read()
        if any(word in data for word in (b"DESIGN.md", b"STYLE.md", b"/tmp/")):
            offenders.append(path)
    assert offenders == []


def test_the_unseen_photo_lesson_quotes_what_the_command_prints():
    """The demo model on a photo it never saw: the READMEs quote the PSNR that ddpm_infer.py prints."""
    model, schedule, checkpoint = load_checkpoint(CHECKPOINT)
    x0 = load_image(os.path.join(REPO, "images", "astronaut.png"), checkpoint["data"]["img_size"])
    x_t = schedule.add_noise(x0, torch.tensor([1000]), seeded_noise(x0, 0))
    noisy, output = psnr(x_t.clamp(-1, 1), x0), psnr(denoise(model, x_t, 1000, schedule, steps=10), x0)
    assert output < 12  # it returns (pieces of) its own picture, not the astronaut
    for name in ("README.md", "README.en.md"):
        assert f"{noisy:.2f}" in readme(name) and f"{output:.2f}" in readme(name), name


def assert_bf16_inference_agrees_with_fp32(report):
    """Each inference row of a benchmarks/precision.py record: bf16's output within 50 dB PSNR of fp32's."""
    for row in report["inference"].values():
        assert row.get("bf16_against_fp32", row.get("bf16_against_fp32_psnr_db")) > 50  # dB: the same results


def test_the_bf16_page_shows_what_benchmarks_precision_py_measured():
    """benchmarks/README.md's bf16 tables are the ones benchmarks/precision.py wrote, on a CPU with native bf16,
    with the recipe ddpm/precision.py runs among those measured."""
    from benchmarks import precision

    report = json.load(open(os.path.join(REPO, "benchmarks", "precision.json")))
    assert report["command"].startswith("python benchmarks/precision.py")
    assert precision.format_report(report) in readme("benchmarks/README.md")
    assert report["native_bf16"] and {"speed", "inference", "quality"} <= set(report)
    assert report["quality"]["bf16"]["groupnorm_fp32"] and report["quality"]["bf16"]["output_fp32"]
    assert report["quality_steps"] == 3000  # whole default runs
    # the lesson is drawn from fp32 and bf16 at the same seeds, more than one, and the prose quotes the record
    assert {"fp32", "bf16"} <= set(report["quality"]) and len(report["quality_seeds"]) >= 2
    fp32, bf16 = report["quality"]["fp32"], report["quality"]["bf16"]
    page = readme("benchmarks/README.md")
    for recipe in (fp32, bf16):
        assert f"{recipe['psnr_db_mean']:.2f} dB" in page
    spread = max(r["psnr_db"] for r in fp32["runs"]) - min(r["psnr_db"] for r in fp32["runs"])
    assert f"{spread:.2f} dB" in page
    speed = report["speed"]
    for name in ("training step, 256 px, batch 1, base 16 (the default run)",
                 "training step, 28 px digits, batch 64, base 16"):
        for row in (name, f"{name}, plain autocast"):
            assert f"{speed[row]['speedup']:.2f}x" in page


def test_the_bf16_page_shows_how_slow_the_emulation_is_where_the_cpu_lacks_bf16():
    """The warning says bf16 is slower without native bf16: the page quotes by how much, from a record measured
    on such a CPU, and the inference there agrees with fp32 as on the native one."""
    from benchmarks import precision

    report = json.load(open(os.path.join(REPO, "benchmarks", "precision_without_native_bf16.json")))
    assert report["command"].startswith("python benchmarks/precision.py")
    assert not report["native_bf16"] and not {"avx512_bf16", "amx_bf16"} & set(report["machine"]["cpu_flags"])
    page = readme("benchmarks/README.md")
    assert precision.format_report(report) in page
    speedups = [row["speedup"] for row in report["speed"].values()]
    assert max(speedups) < 1  # every workload slower: the advice to keep fp32 there stands
    assert f"{min(speedups):.2f}x to {max(speedups):.2f}x the speed" in page
    assert_bf16_inference_agrees_with_fp32(report)


def test_the_bf16_page_shows_the_gain_where_the_cpu_has_avx512_bf16_without_amx():
    """AVX512-BF16 alone is native bf16: the page quotes a record measured on such a CPU (no AMX), the speed-ups
    its prose names are the record's, the default step gains there, and inference agrees with fp32."""
    from benchmarks import precision

    report = json.load(open(os.path.join(REPO, "benchmarks", "precision_avx512_bf16.json")))
    assert report["command"].startswith("python benchmarks/precision.py")
    flags = set(report["machine"]["cpu_flags"])
    assert report["native_bf16"] and "avx512_bf16" in flags and "amx_bf16" not in flags
    page = readme("benchmarks/README.md")
    assert precision.format_report(report) in page
    speed = report["speed"]
    default_step = "training step, 256 px, batch 1, base 16 (the default run)"
    assert speed[default_step]["speedup"] > 1  # native bf16 pays on the wide layers
    for name in (default_step, "training step, 28 px digits, batch 64, base 16",
                 "training step, 28 px digits, batch 64, base 32",
                 "training step, 28 px digits, batch 64, base 16, plain autocast"):
        assert f"{speed[name]['speedup']:.2f}x" in page
    assert_bf16_inference_agrees_with_fp32(report)
    # the whole default run there, once per precision: bf16 ends within 0.2 dB of fp32's and is faster
    fp32, bf16 = (report["quality"][recipe]["runs"][0] for recipe in ("fp32", "bf16"))
    assert report["quality_steps"] == 3000 and report["quality_seeds"] == [0]  # ddpm_train.py's defaults
    assert abs(bf16["psnr_db"] - fp32["psnr_db"]) < 0.2 and bf16["wall_time_s"] < fp32["wall_time_s"]
    assert (f"bf16 took {bf16['wall_time_s']:.0f} s against fp32's {fp32['wall_time_s']:.0f} s "
            f"({fp32['wall_time_s'] / bf16['wall_time_s']:.2f}x faster) and ended at {bf16['psnr_db']:.2f} dB "
            f"against {fp32['psnr_db']:.2f}") in prose(page)


def test_the_bf16_comparison_with_the_peers_is_shown_as_measured():
    """benchmarks/README.md shows the whole report of `python benchmarks/benchmark.py --precision bf16`, and its
    lessons quote the record: the ranking, the PSNR beside fp32's, the share of peak and attention's FLOPs."""
    from benchmarks import benchmark

    bf16 = json.load(open(os.path.join(REPO, "benchmarks", "results_bf16.json")))
    fp32 = json.load(open(os.path.join(REPO, "benchmarks", "results.json")))
    page = readme("benchmarks/README.md")
    text = prose(page)
    assert bf16["command"] == "python benchmarks/benchmark.py --precision bf16"  # the page's command
    assert bf16["settings"]["precision"] == "bf16" and bf16["machine"]["processor"] in page
    assert benchmark.format_report(bf16) in page
    rates = bf16["matmul_peak"]["rates"]
    assert rates["1x1 conv bf16"] > 1.9 * rates["1x1 conv fp32"]  # "twice its fp32 one": native bf16
    assert f"took {bf16['seconds'] / 60:.1f} minutes" in text
    sizes = list(bf16["sizes"])
    top = sizes[-1]
    for peers in (["diffusers"], ["lucidrains"], ["diffusers+attn", "lucidrains+attn"]):
        ratios = [bf16["sizes"][size][peer]["ratio_to_ours"] for size in sizes for peer in peers]
        assert min(ratios) > 1  # ours stays the fastest
        assert f"{min(ratios):.2f}-{max(ratios):.2f} times" in text
    for record, follows in ((bf16, "dB at 64, 128 and 256 px"), (fp32, "dB in the fp32 tables")):
        psnrs = [f"{record['sizes'][size]['ours']['psnr_equal_steps']:.2f}" for size in sizes]
        assert f"{', '.join(psnrs[:-1])} and {psnrs[-1]} {follows}" in text
    assert f"{bf16['sizes'][top]['ours']['fraction_of_peak']:.0%} of the bf16 peak" in text
    assert f"{fp32['sizes'][top]['ours']['fraction_of_peak']:.0%} of the fp32 one" in text
    counted, uncounted = (record["sizes"][top]["diffusers+attn"]["flops_per_step"] / 1e9 for record in (bf16, fp32))
    assert counted > 2 * uncounted  # "of which the attention is more than half"
    assert f"{counted:.2f} GFLOP" in text and f"{uncounted:.2f} GFLOP" in text
    spread = bf16["sizes"][top]["diffusers"]
    assert f"{spread['ratio_min']:.2f}-{spread['ratio_max']:.2f} times ours" in text


def test_the_own_photo_timings_are_the_ones_benchmarks_own_photo_wrote():
    """docs/reference quotes the training time per size as benchmarks/own_photo.py recorded it, machine named."""
    from benchmarks import own_photo

    record = json.load(open(os.path.join(REPO, "benchmarks", "own_photo.json")))
    assert record["command"] == "python benchmarks/own_photo.py"
    assert [row["img_size"] for row in record["rows"]] == list(own_photo.SIZES)
    assert record["machine"]["cpu"] and record["machine"]["cores"]
    for name, language in (("docs/reference.md", "en"), ("docs/reference.zh.md", "zh")):
        text = readme(name)
        assert own_photo.format_table(record, language) in text, name
        assert record["machine"]["cpu"] in text, name


def shipped_records():
    listing = subprocess.run(["git", "ls-files", "*.json"], cwd=REPO, capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    return listing.stdout.split()


def test_every_shipped_record_names_the_machine_it_was_measured_on():
    """A quoted time says where it was measured: each shipped JSON record names its CPU, cores and torch."""
    unnamed = set()
    for path in shipped_records():
        record = json.load(open(os.path.join(REPO, path)))
        machine = record.get("machine") or {}
        cpu = machine.get("cpu") or machine.get("processor")  # benchmark.py's own schema names it "processor"
        torch_version = machine.get("torch") or record.get("versions", {}).get("torch")
        if not (cpu and torch_version and (machine.get("cores") or machine.get("cpu_count") or machine.get("threads"))):
            unnamed.add(path)
    assert unnamed == set()


@pytest.mark.parametrize("path, ignored", [
    ("model_ckpt/demo_unet.resume.pth", True),  # Ctrl-C during `python ddpm_train.py` leaves it there
    ("model_ckpt/digits_unet.resume.pth", True),
    ("model_ckpt/my_photo_unet.pth", True),  # a learner's own model
    ("runs/demo_unet/inference_result.png", True),
    ("model_ckpt/demo_unet.pth", False),  # shipped
    ("model_ckpt/demo_unet.json", False),
    ("model_ckpt/digits_unet.onnx", False),
])
def test_git_ignores_what_a_learner_makes_and_keeps_what_ships(path, ignored):
    check = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO)
    if check.returncode == 128:
        pytest.skip("not a git checkout")
    assert (check.returncode == 0) == ignored, path
