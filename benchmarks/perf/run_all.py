"""Every performance benchmark in one run: JSON per benchmark and one markdown summary with the targets of issue 8.

    .venv/bin/python -m benchmarks.perf.run_all                 # full size (about an hour on 2 shared cores)
    .venv/bin/python -m benchmarks.perf.run_all --tiny          # tiny sizes, one round: a smoke test (~a minute)
    python -m benchmarks.perf.run_all --device cuda --size sd15 --dtype fp16   # on a GPU (issue 14's targets)

Writes ``<out>/train_step.json``, ``sampling.json``, ``fft_paths.json``, ``load_time.json``,
``compile_breaks.json`` (and ``bypass_memory.json`` with ``--with-bypass-memory``; without it, a
``bypass_memory.json`` already in ``<out>`` is shown as it is), ``targets.json`` and ``<out>/summary.md``: the
tables of every benchmark and the targets, each with the measured value and whether it is met. With ``--only``,
the other benchmarks' tables in the summary come from their last JSON in ``<out>`` (marked as such). ``<out>``
defaults to ``benchmarks/perf/results``. Options: ``--repeats`` (interleaved rounds, default 7), ``--threads``
(default ``auto``: every core on an idle machine, else 1), ``--clock`` (default ``cpu`` with one thread),
``--only train_step sampling ...``, ``--device``/``--size``/``--dtype``/``--batch-size`` (see
:func:`~benchmarks.perf.common.add_common_arguments`). On a GPU the summary also checks issue 14's GPU targets
(``gpu_suite.evaluate_gpu_targets``) and names the device; ``load_time`` and ``compile_breaks``' graph breaks
stay CPU measurements. ``benchmarks/perf/gpu_run.sh`` is the time-guarded one-shot GPU run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resattn_diffusion import get_tuner_spec

from . import compile_breaks, fft_paths, load_time, sampling, train_step
from .common import (
    RESULTS_DIR,
    add_common_arguments,
    configure_threads,
    log,
    machine_info,
    paired_ratio_interval,
    size_from_args,
    write_json,
)

BENCHMARKS = ("train_step", "sampling", "fft_paths", "load_time", "compile_breaks")
_MODULES = {
    "train_step": train_step,
    "sampling": sampling,
    "fft_paths": fft_paths,
    "load_time": load_time,
    "compile_breaks": compile_breaks,
}
#: Linear tuners whose fused sampling must cost nothing (target <= 1.02 x base).
FUSED_TARGET_TUNERS = ("res_lora", "glora", "surm_circulant", "surm_toeplitz", "surm_kronecker", "surm_ldr")


def _row(result: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((row for row in result["rows"] if row["name"] == name), None)


def _check(
    target: str,
    value: float | None,
    limit: float,
    at_most: bool = True,
    note: str = "",
    interval: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """One target; ``interval``: the 95% interval of a time ratio (:func:`~.common.paired_ratio_interval`), and
    ``settled`` whether all of it lies on the side of the limit the median is on (None without an interval)."""
    met = None if value is None else (value <= limit if at_most else value >= limit)
    settled = None
    if interval is not None and met is not None:
        settled = all((bound <= limit if at_most else bound >= limit) == met for bound in interval)
    return {
        "target": target,
        "value": value,
        "limit": limit,
        "at_most": at_most,
        "met": met,
        "note": note,
        "interval": None if interval is None else list(interval),
        "settled": settled,
    }


def _time_interval(rows: dict[str, dict[str, Any]], name: str, baseline: str | None) -> tuple[float, float] | None:
    row, base = rows.get(name), rows.get(baseline or "")
    return None if row is None or base is None else paired_ratio_interval(row.get("timing"), base.get("timing"))


def evaluate_targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 8's targets against the measured results (only for the benchmarks that ran)."""
    checks: list[dict[str, Any]] = []
    train = results.get("train_step")
    if train:
        rows = {row["name"]: row for row in train["rows"]}
        floor, lora = train_step.FLOOR, train_step.PEFT_LORA
        res_attn = rows.get("res_attn") or {}
        target = "training step: res_attn / peft LoRA at matched parameters"
        interval = _time_interval(rows, "res_attn", lora)
        checks.append(_check(target, res_attn.get("time_vs_peft_lora"), 1.05, interval=interval))
        interval = _time_interval(rows, "res_attn", floor)
        checks.append(
            _check("training step: res_attn / frozen floor", res_attn.get("time_vs_floor"), 1.10, interval=interval)
        )
        for row in train["rows"]:
            if row["group"] == "ours" and row["name"] in _attention_side_tuners():
                target = f"training step, attention-side: {row['name']} / frozen floor"
                interval = _time_interval(rows, row["name"], floor)
                checks.append(_check(target, row["time_vs_floor"], 1.25, interval=interval))
        glora = rows.get(train_step.GLORA_PEFT_CONFIG) or {}
        target = "training step: glora / peft GLoRA, same configuration"
        interval = _time_interval(rows, train_step.GLORA_PEFT_CONFIG, glora.get("matched_peer"))
        checks.append(_check(target, glora.get("time_vs_matched_peer"), 1.0, interval=interval))
        for name in ("surm_circulant", "surm_toeplitz"):
            row = rows.get(name) or {}
            target = f"training step: {name} / peft C3A at matched parameters"
            interval = _time_interval(rows, name, row.get("matched_peer"))
            checks.append(_check(target, row.get("time_vs_matched_peer"), 0.9, interval=interval))
    sample = results.get("sampling")
    if sample:
        rows = {row["name"]: row for row in sample["rows"]}
        row = rows.get("res_attn (unfused)") or {}
        interval = _time_interval(rows, "res_attn (unfused)", sampling.BASE)
        checks.append(_check("sampling: res_attn unfused / base", row.get("vs_base"), 1.10, interval=interval))
        for name in FUSED_TARGET_TUNERS:
            row = rows.get(f"{name} (fused)")
            if row is not None:
                interval = _time_interval(rows, f"{name} (fused)", sampling.BASE)
                checks.append(_check(f"sampling: {name} fused / base", row.get("vs_base"), 1.02, interval=interval))
    fft = results.get("fft_paths")
    if fft:
        widest = max(row["width"] for row in fft["rows"])
        for family in ("circulant", "toeplitz"):
            values = [
                r["materialise_over_structured"] for r in fft["rows"] if r["family"] == family and r["width"] == widest
            ]
            value = min((v for v in values if v is not None), default=None)
            target = f"SURM {family}: materialise / FFT at width {widest} (worse of inference, training)"
            checks.append(_check(target, value, 2.0, at_most=False))
    compiled = results.get("compile_breaks")
    if compiled:
        attention_side = [row for row in compiled["rows"] if row["kind"] == "attention-side"]
        breaks = [
            count
            for row in attention_side
            if "error" not in row
            for count in (row["plain"]["breaks"], row.get("per_call_scale", {}).get("breaks", 0))
        ]
        errors = [row["name"] for row in attention_side if "error" in row]
        value = None if errors or not breaks else max(breaks)
        checks.append(
            _check(
                "torch.compile: graph breaks of attention-side tuners (max; also with a per-call scale)",
                value,
                0,
                note=f"failed: {errors}" if errors else "",
            )
        )
    return checks


