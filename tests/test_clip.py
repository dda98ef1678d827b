"""CLIP embedders, embeddings, similarity search (also from a fresh process), zero-shot labels, train-clip.

Tiny open_clip and transformers CLIPs are built in tmp folders and load through the same code as
real checkpoints; the tokenizer is the real CLIP BPE one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fiftyone_diffusion.errors import InputError

CLI = os.path.join(os.path.dirname(sys.executable), "fiftyone-diffusion")
TINY_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 1, "width": 32,
                                            "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_open_clip(random_open_clip) -> str:
    return random_open_clip("tiny-open-clip", TINY_CFG)


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from fiftyone_diffusion.plugins.clip_tokenizer import build_clip_tokenizer

    folder = str(tmp_path_factory.mktemp("tiny-hf-clip"))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    build_clip_tokenizer(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _odd_and_broken(folder) -> tuple[list[str], list[str]]:
    os.makedirs(folder, exist_ok=True)
    odd = {
        "gray.png": Image.new("L", (50, 40), 120), "rgba.png": Image.new("RGBA", (40, 40), (9, 9, 9, 100)),
        "pal.png": Image.new("RGB", (40, 40), (0, 0, 255)).convert("P"),
        "deep16.png": Image.fromarray(np.full((40, 40), 40000, np.uint16)),
        "cmyk.jpg": Image.new("CMYK", (60, 40), (0, 255, 255, 0)),
    }
    for name, im in odd.items():
        im.save(os.path.join(folder, name))
    Image.new("RGB", (300, 300), (1, 2, 3)).save(os.path.join(folder, "whole.jpg"))
    with open(os.path.join(folder, "whole.jpg"), "rb") as f:
        jpg = f.read()
    broken = {"truncated.jpg": jpg[: len(jpg) // 2], "corrupt.png": b"\x89PNG\r\n\x1a\n" + os.urandom(300),
              "empty.jpg": b"", "text.jpg": b"not an image at all\n"}
    for name, data in broken.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    paths = lambda names: [os.path.join(folder, n) for n in names]  # noqa: E731
    return paths(odd), paths(broken) + [os.path.join(folder, "missing.png")]


@pytest.fixture
def digits(dataset_name, mnist_dir, tmp_path):
    """20 MNIST test digits + 5 odd-but-valid images + 5 broken files."""
    import fiftyone as fo

    from fiftyone_diffusion import load_mnist

    ds = load_mnist(dataset_name, "test", max_samples=20, data_dir=mnist_dir, media_dir=str(tmp_path / "media"))
    odd, broken = _odd_and_broken(str(tmp_path / "odd"))
    ds.add_samples([fo.Sample(filepath=p, tags=["odd"]) for p in odd] +
                   [fo.Sample(filepath=p, tags=["broken"]) for p in broken])
    return ds


def test_tiny_models_load_through_the_zoo_entries(tiny_open_clip, tiny_hf_clip):
    from fiftyone_diffusion.plugins.clip import (
        OpenClipEmbedder,
        TransformersClipEmbedder,
        load_clip_model,
        model_spec,
    )
    from fiftyone_diffusion.plugins.clip_digit import register_open_clip_config

    oc, hf = load_clip_model(tiny_open_clip, precision="fp32"), load_clip_model(tiny_hf_clip, precision="fp32")
    assert isinstance(oc, OpenClipEmbedder) and isinstance(hf, TransformersClipEmbedder)
    assert model_spec(tiny_open_clip) == ("fiftyone-diffusion-open-clip", {"clip_model": tiny_open_clip,
                                                                           "pretrained": None})
    assert model_spec(tiny_hf_clip) == ("fiftyone-diffusion-transformers-clip", {"name_or_path": tiny_hf_clip})
    assert model_spec("openai/clip-vit-base-patch32")[0] == "fiftyone-diffusion-transformers-clip"
    assert model_spec("digit-clip") == ("digit-clip", {})
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    for model in (oc, hf):
        emb, text = model.embed_all([image]), model.embed_prompts(["a handwritten 7", "the digit seven"])
        assert emb.shape == (1, 16) and text.shape == (2, 16)
        assert np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-4)
        assert not np.allclose(text[0], text[1])
    # an open_clip model name + a checkpoint file loads the same weights as the local-dir folder
    register_open_clip_config()
    import open_clip

    open_clip.add_model_config(_write(os.path.join(tiny_open_clip, "..", "tiny-clip.json"), TINY_CFG))
    by_name = load_clip_model("open_clip:tiny-clip", pretrained=os.path.join(tiny_open_clip,
                                                                             "open_clip_model.safetensors"),
                              precision="fp32")
    assert np.allclose(by_name.embed_prompts(["a 7"]), oc.embed_prompts(["a 7"]), atol=1e-5)
    with pytest.raises(InputError):
        load_clip_model("no-such-model")


def _write(path: str, obj: dict) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def test_bf16_weights_stay_close_to_fp32(tiny_open_clip):
    from fiftyone_diffusion.plugins.clip import load_clip_model

    fp32 = load_clip_model(tiny_open_clip, precision="fp32")
    bf16 = load_clip_model(tiny_open_clip, precision="bf16")
    assert bf16.dtype == torch.bfloat16
    x = torch.randn(4, 3, 32, 32)
    cos = (fp32.embed_images(x) * bf16.embed_images(x)).sum(1)
    assert cos.min() > 0.99


def test_embeddings_resume_and_record_broken_files(digits, tiny_open_clip):
    from fiftyone_diffusion import compute_clip_embeddings
    from fiftyone_diffusion.brain.clip import ERROR_TAG

    first = compute_clip_embeddings(digits, model=tiny_open_clip, batch_size=8, num_workers=0, progress=False)
    broken = digits.match_tags("broken")
    assert first["embedded"] == 25 and first["failed"] == 5 and first["skipped_existing"] == 0
    assert sorted(first["failed_ids"]) == sorted(broken.values("id"))
    assert len(digits.match_tags(ERROR_TAG)) == 5 and None not in broken.values("clip_embeddings_error")
    assert "not found" in digits.match_tags(ERROR_TAG).match({"filepath": {"$regex": "missing"}}).first()[
        "clip_embeddings_error"]
    odd = digits.match_tags("odd").values("clip_embeddings")
    assert all(e is not None and e.shape == (16,) for e in odd)
    again = compute_clip_embeddings(digits, model=tiny_open_clip, num_workers=0, progress=False)
    assert again["embedded"] == 0 and again["skipped_existing"] == 25
    two = digits.match_tags("test").limit(2)
    kept = digits.match_tags("test").skip(2).first()["clip_embeddings"]
    two.set_field("clip_embeddings", None).save()
    resumed = compute_clip_embeddings(digits, model=tiny_open_clip, num_workers=1, progress=False)
    assert resumed["embedded"] == 2 and resumed["skipped_existing"] == 23
    assert np.array_equal(digits.match_tags("test").skip(2).first()["clip_embeddings"], kept)
    # a broken file that gets fixed is embedded on the next run and loses its error and tag
    fixed = broken.match({"filepath": {"$regex": "empty"}}).first()
    Image.new("L", (28, 28), 255).save(fixed.filepath, format="JPEG")
    rerun = compute_clip_embeddings(digits, model=tiny_open_clip, num_workers=0, progress=False)
    assert rerun["embedded"] == 1 and rerun["failed"] == 4
    fixed.reload()
    assert fixed["clip_embeddings"] is not None and fixed["clip_embeddings_error"] is None
    assert ERROR_TAG not in fixed.tags and len(digits.match_tags(ERROR_TAG)) == 4
    # the stored embedding is the model's embedding of the image
    from fiftyone_diffusion.plugins.clip import load_clip_model

    sample = digits.match_tags("test").first()
    direct = load_clip_model(tiny_open_clip).embed_all([Image.open(sample.filepath)])[0]
    assert np.allclose(sample["clip_embeddings"], direct, atol=1e-3)


def test_zero_shot_labels_with_temperature_and_template_ensemble(digits, tiny_open_clip):
    import fiftyone as fo
    import torch.nn.functional as F

    from fiftyone_diffusion import zero_shot_classify
    from fiftyone_diffusion.plugins.clip import load_clip_model

    classes = [str(i) for i in range(10)]
    templates = ["a handwritten {d}", "the digit {w}"]
    result = zero_shot_classify(digits, classes, model=tiny_open_clip, templates=templates, temperature=0.05,
                                batch_size=8, num_workers=0, progress=False)
    assert result["classified"] == 25 and result["failed"] == 5
    assert len(digits.exists("prediction_error")) == 5
    labels = digits.exists("prediction").values("prediction")
    assert len(labels) == 25 and all(isinstance(label, fo.Classification) for label in labels)
    for label in labels:
        p = torch.tensor(label.logits).softmax(0)
        assert label.label == classes[int(p.argmax())] and label.confidence == pytest.approx(float(p.max()), 1e-5)
    model = load_clip_model(tiny_open_clip)
    t = F.normalize(model.embed_texts(["a handwritten 3", "the digit three"]), dim=-1).mean(0)
    assert torch.allclose(model.class_embeddings()[3], F.normalize(t, dim=0), atol=1e-5)
    sample = digits.match_tags("test").first()
    emb = torch.from_numpy(model.embed_all([Image.open(sample.filepath)]))
    expected = (emb @ model.class_embeddings().T / 0.05)[0]
    assert np.allclose(sample.prediction.logits, expected.numpy(), atol=0.05)
    zero_shot_classify(digits, classes, model=tiny_open_clip, label_field="nologits", store_logits=False,
                       num_workers=0, progress=False)
    assert digits.match_tags("test").first().nologits.logits is None
    with pytest.raises(InputError):
        zero_shot_classify(digits, ["7"], model=tiny_open_clip)
    with pytest.raises(InputError):
        zero_shot_classify(digits, classes, model=tiny_open_clip, temperature=0)


_FRESH = """
import os, sys, json
{prelude}
import fiftyone as fo
ds = fo.load_dataset(sys.argv[1])
view = ds.sort_by_similarity("a handwritten seven", k=5, brain_key=sys.argv[2])
print(json.dumps(view.values("id")))
"""
_PLUGIN_LOADS = """
import fiftyone.operators.registry as reg
assert "@fiftyone-diffusion/diffusion/search" in [o.uri for o in reg.OperatorRegistry().list_operators()]
"""


def _fresh_search(dataset: str, brain_key: str, prelude: str, **extra_env) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "FIFTYONE_MODEL_ZOO_MANIFEST_PATHS"} | extra_env
    out = subprocess.run([sys.executable, "-c", _FRESH.format(prelude=prelude), dataset, brain_key], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_text_search_works_from_a_fresh_process_and_after_plugin_load(digits, tiny_open_clip):
    from fiftyone_diffusion import build_similarity_index, search

    result = build_similarity_index(digits, model=tiny_open_clip, brain_key="sim", num_workers=0, progress=False)
    assert result["indexed"] == 25 and result["failed"] == 5 and result["model"] == "fiftyone-diffusion-open-clip"
    info = digits.get_brain_info("sim").config
    assert info.model == "fiftyone-diffusion-open-clip" and info.supports_prompts
    here = search(digits, "a handwritten seven", k=5).values("id")
    assert len(here) == 5
    # a new process that imports the package, and one where only the plugin loads (as in the App server)
    assert _fresh_search(digits.name, "sim", "import fiftyone_diffusion") == here
    assert _fresh_search(digits.name, "sim", _PLUGIN_LOADS) == here
    with pytest.raises(InputError):
        search(digits, "  ")


@pytest.mark.slow
def test_lancedb_backend_and_transformers_model(digits, tiny_hf_clip, tmp_path):
    from fiftyone_diffusion import build_similarity_index, search

    result = build_similarity_index(digits, model=tiny_hf_clip, brain_key="lance", backend="lancedb",
                                    embeddings_field="hf_emb", uri=str(tmp_path / "lancedb"), num_workers=0,
                                    progress=False)
    assert result["model"] == "fiftyone-diffusion-transformers-clip" and result["indexed"] == 25
    view = search(digits, "the digit seven", k=4, brain_key="lance")
    assert len(view) == 4
    # lancedb's uri is a connection parameter FiftyOne does not store: other processes take it from the brain config
    fresh = _fresh_search(digits.name, "lance", "import fiftyone_diffusion",
                          FIFTYONE_BRAIN_SIMILARITY_LANCEDB_URI=str(tmp_path / "lancedb"))
    assert fresh[0] == view.first().id and len(set(fresh[:4]) & set(view.values("id"))) >= 3  # bf16 near-ties


def test_train_clip_on_a_view_and_on_mnist_writes_an_open_clip_folder(digits, tmp_path, mnist_dir):
    import open_clip

    from fiftyone_diffusion import train_clip
    from fiftyone_diffusion.plugins.clip import load_clip_model

    labelled = digits.exists("ground_truth")
    out = str(tmp_path / "from-view")
    result = train_clip(out, view=labelled, steps=2, batch_size=8, progress=False)
    assert result["source"] == "fiftyone-view" and result["train_samples"] == 20
    model = open_clip.create_model(f"local-dir:{out}")
    assert model.visual.image_size == (28, 28)
    assert load_clip_model(out).embed_prompts(["a handwritten 7"]).shape == (1, 64)
    out = str(tmp_path / "from-mnist")
    result = train_clip(out, data_dir=mnist_dir, steps=1, batch_size=8, max_eval_samples=20, progress=False)
    assert 0 <= result["zero_shot_accuracy_ensemble"] <= 1 and result["eval_samples"] == 20
    card = open(os.path.join(out, "MODEL_CARD.md")).read()
    assert "Zero-shot accuracy" in card and "Command:" in card
    with pytest.raises(InputError):
        train_clip(out, data_dir=mnist_dir, steps=0)


@pytest.mark.slow
def test_cli_embeds_and_reports_errors_in_one_line(digits, tiny_open_clip):
    out = subprocess.run([CLI, "compute-clip-embeddings", "--dataset", digits.name, "--model", tiny_open_clip,
                          "--num-workers", "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout[out.stdout.index("{\n"):])  # FiftyOne may print a database notice first
    assert result["embedded"] == 25 and result["failed"] == 5
    bad = subprocess.run([CLI, "zero-shot-classify", "--dataset", digits.name, "--classes", "7"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.splitlines()) == 1


def test_operator_runs_the_sdk(digits, tiny_open_clip):
    import fiftyone.operators as foo

    result = foo.execute_operator("@fiftyone-diffusion/diffusion/zero_shot_classify", dataset=digits.name,
                                  params={"target": "DATASET", "classes": "0,1,2,3,4,5,6,7,8,9",
                                          "model": tiny_open_clip, "label_field": "op_pred"})
    assert result.error is None, result.error
    assert len(digits.exists("op_pred")) == 25


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugins", "weights",
                       "digit-clip", "open_clip_model.safetensors")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(SHIPPED), reason="digit-clip weights not trained yet (train-clip)")
def test_digit_clip_finds_sevens_from_a_fresh_process(dataset_name, mnist_dir, tmp_path):
    from fiftyone_diffusion import build_similarity_index, load_mnist

    ds = load_mnist(dataset_name, "test", max_samples=1000, data_dir=mnist_dir, media_dir=str(tmp_path))
    build_similarity_index(ds, model="digit-clip", brain_key="digits", progress=False)
    ids = _fresh_search(ds.name, "digits", "import fiftyone_diffusion").copy()
    env = {k: v for k, v in os.environ.items() if k != "FIFTYONE_MODEL_ZOO_MANIFEST_PATHS"}
    code = _FRESH.replace("k=5", "k=10").format(prelude="import fiftyone_diffusion").replace(
        'view.values("id")', 'view.values("ground_truth.label")')
    out = subprocess.run([sys.executable, "-c", code, ds.name, "digits"], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    labels = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(ids) == 5 and len(labels) == 10 and labels.count("7") >= 9, labels
