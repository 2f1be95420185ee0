"""Files: atomic writes (a crash never leaves half a file or destroys the old one), JSON records, the checks
before writing and reading, and the digest that names a file's bytes."""

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager

from .errors import UserError


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside ``path``; when the block succeeds, move it onto ``path``.

    ``os.replace`` within one folder is atomic: readers see the old file or
    the new one, never a mixture. If the block raises, the temporary file is
    removed and ``path`` is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, data):
    """Write ``data`` as indented JSON (UTF-8, a final newline), atomically: a record is whole or absent."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def check_writable(path, what, inputs=()):
    """Raise UserError unless ``path`` can be written (its folder may still have to be made).

    ``inputs`` are the files the run reads: writing over one of them would lose
    it, so that is refused too. Called before any long work, so that a typo in
    an output path costs nothing.
    """
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a folder (give a file name)")
    for source in inputs:
        if os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source):
            raise UserError(f"{what} {path!r} is the input file {source!r}; writing there would destroy it")
    folder = os.path.dirname(os.path.abspath(path))
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
    """Raise UserError if ``path`` is missing (saying ``fix``), a folder, or empty."""
    if not os.path.exists(path):
        raise UserError(f"{what} {path!r} does not exist ({fix})")
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a folder, not a file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{what} {path!r} is empty (0 bytes)")
