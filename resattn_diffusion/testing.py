"""Offline tiny Stable Diffusion models for tests, demos and benchmarks.

Why this module exists: the machines this project is developed and tested on cannot reach any model hub,
so no pretrained checkpoint (not even a tokenizer) can be downloaded. Everything that needs a Stable
Diffusion model builds one here, from configs, with seeded random weights:

- :func:`make_tokenizer` generates a small CLIP byte-level BPE vocabulary (``vocab.json`` / ``merges.txt``)
  and loads it as a :class:`transformers.CLIPTokenizer`.
- :func:`tiny_unet` / :func:`tiny_pipeline` build SD 1.x-, SD 2.x- and SDXL-shaped models that are tiny
  (a UNet forward takes milliseconds on CPU) but keep every structural feature the tuners care about:
  ``attn1`` / ``attn2`` / ``ff`` transformer blocks in down, mid and up blocks, SD 2's linear projections
  and per-block head counts, SDXL's two text encoders, added time conditions and multi-layer transformers.
- :func:`save_tiny_pipeline` writes an ordinary diffusers folder, loadable offline with ``from_pretrained``.
- ``SD15_UNET_CONFIG`` / ``SD21_UNET_CONFIG`` / ``SDXL_UNET_CONFIG`` are the real UNet architectures
  (public ``config.json`` values, no weights); :func:`unet_from_config` builds them on the ``meta`` device
  to count parameters without allocating memory.

This module imports nothing else from ``resattn_diffusion`` so that any part of the package (and its tests)
can depend on it.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = [
    "DEFAULT_WORDS",
    "DIT_KINDS",
    "KINDS",
    "TRANSFORMER_KINDS",
    "SD15_UNET_CONFIG",
    "SD21_UNET_CONFIG",
    "SDXL_UNET_CONFIG",
    "build_clip_vocab",
    "flux_transformer_inputs",
    "frozen_tiny_model",
    "make_t5_tokenizer",
    "make_tokenizer",
    "model_inputs",
    "present_targets",
    "save_tiny_dit_pipeline",
    "save_tiny_pipeline",
    "sd3_transformer_inputs",
    "tiny_dit_pipeline",
    "tiny_dit_transformer_overrides",
    "tiny_flux_transformer",
    "tiny_flux_transformer_config",
    "tiny_pipeline",
    "tiny_sd3_transformer",
    "tiny_sd3_transformer_config",
    "tiny_transformer",
    "tiny_unet",
    "tiny_unet_config",
    "unet_from_config",
    "unet_inputs",
]

#: Model families the tiny builders know.
KINDS: tuple[str, ...] = ("sd1", "sd2", "sdxl")


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"

#: Words that get a single whole-word token in every generated tokenizer (common prompt vocabulary of the
#: project's demos: digit prompts, DreamBooth-style "sks" prompts, styles and subjects).
DEFAULT_WORDS: tuple[str, ...] = (
    # function words
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "with",
    "and",
    "by",
    "for",
    "to",
    "is",
    # image words
    "photo",
    "picture",
    "image",
    "drawing",
    "painting",
    "sketch",
    "portrait",
    "render",
    "style",
    "art",
    "artwork",
    "illustration",
    "handwritten",
    "written",
    "digit",
    "number",
    "background",
    # digits as words (the characters 0-9 are single byte tokens already)
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    # subjects
    "sks",
    "dog",
    "cat",
    "person",
    "man",
    "woman",
    "face",
    "bird",
    "horse",
    "car",
    "house",
    "tree",
    "flower",
    "mountain",
    "city",
    "street",
    "forest",
    "beach",
    "sky",
    "sunset",
    "castle",
    "robot",
    "toy",
    # attributes and styles
    "red",
    "green",
    "blue",
    "black",
    "white",
    "yellow",
    "small",
    "big",
    "cute",
    "old",
    "new",
    "high",
    "quality",
    "detailed",
    "beautiful",
    "watercolor",
    "oil",
    "pencil",
    "cartoon",
    "anime",
    "realistic",
    "vintage",
    "van",
    "gogh",
    "monet",
)


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state (``AcceleratorState``, ``GradientState``), so that a test or run after
    another in the same process starts from a fresh ``Accelerator``."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: each of the 256 bytes maps to one printable unicode character.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...) are shifted to
    code points from 256 upwards so that no token ever contains whitespace or control characters.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    byte_values = list(printable)
    code_points = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + shift)
            shift += 1
    return {byte: chr(code_point) for byte, code_point in zip(byte_values, code_points)}


def _pretokenize(words: Sequence[str]) -> list[str]:
    """Split words the way CLIP's pre-tokenizer does and map them to the byte-level alphabet.

    Uses the normalizer and pre-tokenizer of a (vocabulary-free) CLIPTokenizer itself, so the pieces are exactly
    what the finished tokenizer will look up: lower-cased, split into letter runs / single digits /
    punctuation runs, bytes mapped to unicode characters.
    """
    backend = CLIPTokenizer(vocab={START_OF_TEXT: 0, END_OF_TEXT: 1}, merges=[]).backend_tokenizer
    pieces: list[str] = []
    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"make_tokenizer: words must be strings, got {word!r} ({type(word).__name__}).")
        normalized = backend.normalizer.normalize_str(word)
        pieces.extend(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized))
    return pieces


def _learn_whole_word_merges(pieces: Sequence[str]) -> list[tuple[str, str]]:
    """Learn BPE merges (plain BPE training) until every piece is a single ``piece</w>`` token.

    Each step merges the most frequent adjacent pair over the distinct pieces (ties broken by the pair's
    string order, so the result does not depend on the order of ``pieces``). Encoding a training piece with
    merges learned this way replays the training steps, hence every piece encodes to exactly one token.
    """
    # Symbols of every distinct piece; the last symbol carries the end-of-word marker as in CLIP.
    words = [list(piece[:-1]) + [piece[-1] + END_OF_WORD] for piece in sorted(set(pieces))]
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts: dict[tuple[str, str], int] = {}
        for symbols in words:
            for pair in zip(symbols[:-1], symbols[1:]):
                pair_counts[pair] = pair_counts.get(pair, 0) + 1
        if not pair_counts:
            return merges
        best_pair = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best_pair)
        merged_symbol = best_pair[0] + best_pair[1]
        for index, symbols in enumerate(words):
            new_symbols: list[str] = []
            position = 0
            while position < len(symbols):
                if position + 1 < len(symbols) and (symbols[position], symbols[position + 1]) == best_pair:
                    new_symbols.append(merged_symbol)
                    position += 2
                else:
                    new_symbols.append(symbols[position])
                    position += 1
            words[index] = new_symbols


def build_clip_vocab(words: Sequence[str] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Generate the contents of a CLIP ``vocab.json`` and ``merges.txt``.

    Layout follows OpenAI CLIP's: the 256 byte-level characters, the same 256 with the ``</w>`` end-of-word
    suffix, one token per learned merge, then ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids.
    The merges make every word of ``DEFAULT_WORDS + words`` a single whole-word token; any other text still
    encodes (down to single bytes), so the tokenizer never produces unknown tokens.

    Args:
        words: extra words that must be single tokens (lower-cased like CLIP; a word with punctuation or digits
            is split the way CLIP splits it and each piece becomes a token).

    Returns:
        ``(vocab, merges)``: token -> id, and the ordered merge pairs.
    """
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [symbol + END_OF_WORD for symbol in alphabet]:
        vocab[symbol] = len(vocab)
    merges = _learn_whole_word_merges(_pretokenize(list(DEFAULT_WORDS) + list(words)))
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab[START_OF_TEXT] = len(vocab)
    vocab[END_OF_TEXT] = len(vocab)
    return vocab, merges


