"""The GPU performance suite in time-guarded parts (issue 14): what ``benchmarks/perf/gpu_run.sh`` runs.

    python -m benchmarks.perf.gpu_suite PART --out DIR [--budget SECONDS] [--device cuda] [--tiny]
    python -m benchmarks.perf.gpu_suite summary --out DIR        # summary.md from the JSON files in DIR
    python -m benchmarks.perf.gpu_suite readme-table --out DIR   # the condensed table for the README

Parts (:data:`PARTS`), each writing ``DIR/<part>.json`` as it goes (partial results survive a kill) and then
``DIR/summary.md`` from every part's JSON present:

* ``train_sd15`` -- SD 1.5 at 512 px, batch 4, fp16: a training step of the floor, every tuner, the fast-path
  tuners once more with their reference paths forced (``<name> [reference]``), Res-Attn with one head, and the
  peers (peft LoRA matched to Res-Attn, peft GLoRA with the same forms, peft C3A matched to SURM);
* ``train_sdxl`` -- SDXL at 1024 px, batch 1, bf16: floor, res_attn, res_bypass, peft LoRA;
* ``sampling`` -- SD 1.5, batch 2, fp16: one no-grad UNet forward of every row of ``sampling.py`` (eager);
* ``graph_breaks`` -- ``torch._dynamo.explain`` of every tuner on the small UNet (0 breaks is the target);
* ``sampling_compiled`` -- the rows of ``sampling.COMPILED_ROWS``, eager and under ``torch.compile``;
* ``sampling_sdxl`` (not in ``gpu_run.sh``; ``gpu_run5.sh``) -- SDXL at 1024 px, batch 2, fp16: the base and
  Res-Attn unfused as the CUDA default runs it (extra heads of the frozen attention) and as a separate branch.

``--budget`` is the part's time guard: no timed round starts, and no further compile or memory measurement,
after it; a case that fails (out of memory, a peer missing from the installed peft) becomes an error in its row.
The training recipe is the training scripts': frozen weights fp16/bf16, trainable parameters fp32, autocast.
``--tiny`` runs every part on the test suite's tiny UNet (on ``--device``, default CPU): the smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from resattn_diffusion import ResTunerAttnProcessor, ResTunerConfig, get_tuner_spec, tuner_names
from resattn_diffusion.tuners.fast_paths import forced_paths
from resattn_diffusion.tuners.structured import LDRMatrix, StructuredMatrix

from . import compile_breaks, sampling, train_step
from .common import BenchmarkSize, describe_error, log, machine_info, markdown_table, write_json

PARTS = ("train_sd15", "sampling", "train_sdxl", "graph_breaks", "sampling_compiled")  # gpu_run.sh's order
#: Every part, with those the targeted runs add (gpu_run5.sh: SDXL sampling, extra heads against a separate branch).
ALL_PARTS = (*PARTS, "sampling_sdxl")
#: Part -> (model, dtype, batch, timed rounds, warm-up rounds) on a GPU.
#: part -> (model, dtype, batch, rounds, warm-up rounds). 9 rounds (7 for SDXL's slow steps) give each time ratio a
#: 95% interval (the sign test's: ranks 2 and 8 of 9, 1 and 7 of 7); runs 1-3 had 4-5 rounds, too few for one. A
#: part's time guard still stops the rounds early, and its ratios then have no interval.
GPU_SIZES = {
    "train_sd15": ("sd15", "fp16", 4, 9, 2),
    "train_sdxl": ("sdxl", "bf16", 1, 7, 2),
    "sampling": ("sd15", "fp16", 2, 9, 2),
    "sampling_compiled": ("sd15", "fp16", 2, 9, 2),
    "sampling_sdxl": ("sdxl", "fp16", 2, 7, 2),
}
SDXL_TUNERS = ["res_attn", "res_bypass"]
#: Tuners timed a second time with their reference paths forced (``<name> [reference]``): the fast paths' gain,
#: measured in the same run. (Not every fast-path tuner: each row is another UNet resident on the GPU.)
REFERENCE_ROWS = ("res_attn", "res_lora", "glora", "surm_circulant", "surm_adapter")
REFERENCE_SUFFIX = " [reference]"
#: Tuners whose automatic CUDA choice is the branch (``merge_on_cuda = False``, from run 1), timed once more with
#: the fast (merged) path forced: the measurement that decides the choice.
FAST_ROWS = ("glora",)
FAST_SUFFIX = " [fast]"
#: Row name of Res-Attn with one head (head dim 8 instead of 4: the default's alternative the issue measured).
RES_ATTN_ONE_HEAD = "res_attn (heads=1)"
#: Rows of SURM FFT families timed once more with their dense delta formed as in GPU run 2 -- the FFT path applied
#: to the identity, its spectra kept for backward (``use_strided_dense`` and ``recompute_dense`` off): run 3's
#: strided forms against it, measured in the same run.
RUN2_DENSE_SUFFIX = " [run-2 dense]"
#: Rows of SURM LDR timed once more with its dense delta formed as in GPU run 3 -- the float32 matmul of its two
#: strided n x n factors under activation checkpointing (``LDRMatrix.use_strided_matmul``) -- against its FFT
#: convolution form (with its own backward) in the same run.
RUN3_DENSE_SUFFIX = " [run-3 dense]"
RUN3_DENSE_ROW = "surm_ldr" + RUN3_DENSE_SUFFIX
#: Res-Attn's training step once more with ``ResTunerAttnProcessor.extra_heads_training`` on: the branch as extra
#: heads of the frozen attention in training too (issue 14, host overhead), measured against the default row.
EXTRA_HEADS_ROW = "res_attn [extra heads]"


def part_size(part: str, device: str, tiny: bool) -> BenchmarkSize:
    if tiny:
        return dataclasses.replace(BenchmarkSize.tiny(), device=device, dtype="fp32" if device == "cpu" else "fp16")
    model, dtype, batch, repeats, warmup = GPU_SIZES[part]
    return BenchmarkSize.real(model, device, dtype, batch, repeats=repeats, warmup=warmup)


#: Seconds of a part's budget kept for what follows its last guarded step (the last writes, the exit).
GUARD_MARGIN_S = 5.0


def run_part(
    part: str,
    out: Path,
    device: str,
    tiny: bool,
    budget: float,
    started_at: float | None = None,
    tuners: list[str] | None = None,
    compile_backend: str = "inductor",
    compiled_rows: list[str] | None = None,
    peer_rows: list[str] | None = None,
    extra_rows: bool = True,
    run2_dense_rows: list[str] | None = None,
    extra_heads_row: bool = False,
    run3_dense_rows: list[str] | None = None,
) -> dict[str, Any]:
    """Run one part with its time guard, writing ``out/<part>.json`` (and the summary) at every checkpoint.

    ``started_at`` (epoch seconds, default now) is when the part's process was launched: the seconds spent
    importing torch and diffusers count against ``budget`` too. ``tuners`` restricts our rows (default: every
    registered tuner; SDXL: res_attn and res_bypass); ``compile_backend`` is ``torch.compile``'s (the smoke test
    uses ``"eager"``: no compiler, the same code path); ``compiled_rows`` restricts ``sampling_compiled`` to these
    rows of ``sampling.COMPILED_ROWS`` or ``sampling.RES_ATTN_EXTRA_HEADS_COMPILED`` (default: the base, peft LoRA
    and the selected tuners' rows); ``peer_rows``
    restricts ``train_sd15``'s peers to these of ``train_step.PEER_ROWS`` (default: all) and ``extra_rows=False``
    leaves out its Res-Attn-with-one-head, ``[reference]`` and ``[fast]`` rows; ``run2_dense_rows`` (SURM FFT
    families) adds ``<name> [run-2 dense]`` rows (see :data:`RUN2_DENSE_SUFFIX`), ``run3_dense_rows`` (SURM LDR)
    ``<name> [run-3 dense]`` rows (:data:`RUN3_DENSE_SUFFIX`); ``extra_heads_row`` adds :data:`EXTRA_HEADS_ROW` to
    ``train_sd15``."""
    start = time.perf_counter()
    already = 0.0 if started_at is None else max(0.0, time.time() - started_at)
    deadline = start + budget - already - GUARD_MARGIN_S

    def checkpoint(result: dict[str, Any]) -> None:
        result = dict(result, part=part, budget_s=budget, elapsed_s=time.perf_counter() - start)
        write_json(out / f"{part}.json", result)
        write_summary(out)

    selected = list(tuners) if tuners is not None else tuner_names()
    if part == "graph_breaks":
        ordered = sorted(selected, key=lambda name: get_tuner_spec(name).kind != "operation")
        rows = compile_breaks.graph_break_rows(ordered, tiny=tiny, deadline=deadline)
        result = {"benchmark": "compile_breaks", "rows": rows, "inductor": {"skipped": "see sampling_compiled"}}
        result["machine"] = machine_info()
        checkpoint(result)
        return result
    size = part_size(part, device, tiny)
    if part.startswith("train_"):
        if part == "train_sdxl":
            sdxl_tuners = [name for name in SDXL_TUNERS if name in selected]
            result = train_step.run(
                size, sdxl_tuners, peer_rows=(train_step.PEFT_LORA,), deadline=deadline, checkpoint=checkpoint
            )
        else:
            peers_wanted = train_step.PEER_ROWS if peer_rows is None else tuple(peer_rows)
            unknown = sorted(set(peers_wanted) - set(train_step.PEER_ROWS))
            if unknown:
                raise SystemExit(f"--peer-rows {unknown}: choose among {list(train_step.PEER_ROWS)}")
            extra = {}
            if "res_attn" in selected:
                extra[RES_ATTN_ONE_HEAD] = ResTunerConfig("res_attn", heads=1)
            with_reference = [name for name in REFERENCE_ROWS if name in selected]
            extra |= {name + REFERENCE_SUFFIX: ResTunerConfig(name) for name in with_reference}
            contexts = {name + REFERENCE_SUFFIX: reference_paths for name in with_reference}
            with_fast = [name for name in FAST_ROWS if name in selected]
            extra |= {name + FAST_SUFFIX: ResTunerConfig(name) for name in with_fast}
            contexts |= {name + FAST_SUFFIX: fast_paths for name in with_fast}
            if not extra_rows:
                extra, contexts = {}, {}
            for name in run2_dense_rows or []:
                if not name.startswith("surm_"):
                    raise SystemExit(f"--run2-dense-rows {name!r}: only SURM tuners form a structured dense delta")
                extra[name + RUN2_DENSE_SUFFIX] = ResTunerConfig(name)
                contexts[name + RUN2_DENSE_SUFFIX] = run2_dense
            for name in run3_dense_rows or []:
                if name != "surm_ldr":
                    raise SystemExit(f"--run3-dense-rows {name!r}: only surm_ldr changed its dense form after run 3")
                extra[name + RUN3_DENSE_SUFFIX] = ResTunerConfig(name)
                contexts[name + RUN3_DENSE_SUFFIX] = run3_dense
            if extra_heads_row:
                extra[EXTRA_HEADS_ROW] = ResTunerConfig("res_attn")
                contexts[EXTRA_HEADS_ROW] = extra_heads_in_training
            result = train_step.run(
                size,
                selected,
                peer_rows=peers_wanted,
                extra_configs=extra,
                case_contexts=contexts,
                deadline=deadline,
                checkpoint=checkpoint,
            )
    elif part == "sampling":
        result = sampling.run(size, selected, deadline=deadline)
    elif part == "sampling_sdxl":
        res_attn = [name for name in selected if name == "res_attn"]
        result = sampling.run(size, res_attn, with_peers=False, deadline=deadline, separate_branch_row=True)
    elif part == "sampling_compiled":
        if compiled_rows is not None:
            # the default rows, and the one asked for by name only (Res-Attn's extra heads kept while compiling)
            known = (*sampling.COMPILED_ROWS, sampling.RES_ATTN_EXTRA_HEADS_COMPILED)
            unknown = sorted(set(compiled_rows) - set(known))
            if unknown:
                raise SystemExit(f"--compiled-rows {unknown}: choose among {list(known)}")
            rows = tuple(row for row in known if row in compiled_rows)
        else:
            rows = tuple(
                row for row in sampling.COMPILED_ROWS if row.split(" (")[0] in {sampling.BASE, "peft_lora", *selected}
            )
        result = sampling.run_compiled(size, rows, deadline=deadline, checkpoint=checkpoint, backend=compile_backend)
    else:
        raise SystemExit(f"unknown part {part!r}; parts: {', '.join(ALL_PARTS)}")
    checkpoint(result)
    return result


def reference_paths():
    """Every tuner on its reference path (the CPU default), for the ``[reference]`` rows."""
    return forced_paths("reference")


@contextlib.contextmanager
def class_settings(cls: type, **values: Any) -> Iterator[None]:
    """``cls``'s class attributes set to ``values`` for the block, restored afterwards (the rows' contexts)."""
    previous = {name: getattr(cls, name) for name in values}
    for name, value in values.items():
        setattr(cls, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(cls, name, value)


def run2_dense() -> contextlib.AbstractContextManager:
    """Every structured matrix forms its dense delta as in GPU run 2: FFT path on the identity, spectra kept."""
    return class_settings(StructuredMatrix, use_strided_dense=False, recompute_dense=False)


def run3_dense() -> contextlib.AbstractContextManager:
    """SURM LDR forms its dense delta as in GPU run 3: the float32 matmul of its strided factors, checkpointed."""
    return class_settings(LDRMatrix, use_strided_matmul=True)


def extra_heads_in_training() -> contextlib.AbstractContextManager:
    """Res-Attn's training steps with its branch as extra heads of the frozen attention (the
    :data:`EXTRA_HEADS_ROW`); the default restored afterwards."""
    return class_settings(ResTunerAttnProcessor, extra_heads_training=True)


def fast_paths():
    """Every tuner on its fast path, for the ``[fast]`` rows."""
    return forced_paths("fast")


# --- summary -----------------------------------------------------------------------------------------------------


def load_parts(out: Path) -> dict[str, dict[str, Any]]:
    results = {}
    for part in ALL_PARTS:
        path = out / f"{part}.json"
        if path.is_file():
            try:
                results[part] = json.loads(path.read_text())
            except json.JSONDecodeError as error:  # a part killed mid-write leaves the last good file (atomic)
                results[part] = {"error": describe_error(error), "rows": []}
    return results


def _row(result: dict[str, Any] | None, name: str) -> dict[str, Any]:
    if not result:
        return {}
    return next((row for row in result.get("rows", []) if row.get("name") == name), {})


def _startswith_row(result: dict[str, Any] | None, prefix: str) -> dict[str, Any]:
    if not result:
        return {}
    return next((row for row in result.get("rows", []) if str(row.get("name", "")).startswith(prefix)), {})


def _check(target: str, value: float | None, limit: float) -> dict[str, Any]:
    from .run_all import _check as check

    return check(target, value, limit)


def _time_check(
    target: str, result: dict[str, Any] | None, name: str, key: str, baseline: str | None, limit: float
) -> dict[str, Any]:
    """A time-ratio target (``row[key]``, the median of per-round ratios to ``baseline``) with its 95% interval."""
    from .run_all import _check as check
    from .run_all import _time_interval

    rows = {row.get("name"): row for row in (result or {}).get("rows", [])}
    row = rows.get(name) or {}
    if baseline is None:
        baseline = row.get("matched_peer")
    return check(target, row.get(key), limit, interval=_time_interval(rows, name, baseline))


def evaluate_gpu_targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 14's targets against whatever parts have results."""
    checks = []
    sd15 = results.get("train_sd15")
    lora, floor = train_step.PEFT_LORA, train_step.FLOOR
    if sd15:
        checks.append(
            _time_check("SD 1.5 step: res_attn / peft LoRA", sd15, "res_attn", "time_vs_peft_lora", lora, 0.75)
        )
        checks.append(_time_check("SD 1.5 step: res_attn / floor", sd15, "res_attn", "time_vs_floor", floor, 1.30))
        target = "SD 1.5 step: glora (peft's forms) / peft GLoRA"
        checks.append(_time_check(target, sd15, train_step.GLORA_PEFT_CONFIG, "time_vs_matched_peer", None, 0.85))
        target = "SD 1.5 step: glora (default forms) / peft LoRA"
        checks.append(_time_check(target, sd15, "glora", "time_vs_peft_lora", lora, 1.0))
        for name in ("surm_circulant", "surm_toeplitz"):
            target = f"SD 1.5 step: {name} / peft C3A matched"
            checks.append(_time_check(target, sd15, name, "time_vs_matched_peer", None, 0.8))
        c3a = _row(sd15, train_step.C3A_CIRCULANT)
        for name in ("surm_circulant", "surm_toeplitz", "surm_kronecker", "surm_ldr", "surm_adapter"):
            row = _row(sd15, name)
            peer = _row(sd15, train_step.MATCHED_PEERS.get(name, train_step.C3A_CIRCULANT)) or c3a
            value = None
            if row.get("peak_memory_mb") and peer.get("peak_memory_mb"):
                value = row["peak_memory_mb"] / peer["peak_memory_mb"]
            checks.append(_check(f"SD 1.5 peak memory: {name} / peft C3A matched", value, 1.0))
        checks.append(
            _time_check("SD 1.5 step: surm_ldr / peft LoRA", sd15, "surm_ldr", "time_vs_peft_lora", lora, 1.0)
        )
        checks.append(
            _time_check("SD 1.5 step: res_lora / peft LoRA", sd15, "res_lora", "time_vs_peft_lora", lora, 0.95)
        )
        bypass = _row(sd15, "res_bypass")
        checks.append(_check("SD 1.5 peak memory: res_bypass / peft LoRA", bypass.get("memory_vs_peft_lora"), 0.10))
    sdxl = results.get("train_sdxl")
    if sdxl:
        checks.append(
            _time_check("SDXL step: res_attn / peft LoRA", sdxl, "res_attn", "time_vs_peft_lora", lora, 0.75)
        )
    sample = results.get("sampling")
    if sample:
        target = "sampling eager: res_attn unfused / base"
        checks.append(_time_check(target, sample, "res_attn (unfused)", "vs_base", sampling.BASE, 1.10))
        for name in ("res_lora", "glora", "surm_circulant", "surm_toeplitz", "surm_kronecker", "surm_ldr"):
            target = f"sampling eager: {name} fused / base"
            checks.append(_time_check(target, sample, f"{name} (fused)", "vs_base", sampling.BASE, 1.02))
    sample_sdxl = results.get("sampling_sdxl")
    if sample_sdxl:  # no target of its own: which form is faster where heads are wide and the GPU is busy
        for name, form in (
            ("res_attn (unfused)", "extra heads"),
            (sampling.RES_ATTN_SEPARATE_BRANCH, "separate branch"),
        ):
            target = f"SDXL sampling eager: res_attn unfused ({form}) / base"
            checks.append(_time_check(target, sample_sdxl, name, "vs_base", sampling.BASE, 1.10))
    compiled = results.get("sampling_compiled")
    if compiled:
        value = _row(compiled, "res_attn (unfused)").get("compiled_vs_base_compiled")
        checks.append(_check("sampling compiled: res_attn unfused / base compiled", value, 1.15))
        extra_heads = _row(compiled, sampling.RES_ATTN_EXTRA_HEADS_COMPILED)
        if extra_heads:  # the alternative the run measures: which Res-Attn row is faster sets the default
            target = "sampling compiled: res_attn unfused, extra heads kept / base compiled"
            checks.append(_check(target, extra_heads.get("compiled_vs_base_compiled"), 1.15))
    breaks = results.get("graph_breaks")
    if breaks:
        counts = [
            count
            for row in breaks["rows"]
            if row.get("kind") == "attention-side" and "plain" in row
            for count in (row["plain"]["breaks"], row.get("per_call_scale", {}).get("breaks", 0))
        ]
        checks.append(
            _check("torch.compile graph breaks, attention-side tuners (max)", max(counts) if counts else None, 0)
        )
    return checks


