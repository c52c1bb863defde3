"""The training core that ``train_dreambooth.py`` and ``train_text2img.py`` call: :func:`train`.

One step, the way it reads below: batch -> frozen VAE and text encoders -> noisy latents at random timesteps
(UNets) or the flow-matching interpolation (SD3, Flux) -> the denoiser, whose attention processors add the tuner's
branches -> the family's per-example loss (:class:`~.models.DenoiserFamily`), plus the DreamBooth prior loss ->
gradients in the fp32 tuner parameters only -> optimizer. The loop never asks which family it trains.

Everything distributed (DDP, gradient accumulation, mixed precision, checkpoints of optimizer and RNG states) is
accelerate's; run the scripts with ``accelerate launch`` for several GPUs or machines.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import time
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..hub import check_pretrained_source
from ..quiet import quiet_libraries
from .args import FP16_ON_CPU, args_to_json, tuner_config_from_args
from .checkpoint import (
    check_random_states,
    list_checkpoints,
    read_training_state,
    resolve_resume_checkpoint,
    save_checkpoint,
)
from .data import (
    DreamBoothDataset,
    EpochShuffleSampler,
    ImageTransform,
    RepeatedSource,
    SubsetSource,
    TextImageDataset,
    collate_examples,
    derive_seed,
    list_images,
    load_hf_dataset,
    read_image_folder,
)
from .errors import NonFiniteLossError, TrainingError
from .families import family_of
from .models import DenoiserFamily
from .prior import generate_class_images
from .publish import check_export_flags, create_hub_repo, finish_run, push_output_dir
from .trainable import ResTunerTrainable, TrainableProvider, TrainingCallback, TrainingSummary, parameters_are_finite
from .user_flags import INTERPOLATION_MODES, check_optimizer_package, make_optimizer
from .validation import log_validation

logger = logging.getLogger(__name__)


def train(
    args: Namespace, trainable: TrainableProvider | None = None, callbacks: Sequence[TrainingCallback] = ()
) -> Path:
    """Train what ``trainable`` provides as ``args`` (from :func:`~resattn_diffusion.training.args.parse_args`)
    say; returns the path of the saved result (:meth:`TrainableProvider.result_path`).

    ``trainable`` defaults to the res tuner the tuner flags describe (:class:`ResTunerTrainable`, saved as
    ``output_dir/res_tuner.safetensors``); any other :class:`TrainableProvider` trains through the same loop.
    ``callbacks`` are called with the provider's own (:class:`TrainingCallback`).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    # --- checks that need no model: fail before anything slow happens ---------------------------------------
    output_dir = Path(args.output_dir)
    quiet_libraries(training_log_file(output_dir, args), main_process=os.environ.get("RANK", "0") == "0")
    check_model_sources(args)
    if trainable is None:
        trainable = ResTunerTrainable(tuner_config_from_args(args))
    check_optional_packages(args)
    check_export_flags(args, getattr(trainable, "config", None))
    resume_folder = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
    check_output_dir(output_dir, trainable.result_path(output_dir), args.overwrite_output, resume_folder)
    resume_state = read_training_state(resume_folder) if resume_folder else None
    if resume_folder:
        trainable.check_resume(resume_folder)
    data_source = check_training_data(args)
    family = family_of(args)
    family.check_args(args)

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers_of(args.report_to),
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        # some tuners (a GLoRA supernet's sampled subnet) leave parameters unused in a step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    repo_id = create_hub_repo(args) if getattr(args, "push_to_hub", False) and accelerator.is_main_process else None
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise TrainingError(FP16_ON_CPU + " (fp16 came from the accelerate config)")
    if resume_folder is not None:  # before the model loads: a refused resume should cost nothing
        check_random_states(resume_folder, accelerator.process_index, args.allow_inexact_resume)
    seed = choose_seed(args, resume_state, accelerator)
    set_seed(seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # --- model, data, tuner -------------------------------------------------------------------------------
    resolution = args.resolution or family.native_resolution(args)
    if args.task == "dreambooth" and args.with_prior_preservation:
        generate_class_images(args, accelerator, resolution, seed)
    base = family.load(args, weight_dtype)
    if resolution % base.resolution_multiple:
        raise TrainingError(
            f"--resolution {resolution} is not a multiple of {base.resolution_multiple} (the VAE's factor"
            f"{' times the 2x2 patches' if base.resolution_multiple != base.vae_scale_factor else ''}); pick e.g. "
            f"{max(base.resolution_multiple, resolution - resolution % base.resolution_multiple)}"
        )
    dataset = make_dataset(args, data_source, resolution, seed)
    base.to(accelerator.device, weight_dtype)
    if args.task == "dreambooth":  # every prompt is known: encode once (a family may free its text encoders)
        known = [args.instance_prompt] + ([args.class_prompt] if args.with_prior_preservation else [])
        base.cache_prompts(known + base.validation_prompts(args), accelerator.device, args)
    parameters = trainable.prepare(base.denoiser, weight_dtype)
    callbacks = [*trainable.callbacks(base.denoiser, seed), *callbacks]
    if args.enable_xformers_memory_efficient_attention:
        base.denoiser.enable_xformers_memory_efficient_attention()  # the tuners wrap xformers' processor and stay
    if args.gradient_checkpointing:
        base.denoiser.enable_gradient_checkpointing()
    base.denoiser.train()

    sampler = EpochShuffleSampler(len(dataset), seed)
    dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate_examples,
        num_workers=args.dataloader_num_workers,
    )
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, parameters, learning_rate)
    denoiser, optimizer, dataloader = accelerator.prepare(base.denoiser, optimizer, dataloader)

    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr_scheduler = make_lr_scheduler(args, optimizer, max_train_steps, accelerator.num_processes)
    lr_scheduler = accelerator.prepare(lr_scheduler)
    trainable.register_checkpoint_hooks(accelerator, base.denoiser)

    global_step = 0
    if resume_folder is not None:
        accelerator.load_state(str(resume_folder))
        continue_lr_schedule(lr_scheduler.scheduler)
        global_step = int(resume_state["global_step"])
        logger.info("resumed from %s at step %d", resume_folder, global_step)
    # Only now is the output folder written to: a refused resume (a checkpoint of another base model, damaged
    # optimizer state) leaves the args.json and tuner_config.json of the run it belongs to as they were.
    if accelerator.is_main_process:
        write_run_files(output_dir, args, seed, base, resolution)
        trainable.write_config(output_dir)
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args, seed))
        logger.info(
            "%s%s | %d examples, %d batch(es) per epoch per process, batch %d x %d process(es) x %d accumulation, "
            "%d steps (%d epochs)\n%s",
            base.name.upper() + " ",
            base.path,
            len(dataset),
            len(dataloader),
            args.train_batch_size,
            accelerator.num_processes,
            args.gradient_accumulation_steps,
            max_train_steps,
            num_epochs,
            trainable.describe(base.denoiser, parameters),
        )
    first_epoch = global_step // steps_per_epoch
    batches_to_skip = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    last_checkpoint = resume_folder
    first_step, loop_start = global_step, time.perf_counter()

    # --- the loop -------------------------------------------------------------------------------------------
    progress = tqdm(
        total=max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    generator = torch.Generator(device=accelerator.device)
    try:
        for epoch in range(first_epoch, num_epochs):
            if global_step >= max_train_steps:
                break
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            loader, start = dataloader, 0
            if epoch == first_epoch and batches_to_skip:
                loader, start = accelerator.skip_first_batches(dataloader, batches_to_skip), batches_to_skip
            loader.set_epoch(epoch)
            step_loss = 0.0
            for batch_index, batch in enumerate(loader, start=start):
                # noise and timesteps depend only on (seed, process, epoch, batch): a resumed run draws the same ones
                generator.manual_seed(derive_seed(seed, "noise", accelerator.process_index, epoch, batch_index))
                # so are the draws from torch's global RNG inside the forward (tuner dropout): that RNG is also
                # advanced by DataLoader iteration, which a resumed run does differently
                seed_global_rng(seed, "forward", accelerator.process_index, epoch, batch_index)
                for callback in callbacks:
                    callback.on_step_begin(base.denoiser, global_step)
                with accelerator.accumulate(denoiser):
                    loss = diffusion_loss(args, base, denoiser, batch, resolution, weight_dtype, generator)
                    losses = accelerator.gather(loss.detach().reshape(1))
                    if not torch.isfinite(losses).all():
                        raise NonFiniteLossError(non_finite_message(losses, global_step, last_checkpoint))
                    step_loss += losses.mean().item() / args.gradient_accumulation_steps
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue

                global_step += 1
                learning_rate_now = lr_scheduler.get_last_lr()[0]
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{learning_rate_now:.2e}")
                accelerator.log({"train_loss": step_loss, "lr": learning_rate_now}, step=global_step)
                step_loss = 0.0

                if global_step % args.checkpointing_steps == 0:
                    if not parameters_are_finite(parameters):
                        raise NonFiniteLossError(non_finite_message(None, global_step, last_checkpoint))
                    last_checkpoint = save_checkpoint(
                        accelerator,
                        output_dir,
                        global_step,
                        args.checkpoints_total_limit,
                        {"seed": seed, "epoch": epoch},
                    )
                    if repo_id is not None and args.push_checkpoints_to_hub:
                        push_output_dir(
                            repo_id, output_dir, args.hub_token, f"checkpoint {global_step}", required=False
                        )
                validate_now = (
                    args.validation_prompt and args.validation_steps and global_step % args.validation_steps == 0
                )
                if validate_now and global_step < max_train_steps:  # the last step gets the final validation below
                    if accelerator.is_main_process:
                        log_validation(
                            accelerator,
                            base,
                            base.denoiser,
                            args,
                            resolution,
                            seed,
                            global_step,
                            f"step_{global_step:06d}",
                        )
                if global_step >= max_train_steps:
                    break

            validate_epoch = (
                args.validation_prompt and not args.validation_steps and (epoch + 1) % args.validation_epochs == 0
            )
            if validate_epoch and global_step < max_train_steps and accelerator.is_main_process:
                log_validation(
                    accelerator, base, base.denoiser, args, resolution, seed, global_step, f"epoch_{epoch + 1:04d}"
                )

        # --- the result ---------------------------------------------------------------------------------------
        progress.close()
        loop_seconds = time.perf_counter() - loop_start
        accelerator.wait_for_everyone()
        result = trainable.result_path(output_dir)
        if accelerator.is_main_process:
            if not parameters_are_finite(parameters):
                raise NonFiniteLossError(non_finite_message(None, global_step, last_checkpoint))
            trainable.save(base.denoiser, output_dir)
            logger.info("saved the %s result to %s", trainable.name, result)
            summary = TrainingSummary(
                output_dir, result, sum(p.numel() for p in parameters), global_step - first_step, loop_seconds
            )
            for callback in callbacks:
                callback.on_train_end(summary)
            if args.validation_prompt:
                log_validation(accelerator, base, base.denoiser, args, resolution, seed, global_step, "final")
            finish_run(args, trainable, result, base.denoiser, base.name, repo_id)
        accelerator.wait_for_everyone()
    finally:
        progress.close()
        accelerator.end_training()
    return result


# --- one step ------------------------------------------------------------------------------------------------
def seed_global_rng(*parts: object) -> None:
    """Seed torch's global RNG (CPU and every CUDA device) from ``parts`` only: ``nn.Dropout`` and any other draw
    that takes no generator then depend on (seed, process, epoch, batch), not on what ran before."""
    torch.manual_seed(derive_seed(*parts))


def diffusion_loss(
    args: Namespace,
    base: DenoiserFamily,
    denoiser: torch.nn.Module,
    batch: dict[str, Any],
    resolution: int,
    weight_dtype: torch.dtype,
    generator: torch.Generator,
) -> torch.Tensor:
    """The training loss of one batch: the family's per-example loss (noise prediction for UNets, rectified flow
    for SD3 / Flux), DreamBooth class examples weighted by ``--prior_loss_weight``."""
    per_example = base.per_example_loss(args, denoiser, batch, resolution, weight_dtype, generator)
    is_prior = batch["is_prior"].to(per_example.device)
    loss = per_example[~is_prior].mean()
    if is_prior.any():
        loss = loss + args.prior_loss_weight * per_example[is_prior].mean()
    return loss


def non_finite_message(losses: torch.Tensor | None, global_step: int, last_checkpoint: Path | None) -> str:
    what = f"the training loss is {losses.tolist()}" if losses is not None else "the tuner weights are NaN or infinite"
    kept = (
        f"the last good checkpoint is {str(last_checkpoint)!r}"
        if last_checkpoint
        else "no checkpoint was saved yet (see --checkpointing_steps)"
    )
    return (
        f"{what} at step {global_step + 1}: training stopped and no tuner was saved; {kept}. "
        "Lower --learning_rate, keep --max_grad_norm on, or use --mixed_precision bf16 instead of fp16."
    )


# --- setup helpers -------------------------------------------------------------------------------------------
def check_optional_packages(args: Namespace) -> None:
    """Optional packages a flag needs, checked before anything is loaded."""
    from diffusers.utils.import_utils import is_xformers_available

    check_optimizer_package(args)
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or drop the flag)")
    if args.enable_xformers_memory_efficient_attention and not is_xformers_available():
        raise TrainingError(
            "--enable_xformers_memory_efficient_attention needs xformers (GPU only): pip install xformers, or drop "
            "the flag"
        )
    trackers = trackers_of(args.report_to) or []
    if ("wandb" in trackers or trackers == "all") and importlib.util.find_spec("wandb") is None:
        raise TrainingError("--report_to wandb needs wandb: pip install wandb (or use --report_to tensorboard)")
    if (
        "tensorboard" in trackers
        and importlib.util.find_spec("tensorboard") is None
        and importlib.util.find_spec("tensorboardX") is None
    ):
        raise TrainingError(
            "--report_to tensorboard needs tensorboard: pip install tensorboard (or use --report_to none)"
        )


