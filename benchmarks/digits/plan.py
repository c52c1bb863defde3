"""Which runs the digits benchmark needs, given the ones already finished: the sweep, the seeds, the estimate.

The benchmark is a set of independent runs, each one training (or, for the base, none) and evaluation, each written
to its own self-contained file ``<task>__<method>__lr<lr>__seed<seed>.json`` (plus its sample grid ``.png`` and its
``.log``) in one folder per case. The plan is a pure function of the finished files (:func:`make_plan`), so runs
can be stopped and resumed, run in parallel, or run on two machines and merged by copying the files together.

For every task and method:

1. **Sweep** on the sweep seed (the first of ``seeds``) at the method's initial rates
   (:data:`~benchmarks.digits.methods.INITIAL_SWEEP`). When all have finished and the best sits at an edge of the
   swept rates, the next rate on :data:`~benchmarks.digits.methods.RATE_LADDER` beyond that edge is added (up to
   ``max_widen`` times per side); otherwise the sweep is resolved at its best rate. The score
   (:func:`sweep_score`) ranks learning the task without breaking what the base could do.
2. **Evaluation** at the chosen rate on the other seeds (``seeds[1:]``; the headline methods also on
   ``extra_seeds``): the numbers the report shows are from these, never from the seed that chose the rate.

Plus one evaluation of the untuned base per task (``<task>__base__lr0__seed0.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.digits.evaluate_base import DEFAULT_INFERENCE_STEPS
from benchmarks.digits.methods import HEADLINE_METHODS, INITIAL_SWEEP, RATE_LADDER, Method

BASE = "base"
#: the version of the metrics a result file holds; files of another version are not this benchmark's results (they
#: are ignored and their runs made again)
RESULT_VERSION = 2
#: seconds per run assumed before any run of the task has finished (one thread, the fastest runs of res_attn, peft
#: LoRA and full fine-tuning on the 2-core machine: DreamBooth 22-27 s, style 31-44 s)
DEFAULT_RUN_SECONDS: dict[str, float] = {"dreambooth": 25.0, "style": 35.0}


@dataclass(frozen=True)
class Case:
    """What all runs of one benchmark share; part of every result file, and the name of their folder."""

    heldout: int = 9
    style: str = "rotated"
    dreambooth_steps: int = 200
    style_steps: int = 400
    samples: int = 32
    class_images: int = 50
    #: denoising steps of every judged sample; only the smoke tests (``--quick``) use fewer
    sampling_steps: int = DEFAULT_INFERENCE_STEPS

    @property
    def name(self) -> str:
        sampling = "" if self.sampling_steps == DEFAULT_INFERENCE_STEPS else f"_sampling{self.sampling_steps}"
        return (
            f"heldout{self.heldout}_{self.style}_db{self.dreambooth_steps}_st{self.style_steps}"
            f"_samples{self.samples}_class{self.class_images}{sampling}"
        )

    @classmethod
    def from_args(cls, args) -> Case:
        """The case a command line's flags describe (``run_benchmark`` and ``single_run`` share the names)."""
        return cls(
            args.heldout,
            args.style,
            args.dreambooth_steps,
            args.style_steps,
            args.samples,
            args.class_images,
            args.sampling_steps,
        )

    def record(self) -> dict:
        """The case as result files hold it: the default sampling steps are left out, so the files written before
        the field existed stay this case's results."""
        fields = asdict(self)
        if self.sampling_steps == DEFAULT_INFERENCE_STEPS:
            del fields["sampling_steps"]
        return fields

    def steps(self, task: str) -> int:
        return self.dreambooth_steps if task == "dreambooth" else self.style_steps


@dataclass(frozen=True)
class RunSpec:
    """One run: a method (or the base) on a task at a learning rate and seed; ``role`` is sweep, eval or base."""

    task: str
    method: str
    lr: float
    seed: int
    role: str

    @property
    def key(self) -> str:
        return f"{self.task}__{self.method}__lr{self.lr:g}__seed{self.seed}"


