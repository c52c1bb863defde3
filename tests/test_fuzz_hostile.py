"""Hostile files and misuse (issue 12, part 2): generated cases end in our own errors, fast, changing nothing.

Every case is generated from a valid saved tuner file or a valid call: every metadata field and every field of the
config is replaced by wrong types, wrong values, huge and deeply nested values; every tensor gets another dtype,
shape and absurd values; keys are dropped, added and renamed; non-regular files stand where a tuner file should be;
every public call gets wrong types, NaN/inf, absurd numbers and names that cannot be module names.

A case holds when the call raises one of the project's errors (``ResTunerFileError``, ``ResTunerError``,
``ConfigError``), within ``TIME_LIMIT_S``, with a message that names the problem (the file, the field), and the UNet
is exactly as before: outputs bit-identical, the same processor objects, the same hooks, the same tuners with the
same settings, the same state dict. A test function runs many cases and reports all failures together.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import resattn_diffusion as rd
from resattn_diffusion.integration.api import get_state
from resattn_diffusion.integration.loader_mixin import resolve_tuner_source
from resattn_diffusion.testing import frozen_tiny_unet, randomize_tuner, tiny_pipeline, unet_inputs

TIME_LIMIT_S = 2.0
OUR_ERRORS = (rd.ResTunerFileError, rd.ResTunerError, rd.ConfigError)
#: One tuner of each kind and file layout: attention-side, linear (plain, GLoRA, structured), prefix, the bypass.
FILE_TUNERS = ("res_attn", "res_lora", "glora", "surm_circulant", "res_prefix", "res_bypass")
METADATA_KEYS = ("format", "format_version", "adapter_name", "config", "layers", "base")
#: Metadata and the config's common fields are read the same way for every tuner: fuzzed on one tuner per kind.
KIND_TUNERS = ("res_attn", "res_lora", "res_bypass")
#: Tensors mutated per file (evenly spread over its keys; GLoRA has 200): keeps the suite within its time budget.
TENSORS_PER_FILE = 32

NAN, INF = float("nan"), float("inf")
#: Values that no scale may take: not finite, absurd, or not a real number.
BAD_SCALES = [
    NAN,
    INF,
    -INF,
    1e30,
    -3e38,
    1e4,
    "0.5",
    "abc",
    None,
    [1.0],
    {"keep": 1.0},
    True,
    object(),
    torch.tensor(0.5),
]
#: Names that cannot name a tuner: not module names, attributes of the module that holds tuners, not strings.
BAD_NAMES = [
    "a.b",
    "",
    "forward",
    "training",
    "_modules",
    "state_dict",
    "__class__",
    "a b",
    "x" * 300,
    "a/b",
    5,
    ["x"],
]
#: JSON texts of the wrong kind for any metadata field that holds JSON.
BAD_JSON = {
    "not JSON": "{not json",
    "empty": "",
    "nested list": "[" * 100_000 + "]" * 100_000,
    "nested object": '{"a":' * 50_000 + "1" + "}" * 50_000,
    "number": "1.5",
    "null": "null",
    "list": "[1, 2]",
    "string": '"x"',
    "NaN": "NaN",
}


# --- the world the cases run against -----------------------------------------------------------------------------
class World:
    """A tiny SD1 UNet carrying two tuners (an enabled res_attn ``keep`` at scale 0.7 and a disabled res_lora
    ``lin``), a pipeline around it, and one valid saved file per tuner of ``FILE_TUNERS``."""

    def __init__(self, folder: Path):
        self.folder = folder
        unet = frozen_tiny_unet("sd1")
        rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_attn", scale=0.7), "keep")
        randomize_tuner(unet, "keep", seed=1)
        rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_lora", targets=["attn2"]), "lin")
        randomize_tuner(unet, "lin", seed=2)
        rd.set_res_tuner_enabled(unet, False, "lin")
        self.pristine = unet
        inputs = unet_inputs(unet, batch_size=1)
        # 8x8 latents: every layer still runs, at a quarter of the cost (the snapshot runs after every case)
        self.inputs = {**inputs, "sample": inputs["sample"][..., :8, :8].contiguous()}
        from pipelines import ResTunerStableDiffusionPipeline

        components = tiny_pipeline("sd1").components
        self.pipe = ResTunerStableDiffusionPipeline(**{**components, "unet": copy.deepcopy(unet)})
        self.files: dict[str, Path] = {}
        source = frozen_tiny_unet("sd1")
        for tuner in FILE_TUNERS:
            rd.add_res_tuner(source, rd.ResTunerConfig(tuner=tuner), tuner)
            randomize_tuner(source, tuner, seed=3)
            self.files[tuner] = rd.save_res_tuner(source, folder / f"valid_{tuner}.safetensors", tuner)
            rd.remove_res_tuner(source, tuner)

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    def reset(self) -> None:
        """After a case that changed the UNet: start again from the pristine copy (later cases stay meaningful)."""
        self.pipe.register_modules(unet=copy.deepcopy(self.pristine))

    def read(self, tuner: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        with safe_open(str(self.files[tuner]), framework="pt") as f:
            return dict(f.metadata()), {key: f.get_tensor(key) for key in f.keys()}

    def write(self, name: str, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> Path:
        path = self.folder / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("fuzz"))


def snapshot(unet: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """Everything a refused call must leave as it was."""
    with torch.no_grad():
        output = unet(**inputs).sample.clone()
    state = get_state(unet)
    return {
        "output": output,
        "processors": {name: (type(p).__name__, id(p)) for name, p in unet.attn_processors.items()},
        "hooks": {
            name: (
                tuple(id(h) for h in module._forward_hooks.values()),
                tuple(id(h) for h in module._forward_pre_hooks.values()),
                tuple(
                    sorted(
                        k
                        for k in ("set_processor", "res_tuner_bank", "set_default_attn_processor")
                        if k in module.__dict__
                    )
                ),
            )
            for name, module in unet.named_modules()
        },
        "tuners": {name: config.to_dict() for name, config in rd.get_res_tuner_configs(unet).items()},
        "settings": [
            (bank.layer_path, name, s.scale, s.enabled, s.fused, s.placement, bank.call_scale)
            for bank, _ in (state.banks if state else [])
            for name, s in bank.settings.items()
        ],
        "state_dict": {key: value.clone() for key, value in unet.state_dict().items()},
    }


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    found = []
    if not torch.equal(before["output"], after["output"]):
        found.append("outputs changed")
    for key in ("processors", "hooks", "tuners", "settings"):
        if before[key] != after[key]:
            found.append(f"{key} changed")
    b, a = before["state_dict"], after["state_dict"]
    if b.keys() != a.keys() or any(not torch.equal(b[k], a[k]) for k in b):
        found.append("state dict changed")
    return found


class Fuzzer:
    """Runs cases against the world; collects every failure and counts cases tried / held."""

    def __init__(self, world: World):
        self.world = world
        self.before = snapshot(world.unet, world.inputs)
        self.tried = 0
        self.failures: list[str] = []

    def case(self, label: str, call: Callable[[], Any], *needles: str, errors: tuple[type, ...] = OUR_ERRORS) -> None:
        """``call`` must raise one of ``errors`` within the time limit, naming every needle (case-insensitive),
        and change nothing."""
        self.tried += 1
        problems = []
        start = time.perf_counter()
        try:
            call()
        except errors as err:
            elapsed = time.perf_counter() - start
            message = str(err).lower()
            if elapsed > TIME_LIMIT_S:
                problems.append(f"took {elapsed:.1f} s")
            missing = [needle for needle in needles if str(needle).lower() not in message]
            if missing:
                problems.append(f"message does not name {missing}: {str(err)[:300]!r}")
        except Exception as err:  # a raw error: the case fails, the run goes on
            problems.append(f"raw {type(err).__name__}: {str(err)[:200]!r}")
        else:
            problems.append("accepted")
        changed = differences(self.before, snapshot(self.world.unet, self.world.inputs))
        if changed:
            problems.extend(changed)
            self.world.reset()
            self.before = snapshot(self.world.unet, self.world.inputs)
        if problems:
            self.failures.append(f"{label}: {'; '.join(problems)}")

    def finish(self) -> None:
        held = self.tried - len(self.failures)
        print(f"\n{held} of {self.tried} cases held")
        assert not self.failures, f"{len(self.failures)} of {self.tried} cases failed:\n" + "\n".join(
            self.failures[:60]
        )


def _load(world: World, path: Any, **kwargs: Any) -> Callable[[], Any]:
    return lambda: rd.load_res_tuner(world.unet, path, **kwargs)


# --- the control: a valid file loads, changes the outputs, and unloads exactly ---------------------------------
def test_valid_files_load_and_unload_exactly(world: World):
    before = snapshot(world.unet, world.inputs)
    for tuner, path in world.files.items():
        name = rd.load_res_tuner(world.unet, path)
        assert name == tuner
        with torch.no_grad():
            assert not torch.equal(world.unet(**world.inputs).sample, before["output"]), tuner
        rd.remove_res_tuner(world.unet, name)
        assert differences(before, snapshot(world.unet, world.inputs)) == [], tuner


# --- metadata ----------------------------------------------------------------------------------------------------
def test_every_metadata_field_wrong(world: World):
    fuzz = Fuzzer(world)
    for tuner in KIND_TUNERS:
        metadata, tensors = world.read(tuner)
        for key in METADATA_KEYS:
            variants: dict[str, str | None] = {"missing": None, **BAD_JSON}
            if key == "format_version":
                variants.update(
                    {
                        "float": "1.5",
                        "negative": "-1",
                        "zero": "0",
                        "future": "2",
                        "huge": "9" * 40,
                        "arabic digit": "\u0661",
                        "spaced": " 1",
                    },
                )
            if key == "adapter_name":
                variants = {f"name {n!r}": n for n in BAD_NAMES if isinstance(n, str)}
            if key == "format":
                variants = {"missing": None, "other": "other-format", "empty": "", "nested": BAD_JSON["nested list"]}
            for label, value in variants.items():
                mutated = {k: v for k, v in metadata.items() if k != key}
                if value is not None:
                    mutated[key] = value
                path = world.write(f"meta_{tuner}_{key}", mutated, tensors)
                needle = "format" if key == "format" else ("adapter name" if key == "adapter_name" else key)
                fuzz.case(f"{tuner} metadata {key} {label}", _load(world, path), path.name, needle)
    fuzz.finish()


def _config_variants(config: dict[str, Any], common: bool = True) -> list[tuple[str, str, Any]]:
    """(label, the field the message must name, the mutated config) for every field of a saved config (the fields
    every tuner shares only with ``common``)."""
    out: list[tuple[str, str, Any]] = []
    wrong_types = [5, 1.5, None, True, [], {}, [5], {"a": 1}, "x", [[["deep"]]]]
    for field in ("tuner", "targets", "blocks", "projections", "placement") if common else ():
        for value in wrong_types:
            if field in ("blocks", "targets", "projections") and value is None:
                continue  # None is every block / the model family's default targets and projections: valid
            if (
                field == "projections"
                and config["tuner"] not in ("res_lora", "glora", "surm_circulant")
                and value in ([], {})
            ):
                continue  # projections are unused by operation tuners: an empty list is valid there
            out.append((f"{field}={value!r}", field[:-1] if field.endswith("s") else field, {**config, field: value}))
    out.append(("tuner missing", "tuner", {k: v for k, v in config.items() if k != "tuner"}))
    out.append(("tuner unknown", "tuner", {**config, "tuner": "lora_xl"}))
    out.append(("blocks 100k patterns", "blocks", {**config, "blocks": [f"up_blocks.{i}" for i in range(100_000)]}))
    out.append(("blocks unmatched", "blocks", {**config, "blocks": ["nowhere.*"]}))
    for value in (NAN, INF, -INF, 1e30, -3e38, 1e4, "1", None, [1.0], {"s": 1}, True):
        out.append((f"scale={value!r}", "scale", {**config, "scale": value}))
    out.append(("unknown key", "evil", {**config, "evil": 1}))
    for value in ([], "x", 5, [["rank", 4]]):
        out.append((f"hyperparameters={value!r}", "hyperparameters", {**config, "hyperparameters": value}))
    hyper = config["hyperparameters"]
    out.append(("unknown hyperparameter", "evil", {**config, "hyperparameters": {**hyper, "evil": 1}}))
    for field, default in hyper.items():
        bad: list[Any] = [[1], {"a": 1}, "8" if not isinstance(default, str) else 8]
        if default is not None:
            bad.append(None)
        if isinstance(default, bool):
            bad += ["true", 1]
        elif isinstance(default, int):
            bad += [1.5, True, -1, 0, 10**6, 10**9, 10**30, 60_000]
        elif isinstance(default, float):
            bad += [NAN, INF, 1e30, -1.0]
        for value in bad:
            if config["tuner"] == "res_bypass" and field == "heads" and value == 60_000:
                continue  # heads is unused by the bypass's default adapter stages: any valid count loads
            out.append((f"{field}={value!r}", field, {**config, "hyperparameters": {**hyper, field: value}}))
    if "heads" in hyper:
        out.append(("rank 1e9 heads 3", "rank", {**config, "hyperparameters": {**hyper, "rank": 10**9, "heads": 3}}))
    return out


def test_every_config_field_wrong(world: World):
    fuzz = Fuzzer(world)
    for tuner in FILE_TUNERS:
        metadata, tensors = world.read(tuner)
        config = json.loads(metadata["config"])
        for label, field, mutated in _config_variants(config, common=tuner in KIND_TUNERS):
            text = json.dumps(mutated)  # NaN / Infinity as JSON writes them
            path = world.write(f"config_{tuner}", {**metadata, "config": text}, tensors)
            fuzz.case(f"{tuner} config {label}", _load(world, path), path.name, field)
    fuzz.finish()


def test_layers_field_wrong(world: World):
    fuzz = Fuzzer(world)
    for tuner in FILE_TUNERS:
        metadata, tensors = world.read(tuner)
        layers = json.loads(metadata["layers"])
        first = next(iter(layers))
        variants = {
            "empty object": {},
            "a layer as a number": {**layers, first: 5},
            "a dim as text": {**layers, first: {k: str(v) for k, v in layers[first].items()}},
            "an extra layer": {**layers, "nowhere.attn1": layers[first]},
            "a list of layers": list(layers),
            "100k layers": {f"nowhere.{i}": {"channels": 1} for i in range(100_000)},
        }
        for label, value in variants.items():
            path = world.write(f"layers_{tuner}", {**metadata, "layers": json.dumps(value)}, tensors)
            fuzz.case(f"{tuner} layers {label}", _load(world, path), path.name, "layer")
    fuzz.finish()


def test_huge_metadata_is_refused_before_it_is_parsed(world: World):
    fuzz = Fuzzer(world)
    metadata, tensors = world.read("res_attn")
    path = world.write("huge_meta", {**metadata, "junk": "x" * (40 << 20)}, tensors)
    fuzz.case("40 MB metadata", _load(world, path), path.name, "header")
    config = json.loads(metadata["config"])
    config["blocks"] = ["up_blocks.1"] * 3_000_000  # ~45 MB of config
    path = world.write("huge_config", {**metadata, "config": json.dumps(config)}, tensors)
    fuzz.case("45 MB config", _load(world, path), path.name, "header")
    path.unlink()
    fuzz.finish()


# --- tensors -----------------------------------------------------------------------------------------------------
def _tensor_variants(value: torch.Tensor) -> list[tuple[str, str, torch.Tensor]]:
    """(label, what the message must name, mutated tensor) for one tensor of a valid file."""
    out = []
    for dtype in (torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.float8_e4m3fn):
        out.append((f"dtype {dtype}", "dtype", value.to(dtype)))
    out.append(("extra dim", "shape", value.unsqueeze(0)))
    out.append(("flattened", "shape", value.flatten() if value.dim() > 1 else value.reshape(1, -1)))
    out.append(("scalar", "shape", value.flatten()[0].clone()))
    out.append(("empty", "shape", value.new_zeros((0,) + tuple(value.shape[1:]))))
    out.append(("doubled", "shape", torch.cat([value, value])))
    if value.dim() == 2 and value.shape[0] != value.shape[1]:
        out.append(("transposed", "shape", value.t().contiguous()))
    for label, number in (("NaN", NAN), ("inf", INF), ("-inf", -INF), ("3e38", 3e38), ("-1e30", -1e30), ("1e5", 1e5)):
        bad = value.clone()
        bad.view(-1)[0] = number
        out.append((label, "NaN" if label == "NaN" else ("inf" if "inf" in label else "65504"), bad))
    return out


def test_every_tensor_wrong(world: World):
    """Tensors of every file (up to ``TENSORS_PER_FILE``, spread over its keys) get one mutation each, cycling
    through them; the first tensor of each gets all."""
    fuzz = Fuzzer(world)
    for tuner in FILE_TUNERS:
        metadata, tensors = world.read(tuner)
        keys = sorted(tensors)
        for index, key in enumerate(keys[:: max(1, len(keys) // TENSORS_PER_FILE)]):
            variants = _tensor_variants(tensors[key])
            chosen = variants if index == 0 else [variants[index % len(variants)]]
            for label, needle, value in chosen:
                path = world.write(f"tensor_{tuner}", metadata, {**tensors, key: value})
                fuzz.case(f"{tuner} {key} {label}", _load(world, path), path.name, key, needle)
        first = sorted(tensors)[0]
        rest = {k: v for k, v in tensors.items() if k != first}
        keyed = {
            "dropped": (rest, first),
            "added": ({**tensors, "nowhere.evil": tensors[first].clone()}, "nowhere.evil"),
            "renamed": ({**rest, first + "_x": tensors[first]}, first),
            "no tensors": ({}, "lacks"),
        }
        for label, (mutated, needle) in keyed.items():
            path = world.write(f"keys_{tuner}", metadata, mutated)
            fuzz.case(f"{tuner} tensor key {label}", _load(world, path), path.name, needle)
    fuzz.finish()


def test_state_dicts_and_hotswaps_misused(world: World):
    """The in-memory entry points (a state dict with ``config=``, ``hotswap=True``) refuse what a file may not hold."""
    fuzz = Fuzzer(world)
    metadata, tensors = world.read("res_attn")
    config = rd.ResTunerConfig.from_json(metadata["config"])
    load = lambda sd, **kw: lambda: rd.load_res_tuner(world.unet, sd, **kw)  # noqa: E731
    keys = sorted(tensors)
    for index, key in enumerate(keys):
        label, needle, value = _tensor_variants(tensors[key])[index % 12 if index % 2 else index % 6]
        mutated = {**tensors, key: value}
        fuzz.case(f"state dict {key} {label}", load(mutated, config=config, adapter_name="sd"), key, needle)
        fuzz.case(f"hotswap keep {key} {label}", load(mutated, adapter_name="keep", hotswap=True), key)
    fuzz.case(
        "state dict with an extra key",
        load({**tensors, "nowhere.x": tensors[keys[0]].clone()}, config=config, adapter_name="sd"),
        "nowhere.x",
    )
    fuzz.case("state dict without config", load(tensors, adapter_name="sd"), "config")
    fuzz.case(
        "state dict with a dict as config",
        load(tensors, config={"tuner": "res_attn"}, adapter_name="sd"),
        "ResTunerConfig",
    )
    fuzz.case(
        "state dict, config rank 60000", load(tensors, config=config.replace(rank=60_000), adapter_name="sd"), "rank"
    )
    fuzz.case(
        "state dict with a non-tensor", load({**tensors, keys[0]: [1.0]}, config=config, adapter_name="sd"), keys[0]
    )
    fuzz.case("state dict under a bad name", load(tensors, config=config, adapter_name="a.b"), "adapter name")
    fuzz.case("hotswap without a name", load(tensors, hotswap=True), "adapter_name")
    fuzz.case(
        "hotswap a file of another tuner", load(world.files["res_lora"], adapter_name="keep", hotswap=True), "keep"
    )
    fuzz.case("config= with a file", load(world.files["res_attn"], config=config), "config")
    fuzz.finish()


# --- files that are not regular files, and bytes that are not safetensors -----------------------------------------
def _unblock_fifo(path: Path) -> None:
    """Open the FIFO for writing once, so a reader stuck on it gets end-of-file and its thread ends."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


