"""Training data: one image or a folder as a Dataset, the order of batches, the digits, and the same-data check.

One picture is the special case of a folder with one file: both become an
``ImageFiles`` data set, and the training loop draws its batches from it the
same way (``batch_stream``). With one image every batch is that image B
times, each copy noised at its own t.

    list_images(folder)         every image file under a folder, recursively, in sorted order
    ImageFiles(paths, size)     a Dataset of (3, size, size) tensors in [-1, 1]
    dataset_digest(root, paths) one SHA-256 naming exactly which files (and bytes) a model saw
    TrainingData(paths, size)   what a model learns, and how its checkpoint records it
    DigitsData(split, n)        the same for the first n shipped digits of one part of the split
    folder_classes(folder, ps)  the classes of a folder whose sub-folders are the classes (torchvision's ImageFolder)
    recorded_training_data(r)   the data a checkpoint names, found and checked unchanged
    batch_stream(...)           the endless sequence of index batches, epoch after epoch, per process
    digits(split)               the 5,000 MNIST digits shipped in data/ (or one part of the split), with labels
"""

import hashlib
import os
from functools import cached_property

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from .errors import UserError
from .files import file_sha256, special_kind
from .imaging import load_image, unit_to_signed

# A folder is decoded once, up front, into memory when its images fit in this many bytes;
# a bigger one is read file by file as the batches need them.
CACHE_BYTES = 2 * 2**30
DATA_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DIGITS_SHEET = os.path.join(DATA_FOLDER, "mnist.png")  # 5,000 MNIST digits, 100 per row, 28 x 28 px each
DIGITS_LABELS = os.path.join(DATA_FOLDER, "mnist_labels.txt")  # their labels, a row of 100 per sheet row
DIGITS_SIDE, DIGITS_COLUMNS = 28, 100
# The project's one split of the sheet (data/make_mnist_sheet.py): two disjoint training halves
# and a held-out part, each with every digit in equal numbers, as ranges of sheet positions.
DIGIT_SPLITS = {"S1": range(0, 2000), "S2": range(2000, 4000), "held_out": range(4000, 5000)}
TRAINING_HALVES = ("S1", "S2")


def other_half(half):
    """The training half a model of ``half`` never saw: real digits to set beside its samples."""
    return next(other for other in TRAINING_HALVES if other != half)


def image_extensions():
    """File endings Pillow can open (.png, .jpg, .webp, ...); other files in a folder are not images."""
    return {ext.lower() for ext in Image.registered_extensions()}


def list_images(folder):
    """Paths of every image file under ``folder``, recursively, sorted; hidden files and folders skipped."""
    if not os.path.isdir(folder):
        what = "does not exist" if not os.path.exists(folder) else "is a file, not a folder"
        raise UserError(f"--image_dir {folder!r} {what}")
    extensions = image_extensions()
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .ipynb_checkpoints, ...
        found += [os.path.join(root, name) for name in files
                  if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions]
    for path in found:  # reading a FIFO waits forever for a writer; a device never ends
        kind = special_kind(path)
        if kind is not None:
            raise UserError(f"--image_dir: {path!r} is {kind}, not an image file (move it out of {folder!r})")
    # sorted by the path inside the folder, so the order does not depend on the file system
    return sorted(found, key=lambda path: os.path.relpath(path, folder).split(os.sep))


def choose_images(folder, num_images=None):
    """The first ``num_images`` images of the folder (all of them if None); UserError if there are fewer."""
    paths = list_images(folder)
    if not paths:
        raise UserError(f"--image_dir {folder!r} holds no image files (.png, .jpg, .webp or another "
                        "kind Pillow reads, in it or any sub-folder)")
    if num_images is not None and num_images > len(paths):
        raise UserError(f"--num_images {num_images} is more than the {len(paths)} images found in {folder!r}")
    return paths[:num_images]


class ImageFiles(Dataset):
    """Image files as a Dataset: item i is paths[i] as a (3, size, size) float32 tensor in [-1, 1].

    Each file goes through imaging.load_image (upright, RGB, centre square, resized), so mixed
    sizes and modes (grayscale, RGBA, palette, 16-bit) all become the same kind of tensor. Every
    file is decoded once, here, so that an unreadable or truncated one is named before training
    starts, not hours into it. When the decoded images fit in CACHE_BYTES they are kept; otherwise
    each is decoded again when a batch needs it.
    """

    def __init__(self, paths, size, warn=None, cache_bytes=CACHE_BYTES):
        self.paths, self.size = list(paths), size
        keep = len(self.paths) * 3 * size * size * 4 <= cache_bytes
        enlarged = []  # files smaller than size, which load_image reports one by one
        kept = []
        for path in self.paths:  # streaming: where they are not kept, each decoded image is dropped at once
            image = load_image(path, size, warn=enlarged.append)[0]
            if keep:
                kept.append(image)
        self.images = torch.stack(kept) if keep else None  # (N, 3, size, size) when kept in memory
        if len(enlarged) == 1 and warn is not None:
            warn(enlarged[0])
        elif enlarged and warn is not None:
            warn(f"{len(enlarged)} of the {len(self.paths)} images are smaller than {size}x{size} px and "
                 f"are enlarged, so they will look soft ({enlarged[0]})")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        if self.images is not None:
            return self.images[index]
        return load_image(self.paths[index], self.size)[0]


