"""Pre-train the demo CLIP model (``demo-clip-tiny``) on the base demo world.

The shipped asset ``cl_proxyfda/assets/demo_clip.safetensors`` (with its metadata
``demo_clip.json``) is the output of ``pretrain_demo(ASSET_DIR / "demo_clip.safetensors")``
with the defaults below (run with ``torch.set_num_threads(1)``: about 11 minutes on one
CPU core; the metadata records the thread count, the time and the zero-shot
accuracies). Training draws a fresh batch of base-world images and captions at every
step (no fixed data set) and minimises the CLIP contrastive loss.

Language knowledge: a real CLIP's text tower knows many words it has rarely seen
pictured. Here the text tower also learns, from text alone, to tell apart the words of
:data:`LANGUAGE_CONCEPTS` (counts, positions, novel textures, shades, digits): a
contrastive loss between two phrasings of the same word. No image of those concepts
is drawn, so zero-shot accuracy on them stays near chance; without this term every
unknown word gets nearly the same text embedding (mean class-head cosine 0.92 on the
counting task) and the stream's novel tasks could hardly be learned.

Loss detail: the world's captions are often partial ("a photo of a circle."), so one
caption can be true of several images in a batch. The targets of the contrastive loss
are therefore *all* matching pairs, not only the diagonal: ``target[i, j] = 1`` when
caption ``j`` is true of image ``i`` (every attribute it names agrees), normalised per
row (image-to-text) and per column (text-to-image). With full captions only, this is
the usual CLIP loss.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_proxyfda.benchmarks import demo_world as world
from cl_proxyfda.io import write_atomic
from cl_proxyfda.models import ASSET_DIR, register_model_configs
from cl_proxyfda.training import warmup_cosine

MODEL_NAME = "demo-clip-tiny"
DEFAULT_OUT = ASSET_DIR / "demo_clip.safetensors"

# open_clip's default normalisation (the model's eval transform at 32 px is exactly this).
_MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)


def images_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) -> normalised float tensor (N, 3, H, W), as the eval transform."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - _MEAN) / _STD


def multi_positive_clip_loss(image: Tensor, text: Tensor, logit_scale: Tensor, match: Tensor) -> Tensor:
    """Symmetric CLIP loss with every matching image-caption pair as a positive.

    Args:
        image, text: L2-normalised embeddings (B, D).
        logit_scale: the (exponentiated) temperature.
        match: bool (B, B), ``match[i, j]`` when caption j is true of image i; the
            diagonal must be true.
    """
    logits = logit_scale * image @ text.t()
    m = match.float()
    loss_i2t = -(F.log_softmax(logits, dim=1) * m / m.sum(dim=1, keepdim=True)).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(logits, dim=0) * m / m.sum(dim=0, keepdim=True)).sum(dim=0).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def caption_match(asserted: np.ndarray, attrs: world.WorldAttributes) -> Tensor:
    """``match[i, j]``: caption j (asserting ``asserted[j]``, -1 = open) is true of image i."""
    truth = np.stack([attrs.shape, attrs.colour, attrs.texture, attrs.size], axis=1)  # (B, 4)
    ok = (asserted[None, :, :] < 0) | (asserted[None, :, :] == truth[:, None, :])
    return torch.from_numpy(ok.all(axis=2))


#: Words the text tower learns from text alone (a stand-in for a real CLIP's language
#: knowledge): concept -> phrasings. No image of these concepts is ever drawn in
#: pre-training, so the image tower does not know them; without this the text tower
#: maps every unknown word to nearly the same embedding and the stream's novel tasks
#: have (almost) identical class heads.
LANGUAGE_CONCEPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "count": (world.COUNT_WORDS, ("{} objects", "{} shapes", "{} things", "exactly {} items")),
    "position": (world.POSITIONS, ("an object in the {}", "a shape on the {}", "something at the {}", "a thing in the {} part")),
    "texture": (world.NOVEL_TEXTURES, ("a {} object", "a {} pattern", "a {} texture", "a {} surface")),
    "shade": (world.SHADE_COLOURS, ("a {} object", "a {} shape", "a {} thing", "something {}")),
    "digit": (tuple(str(d) for d in range(10)), ("the number {}", "the digit {}", "a written {}", 'the numeral "{}"')),
}
LANGUAGE_FRAMES: tuple[str, ...] = ("a photo of {}.", "a picture of {}.", "{}.", "an image showing {}.")


def language_concepts() -> list[tuple[str, str]]:
    """Every (kind, word) the text-only objective separates."""
    return [(kind, w) for kind, (words, _) in LANGUAGE_CONCEPTS.items() for w in words]


def sample_language_batch(rng: np.random.Generator, batch_size: int, tokenizer: Callable) -> tuple[Tensor, Tensor, Tensor]:
    """Two phrasings of ``batch_size`` random language concepts and their match matrix."""
    concepts = language_concepts()
    picks = rng.integers(0, len(concepts), size=batch_size)

    def phrase(i: int) -> str:
        kind, word = concepts[i]
        templates = LANGUAGE_CONCEPTS[kind][1]
        inner = templates[int(rng.integers(0, len(templates)))].format(word)
        return LANGUAGE_FRAMES[int(rng.integers(0, len(LANGUAGE_FRAMES)))].format(inner)

    first = [phrase(int(i)) for i in picks]
    second = [phrase(int(i)) for i in picks]
    match = torch.from_numpy(picks[:, None] == picks[None, :])
    return tokenizer(first), tokenizer(second), match


def sample_batch(rng: np.random.Generator, batch_size: int, image_size: int, tokenizer: Callable) -> tuple[Tensor, Tensor, Tensor]:
    """A fresh base-world batch: images, caption tokens and the caption-match matrix."""
    attrs = world.sample_attributes(batch_size, rng)
    templates = rng.integers(0, len(world.CAPTION_TEMPLATES), size=batch_size)
    captions = world.caption(attrs, templates)
    images = images_to_tensor(world.render(attrs, image_size))
    match = caption_match(world.caption_attributes(attrs, templates), attrs)
    return images, tokenizer(captions), match


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, tokenizer: Callable, classnames: list[str], templates: list[str], images: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 zero-shot accuracy (%) with a template ensemble (as the protocol defines)."""
    was_training = model.training
    model.eval()
    prompts = [t.format(c) for c in classnames for t in templates]
    text = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1).view(len(classnames), len(templates), -1)
    heads = F.normalize(text.mean(dim=1), dim=-1)
    correct = 0
    for start in range(0, len(images), batch_size):
        feats = F.normalize(model.encode_image(images_to_tensor(images[start : start + batch_size])), dim=-1)
        correct += int((feats @ heads.t()).argmax(dim=1).eq(torch.from_numpy(labels[start : start + batch_size])).sum())
    model.train(was_training)
    return 100.0 * correct / len(images)