def make_tokenizer(
    words: Sequence[str] = (),
    model_max_length: int = 77,
    pad_token: str = END_OF_TEXT,
) -> CLIPTokenizer:
    """A small CLIP BPE tokenizer generated offline (no hub download).

    The vocabulary (a few hundred tokens: 512 byte-level symbols, the merges of the whole words, 2 specials)
    is generated by :func:`build_clip_vocab`, written as ``vocab.json`` / ``merges.txt`` and loaded with
    ``CLIPTokenizer.from_pretrained`` -- the same route a downloaded SD tokenizer folder takes. In
    transformers 5, ``CLIPTokenizer`` is backed by the ``tokenizers`` library (no ``ftfy`` needed); the result
    round-trips through ``save_pretrained`` / ``from_pretrained(folder)``.

    Args:
        words: extra words that must be whole-word tokens, on top of :data:`DEFAULT_WORDS`.
        model_max_length: sequence length prompts are padded/truncated to (77 in every real SD model).
        pad_token: ``"<|endoftext|>"`` as in SD 1.x/2.x and SDXL's first tokenizer, or ``"!"`` as in SDXL's
            second tokenizer.

    Returns:
        The tokenizer; ``len(tokenizer)`` is the ``vocab_size`` a matching text encoder needs.
    """
    if not isinstance(model_max_length, int) or model_max_length < 2:
        raise ValueError(
            f"make_tokenizer: model_max_length must be an int >= 2 (room for start and end tokens), "
            f"got {model_max_length!r}."
        )
    if isinstance(words, str):
        raise TypeError("make_tokenizer: pass words as a sequence of strings, e.g. ('sks', 'dog'), not one string.")
    vocab, merges = build_clip_vocab(words)
    if pad_token not in vocab:
        raise ValueError(f"make_tokenizer: pad_token {pad_token!r} is not a token of the generated vocabulary.")
    with tempfile.TemporaryDirectory(prefix="resattn_tokenizer_") as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as vocab_file:
            json.dump(vocab, vocab_file, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as merges_file:
            merges_file.write("#version: 0.2\n")
            merges_file.writelines(f"{left} {right}\n" for left, right in merges)
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length, pad_token=pad_token)
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------------------

# Text encoder widths. They differ between kinds (and between SDXL's two encoders, and from SDXL's pooled
# projection) so that code which confuses one dimension with another fails on the tiny models too.
_SD1_TEXT_HIDDEN = 32
_SD2_TEXT_HIDDEN = 48
_SDXL_TEXT_HIDDEN = 32  # CLIP ViT-L role (768 in SDXL)
_SDXL_TEXT_2_HIDDEN = 64  # OpenCLIP ViT-bigG role (1280 in SDXL)
_SDXL_TEXT_2_PROJECTION = 40  # pooled text embedding fed to the UNet's added conditions (1280 in SDXL)
_SDXL_ADDITION_TIME_EMBED_DIM = 8  # 256 in SDXL
_SDXL_NUM_TIME_IDS = 6  # original size (2), crop top-left (2), target size (2)

