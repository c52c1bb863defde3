"""Run the digits benchmark: every method on DreamBooth and style, several seeds, a sweep per method; write the report.

The runs come from :func:`benchmarks.digits.plan.make_plan` (a learning-rate sweep per method and task on the first
seed, widened while its best rate sits at an edge; then the chosen rate on the other seeds). ``--workers N`` runs N
at a time, each in a worker process with one CPU thread; every run writes its own files into
``results/runs/<case>/`` and finished runs are skipped, so the benchmark can be stopped (Ctrl-C, SIGTERM) and
resumed, or run partly on another machine and merged by copying that folder's files. ``benchmark.md`` (tables with
95% intervals, significance against peft LoRA and full fine-tuning, links to every sample grid) and
``quality_vs_params.png`` are written to ``--results`` from whatever has finished.

Budget. The default methods are every tuner at its default size, the three peft peers and full fine-tuning (16
methods, 2 tasks: 2 base runs, 96 sweep runs plus widenings, 108 evaluation runs). Priced as ``--status`` prices
every run -- one thread, the fastest quarter of each method's finished runs -- the 222 runs of the shipped results
(15 sweeps widened, 16 rates added) cost ~118 core-minutes: about 60 minutes with ``--workers 2`` on 2 idle cores.
The larger sizes (``res_attn-large`` ...) are opt-in: name them in ``--methods`` or pass ``--with_large`` (10 more
methods, each with its own sweep: about 1.6x the runs).

    .venv/bin/python -m benchmarks.digits.run_benchmark --workers 2             # the default benchmark
    .venv/bin/python -m benchmarks.digits.run_benchmark --workers 2 --with_large   # ... and every larger size
    .venv/bin/python -m benchmarks.digits.run_benchmark --status                # what remains, in core-minutes
    .venv/bin/python -m benchmarks.digits.run_benchmark --report_only           # tables and plot from finished runs
    .venv/bin/python -m benchmarks.digits.run_benchmark --quick --results /tmp/q    # a smoke test (the tests run it)
    .venv/bin/python -m benchmarks.digits.run_benchmark --tasks dreambooth --methods res_attn peft_lora --heldout 3
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

from benchmarks.digits.data import check_digit
from benchmarks.digits.methods import FAMILIES, select_methods
from benchmarks.digits.plan import Case, Plan, RunSpec, make_plan, read_finished, remaining_summary
from benchmarks.digits.tasks import DEFAULT_CLASS_IMAGES, DEFAULT_STYLE, STYLES, TASKS

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_SEEDS = (0, 1, 2, 3)  # 0 chooses the learning rate; 1-3 are reported
DEFAULT_EXTRA_SEEDS = (4, 5)  # the headline comparison (res_attn, peft_lora, full_finetune) gets two more
QUICK = {
    "dreambooth_steps": 2,
    "style_steps": 2,
    "samples": 4,
    "sampling_steps": 4,
    "class_images": 2,
    "seeds": [0, 1],
    "extra_seeds": [],
    "max_widen": 0,
    "methods": ["res_attn", "peft_lora", "full_finetune"],
    "lrs": ["operation=1e-3", "peft=1e-3", "full=1e-4"],
}


def parse_lrs(items: Sequence[str] | None) -> dict[str, tuple[float, ...]]:
    """``["operation=3e-4,1e-3", "full=1e-4"]`` -> {family: initial sweep rates} (overriding the defaults)."""
    rates: dict[str, tuple[float, ...]] = {}
    for item in items or []:
        family, sep, values = item.partition("=")
        if not sep or family not in FAMILIES:
            raise SystemExit(
                f"--lrs {item!r}: write FAMILY=LR[,LR...] with FAMILY one of {FAMILIES}, e.g. operation=3e-4,1e-3"
            )
        try:
            rates[family] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise SystemExit(f"--lrs {item!r}: learning rates must be numbers, e.g. operation=3e-4,1e-3") from None
        if not rates[family] or min(rates[family]) <= 0:
            raise SystemExit(f"--lrs {item!r}: give at least one positive learning rate")
    return rates


# --- worker processes -----------------------------------------------------------------------------------------
def _worker_init(threads: int) -> None:
    import warnings

    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop


def _run_logged(spec: RunSpec, case: Case, folder: str, data_dir: str) -> tuple[str, bool, str]:
    """One run in a worker, its output (file descriptors 1 and 2) going to ``<key>.log``; never raises."""
    from benchmarks.digits.single_run import execute

    log_path = Path(folder) / f"{spec.key}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            record = execute(spec, case, Path(folder), Path(data_dir))
            message = ", ".join(f"{k} {v:.3g}" for k, v in record["metrics"].items() if isinstance(v, float))
            ok = True
        except Exception:  # a failed run is reported and skipped; the benchmark goes on
            traceback.print_exc()
            message, ok = f"FAILED (see {log_path})", False
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
    return spec.key, ok, message


class Benchmark:
    """The runs of one case under ``results_dir``: plan, execute (in parallel), report."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.case = Case.from_args(args)
        self.results_dir = Path(args.results)
        self.runs_dir = self.results_dir / "runs" / self.case.name
        self.data_dir = self.results_dir / "data"
        self.methods = select_methods(args.methods, args.with_large)
        self.initial_rates = parse_lrs(args.lrs)
        self._cache: dict[Path, dict] = {}
        self.workers = max(args.workers, 1)  # for the wall-clock estimate (0 runs one at a time)

    def plan(self) -> Plan:
        finished = read_finished(self.runs_dir, self.case, self._cache)
        return make_plan(
            self.args.tasks,
            self.methods,
            self.args.seeds,
            finished,
            self.args.extra_seeds,
            self.args.max_widen,
            self.initial_rates,
        )

    def execute(self) -> None:
        start = time.perf_counter()
        plan = self.plan()
        print(f"case {self.case.name}: {remaining_summary(plan, workers=self.workers)}", flush=True)
        if plan.pending:
            from benchmarks.digits.single_run import prepare_data

            self.runs_dir.mkdir(parents=True, exist_ok=True)
            prepare_data(self.case, self.args.tasks, self.data_dir)
            try:
                if self.args.workers == 0:
                    self._run_in_this_process()
                else:
                    self._run_in_workers()
            except KeyboardInterrupt:
                self.write_report()  # from whatever finished
                print(f"stopped: {remaining_summary(self.plan(), workers=self.workers)}", flush=True)
                raise SystemExit(130) from None
        self.write_report()
        print(f"finished in {(time.perf_counter() - start) / 60:.1f} min", flush=True)

    def _run_in_this_process(self) -> None:
        import torch

        from benchmarks.digits.single_run import execute

        torch.set_num_threads(self.args.threads)
        failed: set[str] = set()
        while True:
            ready = [spec for spec in self.plan().pending if spec.key not in failed]
            if not ready:
                return
            spec = ready[0]
            print(f"[running] {spec.key} ({spec.role})", flush=True)
            try:
                execute(spec, self.case, self.runs_dir, self.data_dir)
            except Exception:
                traceback.print_exc()
                failed.add(spec.key)

    def _run_in_workers(self) -> None:
        env_before = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"  # the workers inherit it: no progress bars in the logs
        pool = ProcessPoolExecutor(
            self.args.workers,
            mp_context=get_context("spawn"),
            initializer=_worker_init,
            initargs=(self.args.threads,),
            max_tasks_per_child=40,
        )
        in_flight: dict[Future, RunSpec] = {}
        failed: set[str] = set()
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            while True:
                plan = self.plan()
                busy = {spec.key for spec in in_flight.values()}
                ready = [spec for spec in plan.pending if spec.key not in busy and spec.key not in failed]
                while ready and len(in_flight) < self.args.workers:
                    spec = ready.pop(0)
                    in_flight[pool.submit(_run_logged, spec, self.case, str(self.runs_dir), str(self.data_dir))] = spec
                    print(f"[started] {spec.key} ({spec.role})", flush=True)
                if not in_flight:
                    break
                done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for future in done:
                    spec = in_flight.pop(future)
                    key, ok, message = future.result()
                    if not ok:
                        failed.add(key)
                    print(f"[{'done' if ok else 'failed'}] {key}: {message}", flush=True)
                print(
                    f"          {remaining_summary(self.plan(), [s.key for s in in_flight.values()], self.workers)}",
                    flush=True,
                )
        except KeyboardInterrupt:
            print(
                f"stopping: {len(in_flight)} runs in flight are abandoned (rerun the same command to resume)",
                flush=True,
            )
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            if env_before is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = env_before
        pool.shutdown(wait=True)
        if failed:
            print(f"{len(failed)} runs failed (their .log files say why): {sorted(failed)}", flush=True)

    def status(self) -> None:
        plan = self.plan()
        print(f"case {self.case.name} in {self.runs_dir}")
        print(remaining_summary(plan, workers=self.workers))
        for spec in plan.pending:
            print(f"  {spec.key} ({spec.role})")

    def write_report(self) -> Path:
        from benchmarks.digits.report import write_report

        report = write_report(self.plan(), self.case, self.args, self.results_dir, self.runs_dir)
        print(f"report: {report}", flush=True)
        return report


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="The digits benchmark: every tuner, the peft peers and full fine-tuning."
    )
    parser.add_argument("--heldout", type=int, default=9, help="the digit the base never saw (DreamBooth's subject)")
    parser.add_argument(
        "--style", default=DEFAULT_STYLE, choices=sorted(STYLES), help="the unseen style of the style task"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(DEFAULT_SEEDS),
        help="training seeds: the first chooses each learning rate, the others are reported",
    )
    parser.add_argument(
        "--extra_seeds",
        type=int,
        nargs="*",
        default=list(DEFAULT_EXTRA_SEEDS),
        help="more reported seeds for res_attn, peft_lora and full_finetune (the README's comparisons)",
    )
    parser.add_argument(
        "--dreambooth_steps", type=int, default=Case.dreambooth_steps, help="optimizer steps (DreamBooth)"
    )
    parser.add_argument("--style_steps", type=int, default=Case.style_steps, help="optimizer steps (style)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="method names (default: every tuner at its default size, the peft peers, full fine-tuning; 'all' adds "
        "every larger and alternative setting, e.g. res_attn-large, res_attn-1head); see methods.py",
    )
    parser.add_argument(
        "--with_large",
        action="store_true",
        help="also run the larger setting (<tuner>-large) of every selected tuner that has one, each with its own "
        "sweep",
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument(
        "--lrs",
        nargs="+",
        default=None,
        metavar="FAMILY=LR,...",
        help=f"initial sweep rates per family (families {FAMILIES}), for every task",
    )
    parser.add_argument("--max_widen", type=int, default=2, help="how often a sweep may widen on each side")
    parser.add_argument("--samples", type=int, default=32, help="samples per evaluated prompt set")
    parser.add_argument(
        "--sampling_steps", type=int, default=Case.sampling_steps, help="denoising steps of every judged sample"
    )
    parser.add_argument(
        "--class_images", type=int, default=DEFAULT_CLASS_IMAGES, help="DreamBooth prior-preservation images"
    )
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS_DIR, help="where runs, tables and the plot go")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="runs at a time, each in its own process (0: one at a time in this process)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--status", action="store_true", help="print what remains (runs, core-minutes); run nothing")
    parser.add_argument("--report_only", action="store_true", help="write the report from finished runs; run nothing")
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="also rewrite this README's generated blocks (<!-- digits-claims:begin/end -->, "
        "<!-- digits-which-tuner:begin/end -->) from the finished runs",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke test at a tiny budget ({QUICK}); explicit options still apply on top",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # quick settings, except for what the command line set explicitly
        explicit = {
            token.lstrip("-").split("=")[0]
            for token in (argv if argv is not None else sys.argv[1:])
            if token.startswith("--")
        }
        for key, value in QUICK.items():
            if key not in explicit:
                setattr(args, key, value)
    check_digit(args.heldout)
    for name in ("dreambooth_steps", "style_steps", "samples", "sampling_steps", "threads", "class_images"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1")
    if args.workers < 0 or args.max_widen < 0:
        raise SystemExit("--workers and --max_widen must be at least 0")
    if args.readme is not None:  # before hours of runs, not after
        from benchmarks.digits.guide import check_readme

        try:
            check_readme(args.readme)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    if len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(
            "--seeds: give at least two different seeds (the first chooses the learning rates, the "
            "others are reported)"
        )
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        benchmark = Benchmark(args)
        if args.status:
            benchmark.status()
        elif args.report_only:
            benchmark.write_report()
        else:
            benchmark.execute()
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
