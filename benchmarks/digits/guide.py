"""What the digits benchmark's numbers allow one to say, generated from them: claim sentences and "which tuner when".

Both are written from the finished runs' reported seeds (never the seed that chose a rate) and, for costs, from the
perf suite's result files, so the README's text can be regenerated and is never stronger than the data:

* :func:`claim_sentence` -- one comparison of two methods on one metric: the difference of means with its 95% Welch
  interval, ``significant`` only when Welch's t-test gives p < :data:`ALPHA` (the interval then excludes 0), "no
  significant difference" otherwise, and "too few seeds" below two seeds a side;
* :func:`rank_methods` -- a quality recommendation: the method with the best mean and every method whose difference
  from it is not significant. One method is recommended only when it is significantly better than *each* other
  method with two or more seeds; otherwise the row says "no significant difference between ...";
* :func:`which_tuner_table` -- rows for a new subject, a style, tight GPU memory, zero inference cost and the
  smallest file. Quality rows rank on the benchmark's intervals; cost rows rank on measured values from
  ``benchmarks/perf/results/`` (peak training memory, fused sampling time, file sizes) or exact parameter counts x 4
  bytes (float32), cite the file each number comes from, and then rank the cheap methods' quality the same way.

A ranking compares the best method with up to 15 others at p < 0.05 each: a method can fall out of the top group by
chance in about 1 comparison in 20. Being in the top group means "not shown to be worse", not "as good".
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.digits.methods import PROMPT_BLIND, REFERENCE_METHODS
from benchmarks.digits.plan import BASE, Plan
from benchmarks.digits.report import (
    METRICS,
    SUMMARY_METRICS,
    clipped_interval,
    method_values,
    welch_difference_interval,
    welch_p_value,
)

ALPHA = 0.05
REPO_ROOT = Path(__file__).resolve().parents[2]
PERF_RESULTS_DIR = REPO_ROOT / "benchmarks" / "perf" / "results"
TASK_LABELS = {"dreambooth": "DreamBooth", "style": "style"}
#: full fine-tuning is the ceiling the tuners are measured against, not a pick: it trains and stores every weight
CEILING = "full_finetune"
#: bytes per stored parameter: tuner files and peft adapters are saved in float32
BYTES_PER_PARAMETER = 4
#: measured costs within this fraction of the cheapest are reported as tied with it (the perf suite's ratios move by
#: a few percent between runs on shared machines)
COST_TOLERANCE = 0.05
#: quality rows: the task and metric a recommendation ranks on, and a metric shown beside it
QUALITY_ROWS: dict[str, tuple[str, str, str]] = {
    "a new subject (DreamBooth)": ("dreambooth", "subject_fidelity", "prior_retention"),
    "a style": ("style", "styled_content_accuracy", "prompt_separation"),
}
#: peak training memory: (result file under the perf results folder, what it measured), the first found ranks
MEMORY_SOURCES: tuple[tuple[str, str], ...] = (
    ("gpu_h100_run1/train_sd15.json", "H100, SD 1.5 UNet, 512 px, batch 4, fp16"),
    ("train_step.json", "CPU, SD 1.5-shaped UNet (widths 64/128/256), batch 2"),
)
#: sampling time with the tuner fused into the base weights, against the base: (result file, what it measured)
SAMPLING_SOURCES: tuple[tuple[str, str], ...] = (
    ("sampling.json", "CPU, one UNet forward, SD 1.5-shaped UNet"),
    ("gpu_h100_run1/sampling.json", "H100, one fp16 UNet forward, SD 1.5"),
)
FILE_SIZE_SOURCE = ("load_time.json", "saved tuner files of the SD 1.5-shaped perf UNet")


# --- comparisons and claims --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Difference:
    """``method`` minus ``reference`` on one metric of one task, over their reported seeds."""

    task: str
    metric: str
    method: str
    reference: str
    values: tuple[float, ...]
    reference_values: tuple[float, ...]

    @property
    def comparable(self) -> bool:
        return len(self.values) >= 2 and len(self.reference_values) >= 2

    @property
    def p_value(self) -> float:
        return welch_p_value(self.values, self.reference_values)

    @property
    def significant(self) -> bool:
        return self.comparable and self.p_value < ALPHA

    @property
    def interval(self) -> tuple[float, float, float]:
        """(difference of means, low, high): the 95% Welch interval of the difference."""
        return welch_difference_interval(self.values, self.reference_values, 1 - ALPHA)

    @property
    def better(self) -> bool:
        """Whether ``method``'s mean is better than ``reference``'s in the metric's own direction."""
        higher = float(np.mean(self.values)) > float(np.mean(self.reference_values))
        return higher == METRICS[self.metric][1]


