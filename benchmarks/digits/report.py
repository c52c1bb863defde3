"""The benchmark's report: per task a table of every method (mean and 95% interval over seeds for every metric,
significance against peft LoRA and full fine-tuning, links to the sample grids), the sweeps, and a plot.

Statistics, per method and metric, over the evaluation seeds (never the seed that chose the learning rate):

* the interval is Student's t: ``mean +- t(0.975, n - 1) * sd / sqrt(n)``. Each seed's value already averages its
  samples, and samples are drawn from the run's own seed, so the spread between seeds holds both the training
  noise and the sampling noise;
* a difference against a reference method is marked significant when Welch's two-sample t-test gives p < 0.05
  (two-sided; when both sides have zero spread, when their means differ). Markers: ``▲L`` / ``▼L`` better / worse
  than peft LoRA, ``▲F`` / ``▼F`` than full fine-tuning, in that metric's own direction. About 1 comparison in 20 is
  marked by chance alone: read isolated markers with care.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.digits.methods import HEADLINE_METHODS, PROMPT_BLIND, REFERENCE_METHODS
from benchmarks.digits.plan import BASE, Case, Plan, plan_seconds

#: metric -> (column title, higher is better, format)
METRICS: dict[str, tuple[str, bool, str]] = {
    "subject_fidelity": ("subject fidelity ↑", True, "{:.2f}"),
    "prior_retention": ("prior retention ↑", True, "{:.2f}"),
    "subject_fd": ("subject FD ↓", False, "{:.1f}"),
    "class_leak": ("class-prompt leak", False, "{:.2f}"),
    "worst_prior_accuracy": ("worst seen digit ↑", True, "{:.2f}"),
    "prompt_separation": ("prompt separation (real ≈ 1)", True, "{:.2f}"),
    "styled_content_accuracy": ("styled content ↑", True, "{:.2f}"),
    "content_accuracy": ("content ↑", True, "{:.2f}"),
    "style_accuracy": ("style ↑", True, "{:.2f}"),
    "worst_prompt_accuracy": ("worst prompt ↑", True, "{:.2f}"),
    "label_entropy": ("label entropy ↑", True, "{:.2f}"),
    "style_fd": ("style FD ↓", False, "{:.1f}"),
}
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "dreambooth": (
        "subject_fidelity",
        "prior_retention",
        "subject_fd",
        "class_leak",
        "worst_prior_accuracy",
        "prompt_separation",
    ),
    "style": (
        "styled_content_accuracy",
        "content_accuracy",
        "style_accuracy",
        "worst_prompt_accuracy",
        "label_entropy",
        "prompt_separation",
        "style_fd",
    ),
}
#: the metric each task's plot shows
HEADLINE_METRIC = {"dreambooth": "subject_fidelity", "style": "styled_content_accuracy"}
REFERENCE_MARKS = {"peft_lora": "L", "full_finetune": "F"}
FAMILY_COLORS = {
    "operation": "tab:blue",
    "token": "tab:cyan",
    "linear": "tab:green",
    "peft": "tab:orange",
    "c3a": "tab:orange",
    "full": "tab:red",
}
FAMILY_LABELS = {
    "operation": "res tuners: side branches",
    "token": "res tuners: learned tokens",
    "linear": "res tuners: weight updates",
    "peft": "peft peers",
    "c3a": "peft peers",
    "full": "full fine-tuning",
}


# --- statistics -----------------------------------------------------------------------------------------------
def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean; with one value the interval is the value itself."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(values.mean())
    if values.size == 1:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + confidence / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))
    return mean, mean - half, mean + half


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test; 0 or 1 when both samples have zero spread (means differ or not);
    1 when either side has fewer than two values (nothing can be claimed)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        return 1.0
    if a.std() == 0 and b.std() == 0:
        return 0.0 if a.mean() != b.mean() else 1.0
    with warnings.catch_warnings():  # one side constant: scipy warns of precision loss, the p-value is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def welch_difference_interval(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high): the Welch interval of the difference of means, the one that excludes 0
    exactly when :func:`welch_p_value` is below ``1 - confidence``; a point when both sides have zero spread."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        raise ValueError("a difference interval needs at least two values on each side")
    diff = float(a.mean() - b.mean())
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, dof) * se)
    return diff, diff - half, diff + half


def significance_marks(
    metric: str, values: Sequence[float], references: dict[str, Sequence[float]], alpha: float = 0.05
) -> str:
    """``▲L``, ``▼F`` ...: significant differences of ``values`` against each reference method's values."""
    higher_better = METRICS[metric][1]
    marks = []
    for reference, other in references.items():
        if len(other) < 2 or len(values) < 2 or welch_p_value(values, other) >= alpha:
            continue
        better = (np.mean(values) > np.mean(other)) == higher_better
        marks.append(("▲" if better else "▼") + REFERENCE_MARKS[reference])
    return " ".join(marks)


