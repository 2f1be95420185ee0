"""Files: atomic writes (a crash or a full disk never leaves half a file or destroys the old one, and a device is
never replaced), a run's outputs written all at once or not at all, JSON records, the checks before writing and
reading, and the digest that names a file's bytes."""

import hashlib
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager

from .errors import UserError


def special_kind(path):
    """What ``path`` is when it exists but is no regular file or folder ("a FIFO", "a character device", ...),
    else None. Such a path is not ours to replace: renaming a file over /dev/null would destroy the device."""
    try:
        mode = os.stat(path).st_mode  # through symbolic links: what the name finally points at
    except OSError:
        return None
    for test, kind in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return None


@contextmanager
def atomic_write(path, what="file"):
    """Yield a temporary path; when the block succeeds, the file it wrote becomes ``path``.

    A regular file is replaced atomically: the temporary file lies beside it (the same folder, so
    the same disk) and ``os.replace`` swaps it in, so readers see the old file or the new one,
    never a mixture. Where ``path`` is a symbolic link, the file it points at is replaced and the
    link kept. A character device such as /dev/null, a common way to say "no file", is written
    through: the bytes are copied into it, and the device stays. A block device, FIFO or socket
    is refused, and never replaced.

    If the block or the write fails (a full disk: torch.save raises RuntimeError there, Pillow and
    open() raise OSError), the temporary file is removed, ``path`` is left as it was, and the
    failure becomes a UserError naming ``what`` and the file.
    """
    target = os.path.realpath(path)
    kind = special_kind(target)
    if kind is not None and kind != "a character device":
        raise UserError(f"{what} {path!r} is {kind}, not a regular file; refusing to write there")
    tmp = None
    try:
        if kind is None:
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
        else:
            fd, tmp = tempfile.mkstemp(prefix="ddpm-write-through.", suffix=".tmp")
        os.close(fd)
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        _move_in(tmp, target)
    except (OSError, RuntimeError) as exc:
        raise UserError(f"could not write {what} {path!r} ({_write_failure(exc, target)}); "
                        "any previous file there is untouched") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _write_failure(exc, target):
    """Why a write failed, in a few words: the OS's reason, or torch's last line and the free space."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = (lines[-1] if lines else type(exc).__name__).split("] . ")[-1][:120]  # without the C++ location
    reason = f"the write stopped part-way: {detail}"
    try:
        free = shutil.disk_usage(os.path.dirname(target)).free
        reason += f"; {free / 2**20:.1f} MiB free on that disk"
    except OSError:
        pass
    return reason


@contextmanager
def staged_outputs(folder, what):
    """Write a run's files all at once or not at all: yields ``place(name)``, the path to write each file to.

    The files are written into a hidden folder inside ``folder`` (the same disk, so moving them is a
    rename, which needs no space) and moved into ``folder`` only when the block has written them all.
    If it fails (a full disk, an error), none is moved: the files already in ``folder`` stay as they
    were, and a folder made for the run is removed again.
    """
    made = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        staging = tempfile.mkdtemp(dir=folder, prefix=".staging.")
    except OSError as exc:
        raise UserError(f"could not write {what} {folder!r} ({exc.strerror or exc})") from None
    try:
        yield lambda name: os.path.join(staging, name)
        for name in sorted(os.listdir(staging)):
            _move_in(os.path.join(staging, name), os.path.realpath(os.path.join(folder, name)))
    except UserError as exc:  # a write that failed names the file where it was to go, not the hidden folder
        raise UserError(str(exc).replace(staging, folder)) from None
    except OSError as exc:
        raise UserError(f"could not write {what} {folder!r} ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if made and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def _move_in(finished, target):
    """Put a finished file at ``target`` (a path with no links left in it): renamed over a regular file, which
    is atomic within one disk, or copied into a character device such as /dev/null, which stays a device.
    atomic_write and check_outputs have refused every other kind of file beforehand."""
    if special_kind(target) is None:
        os.replace(finished, target)
    else:
        with open(finished, "rb") as source, open(target, "wb") as device:
            shutil.copyfileobj(source, device)


def same_place(a, b):
    """Whether two spellings of a path (relative, absolute, through a link) name one file or folder: the
    same file where both exist, else the same absolute path."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def write_json(path, data):
    """Write ``data`` as indented JSON (UTF-8, a final newline), atomically: a record is whole or absent."""
    with atomic_write(path, "record") as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def check_writable(path, what, inputs=()):
    """Raise UserError unless ``path`` can be written (its folder may still have to be made).

    ``inputs`` are the files the run reads: writing over one of them would lose
    it, so that is refused too. A path that is a block device, FIFO or socket is
    refused (atomic_write would not write there); a character device such as
    /dev/null is fine where it may be written. Called before any long work, so
    that a typo in an output path costs nothing.
    """
    check_outputs([path], what, inputs)


def check_outputs(paths, what, inputs=()):
    """check_writable for many output paths at once, each against every one of ``inputs`` (a folder of them)."""
    read = {}
    for source in inputs:
        try:
            info = os.stat(source)
        except OSError:
            continue
        read[(info.st_dev, info.st_ino)] = source
    for path in paths:
        if os.path.isdir(path):
            raise UserError(f"{what} {path!r} is a folder (give a file name)")
        try:
            info = os.stat(path)
        except OSError:
            info = None
        if info is not None and (info.st_dev, info.st_ino) in read:
            raise UserError(f"{what} {path!r} is the input file {read[(info.st_dev, info.st_ino)]!r}; "
                            "writing there would destroy it")
        kind = special_kind(path)
        if kind == "a character device":
            if not os.access(path, os.W_OK):
                raise UserError(f"{what} {path!r} cannot be written: no permission to write to {kind}")
            continue
        if kind is not None:
            raise UserError(f"{what} {path!r} is {kind}, not a regular file; refusing to write there")
        folder = os.path.dirname(os.path.realpath(path))
        while not os.path.exists(folder):  # the nearest folder that exists must let us write
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise UserError(f"{what} {path!r} cannot be written: {folder!r} is a file, not a folder")
        if not os.access(folder, os.W_OK):
            raise UserError(f"{what} {path!r} cannot be written: no permission to write in {folder!r}")


def file_sha256(path):
    """Hex SHA-256 of a file's bytes: names exactly which file a model was trained on."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_readable_file(path, what, fix):
    """Raise UserError if ``path`` is missing (saying ``fix``), a folder, a device, FIFO or socket, or empty."""
    if not os.path.exists(path):
        raise UserError(f"{what} {path!r} does not exist ({fix})")
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a folder, not a file")
    kind = special_kind(path)
    if kind is not None:  # reading a FIFO would wait for a writer forever
        raise UserError(f"{what} {path!r} is {kind}, not a regular file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{what} {path!r} is empty (0 bytes)")
