"""``torch.compile`` on a UNet with our processors: graph breaks counted, and the speedup where inductor runs.

Graph breaks: ``torch._dynamo.explain`` traces one training-mode forward (grad enabled, tuner parameters
trainable) of a small UNet (``resattn_diffusion.testing.tiny_unet("sd1")``) with each tuner at its default size,
once plain and once with a per-call scale (``cross_attention_kwargs={"res_tuner_scale": 0.5}``), and counts the
graphs and the breaks between them, with the reasons. The target is 0 breaks for the attention-side tuners: the
frozen UNet itself compiles to one graph, so every break would be ours. (explain uses dynamo's eager backend,
so it needs no compiler.) ``--tiny`` (the test suite's smoke run) explains only the frozen UNet and Res-Attn, on
a UNet with one transformer block: dynamo inlines every attention again, so each trace costs seconds of CPU per
attention.

Speedup: the frozen UNet and the UNet with Res-Attn are compiled with inductor (the default backend) and their
``no_grad`` forward is timed against eager, interleaved; the cold (uncached) compile time is reported. If inductor
cannot run on the machine (no C++ compiler, ...) the error is reported instead.

Run alone: ``python -m benchmarks.perf.compile_breaks [--tiny] [--repeats N] [--threads N] [--no-inductor]``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

from resattn_diffusion import SCALE_KWARG, ResTunerConfig, add_res_tuner, get_tuner_spec, tuner_names
from resattn_diffusion.testing import tiny_unet, unet_inputs

from .common import (
    RESULTS_DIR,
    BenchmarkSize,
    add_common_arguments,
    configure_threads,
    default_clock,
    interleaved_timings,
    log,
    machine_info,
    markdown_table,
    ratio,
    size_from_args,
    write_json,
)

BASE = "base"
#: The tuner compared with the frozen UNet under inductor.
SPEEDUP_TUNER = "res_attn"


#: ``--tiny``: the tuners traced on the one-block UNet.
TINY_TUNERS = ("res_attn",)


def one_block_unet() -> nn.Module:
    """A UNet with a single transformer block (one cross-attention down block, no mid block, a plain up block), so
    two attentions: the fastest to trace (dynamo inlines each attention's code again)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32,),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("UpBlock2D",),
            mid_block_type=None,
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )


def compile_unet(tuners: list[str], tiny: bool = False) -> nn.Module:
    """The small UNet (``tiny``: the one-block UNet), frozen, with ``tuners`` (each under its own name), in
    training mode."""
    unet = one_block_unet() if tiny else tiny_unet("sd1")
    unet.requires_grad_(False)
    for name in tuners:
        add_res_tuner(unet, ResTunerConfig(name), adapter_name=name)
    return unet.train()