# --- tables ---------------------------------------------------------------------------------------------------
def _format(metric: str, value: float) -> str:
    return METRICS[metric][2].format(value)


#: metrics that are shares of samples; the others (distances, ratios) are only bounded below by 0
SHARE_METRICS = {
    "subject_fidelity",
    "prior_retention",
    "class_leak",
    "worst_prior_accuracy",
    "styled_content_accuracy",
    "content_accuracy",
    "style_accuracy",
    "worst_prompt_accuracy",
    "label_entropy",
}


def clipped_interval(metric: str, values: Sequence[float]) -> tuple[float, float, float]:
    """:func:`t_interval` cut to the metric's possible range ([0, 1] for shares, >= 0 otherwise): a t interval of
    two or three seeds can reach past it, and the mean cannot."""
    mean, low, high = t_interval(values)
    return mean, max(low, 0.0), min(high, 1.0) if metric in SHARE_METRICS else high


def metric_cell(metric: str, values: Sequence[float], references: dict[str, Sequence[float]] | None = None) -> str:
    """``mean [low, high]`` (95% t interval, within the metric's range) and significance marks; ``–`` when nothing
    finished."""
    if not values:
        return "–"
    mean, low, high = clipped_interval(metric, values)
    text = (
        _format(metric, mean)
        if len(values) == 1
        else f"{_format(metric, mean)} [{_format(metric, low)}, {_format(metric, high)}]"
    )
    marks = significance_marks(metric, values, references or {})
    return f"{text} {marks}" if marks else text


def method_values(plan: Plan, task: str, method: str) -> dict[str, list[float]]:
    """metric -> the values over the method's finished evaluation seeds."""
    records = sorted(plan.eval_records(task, method), key=lambda r: r["seed"])
    return {metric: [r["metrics"][metric] for r in records] for metric in TASK_METRICS[task]}


def _rate_cell(plan: Plan, task: str, method: str) -> str:
    state = plan.sweeps[(task, method)]
    if not state.resolved:
        return f"sweeping ({len(state.scores)}/{len(state.rates)})"
    edge = " (edge)" if state.at_edge else ""
    return f"{state.chosen:g}{edge}"


