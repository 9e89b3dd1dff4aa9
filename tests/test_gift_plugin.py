"""The gift strategy: synthetic losses in the loss, teacher embeddings once per experience,
prompt pools without the current task, the cache reused, doubled weights, configs."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from cl_proxyfda.benchmarks.stream import ArrayImageDataset, StreamData, Task  # noqa: E402
from cl_proxyfda.config import load_config, parse_config  # noqa: E402
from cl_proxyfda.errors import ConfigError  # noqa: E402
from cl_proxyfda.models import build_task_model  # noqa: E402
from cl_proxyfda.runner import build_run, execute  # noqa: E402
from cl_proxyfda.strategies.gift import GIFTParams  # noqa: E402
from cl_proxyfda.registry import STREAMS  # noqa: E402
from cl_proxyfda.synthetic import current_task_prompts, eval_transform, experience_prompt_pool, plan_experience, stream_key  # noqa: E402
from conftest import tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE = ["circle", "square", "star"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def gift_entry(pipe: Path, cache: Path, **over) -> dict:
    entry = {
        "name": "gift",
        "generator": {"name": "diffusers", "model": str(pipe), "steps": 2, "guidance": 1.0, "progress": False},
        "images_per_experience": 8,
        "synthetic_batch_size": 4,
        "base_concepts": list(BASE),
        "cache_dir": str(cache),
    }
    entry.update(over)
    return entry


class Probe(SupervisedPlugin):
    """Records, at the end of before_backward, the total loss, the task loss and whether
    the student's text embeddings of the synthetic prompts were precomputed."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    def before_backward(self, strategy, **kwargs):
        gift = next(p for p in strategy.plugins if getattr(p, "name", "") == "gift")
        self.rows.append(
            {
                "experience": strategy.experience_index,
                "loss": float(strategy.loss.detach()),
                "task": float(strategy.criterion().detach()),
                "student_text_cached": gift._student_text is not None,
                **gift.loss_terms,
            }
        )


def make_run(tmp: Path, root: Path, strategies: list, tasks=("warm", "cool"), iterations: int = 3, **sections):
    cfg = tiny_config(root, tmp / "runs", strategies=strategies, train={"iterations": iterations, "batch_size": 6}, **sections)
    cfg["stream"]["tasks"] = list(tasks)
    cfg["checkpoint"] = {"enabled": True}
    run = build_run(parse_config(cfg))
    probe = Probe()
    run.strategy.plugins.append(probe)
    return run, probe


def test_gift_terms_enter_the_loss_and_teacher_embeddings_are_computed_once(tmp_path, tiny_pipe, data_root, shared_cache):
    run, probe = make_run(tmp_path / "a", data_root, [gift_entry(tiny_pipe, shared_cache)])
    results = execute(run, quiet=True)
    gift = run.plugins[0]
    assert len(probe.rows) == 2 * 3
    for row in probe.rows:
        assert all(math.isfinite(row[k]) for k in ("gift_kd", "gift_ita", "gift"))
        assert row["gift_kd"] > 0 and row["gift_ita"] > 0
        assert row["gift"] == pytest.approx(1.0 * row["gift_kd"] + 0.25 * row["gift_ita"], rel=1e-5)
        # the total is the task loss plus exactly the gift term
        assert row["loss"] == pytest.approx(row["task"] + row["gift"], rel=1e-5, abs=1e-5)
    # 8 images in batches of 4: 2 teacher forwards per experience, none per iteration
    assert gift.teacher_image_forwards == 2 * 2
    assert gift.teacher_text_forwards == 2
    # the table of an experience's 8 synthetic images is in the run's cost ledger
    with torch.no_grad():
        embed = run.strategy.teachers.models["previous"].encode_text(["a photo"]).shape[1]
    assert gift.table_mb == pytest.approx(8 * embed * 4 / 2**20)
    assert results.meta["ledger"]["teacher_table_mb"] == pytest.approx(gift.table_mb)
    # frozen text tower (the tiny config trains the image tower only): student text once
    assert all(row["student_text_cached"] for row in probe.rows)
    assert results.matrix().shape == (3, 2)

    # The same run without the cached teacher: one teacher forward per iteration, same losses.
    run2, probe2 = make_run(tmp_path / "b", data_root, [gift_entry(tiny_pipe, shared_cache, cache_teacher=False)])
    execute(run2, quiet=True)
    assert run2.plugins[0].teacher_image_forwards == 2 * 3
    # Same model and batch at the first iteration: the cached embeddings give the same
    # losses. Later iterations drift slightly (batch-dependent float sums, amplified by Adam).
    first, first2 = probe.rows[0], probe2.rows[0]
    assert first2["gift_kd"] == pytest.approx(first["gift_kd"], rel=1e-6)
    assert first2["gift_ita"] == pytest.approx(first["gift_ita"], rel=1e-6)
    for a, b in zip(probe.rows, probe2.rows):
        assert b["gift_kd"] == pytest.approx(a["gift_kd"], rel=2e-3)
        assert b["gift_ita"] == pytest.approx(a["gift_ita"], rel=2e-3)