def sweep_score(task: str, metrics: dict) -> float:
    """How the sweep ranks a run (higher is better).

    DreamBooth: subject fidelity + prior retention (learning the subject must not cost the seen digits).
    Style: the share of samples that are the prompted digit *in the style*, plus a quarter of the mean of content
    and style accuracy as partial credit (so that, among runs with none right, one that learned the style or kept
    the digits ranks above one that did neither). Ties go to the lower Frechet distance (subtracted x 1e-4).
    """
    if task == "dreambooth":
        return metrics["subject_fidelity"] + metrics["prior_retention"] - 1e-4 * metrics["subject_fd"]
    if task == "style":
        partial = (metrics["content_accuracy"] + metrics["style_accuracy"]) / 2
        return metrics["styled_content_accuracy"] + 0.25 * partial - 1e-4 * metrics["style_fd"]
    raise ValueError(f"unknown task {task!r}")


def ladder_neighbour(rate: float, direction: int) -> float | None:
    """The next rate on :data:`RATE_LADDER` below (-1) or above (+1) ``rate``; None past the ladder's end."""
    if direction < 0:
        lower = [r for r in RATE_LADDER if r < rate * (1 - 1e-9)]
        return lower[-1] if lower else None
    higher = [r for r in RATE_LADDER if r > rate * (1 + 1e-9)]
    return higher[0] if higher else None


@dataclass
class SweepState:
    """The sweep of one method on one task: rates so far, finished scores, and the chosen rate once resolved."""

    task: str
    method: str
    rates: list[float]
    scores: dict[float, float] = field(default_factory=dict)
    chosen: float | None = None
    widened: list[float] = field(default_factory=list)

    @property
    def resolved(self) -> bool:
        return self.chosen is not None

    @property
    def at_edge(self) -> bool:
        """The chosen rate is still an edge of the swept range (the ladder or ``max_widen`` ran out)."""
        return self.chosen is not None and self.chosen in (min(self.rates), max(self.rates))


def resolve_sweep(
    task: str,
    method: Method,
    seed: int,
    finished: dict[str, dict],
    max_widen: int = 2,
    initial: Sequence[float] | None = None,
) -> SweepState:
    """The state of one sweep given the finished records (key -> record): widen while the best is at an edge."""
    rates = sorted(initial or INITIAL_SWEEP[(method.family, task)])
    state = SweepState(task, method.name, list(rates))
    widened = {-1: 0, +1: 0}
    while True:
        keys = {rate: RunSpec(task, method.name, rate, seed, "sweep").key for rate in state.rates}
        state.scores = {
            rate: sweep_score(task, finished[key]["metrics"]) for rate, key in keys.items() if key in finished
        }
        if len(state.scores) < len(state.rates):
            return state  # runs still to do
        best = max(state.rates, key=lambda rate: state.scores[rate])
        direction = -1 if best == min(state.rates) else +1 if best == max(state.rates) else 0
        nxt = ladder_neighbour(best, direction) if direction else None
        if direction and nxt is not None and widened[direction] < max_widen:
            widened[direction] += 1
            state.rates = sorted(state.rates + [nxt])
            state.widened.append(nxt)
            continue
        state.chosen = best
        return state


@dataclass
class Plan:
    """What is finished and what remains for a selection of tasks and methods."""

    sweeps: dict[tuple[str, str], SweepState]
    pending: list[RunSpec]
    unresolved_eval_runs: int  # evaluation runs that will follow sweeps not yet resolved
    finished: dict[str, dict]
    #: (task, method) -> its evaluation runs that will follow its sweep (the open sweeps only)
    unresolved: dict[tuple[str, str], int] = field(default_factory=dict)

    def selected_finished(self) -> list[dict]:
        """The finished runs of this plan's tasks and methods (and their base runs): the results folder may hold
        others (another selection's, an opt-in setting's), which neither count nor cost here."""
        selected = set(self.sweeps) | {(task, BASE) for task, _ in self.sweeps}
        return [record for record in self.finished.values() if (record["task"], record["method"]) in selected]

    def eval_records(self, task: str, method: str) -> list[dict]:
        """The finished evaluation runs of a method at its chosen rate (the numbers the report shows)."""
        state = self.sweeps.get((task, method))
        if state is None or not state.resolved:
            return []
        return [
            record
            for record in self.finished.values()
            if record["task"] == task
            and record["method"] == method
            and record["role"] == "eval"
            and abs(record["learning_rate"] - state.chosen) <= 1e-12 * max(1.0, state.chosen)
        ]


