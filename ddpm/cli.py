"""What the command-line scripts share: argument checking, the device, messages, Ctrl-C, the error exit.

Every user mistake ends the same way: one line ``error: ...`` on stderr and
exit status 2, before anything is written.
"""

import argparse
import ctypes
import gc
import math
import os
import platform
import re
import signal
import sys
import time
from contextlib import contextmanager

import torch

from .distributed import is_main_process
from .errors import UserError


class _HelpFormatter(argparse.HelpFormatter):
    """Adds the values a flag accepts and '(default: ...)' to each flag's help.

    The accepted values come from the flag's type (its ``accepts`` text, set by
    the type functions below), so --help and the checks can never disagree.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        accepts = getattr(action.type, "accepts", None)
        if accepts:
            text += f" [{accepts}]"
        shows_default = action.default not in (None, argparse.SUPPRESS) and not isinstance(action.default, bool)
        if shows_default and "%(default)" not in text:  # an on/off switch needs no "(default: False)"
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse that shows defaults in --help and reports a bad flag in one line."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        fail(f"error: {message} (see --help)")


# Under torchrun, how long a process other than 0 waits, after an error, for process 0 to report it.
OTHERS_WAIT_S = 10


def fail(line, status=2):
    """Print ``line`` on stderr and exit with ``status``: once, however many processes torchrun started.

    Under torchrun every process meets the same mistake. Process 0 says so and exits; the launcher then
    stops the others. Were another process to exit first, the launcher would stop process 0 before it
    could print, so the others wait a little first, and print the line themselves only if process 0 is
    still running by then (the mistake was theirs alone).
    """
    if not is_main_process():
        time.sleep(OTHERS_WAIT_S)
    print(line, file=sys.stderr)
    sys.exit(status)


MAX_SEED = 2**32 - 1
EXIT_INTERRUPTED = 130  # the shell's code for "stopped by Ctrl-C"


def int_in_range(low, high):
    """argparse type factory: an integer from low to high inclusive.

    The upper bounds keep a typo (an extra zero or three) from asking for
    terabytes of memory: it becomes an error message instead of a crash.
    """

    def parse(text):
        value = _parse(int, text, "an integer")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {value}")
        return value

    parse.accepts = f"{low} to {high}"
    return parse


def positive_float(text):
    """argparse type: a finite number > 0."""
    value = _parse(float, text, "a number")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value


def fraction(text):
    """argparse type: a number above 0 and at most 1."""
    value = _parse(float, text, "a number")
    if not 0 < value <= 1:  # also false for nan
        raise argparse.ArgumentTypeError(f"must be a number above 0 and at most 1, got {text!r}")
    return value


def zero_to_one(text):
    """argparse type: a number from 0 to 1 inclusive."""
    value = _parse(float, text, "a number")
    if not 0 <= value <= 1:  # also false for nan
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


MAX_GUIDANCE = 100.0  # far past any useful S: beyond it every x0_guided is clamped to black and white


def guidance_scale(text):
    """argparse type: a guidance scale S from 0 to MAX_GUIDANCE (0 unconditional, 1 plain conditional)."""
    value = _parse(float, text, "a number")
    if not 0 <= value <= MAX_GUIDANCE:  # also false for nan
        raise argparse.ArgumentTypeError(f"must be a number from 0 to {MAX_GUIDANCE:g}, got {text!r}")
    return value


def below_one(text):
    """argparse type: a number from 0 up to, but not including, 1."""
    value = _parse(float, text, "a number")
    if not 0 <= value < 1:  # also false for nan
        raise argparse.ArgumentTypeError(f"must be a number from 0 up to (not including) 1, got {text!r}")
    return value


def at_least_one(text):
    """argparse type: a finite number of at least 1."""
    value = _parse(float, text, "a number")
    if not (math.isfinite(value) and value >= 1):  # also false for nan
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 1, got {text!r}")
    return value


def channel_multipliers(text):
    """argparse type: 1 to 8 comma-separated integers from 1 to 64, such as '1,2,4,8'."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 1,2,4,8, got {text!r}") from None
    if not 1 <= len(values) <= 8 or any(not 1 <= v <= 64 for v in values):
        raise argparse.ArgumentTypeError(f"must be 1 to 8 integers from 1 to 64, got {text!r}")
    return values


positive_float.accepts = "above 0"
fraction.accepts = "above 0, at most 1"
zero_to_one.accepts = "0 to 1"
below_one.accepts = "0 to below 1"
channel_multipliers.accepts = "1 to 8 levels, each 1 to 64"


def _parse(kind, text, description):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}") from None


RUNS_FOLDER = "runs"  # where a learner's own runs write what the shipped runs write into images/ (git ignores it)


