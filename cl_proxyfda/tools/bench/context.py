"""What every bench section shares: the sizes (``FULL``, ``QUICK``), the section names,
and the context (model, device, scratch folder, the stream every run trains on)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cl_proxyfda.benchmarks.colour_folders import write_image_folder_stream
from cl_proxyfda.errors import UserError

SECTIONS = ("steps", "eval", "knn", "awc", "generation", "gpu")
DEMO_MODEL, DEMO_TAG = "demo-clip-tiny", "demo"
TEST_MODEL = "cl-test-tiny"


@dataclass(frozen=True)
class BenchSizes:
    """How much each section measures (``FULL`` by default, ``QUICK`` for tests)."""

    batch_size: int = 64
    warmup: int = 2
    iterations: int = 10
    prime_iterations: int = 2
    repeats: int = 4
    train_per_class: int = 32
    test_per_class: int = 20
    control_per_class: int = 20
    reference_size: int = 256
    synthetic_images: int = 128
    knn_sizes: tuple[int, ...] = (1_000, 10_000, 50_000)
    knn_dim: int = 512
    knn_queries: int = 64
    knn_k: int = 8
    micro_repeats: int = 20  # interleaved rounds of the knn section
    min_run_time: float = 0.4  # seconds of Timer.blocked_autorange per measured callable (per round when interleaved: divided by the rounds)
    generation_batch: int = 8
    generation_steps: int = 10
    cache_images: int = 16
    gpu_model: str = "ViT-B-16"
    gpu_batch_size: int = 64
    gpu_unet_batch: int = 8
    gpu_unet_steps: int = 25


FULL = BenchSizes()
QUICK = BenchSizes(
    batch_size=16, warmup=1, iterations=3, prime_iterations=1, repeats=1, train_per_class=4, test_per_class=4,
    control_per_class=4, reference_size=32, synthetic_images=16, knn_sizes=(500, 2_000), knn_queries=32,
    micro_repeats=5, min_run_time=0.05, generation_batch=4, generation_steps=2, cache_images=4, gpu_batch_size=16, gpu_unet_batch=2,
    gpu_unet_steps=5,
)


def parse_sections(text: str | Sequence[str] | None) -> list[str]:
    """``"a,b"`` (or a list) -> the section names in the order given; all when empty."""
    if text is None:
        return list(SECTIONS)
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if not names:
        raise UserError(f"--sections: no section named (known: {', '.join(SECTIONS)})")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise UserError(f"--sections: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------- context
@dataclass
class BenchContext:
    """What every section shares: sizes, model, device, a scratch folder."""

    sizes: BenchSizes
    model: str
    pretrained: str | None
    device: torch.device
    tmp: Path
    echo: Callable[[str], None]
    stream: str = "auto"  # auto: demo when registered, else image_folder
    _stream: dict[str, Any] | None = None

    @property
    def pretrained_label(self) -> str:
        return self.pretrained if self.pretrained else "random weights"

    def stream_config(self) -> dict[str, Any]:
        """The bench's stream: the offline demo stream (2 tasks) when registered, else an
        image-folder stream the bench writes itself."""
        if self._stream is None:
            from cl_proxyfda.registry import STREAMS, load_builtin_components

            load_builtin_components()
            s = self.sizes
            if self.stream not in ("auto", "demo", "image_folder"):
                raise UserError(f"bench: unknown stream choice {self.stream!r} (auto, demo, image_folder)")
            if self.stream == "demo" or (self.stream == "auto" and "demo" in STREAMS):
                self._stream = {
                    "name": "demo", "seed": 0, "tasks": ["outline-colours", "counting"], "train_per_class": s.train_per_class,
                    "test_per_class": s.test_per_class, "control_per_class": s.control_per_class, "reference_size": s.reference_size,
                }
            else:
                per_class = max(s.train_per_class, s.batch_size // 4)  # 4 classes a task: at least one batch
                root = write_image_folder_stream(self.tmp / "stream", BENCH_TASKS, train_per_class=per_class, test_per_class=s.test_per_class)
                self._stream = {"name": "image_folder", "root": str(root), "tasks": list(BENCH_TASKS)}
        return dict(self._stream)

    def describe_stream(self) -> str:
        cfg = self.stream_config()
        if cfg["name"] == "demo":
            return f"demo stream ({', '.join(cfg['tasks'])}; {cfg['train_per_class']} train images per class)"
        return f"image-folder stream written by the bench ({', '.join(cfg['tasks'])})"

    def run_config(self, strategies: list[dict[str, Any]], *, batch_size: int | None = None, precision: str = "fp32",
                   model: str | None = None, pretrained: str | None | bool = False, device: torch.device | None = None,
                   name: str = "bench", model_extra: dict[str, Any] | None = None, teacher_table: bool = False) -> Any:
        from cl_proxyfda.config import parse_config

        dev = device or self.device
        raw = {
            "run": {"name": name, "seed": 0, "device": dev.type, "precision": precision, "output_dir": str(self.tmp / "runs")},
            "model": {"name": model or self.model, "pretrained": self.pretrained if pretrained is False else pretrained, "train_towers": ["image"],
                      **(model_extra or {})},
            "stream": self.stream_config(),
            "train": {"lr": 1e-5, "iterations": self.sizes.warmup + self.sizes.iterations, "batch_size": batch_size or self.sizes.batch_size,
                      "augment": False, "schedule": "constant", "teacher_table": teacher_table},
            "strategies": strategies,
            "eval": {"batch_size": 256},
            "logging": {"wandb": {"mode": "disabled"}, "plots": False, "progress": False},
            "checkpoint": {"enabled": False},
        }
        return parse_config(raw)


BENCH_TASKS = {"warm": ["red", "orange", "yellow", "purple"], "cool": ["blue", "cyan", "green", "gray"]}


def embed_dim(model: str) -> int:
    import open_clip

    from cl_proxyfda.models import register_model_configs

    register_model_configs()
    return int((open_clip.get_model_config(model) or {}).get("embed_dim", 512))


def context_length(model: str) -> int:
    import open_clip

    from cl_proxyfda.models import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(model) or {}
    return int(cfg.get("text_cfg", {}).get("context_length", 77))