def trackers_of(report_to: str) -> list[str] | str | None:
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    if not names or names == ["none"]:
        return None
    return "all" if "all" in names else names


def check_output_dir(output_dir: Path, existing: Path, overwrite: bool, resume_folder: Path | None) -> None:
    """A result already in ``output_dir`` (at ``existing``) is replaced only with ``--overwrite_output`` or when
    that run is resumed."""
    if existing.exists() and not overwrite and resume_folder is None:
        raise TrainingError(
            f"{str(existing)!r} exists: --output_dir holds a trained tuner. Pass --overwrite_output to replace it, "
            "--resume_from_checkpoint latest to continue that run, or another --output_dir"
        )
    if resume_folder is None and list_checkpoints(output_dir):
        logger.warning("%s holds checkpoints of an earlier run; this new run saves its own beside them", output_dir)


def check_training_data(args: Namespace) -> Any:
    """Find the training data (folders listed, images' headers read, columns checked) before any model loads."""
    if args.task == "dreambooth":
        return list_images(args.instance_data_dir, "--instance_data_dir")
    if args.train_data_dir is not None:
        source = read_image_folder(args.train_data_dir, args.caption_column)
    else:
        source = load_hf_dataset(
            args.dataset_name, args.dataset_config_name, args.image_column, args.caption_column, args.cache_dir
        )
    if args.max_train_samples is not None and args.max_train_samples < len(source):
        source = SubsetSource(source, args.max_train_samples, args.seed or 0)
    return source