# Seed offsets so every component of a pipeline gets its own, reproducible random stream and the UNet of
# ``tiny_pipeline(kind, seed)`` equals ``tiny_unet(kind, seed)``.
_UNET_SEED_OFFSET = 0
_VAE_SEED_OFFSET = 1
_TEXT_ENCODER_SEED_OFFSET = 2
_TEXT_ENCODER_2_SEED_OFFSET = 3

# Scheduler beta schedule shared by SD 1.x, 2.x and SDXL.
_SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"Unknown tiny model kind {kind!r}; choose one of {', '.join(KINDS)}.")


def tiny_unet_config(kind: str = "sd1") -> dict[str, Any]:
    """Config of the tiny UNet of ``kind`` (a fresh dict; see :func:`tiny_unet`)."""
    _check_kind(kind)
    common: dict[str, Any] = {
        "sample_size": 16,  # latents 16x16 -> 32x32 images with the tiny VAE
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
    }
    if kind == "sd1":
        # SD 1.x: attention in all but the lowest-resolution block, one head count everywhere (in diffusers'
        # legacy naming ``attention_head_dim`` is the number of heads), conv in/out projections.
        return {
            **common,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": _SD1_TEXT_HIDDEN,
            "attention_head_dim": 4,
        }
    if kind == "sd2":
        # SD 2.x: linear proj_in/proj_out and a head count per block (constant head size 16 here, 64 in SD 2).
        return {
            **common,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": _SD2_TEXT_HIDDEN,
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
        }
    # SDXL: no attention in the highest-resolution block, several transformer layers per block (2 in the
    # lower-resolution block and therefore in the mid block), linear projections, the concatenated hidden
    # states of two text encoders as context, and "text_time" added conditions (pooled text embedding of the
    # second encoder + Fourier embeddings of the 6 size/crop ids).
    return {
        **common,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": _SDXL_TEXT_HIDDEN + _SDXL_TEXT_2_HIDDEN,
        "attention_head_dim": (2, 4),
        "transformer_layers_per_block": (1, 2),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _SDXL_ADDITION_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": _SDXL_TEXT_2_PROJECTION
        + _SDXL_NUM_TIME_IDS * _SDXL_ADDITION_TIME_EMBED_DIM,
    }


def tiny_unet(kind: str = "sd1", seed: int = 0) -> UNet2DConditionModel:
    """A tiny UNet2DConditionModel of the ``kind`` family with seeded random weights.

    Every kind has transformer blocks (``attn1``, ``attn2``, ``ff``) in down, mid and up blocks; widths are
    (32, 64) channels on 16x16 latents, so a forward pass on a batch of 2 takes a few milliseconds on CPU.

    - ``"sd1"``: SD 1.x layout, conv ``proj_in``/``proj_out``, 4 heads everywhere, context width 32.
    - ``"sd2"``: SD 2.x layout, ``use_linear_projection=True``, per-block heads ``(2, 4)``, context width 48.
    - ``"sdxl"``: SDXL layout, ``transformer_layers_per_block=(1, 2)``, context width 96 (= 32 + 64, the two
      text encoders), ``addition_embed_type="text_time"`` with a 40-wide pooled text embedding.

    Args:
        kind: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        seed: seed of the weight initialisation; the global torch RNG state is left untouched.
    """
    config = tiny_unet_config(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _UNET_SEED_OFFSET)
        unet = UNet2DConditionModel(**config)
    return unet.eval()


def unet_inputs(
    unet: UNet2DConditionModel,
    batch_size: int = 2,
    seed: int = 0,
    tokens: int = 7,
) -> dict[str, Any]:
    """Seeded random keyword arguments for ``unet(**inputs)`` matching the UNet's config.

    Returns ``sample`` (latents), ``timestep`` (one integer timestep per sample, spread over [0, 1000)),
    ``encoder_hidden_states`` (a random text context) and, for SDXL-style UNets (``addition_embed_type ==
    "text_time"``), ``added_cond_kwargs`` with ``text_embeds`` and realistic ``time_ids`` (original size,
    crop top-left, target size). Floating tensors are in the UNet's dtype and on its device; the global torch
    RNG is not used.

    Args:
        unet: the UNet the inputs are for (e.g. from :func:`tiny_unet`).
        batch_size: number of samples.
        seed: seed of the random tensors.
        tokens: number of context tokens (77 in real SD prompts; 7 by default here because it is cheap and equals
            no other dimension of the tiny models, so a mixed-up axis fails loudly).
    """
    if batch_size < 1 or tokens < 1:
        raise ValueError(f"unet_inputs: batch_size and tokens must be >= 1, got {batch_size} and {tokens}.")
    config = unet.config
    generator = torch.Generator().manual_seed(seed)
    height = width = config.sample_size
    sample = torch.randn(batch_size, config.in_channels, height, width, generator=generator)
    timestep = torch.randint(0, 1000, (batch_size,), generator=generator)
    encoder_hidden_states = torch.randn(batch_size, tokens, config.cross_attention_dim, generator=generator)
    inputs: dict[str, Any] = {
        "sample": sample.to(unet.device, unet.dtype),
        "timestep": timestep.to(unet.device),
        "encoder_hidden_states": encoder_hidden_states.to(unet.device, unet.dtype),
    }
    if config.addition_embed_type == "text_time":
        text_embeds_dim = unet.add_embedding.linear_1.in_features - _SDXL_NUM_TIME_IDS * config.addition_time_embed_dim
        text_embeds = torch.randn(batch_size, text_embeds_dim, generator=generator)
        # Pixel sizes (latent size x 8, as with SDXL's VAE): original (h, w), crop top-left (0, 0), target (h, w).
        pixels = float(8 * height)
        time_ids = torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]]).repeat(batch_size, 1)
        inputs["added_cond_kwargs"] = {
            "text_embeds": text_embeds.to(unet.device, unet.dtype),
            "time_ids": time_ids.to(unet.device, unet.dtype),
        }
    return inputs


