"""One run of ddpm_train.py: the files it writes, resuming it, its quality checks, and its run record.

A run writes its checkpoint and, beside it, companions named after it (companion_paths):
a resumable snapshot while it is unfinished, the loss and PSNR plots and a JSON record when
it ends. Every few steps it measures what ddpm_infer.py would show by default: the PSNR of
one-step denoising at t = EVAL_T (RunRecord.evaluate).
"""

import copy
import os
import platform
import sys
import time

import torch

from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .data import data_identity
from .diffusion import denoise, seeded_noise
from .distributed import is_main_process, launcher, launcher_for, main_process_outcome, rank_and_world_size
from .errors import UserError
from .figures import save_loss_by_noise, save_loss_curve, save_quality_curve
from .files import same_place, write_json
from .machine import describe
from .metrics import psnr

# The flags that define a run: a resumed run takes them from its checkpoint.
RUN_SETTINGS = ("img_size", "batch_size", "train_steps", "lr", "image_path", "seed", "base_channels",
                "channel_mults", "max_noise")
# settings added later, with the value that runs which predate them had
LATER_SETTINGS = {"attention": False, "coords": False, "canvas": False, "image_dir": None, "num_images": None,
                  "ema_decay": 0.0, "digits": None, "class_conditional": False, "label_dropout": None,
                  "precision": "fp32", "snr_gamma": 1.0, "t_density": "uniform"}
SCRIPT = "ddpm_train.py"
EVAL_IMAGES = 8  # with a folder, the quality check denoises its first 8 images
EVAL_T, EVAL_NOISE_SEED = 500, 0  # the quality check denoises what `python ddpm_infer.py` does by default
PSNR_MILESTONES = (30.0, 35.0, 38.0)  # dB; the summary says when the run first reached each


def companion_paths(model_save_path):
    """The files a run writes beside its checkpoint, named after it (model.pth -> model.*)."""
    root, ext = os.path.splitext(model_save_path)
    return {
        "snapshot": f"{root}.resume{ext or '.pth'}",  # resumable, while the run is unfinished
        "loss_curve": f"{root}_loss.png",
        "loss_by_noise": f"{root}_loss_by_noise.png",
        "quality_curve": f"{root}_psnr.png",
        "record": f"{root}.json",
    }


def open_snapshot(args, typed, device):
    """For --resume: load the snapshot, take the run's settings from it into ``args``, and check that the
    flags the user typed (``typed``) agree. Returns (the network with the weights training continues, the
    snapshot).

    It resumes from any working directory: a folder or image typed again is judged by what it holds (the
    digest of its files, checked later), not by how its path is spelt; one left out is looked for where the
    run found it; and the finished model goes beside the snapshot, as the run meant it to.
    """
    model, _, checkpoint = load_checkpoint(args.resume, device, ema=False)  # the trained weights, not the EMA
    if "resume" not in checkpoint:
        raise UserError(f"{args.resume!r} is a finished model, not a snapshot of a run in progress: "
                        "there is nothing to resume")
    saved = checkpoint["train"].get("args", {})
    missing = [name for name in (*RUN_SETTINGS, "model_save_path") if name not in saved]
    if missing:
        raise UserError(f"snapshot {args.resume!r} does not record its run's settings ({', '.join(missing)})")
    processes, here = checkpoint["resume"].get("world_size", 1), rank_and_world_size()[1]
    if processes != here:  # checked first: each process's random state, and its share of a batch, depend on it
        raise UserError(f"snapshot {args.resume!r} is of a run in {processes} process{'es' if processes > 1 else ''}, "
                        f"and this is {here}: continue it exactly with "
                        f"{' '.join(launcher_for(processes))} --resume {args.resume}")
    saved = {**LATER_SETTINGS, **saved}
    saved.update(_data_found_from_here(saved, checkpoint["data"]))
    for name in (*RUN_SETTINGS, *LATER_SETTINGS):
        if name in typed and name in PATH_SETTINGS and (getattr(args, name) is None) == (saved[name] is None):
            continue  # the image or folder as found from here: the check of its bytes says if it is the run's
        if name in typed and getattr(args, name) != saved[name]:
            raise UserError(f"--{name} {getattr(args, name)} disagrees with the run being resumed, which used "
                            f"{saved[name]} (leave --{name} out to continue that run)")
        setattr(args, name, saved[name])
    if "model_save_path" not in typed:
        args.model_save_path = _model_beside(args.resume, saved["model_save_path"])
    return model, checkpoint