def _device_line(results: dict[str, dict[str, Any]]) -> str:
    machine = next((r["machine"] for r in results.values() if r.get("machine")), None) or machine_info()
    gpu = machine.get("gpu")
    where = f"{gpu['name']} ({gpu['memory_gb']} GB, CUDA {gpu['cuda']})" if gpu else "no GPU (CPU run)"
    return (
        f"Device: {where}; {machine.get('cpu_count')} CPU cores; torch {machine.get('torch')}, "
        f"diffusers {machine.get('diffusers')}, peft {machine.get('peft')}; Python {machine.get('python')}; "
        f"{machine.get('date')}."
    )


def summary_markdown(results: dict[str, dict[str, Any]]) -> str:
    from .run_all import targets_markdown

    parts = [
        "# GPU performance (issue 14)",
        "",
        "Reproduce: `bash benchmarks/perf/gpu_run.sh OUT` (or one part: `python -m benchmarks.perf.gpu_suite PART "
        "--out OUT`).",
        "",
        _device_line(results),
        "",
        "Training: frozen weights fp16 (SDXL bf16), trainable parameters fp32, autocast, AdamW; CUDA-synchronised "
        "wall time, median of interleaved rounds (a ratio is the median of per-round ratios); peak memory is the "
        "allocator's peak during one step above what was resident before it.",
        "",
        "## Targets",
        "",
        targets_markdown(evaluate_gpu_targets(results)),
    ]
    titles = {
        "train_sd15": "Training step, SD 1.5 512 px, batch 4, fp16",
        "train_sdxl": "Training step, SDXL 1024 px, batch 1, bf16",
        "sampling": "Sampling (eager), SD 1.5 512 px, batch 2, fp16: one UNet forward",
        "graph_breaks": "torch.compile graph breaks (small UNet)",
        "sampling_compiled": "Sampling under torch.compile (inductor), SD 1.5, batch 2, fp16",
        "sampling_sdxl": "Sampling (eager), SDXL 1024 px, batch 2, fp16: Res-Attn's extra heads vs a separate branch",
    }
    for part, result in results.items():
        title = titles[part]
        if "elapsed_s" in result:
            title += f" ({result['elapsed_s']:.0f} s of a {result.get('budget_s', 0):.0f} s budget)"
        try:
            if part.startswith("train_"):
                table = train_step.to_markdown(result)
            elif part in ("sampling", "sampling_sdxl"):
                table = sampling.to_markdown(result)
            elif part == "sampling_compiled":
                table = sampling.compiled_to_markdown(result)
            else:
                table = compile_breaks.to_markdown(result)
        except Exception as error:  # a partial file of an unexpected shape: say so rather than lose the summary
            table = f"(no table: {describe_error(error)})"
        parts += ["", f"## {title}", "", table]
    return "\n".join(parts) + "\n"


