"""The shipped demo CLIP model: loading through the ordinary path, zero-shot accuracy on
a fresh base-world sample, the pre-training script and its loss."""
from __future__ import annotations

import json
import math

import numpy as np
import open_clip
import pytest
import torch
from safetensors import safe_open

from cl_proxyfda import demo_pretrain
from cl_proxyfda.benchmarks import demo_world as world
from cl_proxyfda.benchmarks.demo_stream import CONTROL_TEMPLATES, DEMO_TASKS
from cl_proxyfda.models import SHIPPED_WEIGHTS, TaskVocabulary, build_task_model, register_model_configs

WEIGHTS = SHIPPED_WEIGHTS["demo"]
META = json.loads(WEIGHTS.with_suffix(".json").read_text())
# Targets of the shipped model (zero-shot %, base world): the brief's acceptance bars.
TARGETS = {"shape": 90.0, "colour": 95.0}
PER_CLASS = 40  # fresh test images per class in this file


def _margin(p: float, n: int) -> float:
    """Three binomial standard errors (in points) of an accuracy p (%) on n images."""
    q = min(max(p / 100.0, 0.02), 0.98)
    return 300.0 * math.sqrt(q * (1 - q) / n)


def test_shipped_asset_is_small_float16_and_its_metadata_meets_the_targets():
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 20 * 2**20
    with safe_open(str(WEIGHTS), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert META["model"] == "demo-clip-tiny" and META["dtype"] == "float16"
    assert META["zero_shot"]["shape"] >= TARGETS["shape"] and META["zero_shot"]["colour"] >= TARGETS["colour"]
    assert {"seed", "steps", "batch_size", "lr", "seconds"} <= set(META)


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    vocabs = [
        TaskVocabulary(name, [str(c) for c in classes], [world.ZERO_SHOT_TEMPLATES[name]])
        for name, classes in (("shape", world.SHAPES), ("colour", world.BASE_COLOURS), ("texture", world.BASE_TEXTURES))
    ]
    model, _, preprocess = build_task_model("demo-clip-tiny", "demo", tasks=vocabs)
    return model.eval(), preprocess


def test_shipped_weights_load_by_path_and_by_tag_identically(shipped):
    model, _ = shipped
    by_path, _, _ = build_task_model("demo-clip-tiny", str(WEIGHTS))
    for (name, a), b in zip(model.clip.state_dict().items(), by_path.clip.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(by_path.clip.visual.conv1.weight, open_clip.create_model("demo-clip-tiny").visual.conv1.weight)


def test_shipped_model_zero_shot_accuracy_on_a_fresh_sample(shipped):
    """Through CLIPTaskModel's forward and the eval transform, on images the
    pre-training never drew (another seed than the metadata's measurement)."""
    model, preprocess = shipped
    sets = demo_pretrain.base_eval_sets(seed=2024, per_class=PER_CLASS)
    for task_id, name in enumerate(("shape", "colour", "texture")):
        _, _, images, labels = sets[name]
        x = torch.stack([preprocess(world_image) for world_image in _pil(images)])
        with torch.no_grad():
            pred = model(x, task_id).argmax(dim=1).numpy()
        acc = 100.0 * float((pred == labels).mean())
        n = len(labels)
        recorded = META["zero_shot"][name]
        assert acc >= recorded - _margin(recorded, n), (name, acc, recorded)
        if name in TARGETS:
            assert acc >= TARGETS[name] - _margin(TARGETS[name], n), (name, acc)


def _pil(images: np.ndarray):
    from PIL import Image

    return [Image.fromarray(im) for im in images]


def test_every_prompt_of_the_demo_fits_the_context_length():
    register_model_configs()
    tokenizer = open_clip.get_tokenizer("demo-clip-tiny")
    attrs = world.sample_attributes(30, np.random.default_rng(0), count=[1, 2, 3, 4], colour=list(world.COLOURS), background=list(world.BACKGROUNDS))
    prompts = [world.caption_of(attrs, i, t) for i in range(30) for t in range(len(world.CAPTION_TEMPLATES))]
    prompts += [t.format(c) for s in DEMO_TASKS for t in s.templates for c in s.classnames]
    prompts += [CONTROL_TEMPLATES[0].format(c) for c in world.base_concepts()]
    tokens = tokenizer(prompts)
    assert tokens.shape[1] == 24
    assert (tokens[:, -1] == 0).all()  # nothing truncated: the last slot is padding


def test_multi_positive_loss_is_the_clip_loss_on_distinct_captions():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    ours = demo_pretrain.multi_positive_clip_loss(img, txt, scale, torch.eye(6, dtype=torch.bool))
    ref = open_clip.ClipLoss()(img, txt, scale)
    assert torch.allclose(ours, ref, atol=1e-6)
    # A caption true of two images spreads its target over both.
    match = torch.eye(6, dtype=torch.bool)
    match[1, 0] = True
    logits = scale * img @ txt.t()
    lp, lq = torch.log_softmax(logits, 1), torch.log_softmax(logits, 0)
    i2t = -lp.diagonal().clone()
    i2t[1] = -(0.5 * lp[1, 0] + 0.5 * lp[1, 1])  # image 1: both captions 0 and 1 are true
    t2i = -lq.diagonal().clone()
    t2i[0] = -(0.5 * lq[0, 0] + 0.5 * lq[1, 0])  # caption 0: true of images 0 and 1
    assert torch.allclose(demo_pretrain.multi_positive_clip_loss(img, txt, scale, match), 0.5 * (i2t.mean() + t2i.mean()), atol=1e-6)


def test_caption_match_marks_captions_true_of_an_image():
    attrs = world.sample_attributes(3, np.random.default_rng(0), colour="red", texture="solid")
    attrs.shape = np.array([0, 0, 1])
    # Captions of images 0, 1, 2: "a photo of a circle.", "a photo of a red solid circle.", "a photo of a red object."
    asserted = world.caption_attributes(attrs, [5, 0, 6])
    match = demo_pretrain.caption_match(asserted, attrs).numpy()
    assert match.tolist() == [[True, True, True], [True, True, True], [False, False, True]]
    attrs.size = np.array([0, 1, 0])
    asserted = world.caption_attributes(attrs, [3, 3, 3])  # templates naming the size too
    assert demo_pretrain.caption_match(asserted, attrs).numpy().tolist() == [[True, False, False], [False, True, False], [False, False, True]]


def test_pretrain_demo_writes_loadable_weights_and_metadata(tmp_path):
    out = tmp_path / "tiny" / "demo.safetensors"
    meta = demo_pretrain.pretrain_demo(out, seed=3, steps=2, batch_size=8, warmup_steps=1, eval_per_class=2, progress=False)
    assert out.is_file() and not list(out.parent.glob("*.tmp"))
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == meta and meta["steps"] == 2 and meta["seed"] == 3
    assert set(meta["zero_shot"]) == {"shape", "colour", "texture"}
    model, _, _ = build_task_model("demo-clip-tiny", str(out))
    with safe_open(str(out), framework="pt") as f:
        stored = f.get_tensor("visual.conv1.weight")
    assert torch.equal(model.clip.visual.conv1.weight, stored.float())