def make_dataset(args: Namespace, source: Any, resolution: int, seed: int) -> Any:
    transform = ImageTransform(
        resolution,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        interpolation=INTERPOLATION_MODES[getattr(args, "image_interpolation_mode", "bilinear")],
    )
    repeats = getattr(args, "repeats", 1)
    if args.task == "text2img":
        if repeats > 1:
            source = RepeatedSource(source, repeats)
        return TextImageDataset(source, transform, seed, caption_dropout=args.caption_dropout)
    class_images = None
    if args.with_prior_preservation:
        class_images = list_images(args.class_data_dir, "--class_data_dir")[: args.num_class_images]
    return DreamBoothDataset(
        list(source) * repeats,
        args.instance_prompt,
        transform,
        seed,
        class_images=class_images,
        class_prompt=args.class_prompt,
    )


def make_lr_scheduler(
    args: Namespace, optimizer: torch.optim.Optimizer, max_train_steps: int, num_processes: int
) -> Any:
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor (as in diffusers)
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


def continue_lr_schedule(scheduler: Any) -> None:
    """After loading a checkpoint, set the learning rate from *this* run's schedule at the resumed step.

    The optimizer state holds the learning rate the interrupted run's schedule gave; a resumed run with another
    ``--max_train_steps`` (3 steps, then resumed to 6) must continue the 6-step schedule, exactly as an
    uninterrupted 6-step run would. diffusers' schedulers are ``LambdaLR``: lr = base_lr * lambda(step).
    """
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    for group, base_lr, lr_lambda in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, lambdas):
        group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)