class ImageTensors(Dataset):
    """Images already in memory, (N, 3, H, W) in [-1, 1], as a Dataset (the digits, in the experiment)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


class LabelledImages(Dataset):
    """A Dataset of images with a class each: item i is (dataset[i], labels[i]), what a conditional model learns."""

    def __init__(self, dataset, labels):
        if len(labels) != len(dataset):
            raise ValueError(f"{len(dataset)} images but {len(labels)} labels")
        self.dataset, self.labels = dataset, labels

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index], self.labels[index]


def dataset_digest(root, paths):
    """One SHA-256 over every file's path (relative to ``root``) and the SHA-256 of its bytes, in order.

    Two data sets get the same digest only if they hold the same files, under the same names, in
    the same order: what --resume checks before it continues a run.
    """
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{os.path.relpath(path, root)}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def folder_classes(folder, paths):
    """The classes of a folder whose sub-folders are the classes, as torchvision's ImageFolder reads it.

    pets/cat/1.jpg and pets/dog/a/2.png are a "cat" and a "dog": each image's class is the first
    sub-folder on its way from ``folder``, and the classes are those sub-folders' names in sorted
    order (hidden ones skipped). Returns (class names, (N,) int64 class of each of ``paths``).
    UserError for an image outside every class folder, a class with none of ``paths``, or fewer
    than two classes.
    """
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if len(names) < 2:
        raise UserError(f"--class_conditional needs at least two classes, one sub-folder of {folder!r} each "
                        f"(such as {os.path.join(folder, 'cat')} and {os.path.join(folder, 'dog')}); "
                        f"found {len(names)}")
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for path in paths:
        parts = os.path.relpath(path, folder).split(os.sep)
        if len(parts) == 1:
            raise UserError(f"--class_conditional: {path!r} lies in no class folder (move it into one of "
                            f"{', '.join(names)}, or leave it out of {folder!r})")
        labels.append(index[parts[0]])
    labels = torch.tensor(labels, dtype=torch.long)
    empty = missing_class(names, labels)
    if empty is not None:
        among = " among the first --num_images" if len(paths) < len(list_images(folder)) else ""
        raise UserError(f"--class_conditional: class {empty!r} ({os.path.join(folder, empty)}) has no images to "
                        f"learn{among} (add some, or remove the folder)")
    return names, labels


def missing_class(classes, labels):
    """The first of ``classes`` that no entry of ``labels`` (class indices) names, or None: a model cannot learn it."""
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    return next((name for name, count in zip(classes, counts) if count == 0), None)


class TrainingData:
    """What a model learns, one image or a folder's files, and how its checkpoint records them.

    ``record`` goes into the checkpoint's "data": for one image its path and SHA-256, for a
    folder its files (relative to the folder) and one digest of them all (dataset_digest).
    ``identity`` is that digest: two runs saw the same data exactly when their identities agree.
    ``names`` are the files as the checkpoint names them; ``dataset()`` decodes them.
    With ``class_conditional`` the folder's sub-folders are classes (folder_classes): ``classes``
    names them, in the record too, and ``labels`` gives each image's; otherwise both are None.
    """

    def __init__(self, paths, img_size, image_dir=None, class_conditional=False):
        self.paths, self.img_size, self.image_dir = list(paths), img_size, image_dir
        self.classes = self.labels = None
        if image_dir is not None:
            self.image_dir_absolute = os.path.abspath(image_dir)  # where it was, whatever the folder is later
            self.names = [os.path.relpath(path, image_dir) for path in self.paths]
            self.name = f"{len(self.paths)} images of {image_dir}"
            if class_conditional:
                self.classes, self.labels = folder_classes(image_dir, self.paths)
                self.name += f" in {len(self.classes)} classes"
        else:
            self.names = list(self.paths)
            self.name = self.paths[0]

    @cached_property
    def identity(self):
        """Reads every file once, when first asked: after dataset() has found any unreadable one."""
        if self.image_dir is not None:
            return dataset_digest(self.image_dir, self.paths)
        return file_sha256(self.paths[0])

    @property
    def record(self):
        """What the checkpoint's "data" says: the size, the files and their digest."""
        if self.image_dir is not None:
            return {"img_size": self.img_size, "image_dir": self.image_dir,
                    "image_dir_absolute": self.image_dir_absolute, "num_images": len(self.paths),
                    "files": self.names, "dataset_sha256": self.identity,
                    **({"classes": self.classes} if self.classes else {})}
        return {"img_size": self.img_size, "image_path": self.paths[0], "image_sha256": self.identity}

    def dataset(self, warn=None):
        """The images as an ImageFiles data set (decoded up front where they fit in memory)."""
        return ImageFiles(self.paths, self.img_size, warn=warn)