def difference(plan: Plan, task: str, metric: str, method: str, reference: str) -> Difference:
    return Difference(
        task,
        metric,
        method,
        reference,
        tuple(method_values(plan, task, method)[metric]),
        tuple(method_values(plan, task, reference)[metric]),
    )


def _metric_name(metric: str) -> str:
    """The column title without its arrow or note: ``subject fidelity``."""
    return METRICS[metric][0].split(" (")[0].rstrip(" ↑↓")


def claim_sentence(diff: Difference) -> str:
    """``res_attn vs peft_lora on DreamBooth subject fidelity: +0.12 [0.03, 0.21], significantly better (Welch
    p = 0.012, 5 vs 5 seeds)`` -- never stronger than the interval."""
    where = f"`{diff.method}` vs `{diff.reference}` on {TASK_LABELS[diff.task]} {_metric_name(diff.metric)}"
    seeds = f"{len(diff.values)} vs {len(diff.reference_values)} seeds"
    if not diff.values or not diff.reference_values:
        return f"{where}: not measured yet ({seeds})."
    if not diff.comparable:
        return f"{where}: {seeds}, too few to compare (a claim needs at least 2 seeds on each side)."
    fmt = METRICS[diff.metric][2].replace("{:", "{:+")
    mean, low, high = diff.interval
    numbers = f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"
    if diff.significant:
        verdict = "significantly better" if diff.better else "significantly worse"
    else:
        verdict = "no significant difference"
    direction = "higher" if METRICS[diff.metric][1] else "lower"
    return f"{where} ({direction} is better): {numbers}, {verdict} (Welch p = {diff.p_value:.3g}, {seeds})."


def claim_sentences(
    plan: Plan,
    tasks: Sequence[str],
    methods: Sequence[str] = ("res_attn",),
    references: Sequence[str] = REFERENCE_METHODS,
    metrics: Sequence[tuple[str, str]] = SUMMARY_METRICS,
) -> list[str]:
    """Every ``method`` against every reference on each (task, metric) of ``metrics`` in ``tasks``."""
    return [
        claim_sentence(difference(plan, task, metric, method, reference))
        for task, metric in metrics
        if task in tasks
        for method in methods
        for reference in references
        if reference != method
    ]


def claims_markdown(
    plan: Plan,
    tasks: Sequence[str],
    methods: Sequence[str] = ("res_attn",),
    metrics: Sequence[tuple[str, str]] = SUMMARY_METRICS,
) -> str:
    """The claim sentences as a markdown list, with how they are made."""
    lines = [
        "Generated by `benchmarks/digits/guide.py` from the reported seeds: difference of means [95% Welch "
        f"interval]; *significant* only where Welch's t-test gives p < {ALPHA} (the interval then excludes 0).",
        "",
    ]
    lines += [f"- {sentence}" for sentence in claim_sentences(plan, tasks, methods, metrics=metrics)]
    return "\n".join(lines)


# --- quality rankings --------------------------------------------------------------------------------------------
@dataclass
class Ranking:
    """The methods of one task and metric ordered by the evidence: the best mean and every method not significantly
    different from it (``group``), the ones significantly behind it (``behind``), and those with fewer than two
    reported seeds (``too_few``: not compared)."""

    task: str
    metric: str
    group: list[str]
    behind: list[str]
    too_few: list[str]
    unmeasured: list[str] = field(default_factory=list)  # no reported seed yet

    @property
    def best(self) -> str | None:
        return self.group[0] if self.group else None

    @property
    def recommended(self) -> list[str]:
        """The one method the data singles out, or none."""
        return self.group[:1] if len(self.group) == 1 and self.behind else []

    def verdict(self) -> str:
        """The pick in words; ``so far`` while some candidates have fewer than 2 seeds."""
        waiting = len(self.unmeasured) + len(self.too_few)
        so_far = f" (so far: {waiting} of the methods have fewer than 2 seeds)" if waiting and self.group else ""
        return self._verdict() + so_far

    def _verdict(self) -> str:
        if not self.group:
            return "not measured yet (no method has 2 reported seeds)"
        if self.recommended:
            others = f"{len(self.behind)} other method{'s' if len(self.behind) > 1 else ''}"
            return (
                f"`{self.best}` (significantly better than each of the {others} with 2 or more seeds, "
                f"Welch p < {ALPHA})"
            )
        if len(self.group) == 1:
            return f"`{self.best}` is the only method with 2 or more seeds: nothing to compare it with"
        names = ", ".join(f"`{name}`" for name in self.group)
        behind = f"{len(self.behind)} method{'s' if len(self.behind) > 1 else ''}"
        return f"no significant difference between {names}" + (
            f"; significantly behind the best: {behind}" if self.behind else ""
        )


