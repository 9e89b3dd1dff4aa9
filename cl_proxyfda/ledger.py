"""The cost ledger of a run: what a method really costs, next to what it scores.

Written into ``metrics.json`` (``meta.ledger``), the summary table, W&B and compare tables:

- ``trainable_params`` and their ``trainable_share`` of the model's parameters (the
  model proper: frozen teachers are counted under storage);
- ``inference_params_added``: parameters the deployed model carries beyond the backbone
  (unmerged adapters, a learned prompt context; 0 for full fine-tuning and regularisers);
- extra data: ``synthetic_images`` generated or reused from the cache and the seconds
  spent preparing them, ``reference_images`` (ZSCL's reference set, Infusing's generic set);
- extra storage in MB: ``teacher_copies`` / ``teacher_mb`` (frozen models kept in memory)
  and ``plugin_state_mb`` (anchors, importances, running averages a plugin keeps),
  ``teacher_table_mb`` (teacher-embedding tables: the largest one ``train.teacher_table``
  held, plus the largest each plugin held for its side set, GIFT's and ZSCL's
  ``cache_teacher``);
- ``peak_rss_mb`` (host), ``peak_gpu_mb`` (CUDA max allocated, 0 on CPU),
  ``wall_seconds`` and ``device_hours`` (wall time x processes);
- ``task_label_at_test``: whether predictions need the task id (true for the
  task-incremental matrix, whose heads are chosen by task).

A plugin reports its own extra data through an optional ``ledger()`` method returning
``{name: number}``; values of the same name are added up.
"""
from __future__ import annotations

import resource
from typing import Any, Iterable

import torch
from torch import Tensor, nn

MB = 2**20


def tensor_mb(tensors: Iterable[Tensor]) -> float:
    """Memory of ``tensors`` in MB (element size x count)."""
    return sum(t.numel() * t.element_size() for t in tensors) / MB


def state_mb(state: Any) -> float:
    """Memory of every tensor inside a (nested) plugin state."""
    if isinstance(state, Tensor):
        return tensor_mb([state])
    if isinstance(state, dict):
        return sum(state_mb(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_mb(v) for v in state)
    return 0.0


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameters, and what the deployed model carries in addition."""
    from cl_proxyfda.adapters import adapter_parameters

    clip = getattr(model, "clip", model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    added = sum(p.numel() for p in adapter_parameters(clip))
    learner = getattr(model, "prompt_learner", None)
    if learner is not None:
        added += sum(p.numel() for p in learner.parameters())
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total if total else 0.0,
        "inference_params_added": added,
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_ledger(
    model: nn.Module,
    plugins: Iterable[Any],
    teachers: Any,
    device: torch.device,
    wall_seconds: float,
    processes: int = 1,
) -> dict[str, float | bool]:
    """The ledger of a run so far (see the module docstring)."""
    ledger: dict[str, float | bool] = dict(parameter_counts(model))
    extras: dict[str, float] = {"synthetic_images": 0, "synthetic_seconds": 0.0, "reference_images": 0}
    state = 0.0
    for plugin in plugins:
        report = getattr(plugin, "ledger", None)
        if callable(report):
            for key, value in report().items():
                extras[key] = extras.get(key, 0) + value
        if hasattr(plugin, "state_dict"):
            state += state_mb(plugin.state_dict())
    plugin_tables = float(extras.pop("teacher_table_mb", 0.0))
    ledger.update(extras)
    copies = list(getattr(teachers, "models", {}).values()) if teachers is not None else []
    ledger["teacher_copies"] = len(copies)
    ledger["teacher_mb"] = sum(tensor_mb(m.state_dict().values()) for m in copies)
    ledger["teacher_table_mb"] = plugin_tables + (float(getattr(teachers, "table_mb", 0.0)) if teachers is not None else 0.0)
    ledger["plugin_state_mb"] = state
    ledger["peak_rss_mb"] = peak_rss_mb()
    ledger["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else 0.0
    ledger["wall_seconds"] = wall_seconds
    ledger["device_hours"] = wall_seconds * processes / 3600
    ledger["task_label_at_test"] = True
    return ledger


def format_ledger(ledger: dict[str, Any]) -> list[str]:
    """Two lines for the summary table."""
    if not ledger:
        return []
    share = 100 * float(ledger.get("trainable_share", 0.0))
    return [
        f"Cost: trainable {int(ledger.get('trainable_params', 0)):,} ({share:.1f}%), +{int(ledger.get('inference_params_added', 0)):,} at inference, "
        f"synthetic images {int(ledger.get('synthetic_images', 0))} ({float(ledger.get('synthetic_seconds', 0.0)):.1f} s), "
        f"reference images {int(ledger.get('reference_images', 0))}",
        f"      teachers {int(ledger.get('teacher_copies', 0))} ({float(ledger.get('teacher_mb', 0.0)):.1f} MB"
        f"{', table %.1f MB' % float(ledger['teacher_table_mb']) if ledger.get('teacher_table_mb') else ''}), plugin state "
        f"{float(ledger.get('plugin_state_mb', 0.0)):.1f} MB, peak RSS {float(ledger.get('peak_rss_mb', 0.0)):.0f} MB, "
        f"peak GPU {float(ledger.get('peak_gpu_mb', 0.0)):.0f} MB, wall {float(ledger.get('wall_seconds', 0.0)):.0f} s "
        f"({float(ledger.get('device_hours', 0.0)):.4f} device-h), task label at test: {'yes' if ledger.get('task_label_at_test') else 'no'}",
    ]
