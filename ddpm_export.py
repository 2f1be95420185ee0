"""Export the shipped networks to ONNX, for the browser explorer (python ddpm_explore.py).

    python ddpm_export.py                      # the three shipped networks, each beside its checkpoint
    python ddpm_export.py --model_path model_ckpt/my_photo_unet.pth   # your own model, beside it

For each checkpoint x.pth it writes x.onnx (the network, float16 weights, float32
compute; ddpm/onnx_export.py) and x.onnx.json, the export's record: the SHA-256 of
the checkpoint it came from, the torch, onnx and onnxruntime versions, and the
largest difference of its output from PyTorch's on the same inputs.
"""

import warnings

from ddpm.cli import ArgumentParser, run, say
from ddpm.errors import UserError
from ddpm.files import check_outputs
from ddpm.onnx_export import SHIPPED, export_shipped, onnx_path_for, record_path_for


def parse_args(argv=None):
    parser = ArgumentParser(description="Export trained U-Nets to ONNX files that a web page can run.")
    parser.add_argument("--model_path", action="append", default=None,
                        help="a checkpoint to export (repeat for several; default: the three shipped ones: "
                             + ", ".join(SHIPPED) + ")")
    args = parser.parse_args(argv)
    args.model_path = args.model_path or list(SHIPPED)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise UserError(f"exporting needs the onnx and onnxruntime packages ({exc}); "
                        "pip install -r requirements.txt installs them") from None
    outputs = [path for checkpoint in args.model_path
               for path in (onnx_path_for(checkpoint), record_path_for(onnx_path_for(checkpoint)))]
    check_outputs(outputs, "output", inputs=args.model_path)
    with warnings.catch_warnings():  # the tracer's notes on Python-side shape checks, which the export does not need
        warnings.simplefilter("ignore")
        export_shipped(args.model_path, say=say)


if __name__ == "__main__":
    run(main)
