"""Prometheus text exposition (format 0.0.4) for our metrics: a few lines, no client library.

Metric sources hand in (name, help, labels, value) samples; this module only formats them and
adds the process metrics operators expect (resident memory, CPU seconds, start time).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable

Sample = tuple[str, str, dict[str, str], float]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render(samples: Iterable[Sample], types: dict[str, str] | None = None) -> str:
    """Group samples by metric name, one HELP/TYPE header each. Type defaults to gauge."""
    types = types or {}
    by_name: dict[str, tuple[str, list[tuple[dict[str, str], float]]]] = {}
    for name, help_text, labels, value in samples:
        by_name.setdefault(name, (help_text, []))[1].append((labels, value))
    lines: list[str] = []
    for name, (help_text, values) in by_name.items():
        kind = types.get(name, "counter" if name.endswith("_total") else "gauge")
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in values:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            lines.append(f"{name}{{{label_text}}} {_number(value)}" if label_text else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


def process_samples(started_at: float) -> list[Sample]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as statm:
        rss_pages = int(statm.read().split()[1])
    return [
        ("process_resident_memory_bytes", "Resident memory size in bytes.", {}, rss_pages * page),
        (
            "process_cpu_seconds_total",
            "Total user and system CPU time in seconds.",
            {},
            usage.ru_utime + usage.ru_stime,
        ),
        (
            "process_start_time_seconds",
            "Start time of the process since the epoch, in seconds.",
            {},
            started_at,
        ),
    ]
