"""A real CLIP BPE tokenizer, built offline from the vocabulary file that ships inside open_clip.

OpenAI's CLIP tokenizer (used by open_clip, transformers' CLIPTokenizer and SDXL's text
encoders) is byte-level BPE over `bpe_simple_vocab_16e6.txt.gz`: 256 byte symbols, the same with
an end-of-word marker, 48,894 merges, and the two special tokens. This writes the
`vocab.json` / `merges.txt` pair that `transformers.CLIPTokenizer` loads.
"""

from __future__ import annotations

import gzip
import json
import os

NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP mapping of the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def bpe_vocab_file() -> str:
    import open_clip

    return os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")


def write_clip_tokenizer_files(folder: str) -> tuple[str, str]:
    """Write vocab.json and merges.txt (49,408 tokens) to `folder`; returns their paths."""
    with gzip.open(bpe_vocab_file(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def build_clip_tokenizer(folder: str, model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A `transformers.CLIPTokenizer` saved to `folder` (loadable with `from_pretrained(folder)`)."""
    from transformers import CLIPTokenizer

    vocab_path, merges_path = write_clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(vocab_path, merges_path, model_max_length=model_max_length, pad_token=pad_token)
    tokenizer.save_pretrained(folder)
    return tokenizer
