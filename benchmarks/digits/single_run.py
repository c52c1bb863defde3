"""One benchmark run: train one method on one task with the project's training core, evaluate it, write its files.

:func:`execute` is what :mod:`benchmarks.digits.run_benchmark` calls for every run of its plan (in a worker
process, one thread). A run writes three files named by its key (:class:`benchmarks.digits.plan.RunSpec`) into the
case's folder, and nothing else survives it (the trained weights go to a scratch folder that is removed):

* ``<key>.json`` -- self-contained: the case, task, method (name, family, flags), learning rate, seed, role, every
  metric, the trainable parameters, the seconds per optimizer step (from ``train_stats.json``,
  :mod:`benchmarks.peers.train`), wall and CPU seconds, memory, the machine. Written last and atomically, so a file
  that exists is a finished run, and files from several machines merge by copying;
* ``<key>.png`` -- the sample grid the metrics were computed on (rows: see the task's ``evaluate``);
* ``<key>.log`` -- the run's output.

Memory: ``peak_rss_mb`` is the process's peak resident set size (Linux ``VmHWM``, reset before the run, so it is
this run's even in a long-lived worker) at the end of training, before evaluation; ``train_rss_increase_mb`` that
peak minus the resident size just before training started.

Command line (one run by hand)::

    python -m benchmarks.digits.single_run --task dreambooth --method res_attn --lr 1e-3 --seed 1 --out /tmp/runs
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.digits.evaluate_base import DEFAULT_BASE_MODEL_DIR

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "results" / "data"


def memory_status_mb(field: str) -> float:
    """A field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB; 0.0 where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def reset_peak_memory() -> None:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0), so the next peak is the next run's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def training_argv(
    task,
    method_flags: Sequence[str],
    folders: dict[str, Path],
    output_dir: Path,
    learning_rate: float,
    steps: int,
    seed: int,
    base_model: Path,
) -> list[str]:
    """The training-core flags of one run: the base, the task's data, the method, the budget."""
    return [
        "--pretrained_model_name_or_path",
        str(base_model),
        "--output_dir",
        str(output_dir),
        "--overwrite_output",
        "--resolution",
        "32",
        "--max_train_steps",
        str(steps),
        "--learning_rate",
        str(learning_rate),
        "--lr_scheduler",
        "constant",
        "--seed",
        str(seed),
        "--report_to",
        "none",
        "--checkpointing_steps",
        str(10 * steps + 1),  # no checkpoints: runs are short and rerun whole
        *task.training_flags(folders),
        *method_flags,
    ]


#: torch CPU threads the DreamBooth class images are generated with. Image ``i`` depends only on the base, the class
#: prompt, the seed (0) and ``i`` -- not on the run, the batch it was generated in or how many were cached before --
#: except through the thread count: 1 and 2 threads give images that differ in single pixels by one level. The
#: shipped results' class images were made with 2 (the parent process on the 2-core machine), so 2 it stays.
CLASS_IMAGE_THREADS = 2


