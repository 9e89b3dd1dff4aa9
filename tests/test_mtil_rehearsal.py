"""Full-size rehearsals of the shipped MTIL configs on CPU (marked ``slow``, run in CI).

1. Every MTIL task with its real vocabulary (class names, counts, templates), read
   through torchvision's own dataset classes from miniature copies of the on-disk
   layouts, run through each shipped MTIL config's strategies with the tiny
   ``cl-test-tiny`` model: the text tower must encode one prompt per class per training
   step and each task's template ensemble once per text-tower change in evaluation.
   The activation memory those counts mean at ViT-B/16 size is printed.
2. ViT-B/16 (random weights) with each shipped config's strategies on two small tasks:
   time and peak memory per phase, under 12 GB.

What is changed in a shipped config (and nothing else): the model (tiny or random
ViT-B/16), device cpu, the data root, 2 iterations at a small batch (the class-balanced
sampler's m x n and Proxy-FDA's K follow the batch), learning-rate overrides of the
tasks run only, no checkpoints/plots/W&B, and for
GIFT the generator (the tiny diffusers pipeline saved to disk instead of SD-1.5, fp32),
a small synthetic set and a synthetic batch equal to the real one.
"""
from __future__ import annotations

import gc
import os
import resource
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from avalanche.core import SupervisedPlugin

from cl_proxyfda.config import parse_config
from cl_proxyfda.yaml_files import read_yaml
from cl_proxyfda.models import create_clip
from cl_proxyfda.runner import build_run, execute
from mtil_layouts import write_mtil_copy

pytestmark = pytest.mark.slow

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = ["mtil_order1_proxyfda.yaml", "mtil_order1_gift.yaml"]
GIB = 2**30


