"""Run the digits benchmark: every method on DreamBooth and style, with a learning-rate sweep; write the report.

For each task: first the learning-rate sweep (each family's representative, :data:`~benchmarks.digits.methods.
SWEEP_REPRESENTATIVES`, at every swept rate, first seed), then every method at its family's chosen rate and every
seed. Each run is a fresh subprocess (:mod:`benchmarks.digits.single_run`) that trains with the project's training
core and writes ``result.json``; a run whose ``result.json`` exists is skipped, so the benchmark can be stopped and
rerun in parts. Finally ``benchmark.md`` (the tables) and ``quality_vs_params.png`` are written to ``--results``.

    .venv/bin/python -m benchmarks.digits.run_benchmark --steps 200 --samples 32 --seeds 0
    .venv/bin/python -m benchmarks.digits.run_benchmark --tasks dreambooth --methods res_attn peft_lora --lrs operation=1e-3 peft=1e-3
    .venv/bin/python -m benchmarks.digits.run_benchmark --report_only      # tables and plot from finished runs

Measurements (documented in the report): step time is the training core's loop wall time divided by its steps
(``train_stats.json``); peak memory is the run process's peak resident set size (``VmHWM``) at the end of
training. Runs use one CPU thread (``--threads``) and one run at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from benchmarks.digits.data import check_digit
from benchmarks.digits.methods import DEFAULT_SWEEP, FAMILIES, SWEEP_REPRESENTATIVES, Method, select_methods
from benchmarks.digits.report import markdown_table, plot_quality, sweep_score, sweep_table
from benchmarks.digits.single_run import RESULT_NAME
from benchmarks.digits.tasks import DEFAULT_CLASS_IMAGES, DEFAULT_STYLE, STYLES, TASKS, make_task

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_lrs(items: Sequence[str] | None) -> dict[str, tuple[float, ...]]:
    """``["operation=3e-4,1e-3", "full=1e-4"]`` -> {family: rates}; families not named keep :data:`DEFAULT_SWEEP`."""
    rates = dict(DEFAULT_SWEEP)
    for item in items or []:
        family, sep, values = item.partition("=")
        if not sep or family not in FAMILIES:
            raise SystemExit(f"--lrs {item!r}: write FAMILY=LR[,LR...] with FAMILY one of {FAMILIES}, e.g. operation=3e-4,1e-3")
        try:
            rates[family] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise SystemExit(f"--lrs {item!r}: learning rates must be numbers, e.g. operation=3e-4,1e-3") from None
        if not rates[family] or min(rates[family]) <= 0:
            raise SystemExit(f"--lrs {item!r}: give at least one positive learning rate")
    return rates


class Benchmark:
    """The runs of one benchmark case (held-out digit, style, steps, samples) under ``results_dir``."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.results_dir = Path(args.results)
        self.case = f"heldout{args.heldout}_{args.style}_steps{args.steps}_samples{args.samples}"
        self.runs_dir = self.results_dir / "runs" / self.case
        self.data_dir = self.results_dir / "data"
        self.methods = select_methods(args.methods)
        self.rates = parse_lrs(args.lrs)

    def run_dir(self, task: str, method: Method, lr: float, seed: int) -> Path:
        return self.runs_dir / task / method.name / f"lr{lr:g}_seed{seed}"

    def run(self, task: str, method: Method, lr: float, seed: int, label: str) -> dict | None:
        """One run (skipped when its result exists); returns its record, or None if it failed."""
        folder = self.run_dir(task, method, lr, seed)
        result = folder / RESULT_NAME
        if result.is_file():
            print(f"[done]    {label}", flush=True)
            return self.record(result, method)
        if self.args.report_only:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        if self.args.in_process:
            return self.run_in_process(task, method, lr, seed, label, folder)
        command = [
            sys.executable, "-m", "benchmarks.digits.single_run", "--task", task, "--method", method.name,
            "--lr", repr(lr), "--steps", str(self.args.steps), "--seed", str(seed), "--samples", str(self.args.samples),
            "--heldout", str(self.args.heldout), "--style", self.args.style, "--data_dir", str(self.data_dir),
            "--out", str(folder), "--threads", str(self.args.threads), "--class_images", str(self.args.class_images),
        ]
        print(f"[running] {label} ...", end="", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
        with open(folder / "log.txt", "w") as log:
            status = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        seconds = time.perf_counter() - start
        if status != 0 or not result.is_file():
            print(f" FAILED after {seconds:.0f}s (see {folder / 'log.txt'})", flush=True)
            return None
        record = self.record(result, method)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in record["metrics"].items() if isinstance(v, float))
        print(f" {seconds:.0f}s: {shown}", flush=True)
        return record

    def run_in_process(self, task: str, method: Method, lr: float, seed: int, label: str, folder: Path) -> dict:
        """``--in_process``: the run in this process (no subprocess start-up; memory is then not the run's own)."""
        import torch
        from accelerate.state import AcceleratorState, GradientState

        from benchmarks.digits.single_run import run

        torch.set_num_threads(self.args.threads)
        print(f"[running] {label} (in process)", flush=True)
        run(self.make_task(task), method.flags, folder, lr, self.args.steps, seed, self.args.samples, data_dir=self.data_dir)
        AcceleratorState._reset_state(reset_partial_state=True)  # the next run builds its own Accelerator
        GradientState._reset_state()
        return self.record(folder / RESULT_NAME, method)

    def make_task(self, name: str):
        return make_task(name, self.args.heldout, self.args.style, self.args.class_images)

    @staticmethod
    def record(result: Path, method: Method) -> dict:
        record = json.loads(result.read_text())
        record.update(method=method.name, family=method.family, description=method.description)
        return record

    def base_metrics(self, task_name: str) -> dict:
        """The base model's metrics on a task (cached as ``base_<task>.json`` in the case folder)."""
        path = self.runs_dir / f"base_{task_name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        if self.args.report_only:
            return {}
        import torch

        from benchmarks.digits.classifier import load_digit_classifier
        from benchmarks.digits.evaluate_base import load_base_pipeline

        torch.set_num_threads(self.args.threads)
        print(f"[running] base model on {task_name} ...", flush=True)
        task = self.make_task(task_name)
        metrics = task.evaluate(load_base_pipeline(), load_digit_classifier(), self.args.samples)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"[base]    {task_name}: {metrics}", flush=True)
        return metrics

    def sweep(self, task: str, base_metrics: dict) -> dict[str, dict]:
        """The learning-rate sweep of each family present in the selected methods; family -> chosen rate etc."""
        results: dict[str, dict] = {}
        names = {method.name: method for method in select_methods(None)}
        for family in FAMILIES:
            if not any(method.family == family for method in self.methods):
                continue
            representative = names[SWEEP_REPRESENTATIVES[family]]
            runs = {}
            for lr in self.rates[family]:
                label = f"{task} sweep {representative.name} lr={lr:g} seed={self.args.seeds[0]}"
                record = self.run(task, representative, lr, self.args.seeds[0], label)
                if record is not None:
                    runs[lr] = (sweep_score(task, record["metrics"], base_metrics), record["metrics"])
            if runs:
                chosen = max(runs, key=lambda lr: runs[lr][0])
            else:  # nothing finished (report-only before the sweep ran): the middle rate
                chosen = sorted(self.rates[family])[len(self.rates[family]) // 2]
            results[family] = {"method": representative.name, "runs": runs, "chosen": chosen}
            print(f"[sweep]   {task} {family}: learning rate {chosen:g}", flush=True)
        return results

    def execute(self) -> None:
        start = time.perf_counter()
        records: list[dict] = []
        base: dict[str, dict] = {}
        sweeps: dict[str, dict] = {}
        for task in self.args.tasks:
            base[task] = self.base_metrics(task)
            sweeps[task] = self.sweep(task, base[task])
            for index, method in enumerate(self.methods, start=1):
                lr = sweeps[task][method.family]["chosen"]
                for seed in self.args.seeds:
                    label = f"{task} [{index}/{len(self.methods)}] {method.name} lr={lr:g} seed={seed}"
                    record = self.run(task, method, lr, seed, label)
                    if record is not None:
                        records.append(record)
        self.write_report(records, base, sweeps)
        print(f"finished in {(time.perf_counter() - start) / 60:.1f} min", flush=True)

    def write_report(self, records: list[dict], base: dict[str, dict], sweeps: dict[str, dict]) -> None:
        tasks = list(self.args.tasks)
        table = markdown_table(records, base, tasks)
        plot = plot_quality(records, base, tasks, self.results_dir / "quality_vs_params.png")
        args = self.args
        text = [
            f"# Digits benchmark: held-out digit {args.heldout}, style `{args.style}`",
            "",
            f"{args.steps} optimizer steps per run, seeds {args.seeds}, {args.samples} samples per evaluated prompt set, "
            f"{args.threads} CPU thread(s) per run. Metrics: see `benchmarks/digits/tasks.py`. Written by "
            "`python -m benchmarks.digits.run_benchmark`.",
            "",
            table,
            "",
            "s/step: the training core's loop wall time / steps (DreamBooth batch: 4 instance + 4 class images; style "
            "batch: 8). Peak RSS: the run process's peak resident memory (VmHWM) at the end of training, including "
            "Python, torch and the frozen base. Both were measured on a shared 2-core machine: expect noise.",
            "",
            "## Learning-rate sweep",
            "",
            "Each family's representative at every rate (first seed); the family's methods then use the chosen rate. "
            "Score: DreamBooth = subject fidelity + prior retention; style = content accuracy + (1 - style FD / the "
            "base's style FD).",
            "",
            sweep_table(sweeps),
            "",
            f"![quality against trainable parameters]({plot.name})",
            "",
        ]
        report = self.results_dir / "benchmark.md"
        report.write_text("\n".join(text))
        print(f"report: {report}\nplot:   {plot}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="The digits benchmark: every tuner, the peft peers and full fine-tuning.")
    parser.add_argument("--heldout", type=int, default=9, help="the digit the base never saw (DreamBooth's subject)")
    parser.add_argument("--style", default=DEFAULT_STYLE, choices=sorted(STYLES), help="the unseen style of the style task")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (the sweep uses the first)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of every run")
    parser.add_argument("--methods", nargs="+", default=None, help="method names (default: all); see methods.py")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--lrs", nargs="+", default=None, metavar="FAMILY=LR,...",
                        help=f"learning rates swept per family (families {FAMILIES}); default {DEFAULT_SWEEP}")
    parser.add_argument("--samples", type=int, default=32, help="samples per evaluated prompt set")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS_DIR, help="where runs, tables and the plot go")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--class_images", type=int, default=DEFAULT_CLASS_IMAGES, help="DreamBooth prior-preservation images")
    parser.add_argument("--report_only", action="store_true", help="write the report from finished runs; run nothing")
    parser.add_argument("--in_process", action="store_true",
                        help="run trainings in this process instead of one subprocess each (quicker for tiny budgets; "
                        "peak memory is then this process's, not each run's)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_digit(args.heldout)
    for name in ("steps", "samples", "threads", "class_images"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1")
    try:
        Benchmark(args).execute()
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