def route_outputs(args, shipped, shipped_run, own_folder):
    """Fill in each output flag left out (None): the shipped file for the run that made it, else a file of the
    same name in ``own_folder`` (under runs/), so that a learner's run never replaces a shipped figure or record.

    ``shipped`` maps each flag's name in ``args`` to its shipped path; ``shipped_run`` says whether this run is
    the one that made them (the shipped model, or every setting at its default).
    """
    for name, path in shipped.items():
        if getattr(args, name) is None:
            setattr(args, name, path if shipped_run else os.path.join(own_folder, os.path.basename(path)))


def at_defaults(parser, args, ignore=()):
    """Whether every setting in ``args`` but those named in ``ignore`` is the parser's default: the shipped run."""
    return settings_of(parser, args, [], ignore)


def settings_of(parser, args, argv, ignore=()):
    """Whether every setting in ``args`` but those named in ``ignore`` is what the command line ``argv`` gives:
    the shipped run, where its documented command has flags."""
    shipped = vars(parser.parse_args(argv))
    return all(value == shipped[name] for name, value in vars(args).items() if name not in ignore)


def model_folder(model_path):
    """runs/<checkpoint name>: where the figures of a model other than the shipped one go by default."""
    return os.path.join(RUNS_FOLDER, os.path.splitext(os.path.basename(model_path))[0])


def say(message, **kwargs):
    """print() in process 0 only: the one voice of a run, however many processes torchrun started."""
    if is_main_process():
        print(message, **kwargs)


def warn(message):
    """A warning for the user: one line on stderr, from process 0; the run goes on."""
    say(f"warning: {message}", file=sys.stderr)


def add_device_argument(parser):
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
        help="where to run: auto picks cuda, then mps, then cpu",
    )


def pick_device(name):
    """Resolve --device to a torch.device, or raise UserError if the named one is missing."""
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise UserError(f"--device {name} is not available on this machine (use --device auto or cpu)")
    return torch.device(name)


@contextmanager
def stop_on_sigint(trainer):
    """While inside: the first Ctrl-C asks ``trainer`` to stop after the current step.

    The step in progress completes, so the state that is then saved is exactly
    the state after a whole step. A second Ctrl-C stops at once, saving nothing.
    """

    def handler(signum, frame):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.request_stop()
        if not trainer.stopping and is_main_process():  # under torchrun: once, and not after they agreed to stop
            print("\nstopping after this step to save a snapshot (Ctrl-C again to quit without saving)",
                  file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h


def keep_freed_memory():
    """Let glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of handing them back.

    A training step frees and re-allocates the same activations (up to 12 MiB each at 256 px)
    every time. Above malloc's default threshold each such block is a fresh mmap that the kernel
    must fault in and zero page by page; kept in the heap, it is reused as is. Measured by
    benchmarks/ablations.py on the 256 px training step: 1/28 of the page faults, 7% less time.
    A process-wide setting, so the scripts where it pays call it first thing: ddpm_train.py and
    ddpm_sample.py (benchmarks/process_tuning.py measures each script with and without it).
    Does nothing where the C library is not glibc (macOS, Windows, musl).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)  # glibc's largest allowed threshold
        libc.mallopt(M_TRIM_THRESHOLD, 1 * 2**30)  # and do not trim the heap back down after each step
    except (OSError, AttributeError):
        pass


def is_out_of_memory(exc):
    """Whether ``exc`` is an allocation that failed: torch.OutOfMemoryError on a GPU, a RuntimeError on the CPU."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


def out_of_memory_message(exc, hint):
    """The one line for a failed allocation: how much was asked for, where known, and what to make smaller."""
    asked = re.search(r"tried to allocate ([0-9.]+) ?(bytes|[KMGT]iB)", str(exc), re.IGNORECASE)
    if asked is None:
        return f"out of memory; {hint}"
    size = float(asked.group(1)) / (2**30 if asked.group(2) == "bytes" else 1)
    unit = "GiB" if asked.group(2) == "bytes" else asked.group(2)
    return f"out of memory (one block of {size:.2f} {unit} could not be had); {hint}"


def run(main, memory_hint="try a smaller image or batch"):
    """Call main(); turn a UserError into 'error: ...' on stderr and exit status 2.

    A failed allocation becomes one such line too, with ``memory_hint`` (which flags to make smaller);
    nothing has been written then that was not whole before. A Ctrl-C that main() does not handle itself
    ends quietly with status 130.
    """
    # Keep the cycle collector off the ~10^5 objects that importing torch and matplotlib made (they live until
    # exit): every script measured runs 7-15% faster (benchmarks/process_tuning.json).
    gc.freeze()
    try:
        main()
    except UserError as exc:
        fail(f"error: {exc}")
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(exc):
            raise
        fail(f"error: {out_of_memory_message(exc, memory_hint)}")
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
