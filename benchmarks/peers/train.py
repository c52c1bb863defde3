"""Train a peer (a peft adapter or the whole UNet) or a res tuner through the library's training core.

The command line of ``train_dreambooth.py`` / ``train_text2img.py`` plus the peers' flags; the task comes first::

    python -m benchmarks.peers.train dreambooth --peft_method lora --peft_rank 4 \\
        --pretrained_model_name_or_path ... --instance_data_dir ... --instance_prompt "a photo of sks dog"
    python -m benchmarks.peers.train text2img --full_finetune --train_data_dir ...

Without a peer flag it trains the res tuner the tuner flags describe, exactly as the scripts do. Every run
also writes ``train_stats.json`` (:class:`TrainStats`): the method, its trainable parameters, steps, and the
seconds per optimizer step of the training loop -- what the digits benchmark reports.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.peers.trainables import PEFT_METHODS, FullFinetuneTrainable, PeftTrainable
from resattn_diffusion.training import run_script
from resattn_diffusion.training import train as train_core
from resattn_diffusion.training.args import TASKS, Task, build_parser, check_args
from resattn_diffusion.training.trainable import TrainableProvider, TrainingCallback, TrainingSummary

TRAIN_STATS_NAME = "train_stats.json"
#: the res tuner flags of the training scripts, which a peer run does not use
TUNER_FLAGS = (
    "tuner",
    "rank",
    "heads",
    "tuner_arg",
    "targets",
    "blocks",
    "projections",
    "placement",
    "tuner_scale",
    "tuner_config",
)


def build_peer_parser(task: Task) -> argparse.ArgumentParser:
    """The training script's parser of ``task`` with the peers' flags added."""
    parser = build_parser(task)
    peers = parser.add_argument_group(
        "instead of a res tuner: a peft adapter or full fine-tuning (the peers to compare with)"
    )
    peers.add_argument(
        "--peft_method",
        type=str,
        default=None,
        choices=list(PEFT_METHODS),
        help="Train a peft adapter on the attention projections to_q, to_k, to_v, to_out.0 instead of a res tuner.",
    )
    peers.add_argument("--peft_rank", type=int, default=None, help="Rank of --peft_method lora or glora (default 4).")
    peers.add_argument(
        "--peft_block_size",
        type=int,
        default=None,
        help="Block size of --peft_method c3a (default: the gcd of the projections' input and output sizes).",
    )
    peers.add_argument(
        "--full_finetune", action="store_true", help="Train every UNet weight (the ceiling) instead of a res tuner."
    )
    return parser


def check_method_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A run trains one thing: a res tuner, a peft adapter (``--peft_method``) or the UNet (``--full_finetune``)."""
    if args.peft_method is not None and args.full_finetune:
        parser.error("--peft_method and --full_finetune exclude each other; pick one")
    if args.peft_method is None and not args.full_finetune:
        for flag in ("peft_rank", "peft_block_size"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag} needs --peft_method")
        return
    chosen = f"--peft_method {args.peft_method}" if args.peft_method else "--full_finetune"
    given = [f"--{flag}" for flag in TUNER_FLAGS if getattr(args, flag) is not None]
    if given:
        parser.error(
            f"{chosen} trains no res tuner, so the res tuner flag(s) {', '.join(given)} do not apply; drop them"
        )
    if args.full_finetune:
        for flag in ("peft_rank", "peft_block_size"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag} is a --peft_method setting; --full_finetune has none")
        return
    if args.peft_method == "c3a" and args.peft_rank is not None:
        parser.error("--peft_method c3a has no rank; its size is set by --peft_block_size")
    if args.peft_method in ("lora", "glora"):
        if args.peft_block_size is not None:
            parser.error(f"--peft_block_size is a c3a setting; --peft_method {args.peft_method} takes --peft_rank")
        args.peft_rank = 4 if args.peft_rank is None else args.peft_rank
    for flag in ("peft_rank", "peft_block_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be at least 1, got {value}")


def parse_args(task: Task, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags of one task with the peers' flags; a bad combination exits with a message."""
    parser = build_peer_parser(task)
    args = parser.parse_args(argv)
    args.task = task
    check_method_flags(parser, args)
    check_args(parser, args)
    return args


def peer_trainable(args: argparse.Namespace) -> TrainableProvider | None:
    """The peer the flags ask for; None for a res tuner (the training core's default)."""
    if args.full_finetune:
        return FullFinetuneTrainable()
    if args.peft_method is not None:
        return PeftTrainable(args.peft_method, args.peft_rank, args.peft_block_size)
    return None


class TrainStats(TrainingCallback):
    """``train_stats.json``: the method, its trainable parameters, and the wall time per optimizer step of this
    run's loop (data loading, forward, backward, optimizer, and any checkpoints and validation in between; no model
    loading)."""

    def __init__(self, method: str):
        self.method = method

    def on_train_end(self, summary: TrainingSummary) -> None:
        steps, seconds = summary.steps, summary.loop_seconds
        stats = {
            "method": self.method,
            "trainable_parameters": summary.trainable_parameters,
            "steps": steps,
            "loop_seconds": round(seconds, 3),
            "seconds_per_step": round(seconds / steps, 5) if steps else None,
        }
        with open(summary.output_dir / TRAIN_STATS_NAME, "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2)


def train(args: argparse.Namespace) -> Path:
    """Train what the flags ask for (a peer, else the res tuner) and write ``train_stats.json``; returns the
    saved result."""
    trainable = peer_trainable(args)
    method = "res_tuner" if trainable is None else trainable.name
    return train_core(args, trainable, callbacks=[TrainStats(method)])


def main(argv: Sequence[str] | None = None) -> Path:
    """``<task> <flags>``: the task (dreambooth or text2img) first, then that script's flags and the peers'."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TASKS:
        usage = argparse.ArgumentParser(prog="python -m benchmarks.peers.train", description=__doc__.split("\n")[0])
        usage.add_argument(
            "task", choices=TASKS, help="then that training script's flags and the peers' (<task> --help)"
        )
        usage.parse_args(argv[:1])  # prints the usage and exits
    return train(parse_args(argv[0], argv[1:]))


if __name__ == "__main__":
    run_script(main)
