"""The zscl strategy: finite terms, the pre-trained teacher, weight ensembling, reference
sets from the stream or a folder, and checkpointable state."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from cl_proxyfda.benchmarks.stream import ArrayImageDataset, StreamData  # noqa: E402
from cl_proxyfda.config import parse_config  # noqa: E402
from cl_proxyfda.errors import ConfigError, UserError  # noqa: E402
from cl_proxyfda.losses.zscl import zscl_distillation  # noqa: E402
from cl_proxyfda.runner import build_run, execute  # noqa: E402
from cl_proxyfda.strategies.anchors import trainable_named_parameters  # noqa: E402
from cl_proxyfda.strategies.base import RunContext  # noqa: E402
from cl_proxyfda.strategies.zscl import ZSCLParams, ZSCLPlugin, reference_images_of, reference_texts_of  # noqa: E402
from cl_proxyfda.teacher import unwrap  # noqa: E402
from conftest import TINY_TASKS, tiny_config, write_image_folder_stream  # noqa: E402


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_image_folder_stream(tmp_path_factory.mktemp("stream") / "data", TINY_TASKS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ref")
    rng = np.random.default_rng(0)
    for i in range(10):
        sub = root / "images" / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    names = root / "classes.txt"
    names.write_text("# reference classes\ncircle\nsquare\n\nstar\ntriangle\nring\n", encoding="utf-8")
    return root / "images", names


def zscl_entry(reference, **over) -> dict:
    folder, names = reference
    return {"name": "zscl", "reference": "folder", "reference_folder": str(folder), "reference_classnames": str(names), "batch_size": 4, **over}


def make_run(tmp: Path, root: Path, strategies: list, tasks=("warm",), iterations: int = 3, towers=("image",)):
    train = {"iterations": iterations, "batch_size": 6, "lr": 1e-2}
    cfg = tiny_config(root, tmp / "runs", strategies=strategies, train=train, model={"train_towers": list(towers)})
    cfg["stream"]["tasks"] = list(tasks)
    return build_run(parse_config(cfg))


class Snapshots(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.before: dict[str, torch.Tensor] = {}
        self.after_each: list[dict[str, torch.Tensor]] = []
        self.terms: list[dict[str, float]] = []

    def before_training_exp(self, strategy, **kwargs):
        self.before = {n: p.detach().clone() for n, p in trainable_named_parameters(strategy)}

    def after_training_iteration(self, strategy, **kwargs):
        self.after_each.append({n: p.detach().clone() for n, p in trainable_named_parameters(strategy)})
        zscl = next(p for p in strategy.plugins if getattr(p, "name", "") == "zscl")
        self.terms.append(dict(zscl.loss_terms))


def test_terms_are_finite_and_l2_grows_from_zero(tmp_path, data_root, reference):
    run = make_run(tmp_path, data_root, [zscl_entry(reference, weight_ensemble=False)], tasks=("warm", "cool"), towers=("image", "text"))
    snaps = Snapshots()
    run.strategy.plugins.append(snaps)
    results = execute(run, quiet=True)
    zscl = run.plugins[0]
    assert len(snaps.terms) == 2 * 3
    for t in snaps.terms:
        assert math.isfinite(t["zscl_distill"]) and t["zscl_distill"] > 0
        assert math.isfinite(t["zscl_l2"]) and t["zscl_l2"] >= 0
    assert snaps.terms[0]["zscl_l2"] == 0.0 and snaps.terms[1]["zscl_l2"] > 0  # start-of-experience anchor
    assert snaps.terms[3]["zscl_l2"] == 0.0  # re-anchored at experience 2
    assert np.isfinite(results.matrix()).all()
    assert zscl.teacher_text_forwards == 1  # the teacher's reference texts once per run
    assert zscl.texts == [f"a photo of a {c}." for c in ("circle", "square", "star", "triangle", "ring")]
    assert len(zscl.images) == 10


def test_teacher_is_the_pretrained_model(tmp_path, data_root, reference):
    run = make_run(tmp_path, data_root, [zscl_entry(reference)], tasks=("warm", "cool"), iterations=2)
    execute(run, quiet=True)
    teacher = run.strategy.teachers.models["pretrained"]
    initial = run.strategy.teachers.initial_state
    assert all(torch.equal(v, initial[k]) for k, v in teacher.state_dict().items())
    assert "previous" not in run.strategy.teachers.models


def test_weight_ensembling_loads_the_running_average(tmp_path, data_root, reference):
    run = make_run(tmp_path / "we", data_root, [zscl_entry(reference, ensemble_every=1)], iterations=3)
    snaps = Snapshots()
    run.strategy.plugins.append(snaps)
    execute(run, quiet=True)
    assert len(snaps.after_each) == 3
    final = dict(trainable_named_parameters(run.strategy))
    trained = snaps.after_each[-1]
    moved = 0.0
    for name, p in final.items():
        expected = (snaps.before[name] + sum(s[name] for s in snaps.after_each)) / 4
        assert torch.allclose(p.detach(), expected, atol=1e-6), name
        moved = max(moved, float((trained[name] - p.detach()).abs().max()))
    assert moved > 1e-4  # the average differs from the last trained weights

    every2 = make_run(tmp_path / "we2", data_root, [zscl_entry(reference, ensemble_every=2)], iterations=3)
    snaps2 = Snapshots()
    every2.strategy.plugins.append(snaps2)
    execute(every2, quiet=True)
    for name, p in dict(trainable_named_parameters(every2.strategy)).items():
        expected = (snaps2.before[name] + snaps2.after_each[1][name]) / 2  # snapshot at iteration 2 only
        assert torch.allclose(p.detach(), expected, atol=1e-6), name


def test_state_round_trip_with_weights_only(tmp_path, data_root, reference):
    run = make_run(tmp_path, data_root, [zscl_entry(reference, ensemble_every=1)], iterations=2)
    execute(run, quiet=True)
    zscl = run.plugins[0]
    saved = torch.load(sorted((run.out_dir / "checkpoints").glob("*.pt"))[-1], weights_only=True)["plugins"]["0:zscl"]
    assert saved["iteration"] == 2 and saved["ensemble"]["count"] == 3
    fresh = ZSCLPlugin(ZSCLParams(**{k: v for k, v in zscl_entry(reference).items() if k != "name"}), run=RunContext(stream=run.stream))
    fresh.load_state_dict(saved)
    assert fresh.iteration == 2 and fresh.ensemble.count == 3 and fresh.ensemble.every == 1
    assert all(torch.equal(fresh.anchor[n], zscl.anchor[n]) for n in zscl.anchor)
    assert all(torch.equal(fresh.ensemble.average[n], zscl.ensemble.average[n]) for n in zscl.ensemble.average)


def test_reference_from_the_stream_and_text_sources(reference):
    images = ArrayImageDataset(np.zeros((5, 8, 8, 3), dtype=np.uint8), [0] * 5)
    stream = StreamData(tasks=[], reference=images, base_concepts=["red circle", "blue square"])
    params = ZSCLParams()
    assert reference_images_of(params, stream) is images
    assert reference_texts_of(params, stream) == ["a photo of a red circle.", "a photo of a blue square."]
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    imagenet = reference_texts_of(ZSCLParams(texts="imagenet"), stream)
    assert len(imagenet) == 1000 and imagenet[0] == "a photo of a tench."  # ZSCL's code keeps the 2 repeated names
    assert imagenet == [f"a photo of a {c}." for c in IMAGENET_CLASSNAMES]
    assert len(reference_texts_of(ZSCLParams(texts="imagenet", unique_texts=True), stream)) == len(set(IMAGENET_CLASSNAMES)) == 998
    with_file = ZSCLParams(reference_classnames=str(reference[1]), template="art of a {}")
    assert reference_texts_of(with_file, stream)[0] == "art of a circle"
    with pytest.raises(UserError, match="no reference images"):
        reference_images_of(params, StreamData(tasks=[]))
    with pytest.raises(UserError, match="does not exist"):
        reference_images_of(ZSCLParams(reference="folder", reference_folder="/nonexistent/ref"), stream)


def test_options_are_validated(tmp_path, data_root):
    def parse(entry):
        return parse_config(tiny_config(data_root, tmp_path, strategies=[entry]))

    with pytest.raises(ConfigError, match=r"strategies\[0\].*reference_folder: required"):
        parse({"name": "zscl", "reference": "folder"})
    with pytest.raises(ConfigError, match=r"strategies\[0\]\.temprature: unknown key"):
        parse({"name": "zscl", "temprature": 2})
    defaults = ZSCLParams()
    assert (defaults.temperature, defaults.ensemble_every, defaults.weight_ensemble, defaults.l2_weight) == (2.0, 100, True, 1.0)
    assert (defaults.texts_per_batch, defaults.student_text, defaults.unique_texts) == (None, "teacher", False)
    with pytest.raises(ConfigError, match=r"strategies\[0\]\.student_text"):
        parse({"name": "zscl", "student_text": "own"})
    with pytest.raises(ConfigError, match=r"strategies\[0\]\.texts_per_batch"):
        parse({"name": "zscl", "texts_per_batch": 1})


def test_official_objective_by_hand():
    """ZSCL's loss written out with plain floats: student image features against the
    teacher's text embeddings, T^2 * soft cross-entropy to the teacher's softmax(./T),
    mean over rows, image-to-text plus text-to-image."""
    u = [[1.0, 0.0], [0.6, 0.8]]  # student image features (N = 2)
    u0 = [[0.8, 0.6], [0.0, 1.0]]  # teacher image features
    w0 = [[1.0, 1.0], [-1.0, 2.0], [3.0, -1.0]]  # teacher text embeddings (K = 3), not normalised
    tau, T = 5.0, 2.0

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    def softmax(row):
        e = [math.exp(x) for x in row]
        return [x / sum(e) for x in e]

    s = [[tau * dot(unit(a), unit(b)) for b in w0] for a in u]
    t = [[tau * dot(unit(a), unit(b)) for b in w0] for a in u0]

    def kd(student_rows, teacher_rows):
        total = 0.0
        for sr, tr in zip(student_rows, teacher_rows):
            p, q = softmax([x / T for x in tr]), softmax([x / T for x in sr])
            total += -sum(pi * math.log(qi) for pi, qi in zip(p, q))
        return T * T * total / len(student_rows)

    def transpose(m):
        return [list(col) for col in zip(*m)]

    i2t, t2i = kd(s, t), kd(transpose(s), transpose(t))
    args = (torch.tensor(u), torch.tensor(u0), torch.tensor(w0), tau)
    assert zscl_distillation(*args, temperature=T).item() == pytest.approx(i2t + t2i, rel=1e-5)
    assert zscl_distillation(*args, temperature=T, text_to_image=False).item() == pytest.approx(i2t, rel=1e-5)
    assert zscl_distillation(*args, temperature=T, image_to_text=False).item() == pytest.approx(t2i, rel=1e-5)
    # Soft cross-entropy, not KL: the two differ by the teacher's entropy (here > 0.1).
    entropy = T * T * sum(-sum(p * math.log(p) for p in softmax([x / T for x in row])) for row in t) / len(t)
    assert entropy > 0.1 and zscl_distillation(*args, temperature=T, text_to_image=False).item() != pytest.approx(i2t - entropy, rel=1e-2)


class DistillationSpy:
    """Wraps the plugin's zscl_distillation: records its text inputs and the gradient
    of each distillation term on the text tower and the image tower."""

    def __init__(self, monkeypatch) -> None:
        import cl_proxyfda.strategies.zscl as module

        self.real = module.zscl_distillation
        self.calls: list[dict] = []
        self.model = None
        monkeypatch.setattr(module, "zscl_distillation", self)

    def __call__(self, u, u0, teacher_text, logit_scale, student_text=None, **kw):
        loss = self.real(u, u0, teacher_text, logit_scale, student_text=student_text, **kw)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True, retain_graph=True)
        norm = {"text": 0.0, "image": 0.0}
        for (n, _), g in zip(named, grads):
            if g is not None:
                norm["image" if ".visual." in f".{n}" else "text"] += float(g.abs().sum())
        self.calls.append({"teacher_text": teacher_text.detach().clone(), "student_text": student_text, "grad": norm})
        return loss


def count_text_encodings(monkeypatch) -> list[tuple[object, list[str]]]:
    """Every encode_text call of any task model (student or teacher) with its texts."""
    from cl_proxyfda.models import CLIPTaskModel

    calls: list[tuple[object, list[str]]] = []
    real = CLIPTaskModel.encode_text

    def spy(self, texts, normalize=True):
        calls.append((self, list(texts)))
        return real(self, texts, normalize)

    monkeypatch.setattr(CLIPTaskModel, "encode_text", spy)
    return calls


def test_default_uses_all_texts_and_the_cached_teacher_text(tmp_path, data_root, reference, monkeypatch):
    spy = DistillationSpy(monkeypatch)
    encodings = count_text_encodings(monkeypatch)
    run = make_run(tmp_path, data_root, [zscl_entry(reference, weight_ensemble=False)], tasks=("warm", "cool"), towers=("image", "text"))
    spy.model = unwrap(run.strategy.model)
    execute(run, quiet=True)
    zscl = run.plugins[0]
    teacher = run.strategy.teachers.models["pretrained"]
    assert len(zscl.texts) == 5 and zscl.params.batch_size == 4  # the old default drew batch_size = 4 texts
    assert len(spy.calls) == 2 * 3
    with torch.no_grad():
        expected = teacher.encode_text(zscl.texts).float()
    for call in spy.calls:  # every iteration: all 5 texts, the teacher's embeddings, no student text
        assert call["student_text"] is None and call["teacher_text"].shape == expected.shape
        assert torch.allclose(call["teacher_text"], expected, atol=1e-6)
        assert call["grad"]["text"] == 0.0 and call["grad"]["image"] > 0  # no gradient into the text tower
    encodings.pop()  # the check above
    by_teacher = [texts for model, texts in encodings if model is teacher]
    assert by_teacher == [zscl.texts]  # encoded once for the whole run (2 experiences, 6 iterations)
    by_student = [texts for model, texts in encodings if model is spy.model]
    assert by_student and not any(set(texts) & set(zscl.texts) for texts in by_student)  # the student only encodes class prompts
    assert zscl.teacher_text_forwards == 1


def test_subset_and_student_text_options_restore_the_old_behaviour(tmp_path, data_root, reference, monkeypatch):
    spy = DistillationSpy(monkeypatch)
    entry = zscl_entry(reference, weight_ensemble=False, texts_per_batch=3, student_text="student")
    run = make_run(tmp_path, data_root, [entry], towers=("image", "text"))
    spy.model = unwrap(run.strategy.model)
    execute(run, quiet=True)
    zscl = run.plugins[0]
    teacher = run.strategy.teachers.models["pretrained"]
    with torch.no_grad():
        full = teacher.encode_text(zscl.texts).float()
    picked = []
    for call in spy.calls:
        tt, st = call["teacher_text"], call["student_text"]
        assert tt.shape == (3, full.shape[1]) and st is not None and st.shape == tt.shape
        rows = [int(torch.cdist(r[None], full).argmin()) for r in tt]
        assert torch.allclose(tt, full[rows], atol=1e-6)
        picked.append(tuple(rows))
        assert call["grad"]["text"] > 0 and call["grad"]["image"] > 0  # the student's text tower is distilled
    assert len(set(picked)) > 1  # a fresh draw each iteration

    # With a frozen text tower the student's text embeddings are the teacher's.
    spy.calls.clear()
    frozen = make_run(tmp_path / "frozen", data_root, [entry], towers=("image",), iterations=1)
    spy.model = unwrap(frozen.strategy.model)
    execute(frozen, quiet=True)
    assert len(spy.calls) == 1 and spy.calls[0]["student_text"] is None and spy.calls[0]["teacher_text"].shape[0] == 3


def test_cached_teacher_serves_the_same_embeddings_once_per_run(tmp_path, data_root, reference):
    """cache_teacher: the pre-trained teacher embeds the 10 reference images once for the
    whole run (3 batches of 4) and the distillation terms equal those of per-batch
    encoding (same batches, same teacher: only float summation order may differ)."""
    terms = {}
    for cached in (False, True):
        entry = zscl_entry(reference, weight_ensemble=False, l2_weight=0.0, cache_teacher=cached)
        run = make_run(tmp_path / str(cached), data_root, [entry], tasks=("warm", "cool"), iterations=3)
        snaps = Snapshots()
        run.strategy.plugins.append(snaps)
        results = execute(run, quiet=True)
        zscl = run.plugins[0]
        terms[cached] = [t["zscl_distill"] for t in snaps.terms]
        table_mb = results.meta["ledger"]["teacher_table_mb"]
        if cached:
            assert zscl._teacher_image is not None and zscl._teacher_image.shape[0] == 10
            assert zscl.teacher_image_forwards == 3  # ceil(10 / 4), once for two experiences
            assert table_mb == pytest.approx(zscl._teacher_image.numel() * 4 / 2**20)  # in the run's cost ledger
        else:
            assert zscl._teacher_image is None and zscl.teacher_image_forwards == 2 * 3  # one per iteration
            assert table_mb == 0.0
    assert len(terms[True]) == 6
    assert np.allclose(terms[True], terms[False], rtol=1e-5, atol=1e-6)
