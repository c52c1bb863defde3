"""Export weight-space tuners (Res-LoRA, GLoRA, SURM) as LoRA files that other tools load.

A linear tuner beside ``y = W0 x + b0`` adds ``s (dW x + db)`` (its
:meth:`~resattn_diffusion.tuners.base.LinearTuner.fold`, composed with ``W0`` in sequential placement). A LoRA adds
``up (down x) + bias``: so a tuner exports exactly as ``down = A, up = s B`` when it is a low-rank product (Res-LoRA: a
key rename), and otherwise at full rank as ``down = I, up = s dW`` (or ``down = s dW, up = I`` when ``d_out < d_in``),
which reproduces ``dW x`` without rounding. ``rank=k`` instead writes the best rank-k approximation (truncated SVD,
split ``U sqrt(S)``, ``sqrt(S) V^T``) and reports each layer's relative error ``||dW - dW_k||_F / ||dW||_F``.

Formats (both without alpha: every loader then scales by 1, and ``s`` is baked into ``up``; kohya files carry no
``.alpha`` key because diffusers 0.4x misreads per-layer alphas of mixed-rank kohya files):

* ``"diffusers"``: peft keys ``unet.<layer path>.lora_A.weight`` / ``lora_B.weight`` (``transformer.`` for SD3 and
  Flux; and ``lora_B.bias`` for bias deltas, peft's ``lora_bias``), loaded by ``pipe.load_lora_weights(file)``.
* ``"kohya"``: ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight``, the names kohya's
  sd-scripts give the layer in the UNet they train (the family's
  :meth:`~.families.base.ModelFamily.kohya_module_paths`): the diffusers path for SD 1.x/2.x, the SGM path
  (``input_blocks.4.1...``, ``middle_block.1...``, ``output_blocks.0.1...``) for SDXL, numbered from the base UNet's
  config (so SDXL needs ``base``). It has no bias: a tuner with a non-zero bias delta (GLoRA's ``D``, ``E``, ``C``; a
  sequential tuner over a biased linear) is refused.

GLoRA's ``dW = W0 ⊙ A + B`` and a sequential tuner's ``dW W0`` depend on the base weights: pass ``base`` (the base
pipeline's folder, whose ``unet`` or ``transformer`` folder is read, that folder, a weights file, the pipeline or the
model itself). Attention-side and UNet-level tuners are not weight deltas and are refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import ResTunerConfig
from ..tuners.base import ConfigError, OpShape
from .api import ResTunerError, tuner_input_shape
from .families import family_named
from .families.base import ModelFamily
from .io import (
    ResTunerFileError,
    check_path_characters,
    checked_tuner_tensors,
    prepare_output_file,
    read_tuner_file,
    resolve_tuner_file,
    tuner_file_fields,
)
from .processors import effective_delta

FORMATS = ("diffusers", "kohya")
#: The largest dense layer delta an export builds (Flux's largest linear has 38M elements): a file that claims a
#: bigger layer is refused before memory is spent on it.
MAX_DENSE_ELEMENTS = 1 << 27

#: Why a tuner kind cannot become a LoRA file (keyed by the registry's ``kind``).
_NOT_A_WEIGHT_DELTA = {
    "operation": "adds a branch beside a whole attention or feed-forward operation (its output depends on the input "
    "through an attention or an activation), which no weight delta reproduces",
    "model": "is a side network over the UNet decoder, not a change of any UNet weight",
}

#: A base model's state-dict-like reader: layer path -> (W0, b0 or None).
BaseWeights = Callable[[str], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass
class LayerExport:
    """One exported layer: the rank written and the relative Frobenius error of its weight delta (0 when exact)."""

    path: str
    shape: tuple[int, int]
    rank: int
    relative_error: float
    has_bias: bool


@dataclass
class ExportReport:
    """What :func:`export_lora` wrote."""

    out_file: Path
    format: str
    tuner: str
    layers: list[LayerExport] = field(default_factory=list)

    @property
    def max_relative_error(self) -> float:
        return max((layer.relative_error for layer in self.layers), default=0.0)

    def format_table(self) -> str:
        lines = ["| layer | d_out x d_in | rank | relative error | bias |", "|---|---|---|---|---|"]
        for layer in self.layers:
            lines.append(
                f"| {layer.path} | {layer.shape[0]} x {layer.shape[1]} | {layer.rank} | {layer.relative_error:.3e} | "
                f"{'yes' if layer.has_bias else 'no'} |"
            )
        lines.append(
            f"\n{len(self.layers)} layer(s) of {self.tuner} written to {self.out_file} ({self.format} format); "
            f"largest relative error {self.max_relative_error:.3e}"
        )
        return "\n".join(lines)


#: the family of tuner files that record none (older files), and of a bare ``load_base_*`` call
UNET_FAMILY: ModelFamily = family_named("unet")


# --- the base model's weights ----------------------------------------------------------------------------------
def _module_base_weights(model: nn.Module) -> BaseWeights:
    def read(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ResTunerFileError(
                f"the base model has no layer {path!r}: it is not the model the tuner was trained on"
            ) from None
        linear = getattr(module, "base_layer", module)  # a peft-wrapped projection keeps the frozen one here
        bank = getattr(linear, "res_tuner_bank", None)
        if bank is not None and hasattr(bank, "frozen_weight_and_bias"):  # fused tuners changed the weight: use W0
            return bank.frozen_weight_and_bias(linear)
        return linear.weight, linear.bias

    return read


def _weights_location(base: Path, family: ModelFamily) -> Path:
    """The model's weights from a pipeline folder (its ``unet/`` or ``transformer/`` folder), a model folder or a
    weights file."""
    if base.is_file():
        return base
    if (base / family.component).is_dir():
        return base / family.component
    if (base / "model_index.json").is_file():  # a pipeline folder without the model: say so, not "no config.json"
        raise ResTunerFileError(
            f"base {str(base)!r} is a pipeline folder without a {family.component}/ folder, where a "
            f"{family.model_word} tuner reads its base weights; pass the pipeline the tuner was trained on, or the "
            f"{family.model_word}'s own folder or weights file"
        )
    if not base.is_dir():
        raise ResTunerFileError(
            f"base {str(base)!r} is neither a folder nor a file; pass the base model's local folder (the one with "
            f"model_index.json), its {family.component} folder, or its {family.model_word} .safetensors file"
        )
    return base


def _safetensors_base_weights(location: Path) -> BaseWeights:
    """Reads only the layers asked for (a real SDXL UNet is 5 GB): single files and sharded folders alike."""
    from safetensors import safe_open

    if location.is_file():
        shards = {None: location}
        key_to_file: dict[str, Path] | None = None
    else:
        index = sorted(location.glob("*.safetensors.index.json"))
        if index:
            weight_map = json.loads(index[0].read_text())["weight_map"]
            key_to_file = {key: location / name for key, name in weight_map.items()}
        else:
            files = sorted(location.glob("*.safetensors"))
            plain = [f for f in files if f.name == "diffusion_pytorch_model.safetensors"]
            files = plain or files
            if len(files) != 1:
                raise ResTunerFileError(
                    f"base folder {str(location)!r} holds {len(files)} safetensors files {[f.name for f in files]}; "
                    "pass the UNet weights file itself as base"
                )
            key_to_file = None
            shards = {None: files[0]}

    def read(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = []
        for suffix in ("weight", "bias"):
            key = f"{path}.{suffix}"
            file = shards[None] if key_to_file is None else key_to_file.get(key)
            if file is None:
                out.append(None)
                continue
            with safe_open(str(file), framework="pt") as f:
                out.append(f.get_tensor(key) if key in f.keys() else None)
        if out[0] is None:
            raise ResTunerFileError(
                f"the base weights at {str(location)!r} have no {path}.weight: it is not the model the tuner was "
                "trained on"
            )
        return out[0], out[1]

    return read


def _existing_base_path(base: str | os.PathLike, family: ModelFamily) -> Path:
    if not isinstance(base, (str, os.PathLike)):
        raise TypeError(f"base must be a path, a pipeline or a {family.model_word} module, got {type(base).__name__}")
    path = Path(base)
    if not path.exists():
        raise ResTunerFileError(
            f"no base model at {str(path)!r}; pass the local folder of the base model the tuner was trained on (a "
            "Hub model is not fetched here: download it first, e.g. with huggingface-cli download, and pass its "
            "folder)"
        )
    return path


def _base_module(base: object, family: ModelFamily) -> nn.Module | None:
    """``base`` itself where it is a module, the pipeline's model where it is a pipeline (``pipe.unet`` /
    ``pipe.transformer``), else None (a path)."""
    if isinstance(base, nn.Module):
        return base
    component = getattr(base, family.component, None)
    if isinstance(component, nn.Module):
        return component
    if hasattr(base, "components"):  # a pipeline of another family
        raise ResTunerFileError(
            f"base is a {type(base).__name__}, which has no pipe.{family.component}: a {family.model_word} tuner "
            "reads its base weights there; pass the pipeline the tuner was trained on"
        )
    return None


def load_base_config(base: str | os.PathLike | nn.Module | object, family: ModelFamily = UNET_FAMILY) -> dict | None:
    """The base model's config: a module's (or a pipeline's model's) ``config``, or the ``config.json`` of a
    pipeline folder's ``unet``/``transformer`` folder, of a model folder, or beside a weights file; None where
    there is none."""
    module = _base_module(base, family)
    if module is not None:
        config = getattr(module, "config", None)
        return None if config is None else dict(config)
    location = _weights_location(_existing_base_path(base, family), family)
    file = (location.parent if location.is_file() else location) / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ResTunerFileError(f"the base's config {str(file)!r} is not readable JSON: {err}") from None


def load_base_weights(base: str | os.PathLike | nn.Module | object, family: ModelFamily = UNET_FAMILY) -> BaseWeights:
    """A reader of ``(W0, b0)`` by layer path from a model, a pipeline, or a local pipeline or model folder/file
    (``family``: the model family the tuner sits on, which names the pipeline folder's model subfolder)."""
    module = _base_module(base, family)
    if module is not None:
        return _module_base_weights(module)
    location = _weights_location(_existing_base_path(base, family), family)
    if location.is_file() or any(location.glob("*.safetensors")):
        return _safetensors_base_weights(location)
    import diffusers  # .bin-only folders: let diffusers read them, as the family's own model class

    model_class = getattr(diffusers, family.model_classes[0])
    try:
        model = model_class.from_pretrained(str(location), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ResTunerFileError(
            f"base {str(location)!r} holds no {family.model_word} diffusers can read ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); pass the base model's local folder (the one with "
            f"model_index.json), its {family.component} folder, or its {family.model_word} .safetensors file"
        ) from None
    return _module_base_weights(model)


# --- factorisation -------------------------------------------------------------------------------------------
def _factor(
    delta: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None, rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(down, up, relative_error)`` with ``up @ down`` equal to ``delta`` (rank None or large enough) or its best
    rank-``rank`` approximation."""
    d_out, d_in = delta.shape
    exact_rank = factors[0].shape[0] if factors is not None else min(d_out, d_in)
    if rank is None or rank >= exact_rank:
        if factors is not None:
            down, up = factors
            return down.float().clone(), up.float().clone(), 0.0
        if d_out < d_in:  # down = dW (d_out x d_in), up = I: rank d_out
            return delta.clone(), torch.eye(d_out), 0.0
        return torch.eye(d_in), delta.clone(), 0.0
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).float()
    down = (root[:, None] * vh[:rank]).float()
    total = delta.double().norm()
    error = 0.0 if total == 0 else float((delta.double() - up.double() @ down.double()).norm() / total)
    return down, up, error


def _file_family(base_info: dict) -> ModelFamily:
    """The model family a tuner file was made for (a file without a base record: a UNet)."""
    family = family_named(base_info.get("family", UNET_FAMILY.name))
    if family is None:
        raise ResTunerFileError(
            f"the tuner file was made for a model family {base_info.get('family')!r} this version does not know"
        )
    return family


def _layer_keys(
    paths: list[str], format: str, family: ModelFamily, base_info: dict, base: str | os.PathLike | nn.Module | None
) -> dict[str, str]:
    """Layer path -> the key its LoRA tensors are written under (without ``.lora_A.weight`` & co.)."""
    if format == "diffusers":  # diffusers' LoRA loaders read unet.* / transformer.* keys
        return {path: f"{family.component}.{path}" for path in paths}
    model_config = load_base_config(base, family) if base is not None else None
    kohya_paths = family.kohya_module_paths(paths, base_info, model_config)
    return {path: "lora_unet_" + kohya_paths[path].replace(".", "_") for path in paths}


def _check_out_file(out_file: Path, source: Path) -> None:
    """``out_file`` can take the export: not a folder, and not the tuner file itself (the export would replace the
    tuner with a LoRA file, atomically and for good)."""
    check_path_characters(out_file, "write")
    if out_file.is_dir():
        raise ResTunerFileError(f"out_file {str(out_file)!r} is a folder; pass the path of the .safetensors to write")
    if out_file.exists() and os.path.samefile(out_file, source):
        raise ResTunerFileError(
            f"out_file {str(out_file)!r} is the tuner file being exported: writing the LoRA there would replace the "
            "tuner; pass another path"
        )


def _write_atomic(tensors: dict[str, torch.Tensor], out_file: Path, metadata: dict[str, str], overwrite: bool) -> None:
    from safetensors.torch import save_file

    prepare_output_file(out_file, overwrite, "cannot write")
    fd, tmp = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".tmp", dir=out_file.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_lora(
    tuner_file: str | os.PathLike,
    out_file: str | os.PathLike,
    format: str = "diffusers",
    rank: int | None = None,
    base: str | os.PathLike | nn.Module | None = None,
    weight_name: str | None = None,
    overwrite: bool = True,
) -> ExportReport:
    """Write a LoRA file equivalent to a weight-space tuner (Res-LoRA, GLoRA, SURM).

    Args:
        tuner_file: a tuner file saved by ``save_res_tuner`` / the training scripts, or a folder holding one.
        out_file: the ``.safetensors`` file to write (atomically).
        format: ``"diffusers"`` (``pipe.load_lora_weights``) or ``"kohya"`` (``lora_unet_*`` keys).
        rank: None for an exact export (full rank where the delta needs it); an int for a truncated SVD of each
            layer's delta, whose relative errors the report lists.
        base: the base model: its local pipeline folder (the ``unet/`` or, for SD3 / Flux, ``transformer/``
            folder in it is read), that model folder, its weights file, the pipeline, or the model module; needed
            when the delta depends on the base weights (GLoRA, sequential placement), and for ``"kohya"`` on SDXL
            (its SGM block numbers come from the UNet's config: a module's, or the folder's ``config.json``);
            otherwise unused.
        weight_name: the tuner file inside a ``tuner_file`` folder, when it is not ``res_tuner.safetensors``.
        overwrite: replace an existing ``out_file``.

    Raises:
        ResTunerError: the tuner is not a weight delta (Res-Attn, adapter, prefix, prompt, bypass), a GLoRA supernet,
            or has a bias delta the format cannot hold. Nothing is written.
        ResTunerFileError: an unreadable tuner file, a missing or mismatching base. Nothing is written.
    """
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not a LoRA format this exports; choose one of {list(FORMATS)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer or None (exact), got {rank!r}")
    out_file = Path(out_file)
    if out_file.suffix != ".safetensors":
        raise ConfigError(f"out_file {str(out_file)!r} must end in .safetensors (LoRA loaders read safetensors)")
    metadata, tensors = read_tuner_file(tuner_file, weight_name)
    source = str(resolve_tuner_file(tuner_file, weight_name))
    _check_out_file(out_file, Path(source))
    # an older file may lack "base" (a UNet is assumed) or "layers" (refused below); present ones are checked
    config, layers, base_info = tuner_file_fields(source, {"base": "{}", "layers": "{}", **metadata})
    spec = config.spec
    if spec.kind != "linear":
        raise ResTunerError(
            f"{source!r} holds a {config.tuner!r} tuner ({spec.summary}), which "
            f"{_NOT_A_WEIGHT_DELTA.get(spec.kind, 'is not a weight delta')}; only weight-space tuners (res_lora, "
            "glora, surm_circulant/toeplitz/kronecker/ldr) export to LoRA. Load this one with pipe.load_res_tuner "
            "(pipelines/)."
        )
    if getattr(config.params, "supernet", False):
        raise ResTunerError(
            f"{source!r} is a GLoRA supernet (every form of every support); pick its configuration with "
            "resattn-glora-search first and export the res_tuner.safetensors that search writes"
        )
    family = _file_family(base_info)
    if not layers:
        raise ResTunerFileError(f"{source!r} lists no layers in its metadata; re-save the tuner with save_res_tuner")
    keys = _layer_keys(list(layers), format, family, base_info, base)  # a layout that cannot name them fails here

    modules = _rebuild_tuners(config, layers, tensors, source)
    needs_base = config.placement == "sequential" or any(type(m).fold_reads_base for m in modules.values())
    if needs_base and base is None:
        why = (
            "sequential placement composes it with W0"
            if config.placement == "sequential"
            else f"{config.tuner}'s delta contains W0"
        )
        raise ResTunerError(
            f"exporting {source!r} needs the base model's weights ({why}); pass base= (the base model's local "
            f"folder, its {family.component} folder, the pipeline or pipe.{family.component}) or --base"
        )
    read_base = load_base_weights(base, family) if needs_base else None

    scale = float(config.scale)
    report = ExportReport(out_file=out_file, format=format, tuner=config.tuner)
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    with torch.no_grad():
        for path, tuner in modules.items():
            shape = layers[path]
            d_out, d_in = shape["out_dim"], shape["in_dim"]
            if read_base is not None:
                weight, bias = read_base(path)
                if tuple(weight.shape) != (d_out, d_in) or (bias is not None) != bool(shape.get("has_bias", True)):
                    raise ResTunerFileError(
                        f"base layer {path}: weight {tuple(weight.shape)}, bias "
                        f"{'yes' if bias is not None else 'no'}; the tuner was trained on {(d_out, d_in)} with bias "
                        f"{'yes' if shape.get('has_bias', True) else 'no'}: pass the base model it was trained on"
                    )
                weight, bias = weight.float(), None if bias is None else bias.float()
            else:  # the delta reads neither: stand-ins of the right shape and dtype
                weight, bias = torch.zeros(d_out, d_in), None
            delta_w, delta_b = effective_delta(tuner, config.placement, weight, bias)
            factors = tuner.low_rank_factors()
            if factors is not None:
                down_f = factors[0].float()
                if config.placement == "sequential":  # T(y) = B A (W0 x + b0): down = A W0 keeps rank r
                    down_f = down_f @ weight
                factors = (down_f, factors[1].float() * scale)
            down, up, error = _factor(scale * delta_w, factors, rank)
            has_bias = delta_b is not None and bool(delta_b.abs().max() > 0)
            key = keys[path]
            if format == "diffusers":
                out[f"{key}.lora_A.weight"] = down
                out[f"{key}.lora_B.weight"] = up
            else:
                out[f"{key}.lora_down.weight"] = down
                out[f"{key}.lora_up.weight"] = up
            if has_bias:
                biases[key] = scale * delta_b
            report.layers.append(LayerExport(path, (d_out, d_in), down.shape[0], error, has_bias))
    if biases:
        if format == "kohya":
            raise ResTunerError(
                f"{len(biases)} layer(s) of this {config.tuner} tuner change the bias (e.g. {next(iter(biases))}), "
                "and the kohya LoRA format has no bias: export with format='diffusers' (peft's lora_bias), or train "
                "without bias terms (GLoRA: D, E, C = none)"
            )
        for path in modules:  # peft's lora_bias gives every layer a bias: write zeros where the tuner has none
            key = keys[path]
            out[f"{key}.lora_B.bias"] = biases.get(key, torch.zeros(out[f"{key}.lora_B.weight"].shape[0]))
    out = {key: value.to(dtype).contiguous() for key, value in out.items()}
    _write_atomic(
        out, out_file, {"format": "pt", "exported_from": "resattn-diffusion", "tuner": config.tuner}, overwrite
    )
    return report


def _rebuild_tuners(
    config: ResTunerConfig, layers: dict[str, dict], tensors: dict[str, torch.Tensor], source: str
) -> dict[str, nn.Module]:
    """The file's tuner modules, rebuilt from its layer shapes and weights (no base model needed)."""
    modules: dict[str, nn.Module] = {}
    for path, shape_dict in layers.items():
        try:
            shape = OpShape(**shape_dict)
            dims = {"in_dim": shape.in_dim, "out_dim": shape.out_dim}
            bad = {k: v for k, v in dims.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
            if bad or not isinstance(shape.has_bias, bool):
                raise ConfigError(
                    f"its in_dim and out_dim must be positive whole numbers and has_bias true or false, got {dims} "
                    f"and has_bias {shape.has_bias!r}"
                )
            shape = tuner_input_shape(shape, "linear", config.placement)
            if shape.out_dim * shape.in_dim > MAX_DENSE_ELEMENTS:  # the dense delta is built: bound it first
                raise ConfigError(
                    f"its delta would be {shape.out_dim} x {shape.in_dim}, above the {MAX_DENSE_ELEMENTS:,} elements "
                    "of any real model's linear layer"
                )
            params = config.params.for_layer(path)
            params.validate_for(shape)
            modules[path] = config.spec.module_cls(shape, params)
        except (TypeError, ConfigError) as err:
            raise ResTunerFileError(
                f"{source!r}: layer {path} of metadata field 'layers' cannot be rebuilt: {err}"
            ) from None
    for tuner, values in checked_tuner_tensors(modules.items(), tensors, source):
        tuner.load_state_dict({key: value.float() for key, value in values.items()})
    return {path: tuner.float().eval() for path, tuner in modules.items()}


# --- the command ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``resattn-export TUNER OUT [--format diffusers|kohya] [--rank K] [--base MODEL]``."""
    parser = argparse.ArgumentParser(
        prog="resattn-export",
        description="Export a Res-LoRA, GLoRA or SURM tuner as a diffusers or kohya LoRA file (exact at full rank, "
        "or a truncated SVD with --rank).",
    )
    parser.add_argument("tuner", help="the tuner file, or the training output folder holding res_tuner.safetensors")
    parser.add_argument("out", help="the LoRA .safetensors file to write")
    parser.add_argument("--format", choices=FORMATS, default="diffusers")
    parser.add_argument("--rank", type=int, default=None, help="truncate each layer to this rank (default: exact)")
    parser.add_argument(
        "--base",
        default=None,
        help="the base model's local folder (GLoRA and sequential tuners need its weights, SDXL kohya files its "
        "config)",
    )
    parser.add_argument(
        "--weight_name", default=None, help="the tuner file inside a folder, if not res_tuner.safetensors"
    )
    parser.add_argument("--no_overwrite", action="store_true", help="refuse to replace an existing OUT")
    args = parser.parse_args(argv)
    try:
        report = export_lora(
            args.tuner,
            args.out,
            format=args.format,
            rank=args.rank,
            base=args.base,
            weight_name=args.weight_name,
            overwrite=not args.no_overwrite,
        )
    except (ResTunerError, ResTunerFileError, ConfigError, FileExistsError) as err:
        print(f"resattn-export: error: {err}", file=sys.stderr)
        return 2
    print(report.format_table())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

__all__ = ["ExportReport", "FORMATS", "LayerExport", "export_lora", "load_base_config", "load_base_weights", "main"]