class DigitsData:
    """The first ``num_images`` shipped digits of one training half (``split``: "S1" or "S2"), as TrainingData has them.

    The checkpoint records the part, the count and one SHA-256 over the sheet and the labels, so a
    model of digits is found again (and checked unchanged) wherever the repository lies. With
    ``class_conditional`` the classes are the digits "0" ... "9" and ``labels`` the shipped labels.
    """

    image_dir = None

    def __init__(self, split, num_images=None, class_conditional=False):
        if split not in TRAINING_HALVES:
            raise UserError(f"the digits to train on are one of {', '.join(TRAINING_HALVES)}, not {split!r}")
        size = len(DIGIT_SPLITS[split])
        self.split, self.num_images, self.img_size = split, num_images or size, DIGITS_SIDE
        if not 1 <= self.num_images <= size:
            raise UserError(f"--num_images {self.num_images} is more than the {size} digits of {split}")
        self.paths = [DIGITS_SHEET, DIGITS_LABELS]  # the files a run reads, which no output may replace
        self.names = [f"{split} #{i}" for i in range(self.num_images)]  # a digit's place in its part
        self.name = f"the first {self.num_images} digits of {split} ({os.path.relpath(DIGITS_SHEET)})"
        self.classes = self.labels = None
        if class_conditional:
            self.classes = [str(digit) for digit in range(10)]
            self.labels = digits(split)[1][: self.num_images]
            empty = missing_class(self.classes, self.labels)
            if empty is not None:
                raise UserError(f"--class_conditional: the first {self.num_images} digits of {split} hold no {empty} "
                                "to learn (take more with --num_images)")
            self.name += ", with their labels"

    @cached_property
    def identity(self):
        digest = hashlib.sha256(f"{self.split}\0{self.num_images}\n".encode())
        for path in self.paths:
            digest.update(f"{file_sha256(path)}\n".encode())
        return digest.hexdigest()

    @property
    def record(self):
        return {"img_size": self.img_size, "digits": self.split, "num_images": self.num_images,
                "digits_sha256": self.identity, **({"classes": self.classes} if self.classes else {})}

    def dataset(self, warn=None):
        """The digits as a Dataset of (3, 28, 28) tensors in [-1, 1]."""
        return ImageTensors(digits(self.split)[0][: self.num_images])


def data_identity(trained_on):
    """The digest of what a checkpoint was trained on (its "data" record: a folder's, digits', or one image's)."""
    return trained_on.get("dataset_sha256") or trained_on.get("digits_sha256") or trained_on.get("image_sha256")


def check_same_data(trained_on, data, resumed=False, fix=None):
    """Raise UserError unless ``data`` (TrainingData) holds the very files and bytes that a checkpoint's
    "data" record ``trained_on`` names. ``resumed``: the checkpoint is a run about to continue."""
    if data_identity(trained_on) == data.identity:
        return
    if resumed:
        since = "the run started"
    else:
        since = "the model was trained on " + ("it" if isinstance(data, TrainingData) and data.image_dir is None
                                               else "them")
    if isinstance(data, DigitsData):
        message = f"the shipped digits ({', '.join(map(os.path.relpath, data.paths))}) have changed since {since}"
    elif data.image_dir is not None:
        message = (f"the images in {data.image_dir!r} have changed since {since} (files added, removed, renamed "
                   "or edited)")
    else:
        message = f"image {data.paths[0]!r} has changed since {since}"
    raise UserError(_with_fix(message + (", so it cannot continue exactly" if resumed else ""), fix))


def _with_fix(message, fix):
    """A user error's message, then how to fix it in brackets, if there is a word to say."""
    return message + (f" ({fix})" if fix else "")