def _attention_side_tuners() -> set[str]:
    from resattn_diffusion import tuner_names

    return {name for name in tuner_names() if get_tuner_spec(name).kind == "operation"}


def targets_markdown(checks: list[dict[str, Any]]) -> str:
    lines = ["| target | measured [95% interval] | limit | met |", "|---|---|---|---|"]
    for check in checks:
        value = check["value"]
        value = "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        interval = check.get("interval")
        if interval is not None:
            value += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
        limit = ("≤ " if check["at_most"] else "≥ ") + f"{check['limit']:g}"
        met = {True: "yes", False: "**no**", None: "–"}[check["met"]]
        if check.get("settled") is False:  # the median is on one side of the limit, part of its interval on the other
            met += " (within noise)"
        note = f" ({check['note']})" if check["note"] else ""
        lines.append(f"| {check['target']}{note} | {value} | {limit} | {met} |")
    return "\n".join(lines)


def summary_markdown(
    results: dict[str, dict[str, Any]],
    checks: list[dict[str, Any]],
    command: str,
    machine: dict[str, Any] | None = None,
) -> str:
    """The summary; ``machine``: the one the results were measured on (default: this one, as it is now)."""
    machine = machine or machine_info()
    any_result = next(iter(results.values()), {})
    size = any_result.get("size", {})
    gpu = machine.get("gpu")
    device = size.get("device", "cpu")
    parts = [
        "# Performance benchmarks (issue 8)",
        "",
        f"Reproduce: `{command}`",
        "",
        f"Device: {device}"
        + (f" ({gpu['name']}, {gpu['memory_gb']} GB), dtype {size.get('dtype')}" if gpu and device != "cpu" else "")
        + ".",
        "",
        f"Machine: {machine['cpu_count']} CPU cores ({machine['processor']}), torch {machine['torch']} with "
        f"{machine['torch_threads']} thread(s), diffusers {machine['diffusers']}, peft {machine['peft']}; "
        f"load average at the end {machine['load_average_1_5_15min']} (other processes on the same cores). "
        f"Clock: {any_result.get('clock', '?')} time, median of {size.get('repeats', '?')} interleaved rounds; a time "
        "ratio is the median over rounds of the two cases' ratio within the round.",
        "",
        f"UNet: widths {size.get('block_out_channels')}, {size.get('layers_per_block')} layers per block, "
        f"{size.get('latent_size')}x{size.get('latent_size')} latents, batch {size.get('batch_size')}, "
        f"{size.get('context_tokens')} context tokens.",
        "",
        "## Targets",
        "",
        targets_markdown(checks),
    ]
    titles = {
        "train_step": "Training step (forward, backward, AdamW) and peak memory",
        "sampling": "Sampling: one UNet forward under no_grad",
        "fft_paths": "SURM: structured (FFT) paths vs the materialised matrix",
        "load_time": "Loading a tuner file into a pipeline",
        "compile_breaks": "torch.compile: graph breaks and inductor speedup",
        "bypass_memory": "Res-Tuning-Bypass memory (benchmarks/perf/bypass_memory.py)",
        "sampling_compiled": "Sampling under torch.compile (inductor) on the GPU",
    }
    for name, result in results.items():
        module = _MODULES.get(name)
        if name == "sampling_compiled":
            table = sampling.compiled_to_markdown(result)
        elif module is None:
            table = _foreign_markdown(name, result)
        else:
            table = module.to_markdown(result)
        title = titles.get(name, name) + (" -- from an earlier run" if result.get("from_earlier_run") else "")
        parts += ["", f"## {title}", "", table]
    return "\n".join(parts) + "\n"


