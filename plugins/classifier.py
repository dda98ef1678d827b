"""A small CNN that classifies 28x28 handwritten digits; the judge of generated samples."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fiftyone_diffusion.errors import InputError

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
SHIPPED_CLASSIFIER = os.path.join(WEIGHTS_DIR, "digit-classifier")
CLASSES = [str(i) for i in range(10)]


class DigitClassifier(nn.Module):
    """conv-conv-pool x2, then a 128-d penultimate layer (used for Frechet distances)."""

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            block(1, width), block(width, 2 * width), nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, feature_dim), nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(self.config, f, indent=2)

    @classmethod
    def load(cls, folder: str | None = None) -> DigitClassifier:
        folder = folder or SHIPPED_CLASSIFIER
        path = os.path.join(folder, "model.safetensors")
        if not os.path.isfile(path):
            raise InputError(f"no digit classifier at {folder} (expected model.safetensors and config.json)")
        with open(os.path.join(folder, "config.json")) as f:
            model = cls(**json.load(f))
        model.load_state_dict(load_file(path))
        return model.eval()


def to_classifier_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) or float [0, 1] (N, 1, H, W) -> normalised (N, 1, 28, 28) float."""
    x = torch.as_tensor(np.array(images, copy=True)) if isinstance(images, np.ndarray) else images
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if x.ndim == 3:
        x = x[:, None]
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-1] != 28:
        x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    return (x - 0.1307) / 0.3081


@torch.no_grad()
def classify(model: DigitClassifier, images, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and penultimate features for images (uint8 or [0, 1] floats)."""
    x = to_classifier_input(images)
    device = next(model.parameters()).device
    logits, feats = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i : i + batch_size].to(device))
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
    return torch.cat(logits), torch.cat(feats)