def _guarded(call: Callable[[], Any], fifo: Path | None) -> Callable[[], Any]:
    """Run ``call`` in a thread; if it blocks on a FIFO longer than the time limit, unblock it and report a hang."""

    def run() -> Any:
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = call()
            except BaseException as err:  # handed to the caller below
                box["error"] = err

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(TIME_LIMIT_S + 1)
        if thread.is_alive() and fifo is not None:
            _unblock_fifo(fifo)
            thread.join(5)
            raise TimeoutError("hung on a FIFO")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    return run


def test_non_regular_files_and_garbage_bytes(world: World, tmp_path: Path):
    fuzz = Fuzzer(world)
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    fuzz.case("FIFO named .safetensors", _guarded(_load(world, fifo), fifo), "pipe.safetensors", "not a regular file")
    folder = tmp_path / "with_fifo"
    folder.mkdir()
    os.mkfifo(folder / "res_tuner.safetensors")
    fuzz.case(
        "folder holding a FIFO",
        _guarded(_load(world, folder), folder / "res_tuner.safetensors"),
        "res_tuner.safetensors",
        "not a regular file",
    )
    nested = tmp_path / "with_folder"
    (nested / "res_tuner.safetensors").mkdir(parents=True)
    fuzz.case(
        "folder holding a folder res_tuner.safetensors", _load(world, nested), "res_tuner.safetensors", "is a folder"
    )
    device = tmp_path / "zero.safetensors"
    device.symlink_to("/dev/zero")
    fuzz.case("symlink to /dev/zero", _guarded(_load(world, device), None), "zero.safetensors", "not a regular file")
    fuzz.case("/dev/null", _load(world, "/dev/null"), "/dev/null", "not a regular file")

    valid = world.files["res_attn"].read_bytes()
    header_len = struct.unpack("<Q", valid[:8])[0]
    garbage = {
        "empty": b"",
        "7 bytes": b"\x01" * 7,
        "header length 2^60": struct.pack("<Q", 1 << 60) + b"{}",
        "header length past the end": struct.pack("<Q", header_len + 100) + valid[8:],
        "header not JSON": struct.pack("<Q", 8) + b"not json" + valid[8 + header_len :],
        "truncated data": valid[: len(valid) // 2],
        "random bytes": bytes(range(256)) * 8,
    }
    for label, data in garbage.items():
        path = tmp_path / f"garbage_{len(data)}.safetensors"
        path.write_bytes(data)
        fuzz.case(f"file {label}", _load(world, path), path.name)
    fuzz.finish()


# --- the public API, misused -------------------------------------------------------------------------------------
def test_scales_names_and_flags_misused(world: World, tmp_path: Path):
    fuzz = Fuzzer(world)
    unet = lambda: world.unet  # noqa: E731 - the world may swap its UNet after a failed case
    for value in BAD_SCALES:
        fuzz.case(f"set_res_tuner_scale({value!r})", lambda v=value: rd.set_res_tuner_scale(unet(), v), "scale")
        fuzz.case(
            f"set_res_tuner_scale({value!r}, 'keep')",
            lambda v=value: rd.set_res_tuner_scale(unet(), v, "keep"),
            "scale",
        )
        fuzz.case(f"pipe.set_res_tuner_scale({value!r})", lambda v=value: world.pipe.set_res_tuner_scale(v), "scale")
        if value is not None:  # None is 1.0 in a weights list, as in diffusers' set_adapters
            fuzz.case(
                f"pipe.set_res_tuners(['keep'], [{value!r}])",
                lambda v=value: world.pipe.set_res_tuners(["keep"], [v]),
                "scale",
            )
        if value is None or isinstance(value, dict):
            continue  # None is no override, and a dict of names is the per-call form
        fuzz.case(
            f"per-call scale {value!r}",
            lambda v=value: unet()(**world.inputs, cross_attention_kwargs={rd.SCALE_KWARG: v}),
            rd.SCALE_KWARG,
        )
    for value in [
        {"nope": 0.5},
        {"keep": "x"},
        {"keep": NAN},
        {"keep": INF},
        {5: 1.0},
        {"keep": [1.0]},
        {"keep": 0.5, "nope": 1.0},
    ]:
        fuzz.case(
            f"per-call scale {value!r}",
            lambda v=value: unet()(**world.inputs, cross_attention_kwargs={rd.SCALE_KWARG: v}),
            rd.SCALE_KWARG,
        )
    for value in ["False", "True", "no", 0, 1, 0.0, None, [], NAN]:
        fuzz.case(f"set_res_tuner_enabled({value!r})", lambda v=value: rd.set_res_tuner_enabled(unet(), v), "enabled")
    for name in [5, "nope", "", ["keep", 5], ["nope"], {"keep"}, []]:
        fuzz.case(
            f"set_res_tuner_scale(0.5, {name!r})", lambda n=name: rd.set_res_tuner_scale(unet(), 0.5, n), "adapter"
        )
        fuzz.case(
            f"set_res_tuner_enabled(True, {name!r})",
            lambda n=name: rd.set_res_tuner_enabled(unet(), True, n),
            "adapter",
        )
        fuzz.case(f"remove_res_tuner({name!r})", lambda n=name: rd.remove_res_tuner(unet(), n), "adapter")
        fuzz.case(f"fuse_res_tuner({name!r})", lambda n=name: rd.fuse_res_tuner(unet(), n), "adapter")
        fuzz.case(f"res_tuner_parameters({name!r})", lambda n=name: rd.res_tuner_parameters(unet(), n), "adapter")
        fuzz.case(
            f"pipe.set_res_tuner_scale(0.5, {name!r})",
            lambda n=name: world.pipe.set_res_tuner_scale(0.5, n),
            "adapter",
        )
        fuzz.case(f"pipe.disable_res_tuner({name!r})", lambda n=name: world.pipe.disable_res_tuner(n), "adapter")
        fuzz.case(f"pipe.unload_res_tuner({name!r})", lambda n=name: world.pipe.unload_res_tuner(n), "adapter")
        fuzz.case(f"pipe.set_res_tuners({name!r})", lambda n=name: world.pipe.set_res_tuners(n), "adapter")
    from resattn_diffusion.integration.api import set_res_tuner_layer_scales

    for value in (NAN, INF, 1e30, "0.5", None, [1.0]):
        fuzz.case(
            f"layer scales {value!r}",
            lambda v=value: set_res_tuner_layer_scales(unet(), "keep", {"down_blocks": 0.5, "mid_block": v}),
            "scale",
        )
    fuzz.case("layer scales not a dict", lambda: set_res_tuner_layer_scales(unet(), "keep", [0.5]), "scales")
    fuzz.case("fuse_res_tuner on a disabled tuner", lambda: rd.fuse_res_tuner(unet(), "lin"), "lin", "disabled")
    fuzz.case("pipe.fuse_res_tuner on a disabled tuner", lambda: world.pipe.fuse_res_tuner("lin"), "lin", "disabled")
    fuzz.case("fuse_res_tuner on an attention tuner", lambda: rd.fuse_res_tuner(unet(), "keep"), "keep")
    fuzz.finish()


def test_adapter_names_through_every_entry_point(world: World, tmp_path: Path):
    fuzz = Fuzzer(world)
    config = rd.ResTunerConfig(tuner="res_adapter")
    for name in BAD_NAMES + ["keep", "lin"]:
        needle = "already" if name in ("keep", "lin") else "adapter name"
        fuzz.case(f"add_res_tuner(name={name!r})", lambda n=name: rd.add_res_tuner(world.unet, config, n), needle)
        for tuner in ("res_attn", "res_bypass"):
            file = world.files[tuner]
            fuzz.case(f"load_res_tuner({tuner}, adapter_name={name!r})", _load(world, file, adapter_name=name), needle)
            fuzz.case(
                f"pipe.load_res_tuner({tuner}, adapter_name={name!r})",
                lambda n=name, f=file: world.pipe.load_res_tuner(f, adapter_name=n),
                needle,
            )
    fuzz.finish()


def test_paths_and_models_misused(world: World, tmp_path: Path):
    fuzz = Fuzzer(world)
    file = world.files["res_attn"]
    for path in [None, 5, 1.5, b"bytes.safetensors", ["a.safetensors"], tmp_path / "missing.safetensors", tmp_path]:
        fuzz.case(
            f"load_res_tuner(unet, {path!r})", _load(world, path), "path" if not isinstance(path, Path) else str(path)
        )
    for weight_name in ["../valid_res_attn.safetensors", "/etc/passwd", "", 5, "a/b.safetensors"]:
        fuzz.case(f"weight_name={weight_name!r}", _load(world, file.parent, weight_name=weight_name), "weight_name")
    for model in [None, "unet", 5, torch.nn.Linear(2, 2)]:
        fuzz.case(f"load_res_tuner({type(model).__name__}, file)", lambda m=model: rd.load_res_tuner(m, file), "unet")
        fuzz.case(
            f"add_res_tuner({type(model).__name__}, config)",
            lambda m=model: rd.add_res_tuner(m, rd.ResTunerConfig()),
            "unet",
        )
        fuzz.case(
            f"set_res_tuner_scale({type(model).__name__})", lambda m=model: rd.set_res_tuner_scale(m, 0.5), "unet"
        )
    for config in [None, {"tuner": "res_attn"}, "res_attn", 5]:
        fuzz.case(
            f"add_res_tuner(unet, {config!r})", lambda c=config: rd.add_res_tuner(world.unet, c), "ResTunerConfig"
        )
    for path in [None, 5, 1.5]:
        fuzz.case(f"save_res_tuner(unet, {path!r})", lambda p=path: rd.save_res_tuner(world.unet, p, "keep"), "path")
    fuzz.case(
        "save_res_tuner of a missing name",
        lambda: rd.save_res_tuner(world.unet, tmp_path / "x.safetensors", "nope"),
        "nope",
    )
    fuzz.case("load twice under one name", _load(world, file, adapter_name="keep"), "keep")
    fuzz.case("pipe.load_res_tuner(None)", lambda: world.pipe.load_res_tuner(None), "path")
    fuzz.case(
        "pipe.load_res_tuner(missing)", lambda: world.pipe.load_res_tuner(str(tmp_path / "nope")), "does not exist"
    )
    fuzz.finish()


def test_a_pipeline_in_place_of_its_unet_is_accepted(world: World):
    pipe = world.pipe
    name = rd.load_res_tuner(pipe, world.files["res_lora"], adapter_name="via_pipe")
    assert "via_pipe" in rd.get_res_tuner_configs(pipe.unet)
    rd.remove_res_tuner(pipe.unet, "via_pipe")
    assert name == "via_pipe"


def test_missing_path_that_looks_like_a_repo_id_fails_fast_offline(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(rd.ResTunerFileError, match="does not exist"):
        resolve_tuner_source("someone/missing-tuner")
    assert time.perf_counter() - start < TIME_LIMIT_S


def test_missing_path_that_looks_like_a_repo_id_fails_fast_without_a_connection(monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    start = time.perf_counter()
    with pytest.raises(rd.ResTunerFileError, match="does not exist"):
        resolve_tuner_source("someone/missing-tuner")
    assert time.perf_counter() - start < TIME_LIMIT_S


# --- training flags ----------------------------------------------------------------------------------------------
def _parse(tmp_path: Path, *flags: str):
    from resattn_diffusion.training.args import parse_args

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    base = [
        "--pretrained_model_name_or_path",
        str(tmp_path / "model"),
        "--instance_data_dir",
        str(data),
        "--instance_prompt",
        "a sks dog",
    ]
    return parse_args("dreambooth", base + list(flags))


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--learning_rate", "nan"], "--learning_rate"),
        (["--learning_rate", "inf"], "--learning_rate"),
        (["--adam_epsilon", "nan"], "--adam_epsilon"),
        (["--max_grad_norm", "inf"], "--max_grad_norm"),
        (["--prior_loss_weight", "nan"], "--prior_loss_weight"),
        (["--tuner_scale", "inf"], "scale"),
        (["--tuner_scale", "nan"], "scale"),
        (["--tuner_scale", "1e30"], "scale"),
        (["--rank", "1000000000"], "rank"),
        (["--rank", "1000000"], "rank"),
        (["--heads", "1000000000"], "heads"),
        (["--tuner_arg", "rank=1000000000", "heads=3"], "rank"),
        (["--mixed_precision", "fp16"], "bf16"),
    ],
)
def test_training_flags_refused_up_front(tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], needle: str):
    if flags[:2] == ["--mixed_precision", "fp16"] and torch.cuda.is_available():
        pytest.skip("fp16 is refused only where there is no GPU")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        _parse(tmp_path, *flags)
    assert exit_info.value.code == 2
    assert time.perf_counter() - start < TIME_LIMIT_S
    assert needle in capsys.readouterr().err


def test_a_tuner_bigger_than_the_local_model_is_refused_up_front(
    tiny_dirs, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """The bound comes from the model: the tiny UNet has ~0.8 M parameters, so rank 20000 (under the generic 65536
    cap) is refused from its config.json alone, while the default rank passes."""
    from resattn_diffusion.training.args import parse_args

    data = tmp_path / "data"
    data.mkdir()
    base = [
        "--pretrained_model_name_or_path",
        str(tiny_dirs["sd1"]),
        "--instance_data_dir",
        str(data),
        "--instance_prompt",
        "a sks dog",
    ]
    assert parse_args("dreambooth", base + ["--rank", "8"]).rank == 8
    start = time.perf_counter()
    with pytest.raises(SystemExit):
        parse_args("dreambooth", base + ["--rank", "20000"])
    assert time.perf_counter() - start < TIME_LIMIT_S
    assert "more than the" in capsys.readouterr().err