def base_eval_sets(seed: int, per_class: int, image_size: int = 32) -> dict[str, tuple[list[str], list[str], np.ndarray, np.ndarray]]:
    """Fresh base-world test sets for shape, colour and texture classification:
    ``name -> (classnames, templates, images, labels)``."""
    rng = np.random.default_rng(seed)
    sets = {}
    for attribute, vocab in (("shape", world.SHAPES), ("colour", world.BASE_COLOURS), ("texture", world.BASE_TEXTURES)):
        attrs, labels = world.sample_labelled(rng, attribute, vocab, per_class)
        sets[attribute] = (list(vocab), [world.ZERO_SHOT_TEMPLATES[attribute]], world.render(attrs, image_size), labels)
    return sets


def evaluate_zero_shot(model: nn.Module, tokenizer: Callable, seed: int = 12345, per_class: int = 50, image_size: int = 32) -> dict[str, float]:
    """Zero-shot accuracy (%) on fresh base-world shape, colour and texture sets."""
    return {name: round(zero_shot_accuracy(model, tokenizer, *data), 2) for name, data in base_eval_sets(seed, per_class, image_size).items()}


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exclude = p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name or "embedding" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_safetensors_atomic(state: dict[str, Tensor], path: Path, dtype: torch.dtype = torch.float16) -> None:
    """Write a state dict as safetensors through a temporary file and an atomic rename."""
    from safetensors.torch import save

    tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu() for k, v in state.items()}
    write_atomic(path, save(tensors, metadata={"format": "pt", "model": MODEL_NAME}))


