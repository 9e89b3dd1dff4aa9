"""Side-data batches of GIFT, ZSCL and Infusing: the same indices in the same order as
before the shared helper (pinned on the code before the refactor), and the helper's own
contract (seeded, endless, one disjoint share of every global batch per rank)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from cl_proxyfda.benchmarks.samplers import RandomBatchSampler
from cl_proxyfda.config import parse_config
from cl_proxyfda.distributed import DistContext
from cl_proxyfda.runner import build_run, execute
from cl_proxyfda.side_data import SideBatches, embed_images
from cl_proxyfda.strategies import infusing as infusing_module
from cl_proxyfda import synthetic
from cl_proxyfda.synthetic import seeded_batches
from conftest import tiny_config


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """Every index the side-data datasets are read at, in order (workers: 0)."""
    seen: list[int] = []
    transformed, indexed = synthetic.TransformedImages.__getitem__, infusing_module.IndexedImages.__getitem__

    def read_transformed(self, i):
        seen.append(int(i))
        return transformed(self, i)

    def read_indexed(self, i):
        out = indexed(self, i)
        seen.append(int(out[1]))
        return out

    monkeypatch.setattr(synthetic.TransformedImages, "__getitem__", read_transformed)
    monkeypatch.setattr(infusing_module.IndexedImages, "__getitem__", read_indexed)
    return seen


def image_folder(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    return root


def run_of(tmp: Path, root: Path, strategies: list, tasks=("warm", "cool"), iterations: int = 3, batch_size: int = 6):
    cfg = tiny_config(root, tmp / "runs", strategies=strategies, train={"iterations": iterations, "batch_size": batch_size})
    cfg["stream"]["tasks"] = list(tasks)
    return build_run(parse_config(cfg))


# ------------------------------------------------------- pinned plugin side data
ZSCL_PINNED = [3, 6, 0, 5, 4, 9, 2, 7, 1, 8, 9, 7, 8, 0, 1, 6, 7, 3, 5, 4, 9, 2, 1, 5]
GIFT_PINNED = [0, 1, 2, 3, 4, 5, 2, 4, 3, 5, 1, 0, 0, 1, 2, 5, 4, 3, 0, 1, 2, 3, 4, 5, 0, 5, 3, 4, 1, 2, 0, 1, 2, 3, 5, 4]
INFUSING_PINNED = [
    *range(16), 14, 3, 10, 4, 2, 9, 8, 12, 11, 5, 7, 15, 1, 0, 15,
    8, 7, 15, 10, 0, 9, 1, 5, 14, 4, 3, 2, 12, 11, 7,
]


def test_zscl_reference_batches_are_pinned(tmp_path, data_root, reads):
    folder = image_folder(tmp_path / "ref", 10, 0)
    names = tmp_path / "classes.txt"
    names.write_text("circle\nsquare\nstar\n", encoding="utf-8")
    entry = {"name": "zscl", "reference": "folder", "reference_folder": str(folder), "reference_classnames": str(names), "batch_size": 4,
             "cache_images_mb": 0}  # the files read at every batch (the plan as it reads them)
    run = run_of(tmp_path, data_root, [entry])
    execute(run, quiet=True)
    assert reads == ZSCL_PINNED  # 2 experiences x 3 iterations x 4 images


def test_gift_synthetic_batches_are_pinned(tmp_path, tiny_pipe, data_root, reads):
    entry = {
        "name": "gift",
        "generator": {"name": "diffusers", "model": str(tiny_pipe), "steps": 2, "guidance": 1.0, "progress": False},
        "images_per_experience": 6,
        "synthetic_batch_size": 4,
        "base_concepts": ["circle", "square", "star"],
        "cache_dir": str(tmp_path / "cache"),
        "cache_images_mb": 0,  # the files read at every batch (the plan as it reads them)
    }
    run = run_of(tmp_path, data_root, [entry])
    execute(run, quiet=True)
    # per experience: the teacher's pass over the 6 images, then 3 batches of 4
    assert reads == GIFT_PINNED


def test_kept_side_data_is_read_once_per_experience_with_the_same_plan(tmp_path, data_root, reads, monkeypatch):
    """ZSCL's reference images in memory (the default budget): each file is read once per
    experience (after one size probe), and the batches are cut from memory in the pinned plan."""
    folder = image_folder(tmp_path / "ref", 10, 0)
    names = tmp_path / "classes.txt"
    names.write_text("circle\nsquare\nstar\n", encoding="utf-8")
    entry = {"name": "zscl", "reference": "folder", "reference_folder": str(folder), "reference_classnames": str(names), "batch_size": 4}
    run = run_of(tmp_path, data_root, [entry])
    drawn: list[int] = []
    original = SideBatches.next

    def record(self):
        x, index = original(self)
        drawn.extend(index.tolist())
        return x, index

    monkeypatch.setattr(SideBatches, "next", record)
    execute(run, quiet=True)
    assert reads == ([0] + list(range(10))) * 2
    assert drawn == ZSCL_PINNED


def test_infusing_generic_batches_are_pinned(tmp_path, data_root, reads):
    folder = image_folder(tmp_path / "generic", 16, 5)
    entry = {"name": "infusing_generic", "source": "folder", "root": str(folder), "batch_size": 5}
    run = run_of(tmp_path, data_root, [entry], iterations=6, batch_size=8)
    execute(run, quiet=True)
    # the pre-trained targets of the 16 images once, then 3 generic batches of 5 per experience
    assert reads == INFUSING_PINNED


# ------------------------------------------------------------- the helpers alone
class Numbers(Dataset):
    """``(tensor([i]), i)`` for i < n."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]), i