def rank_methods(plan: Plan, task: str, metric: str, candidates: Sequence[str]) -> Ranking:
    """Rank ``candidates`` on ``metric`` of ``task`` by their reported seeds (see the module doc)."""
    higher_better = METRICS[metric][1]
    values = {name: method_values(plan, task, name)[metric] for name in candidates}
    measured = [name for name in candidates if len(values[name]) >= 2]
    too_few = [name for name in candidates if 0 < len(values[name]) < 2]
    unmeasured = [name for name in candidates if not values[name]]
    if not measured:
        return Ranking(task, metric, [], [], too_few, unmeasured)
    sign = 1.0 if higher_better else -1.0
    ordered = sorted(measured, key=lambda name: -sign * float(np.mean(values[name])))
    best = ordered[0]
    group, behind = [best], []
    for name in ordered[1:]:
        (behind if welch_p_value(values[name], values[best]) < ALPHA else group).append(name)
    return Ranking(task, metric, group, behind, too_few, unmeasured)


def interval_text(metric: str, values: Sequence[float]) -> str:
    """``0.93 [0.85, 1.00]`` (the interval within the metric's range; just the value for one seed, ``–`` for none)."""
    if not values:
        return "–"
    mean, low, high = clipped_interval(metric, values)
    fmt = METRICS[metric][2]
    return fmt.format(mean) + (f" [{fmt.format(low)}, {fmt.format(high)}]" if len(values) > 1 else "")


def quality_cell(plan: Plan, task: str, metric: str, method: str, secondary: str | None = None) -> str:
    """```res_attn` 0.93 [0.85, 1.00] (5 seeds)`` (``†`` for the methods that cannot bind an identifier), with
    ``secondary``'s interval too when given."""
    values = method_values(plan, task, method)
    dagger = " †" if task == "dreambooth" and method in PROMPT_BLIND else ""
    text = f"`{method}`{dagger} {interval_text(metric, values[metric])}"
    if secondary:
        text += f", {_metric_name(secondary)} {interval_text(secondary, values[secondary])}"
    count = len(values[metric])
    return text + f" ({count} seed{'s' if count != 1 else ''})"


def ranking_evidence(plan: Plan, ranking: Ranking, shown: int = 4, secondary: str | None = None) -> str:
    """The numbers behind a ranking: the top group's cells (and the runner-up's when one method is singled out)."""
    if not ranking.group:
        return "–"
    task, metric = ranking.task, ranking.metric
    names = ranking.group[:shown]
    cells = [quality_cell(plan, task, metric, name, secondary) for name in names]
    if len(ranking.group) > shown:
        cells.append(f"and {len(ranking.group) - shown} more")
    text = f"{_metric_name(metric)}: " + "; ".join(cells)
    if ranking.recommended and ranking.behind:
        runner_up = ranking.behind[0]
        p = difference(plan, task, metric, runner_up, ranking.best).p_value
        text += f"; next {quality_cell(plan, task, metric, runner_up)}, Welch p = {p:.3g}"
    return text