def test_kept_synthetic_images_are_read_once_and_give_the_same_run(tmp_path, tiny_pipe, data_root, shared_cache, monkeypatch):
    """The transformed synthetic set in memory (default ``cache_images_mb``) versus its files
    read at every batch (0): each file read once per experience instead of per batch, and the
    same losses at every iteration and the same weights (the tiny config augments: the same
    RNG draws too)."""
    from cl_proxyfda.generators.cache import SyntheticDataset

    reads: list[int] = []
    original = SyntheticDataset.__getitem__

    def read(self, i):
        reads.append(int(i))
        return original(self, i)

    monkeypatch.setattr(SyntheticDataset, "__getitem__", read)
    runs = {}
    for budget in (1024.0, 0.0):
        reads.clear()
        run, probe = make_run(tmp_path / f"mb{budget}", data_root, [gift_entry(tiny_pipe, shared_cache, cache_images_mb=budget)])
        execute(run, quiet=True)
        weights = torch.cat([p.detach().flatten() for p in run.model.parameters()])
        runs[budget] = (list(reads), probe.rows, weights, run.plugins[0])
    kept_reads, kept_rows, kept_weights, kept = runs[1024.0]
    read_reads, read_rows, read_weights, _ = runs[0.0]
    # 8 images, batches of 4, 3 iterations per experience
    assert kept_reads == ([0] + list(range(8))) * 2  # a size probe, then each image once
    assert len(read_reads) == (8 + 3 * 4) * 2  # the teacher's pass, then every batch from the files
    assert kept.teacher_image_forwards == 2 * 2
    assert len(kept_rows) == len(read_rows) == 2 * 3
    for a, b in zip(kept_rows, read_rows):
        assert a == b  # exactly: the same tensors reach the same computations
    assert torch.equal(kept_weights, read_weights)


def test_prompt_pool_never_holds_the_current_task():
    EMPTY = ArrayImageDataset(np.zeros((0, 4, 4, 3), dtype=np.uint8), [])
    tasks = [
        Task("a", ["red", "blue"], ["a red-ish {}.", "x {}"], EMPTY, EMPTY),
        Task("b", ["green", "circle"], ["a {} thing."], EMPTY, EMPTY),
        Task("c", ["pink"], ["pink {}"], EMPTY, EMPTY),
    ]
    stream = StreamData(tasks=tasks, base_concepts=["circle", "square"])
    pool0 = experience_prompt_pool(stream, 0, stream.base_concepts)
    assert pool0 == ["a photo of a circle.", "a photo of a square."]
    pool1 = experience_prompt_pool(stream, 1, stream.base_concepts)
    assert pool1 == ["a photo of a circle.", "a photo of a square.", "a red-ish red.", "a red-ish blue."]
    pool2 = experience_prompt_pool(stream, 2, stream.base_concepts)
    assert set(pool2) == set(pool1) | {"a green thing.", "a circle thing."}
    for i in range(3):
        assert not set(experience_prompt_pool(stream, i, stream.base_concepts)) & current_task_prompts(stream, i)
    # [choice] exclude_current_classes also drops the base concept "circle" while task b trains
    strict = experience_prompt_pool(stream, 1, stream.base_concepts, exclude_current_classes=True)
    assert strict == ["a photo of a square.", "a red-ish red.", "a red-ish blue."]


