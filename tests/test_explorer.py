"""The browser explorer: the ONNX exports, the server, and the page itself in headless Chromium.

The browser tests need a Chromium on PATH (Debian's ``chromium``); without one they are skipped, unless
EXPLORER_BROWSER=required (as .ci/run sets it), where a missing browser fails. EXPLORER_SCREENSHOT=PATH
also saves the page's screenshot there: the README's images/explorer.png is made so.
"""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from conftest import REPO, run_in_process
from test_cli import one_error_line

from ddpm.checkpoint import load_checkpoint
from ddpm.chromium import EXPLORER_READY, Chromium, find_chromium
from ddpm.diffusion import NoiseSchedule, ddim_step, denoise, timestep_grid
from ddpm.files import file_sha256
from ddpm.guidance import guided_x0
from ddpm.imaging import load_image
from ddpm.metrics import psnr
from ddpm.onnx_export import SHIPPED, onnx_path_for, probe_inputs, record_path_for

onnxruntime = pytest.importorskip("onnxruntime")

EXPORT = os.path.join(REPO, "ddpm_export.py")
EXPLORE = os.path.join(REPO, "ddpm_explore.py")
EXPORT_TOLERANCE = 5e-3  # largest |x0_hat(ONNX) - x0_hat(PyTorch)| allowed: float16 weights measure about 1e-3
BROWSER_TOLERANCE = 5e-3  # the same, for the page's x0_hat against PyTorch on the page's own x_t
PAGE_BUDGET = 25_000_000  # bytes: the page, its runtime, its networks and the demo image
VENDOR = os.path.join(REPO, "explorer", "vendor", "onnxruntime-web")


def shipped(path):
    return os.path.join(REPO, path)


# ---- the exports -------------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint", list(SHIPPED))
def test_each_shipped_export_is_its_checkpoints_network_within_the_stated_tolerance(checkpoint, monkeypatch):
    monkeypatch.chdir(REPO)  # the checkpoints name their training image relative to the repository
    model, schedule, data = load_checkpoint(checkpoint)
    probe = probe_inputs(model, schedule, data)
    session = onnxruntime.InferenceSession(onnx_path_for(checkpoint), providers=["CPUExecutionProvider"])
    got = session.run(["x0_hat"], probe)[0]
    with torch.inference_mode():
        expected = model(*(torch.from_numpy(probe[name]) for name in ("x_t", "t", "y") if name in probe)).numpy()
    difference = np.abs(got - expected).max()
    assert difference <= EXPORT_TOLERANCE
    record = json.load(open(record_path_for(onnx_path_for(checkpoint))))
    assert record["max_abs_diff_from_pytorch"] == pytest.approx(float(difference), rel=0.5, abs=1e-6)


@pytest.mark.parametrize("checkpoint", list(SHIPPED))
def test_each_export_records_the_digest_of_the_checkpoint_shipped_now(checkpoint):
    record = json.load(open(shipped(record_path_for(onnx_path_for(checkpoint)))))
    assert record["checkpoint"] == checkpoint
    assert record["checkpoint_sha256"] == file_sha256(shipped(checkpoint)), \
        f"{onnx_path_for(checkpoint)} is stale: re-run python ddpm_export.py"
    assert record["onnx_bytes"] == os.path.getsize(shipped(onnx_path_for(checkpoint)))
    assert record["weights"] == "float16" and record["compute"] == "float32"
    assert {"torch", "onnx_version", "onnxruntime", "machine"} <= set(record)


def test_the_export_script_writes_beside_the_checkpoint_it_is_given(tmp_path, monkeypatch, capsys):
    own = tmp_path / "my_digits_unet.pth"
    shutil.copy(shipped("model_ckpt/digits_unet.pth"), own)
    status, out, err = run_in_process(EXPORT, "--model_path", own, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err
    record = json.load(open(tmp_path / "my_digits_unet.onnx.json"))
    assert record["checkpoint_sha256"] == file_sha256(own)
    assert record["max_abs_diff_from_pytorch"] <= EXPORT_TOLERANCE
    assert "my_digits_unet.onnx" in out
    assert sorted(os.listdir(tmp_path)) == ["my_digits_unet.onnx", "my_digits_unet.onnx.json", "my_digits_unet.pth"]


def test_export_mistakes_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys):
    (tmp_path / "not_a_model.pth").write_bytes(b"hello")
    for args in (["--model_path", "missing.pth"], ["--model_path", "not_a_model.pth"]):
        status, out, err = run_in_process(EXPORT, *args, monkeypatch=monkeypatch, capsys=capsys)
        one_error_line(status, out, err)
    assert sorted(os.listdir(tmp_path)) == ["not_a_model.pth"]