def count_graph_breaks(unet: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """Graphs, breaks and (deduplicated) break reasons of one forward, traced by ``torch._dynamo.explain``."""
    import torch._dynamo

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(unet)(**inputs)
    reasons = []
    for graph_break in explanation.break_reasons:
        frame = graph_break.user_stack[-1] if graph_break.user_stack else None
        where = f" ({frame.filename.rsplit('/', 2)[-1]}:{frame.lineno} in {frame.name})" if frame is not None else ""
        reason = graph_break.reason.splitlines()[0][:200] + where
        if reason not in reasons:
            reasons.append(reason)
    return {"graphs": explanation.graph_count, "breaks": explanation.graph_break_count, "reasons": reasons}


def side(tuner: str | None) -> str:
    if tuner is None:
        return "frozen"
    kind = get_tuner_spec(tuner).kind
    return {"operation": "attention-side", "linear": "linear", "model": "UNet-level"}[kind]


def graph_break_rows(tuners: list[str], tiny: bool = False, deadline: float | None = None) -> list[dict[str, Any]]:
    """One row per tuner (and the frozen base first). With ``deadline`` (a ``time.perf_counter()`` value) the
    tuners left when it has passed get a row with an ``error`` saying so."""
    cases: list[tuple[str, list[str]]] = [(BASE, [])] + [(name, [name]) for name in tuners]
    rows = []
    for name, attached in cases:
        row: dict[str, Any] = {"name": name, "kind": side(None if name == BASE else name)}
        if deadline is not None and time.perf_counter() > deadline:
            row["error"] = "skipped: time guard"
            rows.append(row)
            continue
        log(f"compile_breaks: explaining {name}")
        try:
            unet = compile_unet(attached, tiny)
            inputs = unet_inputs(unet, batch_size=2, seed=0)
            row["plain"] = count_graph_breaks(unet, inputs)
            if attached:
                scaled = dict(inputs, cross_attention_kwargs={SCALE_KWARG: 0.5})
                row["per_call_scale"] = count_graph_breaks(unet, scaled)
        except Exception as error:  # reported, e.g. a tuner that cannot sit on this UNet
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        rows.append(row)
    return rows


def inductor_speedup(repeats: int, warmup: int, clock: str) -> dict[str, Any]:
    """Eager vs inductor ``no_grad`` forward of the frozen UNet and of the UNet with Res-Attn."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    result: dict[str, Any] = {"backend": "inductor", "tuner": SPEEDUP_TUNER}
    calls = {}
    try:
        for name, tuners in ((BASE, []), (SPEEDUP_TUNER, [SPEEDUP_TUNER])):
            unet = compile_unet(tuners).eval()
            inputs = unet_inputs(unet, batch_size=2, seed=0)
            compiled = torch.compile(unet)
            start = time.perf_counter()
            # Inductor's on-disk caches would make a second run's "compile" a cache read: time a cold compile.
            with torch.no_grad(), inductor_config.patch(fx_graph_cache=False, autotune_local_cache=False):
                compiled(**inputs)
            result[f"{name}_compile_s"] = time.perf_counter() - start
            calls[f"{name} eager"] = _no_grad_call(unet, inputs)
            calls[f"{name} compiled"] = _no_grad_call(compiled, inputs)
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        return result
    timings = interleaved_timings(calls, repeats, warmup, clock)
    result["forward_s"] = {name: timing.median for name, timing in timings.items()}
    for name in (BASE, SPEEDUP_TUNER):
        result[f"{name}_speedup"] = ratio(timings[f"{name} eager"].median, timings[f"{name} compiled"].median)
    result["tuner_vs_base_eager"] = ratio(timings[f"{SPEEDUP_TUNER} eager"].median, timings[f"{BASE} eager"].median)
    result["tuner_vs_base_compiled"] = ratio(
        timings[f"{SPEEDUP_TUNER} compiled"].median, timings[f"{BASE} compiled"].median
    )
    return result


def _no_grad_call(module: nn.Module, inputs: dict[str, Any]):
    def call() -> None:
        with torch.no_grad():
            module(**inputs)

    return call


def run(
    size: BenchmarkSize, tuners: list[str] | None = None, inductor: bool = True, clock: str | None = None
) -> dict[str, Any]:
    tiny = size.name == "tiny"
    if tuners is None:
        tuners = list(TINY_TUNERS) if tiny else tuner_names()
    rows = graph_break_rows(tuners, tiny)
    clock = clock or default_clock()
    if inductor and size.name != "tiny":
        log("compile_breaks: inductor compile (slow on few cores)")
        speedup = inductor_speedup(max(size.repeats, 1), size.warmup, clock)
    else:
        speedup = {"skipped": "tiny size" if size.name == "tiny" else "--no-inductor"}
    return {
        "benchmark": "compile_breaks",
        "clock": clock,
        "unet": "one-block UNet (--tiny), batch 2" if tiny else "resattn_diffusion.testing.tiny_unet('sd1'), batch 2",
        "rows": rows,
        "inductor": speedup,
        "machine": machine_info(),
        "size": size.describe(),
    }


def to_markdown(result: dict[str, Any]) -> str:
    headers = ["UNet with", "kind", "graphs", "graph breaks", "breaks with per-call scale", "break reasons"]
    table = []
    for row in result["rows"]:
        if "error" in row:
            table.append([row["name"], row["kind"], "–", "–", "–", f"error: {row['error'][:100]}"])
            continue
        plain, scaled = row["plain"], row.get("per_call_scale")
        reasons = "; ".join(dict.fromkeys(plain["reasons"] + (scaled["reasons"] if scaled else [])))[:200]
        if not reasons:
            reasons = "(dynamo reports no reason)" if plain["breaks"] else "–"
        scaled_breaks = "–" if scaled is None else scaled["breaks"]
        table.append([row["name"], row["kind"], plain["graphs"], plain["breaks"], scaled_breaks, reasons])
    text = markdown_table(headers, table)
    speedup = result["inductor"]
    if "skipped" in speedup:
        text += f"\n\ninductor speedup: skipped ({speedup['skipped']})"
    elif "error" in speedup:
        text += f"\n\ninductor speedup: inductor could not run here: {speedup['error']}"
    else:
        text += "\n\n" + markdown_table(
            ["UNet with", "cold compile (s, wall)", "eager forward (ms)", "compiled forward (ms)", "speedup"],
            [
                [
                    name,
                    speedup[f"{name}_compile_s"],
                    speedup["forward_s"][f"{name} eager"] * 1e3,
                    speedup["forward_s"][f"{name} compiled"] * 1e3,
                    speedup[f"{name}_speedup"],
                ]
                for name in (BASE, SPEEDUP_TUNER)
            ],
        )
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--tuners", nargs="*", default=None, help="only these of our tuners (default: all registered)")
    parser.add_argument("--no-inductor", action="store_true", help="count graph breaks only")
    parser.add_argument("--out", default=str(RESULTS_DIR / "compile_breaks.json"))
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    result = run(size_from_args(args), args.tuners, not args.no_inductor, args.clock)
    write_json(args.out, result)
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
