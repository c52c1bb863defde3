"""``ResTunerLoaderMixin``: load, mix, scale, switch, fuse and unload res tuners on a diffusers pipeline.

The pipeline-level face of :mod:`resattn_diffusion.integration.api` and :mod:`~resattn_diffusion.integration.io`,
shaped like diffusers' ``IPAdapterMixin`` / ``StableDiffusionLoraLoaderMixin``: the tuners live on the pipeline's
denoiser (``pipe.unet`` of SD 1.x/2.x/XL, ``pipe.transformer`` of SD3 and Flux; :func:`denoiser_of`), these methods
only find the file (local or on the Hub), check requests against what is loaded, and call the core.

Every method that changes several tuners checks the whole request first, so a refused call leaves the pipeline as
it was (same processors, same outputs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import check_scale
from ..config import ResTunerConfig
from ..hub import ModelSourceError, check_pretrained_source, looks_like_repo_id
from ..tuners.base import ConfigError
from .api import (
    ResTunerError,
    check_layer_scales_apply,
    fuse_res_tuner,
    get_res_tuner_configs,
    remove_res_tuner,
    res_tuner_settings,
    set_res_tuner_enabled,
    set_res_tuner_layer_scales,
    set_res_tuner_scale,
    unfuse_res_tuner,
)
from .families import FAMILIES
from .families.base import save_pretrained_refusal
from .io import WEIGHT_NAME, ResTunerFileError, load_res_tuner, res_tuner_state_dict, save_res_tuner
from .processors import ResTunerAttnProcessor

#: Keyword arguments of :meth:`ResTunerLoaderMixin.load_res_tuner` passed on to ``huggingface_hub.hf_hub_download``.
HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")

#: Pipeline attributes that hold the network the tuners sit on (each family's ``component``), in the order they are
#: looked for: ``("unet", "transformer")``.
DENOISER_ATTRIBUTES: tuple[str, ...] = tuple(dict.fromkeys(family.component for family in FAMILIES))


def denoiser_attribute(pipeline: Any) -> str:
    """The name of ``pipeline``'s denoiser attribute: ``"unet"`` (SD 1.x/2.x/XL) or ``"transformer"`` (SD3, Flux)."""
    for name in DENOISER_ATTRIBUTES:
        if isinstance(getattr(pipeline, name, None), nn.Module):
            return name
    raise ResTunerError(
        f"{type(pipeline).__name__} has no denoiser (neither pipe.unet nor pipe.transformer is a model); res tuners "
        "sit on a UNet or a diffusion transformer"
    )


def denoiser_of(pipeline: Any) -> nn.Module:
    """The network a pipeline's res tuners sit on: ``pipe.unet`` or ``pipe.transformer``."""
    return getattr(pipeline, denoiser_attribute(pipeline))


def _loaded_names(pipeline: Any) -> list[str]:
    """Tuners loaded on the pipeline's denoiser (none when it has no denoiser yet)."""
    if not any(isinstance(getattr(pipeline, name, None), nn.Module) for name in DENOISER_ATTRIBUTES):
        return []
    return list(get_res_tuner_configs(denoiser_of(pipeline)))


