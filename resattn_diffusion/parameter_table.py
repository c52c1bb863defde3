"""The README's tuner parameter table, computed by the library itself (no weights needed: UNets are built on the
meta device). The comparison rows (peft LoRA) are added by ``python -m benchmarks.parameter_table``."""

from __future__ import annotations

from collections.abc import Sequence

from .config import ResTunerConfig
from .integration.api import add_res_tuner, res_tuner_summary
from .integration.families.unet import UNetFamily
from .registry import get_tuner_spec, tuner_names


def _formula(tuner: str) -> str:
    return get_tuner_spec(tuner).summary.replace("|", "\\|")


def count_tuner_parameters(unet_config: dict, config: ResTunerConfig) -> int:
    """Trainable parameters of ``config`` on a UNet built from ``unet_config`` on the meta device."""
    from .testing import unet_from_config

    unet = unet_from_config(unet_config)
    add_res_tuner(unet, config)
    return res_tuner_summary(unet)["tuners"]["default"]["parameters"]


def parameter_table(
    unet_config: dict | None = None,
    configs: list[ResTunerConfig] | None = None,
    extra_rows: Sequence[tuple[str, str, str, str, int]] = (),
) -> str:
    """Markdown table: tuner, formula, default hyperparameters, trainable parameters and share of the UNet.

    ``extra_rows``: (name, formula, hyperparameters, where, parameters) of methods to compare with, appended.
    """
    from .testing import SD15_UNET_CONFIG, unet_from_config

    unet_config = unet_config or SD15_UNET_CONFIG
    total = sum(p.numel() for p in unet_from_config(unet_config).parameters())
    if configs is None:
        configs = [ResTunerConfig(tuner=name) for name in tuner_names()]
    rows = [
        "| tuner | T (the branch) | hyperparameters | where | trainable params | % of UNet |",
        "|---|---|---|---|---|---|",
    ]
    for config in configs:
        count = count_tuner_parameters(unet_config, config)
        # dropout and empty/off settings (GLoRA's overrides, supernet) say nothing about size
        hyper = ", ".join(
            f"{k}={v}" for k, v in config.hyperparameters.items() if k != "dropout" and v not in ({}, "", False, None)
        )
        where = (
            "decoder side network"
            if config.spec.kind == "model"
            else "+".join(config.targets or UNetFamily.default_targets)
            + (" (q,k,v,out)" if config.spec.kind == "linear" else "")
        )
        rows.append(
            f"| `{config.tuner}` | `{_formula(config.tuner)}` | {hyper} | {where} | {count:,} | "
            f"{100 * count / total:.3f} |"
        )
    for name, formula, hyper, where, count in extra_rows:
        rows.append(f"| {name} | `{formula}` | {hyper} | {where} | {count:,} | {100 * count / total:.3f} |")
    return "\n".join(rows) + f"\n\nUNet parameters: {total:,}."


if __name__ == "__main__":
    print(parameter_table())
