"""CLIP embedders as FiftyOne models: image/text embeddings, text prompts for similarity search, zero-shot logits.

One class, `ClipEmbedder`, wraps any backend from `plugins/clip_backends.py`. Its two zoo-loadable
faces, `OpenClipEmbedder` and `TransformersClipEmbedder`, take their `<Class>Config` from a
FiftyOne zoo manifest entry (see `plugins/clip_zoo.py`), so similarity indexes can store a model
*name* and text search works in any process. `load_clip_model(spec)` is the one way in from code.
"""

from __future__ import annotations

import logging
import os

import eta.core.config as etac
import fiftyone as fo
import fiftyone.core.models as fom
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fiftyone_diffusion.errors import InputError
from fiftyone_diffusion.plugins.clip_backends import OpenClipBackend, TransformersClipBackend
from fiftyone_diffusion.plugins.clip_digit import DIGIT_CLIP, SHIPPED_DIGIT_CLIP, captions
from fiftyone_diffusion.plugins.devices import fast_dtype, resolve_device

logger = logging.getLogger(__name__)
DEFAULT_HF_CLIP = "openai/clip-vit-base-patch32"
_CACHE: dict[tuple, ClipEmbedder] = {}


class _ClipConfigBase(etac.Config):
    def _parse_common(self, d: dict) -> None:
        self.device = self.parse_string(d, "device", default="auto")
        self.precision = self.parse_string(d, "precision", default="auto")
        self.classes = self.parse_array(d, "classes", default=None)
        self.templates = self.parse_array(d, "templates", default=None)
        self.temperature = self.parse_number(d, "temperature", default=None)


class OpenClipEmbedderConfig(_ClipConfigBase):
    """`clip_model`: "digit-clip", an open_clip name (with `pretrained` tag or checkpoint) or a local dir."""

    def __init__(self, d: dict):
        self.clip_model = self.parse_string(d, "clip_model", default=DIGIT_CLIP)
        self.pretrained = self.parse_string(d, "pretrained", default=None)
        self._parse_common(d)


class TransformersClipEmbedderConfig(_ClipConfigBase):
    def __init__(self, d: dict):
        self.name_or_path = self.parse_string(d, "name_or_path", default=DEFAULT_HF_CLIP)
        self._parse_common(d)


