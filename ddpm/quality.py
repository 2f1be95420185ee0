"""How good are generated digits? The judge's features, the Frechet distance, precision and recall, the classes.

A sample that is not a copy (metrics.nearest_training_images) may still be a
blur or a smudge. To tell, the samples and real digits that no model was
trained on (the held-out part of data/, data.DIGIT_SPLITS) are passed through
the judge, a small classifier trained on labelled digits
(models/digit_classifier.py, trained by experiments/digit_classifier.py), and
compared in its penultimate features f (84 numbers per image):

    FLD = |mu_s - mu_r|^2 + tr(S_s + S_r - 2 (S_s S_r)^(1/2))

the Frechet distance between Gaussians fitted to the two clouds (Heusel et
al. 2017, eq. 6: FID with Inception swapped for LeNet, hence "FLD"); and

    precision = share of samples inside the real digits' k-NN balls    (is each sample like some real digit?)
    recall    = share of real digits inside the samples' k-NN balls    (is each real digit like some sample?)

with k = 3 (Kynkaanniemi et al. 2019, sec. 3): a ball around each point
reaches its k-th nearest neighbour in its own cloud. The judge also says which
digit each sample is, so the class histogram shows whether every digit is drawn.

These numbers only compare like with like: the same judge and the same number
of images. FLD is biased upwards by a small sample, so a value means something
beside the real-against-real value of the same size, which is always reported
with it (``digit_quality``).
"""

import os

import torch

from models.digit_classifier import DigitClassifier

from .checkpoint import weights_digest
from .errors import UserError
from .files import atomic_write, check_readable_file

JUDGE_NAME = "model_ckpt/digit_classifier.pth"  # the shipped judge, as the docs name it
JUDGE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), JUDGE_NAME)  # from anywhere
JUDGE_FORMAT = "ddpm-demo-digit-classifier"
K_NEAREST = 3  # Kynkaanniemi et al. 2019: k = 3


def judge_input(images):
    """Images as the judge takes them: (B, C, 28, 28) in [-1, 1] -> (B, 1, 28, 28), the mean of the channels."""
    return images.float().mean(dim=1, keepdim=True)


def save_judge(path, model, record):
    """Write the trained classifier, its config, a digest of its weights and its training ``record``, atomically."""
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    checkpoint = {"format": JUDGE_FORMAT, "version": 1, "model_config": dict(model.config), "model": state,
                  "model_sha256": weights_digest(state), "train": dict(record)}
    with atomic_write(path, "checkpoint") as tmp:
        torch.save(checkpoint, tmp)


def _read_judge(path):
    """The judge's checkpoint dict, its file, format and weights checked; UserError, in plain words, otherwise."""
    check_readable_file(path, "digit classifier", "train it with python experiments/digit_classifier.py")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise UserError(f"digit classifier {path!r} cannot be read ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != JUDGE_FORMAT:
        raise UserError(f"{path!r} is not a digit classifier of this project (no format {JUDGE_FORMAT!r})")
    if weights_digest(checkpoint["model"]) != checkpoint.get("model_sha256"):
        raise UserError(f"digit classifier {path!r} is corrupted: its weights do not match their SHA-256 digest")
    return checkpoint


def load_judge(path=JUDGE_PATH):
    """The trained digit classifier, in eval mode on the CPU; UserError if the file is missing or not one."""
    checkpoint = _read_judge(path)
    model = DigitClassifier(**checkpoint["model_config"])
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def judge_held_out_accuracy(path=JUDGE_PATH):
    """The judge's own accuracy on the held-out digits, from its training record: the most a generator can score."""
    return _read_judge(path)["train"]["held_out_accuracy"]


@torch.no_grad()
def judge(classifier, images, batch=1000):
    """The judge's view of (N, C, 28, 28) images in [-1, 1]: (features (N, 84) float64, predicted digits (N,))."""
    features, predicted = [], []
    for part in images.split(batch):
        x = judge_input(part.cpu())
        f = classifier.features(x)
        features.append(f.double())
        predicted.append(classifier.fc3(f).argmax(dim=1))
    return torch.cat(features), torch.cat(predicted)


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to two clouds of features, (N, D) and (M, D).

    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)): the last trace is
    tr((S_a S_b)^(1/2)), taken on a symmetric matrix so that eigenvalues give it exactly (no sqrtm).
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(dim=0), b.mean(dim=0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)  # (D, D), with the 1/(N - 1) of the unbiased estimate
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T  # S_a^(1/2)
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a)  # eigenvalues of S_a^(1/2) S_b S_a^(1/2), all >= 0
    cross = middle.clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def precision_recall(real, fake, k=K_NEAREST):
    """Improved precision and recall (Kynkaanniemi et al. 2019) of features ``fake`` against ``real``.

    Each point's ball reaches its k-th nearest neighbour within its own set (itself excluded).
    precision = share of fake points inside at least one real ball; recall = share of real points
    inside at least one fake ball. Both in [0, 1]; real against itself gives 1 and 1.
    """

    def radii(points):
        if len(points) <= k:
            raise ValueError(f"precision and recall with k = {k} need more than {k} points in each set")
        distances = torch.cdist(points, points)  # (N, N), zero on the diagonal
        return distances.kthvalue(k + 1, dim=1).values  # the k-th neighbour, the point itself being the first

    def covered(points, centres, centre_radii):
        return (torch.cdist(points, centres) <= centre_radii[None, :]).any(dim=1).double().mean()

    real, fake = real.double(), fake.double()
    return float(covered(fake, real, radii(real))), float(covered(real, fake, radii(fake)))


def class_counts(predicted, num_classes=10):
    """How many images the judge called 0, 1, ..., 9: a list of ``num_classes`` ints."""
    return torch.bincount(predicted.cpu(), minlength=num_classes).tolist()


def accuracy(predicted, asked):
    """The share of the judge's readings ``predicted`` that are the digit each sample was ``asked`` to be, (N,) each."""
    return float((predicted.cpu() == asked.cpu()).double().mean())


def class_accuracy(classifier, samples, asked):
    """The share of ``samples`` that the judge reads as the digit each was asked to be (``asked``, (N,) digits)."""
    return accuracy(judge(classifier, samples)[1], asked)


def digit_quality(classifier, samples, reference, real, asked=None):
    """Judge ``samples`` against the ``reference`` digits, beside real digits judged the same way.

    ``real`` are real digits of the same number as the samples, which the model never saw: their
    FLD, precision and recall against ``reference`` are what a perfect generator would score at
    this sample size. ``asked``, (N,) digits, are the classes the samples were asked to show: then
    "accuracy" says how many the judge reads as asked. Returns a dict of plain numbers (rounded
    for the record).
    """
    if len(real) != len(samples):
        raise ValueError(f"compare like with like: {len(samples)} samples but {len(real)} real digits")
    ref_features, _ = judge(classifier, reference)
    fake_features, fake_classes = judge(classifier, samples)
    real_features, _ = judge(classifier, real)
    precision, recall = precision_recall(ref_features, fake_features)
    real_precision, real_recall = precision_recall(ref_features, real_features)
    return {"fld": round(frechet_distance(fake_features, ref_features), 3),
            "precision": round(precision, 4), "recall": round(recall, 4),
            "real_fld": round(frechet_distance(real_features, ref_features), 3),
            "real_precision": round(real_precision, 4), "real_recall": round(real_recall, 4),
            "class_counts": class_counts(fake_classes),
            **({"accuracy": round(accuracy(fake_classes, asked), 4)} if asked is not None else {})}