# --- measured costs ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    """Values per method from one perf result file (``path`` relative to the repository, for citing)."""

    path: str
    setting: str
    values: dict[str, float]
    reference: tuple[str, float] | None = None  # (label, value) that ratios are against, e.g. the frozen floor

    def cheapest(self, candidates: Sequence[str] | None = None) -> list[str]:
        """The cheapest of ``candidates`` (default: all measured) and those within :data:`COST_TOLERANCE` of it."""
        names = [name for name in (candidates or self.values) if name in self.values]
        if not names:
            return []
        low = min(self.values[name] for name in names)
        return sorted((n for n in names if self.values[n] <= low * (1 + COST_TOLERANCE)), key=self.values.get)

    def ratio(self, name: str) -> str:
        if self.reference is None or not self.reference[1]:
            return ""
        return f" = {self.values[name] / self.reference[1]:.2f}x {self.reference[0]}"


def _cite(path: str, links_from: Path) -> str:
    """A markdown link to ``path`` (relative to the repository) from a file in the folder ``links_from``."""
    return f"[`{path}`]({Path(os.path.relpath(REPO_ROOT / path, links_from)).as_posix()})"


def _read_rows(path: Path) -> list[dict]:
    try:
        return list(json.loads(path.read_text()).get("rows", []))
    except (OSError, json.JSONDecodeError, AttributeError):
        return []


def _relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def measured_memory(perf_dir: Path, methods: Sequence[str]) -> list[Measured]:
    """Peak training memory (MB) per benchmark method from each :data:`MEMORY_SOURCES` file that has any."""
    found = []
    for name, setting in MEMORY_SOURCES:
        path = Path(perf_dir) / name
        rows = {row["name"]: row for row in _read_rows(path) if isinstance(row.get("peak_memory_mb"), (int, float))}
        values = {method: float(rows[method]["peak_memory_mb"]) for method in methods if method in rows}
        if values:
            floor = rows.get("floor")
            reference = ("the floor", float(floor["peak_memory_mb"])) if floor else None
            found.append(Measured(_relative(path), setting, values, reference))
    return found


def measured_fused_sampling(perf_dir: Path, methods: Sequence[str]) -> list[Measured]:
    """Fused sampling time over the base's, per benchmark method that can be fused, from each
    :data:`SAMPLING_SOURCES` file."""
    found = []
    for name, setting in SAMPLING_SOURCES:
        path = Path(perf_dir) / name
        values = {
            row["tuner"]: float(row["vs_base"])
            for row in _read_rows(path)
            if row.get("mode") == "fused" and row.get("tuner") in methods and isinstance(row.get("vs_base"), float)
        }
        if values:
            found.append(Measured(_relative(path), setting, values, ("the base", 1.0)))
    return found


def measured_file_kb(perf_dir: Path, methods: Sequence[str]) -> Measured | None:
    path = Path(perf_dir) / FILE_SIZE_SOURCE[0]
    values = {
        row["name"]: float(row["file_kb"])
        for row in _read_rows(path)
        if row.get("name") in methods and isinstance(row.get("file_kb"), (int, float))
    }
    return Measured(_relative(path), FILE_SIZE_SOURCE[1], values) if values else None


def trainable_parameters(plan: Plan, methods: Sequence[str]) -> dict[str, int]:
    """Each method's trainable parameters on the digits base, from any of its finished runs."""
    counts: dict[str, int] = {}
    for record in plan.finished.values():
        if record["method"] in methods and record["method"] != BASE and "trainable_parameters" in record:
            counts.setdefault(record["method"], int(record["trainable_parameters"]))
    return counts