def prepare_class_images(task, folders: dict[str, Path], base_model: Path, seed: int = 0) -> None:
    """Generate the DreamBooth class images once, with the training core's own generator (shared by all runs: the
    folder is a cache every run of every case with this class prompt reads; runs never add to it, since it is full
    before they start and the training core only fills missing images)."""
    if getattr(task, "name", None) != "dreambooth":
        return
    from resattn_diffusion.images import count_images

    class_dir = folders["class_dir"]
    if class_dir.is_dir() and count_images(class_dir) >= task.num_class_images:
        return  # cached: a run's own threads stay untouched
    from accelerate import Accelerator

    from benchmarks.peers.train import parse_args
    from resattn_diffusion.training.prior import generate_class_images

    argv = training_argv(task, [], folders, folders["class_dir"].parent / "unused", 1e-4, 1, seed, base_model)
    args = parse_args("dreambooth", argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(CLASS_IMAGE_THREADS)  # the same pixels whichever process or machine fills the cache
    try:
        generate_class_images(args, Accelerator(cpu=True), 32, seed)
    finally:
        torch.set_num_threads(threads)


def prepare_data(case, tasks: Sequence[str], data_dir: Path, base_model: Path = DEFAULT_BASE_MODEL_DIR) -> None:
    """Write every task's training data (and DreamBooth's class images) once, before runs start in parallel."""
    from benchmarks.digits.tasks import make_task

    for name in tasks:
        task = make_task(name, case.heldout, case.style, case.class_images)
        prepare_class_images(task, task.prepare(Path(data_dir)), base_model)
        _reset_accelerate()


def _reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so the next run in this process builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def execute(
    spec,
    case,
    folder: Path,
    data_dir: Path = DEFAULT_DATA_DIR,
    base_model: Path = DEFAULT_BASE_MODEL_DIR,
    scratch_dir: Path | None = None,
) -> dict:
    """Train (unless ``spec`` is the base) and evaluate one run; write ``<key>.json`` and ``<key>.png`` into
    ``folder``; return the record. Evaluation samples are seeded by the run's seed."""
    from benchmarks.digits.evaluate_base import load_base_pipeline
    from benchmarks.digits.methods import method_by_name
    from benchmarks.digits.plan import BASE, RESULT_VERSION
    from benchmarks.digits.tasks import make_task
    from benchmarks.peers.train import parse_args, train
    from benchmarks.peers.trainables import load_tuned_pipeline

    wall_start, cpu_start = time.perf_counter(), time.process_time()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    task = make_task(spec.task, case.heldout, case.style, case.class_images, case.sampling_steps)
    record = {
        "version": RESULT_VERSION,
        "case": case.record(),
        "task": spec.task,
        "method": spec.method,
        "learning_rate": spec.lr,
        "seed": spec.seed,
        "role": spec.role,
        "machine": platform.node(),
        "threads": torch.get_num_threads(),
    }
    reset_peak_memory()
    if spec.method == BASE:
        pipeline = load_base_pipeline(base_model)
        record.update(family="base", description="the shipped base, untuned", method_flags=[], trainable_parameters=0)
        scratch = None
    else:
        method = method_by_name(spec.method)
        scratch = Path(scratch_dir or Path(data_dir).parent / "scratch") / case.name / spec.key
        folders = task.prepare(Path(data_dir))
        prepare_class_images(task, folders, base_model)
        argv = training_argv(
            task, method.flags, folders, scratch, spec.lr, case.steps(spec.task), spec.seed, base_model
        )
        args = parse_args("dreambooth" if task.name == "dreambooth" else "text2img", argv)
        rss_before = memory_status_mb("VmRSS")
        start = time.perf_counter()
        train(args)
        train_seconds = time.perf_counter() - start
        peak = memory_status_mb("VmHWM")
        stats = json.loads((scratch / "train_stats.json").read_text())
        record.update(
            family=method.family,
            description=method.description,
            method_flags=list(method.flags),
            steps=case.steps(spec.task),
            trainable_parameters=stats["trainable_parameters"],
            seconds_per_step=stats["seconds_per_step"],
            train_seconds=round(train_seconds, 1),
            peak_rss_mb=round(peak, 1),
            train_rss_increase_mb=round(peak - rss_before, 1),
        )
        pipeline = load_tuned_pipeline(base_model, scratch)
    start = time.perf_counter()
    grid = folder / f"{spec.key}.png"
    record["metrics"] = task.evaluate(pipeline, None, case.samples, seed=spec.seed, grid=grid)
    record["grid"] = grid.name
    record["eval_seconds"] = round(time.perf_counter() - start, 1)
    record["wall_seconds"] = round(time.perf_counter() - wall_start, 1)
    # CPU seconds of this process: what the run costs a core, however many other jobs shared the machine
    record["cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    _write_atomically(folder / f"{spec.key}.json", json.dumps(record, indent=2) + "\n")
    _reset_accelerate()
    return record


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks.digits.plan import Case, RunSpec
    from benchmarks.digits.tasks import DEFAULT_CLASS_IMAGES, DEFAULT_STYLE, TASKS

    parser = argparse.ArgumentParser(description="Train and evaluate one method on one digits task.")
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--method", required=True, help="a name from benchmarks.digits.methods.all_methods(), or base")
    parser.add_argument("--lr", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dreambooth_steps", type=int, default=Case.dreambooth_steps)
    parser.add_argument("--style_steps", type=int, default=Case.style_steps)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument(
        "--sampling_steps", type=int, default=Case.sampling_steps, help="denoising steps of every judged sample"
    )
    parser.add_argument("--heldout", type=int, default=9)
    parser.add_argument("--style", default=DEFAULT_STYLE)
    parser.add_argument(
        "--class_images", type=int, default=DEFAULT_CLASS_IMAGES, help="DreamBooth prior-preservation images"
    )
    parser.add_argument("--base_model", type=Path, default=DEFAULT_BASE_MODEL_DIR)
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, required=True, help="the folder the run's files go to")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.sampling_steps < 1:
        raise SystemExit("--sampling_steps must be at least 1")
    case = Case.from_args(args)
    spec = RunSpec(args.task, args.method, args.lr, args.seed, "single")
    record = execute(spec, case, args.out, args.data_dir, args.base_model)
    print(
        json.dumps(
            {key: record.get(key) for key in ("metrics", "trainable_parameters", "wall_seconds", "peak_rss_mb")}
        )
    )


if __name__ == "__main__":
    main()
