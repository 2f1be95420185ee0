"""The judge: a small LeNet-style classifier of 28 x 28 digits, whose features measure generated digits.

    logits = DigitClassifier(x)              x: (B, 1, 28, 28) in [-1, 1] -> (B, 10)
    features = DigitClassifier.features(x)   the penultimate layer, (B, FEATURES)

It follows LeNet-5 (LeCun, Bottou, Bengio and Haffner 1998): two convolutions,
each followed by 2 x 2 pooling, then three fully connected layers, with ReLU
instead of the original squashing functions and max- instead of average-pooling:

    x (1, 28, 28) -> conv5x5 -> (C1, 28, 28) -> pool -> (C1, 14, 14)
                  -> conv5x5 -> (C2, 10, 10) -> pool -> (C2, 5, 5)
                  -> fc -> 120 -> fc -> 84 = features -> fc -> 10 logits

Inception networks judge photographs (FID, Heusel et al. 2017); on digits the
field uses a classifier trained on the digits themselves, and the same
statistics in its penultimate features (ddpm/quality.py). It is a network
and nothing more: how it is trained lives in experiments/digit_classifier.py.
"""

from torch import nn
import torch.nn.functional as F

FEATURES = 84  # LeNet-5's penultimate layer


class DigitClassifier(nn.Module):
    """LeNet-5 with ReLU and max-pooling; ``channels`` = (C1, C2), the widths of the two convolutions."""

    def __init__(self, channels=(6, 16), num_classes=10):
        super().__init__()
        c1, c2 = channels
        self.config = {"channels": [c1, c2], "num_classes": num_classes}
        self.conv1 = nn.Conv2d(1, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, FEATURES)
        self.fc3 = nn.Linear(FEATURES, num_classes)

    def features(self, x):
        """x: (B, 1, 28, 28) in [-1, 1] -> (B, FEATURES), the activations that feed the last layer."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, C1, 14, 14)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, C2, 5, 5)
        h = F.relu(self.fc1(h.flatten(1)))  # (B, 120)
        return F.relu(self.fc2(h))  # (B, 84)

    def forward(self, x):
        """x: (B, 1, 28, 28) in [-1, 1] -> (B, num_classes) logits."""
        return self.fc3(self.features(x))