def task_table(plan: Plan, task: str, methods: Sequence[str], runs_link: str) -> str:
    """One row per method (the base first): parameters, every metric of ``task``, the chosen rate, seeds, time,
    memory and links to each seed's sample grid."""
    metrics = TASK_METRICS[task]
    header = [
        "method",
        "trainable params",
        *[METRICS[m][0] for m in metrics],
        "lr",
        "seeds",
        "s/step",
        "peak RSS (MB)",
        "sample grids",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = plan.finished.get(f"{task}__{BASE}__lr0__seed0")
    if base is not None:
        cells = [
            "base (no tuning)",
            "0",
            *[_format(m, base["metrics"][m]) for m in metrics],
            "–",
            "–",
            "–",
            "–",
            f"[base]({runs_link}/{base['grid']})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    references = {ref: method_values(plan, task, ref) for ref in REFERENCE_METHODS if ref in methods}
    for method in methods:
        records = sorted(plan.eval_records(task, method), key=lambda r: r["seed"])
        values = method_values(plan, task, method)
        others = {ref: vals for ref, vals in references.items() if ref != method}
        name = f"`{method}`" + (" †" if task == "dreambooth" and method in PROMPT_BLIND else "")
        params = f"{records[0]['trainable_parameters']:,}" if records else "–"
        cells = [name, params]
        cells += [metric_cell(m, values[m], {ref: vals[m] for ref, vals in others.items()}) for m in metrics]
        cells += [_rate_cell(plan, task, method), str(len(records))]
        cells.append(f"{np.mean([r['seconds_per_step'] for r in records]):.3f}" if records else "–")
        cells.append(f"{max(r['peak_rss_mb'] for r in records):.0f}" if records else "–")
        cells.append(" ".join(f"[s{r['seed']}]({runs_link}/{r['grid']})" for r in records) or "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    ("dreambooth", "subject_fidelity"),
    ("dreambooth", "prior_retention"),
    ("dreambooth", "class_leak"),
    ("style", "styled_content_accuracy"),
    ("style", "content_accuracy"),
    ("style", "prompt_separation"),
)


def summary_table(plan: Plan, methods: Sequence[str], tasks: Sequence[str]) -> str:
    """The README's table: each method's headline metrics of both tasks (mean [95% interval] and marks)."""
    shown = [(task, metric) for task, metric in SUMMARY_METRICS if task in tasks]
    header = ["method", "trainable params", *[METRICS[m][0] for _, m in shown], "seeds (db / style)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base_cells = ["base (no tuning)", "0"]
    for task, metric in shown:
        base = plan.finished.get(f"{task}__{BASE}__lr0__seed0")
        base_cells.append(_format(metric, base["metrics"][metric]) if base else "–")
    lines.append("| " + " | ".join(base_cells + ["–"]) + " |")
    values = {(task, method): method_values(plan, task, method) for task in tasks for method in methods}
    for method in methods:
        records = [r for task in tasks for r in plan.eval_records(task, method)]
        if not records:
            continue
        cells = [f"`{method}`" + (" †" if method in PROMPT_BLIND else ""), f"{records[0]['trainable_parameters']:,}"]
        for task, metric in shown:
            references = {
                ref: values[(task, ref)][metric]
                for ref in REFERENCE_METHODS
                if ref != method and (task, ref) in values
            }
            cells.append(metric_cell(metric, values[(task, method)][metric], references))
        cells.append(" / ".join(str(len(plan.eval_records(task, method))) for task in tasks))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(plan: Plan, methods: Sequence[str], tasks: Sequence[str]) -> str:
    """Every sweep: the score at each rate (sweep seed), the chosen rate, and where it widened."""
    lines = ["| task | method | score per learning rate (sweep seed) | chosen | widened to |", "|---|---|---|---|---|"]
    for task in tasks:
        for method in methods:
            state = plan.sweeps[(task, method)]
            scores = ", ".join(
                f"{rate:g}: {state.scores[rate]:.2f}" if rate in state.scores else f"{rate:g}: …"
                for rate in state.rates
            )
            chosen = "–" if not state.resolved else (f"**{state.chosen:g}**" + (" (edge)" if state.at_edge else ""))
            widened = ", ".join(f"{rate:g}" for rate in state.widened) or "–"
            lines.append(f"| {task} | `{method}` | {scores} | {chosen} | {widened} |")
    return "\n".join(lines)


def plot_quality(plan: Plan, tasks: Sequence[str], methods: Sequence[str], path: str | Path) -> Path:
    """Each task's headline metric against trainable parameters (log x), mean and 95% interval per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(7.5 * len(tasks), 5.5), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        metric = HEADLINE_METRIC[task]
        for method in methods:
            records = plan.eval_records(task, method)
            if not records:
                continue
            mean, low, high = clipped_interval(metric, [r["metrics"][metric] for r in records])
            parameters = records[0]["trainable_parameters"]
            axis.errorbar(
                parameters,
                mean,
                yerr=[[mean - low], [high - mean]],
                fmt="o",
                capsize=3,
                color=FAMILY_COLORS.get(records[0]["family"], "gray"),
                markersize=6,
            )
            axis.annotate(method, (parameters, mean), fontsize=7, xytext=(4, 3), textcoords="offset points")
        base = plan.finished.get(f"{task}__{BASE}__lr0__seed0")
        if base is not None:
            axis.axhline(base["metrics"][metric], color="gray", linestyle="--", linewidth=1, label="base (no tuning)")
        axis.set_ylim(-0.05, 1.05)
        axis.set_xscale("log")
        axis.set_xlabel("trainable parameters (log scale)")
        axis.set_ylabel(METRICS[metric][0])
        axis.set_title(f"{task}: {METRICS[metric][0]} (mean, 95% interval over seeds)")
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


def _and_list(names: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} and {names[-1]}"


def write_report(plan: Plan, case: Case, args, results_dir: Path, runs_dir: Path) -> Path:
    """``benchmark.md`` and ``quality_vs_params.png`` in ``results_dir`` from the plan's finished runs."""
    from benchmarks.digits.methods import select_methods

    tasks = list(args.tasks)
    methods = [method.name for method in select_methods(args.methods, getattr(args, "with_large", False))]
    runs_link = (
        Path(runs_dir).resolve().relative_to(Path(results_dir).resolve()).as_posix()
        if Path(runs_dir).resolve().is_relative_to(Path(results_dir).resolve())
        else Path(runs_dir).as_posix()
    )
    plot = plot_quality(plan, tasks, methods, Path(results_dir) / "quality_vs_params.png")
    remaining = len(plan.pending) + plan.unresolved_eval_runs
    command = (
        "python -m benchmarks.digits.run_benchmark --workers N"
        + (f" --heldout {case.heldout}" if case.heldout != 9 else "")
        + (f" --style {case.style}" if case.style != Case.style else "")
    )
    text = [
        f"# Digits benchmark: held-out digit {case.heldout}, style `{case.style}`",
        "",
        f"Steps per run: DreamBooth {case.dreambooth_steps}, style {case.style_steps}. Learning rate: chosen per "
        f"method and task on seed {args.seeds[0]} (the sweeps below); reported seeds: {list(args.seeds[1:])}, plus "
        f"{list(args.extra_seeds)} for {_and_list([m for m in HEADLINE_METHODS if m in methods])}. "
        f"{case.samples} identifier-prompt "
        f"samples, {max(case.samples // 4, 2)} per seen digit and prompt, {case.sampling_steps} denoising steps each, "
        "samples seeded by the run's seed; one CPU "
        "thread per run. Written by `python -m benchmarks.digits.run_benchmark`; metrics are defined in "
        "`benchmarks/digits/tasks.py`.",
        "",
        "Cells: mean over the reported seeds and its 95% Student-t interval `[low, high]`. `▲L`/`▼L`: significantly "
        "better/worse than peft LoRA, `▲F`/`▼F`: than full fine-tuning (Welch's t-test, p < 0.05, in the metric's own "
        "direction; about 1 in 20 comparisons is marked by chance). `lr ... (edge)`: the chosen rate is still at an "
        "edge of its widened sweep. Frechet distances on tens of samples are biased upwards: compare within a column.",
        "",
        f"Progress: {len(plan.selected_finished())} runs finished, {remaining} to go; the whole plan costs "
        f"~{plan_seconds(plan)['total'] / 60:.0f} core-minutes (one thread per run; each run priced at the fastest "
        "quarter of its method's finished runs, sweeps that still widen not counted). Finish and rebuild with "
        f"`{command}` (finished runs are skipped); `--status` prints what remains in core-minutes. Sample grids: "
        f"every run's is beside its result in `{runs_link}/`; the repository keeps those of seed 1.",
        "",
        "## Summary",
        "",
        summary_table(plan, methods, tasks),
        "",
    ]
    if "dreambooth" in tasks:
        text += [
            '## DreamBooth: teach the held-out digit under "a photo of sks digit"',
            "",
            task_table(plan, "dreambooth", methods, runs_link),
            "",
            'Grids: row `sks` the identifier prompt, `cls` the class prompt "a photo of digit", then one row per '
            "seen digit. † cannot bind a new identifier by its math (`benchmarks/digits/methods.py`, `PROMPT_BLIND`): "
            "its branch is the same for every prompt (learned tokens) or reads only what the frozen UNet made of the "
            "prompt (the bypass), and prior preservation pulls the class prompt, one token away, back to the base; "
            "whatever such a tuner learns shows up under the class prompt too (`class-prompt leak`), or not at all.",
            "",
        ]
    if "style" in tasks:
        text += [
            f"## Style: learn `{case.style}` from captioned styled digits",
            "",
            task_table(plan, "style", methods, runs_link),
            "",
            "Judge: the style-aware classifier (digit accuracy >= 0.95 on real styled test digits in every style). "
            "`styled content`: the prompted digit *in the style*; `label entropy` and `prompt separation` are 0 when "
            "every prompt gives the same image (a collapse the style FD alone can miss). Grids: one row per digit.",
            "",
        ]
    from benchmarks.digits.guide import claims_markdown, which_tuner_table

    text += [
        "## Which tuner when",
        "",
        which_tuner_table(plan, tasks, methods, links_from=Path(results_dir).resolve()),
        "",
        "## Claims against peft LoRA and full fine-tuning",
        "",
        claims_markdown(
            plan,
            tasks,
            [name for name in methods if name not in REFERENCE_METHODS],
            [(task, metric) for task, metric in HEADLINE_METRIC.items() if task in tasks],
        ),
        "",
        "## Learning-rate sweeps",
        "",
        "Score: DreamBooth = subject fidelity + prior retention; style = styled content + (content + style) / 8 "
        "(`benchmarks/digits/plan.py`, `sweep_score`). A sweep widens by half a decade while its best rate is at an "
        f"edge (at most {args.max_widen} times per side).",
        "",
        sweep_table(plan, methods, tasks),
        "",
        f"![quality against trainable parameters]({plot.name})",
        "",
    ]
    report = Path(results_dir) / "benchmark.md"
    report.write_text("\n".join(text))
    if getattr(args, "readme", None) is not None:
        from benchmarks.digits.guide import readme_blocks, update_readme

        update_readme(args.readme, readme_blocks(plan, tasks, methods, readme_dir=Path(args.readme).resolve().parent))
    return report