def write_summary(out: Path) -> Path:
    path = Path(out) / "summary.md"
    path.write_text(summary_markdown(load_parts(Path(out))))
    return path


def readme_table(results: dict[str, dict[str, Any]]) -> str:
    """The README's GPU table: per row of the SD 1.5 training table, step and memory vs peft LoRA and the floor,
    the SDXL ratios and the sampling ratios (eager and compiled) where measured."""
    sd15, sdxl = results.get("train_sd15"), results.get("train_sdxl")
    sample, compiled = results.get("sampling"), results.get("sampling_compiled")
    headers = [
        "row",
        "params",
        "step × peft LoRA",
        "step × floor",
        "step × matched peer",
        "memory × peft LoRA",
        "SDXL step × peft LoRA",
        "sampling × base",
        "compiled × base",
    ]
    table = []
    for row in (sd15 or {}).get("rows", []):
        name = row["name"]
        tuner = name.split(" ")[0]
        sample_row = _row(sample, f"{tuner} (unfused)") if not name.endswith("]") and "(" not in name else {}
        if name == train_step.PEFT_LORA:
            sample_row = _startswith_row(sample, "peft_lora r") if sample else {}
        compiled_row = {}
        if compiled and not name.endswith("]") and "(" not in name:
            key = "peft_lora (unfused)" if name == train_step.PEFT_LORA else f"{tuner} (unfused)"
            compiled_row = next(
                (
                    r
                    for r in compiled["rows"]
                    if r["name"] == key
                    or (
                        key.startswith("peft_lora")
                        and r["name"].startswith("peft_lora")
                        and r["name"].endswith("(unfused)")
                    )
                ),
                {},
            )
        if name == "floor":
            sample_row, compiled_row = _row(sample, "base"), _row(compiled, "base")
        table.append(
            [
                name,
                row.get("trainable_parameters"),
                row.get("time_vs_peft_lora"),
                row.get("time_vs_floor"),
                row.get("time_vs_matched_peer"),
                row.get("memory_vs_peft_lora"),
                _row(sdxl, name).get("time_vs_peft_lora"),
                sample_row.get("vs_base"),
                compiled_row.get("compiled_vs_base_compiled"),
            ]
        )
    return _device_line(results) + "\n\n" + markdown_table(headers, table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=[*ALL_PARTS, "summary", "readme-table"])
    parser.add_argument("--out", required=True, help="folder for <part>.json and summary.md")
    parser.add_argument("--budget", type=float, default=120.0, help="this part's time guard in seconds")
    parser.add_argument("--device", default="cuda", help="'cuda' (default) or 'cpu' (with --tiny: the smoke test)")
    parser.add_argument("--tiny", action="store_true", help="the tiny UNet, one round: a smoke test")
    parser.add_argument("--started-at", type=float, default=None, help="epoch seconds the part was launched")
    parser.add_argument("--tuners", nargs="*", default=None, help="only these of our tuners (default: all)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (smoke test: eager)")
    parser.add_argument(
        "--compiled-rows", nargs="*", default=None, help="sampling_compiled: only these rows of sampling.COMPILED_ROWS"
    )
    parser.add_argument(
        "--peer-rows", nargs="*", default=None, help="train_sd15: only these peers of train_step.PEER_ROWS"
    )
    parser.add_argument(
        "--run2-dense-rows", nargs="*", default=None, help="train_sd15: SURM tuners again with run 2's dense form"
    )
    parser.add_argument(
        "--run3-dense-rows", nargs="*", default=None, help="train_sd15: surm_ldr again with run 3's dense form"
    )
    parser.add_argument(
        "--no-extra-rows", action="store_true", help="train_sd15: no heads=1, [reference] or [fast] rows"
    )
    parser.add_argument(
        "--extra-heads-row", action="store_true", help=f"train_sd15: add {EXTRA_HEADS_ROW!r} (extra heads in training)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "summary":
        print(write_summary(out).read_text())
        return
    if args.part == "readme-table":
        print(readme_table(load_parts(out)))
        return
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    _quiet_libraries()
    log(f"gpu_suite: {args.part} (budget {args.budget:.0f} s) -> {out}")
    try:
        run_part(
            args.part,
            out,
            args.device,
            args.tiny,
            args.budget,
            args.started_at,
            args.tuners,
            args.compile_backend,
            args.compiled_rows,
            args.peer_rows,
            not args.no_extra_rows,
            args.run2_dense_rows,
            args.extra_heads_row,
            args.run3_dense_rows,
        )
    except Exception as error:  # the part as a whole failed: record it, the shell script goes on with the next
        write_json(out / f"{args.part}.json", {"part": args.part, "error": describe_error(error), "rows": []})
        write_summary(out)
        log(f"gpu_suite: {args.part} FAILED: {describe_error(error)}")
        raise
    log(f"gpu_suite: {args.part} done -> {out / (args.part + '.json')}")


def _quiet_libraries() -> None:
    from .run_all import _quiet_libraries as quiet

    quiet()


if __name__ == "__main__":
    main()
