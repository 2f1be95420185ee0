"""The shipped networks as ONNX files, for the browser explorer (explorer/, served by ddpm_explore.py).

ONNX is a file format for a network's computation graph that other runtimes can run: here
onnxruntime-web, which runs it in a web page on WebAssembly. Each export is the same U-Net as
the checkpoint (its EMA weights, as sampling uses), traced once by torch.onnx.export, with

    inputs   x_t (B, C, H, W) float32, t (B,) float32 timesteps, and for a conditional network
             y (B,) int64 classes (K, the number of classes, is "no class")
    output   x0_hat (B, C, H, W) float32, the network's prediction, not yet clamped

B may be any batch size. The weights are stored as float16 and cast to float32 when the graph
starts, so the file is half the size while every operation still computes in float32; the record
beside each file (<name>.onnx.json) says how far its output lies from PyTorch's.
"""

import os

import numpy as np
import torch

from ddpm.checkpoint import load_checkpoint
from ddpm.diffusion import seeded_noise
from ddpm.errors import UserError
from ddpm.files import atomic_write, file_sha256, write_json
from ddpm.imaging import load_image
from ddpm.machine import describe

OPSET = 17  # ONNX operator set: every operator of the U-Net is in it, and onnxruntime-web runs it
WEIGHT_TYPES = ("float16", "float32")  # how the weights are stored; compute is float32 either way
# The shipped networks that the explorer runs: checkpoint -> what the page calls it
SHIPPED = {
    "model_ckpt/demo_unet.pth": "the denoiser of the demo image",
    "model_ckpt/digits_unet.pth": "the digit generator",
    "model_ckpt/digits_cond_unet.pth": "the conditional digit generator",
}
PROBE_SEED = 0  # seed of the inputs on which an export is compared with PyTorch
PROBE_TIMESTEPS = (1000, 750, 500, 250, 50, 10)  # one probe image per noise level


def onnx_path_for(checkpoint_path):
    """Where the export of a checkpoint goes: beside it, model_ckpt/x.pth -> model_ckpt/x.onnx."""
    return os.path.splitext(checkpoint_path)[0] + ".onnx"


def record_path_for(onnx_path):
    """The export's record: model_ckpt/x.onnx -> model_ckpt/x.onnx.json."""
    return onnx_path + ".json"


class _Traced(torch.nn.Module):
    """The U-Net as the ONNX graph sees it: (x_t, t[, y]) -> x0_hat, with float timesteps."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x_t, t, y=None):
        return self.model(x_t, t, y) if y is not None else self.model(x_t, t)


def input_names(model):
    return ["x_t", "t", "y"] if model.null_class is not None else ["x_t", "t"]


def probe_inputs(model, schedule, checkpoint):
    """Inputs on which to compare an export with PyTorch: noisy images at several levels, as numpy arrays.

    For a denoiser, the image it was trained on, noised with seeded_noise (as ddpm_infer.py does) at
    each of PROBE_TIMESTEPS it knows; for a generator, pure Gaussian noise mixed with nothing (x_t = w *
    eps, the sampler's first input at t = T) and the later levels of the same noise. A conditional
    network gets every class and "no class" in turn.
    """
    C, size = model.config["in_channels"], checkpoint["data"]["img_size"]
    timesteps = [t for t in PROBE_TIMESTEPS if schedule.w(t) <= schedule.max_noise]
    image_path = checkpoint["data"].get("image_path")
    if image_path and os.path.exists(image_path):
        x0 = load_image(image_path, size).expand(len(timesteps), -1, -1, -1)
    else:
        x0 = torch.zeros(len(timesteps), C, size, size)
    t = torch.tensor(timesteps, dtype=torch.float32)
    x_t = schedule.add_noise(x0, t, seeded_noise(x0, PROBE_SEED))
    inputs = {"x_t": x_t.numpy(), "t": t.numpy()}
    if model.null_class is not None:
        inputs["y"] = (torch.arange(len(timesteps)) % (model.null_class + 1)).numpy()
    return inputs


def _store_weights_as_float16(graph):
    """Store every float32 weight of ``graph`` as float16, cast back to float32 by a Cast node at the start.

    The operations still see float32 tensors (whose values are the float16 ones), so only the weights'
    rounding changes, not how anything is computed.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        stored = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "_fp16")
        casts.append(helper.make_node("Cast", [stored.name], [init.name], to=TensorProto.FLOAT))
        init.CopyFrom(stored)
    for node in reversed(casts):
        graph.node.insert(0, node)
    return onnx


