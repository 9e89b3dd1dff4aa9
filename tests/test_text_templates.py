"""Training heads from the first template (as ZSCL's and GIFT's code train), evaluation
heads from the template ensemble; ``prompts_encoded`` counts what the text tower saw."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from cl_proxyfda.config import parse_config
from cl_proxyfda.errors import ConfigError, UserError
from cl_proxyfda.models import CLIPTaskModel, TaskVocabulary, build_task_model
from cl_proxyfda.runner import build_run, execute
from conftest import TINY_TASKS, tiny_config

VOCAB = [
    TaskVocabulary("shapes", ["circle", "square", "star"], ["a photo of a {}.", "a drawing of a {}.", "art of a {}.", "a {}."]),
    TaskVocabulary("digits", ["one", "two"], ["the number {}.", "a digit {}."]),
]


def tiny_model(mode: str = "first", towers=("image", "text")) -> CLIPTaskModel:
    torch.manual_seed(0)
    model, _, _ = build_task_model("cl-test-tiny", None, VOCAB, train_towers=towers, text_templates=mode)
    return model


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def counted(model: CLIPTaskModel, fn) -> tuple[int, int]:
    """(prompts encoded, head computations) while ``fn`` runs."""
    p0, c0 = model.prompts_encoded, model.text_encode_calls
    fn()
    return model.prompts_encoded - p0, model.text_encode_calls - c0


def test_training_step_encodes_one_prompt_per_class_by_default() -> None:
    model = tiny_model()
    assert model.text_templates == "first"
    model.train()
    for _ in range(2):  # every training step recomputes the trainable head
        prompts, calls = counted(model, lambda: model(images(), 0).sum().backward())
        assert (prompts, calls) == (3, 1)
    grads = [p.grad for n, p in model.clip.named_parameters() if not n.startswith("visual.") and p.requires_grad]
    assert grads and all(g is not None for g in grads)  # the text tower gets gradients
    with torch.no_grad():
        first = F.normalize(model.encode_text([f"a photo of a {c}." for c in VOCAB[0].classnames]), dim=-1)
    with torch.enable_grad():
        head = model.class_embeddings(0)
    assert head.requires_grad and torch.allclose(head.detach(), first, atol=1e-6)


def test_ensemble_training_heads_encode_every_template() -> None:
    model = tiny_model("ensemble")
    model.train()
    assert counted(model, lambda: model(images(), 0).sum().backward()) == (3 * 4, 1)
    assert counted(model, lambda: model(images(), 1).sum().backward()) == (2 * 2, 1)


@pytest.mark.parametrize("mode", ["first", "ensemble"])
def test_evaluation_uses_the_ensemble_once_per_text_change(mode: str) -> None:
    model = tiny_model(mode)
    model.eval()
    with torch.no_grad():
        assert counted(model, lambda: model(images(), 0)) == (12, 1)
        assert counted(model, lambda: model(images(), 0)) == (0, 0)  # cached
        assert counted(model, lambda: model(images(), 1)) == (4, 1)
        model.text_changed()
        assert counted(model, lambda: model(images(), 0)) == (12, 1)
        ensemble = F.normalize(model.encode_text(VOCAB[0].prompts()[1]).mean(0), dim=-1)
        assert torch.allclose(model.class_embeddings(0)[1], ensemble, atol=1e-6)
    model.train()  # training mode under no_grad (e.g. a teacher's targets) is still evaluation
    with torch.no_grad():
        assert counted(model, lambda: model(images(), 0)) == (0, 0)


def test_frozen_text_tower_trains_on_cached_first_template_heads() -> None:
    model = tiny_model(towers=("image",))
    model.train()
    assert counted(model, lambda: model(images(), 0).sum().backward()) == (3, 1)
    assert counted(model, lambda: model(images(), 0).sum().backward()) == (0, 0)
    model.eval()
    with torch.no_grad():
        assert counted(model, lambda: model(images(), 0)) == (12, 1)  # its own cache entry
        train_head = model._cache.heads[(0, "first")]
        assert not torch.allclose(train_head, model.class_embeddings(0))


def test_bad_mode_is_one_clear_error() -> None:
    clip_model = tiny_model()
    with pytest.raises(UserError, match="train.text_templates"):
        CLIPTaskModel(clip_model.clip, clip_model.tokenizer, VOCAB, text_templates="all")
    with pytest.raises(ConfigError, match=r"train.text_templates"):
        parse_config(tiny_config(Path("."), Path("."), train={"text_templates": "all"}))
    assert parse_config(tiny_config(Path("."), Path("."))).train.text_templates == "first"


class PromptCounter(SupervisedPlugin):
    """Prompts encoded by each training iteration (forward and backward included)."""

    def __init__(self) -> None:
        super().__init__()
        self.per_step: list[tuple[int, int]] = []  # (experience, prompts)

    def before_training_iteration(self, strategy, **kwargs):
        self._start = strategy.model.prompts_encoded

    def after_training_iteration(self, strategy, **kwargs):
        self.per_step.append((strategy.experience_index, strategy.model.prompts_encoded - self._start))


@pytest.mark.parametrize("mode", ["first", "ensemble"])
def test_runner_passes_the_mode_and_counts_match(tmp_path: Path, data_root: Path, mode: str) -> None:
    templates = ["a photo of a {}.", "a {} thing.", "the colour {}."]
    cfg = parse_config(
        tiny_config(
            data_root,
            tmp_path,
            model={"train_towers": ["image", "text"]},
            stream={"templates": templates},
            train={"iterations": 2, "batch_size": 4, "text_templates": mode},
            checkpoint={"enabled": False},
        )
    )
    run = build_run(cfg, tmp_path / "run")
    assert run.model.text_templates == mode
    counter = PromptCounter()
    run.strategy.plugins.append(counter)
    execute(run, quiet=True)
    per_class = 1 if mode == "first" else len(templates)
    sizes = [len(v) for v in TINY_TASKS.values()]
    assert counter.per_step == [(i, per_class * sizes[i]) for i in range(len(sizes)) for _ in range(2)]