# --- the table ---------------------------------------------------------------------------------------------------
def _names(names: Sequence[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


def _quality_line(plan: Plan, tasks: Sequence[str], candidates: Sequence[str]) -> tuple[str, str]:
    """(verdict per task, evidence per task) of ranking ``candidates`` on each quality row's metric."""
    verdicts, evidence = [], []
    for task, metric, _ in QUALITY_ROWS.values():
        if task not in tasks:
            continue
        ranking = rank_methods(plan, task, metric, candidates)
        verdicts.append(f"{TASK_LABELS[task]}: {ranking.verdict()}")
        evidence.append(f"{TASK_LABELS[task]} {ranking_evidence(plan, ranking, shown=3)}")
    return "; ".join(verdicts), "; ".join(evidence)


Row = tuple[str, str, str]  # (you need, pick, evidence)


def quality_rows(
    plan: Plan, tasks: Sequence[str], methods: Sequence[str], perf_dir: Path, links_from: Path
) -> list[Row]:
    """A new subject, a style: the tuners and peers ranked by the intervals, the ceiling beside the best."""
    rows = []
    for need, (task, metric, secondary) in QUALITY_ROWS.items():
        if task not in tasks:
            continue
        ranking = rank_methods(plan, task, metric, [name for name in methods if name != CEILING])
        evidence = ranking_evidence(plan, ranking, secondary=secondary)
        if ranking.too_few:
            evidence += f"; fewer than 2 seeds, not compared: {_names(ranking.too_few)}"
        if ranking.unmeasured:
            evidence += f"; not measured yet: {_names(ranking.unmeasured)}"
        if CEILING in methods and ranking.best:
            ceiling = difference(plan, task, metric, ranking.best, CEILING)
            evidence += f"; the ceiling {quality_cell(plan, task, metric, CEILING)}: " + claim_sentence(ceiling)
        rows.append((need, ranking.verdict(), evidence + " (benchmark report)"))
    return rows


def memory_rows(
    plan: Plan, tasks: Sequence[str], methods: Sequence[str], perf_dir: Path, links_from: Path
) -> list[Row]:
    """Tight GPU memory: the lowest measured peak training memory (and the lowest that can bind an identifier)."""
    memory = measured_memory(perf_dir, methods)
    if not memory:
        return []
    source = memory[0]
    lowest = source.cheapest()
    lowest_binding = source.cheapest([name for name in source.values if name not in PROMPT_BLIND])
    pick = f"lowest peak training memory: {_names(lowest)}"
    if set(lowest) & set(PROMPT_BLIND) and lowest_binding:
        pick += f" († cannot bind a new identifier); for a new subject: {_names(lowest_binding)}"
    shown = list(dict.fromkeys(lowest + lowest_binding))
    evidence = "; ".join(
        f"{m.setting}: "
        + ", ".join(f"`{n}` {m.values[n]:.0f} MB{m.ratio(n)}" for n in shown if n in m.values)
        + f" ({_cite(m.path, links_from)})"
        for m in memory
    )
    verdicts, quality = _quality_line(plan, tasks, shown)
    return [("tight GPU memory (training)", f"{pick}. Quality of these: {verdicts}", f"{evidence}; {quality}")]


def inference_rows(
    plan: Plan, tasks: Sequence[str], methods: Sequence[str], perf_dir: Path, links_from: Path
) -> list[Row]:
    """Zero inference cost: the methods measured fused into the base weights, ranked by quality."""
    sampling = measured_fused_sampling(perf_dir, methods)
    if not sampling:
        return []
    fusable = [name for name in methods if any(name in m.values for m in sampling)]
    verdicts, quality = _quality_line(plan, tasks, fusable)
    ranges = "; ".join(
        f"{m.setting}: fused sampling {min(m.values.values()):.2f}-{max(m.values.values()):.2f}x the base "
        f"({_cite(m.path, links_from)})"
        for m in sampling
    )
    pick = f"a tuner that fuses into the base weights: {_names(fusable)}. Best of these: {verdicts}"
    return [("zero inference cost", pick, f"{ranges}; {quality}")]


def file_rows(plan: Plan, tasks: Sequence[str], methods: Sequence[str], perf_dir: Path, links_from: Path) -> list[Row]:
    """Smallest file: the fewest trainable parameters, and the fewest among each task's top quality group."""
    parameters = trainable_parameters(plan, [name for name in methods if name != CEILING])
    if not parameters:
        return []
    smallest = min(parameters, key=parameters.get)
    picks = [f"smallest of the {len(parameters)} methods run: `{smallest}` ({parameters[smallest]:,} parameters)"]
    shown = [smallest]
    for task, metric, _ in QUALITY_ROWS.values():
        if task not in tasks:
            continue
        group = rank_methods(plan, task, metric, list(parameters)).group
        if group:
            name = min(group, key=parameters.get)
            picks.append(
                f"smallest not shown worse than the best on {TASK_LABELS[task]}: `{name}` "
                f"({parameters[name]:,} parameters)"
            )
            shown.append(name)
    shown = list(dict.fromkeys(shown))
    evidence = ", ".join(
        f"`{name}` {parameters[name]:,} x {BYTES_PER_PARAMETER} B = "
        f"{parameters[name] * BYTES_PER_PARAMETER / 1024:.1f} kB"
        for name in shown
    )
    evidence += " (trainable parameters on the digits base, float32; benchmark result files)"
    files = measured_file_kb(perf_dir, shown)
    if files:
        evidence += "; saved files on the SD 1.5-shaped perf UNet: " + ", ".join(
            f"`{name}` {files.values[name]:.0f} kB" for name in shown if name in files.values
        )
        evidence += f" ({_cite(files.path, links_from)})"
    return [("smallest file", "; ".join(picks), evidence)]


#: the guide's rows, in order; a new need is one more function here (a row without data is left out, not invented)
ROW_BUILDERS = (quality_rows, memory_rows, inference_rows, file_rows)


def which_tuner_rows(
    plan: Plan,
    tasks: Sequence[str],
    methods: Sequence[str],
    perf_dir: Path = PERF_RESULTS_DIR,
    links_from: Path = REPO_ROOT,
) -> list[Row]:
    """(you need, pick, evidence) for every row of the guide, from the plan's finished runs and ``perf_dir``; links
    to the cited files are relative to the folder ``links_from`` (where the markdown goes)."""
    return [row for build in ROW_BUILDERS for row in build(plan, tasks, methods, Path(perf_dir), Path(links_from))]


def which_tuner_table(
    plan: Plan,
    tasks: Sequence[str],
    methods: Sequence[str],
    perf_dir: Path = PERF_RESULTS_DIR,
    links_from: Path = REPO_ROOT,
) -> str:
    """The "which tuner when" table (markdown), every cell generated from the data."""
    lines = [
        "| you need | pick (from the data) | evidence: mean [95% interval] (seeds), measured cost (source) |",
        "|---|---|---|",
    ]
    for need, pick, evidence in which_tuner_rows(plan, tasks, methods, perf_dir, links_from):
        lines.append(f"| {need} | {pick} | {evidence} |")
    lines += [
        "",
        "Floor: the frozen UNet's own training memory (backward to its inputs, which any tuner inside it needs). "
        "Quality picks: among the tuners and peft peers (full fine-tuning is the ceiling they are compared with), "
        f"the best mean and every method whose difference from it is not significant (Welch, p < {ALPHA}); one "
        "method is named alone only when it is significantly better than each other method with 2 or more seeds. "
        f"Costs: the cheapest measured method and those within {COST_TOLERANCE:.0%} of it. † cannot bind a new "
        "identifier by its math (`methods.PROMPT_BLIND`). Generated by `benchmarks/digits/guide.py`.",
    ]
    return "\n".join(lines)


# --- the README ---------------------------------------------------------------------------------------------------
def replace_marked_block(text: str, name: str, content: str) -> str:
    """``text`` with what lies between ``<!-- name:begin -->`` and ``<!-- name:end -->`` replaced by ``content``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(
            f"the README needs exactly one {begin} ... {end} pair (in that order) around the generated {name!r} "
            "text; add them where it belongs"
        )
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{content.strip()}\n{end}{tail}"


README_BLOCKS: tuple[str, ...] = ("digits-claims", "digits-which-tuner")


def check_readme(readme: Path) -> None:
    """Refuse a README without the generated blocks' markers before anything runs (ValueError naming them)."""
    if not Path(readme).is_file():
        raise ValueError(f"--readme {str(readme)!r} is not a file; pass the README.md to rewrite")
    text = Path(readme).read_text()
    for name in README_BLOCKS:
        replace_marked_block(text, name, "")


def update_readme(readme: Path, blocks: dict[str, str]) -> None:
    """Rewrite the generated blocks of ``readme`` (every block checked before the file is written)."""
    text = Path(readme).read_text()
    for name, content in blocks.items():
        text = replace_marked_block(text, name, content)
    Path(readme).write_text(text)


def readme_blocks(
    plan: Plan,
    tasks: Sequence[str],
    methods: Sequence[str],
    perf_dir: Path = PERF_RESULTS_DIR,
    readme_dir: Path = REPO_ROOT,
) -> dict[str, str]:
    """The README's generated blocks: ``digits-claims`` (res_attn against peft LoRA and full fine-tuning on the
    summary metrics) and ``digits-which-tuner``."""
    headline = [name for name in ("res_attn",) if name in methods]
    return {
        "digits-claims": claims_markdown(plan, tasks, headline),
        "digits-which-tuner": which_tuner_table(plan, tasks, methods, perf_dir, readme_dir),
    }