def export_checkpoint(checkpoint_path, onnx_path, weights="float16"):
    """Export a checkpoint's network to ``onnx_path`` and return the record of the export.

    The record names the checkpoint (and its SHA-256, so that a re-trained checkpoint with a stale
    export is caught), the versions that made the file, and the largest difference of its output from
    PyTorch's on probe_inputs, run by onnxruntime in Python.
    """
    import onnx
    import onnxruntime

    if weights not in WEIGHT_TYPES:
        raise ValueError(f"weights must be one of {WEIGHT_TYPES}, got {weights!r}")
    model, schedule, checkpoint = load_checkpoint(checkpoint_path)
    names = input_names(model)
    probe = probe_inputs(model, schedule, checkpoint)
    example = tuple(torch.from_numpy(probe[name]) for name in names)
    with atomic_write(onnx_path, "ONNX file") as tmp:
        torch.onnx.export(_Traced(model), example, tmp, dynamo=False, opset_version=OPSET,
                          input_names=names, output_names=["x0_hat"],
                          dynamic_axes={name: {0: "batch"} for name in names + ["x0_hat"]})
        graph_file = onnx.load(tmp)
        if weights == "float16":
            _store_weights_as_float16(graph_file.graph)
        onnx.checker.check_model(graph_file)
        onnx.save(graph_file, tmp)
    with torch.inference_mode():
        expected = model(*example).numpy()
    got = run_onnx(onnx_path, probe)
    data = checkpoint["data"]
    return {
        "onnx": os.path.basename(onnx_path),
        "what": SHIPPED.get(checkpoint_path, "a network of ours"),
        "checkpoint": checkpoint_path,
        "checkpoint_sha256": file_sha256(checkpoint_path),
        "onnx_bytes": os.path.getsize(onnx_path),
        "weights": weights,
        "compute": "float32",
        "opset": OPSET,
        "inputs": names,
        "img_size": data["img_size"],
        "in_channels": model.config["in_channels"],
        "num_classes": model.null_class,
        "classes": data.get("classes"),
        "image": data.get("image_path"),
        "noise_config": schedule.to_config(),
        "probe": {"seed": PROBE_SEED, "timesteps": [int(t) for t in probe["t"]]},
        "max_abs_diff_from_pytorch": float(np.abs(got - expected).max()),
        "torch": str(torch.__version__),
        "onnx_version": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "machine": describe(),
    }


def run_onnx(onnx_path, inputs):
    """The export's x0_hat for ``inputs`` (a dict of numpy arrays by input name), by onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    return session.run(["x0_hat"], inputs)[0]


def export_shipped(checkpoints=tuple(SHIPPED), weights="float16", say=print):
    """Export each of ``checkpoints`` beside itself, with its record; returns the records."""
    for path in checkpoints:
        if not os.path.exists(path):
            raise UserError(f"checkpoint {path!r} does not exist (run from the repository, or train it first)")
    records = []
    for path in checkpoints:
        onnx_path = onnx_path_for(path)
        record = export_checkpoint(path, onnx_path, weights)
        write_json(record_path_for(onnx_path), record)
        say(f"{onnx_path}: {record['onnx_bytes'] / 2**20:.1f} MiB, {record['weights']} weights, "
            f"largest difference from PyTorch {record['max_abs_diff_from_pytorch']:.1e}")
        records.append(record)
    return records


__all__ = ["OPSET", "SHIPPED", "WEIGHT_TYPES", "export_checkpoint", "export_shipped",
           "onnx_path_for", "probe_inputs", "record_path_for", "run_onnx"]