def test_dedupe_option_reaches_the_planned_pool(tmp_path):
    """Duplicates stay in the pool by default (official GIFT code); gift.dedupe drops them."""
    EMPTY = ArrayImageDataset(np.zeros((0, 4, 4, 3), dtype=np.uint8), [])
    tasks = [Task("a", ["cat", "dog"], ["a photo of a {}."], EMPTY, EMPTY), Task("b", ["pink"], ["pink {}"], EMPTY, EMPTY)]
    stream = StreamData(tasks=tasks, base_concepts=["cat", "cow"])
    kept = ["a photo of a cat.", "a photo of a cow.", "a photo of a cat.", "a photo of a dog."]
    assert experience_prompt_pool(stream, 1, stream.base_concepts) == kept
    assert experience_prompt_pool(stream, 1, stream.base_concepts, dedupe=True) == kept[:2] + kept[3:]
    assert GIFTParams().dedupe is False
    pools = {}
    for dedupe in (False, True):
        spec = GIFTParams(generator={"name": "world"}, images_per_experience=400, dedupe=dedupe).spec(str(tmp_path))
        assert spec.dedupe is dedupe
        plan = plan_experience(spec, stream, ("s", "default"), 1, spec.build_generator("cpu"))
        pools[dedupe] = plan
        assert set(plan.prompts) == set(kept)
    assert (pools[False].pool_size, pools[True].pool_size) == (4, 3)
    # kept twice, "a photo of a cat." is drawn about twice as often as each other prompt
    share = pools[False].prompts.count("a photo of a cat.") / 400
    assert 0.42 <= share <= 0.58  # 1/2 expected, sd 0.025
    assert 0.26 <= pools[True].prompts.count("a photo of a cat.") / 400 <= 0.41  # 1/3 expected, sd 0.024


def test_planned_prompts_of_a_run_exclude_the_current_task(tmp_path, tiny_pipe, data_root, shared_cache):
    cfg = parse_config(tiny_config(data_root, tmp_path, strategies=[gift_entry(tiny_pipe, shared_cache, images_per_experience=16)]))
    stream = STREAMS.build(cfg.stream.name, cfg.stream.args)
    spec = GIFTParams(**cfg.strategies[0].args).spec(cfg.run.output_dir)
    generator = spec.build_generator("cpu")  # planning never loads the pipeline
    plans = [plan_experience(spec, stream, stream_key(cfg.stream.name, cfg.stream.args), i, generator) for i in range(3)]
    assert generator.pipeline_calls == 0
    for plan in plans:
        assert plan.size == 16 and len(plan.seeds) == 16
        assert not set(plan.prompts) & current_task_prompts(stream, plan.experience)
        allowed = {f"a photo of a {c}." for c in BASE} | {
            t.templates[0].format(c) for t in stream.tasks[: plan.experience] for c in t.classnames
        }
        assert set(plan.prompts) <= allowed
    assert plans[0].pool_size == 3 and plans[1].pool_size == 3 + 3 and plans[2].pool_size == 3 + 6
    assert len(set(plans[2].prompts)) > 3  # earlier classes are drawn too
    # the plan depends on (seed, experience) only: the same on a second call, another with another seed
    again = plan_experience(spec, stream, stream_key(cfg.stream.name, cfg.stream.args), 2, generator)
    assert (again.prompts, again.seeds, again.folder) == (plans[2].prompts, plans[2].seeds, plans[2].folder)
    other = GIFTParams(**{**cfg.strategies[0].args, "seed": 1}).spec(cfg.run.output_dir)
    assert plan_experience(other, stream, ("image_folder", "default"), 2, generator).seeds != plans[2].seeds


