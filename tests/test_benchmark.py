"""The benchmark (benchmarks/benchmark.py): its measurements are computed as documented.

The peer U-Nets are benchmark-only dependencies: tests that need them skip
where benchmarks/requirements.txt is not installed. Nothing here asserts a
speed: the benchmark measures speed, the tests check how it measures.
"""

import json
import math
import os
import subprocess

import pytest
import torch

from conftest import REPO, run_in_process
from test_cli import one_error_line

from benchmarks import benchmark, peers
from ddpm.diffusion import NoiseSchedule

OURS_PARAMETERS = 1_881_907  # the default network, as the READMEs state


def test_percentile_interpolates_between_ranks():
    assert benchmark.percentile([4.0, 1.0, 3.0, 2.0], 0.0) == 1.0
    assert benchmark.percentile([4.0, 1.0, 3.0, 2.0], 1.0) == 4.0
    assert benchmark.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert benchmark.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.25) == 2.0
    assert benchmark.percentile([7.0], 0.75) == 7.0


def test_flops_per_step_counts_forward_and_backward_of_a_known_network():
    """One 3x3 conv, 3 -> 4 channels at 8x8: forward 2*9*3*4*64 FLOPs; backward twice that
    (input gradient and weight gradient) -- but the input needs no gradient, so backward counts
    only the weight gradient."""
    class OneConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False)

        def forward(self, x, t):
            return self.conv(x)

    forward = 2 * 9 * 3 * 3 * 64
    x0 = torch.zeros(1, 3, 8, 8)
    flops = benchmark.flops_per_step(OneConv(), x0, NoiseSchedule(), torch.device("cpu"))
    assert flops == 2 * forward  # forward + weight gradient


def test_flops_per_step_counts_attention_on_the_cpu_as_its_matrix_products():
    """Our attention block gets its FLOPs on the CPU (torch's counter alone gives its kernel 0). In the default
    layout PyTorch writes the attention out as matrix products, which the counter knows; in channels_last, as
    ddpm_train.py runs, it takes the CPU's flash kernel: the same count, plus the one q k^T that kernel
    recomputes in its backward pass."""
    from models.unet_model import AttentionBlock

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = AttentionBlock(16)

        def forward(self, x, t):
            return self.block(x)

    torch.manual_seed(0)
    model, x0 = Attention(), torch.zeros(2, 16, 8, 8)
    written_out = benchmark.flops_per_step(model, x0, NoiseSchedule(), torch.device("cpu"))
    flash = benchmark.flops_per_step(model.to(memory_format=torch.channels_last),
                                     x0.to(memory_format=torch.channels_last), NoiseSchedule(), torch.device("cpu"))
    convolutions = 3 * (2 * 2 * 64 * 16 * 48 + 2 * 2 * 64 * 16 * 16)  # qkv and proj_out, forward and backward
    one_product = 2 * 2 * 64 * 64 * 16  # q k^T: (64 x 16) times (16 x 64), for each of 2 images
    assert written_out == convolutions + 6 * one_product  # 2 products forward, 4 backward
    assert flash == written_out + one_product


