"""Judging generated digits: the shipped split, the Frechet distance, precision and recall, the judge itself."""

import json
import math
import os

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from conftest import REPO
from ddpm.data import DIGIT_SPLITS, digits
from ddpm.metrics import cosine_similarity, nearest_cosine_similarity
from ddpm.quality import (JUDGE_PATH, class_accuracy, class_counts, digit_quality, frechet_distance, judge,
                          judge_held_out_accuracy, load_judge, precision_recall)

JUDGE_RECORD = os.path.join(REPO, "model_ckpt", "digit_classifier.json")


# ---- the split -------------------------------------------------------------------------------

def test_the_split_is_disjoint_balanced_and_covers_the_sheet():
    images, labels = digits()
    assert images.shape == (5000, 3, 28, 28) and images.min() == -1 and images.max() == 1
    parts = list(DIGIT_SPLITS.values())
    assert sorted(i for part in parts for i in part) == list(range(5000))  # every digit in exactly one part
    for name, part in DIGIT_SPLITS.items():
        part_images, part_labels = digits(name)
        assert torch.equal(part_images, images[part.start : part.stop])
        assert torch.bincount(part_labels).tolist() == [len(part) // 10] * 10, name
    s1, s2 = digits("S1")[0].flatten(1), digits("S2")[0].flatten(1)
    assert not (torch.cdist(s1, s2) == 0).any()  # not one digit of S1 appears in S2, even as a copy


def test_the_first_digits_of_a_half_hold_every_class():
    assert len(set(digits("S1")[1][:64].tolist())) == 10


# ---- the Frechet distance --------------------------------------------------------------------

def gaussian_cloud(mean, cov, count, seed):
    root = torch.linalg.cholesky(cov)
    draws = torch.randn(count, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return mean + draws @ root.T


def test_the_frechet_distance_of_diagonal_gaussians_has_its_closed_form():
    """For diagonal covariances, FD = |mu_a - mu_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    var_a = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    var_b = torch.tensor([9.0, 1.0, 1.0], dtype=torch.float64)
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    a, b = gaussian_cloud(mu_a, torch.diag(var_a), 200_000, 0), gaussian_cloud(mu_b, torch.diag(var_b), 200_000, 1)
    expected = float(((mu_a - mu_b) ** 2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum())  # 5 + 4 + 1 + 0.25
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_the_frechet_distance_equals_the_textbook_formula_on_correlated_gaussians():
    """Against tr(S_a + S_b - 2 (S_a S_b)^(1/2)) with the matrix square root taken another way (Denman-Beavers)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 1
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    y, z = cov_a @ cov_b, torch.eye(6, dtype=torch.float64)  # Denman-Beavers: y -> (S_a S_b)^(1/2)
    for _ in range(60):
        y, z = (y + torch.linalg.inv(z)) / 2, (z + torch.linalg.inv(y)) / 2
    direct = float(((a.mean(0) - b.mean(0)) ** 2).sum() + torch.trace(cov_a + cov_b - 2 * y))
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-9)


def test_the_frechet_distance_of_a_cloud_to_itself_is_zero_and_it_is_symmetric():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 5, generator=g), torch.randn(300, 5, generator=g) * 2
    assert abs(frechet_distance(a, a)) < 1e-9
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


# ---- precision and recall --------------------------------------------------------------------

def test_precision_and_recall_of_a_cloud_against_itself_are_one_and_of_far_clouds_zero():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(200, 4, generator=g)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)


def test_a_collapsed_generator_has_precision_but_no_recall():
    """Every sample at the centre of the real cloud: each is like a real point (precision 1), but the
    samples' balls have radius 0, so they cover no real point (recall 0): mode collapse."""
    real = torch.randn(300, 3, generator=torch.Generator().manual_seed(3))
    collapsed = torch.zeros(300, 3)
    assert precision_recall(real, collapsed) == (1.0, 0.0)


def test_precision_counts_samples_inside_the_real_k_nearest_neighbour_balls():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])  # k = 3: radii 3, 2, 2, 3 and 9 (10 reaches 1)
    fake = torch.tensor([[1.5], [2.5], [20.0], [30.0]])
    precision, _ = precision_recall(real, fake, k=3)
    assert precision == 0.5  # 1.5 and 2.5 lie inside; 20 lies 10 from the point 10, whose radius is 9


# ---- similarity of images ---------------------------------------------------------------------

def test_cosine_similarity_compares_strokes_on_the_unit_scale():
    paper = -torch.ones(1, 3, 8, 8)
    left, right = paper.clone(), paper.clone()
    left[..., :, :4], right[..., :, 4:] = 1, 1  # ink on disjoint halves
    assert float(cosine_similarity(left, right)) == pytest.approx(0.0)
    faint = paper.clone()
    faint[..., :, :4] = 0  # the same strokes, half as bright
    assert float(cosine_similarity(left, faint)) == pytest.approx(1.0)
    both = torch.cat([left, right])
    assert nearest_cosine_similarity(torch.cat([faint, right]), both).tolist() == pytest.approx([1.0, 1.0])


# ---- the shipped judge ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier():
    return load_judge(os.path.join(REPO, JUDGE_PATH))


@pytest.fixture(scope="module")
def held_out():
    return digits("held_out")[0]


def test_the_judge_reads_held_out_digits_as_its_record_says(classifier):
    images, labels = digits("held_out")
    accuracy = class_accuracy(classifier, images, labels)
    record = json.load(open(JUDGE_RECORD))
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(record["held_out_accuracy"], abs=1e-4)
    assert judge_held_out_accuracy() == record["held_out_accuracy"]  # what the guidance sweep draws as the ceiling
    assert "cpu" in record["machine"] and "torch" in record["machine"]


def test_real_digits_score_well_and_noise_scores_badly(classifier, held_out):
    real = digits("S2")[0][:500]
    quality = digit_quality(classifier, real, held_out, digits("S1")[0][:500])
    assert quality["fld"] < 15 and quality["precision"] > 0.8 and quality["recall"] > 0.8
    assert quality["real_fld"] < 15
    truth = class_counts(digits("S2")[1][:500])
    assert sum(abs(a - b) for a, b in zip(quality["class_counts"], truth)) <= 20  # the judge names the digits
    noise = torch.rand(500, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noisy = digit_quality(classifier, noise, held_out, real)
    assert noisy["fld"] > 30 * quality["fld"] and noisy["recall"] == 0.0


def test_blur_and_added_noise_raise_the_fld_step_by_step(classifier, held_out):
    reference, images = held_out[500:], held_out[:500]
    ref = judge(classifier, reference)[0]

    def fld(x):
        return frechet_distance(judge(classifier, x)[0], ref)

    blurred = [fld(gaussian_blur(images, 2 * math.ceil(3 * s) + 1, s)) for s in (0.4, 0.8, 1.2, 1.6)]
    g = torch.Generator().manual_seed(0)
    noised = [fld((images + s * torch.randn(images.shape, generator=g)).clamp(-1, 1)) for s in (0.2, 0.4, 0.6, 0.8)]
    for curve in (blurred, noised):
        assert all(later > earlier for earlier, later in zip([fld(images)] + curve, curve))
