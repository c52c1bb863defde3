"""Reports as JSON and as a markdown table (one row per evaluated folder)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .metrics import METRICS

#: Column titles of the markdown table.
METRIC_TITLES: dict[str, str] = {
    "fid": "FID ↓",
    "kid": "KID ↓",
    "clip_score": "CLIP score ↑",
    "clip_t": "CLIP-T ↑",
    "clip_i": "CLIP-I ↑",
    "dino": "DINO ↑",
}


def _format_value(metric: str, metrics: dict) -> str:
    value = metrics.get(metric)
    if value is None:
        return "–"
    if metric == "kid":
        return f"{value:.4f} ± {metrics.get('kid_std', float('nan')):.4f}"
    if metric in ("fid", "clip_score"):
        return f"{value:.2f}"
    return f"{value:.4f}"


def format_markdown_table(reports: dict | Sequence[dict]) -> str:
    """A markdown table of one or more reports of :func:`.metrics.evaluate_folder`: a row per folder, a column per
    metric present in any report (with the tuner and its scale when the folders were generated with one)."""
    if isinstance(reports, dict):
        reports = [reports]
    metrics = [m for m in METRICS if any(m in report["metrics"] for report in reports)]
    with_tuner = any((report.get("generation") or {}).get("tuner") for report in reports)
    header = ["run", "images"] + (["tuner", "scale"] if with_tuner else []) + [METRIC_TITLES[m] for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---"] * (len(header) - 2)) + "|"]
    for report in reports:
        row = [Path(report["generated"]).name or report["generated"], str(report["num_images"])]
        if with_tuner:
            generation = report.get("generation") or {}
            tuner = generation.get("tuner")
            scale = generation.get("scale")
            row += [Path(tuner).name if tuner else "–", "–" if scale is None else f"{scale:g}"]
        row += [_format_value(m, report["metrics"]) for m in metrics]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_reports(
    reports: Sequence[dict], json_path: str | os.PathLike | None = None, markdown_path: str | os.PathLike | None = None
) -> str:
    """Write ``{"reports": [...]}`` as JSON and the markdown table to the given paths; returns the table."""
    table = format_markdown_table(list(reports))
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"reports": list(reports)}, indent=2, ensure_ascii=False) + "\n"
        json_path.write_text(text, encoding="utf-8")
    if markdown_path is not None:
        markdown_path = Path(markdown_path)
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(table, encoding="utf-8")
    return table
