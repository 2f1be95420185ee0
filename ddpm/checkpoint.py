"""The checkpoint file: self-describing, written atomically, loaded safely.

Layout, plain Python data and tensors only:

    {"format": "ddpm-demo-unet", "version": 1,
     "model_config": {...},           # UNet(**model_config) rebuilds the network
     "noise_config": {...},           # NoiseSchedule(**noise_config)
     "data": {"img_size": ..., ...},  # what the network was trained on
     "model": state_dict,             # the weights, on the CPU
     "model_sha256": "...",           # digest of the weights, checked on load
     "ema": state_dict,               # only where training kept an EMA of the weights: sampling uses it
     "ema_sha256": "...",
     "train": {"args": {...}, "step": ..., "loss_history": [...], ...},
     "resume": {...},                 # only in unfinished runs: optimizer, RNG states, step, ...
     "resume_sha256": "..."}          # digest of "resume" and "train": all that a resumed run continues from

Every digest is checked when the file is read, so a flipped byte anywhere a
model or a resumed run depends on is refused instead of silently used.

Because nothing in it is a custom class, ``torch.load(path, weights_only=True)``
always reads it, and we never fall back to an unsafe load: a checkpoint is a
pickle, and an unrestricted pickle can run any code when loaded.
"""

import hashlib

import torch

from models.unet_model import UNet

from .diffusion import NoiseSchedule
from .errors import UserError
from .files import atomic_write, check_readable_file

FORMAT = "ddpm-demo-unet"
VERSION = 1


def weights_digest(state_dict):
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def state_digest(value):
    """SHA-256 over nested plain data (dicts, lists, tensors, numbers, strings): every key, type and byte.

    What weights_digest does for a state_dict, for the rest of a snapshot: the optimizer's moments,
    the random generators' states, the step, the loss history. Dict keys are taken in sorted order,
    and a tuple counts as a list (a checkpoint may read either back).
    """
    digest = hashlib.sha256()

    def feed(item):
        if torch.is_tensor(item):
            tensor = item.detach().cpu().contiguous()
            digest.update(f"T|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(item, dict):
            digest.update(f"D{len(item)}|".encode())
            for key in sorted(item, key=repr):
                digest.update(f"{key!r}:".encode())
                feed(item[key])
        elif isinstance(item, (list, tuple)):
            digest.update(f"L{len(item)}|".encode())
            for element in item:
                feed(element)
        else:  # None, bool, int, float (repr is exact), str
            digest.update(f"{type(item).__name__}|{item!r}|".encode())

    feed(value)
    return digest.hexdigest()


def _resume_digest(checkpoint):
    return state_digest({"resume": checkpoint["resume"], "train": checkpoint["train"]})


def _cpu_state(model):
    return {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}


def save_checkpoint(path, model, schedule, data, train_info, resume=None, ema=None):
    """Write the checkpoint atomically: a temporary file in the same folder, then os.replace.

    ``resume`` (Trainer.state_dict()) makes the file resumable; a finished
    run leaves it out. ``ema`` is the model holding the moving average of the
    weights, if training kept one. A failed write raises UserError and leaves
    any previous file at ``path`` as it was.
    """
    state_dict = _cpu_state(model)
    checkpoint = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": dict(model.config),
        "noise_config": schedule.to_config(),
        "data": dict(data),
        "model": state_dict,
        "model_sha256": weights_digest(state_dict),
        "train": dict(train_info),
    }
    if ema is not None:
        checkpoint["ema"] = _cpu_state(ema)
        checkpoint["ema_sha256"] = weights_digest(checkpoint["ema"])
    if resume is not None:
        checkpoint["resume"] = resume
        checkpoint["resume_sha256"] = _resume_digest(checkpoint)
    with atomic_write(path, "checkpoint") as tmp:  # a failed write: UserError, the previous file kept
        torch.save(checkpoint, tmp)


def load_checkpoint(path, device="cpu", ema=True):
    """Read a checkpoint of ours and rebuild its network.

    Returns (model in eval mode on ``device``, NoiseSchedule, the checkpoint dict). The model
    has the EMA weights where the checkpoint holds them (what sampling uses), unless ``ema``
    is False: then the trained weights themselves (what a resumed run continues from).
    Raises UserError, naming the file and the fix, for anything else.
    """
    checkpoint = read_checkpoint(path)
    key = "ema" if ema and "ema" in checkpoint else "model"
    try:
        with torch.device("meta"):  # shapes only: the weights come from the file, so skip random init
            model = UNet(**checkpoint["model_config"])
        schedule = NoiseSchedule(**checkpoint["noise_config"])
    except (TypeError, ValueError) as exc:
        raise UserError(f"checkpoint {path!r} describes a network this code cannot build ({exc})") from None
    try:
        model.load_state_dict(checkpoint[key], assign=True)  # take the file's tensors as the parameters
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1].strip()
        raise UserError(
            f"checkpoint {path!r} holds weights that do not fit the network it describes ({first_line})"
        ) from None
    return model.to(device).eval(), schedule, checkpoint