def recorded_training_data(trained_on, fix=None):
    """The data a checkpoint was trained on, found where its "data" record says and checked unchanged.

    A folder is looked for at its path as typed in training, then at its absolute path. Returns
    TrainingData (DigitsData for the shipped digits), or raises UserError saying what is missing or
    changed (then ``fix``, if given).
    """
    if "digits" in trained_on:
        data = DigitsData(trained_on["digits"], trained_on["num_images"])
    elif "image_dir" in trained_on:
        places = (trained_on["image_dir"], trained_on.get("image_dir_absolute"))
        folder = next((place for place in places if place and os.path.isdir(place)), None)
        if folder is None:
            raise UserError(_with_fix(f"the model was trained on {trained_on['image_dir']!r}, which is not there", fix))
        data_paths = [os.path.join(folder, name) for name in trained_on["files"]]
        gone = next((path for path in data_paths if not os.path.isfile(path)), None)
        if gone is not None:
            raise UserError(_with_fix(f"the images in {folder!r} have changed since the model was trained on "
                                      f"them ({gone!r} is gone)", fix))
        data = TrainingData(data_paths, trained_on["img_size"], image_dir=folder)
    else:
        path = trained_on.get("image_path")
        if path is None:
            raise UserError(_with_fix("the checkpoint does not record the image it was trained on", fix))
        if not os.path.isfile(path):
            raise UserError(_with_fix(f"the model was trained on {path!r}, which is not there", fix))
        data = TrainingData([path], trained_on["img_size"])
    check_same_data(trained_on, data, fix=fix)
    return data


def per_process_batch(batch_size, world_size):
    """Images per step in each process: --batch_size counts the whole step, split evenly across processes."""
    if batch_size % world_size:
        raise UserError(f"--batch_size {batch_size} cannot be split evenly across {world_size} processes "
                        f"(choose a multiple of {world_size})")
    return batch_size // world_size


def batch_stream(num_items, batch_size, seed, rank=0, world_size=1, start_step=0):
    """Endless lists of dataset indices, ``batch_size`` per list, for process ``rank`` of ``world_size``.

    Epoch e is a permutation of the data set drawn from seed + e (DistributedSampler with
    set_epoch(e)), the same permutation in every process, which takes every world_size-th index
    of it: so in each epoch the processes see different images. Batches run on across epoch
    boundaries. The first ``start_step`` batches are skipped, so a resumed run draws the batches
    the stopped run would have drawn next.

    A pitfall of DistributedSampler: when the data set does not divide evenly among the processes,
    it pads the permutation with its own first images, so those images are seen twice that epoch
    (6 images on 4 processes: 8 slots, 2 repeated). With many images per epoch this is noise; with
    a handful it tilts the data, so keep N a multiple of the process count in small experiments.
    It draws from its own generator, never from the one that draws t and eps, so one image on one
    process draws exactly the noise it always drew.
    """
    sampler = DistributedSampler(range(num_items), num_replicas=world_size, rank=rank, shuffle=num_items > 1,
                                 seed=seed, drop_last=False)
    skip = start_step * batch_size
    epoch, batch = 0, []
    while True:
        sampler.set_epoch(epoch)
        if skip >= len(sampler):  # a whole epoch that was already used: no need to draw it
            skip -= len(sampler)
        else:
            for index in list(sampler)[skip:]:
                batch.append(index)
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            skip = 0
        epoch += 1


def digits(split=None):
    """The shipped MNIST digits of one part of the split (DIGIT_SPLITS; None: all 5,000), with their labels.

    Returns (images, labels): (N, 3, 28, 28) float32 in [-1, 1], white strokes on black, the grey
    copied to three channels like any other picture; and (N,) int64 digits 0 ... 9. In sheet order,
    so the first N of S1 are the same N digits every time. data/README.md says where they come from.
    """
    with Image.open(DIGITS_SHEET) as sheet:
        pixels = np.asarray(sheet.convert("L"), dtype=np.float32) / 255.0  # (rows * 28, 100 * 28)
    with open(DIGITS_LABELS, encoding="utf-8") as f:
        labels = torch.tensor([int(digit) for digit in "".join(f.read().split())])
    rows = pixels.shape[0] // DIGITS_SIDE
    tiles = pixels.reshape(rows, DIGITS_SIDE, DIGITS_COLUMNS, DIGITS_SIDE).transpose(0, 2, 1, 3)
    images = unit_to_signed(torch.from_numpy(tiles.reshape(-1, 1, DIGITS_SIDE, DIGITS_SIDE).copy()))
    if split is not None:
        part = DIGIT_SPLITS[split]
        images, labels = images[part.start : part.stop], labels[part.start : part.stop]
    return images.expand(-1, 3, -1, -1).contiguous(), labels