PATH_SETTINGS = ("image_path", "image_dir")  # the data's place: many paths, relative or not, spell the same one


def _data_found_from_here(saved, data):
    """Where the resumed run's folder is from this working directory: as typed when the run started, if that
    is still the folder, else where it was (the absolute path the data record keeps). Returns the settings to
    change."""
    folder, absolute = saved.get("image_dir"), data.get("image_dir_absolute")
    if folder is None or absolute is None or not os.path.isdir(absolute):
        return {}
    if os.path.isdir(folder) and os.path.samefile(folder, absolute):
        return {}
    return {"image_dir": absolute}


def _model_beside(snapshot_path, saved_model_path):
    """The resumed run's checkpoint path: beside the snapshot, which was named after it (model.resume.pth for
    model.pth), wherever the command is run from; the recorded path where the snapshot has been renamed."""
    here = os.path.join(os.path.dirname(snapshot_path), os.path.basename(saved_model_path))
    if os.path.basename(companion_paths(here)["snapshot"]) != os.path.basename(snapshot_path):
        return saved_model_path
    return saved_model_path if same_place(here, saved_model_path) else here


def continue_from(trainer, snapshot, path):
    """Put the state of the run saved in ``snapshot`` (read from ``path``) into a new Trainer."""
    try:
        trainer.load_state_dict(snapshot["resume"], snapshot["train"]["loss_history"],
                                snapshot["train"]["noise_history"])
        if trainer.ema is not None:
            trainer.ema.model.load_state_dict(snapshot["ema"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise UserError(f"snapshot {path!r} cannot be continued here ({exc})") from None


def keep_another_models(path, data, args):
    """Refuse a default save path that holds another run's model: of other pictures (a photo that shares its
    file name), or of the same ones trained with other settings (`python ddpm_train.py --train_steps 100`
    would replace the shipped model). Only the run that made a model may remake it there."""
    if not os.path.exists(path):
        return
    keep = "so it is kept; choose where this model goes with --model_save_path"
    try:
        trained = read_checkpoint(path)
    except UserError:  # not a checkpoint of ours: not ours to replace either
        raise UserError(f"{path!r} exists and is not a checkpoint of this project, {keep}") from None
    trained_on = trained["data"]
    if data_identity(trained_on) != data.identity:
        source = trained_on.get("image_dir") or trained_on.get("image_path") or f"digits {trained_on.get('digits')}"
        raise UserError(f"{path!r} holds the model of another picture ({source}), {keep}")
    saved = {**LATER_SETTINGS, **trained["train"].get("args", {})}
    other = [f"--{name} {_flag_value(saved.get(name))} where this run has {_flag_value(getattr(args, name))}"
             for name in (*RUN_SETTINGS, *LATER_SETTINGS)
             if name not in PATH_SETTINGS and _flag_value(saved.get(name)) != _flag_value(getattr(args, name))]
    processes, here = trained["train"].get("processes", 1), rank_and_world_size()[1]
    if processes != here:  # each process draws its own noise: another count trains another model
        other.append(f"{processes} process{'es' if processes > 1 else ''} where this run has {here}")
    if other:
        raise UserError(f"{path!r} holds a model of the same data trained with other settings "
                        f"({', '.join(other)}), {keep}")


def _flag_value(value):
    """A setting as it is typed: channel_mults [1, 2, 4] as 1,2,4."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


class RunRecord:
    """What every checkpoint of this run says about it, its quality checks, and the one place that writes them."""

    def __init__(self, args, device, data, dataset, earlier=None):
        self.args, self.device, self.data, self.dataset = args, device, data, dataset
        earlier = earlier or {}  # the "train" part of the snapshot being resumed
        self.earlier_time = earlier.get("wall_time_s", 0.0)  # seconds spent before a resume
        self.quality = copy.deepcopy(earlier.get("quality", {"t": EVAL_T, "step": [], "seconds": [], "psnr_db": []}))
        self.start = time.perf_counter()
        self.eval_input = None

    def evaluate(self, trainer):
        """Log the PSNR of one-step denoising at t = EVAL_T against the time so far; returns it for display.

        With a folder, the PSNR is over its first EVAL_IMAGES images; with EMA, of the averaged weights.
        Process 0 alone measures (the others return at once).
        """
        if not is_main_process():
            return {}
        if self.eval_input is None:  # x_t of ddpm_infer.py's default noise, made once
            count = min(len(self.dataset), EVAL_IMAGES)
            self.eval_x0 = torch.stack([self.dataset[i] for i in range(count)]).to(trainer.device)
            eps = seeded_noise(self.eval_x0, EVAL_NOISE_SEED).to(trainer.device)
            t = torch.full((len(self.eval_x0),), EVAL_T, device=trainer.device)
            self.eval_input = trainer.schedule.add_noise(self.eval_x0, t, eps)
        value = psnr(denoise(trainer.sampling_model(), self.eval_input, EVAL_T, trainer.schedule), self.eval_x0)
        for key, item in (("step", trainer.step), ("seconds", round(self.elapsed(), 2)), ("psnr_db", value)):
            self.quality[key].append(item)
        return {"psnr": f"{value:.2f}dB"}

    def milestones(self):
        """For each PSNR_MILESTONES value, (dB, step, seconds) of the first check that reached it."""
        q = self.quality
        reached = []
        for target in PSNR_MILESTONES:
            first = next((i for i, value in enumerate(q["psnr_db"]) if value >= target), None)
            if first is not None:
                reached.append((target, q["step"][first], q["seconds"][first]))
        return reached

    def elapsed(self):
        return self.earlier_time + time.perf_counter() - self.start

    def write_reports(self, trainer, paths):
        """The loss plots and the JSON run record, beside the finished checkpoint. Returns the paths written."""
        losses, noise = trainer.loss_history(), trainer.noise_history()
        save_loss_curve(losses, paths["loss_curve"])
        save_loss_by_noise([trainer.schedule.w(t) for t in noise["t"]], noise["loss"], trainer.schedule.max_noise,
                           paths["loss_by_noise"])
        written = [paths["loss_curve"], paths["loss_by_noise"]]
        if self.quality["step"]:
            save_quality_curve(self.quality, self.milestones(), paths["quality_curve"])
            written.append(paths["quality_curve"])
        write_json(paths["record"], {
            "command": " ".join(self.command()),
            "args": dict(vars(self.args)),
            "seed": self.args.seed, "device": str(self.device), "processes": trainer.world_size,
            "precision": trainer.precision,
            "machine": describe(),
            "torch_version": str(torch.__version__), "python_version": platform.python_version(),
            "wall_time_s": round(self.elapsed(), 2), "train_steps": trainer.step,
            "final_loss": trainer.final_loss(),
            "quality": self.quality,
            "psnr_milestones": [{"psnr_db": db, "step": step, "seconds": sec} for db, step, sec in self.milestones()],
            **{key: value for key, value in self.data.record.items()
               if key not in ("img_size", "files", "image_dir_absolute")},
            "checkpoint": self.args.model_save_path,
        })
        return written + [paths["record"]]

    def command(self):
        """The command line that started this process, as a user would type it."""
        return [*launcher(SCRIPT), *sys.argv[1:]]

    def save(self, path, trainer, resumable):
        """Write a checkpoint of the run. Every process must call it (the random states are gathered
        from all); process 0 alone writes."""
        resume = trainer.state_dict() if resumable else None
        failure = None
        if is_main_process():
            try:
                self._write(path, trainer, resume)
            except UserError as exc:  # a full disk, say: every process stops, with process 0's one line
                failure = str(exc)
        failure = main_process_outcome(failure)
        if failure is not None:
            raise UserError(failure)

    def _write(self, path, trainer, resume):
        save_checkpoint(
            path, trainer.model, trainer.schedule,
            data=self.data.record,
            train_info={
                "args": {k: v for k, v in vars(self.args).items() if k != "resume"}, "step": trainer.step,
                "loss_history": trainer.loss_history(), "noise_history": trainer.noise_history(),
                "wall_time_s": self.elapsed(), "quality": self.quality, "processes": trainer.world_size,
                "precision": trainer.precision,
                "device": str(self.device), "torch_version": str(torch.__version__),
                "python_version": platform.python_version(),
            },
            resume=resume, ema=trainer.ema.model if trainer.ema is not None else None,
        )