def test_the_page_its_runtime_and_networks_fit_the_size_budget():
    files = [os.path.join(folder, name) for folder, _, names in os.walk(shipped("explorer")) for name in names
             if "__pycache__" not in folder]
    files += [shipped(path) for c in SHIPPED for path in (onnx_path_for(c), record_path_for(onnx_path_for(c)))]
    files.append(shipped("images/demo.png"))
    assert sum(os.path.getsize(f) for f in files) < PAGE_BUDGET
    assert max(os.path.getsize(f) for f in files) < 20_000_000


def test_the_vendored_runtime_is_the_one_its_readme_names():
    readme = open(os.path.join(VENDOR, "README.md"), encoding="utf-8").read()
    named = dict(re.findall(r"\| `([^`]+)` \| [\d,]+ \| `([0-9a-f]{64})` \|", readme))
    assert set(named) == {name for name in os.listdir(VENDOR) if name != "README.md"}
    for name, digest in named.items():
        assert hashlib.sha256(open(os.path.join(VENDOR, name), "rb").read()).hexdigest() == digest


# ---- the server ----------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(request):
    """ddpm_explore's server in a thread of this process; yields its base URL."""
    sys.path.insert(0, REPO)
    import ddpm_explore

    server = ddpm_explore.make_server("127.0.0.1", 0, isolate=getattr(request, "param", True))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, b""


def test_the_server_sends_the_page_with_the_isolation_headers(served):
    status, headers, body = get(served + "/")  # redirected to the page
    assert status == 200 and b"window.explorer" not in body and b"explorer.js" in body
    assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    status, headers, _ = get(served + "/explorer/vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm")
    assert status == 200 and headers["Content-Type"] == "application/wasm"
    assert get(served + "/explorer/vendor/onnxruntime-web/ort.wasm.min.mjs")[1]["Content-Type"] == "text/javascript"
    assert get(served + "/model_ckpt/demo_unet.onnx")[0] == 200


@pytest.mark.parametrize("path", ["/ddpm_train.py", "/model_ckpt/demo_unet.pth", "/explorer/../ddpm_train.py",
                                  "/explorer/%2e%2e/ddpm_train.py", "/explorer/..%2fREADME.md", "/.git/config",
                                  "/images/../model_ckpt/demo_unet.pth", "/data/mnist.png"])
def test_the_server_sends_nothing_but_the_pages_files(served, path):
    with socket.create_connection(("127.0.0.1", int(served.rsplit(":", 1)[1]))) as s:  # the path exactly as written
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    assert answer.split(b"\r\n", 1)[0].split()[1] == b"404", answer[:200]


@pytest.mark.parametrize("served", [False], indirect=True)
def test_without_isolation_the_server_sends_no_coop_coep_headers(served):
    status, headers, _ = get(served + "/explorer/")
    assert status == 200 and "Cross-Origin-Opener-Policy" not in headers