class ClipEmbedder(fom.Model, fom.EmbeddingsMixin, fom.PromptMixin, fom.LogitsMixin, fom.TorchModelMixin):
    """A CLIP model: `embed_all` for images, `embed_prompts` for text, `predict_all` for zero-shot labels."""

    def __init__(self, config, backend):
        fom.LogitsMixin.__init__(self)
        self.config = config
        self.backend = backend
        self.device = resolve_device(config.device)
        self.dtype = _choose_dtype(backend, self.device, config.precision)
        self._preprocess = True
        self._class_embeddings: torch.Tensor | None = None

    # --- FiftyOne model interface
    @property
    def media_type(self) -> str:
        return "image"

    @property
    def ragged_batches(self) -> bool:
        return False

    @property
    def transforms(self):
        return self.backend.transform

    @property
    def preprocess(self) -> bool:
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value: bool) -> None:
        self._preprocess = value

    @property
    def has_embeddings(self) -> bool:
        return True

    @property
    def can_embed_prompts(self) -> bool:
        return True

    @property
    def has_logits(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def classes(self) -> list[str] | None:
        return self.config.classes

    def _to_batch(self, args) -> torch.Tensor:
        if isinstance(args, torch.Tensor):
            return args if args.ndim == 4 else args[None]
        items = []
        for a in args:
            if isinstance(a, torch.Tensor) and not self._preprocess:
                items.append(a)
                continue
            if isinstance(a, np.ndarray):
                a = Image.fromarray(a)
            if isinstance(a, torch.Tensor):
                a = Image.fromarray(a.permute(1, 2, 0).cpu().numpy())
            from fiftyone_diffusion.brain.image_loading import _to_rgb

            items.append(self.backend.transform(_to_rgb(a)))
        return torch.stack(items)

    @torch.no_grad()
    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings (float32, on CPU) of a preprocessed batch."""
        x = x.to(self.device, self.dtype)
        return F.normalize(self.backend.encode_images(x), dim=-1).float().cpu()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.backend.encode_texts(list(texts)), dim=-1).float().cpu()

    def embed(self, arg) -> np.ndarray:
        return self.embed_all([arg])[0]

    def embed_all(self, args) -> np.ndarray:
        return self.embed_images(self._to_batch(args)).numpy()

    def embed_prompt(self, prompt: str) -> np.ndarray:
        return self.embed_prompts([prompt])[0]

    def embed_prompts(self, prompts: list[str]) -> np.ndarray:
        return self.embed_texts(prompts).numpy()

    def get_embeddings(self):
        raise NotImplementedError("use embed_all(); this model does not cache embeddings")

    # --- zero-shot classification
    def set_classes(self, classes: list[str], templates: list[str] | None = None) -> None:
        self.config.classes, self.config.templates = list(classes), templates
        self._class_embeddings = None

    def class_embeddings(self) -> torch.Tensor:
        """(C, D): per class, the mean of its normalised template embeddings, normalised again."""
        if not self.config.classes:
            raise InputError("zero-shot classification needs classes")
        if self._class_embeddings is None:
            rows = [F.normalize(self.embed_texts(captions(c, self.config.templates)).mean(0), dim=-1)
                    for c in self.config.classes]
            self._class_embeddings = torch.stack(rows)
        return self._class_embeddings

    def logits_for(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarities scaled by 1/temperature (the model's learned one unless configured)."""
        scale = 1.0 / self.config.temperature if self.config.temperature else self.backend.logit_scale
        return scale * image_embeddings @ self.class_embeddings().T

    def to_labels(self, logits: torch.Tensor, store_logits: bool | None = None) -> list[fo.Classification]:
        probs = logits.softmax(dim=-1)
        keep = self.store_logits if store_logits is None else store_logits
        out = []
        for row, p in zip(logits.numpy(), probs.numpy(), strict=True):
            k = int(p.argmax())
            out.append(fo.Classification(label=self.config.classes[k], confidence=float(p[k]),
                                         logits=row.astype(float).tolist() if keep else None))
        return out

    def predict(self, arg) -> fo.Classification:
        return self.predict_all([arg])[0]

    def predict_all(self, args) -> list[fo.Classification]:
        return self.to_labels(self.logits_for(self.embed_images(self._to_batch(args))))


class OpenClipEmbedder(ClipEmbedder):
    """open_clip CLIP: digit-clip, any open_clip name + `pretrained` tag/checkpoint, or a `local-dir` folder."""

    def __init__(self, config: OpenClipEmbedderConfig):
        name, pretrained = _resolve_open_clip(config.clip_model, config.pretrained)
        super().__init__(config, OpenClipBackend(name, pretrained))


class TransformersClipEmbedder(ClipEmbedder):
    """transformers `CLIPModel`: a hub id (offline: from the cache) or a local `save_pretrained` folder."""

    def __init__(self, config: TransformersClipEmbedderConfig):
        super().__init__(config, TransformersClipBackend(config.name_or_path))


def _resolve_open_clip(model_name: str, pretrained: str | None) -> tuple[str, str | None]:
    if model_name == DIGIT_CLIP and not pretrained:
        if not os.path.isfile(os.path.join(SHIPPED_DIGIT_CLIP, "open_clip_config.json")):
            raise InputError(f"digit-clip weights are missing in {SHIPPED_DIGIT_CLIP}; run `fiftyone-diffusion "
                             "train-clip` to create them")
        return f"local-dir:{SHIPPED_DIGIT_CLIP}", None
    if os.path.isdir(model_name):
        return f"local-dir:{os.path.abspath(model_name)}", None
    return model_name, pretrained


def _choose_dtype(backend, device: torch.device, precision: str) -> torch.dtype:
    """`auto`: the device's fast dtype (weights cast, no autocast) if a probe forward works; else fp32."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise InputError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) or fast_dtype(device)
    backend.cast(dtype, device)
    if dtype != torch.float32:
        try:
            with torch.no_grad():
                probe = torch.zeros(1, 3, backend.image_size, backend.image_size, device=device, dtype=dtype)
                backend.encode_images(probe)
                backend.encode_texts(["a probe"])
        except RuntimeError as e:
            logger.warning("%s inference failed (%s); falling back to fp32", dtype, e)
            dtype = torch.float32
            backend.cast(dtype, device)
    return dtype


def model_spec(model: str | ClipEmbedder | None = None, pretrained: str | None = None) -> tuple[str, dict]:
    """(zoo name, zoo kwargs) for a model spec: what a similarity index stores to reload the model anywhere.

    Specs: "digit-clip"; "open_clip:<name>" (+ `pretrained` tag or checkpoint path); an open_clip local
    dir; "hf:<id>" / "<org>/<name>" hub id or a transformers folder.
    """
    from fiftyone_diffusion.plugins.clip_zoo import GENERIC_OPEN_CLIP, GENERIC_TRANSFORMERS

    if isinstance(model, ClipEmbedder):
        if isinstance(model.config, TransformersClipEmbedderConfig):
            return GENERIC_TRANSFORMERS, {"name_or_path": model.config.name_or_path}
        if model.config.clip_model == DIGIT_CLIP and not model.config.pretrained:
            return DIGIT_CLIP, {}
        return GENERIC_OPEN_CLIP, {"clip_model": model.config.clip_model, "pretrained": model.config.pretrained}
    spec = model or DIGIT_CLIP
    if spec == DIGIT_CLIP and not pretrained:
        return DIGIT_CLIP, {}
    if spec.startswith("open_clip:"):
        return GENERIC_OPEN_CLIP, {"clip_model": spec.split(":", 1)[1], "pretrained": _abs(pretrained)}
    if spec.startswith("hf:"):
        return GENERIC_TRANSFORMERS, {"name_or_path": spec[3:]}
    if os.path.isdir(spec):
        path = os.path.abspath(spec)
        if os.path.isfile(os.path.join(path, "open_clip_config.json")):
            return GENERIC_OPEN_CLIP, {"clip_model": path, "pretrained": None}
        if os.path.isfile(os.path.join(path, "config.json")):
            return GENERIC_TRANSFORMERS, {"name_or_path": path}
        raise InputError(f"{spec} holds neither open_clip_config.json (open_clip) nor config.json (transformers)")
    import open_clip

    if spec in open_clip.list_models():
        return GENERIC_OPEN_CLIP, {"clip_model": spec, "pretrained": _abs(pretrained)}
    if "/" in spec:
        return GENERIC_TRANSFORMERS, {"name_or_path": spec}
    raise InputError(f"unknown CLIP model {spec!r}: use digit-clip, open_clip:<name>, an open_clip or transformers "
                     "folder, or a hub id such as openai/clip-vit-base-patch32")


def _abs(path: str | None) -> str | None:
    return os.path.abspath(path) if path and os.path.exists(path) else path


def load_clip_model(model: str | ClipEmbedder | None = None, pretrained: str | None = None, device: str = "auto",
                    precision: str = "auto") -> ClipEmbedder:
    """The CLIP model for a spec (see `model_spec`), loaded once per process through the zoo entry."""
    if isinstance(model, ClipEmbedder):
        return model
    zoo_name, kwargs = model_spec(model, pretrained)
    key = (zoo_name, tuple(sorted(kwargs.items())), device, precision)
    if key not in _CACHE:
        from fiftyone_diffusion.plugins.clip_zoo import load_from_zoo

        _CACHE[key] = load_from_zoo(zoo_name, device=device, precision=precision, **kwargs)
    return _CACHE[key]
