"""CLIP backends behind one interface: open_clip (names, tags, checkpoints, local dirs) and transformers CLIP.

Each backend exposes `encode_images(x)`, `encode_texts(texts)` (both unnormalised, float32 out),
`transform` (PIL RGB -> normalised tensor), `image_size`, `logit_scale` and `cast(dtype)`.
"""

from __future__ import annotations

import os

import torch
from torchvision import transforms as T

from fiftyone_diffusion.errors import InputError


def _torchvision_transform(size: int, crop: int, mean, std, interpolation: str = "bicubic") -> T.Compose:
    mode = T.InterpolationMode.BICUBIC if interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    return T.Compose([T.Resize(size, interpolation=mode, antialias=True), T.CenterCrop(crop), T.ToTensor(),
                      T.Normalize(mean, std)])


class _ClipBackend:
    """What both backends share: a CLIP `model` with a learned `logit_scale`."""

    model: torch.nn.Module

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def cast(self, dtype: torch.dtype, device: torch.device) -> None:
        self.model.to(device=device, dtype=dtype)


class OpenClipBackend(_ClipBackend):
    kind = "open_clip"

    def __init__(self, model_name: str, pretrained: str | None = None, device: torch.device | None = None):
        import open_clip

        from fiftyone_diffusion.plugins.clip_digit import register_open_clip_config

        register_open_clip_config()
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                        device=device)
        except (RuntimeError, FileNotFoundError, ValueError) as e:
            raise InputError(f"cannot load open_clip model {model_name!r} (pretrained={pretrained!r}): {e}") from None
        self.model = model.eval()
        self.transform = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = model.visual.image_size
        self.image_size = size[0] if isinstance(size, tuple | list) else int(size)
        self.name = model_name if pretrained is None else f"{model_name}@{pretrained}"

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x).float()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(texts).to(device)).float()


class TransformersClipBackend(_ClipBackend):
    kind = "transformers"

    def __init__(self, name_or_path: str, device: torch.device | None = None):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        local = os.path.isdir(name_or_path)
        try:
            self.model = CLIPModel.from_pretrained(name_or_path, local_files_only=local or None).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(name_or_path)
            proc = CLIPImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot load transformers CLIP {name_or_path!r}: {e}") from None
        if device is not None:
            self.model.to(device)
        size = proc.size.get("shortest_edge") or proc.size.get("height")
        crop = proc.crop_size.get("height", size) if proc.do_center_crop else size
        self.transform = _torchvision_transform(size, crop, proc.image_mean, proc.image_std)
        self.image_size = crop
        self.name = name_or_path

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=x)).float()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        return _features(self.model.get_text_features(**tok)).float()


def _features(out) -> torch.Tensor:
    """transformers 5 may return a model output instead of a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    return getattr(out, "pooler_output", None) if getattr(out, "pooler_output", None) is not None else out[0]