def test_a_port_in_use_is_one_line_and_status_2(monkeypatch, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        status, out, err = run_in_process(EXPLORE, "--port", taken.getsockname()[1], monkeypatch=monkeypatch,
                                          capsys=capsys)
    assert "cannot listen on 127.0.0.1" in one_error_line(status, out, err)


def test_a_missing_export_is_one_line_and_status_2(tmp_path, monkeypatch, capsys):
    copy = tmp_path / "ddpm_explore.py"  # the script in a copy of the project that has no exports
    shutil.copy(EXPLORE, copy)
    monkeypatch.syspath_prepend(REPO)
    status, out, err = run_in_process(str(copy), monkeypatch=monkeypatch, capsys=capsys)
    assert "python ddpm_export.py" in one_error_line(status, out, err)


# ---- the page, in headless Chromium ------------------------------------------------------------------

def chromium_or_skip():
    path = find_chromium()
    if path is None:
        if os.environ.get("EXPLORER_BROWSER") == "required":
            pytest.fail("no Chromium on PATH, and EXPLORER_BROWSER=required (apt-get install chromium)")
        pytest.skip("no Chromium on PATH (apt-get install chromium); .ci/run installs it")
    return path


@pytest.fixture(scope="module")
def page():
    """``python ddpm_explore.py`` as a user starts it, and headless Chromium on the page it prints."""
    executable = chromium_or_skip()
    server = subprocess.Popen([sys.executable, EXPLORE, "--port", str(free_port())], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    browser = None
    try:
        url = re.search(r"http://\S+", server.stdout.readline()).group(0)
        browser = Chromium(executable)
        browser.open(url)
        stats = browser.evaluate(EXPLORER_READY)
        yield browser, url, stats
    finally:
        if browser:
            browser.close()
        server.terminate()
        server.wait(30)


def tensor(values, shape=(1, 3, 256, 256)):
    return torch.tensor(values, dtype=torch.float32).view(shape)


@pytest.mark.slow
def test_the_page_loads_offline_on_two_threads_with_no_errors(page):
    browser, url, stats = page
    cores = browser.evaluate("navigator.hardwareConcurrency")
    assert stats["crossOriginIsolated"] and stats["threads"] == min(2, cores)  # 2 threads where there are 2 cores
    origin = url.split("/explorer/")[0]
    assert browser.requests and all(u.startswith(origin) for u in browser.requests), browser.requests
    assert browser.errors == []


@pytest.mark.slow
def test_denoise_at_t_500_is_pytorchs_x0_hat_on_the_pages_own_x_t(page):
    browser, _, _ = page
    result = browser.evaluate("explorer.denoise({t: 500, seed: 0, steps: 1})")
    model, schedule, _ = load_checkpoint(shipped("model_ckpt/demo_unet.pth"))
    x0 = load_image(shipped("images/demo.png"), 256)
    assert (tensor(result["x0"]) - x0).abs().max() < 1e-6  # the page reads the PNG as ddpm/imaging.py does
    x_t = tensor(result["x_t"])
    assert result["w"] == pytest.approx(0.4)
    expected = denoise(model, x_t, 500, schedule, steps=1)
    x0_hat = tensor(result["x0_hat"])
    assert (x0_hat - expected).abs().max() <= BROWSER_TOLERANCE
    assert psnr(x0_hat, x0) > 38 and result["psnr_x0_hat"] == pytest.approx(psnr(x0_hat, x0), abs=1e-3)
    noise = (x_t - 0.6 * x0) / 0.4  # the page's own Gaussian noise: mean 0, variance 1
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01


@pytest.mark.slow
def test_denoise_in_several_steps_is_ddpm_infers_ddim_path(page):
    browser, _, _ = page
    result = browser.evaluate("explorer.denoise({t: 700, seed: 3, steps: 4})")
    model, schedule, _ = load_checkpoint(shipped("model_ckpt/demo_unet.pth"))
    expected = denoise(model, tensor(result["x_t"]), 700, schedule, steps=4)
    assert (tensor(result["x0_hat"]) - expected).abs().max() <= 2 * BROWSER_TOLERANCE


@pytest.mark.slow
def test_the_javascript_sampler_is_the_python_one(page):
    browser, _, _ = page
    cases = [(500, 1), (500, 3), (999, 7), (5, 2), (1000, 50), (1, 1), (0, 1), (7, 4), (25, 10)]
    grids = browser.evaluate(f"{json.dumps(cases)}.map(([t, n]) => explorer.diffusion.timestepGrid(t, n))")
    assert grids == [timestep_grid(t, n) for t, n in cases]  # Python's round(): halves to even
    generator = torch.Generator().manual_seed(0)
    x, x0_hat, z = (torch.randn(64, generator=generator) for _ in range(3))
    for w_t, w_s, eta in [(0.8, 0.4, 0.0), (1.0, 0.6, 1.0), (0.5, 0.1, 0.3), (0.3, 0.0, 0.0)]:
        got = browser.evaluate(f"Array.from(explorer.diffusion.ddimStep(new Float32Array({x.tolist()}), "
                               f"new Float32Array({x0_hat.tolist()}), {w_t}, {w_s}, {eta}, "
                               f"new Float32Array({z.tolist()})))")
        assert torch.allclose(torch.tensor(got), ddim_step(x, x0_hat, w_t, w_s, eta, z), atol=1e-5)
    for scale in (0, 1, 2.5):
        got = browser.evaluate(f"Array.from(explorer.diffusion.guidedX0(new Float32Array({x.tolist()}), "
                               f"new Float32Array({x0_hat.tolist()}), {scale}))")
        assert torch.allclose(torch.tensor(got), guided_x0(x, x0_hat, scale), atol=1e-5)
    schedule = NoiseSchedule()
    assert browser.evaluate("explorer.diffusion.noiseWeight(500, {num_timesteps: 1000, max_noise: 0.8})") \
        == pytest.approx(schedule.w(500))


@pytest.mark.slow
def test_generate_draws_the_asked_for_digit_by_the_judge(page):
    from ddpm.quality import judge, load_judge

    browser, _, _ = page
    result = browser.evaluate("explorer.generate({label: 7, guidance: 2, steps: 20, seed: 1, count: 10})")
    samples = torch.tensor(result["samples"], dtype=torch.float32).view(10, 3, 28, 28)
    assert samples.min() >= -1 and samples.max() <= 1
    _, read = judge(load_judge(), samples)
    assert (read == 7).sum() >= 9, read.tolist()
    plain = browser.evaluate("explorer.generate({label: null, steps: 10, seed: 2, count: 3})")
    assert len(plain["samples"]) == 3 and plain["guidance"] is None
    with pytest.raises(Exception, match="not one of the classes"):
        browser.evaluate("explorer.generate({label: 12})")


@pytest.mark.slow
def test_the_page_draws_both_chapters(page, tmp_path):
    browser, _, _ = page
    browser.evaluate("document.getElementById('generate').click(), new Promise(resolve => { const look = () => "
                     "document.getElementById('generate').disabled ? setTimeout(look, 100) : resolve(); "
                     "setTimeout(look, 100); })")
    drawn = browser.evaluate("[...document.querySelectorAll('canvas')].filter(c => c.width > 0).length")
    assert drawn >= 3 + 2 * 8  # x0, x_t, x0_hat, and x_t and x0_hat of each of the 8 samples
    named = os.environ.get("EXPLORER_SCREENSHOT")  # relative to the repository, like the README's paths
    path = os.path.join(REPO, named) if named else str(tmp_path / "explorer.png")
    browser.screenshot(path)
    assert os.path.getsize(path) > 10_000


@pytest.mark.slow
def test_a_host_without_isolation_falls_back_to_one_thread(tmp_path):
    executable = chromium_or_skip()
    sys.path.insert(0, REPO)
    import ddpm_explore

    server = ddpm_explore.make_server("127.0.0.1", 0, isolate=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser = Chromium(executable)
    try:
        browser.open(f"http://127.0.0.1:{server.server_address[1]}/explorer/")
        stats = browser.evaluate(EXPLORER_READY)
        assert not stats["crossOriginIsolated"] and stats["threads"] == 1
        start = time.time()
        result = browser.evaluate("explorer.denoise({t: 300, seed: 5, steps: 1}).then(r => r.psnr_x0_hat)")
        assert result > 35 and time.time() - start < 120
    finally:
        browser.close()
        server.shutdown()
        server.server_close()


def test_benchmarks_readme_shows_the_browser_timings_that_benchmarks_explorer_wrote():
    from benchmarks import explorer

    record = json.load(open(shipped("benchmarks/explorer.json")))
    assert explorer.format_table(record) in open(shipped("benchmarks/README.md"), encoding="utf-8").read()
    assert set(record["workloads"]) == set(explorer.WORKLOADS) and record["machine"]["cores"]