def test_flops_per_step_leaves_the_model_untouched():
    model = peers.build(peers.OURS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    benchmark.flops_per_step(model, torch.zeros(1, 3, 32, 32), NoiseSchedule(), torch.device("cpu"))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_matmul_peak_reports_every_rate_and_the_fastest_as_peak():
    peak = benchmark.matmul_peak(torch.device("cpu"), side=8, channels=32)
    assert set(peak["rates"]) == {"torch.mm fp32", "1x1 conv fp32"}
    assert peak["peak"] == max(peak["rates"].values()) > 0


def test_a_bf16_run_measures_the_bf16_peak_too_and_is_judged_against_it():
    peak = benchmark.matmul_peak(torch.device("cpu"), "bf16", side=8, channels=32)
    rates = peak["rates"]
    assert set(rates) == {"torch.mm fp32", "1x1 conv fp32", "torch.mm bf16", "1x1 conv bf16"}
    assert peak["peak"] == max(rates["torch.mm bf16"], rates["1x1 conv bf16"]) > 0


def test_a_bf16_benchmark_trains_every_model_under_the_bf16_autocast(monkeypatch):
    """The precision reaches the training step (ours and a peer alike), and the memory probe's child and the
    timed ddpm_infer.py are told it too."""
    x0 = torch.rand(1, 3, 16, 16) * 2 - 1
    schedule = NoiseSchedule()
    x_t = benchmark.eval_input(x0, schedule, 0)
    scores = {p: benchmark.train_and_score("ours", "channels_last", x0, x_t, schedule, torch.device("cpu"), 0, p, 2)[0]
              for p in ("fp32", "bf16")}
    assert scores["fp32"] != scores["bf16"]
    assert benchmark.new_trainer(torch.nn.Conv2d(3, 3, 1), x0, schedule, 1, 0, torch.device("cpu"),
                                 "bf16").precision == "bf16"
    commands = []

    def child(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="12.5\n", stderr="")

    monkeypatch.setattr(benchmark.subprocess, "run", child)
    assert benchmark.measure_memory("ours", 16, torch.device("cpu"), "channels_last", 0, "bf16") == 12.5
    benchmark.infer_overhead(torch.device("cpu"), "bf16", repeats=1)
    memory, _, infer = commands  # the probe, then ddpm_infer.py imported and run
    assert memory[-2:] == infer[-2:] == ["--precision", "bf16"]


def test_the_1x1_convolution_of_the_peak_is_the_same_matrix_product():
    """The oneDNN reference really multiplies the two matrices (else its rate would mean nothing)."""
    a, b = torch.randn(36, 16), torch.randn(16, 24)
    image, kernel = benchmark.matmul_as_conv(a, b, side=6)
    assert image.is_contiguous(memory_format=torch.channels_last) and image.data_ptr() == a.data_ptr()
    out = torch.nn.functional.conv2d(image, kernel)  # (1, 24, 6, 6)
    assert torch.allclose(out.permute(0, 2, 3, 1).reshape(36, 24), a @ b, atol=1e-5)


def test_every_model_gets_the_same_random_draws_and_the_same_initial_weights():
    x0 = torch.zeros(1, 3, 16, 16)
    draws = []
    for _ in range(2):
        trainer = benchmark.new_trainer(torch.nn.Conv2d(3, 3, 1), x0, NoiseSchedule(), 1, 0, torch.device("cpu"))
        draws.append(torch.randn(4, generator=trainer.generator))
    assert torch.equal(*draws)
    first, second = peers.build(peers.OURS, seed=3), peers.build(peers.OURS, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))


def test_parameter_budget_accepts_ten_percent_and_names_the_model_beyond_it():
    peers.check_parameter_budget({peers.OURS: 1000, "a": 1100, "b": 900})
    with pytest.raises(ValueError, match="b has 899 parameters"):
        peers.check_parameter_budget({peers.OURS: 1000, "b": 899})


def test_ours_is_the_default_network():
    assert peers.parameter_count(peers.build(peers.OURS)) == OURS_PARAMETERS


@pytest.mark.parametrize("name", [n for n in peers.MODELS if n != peers.OURS])
def test_peers_are_within_ten_percent_and_speak_our_interface(name):
    pytest.importorskip(peers.MODELS[name][1])
    model = peers.build(name)
    count = peers.parameter_count(model)
    assert abs(count - OURS_PARAMETERS) <= 0.10 * OURS_PARAMETERS
    x = torch.randn(2, 3, 32, 32)
    out = model(x, torch.tensor([0, 1000]))
    assert out.shape == x.shape


def test_lucidrains_without_attention_has_no_attention_left():
    pytest.importorskip("denoising_diffusion_pytorch")
    model = peers.build("lucidrains")
    kinds = {type(m).__name__ for m in model.modules()}
    assert not kinds & {"Attention", "LinearAttention"}
    assert "LinearAttention" in {type(m).__name__ for m in peers.build("lucidrains+attn").modules()}


BENCHMARK = os.path.join(REPO, "benchmarks", "benchmark.py")
ABLATIONS = os.path.join(REPO, "benchmarks", "ablations.py")
PROCESS_TUNING = os.path.join(REPO, "benchmarks", "process_tuning.py")


