"""Robust image loading for embedding: odd modes converted, huge images decoded small, broken files reported.

`load_rgb(path, min_size)` returns an RGB PIL image whose shorter side is at least `min_size`
(when the source is that large). JPEGs are decoded at reduced size by the codec itself
(`Image.draft`: DCT scaling by 1/2, 1/4 or 1/8), so a 10000x10000 JPEG never materialises at
full size. Other formats are bounded by `MAX_PIXELS` and reduced right after decoding.
Any unreadable file raises `ImageLoadError` with a one-line reason.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

# Larger images are refused (PIL's own bomb limit is 2 x 89.5 MP); JPEGs are decoded reduced first
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
DRAFT_FORMATS = ("JPEG", "MPO")


class ImageLoadError(Exception):
    """A file that cannot be decoded into an image."""


def _to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Grayscale, 16-bit, float, palette, CMYK, alpha -> 8-bit RGB (alpha composited on `background`)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.float32)
        scale = 257.0 if im.mode.startswith("I;16") or a.max() > 255 else 1.0
        im = Image.fromarray(np.clip(a / scale + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "F":
        a = np.asarray(im)
        a = a * 255.0 if a.max() <= 1.0 else a
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        base = Image.new("RGB", im.size, background)
        base.paste(im, mask=im.getchannel("A"))
        return base
    return im.convert("RGB")


def load_rgb(path: str, min_size: int = 224, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, str]:
    """Open `path` as RGB, decoded no larger than needed; returns (image, decode path used)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                decode = "full"
                if im.format in DRAFT_FORMATS and min(w, h) >= 2 * min_size:
                    scale = min(w, h) / min_size
                    im.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
                    decode = f"jpeg-draft-1/{round(w / im.size[0])}" if im.size[0] < w else "full"
                if im.size[0] * im.size[1] > max_pixels:
                    raise ImageLoadError(f"{w}x{h} pixels is over the {max_pixels} pixel limit for this format")
                im.load()
                factor = min(im.size) // (2 * min_size)
                if factor >= 2:  # cheap box reduction before any resampling
                    im = im.reduce(factor)
                    decode += f"+reduce-{factor}"
                return _to_rgb(im), decode
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError("file not found") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"over the pixel limit for decoding: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError("not an image (unrecognised or empty file)") from None
    except Exception as e:  # truncated / corrupt data: OSError, SyntaxError, ValueError, zlib errors, ...
        raise ImageLoadError(f"cannot decode: {e.__class__.__name__}: {e}") from None