def _foreign_markdown(name: str, result: dict[str, Any]) -> str:
    """A benchmark this suite does not own (bypass_memory): its own markdown if it offers it."""
    try:
        module = importlib.import_module(f"benchmarks.perf.{name}")
        return module.to_markdown(result)
    except Exception as error:  # its file changed shape: show the raw rows rather than nothing
        return f"(no table: {type(error).__name__}: {error})\n\n```\n{result.get('rows', result)}\n```"


def _summary_only(out: Path) -> dict[str, Any]:
    """Targets and summary again from the results already in ``out`` (e.g. after the targets gained intervals),
    naming the machine and rounds they were measured with."""
    results = {
        name: json.loads((out / f"{name}.json").read_text())
        for name in (*BENCHMARKS, "bypass_memory")
        if (out / f"{name}.json").is_file()
    }
    if not results:
        raise SystemExit(f"--summary-only: no results in {str(out)!r}; run the benchmarks first")
    for result in results.values():
        result["from_earlier_run"] = True  # the summary says so beside every table: nothing was measured now
    measured = results.get("train_step") or next(iter(results.values()))
    checks = evaluate_targets(results)
    size = measured.get("size", {})
    command = "python -m benchmarks.perf.run_all" + (" --tiny" if size.get("name") == "tiny" else "")
    command += f" --repeats {size['repeats']}" if size.get("repeats") else ""
    summary = summary_markdown(results, checks, command, measured.get("machine"))
    write_json(out / "targets.json", {"targets": checks, "machine": measured.get("machine")})
    (out / "summary.md").write_text(summary)
    print(summary)
    return {"results": results, "targets": checks}


