"""One benchmark run: train one method on one task with the project's training core, evaluate it, write JSON.

:func:`run` is what :mod:`benchmarks.digits.run_benchmark` calls in a fresh subprocess per run (so peak memory is
that run's own, and no state leaks between runs). ``result.json`` in the run folder holds the metrics, the
trainable parameters, the seconds per optimizer step (from ``train_stats.json``, :mod:`benchmarks.peers.train`) and memory:

* ``peak_rss_mb`` -- the process's peak resident set size (Linux ``VmHWM``) at the end of training, before
  evaluation starts: the whole training process (Python, torch, the frozen base, activations, optimizer state);
* ``train_rss_increase_mb`` -- that peak minus the resident size just before training started (after the
  imports), i.e. what loading the base and training it added.

Command line (normally run by ``run_benchmark.py``)::

    python -m benchmarks.digits.single_run --task dreambooth --method res_attn --lr 1e-3 --steps 200 --out /tmp/run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.digits.evaluate_base import DEFAULT_BASE_MODEL_DIR

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "results" / "data"
RESULT_NAME = "result.json"


def memory_status_mb(field: str) -> float:
    """A field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB; 0.0 where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def training_argv(task, method_flags: Sequence[str], folders: dict[str, Path], output_dir: Path, learning_rate: float,
                  steps: int, seed: int, base_model: Path) -> list[str]:
    """The training-core flags of one run: the base, the task's data, the method, the budget."""
    return [
        "--pretrained_model_name_or_path", str(base_model),
        "--output_dir", str(output_dir),
        "--overwrite_output",
        "--resolution", "32",
        "--max_train_steps", str(steps),
        "--learning_rate", str(learning_rate),
        "--lr_scheduler", "constant",
        "--seed", str(seed),
        "--report_to", "none",
        "--checkpointing_steps", str(10 * steps + 1),  # no checkpoints: runs are short and resumed whole
        *task.training_flags(folders),
        *method_flags,
    ]


def prepare_class_images(task, folders: dict[str, Path], base_model: Path, seed: int = 0) -> None:
    """Generate the DreamBooth class images once, with the training core's own generator (shared by all runs)."""
    if getattr(task, "name", None) != "dreambooth":
        return
    from accelerate import Accelerator

    from resattn_diffusion.training import parse_args
    from resattn_diffusion.training.prior import generate_class_images

    argv = training_argv(task, [], folders, folders["class_dir"].parent / "unused", 1e-4, 1, seed, base_model)
    args = parse_args("dreambooth", argv)
    generate_class_images(args, Accelerator(cpu=True), 32, seed)


def run(task, method_flags: Sequence[str], run_dir: Path, learning_rate: float, steps: int, seed: int,
        samples: int, base_model: Path = DEFAULT_BASE_MODEL_DIR, data_dir: Path = DEFAULT_DATA_DIR,
        eval_seed: int = 0) -> dict:
    """Train and evaluate one run into ``run_dir``; returns (and writes) the result record."""
    from benchmarks.digits.classifier import load_digit_classifier
    from benchmarks.peers.train import parse_args, train
    from benchmarks.peers.trainables import load_tuned_pipeline

    run_dir = Path(run_dir)
    output_dir = run_dir / "train"
    folders = task.prepare(Path(data_dir))
    prepare_class_images(task, folders, base_model)
    argv = training_argv(task, method_flags, folders, output_dir, learning_rate, steps, seed, base_model)
    script = "dreambooth" if task.name == "dreambooth" else "text2img"
    args = parse_args(script, argv)

    rss_before = memory_status_mb("VmRSS")
    start = time.perf_counter()
    train(args)
    train_seconds = time.perf_counter() - start
    peak = memory_status_mb("VmHWM")
    stats = json.loads((output_dir / "train_stats.json").read_text())

    start = time.perf_counter()
    pipeline = load_tuned_pipeline(base_model, output_dir)
    metrics = task.evaluate(pipeline, load_digit_classifier(), samples, seed=eval_seed)
    record = {
        "task": task.name,
        "method_flags": list(method_flags),
        "learning_rate": learning_rate,
        "steps": steps,
        "seed": seed,
        "metrics": metrics,
        "trainable_parameters": stats["trainable_parameters"],
        "seconds_per_step": stats["seconds_per_step"],
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(peak, 1),
        "train_rss_increase_mb": round(peak - rss_before, 1),
        "threads": torch.get_num_threads(),
    }
    (run_dir / RESULT_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> None:
    from benchmarks.digits.methods import method_by_name
    from benchmarks.digits.tasks import DEFAULT_CLASS_IMAGES, DEFAULT_STYLE, TASKS, make_task

    parser = argparse.ArgumentParser(description="Train and evaluate one method on one digits task.")
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--method", required=True, help="a name from benchmarks.digits.methods.all_methods()")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--heldout", type=int, default=9)
    parser.add_argument("--style", default=DEFAULT_STYLE)
    parser.add_argument("--class_images", type=int, default=DEFAULT_CLASS_IMAGES, help="DreamBooth prior-preservation images")
    parser.add_argument("--base_model", type=Path, default=DEFAULT_BASE_MODEL_DIR)
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, required=True, help="the run folder (result.json goes here)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = make_task(args.task, args.heldout, args.style, args.class_images)
    record = run(task, method_by_name(args.method).flags, args.out, args.lr, args.steps, args.seed, args.samples,
                 args.base_model, args.data_dir)
    print(json.dumps({key: record[key] for key in ("metrics", "trainable_parameters", "seconds_per_step", "peak_rss_mb")}))


if __name__ == "__main__":
    main()