def pretrain_demo(
    out_path: str | os.PathLike = DEFAULT_OUT,
    seed: int = 0,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup_steps: int = 100,
    image_size: int = 32,
    language_batch: int = 64,
    language_weight: float = 1.0,
    eval_per_class: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Pre-train ``demo-clip-tiny`` on the base world and save it as safetensors.

    AdamW with linear warm-up then cosine decay to zero; a fresh batch of base-world
    images and captions per step, plus ``language_batch`` text-only pairs (two
    phrasings of a word of :data:`LANGUAGE_CONCEPTS`) whose contrastive loss, weighted
    by ``language_weight`` (at the model's current temperature, detached), teaches the
    text tower to tell those words apart without showing any image of them. Weights are stored in float16 (open_clip loads them
    into the float32 model); the zero-shot accuracies in the returned metadata are
    measured after reloading the stored file, on a fresh sample (seed ``seed + 12345``).
    The metadata is also written next to the weights as ``<stem>.json``.
    """
    from tqdm.auto import tqdm

    from cl_proxyfda.errors import UserError

    for key, value in (("steps", steps), ("batch_size", batch_size), ("language_batch", language_batch), ("eval_per_class", eval_per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"pretrain-demo {key}: must be a positive integer (got {value!r})")
    if not 0 <= seed < 2**32:
        raise UserError(f"pretrain-demo seed: must be >= 0 and < 2**32 (got {seed})")
    if not (math.isfinite(lr) and lr > 0):
        raise UserError(f"pretrain-demo lr: must be a finite number > 0 (got {lr})")
    from cl_proxyfda.runfolder import make_output_folder

    out_path = Path(out_path)
    make_output_folder(out_path.parent, "pretrain-demo --out")
    if out_path.is_dir():
        raise UserError(f"pretrain-demo --out: {out_path} is a folder; name the .safetensors file to write")
    register_model_configs()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)

    start = time.perf_counter()
    bar = tqdm(range(steps), desc="pretrain demo-clip-tiny", disable=not progress)
    loss_value = float("nan")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup_cosine(step, steps, warmup_steps, "cosine")
        images, tokens, match = sample_batch(rng, batch_size, image_size, tokenizer)
        image_feats, text_feats, logit_scale = model(images, tokens)
        loss = multi_positive_clip_loss(image_feats, text_feats, logit_scale, match)
        if language_batch > 0 and language_weight > 0:
            first, second, same = sample_language_batch(rng, language_batch, tokenizer)
            a = F.normalize(model.encode_text(first), dim=-1)
            b = F.normalize(model.encode_text(second), dim=-1)
            loss = loss + language_weight * multi_positive_clip_loss(a, b, logit_scale.detach(), same)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_value = float(loss.detach())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}", scale=f"{float(logit_scale.detach()):.1f}")
    seconds = time.perf_counter() - start

    save_safetensors_atomic(model.state_dict(), out_path)
    reloaded = open_clip.create_model(MODEL_NAME, pretrained=str(out_path))
    accuracies = evaluate_zero_shot(reloaded, tokenizer, seed=seed + 12345, per_class=eval_per_class, image_size=image_size)
    meta = {
        "model": MODEL_NAME,
        "file": out_path.name,
        "dtype": "float16",
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "warmup_steps": warmup_steps,
        "language_batch": language_batch,
        "language_weight": language_weight,
        "image_size": image_size,
        "final_loss": round(loss_value, 4),
        "seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "zero_shot": accuracies,
        "zero_shot_eval": {"seed": seed + 12345, "images_per_class": eval_per_class, "templates": world.ZERO_SHOT_TEMPLATES},
    }
    meta_path = out_path.with_suffix(".json")
    write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
    return meta