def resolve_tuner_source(
    path_or_repo: str | os.PathLike, weight_name: str | None = None, **hub_kwargs: Any
) -> tuple[str, str | None]:
    """Where to read a tuner from: ``(local file or folder, weight_name for the folder)``.

    A path that exists is used as it is. Otherwise a string shaped like a Hub repo id (``"user/my-tuner"``) is
    fetched with ``huggingface_hub.hf_hub_download`` (file ``weight_name``, default ``res_tuner.safetensors``).
    Anything else, and a failed download, is a :class:`ResTunerFileError` saying what was tried.
    """
    unknown = set(hub_kwargs) - set(HUB_KWARGS)
    if unknown:
        raise TypeError(
            f"load_res_tuner got unexpected keyword argument(s) {sorted(unknown)}; Hub options are {list(HUB_KWARGS)}"
        )
    if not isinstance(path_or_repo, (str, os.PathLike)):
        raise ResTunerFileError(
            "load_res_tuner takes a path (a .safetensors file or a folder) or a Hub repo id, got "
            f"{type(path_or_repo).__name__}"
        )
    if os.path.lexists(path_or_repo):
        if hub_kwargs.get("subfolder"):
            path_or_repo = os.path.join(path_or_repo, hub_kwargs["subfolder"])
        return str(path_or_repo), weight_name
    path = str(path_or_repo)
    if not isinstance(path_or_repo, str) or not looks_like_repo_id(path):
        raise ResTunerFileError(
            f"no tuner file or folder at {path!r}: the path does not exist; pass a .safetensors file saved by "
            "save_res_tuner, a training output folder holding res_tuner.safetensors, or a Hugging Face Hub repo id "
            "like 'user/my-tuner'"
        )

    from huggingface_hub import constants, hf_hub_download

    filename = weight_name or WEIGHT_NAME
    if not hub_kwargs.get("local_files_only"):
        # hf_hub_download would retry an unreachable Hub for many seconds before saying the same thing
        subfolder = hub_kwargs.get("subfolder")
        try:
            check_pretrained_source(
                path,
                "load_res_tuner",
                filename=f"{subfolder}/{filename}" if subfolder else filename,
                cache_dir=hub_kwargs.get("cache_dir"),
                revision=hub_kwargs.get("revision"),
                token=hub_kwargs.get("token"),
            )
        except ModelSourceError as err:
            raise ResTunerFileError(
                f"{path!r} does not exist as a local file or folder (looked in {os.getcwd()!r}), and the Hugging Face "
                f"Hub cannot provide it (offline, unreachable or no such repo): {err}"
            ) from None
    try:
        return hf_hub_download(path, filename, **hub_kwargs), None
    except Exception as err:  # huggingface_hub raises a family of errors: offline, not found, gated, HTTP
        offline = constants.HF_HUB_OFFLINE or type(err).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled")
        reason = (
            "the Hub cannot be reached (offline, or HF_HUB_OFFLINE=1) and the file is not in the local Hub cache"
            if offline
            else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        )
        raise ResTunerFileError(
            f"{path!r} is not a local file or folder, and fetching {filename!r} from the Hugging Face Hub repo "
            f"{path!r} failed: {reason}. Pass a local path (a .safetensors file or a training output folder), or "
            "go online / download the file first."
        ) from None