def _seeded_tiny_vae(seed: int, latent_channels: int, **config: Any) -> AutoencoderKL:
    """The two-block VAE (downsampling factor 2) of every tiny pipeline, its weights drawn from ``seed``;
    ``config``: the family's own settings (scaling factors, quant convs)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=32,
            **config,
        )
    return vae.eval()


def _tiny_vae(kind: str, seed: int) -> AutoencoderKL:
    """The tiny VAE with SD's (or SDXL's) 4 latent channels and latent scaling factor."""
    return _seeded_tiny_vae(seed + _VAE_SEED_OFFSET, 4, scaling_factor=0.13025 if kind == "sdxl" else 0.18215)


def _text_config(tokenizer: CLIPTokenizer, hidden_size: int, hidden_act: str, **extra: Any) -> CLIPTextConfig:
    """A 2-layer CLIP text config matching ``tokenizer`` (vocab size, special ids, sequence length).

    Two layers because SDXL (and ``clip_skip``) read the penultimate hidden state.
    """
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=hidden_act,
        # The pooled output is read at the first end-of-text token, found by this id.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _seeded_text_model(model_class: type, config: CLIPTextConfig, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()


def tiny_pipeline(kind: str = "sd1", seed: int = 0) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A complete tiny text-to-image pipeline of the ``kind`` family with seeded random weights.

    Components: :func:`tiny_unet`, a 2-block ``AutoencoderKL`` (images are 2x the latents: 32x32 pixels by
    default), 2-layer CLIP text encoder(s) and :func:`make_tokenizer` tokenizer(s), no safety checker.

    - ``"sd1"``: ``StableDiffusionPipeline``, 32-wide ``CLIPTextModel``, DDIM with epsilon prediction.
    - ``"sd2"``: ``StableDiffusionPipeline``, 48-wide ``CLIPTextModel``, DDIM with v-prediction.
    - ``"sdxl"``: ``StableDiffusionXLPipeline``, ``CLIPTextModel`` (32) + ``CLIPTextModelWithProjection``
      (64, projection 40), the second tokenizer padding with ``"!"`` as SDXL's does, Euler discrete scheduler.

    Generating with ``num_inference_steps=2`` takes a few hundredths of a second on CPU. Progress bars are off.

    Args:
        kind: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        seed: seed of all weight initialisations; the global torch RNG state is left untouched.
    """
    _check_kind(kind)
    unet = tiny_unet(kind, seed)
    vae = _tiny_vae(kind, seed)
    tokenizer = make_tokenizer()

    if kind == "sdxl":
        tokenizer_2 = make_tokenizer(pad_token="!")
        text_encoder = _seeded_text_model(
            CLIPTextModel,
            _text_config(tokenizer, _SDXL_TEXT_HIDDEN, "quick_gelu"),
            seed + _TEXT_ENCODER_SEED_OFFSET,
        )
        text_encoder_2 = _seeded_text_model(
            CLIPTextModelWithProjection,
            _text_config(tokenizer_2, _SDXL_TEXT_2_HIDDEN, "gelu", projection_dim=_SDXL_TEXT_2_PROJECTION),
            seed + _TEXT_ENCODER_2_SEED_OFFSET,
        )
        scheduler = EulerDiscreteScheduler(
            **_SD_BETAS,
            prediction_type="epsilon",
            steps_offset=1,
            timestep_spacing="leading",
            interpolation_type="linear",
        )
        pipeline = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        text_encoder = _seeded_text_model(
            CLIPTextModel,
            _text_config(
                tokenizer,
                _SD1_TEXT_HIDDEN if kind == "sd1" else _SD2_TEXT_HIDDEN,
                # CLIP ViT-L (SD 1.x) uses quick_gelu, OpenCLIP ViT-H (SD 2.x) plain gelu.
                "quick_gelu" if kind == "sd1" else "gelu",
            ),
            seed + _TEXT_ENCODER_SEED_OFFSET,
        )
        scheduler = DDIMScheduler(
            **_SD_BETAS,
            prediction_type="epsilon" if kind == "sd1" else "v_prediction",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_tiny_pipeline(kind: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write ``tiny_pipeline(kind, seed)`` as an ordinary diffusers folder and return its path.

    The folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``
    and for SDXL ``text_encoder_2/``, ``tokenizer_2/``; safetensors weights) loads offline with
    ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` / ``DiffusionPipeline.from_pretrained(folder)``
    and generates exactly what the in-memory pipeline generates.

    Args:
        kind: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        folder: target directory; created if missing. An existing diffusers folder in it is overwritten.
        seed: seed of all weight initialisations.
    """
    return _save_pipeline_folder(lambda: tiny_pipeline(kind, seed), folder, "save_tiny_pipeline")


def _save_pipeline_folder(build: Callable[[], Any], folder: str | os.PathLike, caller: str) -> Path:
    """``build()``'s pipeline saved to ``folder`` (safetensors); a path that is a file is refused before building."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{caller}: {folder} exists and is not a directory; pass a folder path.")
    build().save_pretrained(folder, safe_serialization=True)
    return folder


# --------------------------------------------------------------------------------------------------------------
# Real architectures (configs only, no weights)
# --------------------------------------------------------------------------------------------------------------

#: UNet of runwayml/stable-diffusion-v1-5 (``unet/config.json``): 859,520,964 parameters.
SD15_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

#: UNet of stabilityai/stable-diffusion-2-1 (768px, v-prediction; ``unet/config.json``): 865,910,724 parameters.
SD21_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True,
    "use_linear_projection": True,
}

#: UNet of stabilityai/stable-diffusion-xl-base-1.0 (``unet/config.json``): 2,567,463,684 parameters.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    # 1280 (pooled text embedding of OpenCLIP ViT-bigG) + 6 time ids * 256.
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}


def unet_from_config(config: dict[str, Any], device: str | torch.device = "meta") -> UNet2DConditionModel:
    """Build a UNet2DConditionModel from a config dict without loading weights.

    On the default ``"meta"`` device no memory is allocated: use it to count parameters or inspect the
    architecture of the real models (``SD15_UNET_CONFIG`` & co.). On ``"cpu"`` (or a GPU) the weights are
    randomly initialised (seed with ``torch.manual_seed`` beforehand for reproducibility).

    Args:
        config: a UNet ``config.json`` as a dict (not modified).
        device: where to create the parameters.
    """
    if not isinstance(config, dict):
        raise TypeError(
            f"unet_from_config: config must be a dict (e.g. SD15_UNET_CONFIG), got {type(config).__name__}."
        )
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(copy.deepcopy(config))
    except (ValueError, RuntimeError, TypeError, KeyError, IndexError) as err:  # diffusers' and torch's, raw
        from .tuners.base import ConfigError  # here, so that testing.py loads without the rest

        raise ConfigError(
            f"unet_from_config: this config does not build a UNet2DConditionModel ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no message'}); pass a UNet config.json as a dict, e.g. "
            "SD15_UNET_CONFIG"
        ) from None
    return unet.eval()


_FROZEN_UNETS: dict[tuple[str, int], UNet2DConditionModel] = {}


def frozen_tiny_unet(kind: str = "sd1", seed: int = 0) -> UNet2DConditionModel:
    """A fresh copy of the frozen (``requires_grad_(False)``) tiny UNet of ``kind``: built once per process, then
    deep-copied, so tests that change it stay independent of each other and cheap."""
    key = (kind, seed)
    if key not in _FROZEN_UNETS:
        unet = tiny_unet(kind, seed)
        unet.requires_grad_(False)
        _FROZEN_UNETS[key] = unet
    return copy.deepcopy(_FROZEN_UNETS[key])


def randomize_tuner(unet: torch.nn.Module, adapter_name: str = "default", seed: int = 0, std: float = 0.05) -> None:
    """Give a tuner trained-looking weights (seeded normal noise): at init every branch is zero, which would make
    checks such as fused == unfused or save/load round trips trivially exact."""
    from .integration.api import res_tuner_parameters  # here, so that testing.py loads without the rest

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in res_tuner_parameters(unet, adapter_name):
            parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * std)


# --- tiny diffusion transformers (SD3 / SD3.5 MMDiT, Flux) ---------------------------------------------------
#: Width of the tiny transformers' text context (CLIP-L + CLIP-G hidden states and T5 in SD3: 4096; Flux's T5: 4096).
TINY_TRANSFORMER_TEXT_DIM = 32
#: Width of the pooled text embedding (2048 in SD3, 768 in Flux).
TINY_TRANSFORMER_POOLED_DIM = 24
_TRANSFORMER_SEED_OFFSET = 3


def tiny_sd3_transformer_config(dual_attention: bool = False) -> dict[str, Any]:
    """Config of the tiny SD3 (``dual_attention=False``) or SD3.5 (``True``: ``attn2`` in the first block and
    RMS qk-norm) transformer: 2 joint blocks (the last one ``context_pre_only``, as in SD3), 2 heads of 8
    (inner width 16), 16 latent channels (as SD3's VAE), patch 2 on 8x8 latents (16 image tokens). A fresh dict."""
    config: dict[str, Any] = {
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": TINY_TRANSFORMER_TEXT_DIM,
        "caption_projection_dim": 16,  # = heads x head dim, as in SD3
        "pooled_projection_dim": TINY_TRANSFORMER_POOLED_DIM,
        "pos_embed_max_size": 16,
    }
    if dual_attention:
        config.update({"dual_attention_layers": (0,), "qk_norm": "rms_norm"})
    return config


def tiny_flux_transformer_config(guidance_embeds: bool = True) -> dict[str, Any]:
    """Config of the tiny Flux transformer: 1 double-stream ``FluxTransformerBlock`` and 2
    ``FluxSingleTransformerBlock``, 2 heads of 8 (rotary axes 2+2+4 = 8), 16 packed input channels (4 latent
    channels x 2x2 patches, as Flux packs its 16 x 2 x 2), guidance embedding as in FLUX.1-dev. A fresh dict."""
    return {
        "patch_size": 1,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": TINY_TRANSFORMER_TEXT_DIM,
        "pooled_projection_dim": TINY_TRANSFORMER_POOLED_DIM,
        "guidance_embeds": guidance_embeds,
        "axes_dims_rope": (2, 2, 4),
    }


def tiny_sd3_transformer(dual_attention: bool = False, seed: int = 0, **overrides: Any):
    """A tiny ``SD3Transformer2DModel`` with seeded random weights (see :func:`tiny_sd3_transformer_config`;
    ``overrides`` replace config entries). The global torch RNG state is left untouched."""
    from diffusers import SD3Transformer2DModel

    config = {**tiny_sd3_transformer_config(dual_attention), **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _TRANSFORMER_SEED_OFFSET)
        model = SD3Transformer2DModel(**config)
    return model.eval()


def tiny_flux_transformer(guidance_embeds: bool = True, seed: int = 0, **overrides: Any):
    """A tiny ``FluxTransformer2DModel`` with seeded random weights (see :func:`tiny_flux_transformer_config`;
    ``overrides`` replace config entries). The global torch RNG state is left untouched."""
    from diffusers import FluxTransformer2DModel

    config = {**tiny_flux_transformer_config(guidance_embeds), **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _TRANSFORMER_SEED_OFFSET)
        model = FluxTransformer2DModel(**config)
    return model.eval()


def sd3_transformer_inputs(
    model: torch.nn.Module, batch_size: int = 2, seed: int = 0, tokens: int = 7
) -> dict[str, Any]:
    """Seeded random keyword arguments for ``model(**inputs)`` of an ``SD3Transformer2DModel``: latents
    (B, C, H, W), a text context (B, tokens, joint_attention_dim), pooled projections and timesteps in [0, 1000)
    (as diffusers' SD3 pipeline passes them); in the model's dtype and on its device."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    size = config.sample_size
    tensors = {
        "hidden_states": torch.randn(batch_size, config.in_channels, size, size, generator=generator),
        "encoder_hidden_states": torch.randn(batch_size, tokens, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(batch_size, config.pooled_projection_dim, generator=generator),
    }
    inputs: dict[str, Any] = {key: value.to(model.device, model.dtype) for key, value in tensors.items()}
    inputs["timestep"] = (torch.rand(batch_size, generator=generator) * 1000).to(model.device)
    return inputs


def flux_transformer_inputs(
    model: torch.nn.Module, batch_size: int = 2, seed: int = 0, tokens: int = 7, height: int = 4, width: int = 4
) -> dict[str, Any]:
    """Seeded random keyword arguments for ``model(**inputs)`` of a ``FluxTransformer2DModel``: packed latents
    (B, height x width, in_channels), a text context, pooled projections, timesteps in [0, 1], the image and text
    position ids (rotary embeddings) and, with guidance embeds, a guidance scale; in the model's dtype/device."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "hidden_states": torch.randn(batch_size, height * width, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(batch_size, tokens, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(batch_size, config.pooled_projection_dim, generator=generator),
    }
    inputs: dict[str, Any] = {key: value.to(model.device, model.dtype) for key, value in tensors.items()}
    inputs["timestep"] = torch.rand(batch_size, generator=generator).to(model.device, model.dtype)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    inputs["img_ids"] = img_ids.reshape(height * width, 3).to(model.device, model.dtype)
    inputs["txt_ids"] = torch.zeros(tokens, 3).to(model.device, model.dtype)
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((batch_size,), 3.5).to(model.device, model.dtype)
    return inputs


#: The tiny diffusion transformers: SD3, SD3.5 (``attn2`` and qk-norm) and Flux.
TRANSFORMER_KINDS: tuple[str, ...] = ("sd3", "sd35", "flux")
_FROZEN_TRANSFORMERS: dict[tuple[str, int], torch.nn.Module] = {}


def tiny_transformer(kind: str = "sd3", seed: int = 0) -> torch.nn.Module:
    """The tiny transformer of ``kind`` (one of :data:`TRANSFORMER_KINDS`)."""
    if kind == "sd3":
        return tiny_sd3_transformer(seed=seed)
    if kind == "sd35":
        return tiny_sd3_transformer(dual_attention=True, seed=seed)
    if kind == "flux":
        return tiny_flux_transformer(seed=seed)
    raise ValueError(f"Unknown tiny transformer kind {kind!r}; choose one of {', '.join(TRANSFORMER_KINDS)}.")


def frozen_tiny_model(kind: str = "sd1", seed: int = 0) -> torch.nn.Module:
    """A fresh copy of the frozen tiny denoiser of ``kind``: a UNet (:data:`KINDS`) or a transformer
    (:data:`TRANSFORMER_KINDS`), built once per process and deep-copied (see :func:`frozen_tiny_unet`)."""
    if kind in KINDS:
        return frozen_tiny_unet(kind, seed)
    key = (kind, seed)
    if key not in _FROZEN_TRANSFORMERS:
        model = tiny_transformer(kind, seed)
        model.requires_grad_(False)
        _FROZEN_TRANSFORMERS[key] = model
    return copy.deepcopy(_FROZEN_TRANSFORMERS[key])


def model_inputs(model: torch.nn.Module, batch_size: int = 2, seed: int = 0) -> dict[str, Any]:
    """Seeded inputs for any tiny denoiser: :func:`unet_inputs`, :func:`sd3_transformer_inputs` or
    :func:`flux_transformer_inputs`, by the model's class."""
    name = type(model).__name__
    if name == "SD3Transformer2DModel":
        return sd3_transformer_inputs(model, batch_size, seed)
    if name == "FluxTransformer2DModel":
        return flux_transformer_inputs(model, batch_size, seed)
    return unet_inputs(model, batch_size, seed)


def present_targets(model: torch.nn.Module) -> tuple[str, ...]:
    """The targets of the model's family that exist in this model (e.g. ``attn2`` only on SD3.5-style blocks)."""
    from .integration.families import family_of  # here, so that testing.py loads without the rest

    family = family_of(model)
    blocks = family.blocks(model)
    return tuple(
        t for t in family.targets if any(family.operation(path, block, t) is not None for path, block in blocks)
    )


# --------------------------------------------------------------------------------------------------------------
# Tiny diffusion-transformer pipelines: SD3 (MMDiT) and Flux
# --------------------------------------------------------------------------------------------------------------

#: Diffusion-transformer families the tiny pipeline builders know.
DIT_KINDS: tuple[str, ...] = ("sd3", "flux")

# Widths of the tiny text encoders. As above they are all different, and the T5 width (the transformer's
# joint_attention_dim) is larger than the two CLIP widths together, as SD3's zero-padding of the CLIP states requires.
_SD3_CLIP_L_HIDDEN, _SD3_CLIP_L_PROJECTION = 32, 24  # CLIP ViT-L: 768, 768
_SD3_CLIP_G_HIDDEN, _SD3_CLIP_G_PROJECTION = 48, 40  # OpenCLIP ViT-bigG: 1280, 1280 (pooled: 768 + 1280 = 2048)
_FLUX_CLIP_HIDDEN = 40  # CLIP ViT-L: 768, its pooled output is Flux's pooled projection
_T5_WIDTH = 96  # T5-XXL: 4096
_DIT_LATENT_CHANNELS = 16
_DIT_VAE_SEED_OFFSET, _DIT_CLIP_SEED_OFFSET, _DIT_CLIP_2_SEED_OFFSET, _DIT_T5_SEED_OFFSET = 1, 2, 3, 4
# SD3's and Flux's VAE latent statistics (their vae/config.json)
_DIT_VAE_FACTORS = {
    "sd3": {"scaling_factor": 1.5305, "shift_factor": 0.0609},
    "flux": {"scaling_factor": 0.3611, "shift_factor": 0.1159},
}


def _check_dit_kind(kind: str) -> None:
    if kind not in DIT_KINDS:
        raise ValueError(f"Unknown tiny diffusion transformer kind {kind!r}; choose one of {', '.join(DIT_KINDS)}.")


def make_t5_tokenizer(words: Sequence[str] = (), model_max_length: int = 512) -> Any:
    """A small T5 (SentencePiece unigram) tokenizer generated offline.

    Vocabulary (case-sensitive, as T5's): ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2), ``▁``, one whole-word piece
    ``▁word`` per word of :data:`DEFAULT_WORDS` + ``words``, and every printable ASCII character alone and after ``▁``,
    so any ASCII text encodes without unknown tokens (other characters become ``<unk>``, as with T5's own vocabulary).
    Whole words get higher scores than their characters, so the unigram model picks them.
    """
    from transformers import T5TokenizerFast

    if isinstance(words, str):
        raise TypeError("make_t5_tokenizer: pass words as a sequence of strings, e.g. ('sks', 'dog'), not one string.")
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "\u2581": -2.0}
    for word in list(DEFAULT_WORDS) + [w.lower() for w in words]:
        pieces.setdefault("\u2581" + word, -1.0)
    for code in range(33, 127):
        character = chr(code)
        pieces.setdefault(character, -8.0)
        pieces.setdefault("\u2581" + character, -7.0)
    tokenizer = T5TokenizerFast(vocab=list(pieces.items()), extra_ids=0, model_max_length=model_max_length)
    return tokenizer


def _tiny_dit_vae(kind: str, seed: int) -> AutoencoderKL:
    """The tiny VAE with 16 latent channels and no quant convs, as SD3's and Flux's VAE."""
    return _seeded_tiny_vae(
        seed + _DIT_VAE_SEED_OFFSET,
        _DIT_LATENT_CHANNELS,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **_DIT_VAE_FACTORS[kind],
    )


def _tiny_t5(tokenizer: Any, seed: int) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_T5_WIDTH,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1 (T5-XXL) is gated
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    return model.eval()


def tiny_dit_transformer_overrides(kind: str = "sd3") -> dict[str, Any]:
    """What the transformer of a :func:`tiny_dit_pipeline` changes in :func:`tiny_sd3_transformer_config` /
    :func:`tiny_flux_transformer_config` so that it fits the pipeline's VAE and text encoders (a fresh dict).

    - ``"sd3"``: the SD3.5-featured transformer (``attn2`` in the first block, RMS q/k norm) on 16x16 latents
      (32x32 pixels); its text context is the T5 width and its pooled projection the two CLIP projections together.
    - ``"flux"``: 64 packed input channels (16 latent channels x 2 x 2, as Flux), the T5 width as text context and
      the CLIP width as pooled projection; guidance embedding of FLUX.1-dev.
    """
    _check_dit_kind(kind)
    text = {"joint_attention_dim": _T5_WIDTH}
    if kind == "sd3":
        return {**text, "sample_size": 16, "pooled_projection_dim": _SD3_CLIP_L_PROJECTION + _SD3_CLIP_G_PROJECTION}
    return {
        **text,
        "in_channels": 4 * _DIT_LATENT_CHANNELS,
        "out_channels": 4 * _DIT_LATENT_CHANNELS,
        "pooled_projection_dim": _FLUX_CLIP_HIDDEN,
    }


def _tiny_dit_transformer(kind: str, seed: int) -> torch.nn.Module:
    if kind == "sd3":
        return tiny_sd3_transformer(dual_attention=True, seed=seed, **tiny_dit_transformer_overrides(kind))
    return tiny_flux_transformer(guidance_embeds=True, seed=seed, **tiny_dit_transformer_overrides(kind))


def tiny_dit_pipeline(kind: str = "sd3", seed: int = 0) -> Any:
    """A complete tiny SD3 or Flux text-to-image pipeline with seeded random weights (the global RNG is untouched).

    - ``"sd3"``: ``StableDiffusion3Pipeline``: two ``CLIPTextModelWithProjection`` (CLIP-L and -G roles, read at the
      penultimate layer, pooled outputs concatenated), a T5 encoder, :func:`tiny_sd3_transformer` (SD3.5-featured,
      see :func:`tiny_dit_transformer_overrides`), a 16-channel VAE with SD3's scaling and shift factors,
      ``FlowMatchEulerDiscreteScheduler`` with shift 3. Default size 32x32 pixels.
    - ``"flux"``: ``FluxPipeline``: ``CLIPTextModel`` (pooled output) + T5, :func:`tiny_flux_transformer` with
      guidance embedding, Flux's VAE factors, the dynamically shifted flow-matching scheduler of FLUX.1-dev. Pass
      ``height``/``width`` when generating (Flux's default is 128 latents, 256 pixels here); multiples of 4.

    Tokenizers are generated (:func:`make_tokenizer`, :func:`make_t5_tokenizer`). Generating 32x32 images in two
    steps takes a few hundredths of a second on CPU. Progress bars are off.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    _check_dit_kind(kind)
    transformer = _tiny_dit_transformer(kind, seed)
    vae = _tiny_dit_vae(kind, seed)
    t5_tokenizer = make_t5_tokenizer()
    t5 = _tiny_t5(t5_tokenizer, seed + _DIT_T5_SEED_OFFSET)
    if kind == "sd3":
        tokenizer, tokenizer_2 = make_tokenizer(), make_tokenizer(pad_token="!")
        text_encoder = _seeded_text_model(
            CLIPTextModelWithProjection,
            _text_config(tokenizer, _SD3_CLIP_L_HIDDEN, "quick_gelu", projection_dim=_SD3_CLIP_L_PROJECTION),
            seed + _DIT_CLIP_SEED_OFFSET,
        )
        text_encoder_2 = _seeded_text_model(
            CLIPTextModelWithProjection,
            _text_config(tokenizer_2, _SD3_CLIP_G_HIDDEN, "gelu", projection_dim=_SD3_CLIP_G_PROJECTION),
            seed + _DIT_CLIP_2_SEED_OFFSET,
        )
        pipeline = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=t5,
            tokenizer_3=t5_tokenizer,
        )
    else:
        tokenizer = make_tokenizer()
        text_encoder = _seeded_text_model(
            CLIPTextModel, _text_config(tokenizer, _FLUX_CLIP_HIDDEN, "quick_gelu"), seed + _DIT_CLIP_SEED_OFFSET
        )
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_image_seq_len=256,
            max_image_seq_len=4096,
            base_shift=0.5,
            max_shift=1.15,
        )
        pipeline = FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=t5,
            tokenizer_2=t5_tokenizer,
            transformer=transformer,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_tiny_dit_pipeline(kind: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write ``tiny_dit_pipeline(kind, seed)`` as an ordinary diffusers folder (``model_index.json``,
    ``transformer/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/``, ``scheduler/``; safetensors) and return its path.

    It loads offline with ``StableDiffusion3Pipeline`` / ``FluxPipeline`` / ``DiffusionPipeline.from_pretrained``
    and generates exactly what the in-memory pipeline generates.
    """
    return _save_pipeline_folder(lambda: tiny_dit_pipeline(kind, seed), folder, "save_tiny_dit_pipeline")
