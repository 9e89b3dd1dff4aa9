"""The bench's report: machine information, sections with their tables, ratios and
targets, and the markdown ``cl-proxyfda bench`` prints and writes."""
from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch


@dataclass
class Target:
    """A performance target: ``ratio <= limit``."""

    label: str
    ratio: float
    limit: float

    @property
    def met(self) -> bool:
        return self.ratio <= self.limit


@dataclass
class Section:
    """One section's table, its ratios (all finite and positive), targets and notes."""

    name: str
    title: str
    setting: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def add_ratio(self, key: str, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise RuntimeError(f"bench {self.name}: ratio {key} = {value} is not a finite positive number")
        self.ratios[key] = float(value)
        return value

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title, "setting": self.setting, "columns": self.columns, "rows": self.rows, "ratios": self.ratios,
            "targets": [{"label": t.label, "ratio": t.ratio, "limit": t.limit, "met": t.met} for t in self.targets],
            "notes": self.notes, "skipped": self.skipped, "seconds": self.seconds, **({"extra": self.extra} if self.extra else {}),
        }


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch version and threads, CUDA device (if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda_device": cuda, "python": platform.python_version(), "system": f"{platform.system()} {platform.release()}",
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def machine_line(info: dict[str, Any]) -> str:
    cuda = f"CUDA device: {info['cuda_device']}" if info["cuda_device"] else "CUDA device: none"
    return (f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), torch {info['torch']} "
            f"({info['torch_threads']} threads), {cuda}; Python {info['python']}, {info['system']}"
            + (f"; load average {info['load_average']} at start" if info.get("load_average") is not None else ""))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value == 0:
            return "0"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def section_markdown(section: Section, machine: str) -> str:
    """The markdown of one section: title, setting, table, targets, notes."""
    lines = [f"## {section.name}: {section.title}", "", f"_{machine}_", ""]
    if section.setting:
        lines += [section.setting, ""]
    if section.skipped:
        lines += [f"skipped: {section.skipped}", ""]
        return "\n".join(lines)
    if section.rows:
        lines.append("| " + " | ".join(section.columns) + " |")
        lines.append("|" + "|".join("---" for _ in section.columns) + "|")
        for row in section.rows:
            lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
        lines.append("")
    if section.targets:
        lines += ["| target | ratio | limit | met |", "|---|---|---|---|"]
        for t in section.targets:
            lines.append(f"| {t.label} | {t.ratio:.3f} | {t.limit:.2f} | {'yes' if t.met else 'NO'} |")
        lines.append("")
    for note in section.notes:
        lines.append(f"- {note}")
    if section.notes:
        lines.append("")
    lines.append(f"(section time {section.seconds:.1f} s)")
    lines.append("")
    return "\n".join(lines)


def report_markdown(report: dict[str, Any], sections: Sequence[Section]) -> str:
    head = [
        "# cl-proxyfda bench", "",
        report["machine_line"], "",
        f"command: `{report['command']}` ({report['mode']} sizes), {report['seconds']:.0f} s in all. "
        "Ratios are measured in one process, interleaved; absolute times are for this machine only.", "",
    ] + [f"warning: {w}" for w in report.get("warnings", [])] + ([""] if report.get("warnings") else [])
    return "\n".join(head) + "\n" + "\n".join(section_markdown(s, report["machine_line"]) for s in sections)