class ResTunerLoaderMixin:
    """Load and manage res tuners (Res-Attn, Res-Tuning, GLoRA, SURM, ...) on a pipeline's denoiser: the UNet of
    SD 1.x/2.x/XL pipelines, the transformer of SD3 and Flux pipelines.

    Mixed into a diffusers pipeline (see ``pipelines/``)::

        pipe = ResTunerStableDiffusionPipeline.from_pretrained(model)
        pipe.load_res_tuner("output/my-tuner", adapter_name="style")
        image = pipe("a photo of a dog", generator=torch.Generator().manual_seed(0)).images[0]

    Put the mixin before the diffusers pipeline class in the bases, so that its guards on ``save_pretrained`` and
    ``fuse_qkv_projections`` (which cannot keep tuners) take effect.

    The tuners sit on ``pipe.unet`` and run inside any diffusers call; they survive ``enable_attention_slicing()``,
    ``enable_xformers_memory_efficient_attention()``, ``unet.set_default_attn_processor()``, ``load_lora_weights``
    and ``load_ip_adapter`` / ``unload_ip_adapter`` in either order, and run under ``enable_sequential_cpu_offload()``
    and, with this mixin, in perturbed-attention guidance (``*PAGPipeline``). A per-call scale goes through
    ``cross_attention_kwargs={"res_tuner_scale": 0.5}`` (or a dict ``{name: scale}``).
    """

    @property
    def _res_tuner_denoiser(self) -> nn.Module:
        return denoiser_of(self)

    # -- loading ------------------------------------------------------------------------------------------------
    def load_res_tuner(
        self,
        path_or_folder: str | os.PathLike | Mapping[str, torch.Tensor],
        adapter_name: str | None = None,
        weight_name: str | None = None,
        hotswap: bool = False,
        config: ResTunerConfig | None = None,
        **hub_kwargs: Any,
    ) -> str:
        """Load a tuner saved with ``save_res_tuner`` (or by the training scripts) onto ``pipe.unet`` /
        ``pipe.transformer``.

        Args:
            path_or_folder: a ``.safetensors`` tuner file; a folder holding ``res_tuner.safetensors`` (a training
                output folder); or a Hugging Face Hub repo id (``"user/my-tuner"``), downloaded when online.
            adapter_name: the name to load it under; default: the name it was saved with.
            weight_name: the file inside a folder or Hub repo, when it is not ``res_tuner.safetensors``.
            hotswap: replace the weights of the loaded tuner ``adapter_name`` in place (same tuner, config and
                shapes), so a ``torch.compile``-d UNet runs the new weights without recompiling. A file that does
                not match is refused before anything changes.
            config: the tuner's config when ``path_or_folder`` is a state dict (``pipe.res_tuner_state_dict(name)``);
                with ``hotswap`` the loaded tuner's config is the default.
            **hub_kwargs: for a Hub repo, passed to ``huggingface_hub.hf_hub_download`` (``subfolder``,
                ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ``proxies``).

        Returns:
            The adapter name the tuner was loaded under.

        Raises:
            ResTunerFileError: missing file, a folder without a tuner, an unreadable or foreign file, a tuner made for
                another base model, or a failed download. The pipeline is unchanged.
            ResTunerError: a tuner of that name is already loaded. The pipeline is unchanged.
        """
        denoiser = self._res_tuner_denoiser
        _check_not_offloaded_to_meta(denoiser)
        if any(getattr(module, "fused_projections", False) for module in denoiser.modules()):
            raise ResTunerError(
                "the UNet's attention projections are fused (fuse_qkv_projections); call "
                "pipe.unfuse_qkv_projections() before loading res tuners"
            )
        if isinstance(path_or_folder, Mapping):
            if hub_kwargs or weight_name is not None:
                raise TypeError("a state dict is loaded as it is: weight_name and Hub options do not apply")
            return load_res_tuner(denoiser, path_or_folder, adapter_name=adapter_name, hotswap=hotswap, config=config)
        source, folder_weight_name = resolve_tuner_source(path_or_folder, weight_name, **hub_kwargs)
        return load_res_tuner(
            denoiser, source, adapter_name=adapter_name, weight_name=folder_weight_name, hotswap=hotswap, config=config
        )

    def save_res_tuner(
        self, save_path: str | os.PathLike, adapter_name: str = "default", overwrite: bool = True
    ) -> Path:
        """Save the named tuner to a ``.safetensors`` file (or a folder, which gets ``res_tuner.safetensors``) that
        ``load_res_tuner`` and ``resattn-export`` read; atomic. Returns the file written."""
        self._check_names(adapter_name)
        return save_res_tuner(self._res_tuner_denoiser, save_path, adapter_name=adapter_name, overwrite=overwrite)

    def res_tuner_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The named tuner's weights (CPU copies) under file keys: ``load_res_tuner(state_dict, config=...)`` takes
        them back, ``hotswap=True`` swaps them in."""
        self._check_names(adapter_name)
        return res_tuner_state_dict(self._res_tuner_denoiser, adapter_name)

    def unload_res_tuner(self, adapter_name: str | list[str] | None = None) -> None:
        """Remove the named tuner(s), or all of them with ``adapter_name=None`` (a no-op when none is loaded).

        Fused tuners are unfused first; the UNet's processors, weights and outputs are restored exactly.
        """
        denoiser = self._res_tuner_denoiser
        loaded = get_res_tuner_configs(denoiser)
        if adapter_name is None:
            if loaded:
                remove_res_tuner(denoiser)
            return
        remove_res_tuner(denoiser, self._check_names(adapter_name))  # all or none: one refusal removes nothing

    # -- scale, mixing, on/off ----------------------------------------------------------------------------------
    def set_res_tuner_scale(self, scale: float, adapter_name: str | list[str] | None = None) -> None:
        """Set the branch scale ``s`` of the named tuner(s) (all when None). 0 gives the base model exactly."""
        names = self._check_names(adapter_name)
        scale = _check_weight(scale)
        self._refuse_fused(names, "changing its scale", unless=lambda status: status["scale"] == scale)
        set_res_tuner_scale(self._res_tuner_denoiser, scale, names)

    def set_res_tuners(
        self,
        adapter_names: str | list[str],
        weights: float | dict | list[float | dict | None] | None = None,
    ) -> None:
        """Mix loaded tuners: the named ones run with ``weights`` as their scales, every other loaded tuner is
        disabled (kept loaded; ``enable_res_tuner`` brings it back). Like diffusers' ``set_adapters``.

        Args:
            adapter_names: the tuners to use.
            weights: one scale per name, one scale for all, or None for 1.0 each. A scale may be a per-block dict
                in diffusers' ``set_adapters`` form, e.g. ``{"down": 0.5, "mid": 1.0, "up": {"block_0": 0.2,
                "block_1": [0.4, 0.6, 0.8]}}`` (blocks and transformer layers not named get 1.0).
        """
        names = self._check_names(adapter_names)
        if len(set(names)) != len(names):
            raise ConfigError(f"set_res_tuners: adapter_names has duplicates: {names}")
        if weights is None:
            weights = [1.0] * len(names)
        elif not isinstance(weights, (list, tuple)):
            # one scale for every name: a number of any numeric type (numpy's too) or a per-block dict; anything
            # else (a string, a tensor) is refused by the checks below, not taken apart as a sequence
            weights = [weights] * len(names)
        if len(weights) != len(names):
            raise ConfigError(
                f"set_res_tuners: {len(names)} adapter name(s) {names} but {len(weights)} scale weight(s) {weights}"
            )
        denoiser = self._res_tuner_denoiser
        # Expand and check every weight before any tuner changes.
        weights = [
            _expand_block_weights(denoiser, w, name) if isinstance(w, dict) else _check_weight(w)
            for w, name in zip(weights, names)
        ]
        self._refuse_fused(list(res_tuner_settings(denoiser)), "mixing tuners")

        for name in get_res_tuner_configs(denoiser):
            if name in names:
                weight = weights[names.index(name)]
                set_res_tuner_scale(denoiser, 1.0 if isinstance(weight, dict) else weight, name)
                if isinstance(weight, dict):
                    set_res_tuner_layer_scales(denoiser, name, weight)
                set_res_tuner_enabled(denoiser, True, name)
            else:
                set_res_tuner_enabled(denoiser, False, name)

    def disable_res_tuner(self, adapter_name: str | list[str] | None = None) -> None:
        """Switch the named tuner(s) (all when None) off without unloading them: the base model's outputs exactly."""
        names = self._check_names(adapter_name)
        self._refuse_fused(names, "disabling it")
        set_res_tuner_enabled(self._res_tuner_denoiser, False, names)

    def enable_res_tuner(self, adapter_name: str | list[str] | None = None) -> None:
        """Switch the named tuner(s) (all when None) back on."""
        names = self._check_names(adapter_name)
        set_res_tuner_enabled(self._res_tuner_denoiser, True, names)

    # -- fusing -------------------------------------------------------------------------------------------------
    def fuse_res_tuner(self, adapter_names: str | list[str] | None = None, safe_fusing: bool = False) -> None:
        """Fold tuners into the UNet's weights at their current scales: no extra inference cost.

        Only linear tuners (``res_lora``, ``glora``, ``surm_*``) fold. ``adapter_names=None`` fuses every enabled
        tuner. A request naming a tuner that cannot fold (or is disabled) raises, naming it, before any weight
        changes. ``unfuse_res_tuner`` restores the original weights exactly. ``safe_fusing=True`` (diffusers'
        ``fuse_lora`` flag) computes every fused weight first and refuses, changing nothing, if any is NaN or inf.
        """
        if adapter_names is None:
            status = res_tuner_settings(self._res_tuner_denoiser)
            if not status:
                raise ResTunerError("no res tuner is loaded on this pipeline; load one with pipe.load_res_tuner(...)")
            names = [name for name, s in status.items() if s["enabled"]]
        else:
            names = self._check_names(adapter_names)
            status = res_tuner_settings(self._res_tuner_denoiser)
            disabled = [name for name in names if not status[name]["enabled"]]
            if disabled:
                raise ResTunerError(
                    f"tuner(s) {disabled} are disabled; enable_res_tuner({disabled!r}) before fusing them"
                )
        if names:
            fuse_res_tuner(self._res_tuner_denoiser, names, safe_fusing=safe_fusing)

    def unfuse_res_tuner(
        self, adapter_names: str | list[str] | None = None, accept_changed_weights: bool = False
    ) -> None:
        """Unfold fused tuners; they run as branches again. With ``adapter_names``, only those leave the weights
        (the other fused tuners stay fused).

        Exact beside a diffusers LoRA in any order of ``fuse_lora``/``unfuse_lora``: the weights become what the LoRA
        alone makes them (the original ones, bit for bit, when nothing else was fused in between). Refused, changing
        nothing, when a weight was changed while fused by something else (for example ``unload_lora_weights()`` of a
        LoRA loaded and fused after this tuner was fused); ``accept_changed_weights=True`` then subtracts exactly the
        tuners' delta and keeps the other change.
        """
        if not get_res_tuner_configs(self._res_tuner_denoiser):
            return
        names = None if adapter_names is None else self._check_names(adapter_names)
        unfuse_res_tuner(self._res_tuner_denoiser, names, accept_changed_weights=accept_changed_weights)

    # -- inspection -----------------------------------------------------------------------------------------------
    def get_res_tuners(self) -> dict[str, dict[str, Any]]:
        """Name -> ``{"config": ResTunerConfig, "scale": float, "enabled": bool, "fused": bool}`` of every loaded
        tuner."""
        denoiser = self._res_tuner_denoiser
        configs: dict[str, ResTunerConfig] = get_res_tuner_configs(denoiser)
        status = res_tuner_settings(denoiser)
        return {name: {"config": config, **status[name]} for name, config in configs.items()}

    # -- diffusers methods that cannot keep tuners: a clear error instead of a silent loss ------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, refused while res tuners are loaded: their weights would be written into
        the UNet's file, where ``from_pretrained`` drops them (and fused ones would become the base weights)."""
        self._refuse_saving("save_pretrained")
        super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """diffusers' ``push_to_hub``, refused like :meth:`save_pretrained` (before the Hub repo is created)."""
        self._refuse_saving("push_to_hub")
        return super().push_to_hub(*args, **kwargs)

    def _refuse_saving(self, method: str) -> None:
        # the denoiser's own guard refuses too, but only when diffusers reaches it, after the components it saves
        # first: checked here before anything is written
        if _loaded_names(self):
            error = save_pretrained_refusal(self._res_tuner_denoiser, method)
            if error is not None:
                raise error

    def fuse_qkv_projections(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' ``fuse_qkv_projections``, refused while res tuners are loaded: the fused ``to_qkv`` bypasses the
        ``to_q``/``to_k``/``to_v`` layers linear tuners sit on, and unfusing would not restore the tuners'
        processors."""
        loaded = _loaded_names(self)
        if loaded:
            raise ResTunerError(
                f"fuse_qkv_projections() is not supported while res tuners {loaded} are loaded; unload them first "
                "(SDPA attention is already memory-efficient)"
            )
        super().fuse_qkv_projections(*args, **kwargs)

    def _set_pag_attn_processor(self, *args: Any, **kwargs: Any) -> None:
        """Perturbed-attention guidance (diffusers' ``PAGMixin``, in its ``*PAGPipeline`` classes) with tuners.

        diffusers installs its PAG processors as ``attention.processor = ...``. torch refuses that over a processor
        that is a module, as ours is, so stock PAG pipelines raise a TypeError once a tuner sits on a perturbed
        self-attention. Here ours step aside for diffusers' assignment, then each PAG processor runs inside a
        processor of ours with the same tuners, so the tuners keep running on the perturbed layers. The pipeline's
        call ends with ``set_attn_processor(<the processors it read before>)``, which puts ours back as they were."""
        ours = {
            module: module.processor
            for module in self._res_tuner_denoiser.modules()
            if isinstance(getattr(module, "processor", None), ResTunerAttnProcessor)
        }
        for module, processor in ours.items():
            type(module).set_processor(module, processor.base_processor)  # not a module: assignable
        try:
            super()._set_pag_attn_processor(*args, **kwargs)
        finally:
            for module, processor in ours.items():
                installed = module.processor
                if installed is not processor.base_processor:
                    processor = processor.sharing_tuners_around(installed)
                type(module).set_processor(module, processor)

    # -- checks -------------------------------------------------------------------------------------------------
    def _check_names(self, adapter_name: str | list[str] | None) -> list[str]:
        """The loaded tuner names a request refers to (all for None); an error naming the ones not loaded."""
        loaded = list(get_res_tuner_configs(self._res_tuner_denoiser))
        if not loaded:
            raise ResTunerError("no res tuner is loaded on this pipeline; load one with pipe.load_res_tuner(...)")
        if adapter_name is None:
            return loaded
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(name, str) for name in names):
            raise ResTunerError(
                "adapter_name must be a loaded tuner's name, a non-empty list of names or None (all), got "
                f"{adapter_name!r}"
            )
        names = list(names)
        missing = [name for name in names if name not in loaded]
        if missing:
            raise ResTunerError(f"no tuner named {missing[0]!r} is loaded; loaded tuners (adapter names): {loaded}")
        return names

    def _refuse_fused(self, names: list[str], action: str, unless=None) -> None:
        status = res_tuner_settings(self._res_tuner_denoiser)
        fused = [name for name in names if status[name]["fused"] and not (unless and unless(status[name]))]
        if fused:
            raise ResTunerError(
                f"tuner(s) {fused} are fused into the UNet's weights; call pipe.unfuse_res_tuner() before {action}"
            )


def _check_weight(value: float) -> float:
    return check_scale(value, "a tuner scale")


def _expand_block_weights(unet: nn.Module, weights: dict, name: str) -> dict[str, float]:
    """A diffusers per-block scale dict -> ``{module path prefix: scale}``, expanded by diffusers' own
    ``_maybe_expand_lora_scales`` so that the two read the same dict the same way."""
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    check_layer_scales_apply(unet, name)  # before any tuner of the request changes, not midway through it
    if not hasattr(getattr(unet, "config", None), "layers_per_block") or not hasattr(unet, "down_blocks"):
        raise ConfigError(f"per-block scales for {name!r} need a UNet with down/mid/up blocks; pass one number")
    unknown = sorted(map(str, set(weights) - {"down", "mid", "up"}))
    if unknown:
        raise ConfigError(
            f"per-block scales for {name!r} have unknown key(s) {unknown}; the keys are 'down', 'mid' and 'up' "
            '(diffusers\' set_adapters form: {"down": s, "mid": s, "up": {"block_<i>": s or [s per transformer '
            "layer]}})"
        )
    for side, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        # diffusers reads only the blocks with attention layers and drops any other key unread: a typo or a block
        # without attentions would leave the user's scale unapplied without a word.
        if isinstance(weights.get(side), dict):
            with_attention = [f"block_{i}" for i, block in enumerate(blocks) if hasattr(block, "attentions")]
            unread = sorted(map(str, set(weights[side]) - set(with_attention)))
            if unread:
                raise ConfigError(
                    f"per-block scales for {name!r}: {side} {unread} name no {side} block with attention layers of "
                    f"this UNet; its {side} blocks with attentions are {with_attention}"
                )
    try:
        expanded = _maybe_expand_lora_scales(unet, [weights], default_scale=1.0)[0]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"per-block scales {weights!r} for {name!r}: {err}. The form is diffusers' set_adapters one: "
            '{"down": s, "mid": s, "up": {"block_<i>": s or [s per transformer layer]}}'
        ) from None
    return {path: _check_weight(value) for path, value in expanded.items()}


def _check_not_offloaded_to_meta(denoiser: nn.Module) -> None:
    """Sequential CPU offload keeps weights on the ``meta`` device between calls; a tuner built there would have no
    values, so refuse instead of loading into nothing."""
    if any(p.device.type == "meta" for p in denoiser.parameters()):
        raise ResTunerError(
            "the UNet's weights are on the 'meta' device (enable_sequential_cpu_offload or device_map); load res "
            "tuners before enabling sequential offload, or call pipe.remove_all_hooks() first"
        )


__all__ = [
    "DENOISER_ATTRIBUTES",
    "HUB_KWARGS",
    "ResTunerLoaderMixin",
    "denoiser_attribute",
    "denoiser_of",
    "resolve_tuner_source",
]