def read_checkpoint(path):
    """The checkpoint dict, without building its network: torch.load(weights_only=True) with the
    file checks and format checks in plain words (UserError for anything that is not ours)."""
    check_readable_file(path, "checkpoint", "train one with ddpm_train.py, or check --model_path")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise UserError(
            f"checkpoint {path!r} is a Git LFS pointer, not the real file (run 'git lfs pull' to fetch it)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types here: truncated zip, bad pickle, refused global
        raise UserError(f"checkpoint {path!r} cannot be read safely as a PyTorch file ({_why(exc)})") from None

    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        if isinstance(checkpoint, dict) and checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
            kind = "a bare state_dict"
        else:
            kind = "not a checkpoint of this project"
        raise UserError(
            f"checkpoint {path!r} is {kind} (no format {FORMAT!r}); "
            "use a file written by ddpm_train.py"
        )
    version = checkpoint.get("version")
    if not isinstance(version, int) or version < 1:
        raise UserError(f"checkpoint {path!r} has an invalid format version {version!r}")
    if version > VERSION:
        raise UserError(
            f"checkpoint {path!r} has format version {version}, newer than this code reads "
            f"({VERSION}); update the code"
        )
    missing = [key for key in ("model_config", "noise_config", "data", "model", "model_sha256", "train")
               if key not in checkpoint]
    if missing:
        raise UserError(f"checkpoint {path!r} is incomplete: it lacks {', '.join(missing)}")
    data = checkpoint["data"]
    if not isinstance(data, dict) or not isinstance(data.get("img_size"), int) or data["img_size"] < 1:
        raise UserError(f"checkpoint {path!r} is damaged: it does not record the image size it was trained at")
    _check_data_record(path, data)
    for key in ("model", "ema"):
        weights = checkpoint.get(key, {})
        if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
            raise UserError(f"checkpoint {path!r} is damaged: its {key!r} entry is not a dict of tensors")
        if key in checkpoint and weights_digest(weights) != checkpoint.get(f"{key}_sha256"):
            raise UserError(f"checkpoint {path!r} is corrupted: its {'EMA ' if key == 'ema' else ''}weights do not "
                            "match their SHA-256 digest (copy or download it again)")
    if "resume_sha256" in checkpoint and _resume_digest(checkpoint) != checkpoint["resume_sha256"]:
        # snapshots written before this digest existed carry none, and resume unchecked as they always did
        raise UserError(f"snapshot {path!r} is corrupted: the state it resumes (optimizer, random generators, "
                        "step, history) does not match its SHA-256 digest (resume from an intact copy)")
    return checkpoint


# What a checkpoint's "data" record must hold to find its training data again, by kind of data.
DATA_FIELDS = {"digits": {"num_images": int, "digits_sha256": str},
               "image_dir": {"files": list, "dataset_sha256": str, "num_images": int},
               "image_path": {}}


def _check_data_record(path, data):
    """UserError unless the "data" record describes the data it names in full (what data.recorded_training_data
    needs to find it again). A record that names none is allowed: the scripts then say they cannot compare."""
    kind = next((name for name in DATA_FIELDS if name in data), None)
    if kind is None:
        return
    for field, kind_of_value in {kind: str, **DATA_FIELDS[kind]}.items():
        if not isinstance(data.get(field), kind_of_value):
            raise UserError(f"checkpoint {path!r} is damaged: its data record lacks a valid {field!r}")
    if kind == "image_dir" and not all(isinstance(name, str) for name in data["files"]):
        raise UserError(f"checkpoint {path!r} is damaged: its data record's 'files' are not all file names")


def _why(exc):
    """The telling line of a torch.load failure, short enough for a one-line error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    refused = [line for line in lines if "Unsupported global" in line]
    if refused:  # the safe unpickler met a class or function: the file wants to run code
        return "it holds Python objects that a safe load refuses: " + refused[0].split(" was not")[0]
    return (lines[0] if lines else type(exc).__name__)[:200]
