"""The offline CLIP tokenizer matches open_clip's own tokenizer."""

from __future__ import annotations

import open_clip

from fiftyone_diffusion.plugins.clip_tokenizer import build_clip_tokenizer


def test_tokenizer_matches_open_clip(tmp_path):
    from transformers import CLIPTokenizer

    build_clip_tokenizer(str(tmp_path))
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == 49408
    reference = open_clip.get_tokenizer("ViT-B-32")
    for text in ["a handwritten 7", "the digit seven", "A photo of the number 7!", "an astronaut riding a horse"]:
        ours = tok(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        theirs = reference([text])[0].tolist()
        n = theirs.index(49407) + 1
        assert ours[:n] == theirs[:n]