def eval_seeds(method: str, seeds: Sequence[int], extra_seeds: Sequence[int]) -> list[int]:
    """The seeds a method is evaluated on: every seed but the sweep seed, plus ``extra_seeds`` for the headline."""
    chosen = list(seeds[1:])
    if method in HEADLINE_METHODS:
        chosen += [seed for seed in extra_seeds if seed not in chosen and seed != seeds[0]]
    return chosen


def make_plan(
    tasks: Sequence[str],
    methods: Sequence[Method],
    seeds: Sequence[int],
    finished: dict[str, dict],
    extra_seeds: Sequence[int] = (),
    max_widen: int = 2,
    initial_rates: dict[str, Sequence[float]] | None = None,
) -> Plan:
    """The runs still needed (ready to start now, in a useful order), given the finished records.

    ``initial_rates``: family -> rates overriding :data:`INITIAL_SWEEP` for every task (the ``--lrs`` option).
    """
    if len(seeds) < 2:
        raise ValueError("give at least two seeds: the first chooses the learning rate, the others are reported")
    sweeps: dict[tuple[str, str], SweepState] = {}
    pending: list[RunSpec] = []
    unresolved: dict[tuple[str, str], int] = {}
    for task in tasks:
        base = RunSpec(task, BASE, 0.0, 0, "base")
        if base.key not in finished:
            pending.append(base)
    sweep_runs, eval_runs = [], []
    for task in tasks:
        for method in methods:
            initial = (initial_rates or {}).get(method.family)
            state = resolve_sweep(task, method, seeds[0], finished, max_widen, initial)
            sweeps[(task, method.name)] = state
            wanted_seeds = eval_seeds(method.name, seeds, extra_seeds)
            if not state.resolved:
                sweep_runs += [
                    RunSpec(task, method.name, rate, seeds[0], "sweep")
                    for rate in state.rates
                    if rate not in state.scores
                ]
                unresolved[(task, method.name)] = len(wanted_seeds)
                continue
            eval_runs += [
                spec
                for seed in wanted_seeds
                if (spec := RunSpec(task, method.name, state.chosen, seed, "eval")).key not in finished
            ]
    # the headline comparison first (res_attn, peft_lora, full_finetune: a partial benchmark still answers it),
    # sweeps before evaluation (they unlock it), evaluation seed by seed so partial results cover every method
    pending += sorted(
        sweep_runs + eval_runs,
        key=lambda spec: (spec.method not in HEADLINE_METHODS, spec.role != "sweep", spec.seed, spec.task),
    )
    return Plan(sweeps, pending, sum(unresolved.values()), finished, unresolved)


# --- the result files -----------------------------------------------------------------------------------------
def result_path(folder: Path, spec: RunSpec) -> Path:
    return Path(folder) / f"{spec.key}.json"


def read_finished(folder: Path, case: Case, cache: dict[Path, dict] | None = None) -> dict[str, dict]:
    """key -> record of every finished run of ``case`` in ``folder`` (files of another case are ignored)."""
    finished: dict[str, dict] = {}
    cache = {} if cache is None else cache
    for path in sorted(Path(folder).glob("*.json")):
        if path not in cache:
            try:
                cache[path] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # a file being copied in: read it next time
        record = cache[path]
        if (
            isinstance(record, dict)
            and record.get("case") in (case.record(), asdict(case))
            and record.get("version") == RESULT_VERSION
        ):
            finished[path.stem] = record
    return finished