def choose_seed(args: Namespace, resume_state: dict[str, Any] | None, accelerator: Any) -> int:
    """``--seed``, else the seed of the resumed run, else a fresh one shared by all processes (and recorded)."""
    if args.seed is not None:
        if resume_state is not None and resume_state.get("seed") != args.seed:
            logger.warning(
                "--seed %d differs from the resumed run's seed %s: data order and noise change",
                args.seed,
                resume_state.get("seed"),
            )
        return args.seed
    if resume_state is not None and "seed" in resume_state:
        return int(resume_state["seed"])
    seed = [random.SystemRandom().randrange(2**31)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(seed)
    return seed[0]


def training_log_file(output_dir: Path, args: Namespace) -> Path:
    """Where library logs go (``output_dir/<logging_dir>/train.log``; one file per process under ``accelerate
    launch``), so that the console shows only the progress bar and our messages."""
    rank = os.environ.get("RANK", "0")
    name = "train.log" if rank == "0" else f"train-rank{rank}.log"
    return output_dir / args.logging_dir / name


def check_model_sources(args: Namespace) -> None:
    """The base model (and another VAE) exist locally or on a reachable Hub: offline, a missing one fails in a
    second with what to pass, instead of after huggingface_hub's retries."""
    check_pretrained_source(
        args.pretrained_model_name_or_path,
        "--pretrained_model_name_or_path",
        cache_dir=args.cache_dir,
        revision=args.revision,
    )
    if args.pretrained_vae_model_name_or_path is not None:
        check_pretrained_source(
            args.pretrained_vae_model_name_or_path,
            "--pretrained_vae_model_name_or_path",
            filename="config.json",
            cache_dir=args.cache_dir,
        )


def write_run_files(output_dir: Path, args: Namespace, seed: int, base: DenoiserFamily, resolution: int) -> None:
    """``args.json``: every flag, with the seed and resolution actually used."""
    output_dir.mkdir(parents=True, exist_ok=True)
    run = {**args_to_json(args), "seed": seed, "resolution": resolution, "model_type": base.name}
    with open(output_dir / "args.json", "w", encoding="utf-8") as f:
        json.dump(run, f, indent=2)


def tracker_config(args: Namespace, seed: int) -> dict[str, Any]:
    """Flags as tracker hyperparameters (TensorBoard takes only scalars and strings)."""
    values = {**args_to_json(args), "seed": seed}
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in values.items()}
