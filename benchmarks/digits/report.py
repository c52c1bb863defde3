"""The benchmark's report: a markdown table of every method and a PNG of quality against trainable parameters.

Input is the list of run records :mod:`benchmarks.digits.run_benchmark` collected (one per task, method, seed;
each the ``result.json`` of :mod:`benchmarks.digits.single_run` plus ``method``, ``family`` and ``description``),
the base model's own metrics per task, and the learning-rate sweep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

#: metric -> (column title, higher is better, format)
METRICS: dict[str, tuple[str, bool, str]] = {
    "subject_fidelity": ("subject fidelity ↑", True, "{:.2f}"),
    "prior_retention": ("prior retention ↑", True, "{:.2f}"),
    "subject_fd": ("subject FD ↓", False, "{:.1f}"),
    "style_fd": ("style FD ↓", False, "{:.1f}"),
    "content_accuracy": ("content acc. ↑", True, "{:.2f}"),
}
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "dreambooth": ("subject_fidelity", "prior_retention", "subject_fd"),
    "style": ("style_fd", "content_accuracy"),
}
FAMILY_COLORS = {"operation": "tab:blue", "token": "tab:cyan", "linear": "tab:green", "peft": "tab:orange", "c3a": "tab:orange", "full": "tab:red"}
FAMILY_LABELS = {
    "operation": "res tuners: side branches", "token": "res tuners: learned tokens", "linear": "res tuners: weight updates",
    "peft": "peft peers", "c3a": "peft peers", "full": "full fine-tuning",
}


def sweep_score(task: str, metrics: dict, base_metrics: dict | None = None) -> float:
    """How the learning-rate sweep ranks a run (higher is better); both scores add two quantities of range ~[0, 1].

    DreamBooth: subject fidelity + prior retention (learning the subject must not cost the seen digits).
    Style: content accuracy + the share of the base's style Frechet distance the run removed,
    ``1 - style_fd / base_style_fd`` (the style must be learned and the digit still drawn).
    """
    if task == "dreambooth":
        return metrics["subject_fidelity"] + metrics["prior_retention"]
    base_fd = (base_metrics or {}).get("style_fd")
    if not base_fd:
        raise ValueError("the style sweep score needs the base model's style_fd")
    return metrics["content_accuracy"] + 1.0 - metrics["style_fd"] / base_fd


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values)) if len(values) > 1 else 0.0


def _cell(metric: str, values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean, std = _mean_std(values)
    text = METRICS[metric][2].format(mean)
    return text + (f" ± {METRICS[metric][2].format(std)}" if len(values) > 1 else "")


def summarise(records: list[dict]) -> dict[str, dict]:
    """method -> {family, description, parameters, per task: metric lists, lr, seconds per step, peak RSS}."""
    summary: dict[str, dict] = {}
    for record in records:
        row = summary.setdefault(record["method"], {
            "family": record["family"], "description": record["description"],
            "parameters": record["trainable_parameters"], "tasks": {},
        })
        task = row["tasks"].setdefault(record["task"], {"metrics": {}, "lr": record["learning_rate"],
                                                        "seconds_per_step": [], "peak_rss_mb": []})
        for metric in TASK_METRICS[record["task"]]:
            task["metrics"].setdefault(metric, []).append(record["metrics"][metric])
        task["seconds_per_step"].append(record["seconds_per_step"])
        task["peak_rss_mb"].append(record["peak_rss_mb"])
    return summary


def markdown_table(records: list[dict], base_metrics: dict[str, dict], tasks: Sequence[str]) -> str:
    """One row per method (the base first): trainable parameters, every metric of every task, the learning rate,
    seconds per step and peak memory."""
    summary = summarise(records)
    metric_names = [m for task in tasks for m in TASK_METRICS[task]]
    header = ["method", "trainable params"] + [METRICS[m][0] for m in metric_names]
    header += [f"lr ({task})" for task in tasks] + [f"s/step ({task})" for task in tasks] + ["peak RSS (MB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base_row = ["base (no tuning)", "0"]
    for task in tasks:
        for metric in TASK_METRICS[task]:
            value = base_metrics.get(task, {}).get(metric)
            base_row.append(_cell(metric, [value]) if value is not None else "–")
    base_row += ["–"] * (2 * len(tasks) + 1)
    lines.append("| " + " | ".join(base_row) + " |")
    for method, row in summary.items():
        cells = [f"`{method}`", f"{row['parameters']:,}"]
        for task in tasks:
            task_row = row["tasks"].get(task)
            for metric in TASK_METRICS[task]:
                cells.append(_cell(metric, task_row["metrics"][metric]) if task_row else "–")
        for task in tasks:
            task_row = row["tasks"].get(task)
            cells.append(f"{task_row['lr']:g}" if task_row else "–")
        for task in tasks:
            task_row = row["tasks"].get(task)
            cells.append(f"{np.mean(task_row['seconds_per_step']):.3f}" if task_row else "–")
        peaks = [p for task_row in row["tasks"].values() for p in task_row["peak_rss_mb"]]
        cells.append(f"{max(peaks):.0f}" if peaks else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(sweep: dict[str, dict[str, dict]]) -> str:
    """task -> family -> {"method", "runs": {lr: (score, metrics)}, "chosen": lr} as a markdown table."""
    lines = ["| task | family (swept on) | learning rate | metrics | sweep score | chosen |", "|---|---|---|---|---|---|"]
    for task, families in sweep.items():
        for family, entry in families.items():
            for lr, (score, metrics) in sorted(entry["runs"].items()):
                shown = ", ".join(f"{m} {METRICS[m][2].format(metrics[m])}" for m in TASK_METRICS[task])
                chosen = "**yes**" if lr == entry["chosen"] else ""
                lines.append(f"| {task} | {family} (`{entry['method']}`) | {lr:g} | {shown} | {score:.3f} | {chosen} |")
    return "\n".join(lines)


def plot_quality(records: list[dict], base_metrics: dict[str, dict], tasks: Sequence[str], path: str | Path) -> Path:
    """Quality against trainable parameters (log x), one panel per task: DreamBooth subject fidelity, style FD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"dreambooth": "subject_fidelity", "style": "style_fd"}
    shown = [task for task in tasks if task in panels]
    figure, axes = plt.subplots(1, len(shown), figsize=(7.5 * len(shown), 5.5), squeeze=False)
    summary = summarise(records)
    for axis, task in zip(axes[0], shown):
        metric = panels[task]
        for method, row in summary.items():
            if task not in row["tasks"]:
                continue
            values = row["tasks"][task]["metrics"][metric]
            mean, std = _mean_std(values)
            axis.errorbar(row["parameters"], mean, yerr=std if std else None, fmt="o",
                          color=FAMILY_COLORS.get(row["family"], "gray"), markersize=6)
            axis.annotate(method, (row["parameters"], mean), fontsize=7, xytext=(4, 3), textcoords="offset points")
        base_value = base_metrics.get(task, {}).get(metric)
        if base_value is not None:
            axis.axhline(base_value, color="gray", linestyle="--", linewidth=1, label="base (no tuning)")
        if metric in ("subject_fidelity", "prior_retention", "content_accuracy"):
            axis.set_ylim(-0.03, 1.05)  # shares: the whole range, so small differences are not magnified
        axis.set_xscale("log")
        axis.set_xlabel("trainable parameters (log scale)")
        title, higher_better, _ = METRICS[metric]
        axis.set_ylabel(title)
        axis.set_title(f"{task}: {title} ({'higher' if higher_better else 'lower'} is better)")
        axis.grid(True, which="both", alpha=0.3)
        for family, color in FAMILY_COLORS.items():
            if family != "c3a":  # drawn as a peft peer
                axis.plot([], [], "o", color=color, label=FAMILY_LABELS[family])
        axis.legend(fontsize=8, loc="best")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