def draw(batches: SideBatches, k: int) -> list[list[int]]:
    out = []
    for _ in range(k):
        x, index = batches.next()
        assert x[:, 0].tolist() == [float(i) for i in index.tolist()]  # the items of those indices
        out.append(index.tolist())
    return out


def test_side_batches_follow_the_seeded_plan_and_repeat_it_after_period():
    plan = seeded_batches(7, 3, 11)
    expected = [next(plan) for _ in range(4)]
    batches = SideBatches(Numbers(7), 3, 11, period=4)
    got = draw(batches, 10)
    assert got[:4] == expected
    assert got[4:8] == expected and got[8:] == expected[:2]  # endless: the plan again
    assert batches.drawn == 10
    assert sorted(sum(expected, [])[:7]) == list(range(7))  # the first pass is a permutation
    assert draw(SideBatches(Numbers(7), 3, 11, period=4), 4) == expected  # seeded
    assert draw(SideBatches(Numbers(7), 3, 12, period=4), 4) != expected


def test_sequence_seed_reproduces_the_random_batch_sampler():
    """Infusing's ``[seed, 0]``: the batches its RandomBatchSampler(seed) gave."""
    assert draw(SideBatches(Numbers(9), 4, [5, 0], period=6), 6) == list(RandomBatchSampler(9, 4, 6, seed=5))


def test_each_rank_gets_a_disjoint_share_of_every_global_batch():
    whole = draw(SideBatches(Numbers(10), 6, 3, period=5), 5)
    shares = [draw(SideBatches(Numbers(10), 6, 3, period=5, dist=DistContext(rank=r, world=3, local_rank=r)), 5) for r in range(3)]
    for k, batch in enumerate(whole):
        assert [len(s[k]) for s in shares] == [2, 2, 2]
        assert shares[0][k] + shares[1][k] + shares[2][k] == batch  # contiguous, disjoint, complete


class Noisy(Numbers):
    """Items of different sizes than Numbers: 3 x 4 x 4 floats, a function of the index."""

    def __getitem__(self, i: int):
        return torch.arange(48, dtype=torch.float32).reshape(3, 4, 4) * (i + 1) / 7, i


def test_kept_batches_equal_read_batches_and_draw_the_same_global_rng():
    n, size = 11, 48 * 4  # bytes per item
    for dist in (None, DistContext(rank=1, world=2)):
        torch.manual_seed(3)
        read = SideBatches(Noisy(n), 4, 9, period=5, dist=dist)
        got_read = [read.next() for _ in range(12)]  # past the period: the loader starts again
        state_read = torch.get_rng_state()
        torch.manual_seed(3)
        kept = SideBatches(Noisy(n), 4, 9, period=5, dist=dist, keep_mb=n * size / 2**20)  # exactly fits
        assert kept.kept is not None and kept.kept.shape == (n, 3, 4, 4)
        got_kept = [kept.next() for _ in range(12)]
        assert torch.equal(torch.get_rng_state(), state_read)  # the same draws of the global RNG
        for (xa, ia), (xb, ib) in zip(got_read, got_kept):
            assert torch.equal(ia, ib) and ia.dtype == ib.dtype == torch.long
            assert torch.equal(xa, xb)
        assert [len(i) for _, i in got_kept] == [2 if dist else 4] * 12
        # the per-item view serves a table in dataset order
        x0, i0 = kept.items[5]
        assert torch.equal(x0, Noisy(n)[5][0]) and int(i0) == 5
    assert SideBatches(Noisy(n), 4, 9, period=5, keep_mb=(n * size - 1) / 2**20).kept is None  # one byte short: read
    assert SideBatches(Noisy(n), 4, 9, period=5).kept is None  # off by default


def test_close_stops_the_batches():
    batches = SideBatches(Numbers(3), 2, 0, period=1)
    batches.next()
    batches.close()
    with pytest.raises(RuntimeError):
        batches.next()


class Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(1, 2)
        self.calls = 0

    def encode_image(self, x):
        self.calls += 1
        return self.proj(x)


def test_embed_images_in_dataset_order_and_counts_forwards():
    torch.manual_seed(0)
    enc = Encoder()
    out, forwards = embed_images(enc, Numbers(7), 3)
    assert forwards == enc.calls == 3  # ceil(7 / 3)
    with torch.no_grad():
        expected = enc.proj(torch.arange(7, dtype=torch.float32)[:, None])
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    state = torch.get_rng_state()
    embed_images(enc, Numbers(7), 3, out_device="cpu", generator=torch.Generator())
    assert torch.equal(torch.get_rng_state(), state)  # an own generator leaves the global RNG alone
    embed_images(enc, Numbers(7), 3)
    assert not torch.equal(torch.get_rng_state(), state)  # the loader's base seed, as before