# ------------------------------------------------------------------ helpers
def rehearsal_config(
    name: str,
    stream: dict[str, Any],
    out: Path,
    pipe: Path,
    *,
    model: str,
    batch: int,
    synthetic_images: int,
    generator: dict[str, Any] | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """A shipped config with only the rehearsal's overrides applied (module docstring)."""
    data = read_yaml(CONFIG_DIR / name)
    data["run"] = {**data["run"], "device": "cpu", "output_dir": str(out), "threads": 1}
    if precision is not None:
        data["run"]["precision"] = precision
    data["model"] = {**data["model"], "name": model, "pretrained": "none"}
    data["stream"] = {**data["stream"], **stream}
    train = data["train"]
    train.update(iterations=2, batch_size=batch, workers=0)
    train["lr_per_task"] = {k: v for k, v in train.get("lr_per_task", {}).items() if k in stream["tasks"]}
    if train.get("sampler") == "class_balanced":
        train.update(classes_per_batch=batch // 2, images_per_class=2)
    for entry in data["strategies"]:
        if entry["name"] == "proxy_fda":
            entry["k"] = min(entry.get("k", 8), batch - 1)  # < batch size, > images per class
        if entry["name"] == "gift":
            entry["generator"] = {**entry["generator"], "model": str(pipe), "dtype": "fp32", "progress": False, **(generator or {})}
            entry.update(images_per_experience=synthetic_images, synthetic_batch_size=batch, cache_dir=str(out / "synthetic"))
    data["eval"] = {**data.get("eval", {}), "batch_size": 64}
    data["logging"] = {"wandb": {"mode": "disabled"}, "plots": False, "progress": False}
    data["checkpoint"] = {"enabled": False}
    return data


class PromptLog(SupervisedPlugin):
    """Prompts the student's text tower encodes, per training step and per evaluation row.

    Evaluation rows happen between experiences, so row i's count is what the class-head
    counter gained between the end of experience i-1 (or the start) and the start of
    experience i (or the end of the run).
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.steps: list[tuple[int, int, int]] = []  # (experience, head prompts, other prompts)
        self.marks: list[int] = [model.head_prompts_encoded]  # head counter at the row boundaries

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.marks.append(self.model.head_prompts_encoded)

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._start = (self.model.head_prompts_encoded, self.model.prompts_encoded)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        heads = self.model.head_prompts_encoded - self._start[0]
        other = self.model.prompts_encoded - self._start[1] - heads
        self.steps.append((strategy.experience_index, heads, other))

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.marks.append(self.model.head_prompts_encoded)

    def rows(self) -> list[int]:
        marks = self.marks + [self.model.head_prompts_encoded]
        return [marks[2 * i + 1] - marks[2 * i] for i in range(len(marks) // 2)]


def text_mib_per_prompt(model_name: str = "ViT-B-16", small: int = 2, large: int = 4) -> float:
    """Activation memory of a text-tower forward + backward, MiB per prompt.

    Method: the bytes of the distinct tensor storages autograd saves for the backward
    pass (``torch.autograd.graph.saved_tensors_hooks``), for ``small`` and ``large``
    prompts; the slope is the per-prompt cost (weights saved for the backward cancel).
    """
    clip, _, _, tokenizer = create_clip(model_name, None)
    clip.requires_grad_(True)

    def saved_bytes(n: int) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        tokens = tokenizer([f"a photo of a thing number {i}." for i in range(n)])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = clip.encode_text(tokens)
        out.sum().backward()
        return sum(storages.values())

    return (saved_bytes(large) - saved_bytes(small)) / (large - small) / 2**20


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


class PhaseMeter:
    """Wall time and peak resident memory per named phase (RSS sampled every 20 ms)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak: dict[str, float] = defaultdict(float)
        self.phase = "set-up"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak[self.phase] = max(self.peak[self.phase], rss_gib())

    def timed(self, phase: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            outer, self.phase = self.phase, phase
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
                self.peak[phase] = max(self.peak[phase], rss_gib())
                self.phase = outer

        return wrapper

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------- every task, tiny model
@pytest.fixture(scope="module")
def mtil_copy(tmp_path_factory) -> dict[str, Any]:
    return write_mtil_copy(tmp_path_factory.mktemp("mtil") / "data", per_class=1)


@pytest.fixture(scope="module")
def mib_per_prompt() -> float:
    value = text_mib_per_prompt()
    # ViT-B/16's text tower: 12 blocks, width 512, 77 tokens; a block keeps roughly
    # ten 77 x 512 float tensors, the 77 x 2048 MLP ones and 8 heads' 77 x 77 attention
    assert 10 < value < 60, value
    return value


@pytest.mark.parametrize("config_name", SHIPPED)
def test_every_mtil_task_encodes_the_protocol_prompts(config_name, mtil_copy, tiny_pipe, mib_per_prompt, tmp_path, capsys):
    start = time.perf_counter()
    data = rehearsal_config(
        config_name, mtil_copy, tmp_path, tiny_pipe, model="cl-test-tiny", batch=4, synthetic_images=8, generator={"steps": 2}
    )
    cfg = parse_config(data)
    assert cfg.model.train_towers == read_yaml(CONFIG_DIR / config_name)["model"]["train_towers"]
    run = build_run(cfg, tmp_path / "run")
    tasks = run.stream.tasks
    assert [t.name for t in tasks] == mtil_copy["tasks"] and len(tasks) == 11
    log = PromptLog(run.model)
    run.strategy.plugins.append(log)
    execute(run, quiet=True)

    classes = [len(t.classnames) for t in tasks]
    ensemble = [len(t.classnames) * len(t.templates) for t in tasks]
    text_trains = "text" in cfg.model.train_towers
    # training: one prompt per class (the first template), every step when the text
    # tower trains, else once per task (a cached head: the text tower never changes;
    # a one-template task reuses its evaluation head, the same head)
    assert [i for i, _, _ in log.steps] == [i for i in range(11) for _ in range(2)]
    gift = any(s.name == "gift" for s in cfg.strategies)
    for step, (i, heads, other) in enumerate(log.steps):
        if text_trains:
            expected = classes[i]
        else:
            expected = classes[i] if step % 2 == 0 and len(tasks[i].templates) > 1 else 0
        assert heads == expected, (tasks[i].name, heads, expected)
        # GIFT's ITA encodes the synthetic batch's distinct prompts with gradients
        assert (1 <= other <= cfg.train.batch_size) if (gift and text_trains) else other == 0, (tasks[i].name, other)
    # evaluation: each task's template ensemble once per text-tower change
    rows = log.rows()
    assert len(rows) == 12
    assert rows[0] == sum(ensemble)
    assert rows[1:] == [sum(ensemble) if text_trains else 0] * 11

    with capsys.disabled():
        print(f"\n[{config_name}] every MTIL task, cl-test-tiny: {time.perf_counter() - start:.0f} s; "
              f"ViT-B/16 text fwd+bwd activations {mib_per_prompt:.1f} MiB/prompt "
              "(autograd saved-tensor bytes, slope over 2 vs 4 prompts)")
        print(f"{'task':<13}{'classes':>8}{'templates':>10}{'prompts/step first':>20}{'ensemble':>10}{'GiB/step first':>16}{'ensemble':>10}")
        for t, c, e in zip(tasks, classes, ensemble):
            print(f"{t.name:<13}{c:>8}{len(t.templates):>10}{c:>20}{e:>10}{c * mib_per_prompt / 1024:>16.2f}{e * mib_per_prompt / 1024:>10.2f}")


# ------------------------------------------------------ full size, few classes
@pytest.mark.parametrize("config_name", SHIPPED)
def test_vit_b16_rehearsal_time_and_memory(config_name, tiny_pipe, tmp_path, capsys):
    stream = write_mtil_copy(tmp_path / "data", tasks=["EuroSAT", "MNIST"], per_class=1)
    data = rehearsal_config(
        config_name, stream, tmp_path, tiny_pipe, model="ViT-B-16", batch=8, synthetic_images=16,
        precision="fp32",  # bf16 autocast on a CPU without bf16 units is no rehearsal of a GPU's
    )
    # The config's steps, guidance and image size (none set: the pipeline's own, 512 for
    # SD-1.5, 32 for the tiny one; the tiny one at 512 has 256 x 256 latents, not 64 x 64,
    # and takes minutes per image on CPU).
    cfg = parse_config(data)
    gc.collect()  # the previous rehearsal's models (teachers hold reference cycles)
    meter = PhaseMeter()
    start = time.perf_counter()
    try:
        run = build_run(cfg, tmp_path / "run")
        model = run.model
        meter.seconds["set-up"] = time.perf_counter() - start
        meter.phase = "other"  # results, hard-class-mining features, between the phases
        # text heads: evaluation heads (ensemble, no grad) and one training head fwd+bwd
        def heads() -> None:
            model.eval()
            with torch.no_grad():
                for t in range(len(run.stream.tasks)):
                    model.class_embeddings(t)
            model.train()
            for t in range(len(run.stream.tasks)):
                head = model.class_embeddings(t)
                if head.requires_grad:
                    head.sum().backward()
            model.zero_grad(set_to_none=True)
            model.text_changed()

        meter.timed("text heads", heads)()
        run.strategy.train = meter.timed("training", run.strategy.train)
        run.evaluator.accuracy = meter.timed("evaluation", run.evaluator.accuracy)
        for plugin in run.plugins:
            if getattr(plugin, "name", "") == "gift":  # text-to-image, loading, teacher embeddings of the set
                plugin.before_training_exp = meter.timed("generation", plugin.before_training_exp)
        execute(run, quiet=True)
    finally:
        meter.stop()
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    gen = meter.seconds.get("generation", 0.0)
    with capsys.disabled():
        print(f"\n[{config_name}] ViT-B/16 random weights, EuroSAT + MNIST copies, 2 iterations x batch 8, "
              f"towers {cfg.model.train_towers}: {total:.0f} s, process peak RSS {peak:.1f} GiB")
        meter.seconds["other"] = total - sum(v for k, v in meter.seconds.items() if k != "generation")
        for phase in ("set-up", "text heads", "training", "generation", "evaluation", "other"):
            if phase in meter.seconds:
                secs = meter.seconds[phase] - (gen if phase == "training" else 0.0)  # generation runs inside train()
                print(f"  {phase:<11} {secs:7.1f} s   peak RSS {meter.peak[phase]:5.2f} GiB")
    assert peak < 12, peak
    assert meter.seconds["training"] > 0 and meter.seconds["evaluation"] > 0