def test_second_run_reuses_the_cache_without_generating(tmp_path, tiny_pipe, data_root):
    cache = tmp_path / "cache"
    stats = []
    for name in ("first", "second"):
        run, _ = make_run(tmp_path / name, data_root, [gift_entry(tiny_pipe, cache)], iterations=1)
        gift = run.plugins[0]

        class StatsProbe(SupervisedPlugin):
            def before_training_iteration(self, strategy, **kwargs):
                stats.append((name, dict(gift.generation_stats)))

        run.strategy.plugins.append(StatsProbe())
        execute(run, quiet=True)
    assert [s for n, s in stats if n == "first"] == [{"generated": 8, "dropped": 0, "reused": 0}] * 2
    assert [s for n, s in stats if n == "second"] == [{"generated": 0, "dropped": 0, "reused": 8}] * 2


def test_paper_doubled_weights_double_kd_ita_and_awc(tmp_path, tiny_pipe, data_root, shared_cache):
    rows = {}
    for doubled in (False, True):
        run, probe = make_run(
            tmp_path / str(doubled), data_root,
            [gift_entry(tiny_pipe, shared_cache, paper_doubled_weights=doubled), {"name": "awc", "weight": 0.5}],
            tasks=("warm",), iterations=1, model={"train_towers": ["image", "text"]},
        )
        execute(run, quiet=True)
        rows[doubled] = probe.rows[0]
        assert not probe.rows[0]["student_text_cached"]  # trained text tower: encoded per batch
        assert run.plugins[1].effective_weight(run.strategy) == pytest.approx(1.0 if doubled else 0.5)
    normal, double = rows[False], rows[True]
    assert double["gift_kd"] == pytest.approx(normal["gift_kd"], rel=1e-5)  # same batch, same model
    assert double["gift"] == pytest.approx(2 * normal["gift"], rel=1e-5)
    assert double["loss"] - double["task"] == pytest.approx(2 * (normal["loss"] - normal["task"]), rel=1e-4)


def test_checkpoint_state_loads_weights_only(tmp_path, tiny_pipe, data_root, shared_cache):
    run, _ = make_run(tmp_path, data_root, [gift_entry(tiny_pipe, shared_cache)], iterations=1)
    execute(run, quiet=True)
    ckpts = sorted((run.out_dir / "checkpoints").glob("*.pt"))
    assert ckpts
    state = torch.load(ckpts[-1], weights_only=True)
    gift_state = state["plugins"]["0:gift"]
    assert gift_state == {"experiences_prepared": 2}
    fresh, _ = make_run(tmp_path / "fresh", data_root, [gift_entry(tiny_pipe, shared_cache)], iterations=1)
    fresh.plugins[0].load_state_dict(gift_state)
    assert fresh.plugins[0].experiences_prepared == 2


def test_synthetic_images_use_the_models_eval_transform():
    model, _, pre_eval = build_task_model("cl-test-tiny", None)
    from PIL import Image

    image = Image.new("RGB", (48, 40), (200, 30, 90))
    assert torch.equal(eval_transform(model)(image), pre_eval(image))


def test_generator_and_options_are_validated(tiny_pipe, data_root, tmp_path):
    def parse(entry):
        return parse_config(tiny_config(data_root, tmp_path, strategies=[entry]))

    with pytest.raises(ConfigError, match=r"strategies\[0\]\.generator.*unknown generator 'painter'"):
        parse({"name": "gift", "generator": {"name": "painter"}})
    with pytest.raises(ConfigError, match=r"strategies\[0\]\.generator.*steps"):
        parse({"name": "gift", "generator": {"name": "diffusers", "steps": 0}})
    with pytest.raises(ConfigError, match=r"strategies\[0\]\.generator.*colour"):
        parse({"name": "gift", "generator": {"name": "diffusers", "colour": 1}})
    with pytest.raises(ConfigError, match=r"strategies\[0\]\.kd_wieght: unknown key"):
        parse({"name": "gift", "kd_wieght": 1.0})
    with pytest.raises(ConfigError, match="placeholder"):
        parse({"name": "gift", "base_template": "a photo"})
    defaults = GIFTParams()
    assert (defaults.images_per_experience, defaults.synthetic_batch_size, defaults.kd_weight, defaults.ita_weight) == (1000, 64, 1.0, 0.25)
    assert (defaults.kd_temperature, defaults.ita_label_smoothing, defaults.paper_doubled_weights, defaults.cache_teacher) == (2.0, 0.2, False, True)
    assert defaults.cache_images_mb == 1024.0  # the synthetic set kept in memory up to 1 GiB


