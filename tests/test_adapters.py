"""Feature-space adapters (VeFA, LoRFA) and the LoRA baseline on real open_clip models."""
from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import open_clip
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from cl_proxyfda.adapters import (
    AdapterConfig,
    adapter_parameter_count,
    adapter_parameters,
    has_adapters,
    inject_adapters,
    merge_adapters,
)
from cl_proxyfda.errors import UserError
from cl_proxyfda.models import TaskVocabulary, build_task_model, register_model_configs

TYPES = ["vefa", "lorfa", "lora"]
TINY = "cl-test-tiny"  # width 64, 2 blocks per tower, MLP 256, 32x32 images


def tiny_clip(seed: int = 0) -> nn.Module:
    register_model_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(TINY, pretrained=None).eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=gen)
    tokens = open_clip.get_tokenizer(TINY)(["a photo of a cat", "a dog", "a red car"])
    return images, tokens


def outputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    images, tokens = inputs()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def perturb(model: nn.Module, seed: int = 2, std: float = 0.2) -> None:
    """Move every adapter parameter away from its initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(std * torch.randn(p.shape, generator=gen))


def max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def is_plain(model: nn.Module) -> bool:
    """No parametrised module left: every module is of its ordinary class."""
    return not any(hasattr(m, "parametrizations") for m in model.modules()) and all(
        type(b.attn) is nn.MultiheadAttention for b in model.visual.transformer.resblocks
    )


# ------------------------------------------------------------------ config
def test_config_defaults_and_validation() -> None:
    cfg = AdapterConfig(type="lorfa")
    assert (cfg.rank, cfg.scaling, cfg.towers) == (8, 1.0, ["image"])
    assert cfg.targets == ["q", "k", "v", "o", "fc1", "fc2"]
    assert AdapterConfig(type="lora", rank=4, alpha=16).scaling == 4.0
    for bad in (
        {"type": "vefa", "lr": 1e-3},  # extra key
        {"type": "dora"},
        {"type": "lorfa", "rank": 0},
        {"type": "lorfa", "targets": ["q", "mlp"]},
        {"type": "lorfa", "targets": []},
        {"type": "lorfa", "targets": ["q", "q"]},
        {"type": "lorfa", "towers": ["audio"]},
        {},  # type is required
    ):
        with pytest.raises(ValidationError):
            AdapterConfig(**bad)


# ------------------------------------------------------------- behaviour
@pytest.mark.parametrize("kind", TYPES)
def test_identity_at_init_and_only_adapters_trainable(kind: str) -> None:
    model = tiny_clip()
    # The reference is the *frozen* model: torch's attention takes another kernel path
    # when no weight requires grad, which alone moves the text output by ~1e-6.
    for p in model.parameters():
        p.requires_grad_(False)
    reference = outputs(model)
    params = inject_adapters(model, AdapterConfig(type=kind, towers=["image", "text"]))
    assert max_diff(outputs(model), reference) <= 1e-6
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params} and len(params) > 0
    # 2 towers x 2 blocks x (q, k, v, o, fc1, fc2), d = 64, MLP width 256, r = 8
    per_block = {
        "vefa": 3 * 64 + 64 + 64 + 256,
        "lorfa": 2 * 8 * (3 * 64 + 64 + 64 + 256),
        "lora": 2 * 8 * 64 * 4 + 8 * (64 + 256) * 2,
    }[kind]
    assert adapter_parameter_count(model) == 4 * per_block


@pytest.mark.parametrize("kind", TYPES)
def test_merge_gives_plain_open_clip_model(kind: str, tmp_path) -> None:
    model = tiny_clip()
    base = outputs(model)
    inject_adapters(model, AdapterConfig(type=kind, towers=["image", "text"]))
    perturb(model)
    adapted = outputs(model)
    assert max_diff(adapted, base) > 1e-2  # the perturbation changes the model
    merge_adapters(model)
    assert is_plain(model) and not has_adapters(model) and adapter_parameter_count(model) == 0
    assert max_diff(outputs(model), adapted) <= 1e-5
    path = tmp_path / "merged.pt"
    torch.save(model.state_dict(), path)
    fresh = tiny_clip(seed=123)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert max_diff(outputs(fresh), adapted) <= 1e-5


@pytest.mark.parametrize("kind", TYPES)
def test_injected_model_checkpoints_and_deepcopies(kind: str) -> None:
    cfg = AdapterConfig(type=kind, rank=4, alpha=8)
    model = tiny_clip()
    inject_adapters(model, cfg)
    perturb(model)
    adapted = outputs(model)
    teacher = copy.deepcopy(model)  # what the teacher bank does
    assert max_diff(outputs(teacher), adapted) == 0.0
    other = tiny_clip(seed=5)
    inject_adapters(other, cfg)
    other.load_state_dict(model.state_dict(), strict=True)
    assert max_diff(outputs(other), adapted) <= 1e-6


def _rank_deficient_(model: nn.Module, rank: int = 8) -> None:
    """Replace every adaptable weight of the image tower by a rank-`rank` matrix."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            d = block.attn.embed_dim
            w = block.attn.in_proj_weight
            for i in range(3):
                w[i * d : (i + 1) * d] = torch.randn(d, rank, generator=gen) @ torch.randn(rank, d, generator=gen) / d
            for lin in (block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
                out_f, in_f = lin.weight.shape
                lin.weight.copy_(torch.randn(out_f, rank, generator=gen) @ torch.randn(rank, in_f, generator=gen) / in_f)


def _weights_by_target(model: nn.Module) -> dict[str, torch.Tensor]:
    found = {}
    for i, block in enumerate(model.visual.transformer.resblocks):
        d = block.attn.embed_dim
        w = block.attn.in_proj_weight.detach()
        for j, t in enumerate("qkv"):
            found[f"{i}.{t}"] = w[j * d : (j + 1) * d].clone()
        found[f"{i}.o"] = block.attn.out_proj.weight.detach().clone()
        found[f"{i}.fc1"] = block.mlp.c_fc.weight.detach().clone()
        found[f"{i}.fc2"] = block.mlp.c_proj.weight.detach().clone()
    return found


def _outside_column_space(w: torch.Tensor, w_eff: torch.Tensor) -> float:
    """Relative norm of the part of w_eff's columns outside the column space of w."""
    u, s, _ = torch.linalg.svd(w.double(), full_matrices=False)
    basis = u[:, s > s[0] * 1e-4]  # float32 rounding leaves tiny spurious singular values
    w_eff = w_eff.double()
    residual = w_eff - basis @ (basis.T @ w_eff)
    return (residual.norm() / w_eff.norm()).item()


@pytest.mark.parametrize("kind", TYPES)
def test_merged_weight_stays_in_column_space_of_pretrained(kind: str) -> None:
    """W_eff = W M keeps col(W_eff) inside col(W) for VeFA/LoRFA; LoRA adds new directions."""
    model = tiny_clip()
    _rank_deficient_(model, rank=8)
    before = _weights_by_target(model)
    inject_adapters(model, AdapterConfig(type=kind))
    perturb(model, std=0.5)
    merge_adapters(model)
    after = _weights_by_target(model)
    assert set(before) == {f"{i}.{t}" for i in range(2) for t in ("q", "k", "v", "o", "fc1", "fc2")}
    for key in before:
        assert (after[key] - before[key]).abs().max() > 1e-3, key  # the adapter did change it
        residual = _outside_column_space(before[key], after[key])
        if kind == "lora":
            assert residual > 0.1, (key, residual)
        else:
            assert residual < 1e-5, (key, residual)


def test_targets_and_tower_options() -> None:
    """Text tower only, q and v only: the image tower is untouched and o/fc are not adapted."""
    model = tiny_clip()
    base_image, base_text = outputs(model)
    inject_adapters(model, AdapterConfig(type="vefa", targets=["q", "v"], towers=["text"]))
    assert adapter_parameter_count(model) == 2 * 2 * 64  # 2 text blocks x (q, v) x d
    block = model.transformer.resblocks[0]
    assert hasattr(block.attn, "parametrizations") and not hasattr(block.attn.out_proj, "parametrizations")
    assert not any(hasattr(m, "parametrizations") for m in model.visual.modules())
    perturb(model)
    image, text = outputs(model)
    assert (image - base_image).abs().max() == 0.0
    assert (text - base_text).abs().max() > 1e-2
    with torch.no_grad():  # k third of the fused weight is left as it was
        d = block.attn.embed_dim
        scales = block.attn.parametrizations.in_proj_weight[0].adapters
        assert set(scales.keys()) == {"q", "v"}
        w = block.attn.in_proj_weight
        w0 = block.attn.parametrizations.in_proj_weight.original
        assert torch.equal(w[d : 2 * d], w0[d : 2 * d]) and not torch.equal(w[:d], w0[:d])
    with pytest.raises(UserError, match="already has adapters"):
        inject_adapters(model, AdapterConfig(type="lora"))


@pytest.mark.parametrize("kind", TYPES)
def test_only_adapters_receive_gradients_in_task_model(kind: str) -> None:
    register_model_configs()
    torch.manual_seed(0)
    vocab = TaskVocabulary("pets", ["cat", "dog", "bird"], ["a photo of a {}."])
    model, _, _ = build_task_model(TINY, None, [vocab], train_towers=("image",))
    params = inject_adapters(model.clip, AdapterConfig(type=kind))
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in params}
    model.train()
    images, _ = inputs()
    logits = model(images, 0)
    assert logits.shape == (3, 3)
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    adapter_ids = {id(p) for p in params}
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert sum(p.grad.abs().sum().item() for p in params) > 0


@pytest.fixture(scope="module")
def vit_b16() -> nn.Module:
    """A randomly initialised ViT-B/16 CLIP (built only, never run forward)."""
    return open_clip.create_model("ViT-B-16", pretrained=None)


@pytest.mark.parametrize("kind, expected", [("lora", 589_824), ("lorfa", 589_824), ("vefa", 36_864)])
def test_vit_b16_qkvo_parameter_counts(vit_b16: nn.Module, kind: str, expected: int) -> None:
    params = inject_adapters(vit_b16, AdapterConfig(type=kind, rank=8, targets=["q", "k", "v", "o"]))
    try:
        assert adapter_parameter_count(vit_b16) == expected
        assert sum(p.numel() for p in vit_b16.parameters() if p.requires_grad) == expected
        assert sum(p.numel() for p in params) == expected
    finally:
        merge_adapters(vit_b16)  # B = 0 / s = 1: the weights are unchanged for the next case
