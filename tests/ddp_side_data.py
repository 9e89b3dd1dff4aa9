"""Run under torchrun by tests/test_distributed.py (and imported by it for one process):
train a run file with GIFT and ZSCL and record, per side-data plugin, the dataset
positions of every side batch this process drew and how far GIFT's per-experience
teacher table (rows picked by those positions) is from the teacher's forward on the
process's own images. Writes ``<out>/side_rank<r>.json``."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from cl_proxyfda.teacher import teacher_bank


class SideRecorder(SupervisedPlugin):
    """Wraps the side batches of the ``gift`` and ``zscl`` plugins at each experience."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: dict[str, list[list[int]]] = {"gift": [], "zscl": []}
        self.table_error = 0.0

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        for plugin in strategy.plugins:
            name = getattr(plugin, "name", "")
            if name in self.batches:
                self._wrap(strategy, plugin, name)

    def _wrap(self, strategy: Any, plugin: Any, name: str) -> None:
        batches, original = plugin._batches, plugin._batches.next

        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            x, index = original()
            self.batches[name].append(index.tolist())
            if name == "gift" and plugin._teacher_image is not None:
                teacher = teacher_bank(strategy).get(strategy.model, "previous")
                with torch.no_grad():
                    direct = teacher.encode_image(x).float()
                self.table_error = max(self.table_error, float((plugin._teacher_image[index] - direct).abs().max()))
            return x, index

        batches.next = next_batch


def record(config_path: str) -> tuple[int, SideRecorder]:
    """Train the run of ``config_path`` (this process's share) and return (rank, records)."""
    from cl_proxyfda.config import load_config
    from cl_proxyfda.runner import build_run

    run = build_run(load_config(config_path))
    recorder = SideRecorder()
    run.strategy.plugins.append(recorder)
    for experience in run.benchmark.train_stream:
        run.strategy.train(experience)
    return run.dist.rank, recorder


def main() -> None:
    config_path, out = sys.argv[1], Path(sys.argv[2])
    rank, recorder = record(config_path)
    (out / f"side_rank{rank}.json").write_text(json.dumps({"batches": recorder.batches, "table_error": recorder.table_error}))
    from cl_proxyfda.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    main()