def _run_bypass_memory(args: argparse.Namespace) -> dict[str, Any] | None:
    """``benchmarks/perf/bypass_memory.py`` (another engineer's) through its ``main``, into the same folder."""
    try:
        module = importlib.import_module("benchmarks.perf.bypass_memory")
    except ImportError as error:
        log(f"run_all: bypass_memory is not available ({error}); skipped")
        return None
    argv = ["--threads", str(args.threads)]
    argv += ["--tiny"] if args.tiny else []
    argv += [] if args.repeats is None else ["--repeats", str(args.repeats)]
    argv += [] if args.clock is None else ["--clock", args.clock]
    argv += ["--out-dir", str(args.out)]
    return module.main(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=None, help="run only these benchmarks")
    parser.add_argument("--with-bypass-memory", action="store_true", help="also run benchmarks/perf/bypass_memory.py")
    parser.add_argument("--no-inductor", action="store_true", help="compile_breaks: count graph breaks only")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON files and summary.md")
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="measure nothing: rewrite targets.json and summary.md from the JSON files in --out",
    )
    args = parser.parse_args(argv)
    if args.summary_only:
        return _summary_only(Path(args.out))
    _quiet_libraries()
    threads = configure_threads(args.threads)
    args.threads = threads
    size = size_from_args(args)
    out = Path(args.out)
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "train_step": lambda: train_step.run(size, clock=args.clock),
        "sampling": lambda: sampling.run(size, clock=args.clock),
        "fft_paths": lambda: fft_paths.run(size, clock=args.clock),
        "load_time": lambda: load_time.run(size, clock=args.clock),
        "compile_breaks": lambda: compile_breaks.run(
            size, inductor=not args.no_inductor and not size.is_cuda, clock=args.clock
        ),
    }
    if size.is_cuda and not args.no_inductor and (args.only is None or "compile_breaks" in args.only):
        # On a GPU the inductor comparison runs on the real UNet (the CPU one times the small UNet on the CPU).
        runners["sampling_compiled"] = lambda: sampling.run_compiled(size, clock=args.clock)
    results: dict[str, dict[str, Any]] = {}
    for name in [*(args.only or BENCHMARKS), *(["sampling_compiled"] if "sampling_compiled" in runners else [])]:
        start = time.perf_counter()
        results[name] = runners[name]()
        results[name]["elapsed_s"] = time.perf_counter() - start
        write_json(out / f"{name}.json", results[name])
        log(f"run_all: {name} done in {results[name]['elapsed_s']:.0f} s -> {out / (name + '.json')}")
    for name in BENCHMARKS:  # with --only, the other tables come from their last run in the same folder
        if name not in results and (out / f"{name}.json").is_file():
            results[name] = json.loads((out / f"{name}.json").read_text())
            results[name]["from_earlier_run"] = True
    results = {name: results[name] for name in BENCHMARKS if name in results} | {
        name: result for name, result in results.items() if name not in BENCHMARKS
    }
    if args.with_bypass_memory:
        bypass = _run_bypass_memory(args)
        if bypass is not None:
            results["bypass_memory"] = bypass
    elif (out / "bypass_memory.json").is_file():  # its own earlier run, shown as it is
        results["bypass_memory"] = json.loads((out / "bypass_memory.json").read_text())
        results["bypass_memory"]["from_earlier_run"] = True
    checks = evaluate_targets(results)
    if size.is_cuda:
        from .gpu_suite import evaluate_gpu_targets

        gpu_parts = {"sampling": results.get("sampling"), f"train_{size.name}": results.get("train_step")}
        checks += evaluate_gpu_targets({name: result for name, result in gpu_parts.items() if result})
    command = "python -m benchmarks.perf.run_all" + (" --tiny" if args.tiny else "")
    if size.is_cuda:
        command += f" --device {size.device} --size {size.name} --dtype {size.dtype}"
    if args.repeats is not None:
        command += f" --repeats {args.repeats}"
    summary = summary_markdown(results, checks, command)
    write_json(out / "targets.json", {"targets": checks, "machine": machine_info()})
    (out / "summary.md").write_text(summary)
    print(summary)
    return {"results": results, "targets": checks}


def _quiet_libraries() -> None:
    """diffusers/transformers warnings (e.g. "no LoRA keys for the text encoder") would drown the progress log."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


if __name__ == "__main__":
    main()