def test_mtil_order1_gift_config_parses_and_builds_vit_b16():
    cfg = load_config(REPO / "configs" / "mtil_order1_gift.yaml", ["model.pretrained=none"])
    assert cfg.model.name == "ViT-B-16" and cfg.model.train_towers == ["image", "text"] and cfg.model.freeze_logit_scale
    assert cfg.stream.name == "mtil" and cfg.stream.args["order"] == "I"
    t = cfg.train
    assert (t.optimizer, t.weight_decay, t.iterations, t.warmup, t.schedule, t.lr, t.label_smoothing, t.batch_size) == (
        "adamw", 0.0, 1000, 100, "cosine", 1e-5, 0.2, 64,
    )
    assert t.lr_per_task == {"Aircraft": 5e-5, "MNIST": 5e-5}
    names = [s.name for s in cfg.strategies]
    assert names == ["gift", "awc"]
    gift = GIFTParams(**cfg.strategies[0].args)
    assert gift.generator.name == "diffusers" and gift.generator.args["model"] in (
        "runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5",
    )
    assert gift.images_per_experience == 1000 and gift.base_concepts == "imagenet"
    model, _, _ = build_task_model(cfg.model.name, cfg.model.pretrained, (), cfg.model.train_towers, cfg.model.freeze_logit_scale)
    trainable = {n for n, p in model.clip.named_parameters() if p.requires_grad}
    assert "logit_scale" not in trainable
    assert any(n.startswith("visual.") for n in trainable) and any(n.startswith("transformer.") for n in trainable)


DEMO_OVERRIDES = [
    "model.pretrained=none", "run.device=cpu",
    "stream.tasks=[counting, shades]", "stream.train_per_class=2", "stream.test_per_class=2",
    "stream.control_per_class=1", "stream.reference_size=0",
    "train.iterations=2", "train.warmup=0", "train.batch_size=8", "eval.batch_size=64",
    "strategies.0.images_per_experience=8", "strategies.0.synthetic_batch_size=4",
    "logging.wandb.mode=disabled", "logging.plots=false", "logging.progress=false",
]


def test_demo_gift_config_parses():
    cfg = load_config(REPO / "configs" / "demo_gift.yaml")
    assert cfg.model.name == "demo-clip-tiny" and cfg.model.pretrained == "demo" and cfg.stream.name == "demo"
    assert [s.name for s in cfg.strategies] == ["gift"]
    gift = GIFTParams(**cfg.strategies[0].args)
    assert gift.generator.name == "world" and gift.base_concepts == "stream"


def test_demo_gift_awc_config_runs_downsized_with_the_world_renderer(tmp_path):
    cfg = load_config(REPO / "configs" / "demo_gift_awc.yaml", DEMO_OVERRIDES + [f"run.output_dir={tmp_path / 'runs'}"])
    assert [s.name for s in cfg.strategies] == ["gift", "awc"]
    run = build_run(cfg)
    results = execute(run, quiet=True)
    gift, awc = run.plugins
    assert gift.plan.pool_size == 256 + 4  # the world's base concepts + the counting task's classes
    assert not set(gift.plan.prompts) & current_task_prompts(run.stream, 1)
    assert math.isfinite(gift.loss_terms["gift"]) and gift.loss_terms["gift_kd"] > 0
    assert math.isfinite(awc.loss_terms["awc"]) and awc.gradient_calls == 2 * 2
    assert results.matrix().shape == (3, 2)
    images = sorted((tmp_path / "runs" / "synthetic").glob("world-*/demo/default/experience_00*/images/*.png"))
    assert len(images) == 2 * 8