def run_seconds(finished: dict[str, dict]) -> dict[tuple[str, str], float]:
    """(task, method) -> one run's single-thread seconds as measured without contention: the mean of the fastest
    quarter (at least one) of the finished runs' ``cpu_seconds`` (the process's CPU time), or ``wall_seconds`` for
    runs recorded before CPU time was.

    Contention only ever adds wall time (other jobs on the same cores stretched single runs up to 40x) and barely
    touches CPU time; the fastest runs are the ones that measured the run itself, and the mean of a quarter rather
    than the minimum keeps one lucky run from setting the estimate once there are several. A method whose every run
    was timed by the wall clock under load is overestimated until it has CPU-timed runs."""
    times: dict[tuple[str, str], list[float]] = {}
    for record in finished.values():
        seconds = record.get("cpu_seconds", record.get("wall_seconds"))
        if isinstance(seconds, (int, float)):
            times.setdefault((record["task"], record["method"]), []).append(float(seconds))
    estimates = {}
    for key, values in times.items():
        fastest = sorted(values)[: max(1, len(values) // 4)]
        estimates[key] = sum(fastest) / len(fastest)
    return estimates


def estimate_seconds(task: str, method: str, measured: dict[tuple[str, str], float]) -> float:
    """One run's expected single-thread seconds: ``measured`` (:func:`run_seconds`) for the method on the task, else
    the median over the task's measured methods, else :data:`DEFAULT_RUN_SECONDS`."""
    if (task, method) in measured:
        return measured[(task, method)]
    same_task = sorted(seconds for (t, m), seconds in measured.items() if t == task and m != BASE)
    if same_task:
        return same_task[len(same_task) // 2]
    return DEFAULT_RUN_SECONDS[task]


def plan_seconds(plan: Plan, in_flight: Iterable[str] = ()) -> dict[str, float]:
    """Estimated single-thread seconds of the plan's parts: ``ready`` (pending, not in flight), ``after_sweeps``
    (evaluation runs that follow open sweeps), ``finished`` (what the finished runs cost without contention) and
    ``total``, all priced by :func:`estimate_seconds`."""
    measured = run_seconds(plan.finished)
    busy = set(in_flight)
    ready = sum(estimate_seconds(s.task, s.method, measured) for s in plan.pending if s.key not in busy)
    flying = sum(estimate_seconds(s.task, s.method, measured) for s in plan.pending if s.key in busy)
    after = sum(count * estimate_seconds(task, method, measured) for (task, method), count in plan.unresolved.items())
    done = sum(estimate_seconds(r["task"], r["method"], measured) for r in plan.selected_finished())
    return {"ready": ready, "after_sweeps": after, "finished": done, "total": done + flying + ready + after}


def remaining_summary(plan: Plan, in_flight: Iterable[str] = (), workers: int | None = None) -> str:
    """How many runs remain and their estimated core-minutes (one thread each), and what the whole plan costs."""
    busy = set(in_flight)
    ready = [spec for spec in plan.pending if spec.key not in busy]
    seconds = plan_seconds(plan, busy)
    sweeps_open = sum(1 for state in plan.sweeps.values() if not state.resolved)
    remaining = seconds["ready"] + seconds["after_sweeps"]
    wall = f", ~{remaining / 60 / workers:.0f} min on {workers} workers" if workers else ""
    return (
        f"{len(plan.selected_finished())} runs finished; {len(ready)} ready to run "
        f"(~{seconds['ready'] / 60:.0f} core-minutes) and "
        f"{plan.unresolved_eval_runs} evaluation runs after the {sweeps_open} open sweeps "
        f"(~{seconds['after_sweeps'] / 60:.0f} core-minutes, more if a sweep widens): ~{remaining / 60:.0f} "
        f"core-minutes to go{wall}; the whole plan ~{seconds['total'] / 60:.0f} core-minutes (per-run times: the "
        "fastest quarter of each method's finished runs)"
    )