@pytest.mark.parametrize("script, args, message", [
    (BENCHMARK, ["--models", "ours,unet9000"], "unknown model 'unet9000'"),
    (BENCHMARK, ["--sizes", "60"], "--sizes: 60 does not fit"),
    (BENCHMARK, ["--sizes", "64,big"], "--sizes must be comma-separated integers"),
    (BENCHMARK, ["--rounds", "0"], "--rounds: must be an integer from 1 to 1000"),
    (BENCHMARK, ["--quality_steps", "1e9"], "--quality_steps"),
    (BENCHMARK, ["--device", "tpu"], "--device"),
    (BENCHMARK, ["--quick", "--models", "ours", "--json", "README.md/results.json"], "is a file, not a folder"),
    (BENCHMARK, ["--quick", "--models", "ours", "--json", "."], "is a folder"),
    (ABLATIONS, ["--size", "20"], "--size 20 does not fit"),
    (ABLATIONS, ["--steps", "-1"], "--steps"),
    (ABLATIONS, ["--json", "README.md/a.json"], "is a file, not a folder"),
    (PROCESS_TUNING, ["--rounds", "0"], "--rounds"),
    (PROCESS_TUNING, ["--json", "README.md/a.json"], "is a file, not a folder"),
])
def test_benchmark_mistakes_are_one_error_line_and_write_nothing(tmp_path, monkeypatch, capsys, script, args, message):
    (tmp_path / "README.md").write_text("a file where a folder is expected\n")
    before = sorted(os.listdir(tmp_path))
    status, out, err = run_in_process(script, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert message in one_error_line(status, out, err)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.slow
def test_quick_run_of_ours_writes_a_complete_report(tmp_path):
    """The whole pipeline end to end at 32 px, our model only (memory probe and inference timing
    included): every number is present and self-consistent."""
    path = tmp_path / "results.json"
    report = benchmark.main(["--quick", "--models", "ours", "--device", "cpu", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    ours = report["sizes"]["32"]["ours"]
    assert ours["params"] == OURS_PARAMETERS
    assert ours["ratio_to_ours"] == ours["ratio_min"] == ours["ratio_max"] == 1.0
    assert ours["step_ms_p25"] <= ours["step_ms"] <= ours["step_ms_p75"]
    assert math.isclose(ours["flops_per_s"], ours["flops_per_step"] / (ours["step_ms"] / 1e3))
    assert math.isclose(ours["fraction_of_peak"], ours["flops_per_s"] / report["matmul_peak"]["peak"])
    assert ours["steps_equal_time"] == 10 and ours["psnr_equal_time"] == ours["psnr_equal_steps"]
    assert 0 < ours["psnr_equal_steps"] < 100
    assert ours["peak_memory_mb"] > 0
    assert report["infer"]["ratio"] == pytest.approx(report["infer"]["run_s"] / report["infer"]["import_s"])
    assert ours["memory_format"] == "channels_last"  # as ddpm_train.py runs it
    assert math.isclose(ours["step_ms_continuous"], ours["seconds_equal_steps"] / 10 * 1e3)
    assert math.isclose(ours["fraction_of_peak_continuous"],
                        ours["flops_per_step"] / (ours["step_ms_continuous"] / 1e3) / report["matmul_peak"]["peak"])


def test_the_compile_ablation_trains_through_the_compiled_network():
    """The Trainer's forward pass runs Trainer.network (the model, or its DDP wrapper): the compiled variant
    must put torch.compile there, or it times the eager network against itself."""
    from benchmarks import ablations

    trainer = ablations.default_trainer(torch.zeros(1, 3, 32, 32), 2, compiled=True)
    assert isinstance(trainer.network, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.network._orig_mod is trainer.model  # the optimizer steps the parameters that run compiled


@pytest.mark.slow
def test_ablations_compare_each_measure_against_the_default_step(tmp_path):
    """benchmarks/ablations.py at 32 px: every row present, ratios are the per-round medians, the
    per-tensor variant really uses per-tensor Adam."""
    from benchmarks import ablations

    x0 = torch.zeros(1, 3, 32, 32)
    per_tensor = ablations.default_trainer(x0, 2, trainer_class=ablations.PerTensorTrainer)
    assert not per_tensor.optimizer.defaults["fused"] and per_tensor.optimizer.defaults["foreach"] is False
    norm, x = torch.nn.GroupNorm(8, 16), torch.randn(1, 16, 8, 8).to(memory_format=torch.channels_last)
    reference = norm(x)
    norm.__class__ = ablations.GroupNormOnNCHW  # the same normalisation, on a copy in the other layout
    assert torch.allclose(norm(x), reference, atol=1e-6) and norm(x).is_contiguous(memory_format=torch.channels_last)
    rows = ablations.main(["--size", "32", "--rounds", "2", "--steps", "1", "--warmup", "1",
                           "--json", str(tmp_path / "a.json")])
    assert len(rows) == 4
    for row in rows.values():
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"] and row["baseline_ms"] > 0
    allocator = rows["malloc defaults instead of keep_freed_memory()"]
    assert allocator["baseline_faults_per_step"] >= 0 and allocator["variant_faults_per_step"] >= 0
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["rows"] == json.loads(json.dumps(rows))
    assert set(record["machine"]) >= {"cpu", "cores", "threads", "torch"}  # where the ratios were measured


@pytest.mark.slow
def test_profile_step_accounts_for_every_convolution_and_the_whole_step(capsys, tmp_path):
    from benchmarks import profile_step

    model = peers.build(peers.OURS).to(memory_format=torch.channels_last)
    layers = profile_step.conv_layers(model, torch.zeros(1, 3, 32, 32))
    assert sum(layers.values()) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert layers[(3, 16, 3, 1, 32)] == 1  # conv_in
    assert layers[(16, 16, 3, 2, 32)] == 1  # the first Down: stride 2
    forward, backward = profile_step.conv_rates(8, 8, 3, 1, 16, repeats=2)
    assert forward > 0 and backward > 0
    record = profile_step.main(["--size", "32", "--steps", "2", "--json", str(tmp_path / "profile.json")])
    assert json.load(open(tmp_path / "profile.json")) == json.loads(json.dumps(record))
    by_kind = record["ms_per_step"]
    assert record["peak_flops"] > 0 and record["machine"]["cores"]
    assert by_kind["convolution forward"] > 0 and by_kind["convolution backward"] > 0
    assert by_kind["GroupNorm backward"] > 0 and by_kind["optimizer and clipping"] > 0
    assert "| 16 -> 16, 3x3, stride 2, 32 px | 1 |" in capsys.readouterr().out


@pytest.mark.slow
def test_process_tuning_runs_a_script_with_a_tuning_flipped(tmp_path):
    """One whole ddpm_infer.py run through the benchmark's driver, gc.freeze() taken away: it must still
    write its figure (the driver runs the real script, not a stand-in)."""
    from benchmarks import process_tuning

    seconds = process_tuning.seconds("gc.freeze", ["ddpm_infer.py", "--result_path", str(tmp_path / "r.png")])
    assert seconds > 0 and (tmp_path / "r.png").stat().st_size > 0


def test_benchmarks_readme_shows_the_profile_that_profile_step_wrote():
    from benchmarks import profile_step

    record = json.load(open(os.path.join(REPO, "benchmarks", "profile_step.json")))
    assert record["command"] == "python benchmarks/profile_step.py" and record["machine"]["cpu"]
    readme = open(os.path.join(REPO, "benchmarks", "README.md"), encoding="utf-8").read()
    assert profile_step.format_tables(record) in readme
    total = sum(record["ms_per_step"].values())
    assert f"({total:.0f} ms per step under the profiler.)" in readme
    assert f"peak in the same run was {record['peak_flops'] / 1e9:.0f} GFLOP/s" in readme


def test_the_benchmark_writes_a_shipped_record_only_at_the_default_settings_with_every_peer(monkeypatch):
    """The default run writes benchmarks/results.json, and with --precision bf16 results_bf16.json; a run with
    other settings, or without every peer installed, writes under runs/benchmark/; a path typed is kept."""
    own = os.path.join(REPO, "runs", "benchmark", "results.json")
    monkeypatch.setattr(peers, "available", lambda: list(peers.MODELS))  # as if benchmarks/requirements.txt were in
    assert benchmark.parse_args([]).json == os.path.join(REPO, "benchmarks", "results.json")
    assert benchmark.parse_args(["--precision", "bf16"]).json == os.path.join(REPO, "benchmarks", "results_bf16.json")
    for other in (["--sizes", "64"], ["--quick"], ["--models", "ours,diffusers"], ["--rounds", "2"]):
        assert benchmark.parse_args(other).json == own, other
    assert benchmark.parse_args(["--quick", "--precision", "bf16"]).json == os.path.join(
        REPO, "runs", "benchmark", "results_bf16.json")
    assert benchmark.parse_args(["--json", "mine.json"]).json == "mine.json"
    monkeypatch.setattr(peers, "available", lambda: [peers.OURS])
    assert benchmark.parse_args([]).json == own


def test_the_profile_and_the_browser_timings_write_their_shipped_record_only_at_the_default_settings():
    from benchmarks import explorer, profile_step

    assert profile_step.parse_args([]).json == os.path.join(REPO, "benchmarks", "profile_step.json")
    assert profile_step.parse_args(["--size", "32"]).json == os.path.join(REPO, "runs", "profile_step",
                                                                          "profile_step.json")
    assert explorer.parse_args([]).json == os.path.join(REPO, "benchmarks", "explorer.json")
    assert explorer.parse_args(["--rounds", "1"]).json == os.path.join(REPO, "runs", "explorer", "explorer.json")
