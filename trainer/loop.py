"""The training loop: accelerate, per-step seeding, D and G updates, NaN guard, EMA, logging, checkpoints, resume.

One optimizer step ``s`` (0-based; ``train.gradient_accumulation_steps`` = A batches):

1. Seed: the global torch RNG and one fresh CPU ``torch.Generator`` per sub-step are seeded from
   ``(train.seed, s, sub-step, batch)``, so a run resumed at ``s`` draws exactly what an uninterrupted one draws
   (no RNG state is saved).
2. Read A batches (the data order is a permutation per ``(seed, epoch)``; the position is saved) and encode them
   without grad: VAE latents (a posterior sample, or the cached posterior mean) and prompt embeddings.
3. If `LayoutDiffusionStep.is_adversarial_step` (every ``adversarial.lazy_every`` steps): ``discriminator_step`` on
   every batch (each backward scaled by 1/A), clip, step D's AdamW and its OneCycle schedule.
4. ``generator_step`` on every batch, clip, step the adapter's optimizer and LR schedule, update the EMA.
5. A non-finite loss or gradient norm skips that update (the gradients are dropped) and is counted.

Mixed precision runs through ``accelerator.autocast()``; with fp16, accelerate's grad scaler is used by both
optimizers. Several processes (``accelerate launch``) each read their share of every global batch; gradients are
averaged with an all-reduce before clipping (no DDP wrapper, so the step code sees the bare modules).

SIGINT/SIGTERM during `Trainer.run` (`_InterruptGuard`) are deferred to the end of the step in progress; then a
checkpoint is saved and `TrainingInterrupted` raised. A KeyboardInterrupt inside a step before its first optimizer
update abandons it (data position and D's BatchNorm statistics rewound, as for a sample that cannot be read), so the
checkpoint always holds whole steps and a resumed run matches an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..core.files import atomic_write_text
from ..core.logging import get_logger
from ..core.sampling import encode_prompts
from .build import (
    ParameterEMA,
    TrainingModels,
    build_discriminator_optimizer,
    build_generator_optimizer,
    build_lr_schedule,
    build_training_models,
    count_discriminator_updates,
    is_tensorboard_available,
)
from .checkpoint import (
    CheckpointState,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint_files,
    remove_leftovers,
    resolve_resume,
    save_checkpoint,
    set_aside_newer,
)
from .config import Config, ConfigError
from .data import EncodingCache, build_dataset
from .data.check import ReportingDataset, SampleReadError, check_dataset, collate_reporting, raise_if_failed
from .export import ExportResult, export_models
from .resume import (
    changes_header,
    check_output_folder,
    earlier_run_files,
    is_unsaved_run,
    move_earlier_run_aside,
    reconcile_resume_config,
)
from .step import LayoutDiffusionStep, encode_images

__all__ = [
    "EncodedBatch",
    "ResumableBatchSampler",
    "StepOutcome",
    "TrainResult",
    "Trainer",
    "TrainingInterrupted",
    "step_seed",
    "train",
]

logger = get_logger(__name__)

# Sub-step streams of `step_seed`.
_GLOBAL, _ENCODE, _DISC, _GEN, _INIT = 0, 1, 2, 3, 4


def step_seed(seed: int, step: int, stream: int, index: int = 0) -> int:
    """A 63-bit seed for one sub-step, independent across (seed, step, stream, index)."""
    state = np.random.SeedSequence([seed, step, stream, index]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def _generator(seed: int, step: int, stream: int, index: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, step, stream, index))


class ResumableBatchSampler(Sampler):
    """Endless batches of ``(index, epoch)`` pairs: a fresh permutation per ``(seed, epoch)``, resumable anywhere.

    Each process takes its slice of every global batch of ``batch_size × num_replicas`` samples; the last
    incomplete global batch of an epoch is dropped.

    Args:
        size (`int`): dataset length.
        batch_size (`int`): samples per batch per process.
        seed (`int`): the order's seed.
        num_replicas (`int`), rank (`int`): processes and this one's index.
        epoch (`int`), batch (`int`): the position of the first batch to yield (resume).
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        epoch: int = 0,
        batch: int = 0,
    ) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.batches_per_epoch = size // (batch_size * num_replicas)
        if self.batches_per_epoch < 1:
            raise ConfigError(
                f"train.batch_size={batch_size} x {num_replicas} process(es) is more than the {size} training samples; "
                "lower the batch size or add data"
            )
        self.epoch, self.batch = epoch, batch

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(step_seed(self.seed, epoch, 99))
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self):
        epoch, start = self.epoch, self.batch
        global_batch = self.batch_size * self.num_replicas
        while True:
            order = self.order(epoch)
            for b in range(start, self.batches_per_epoch):
                chunk = order[b * global_batch : (b + 1) * global_batch]
                mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
                yield [(i, epoch) for i in mine]
            epoch, start = epoch + 1, 0

    def advance(self, epoch: int, batch: int, count: int = 1) -> tuple[int, int]:
        """The position ``count`` batches after ``(epoch, batch)``."""
        total = epoch * self.batches_per_epoch + batch + count
        return divmod(total, self.batches_per_epoch)


@dataclass
class EncodedBatch:
    """One encoded batch: latents `(B, 4, h, w)` float32, labels `(B, H, W)` int64, text `(B, T, D)`."""

    latents: torch.Tensor
    labels: torch.Tensor
    text: torch.Tensor


@dataclass
class StepOutcome:
    """One optimizer step: its index, mean loss terms over the batches, and what the NaN guard skipped."""

    step: int
    terms: dict[str, float]
    skipped: bool = False
    d_skipped: bool = False
    adversarial: bool = False
    lr: float = 0.0
    seconds: float = 0.0  # wall time of the step (data, forward, backward, optimizer)


@dataclass
class TrainResult:
    """What `Trainer.run` did."""

    steps_done: int
    skipped_steps: int
    history: list[StepOutcome] = field(default_factory=list)
    checkpoint: Path | None = None
    export: ExportResult | None = None
    validations: list[Any] = field(default_factory=list)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped `Trainer.run`; ``checkpoint`` holds the ``step`` steps done (None when a
    second interrupt stopped its save too). A KeyboardInterrupt, so a caller that does not catch it still stops."""

    def __init__(
        self, step: int, checkpoint: Path | None, latest: Path | None = None, *, broken: bool = False
    ) -> None:
        self.step, self.checkpoint, self.latest, self.broken = step, checkpoint, latest, broken
        super().__init__(self.describe())

    def describe(self) -> str:
        if self.checkpoint is not None:
            return (
                f"interrupted at step {self.step}; checkpoint {self.checkpoint} saved; continue with --resume latest"
            )
        if self.latest is not None:
            kept = f"the newest checkpoint is {self.latest}; continue with --resume latest"
        else:
            kept = "no checkpoint was saved; run again to start afresh"
        how = "during that step's optimizer update" if self.broken else "again during the checkpoint save"
        return f"interrupted at step {self.step} ({how}; nothing half-written is left); {kept}"


def _ignore_sigint_in_worker(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops at a step boundary and saves."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _InterruptGuard:
    """While training: SIGINT/SIGTERM only set ``requested``; the loop stops after the step in progress.

    A second signal while a step reads or computes (before its first optimizer update) raises KeyboardInterrupt at
    once (the step is abandoned and rewound); during the updates it is deferred so the saved state stays whole.
    Handlers are installed only in the main thread (Python allows no other) and restored on exit.
    """

    def __init__(self) -> None:
        self.requested = False
        self.committing = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and not self.committing:
            raise KeyboardInterrupt
        if not self.requested:
            logger.warning("interrupt received: stopping after the step in progress, then saving a checkpoint")
        self.requested = True

    def __enter__(self) -> _InterruptGuard:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def _mean_terms(results) -> dict[str, float]:
    keys = {k for r in results for k in r.terms}
    return {k: float(np.mean([r.terms[k] for r in results if k in r.terms])) for k in sorted(keys)}


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class Trainer:
    """A training run of ``config`` (see the module docstring); `run` trains, `train` is the one-call form.

    Before anything is written: an output folder holding an earlier run is refused unless resuming or
    ``overwrite`` (`layout2image.trainer.resume`); on resume the checkpoint is read in full and the requested config
    is checked against the saved one (only `RESUMABLE` settings may differ); the dataset is checked
    (`layout2image.trainer.data.check`). Then the config is written and the models load.

    Args:
        config (`Config`): a complete config (`Config.check_ready` is called first, before any model loads).
        overwrite (`bool`, defaults to False): start afresh in an output folder that holds an earlier run; its
            files are moved to ``<output>/replaced-<time>/``, deleted after this run's first checkpoint.
    """

    def __init__(self, config: Config, *, overwrite: bool = False) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        config.check_ready()
        t = config.train
        self.output = Path(t.output_dir)
        earlier = check_output_folder(self.output, resume=bool(t.resume), overwrite=overwrite)
        if not t.resume and not earlier and is_unsaved_run(self.output):
            logger.info(
                "%s holds the config.yaml of a run stopped before its first checkpoint (nothing trained to keep); "
                "starting afresh there",
                self.output,
            )
        checkpoint = None
        self.config_changes: list[dict[str, Any]] = []
        if t.resume:
            folder = resolve_resume(t.resume, self.output)
            own = earlier_run_files(self.output)
            if own and folder.resolve().parent != (self.output / "checkpoints").resolve():
                raise FileExistsError(
                    f"--resume {t.resume!r} is a checkpoint of another run, and --output {str(self.output)!r} holds "
                    f"a run of its own ({', '.join(own)}); resume into the checkpoint's run folder, or into a new "
                    "--output"
                )
            checkpoint = (folder, *load_checkpoint_files(folder))
            config, changes = reconcile_resume_config(config, folder, checkpoint[1])
            self.config_changes = [*checkpoint[1].config_changes, *(c.to_dict() for c in changes)]
        self.config = config
        t = config.train
        self.config_hash = config.hash()
        use_cpu = t.cpu or not torch.cuda.is_available()
        if use_cpu and t.precision == "fp16":
            raise ConfigError("train.precision='fp16' needs a CUDA GPU; on the CPU use 'no' (fp32) or 'bf16'")
        self.tensorboard = t.tensorboard and is_tensorboard_available()
        if t.tensorboard and not self.tensorboard:
            logger.info("TensorBoard is not installed (pip install tensorboard): no TensorBoard logs for this run")
        self.accelerator = Accelerator(
            mixed_precision=t.precision,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            project_config=ProjectConfiguration(project_dir=str(self.output), logging_dir=str(self.output / "logs")),
            log_with="tensorboard" if self.tensorboard else None,
            cpu=use_cpu,
        )
        self.device = self.accelerator.device
        if self.device.type == "cuda" and t.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        main = self.accelerator.is_main_process

        # Data first (cheap, and its label set decides the models); every sample is read once before any write.
        self.dataset = build_dataset(config.data)
        label_set = self.dataset.label_set
        v = config.validation
        self.val_dataset = build_dataset(config.data, validation=True) if (v.every or v.at_end or v.at_start) else None
        cache_dir = Path(t.cache_dir) if t.cache_dir else self.output / "cache"
        check_dataset(self.dataset, cache_dir=cache_dir, progress=main)
        if self.val_dataset is not None and self.val_dataset.files != self.dataset.files:
            check_dataset(self.val_dataset, cache_dir=cache_dir, what="validation", progress=main)

        self._replaced = None
        if main:
            self.output.mkdir(parents=True, exist_ok=True)
            self._replaced = move_earlier_run_aside(self.output, earlier)
            remove_leftovers(self.output / "checkpoints")
            if checkpoint is not None:  # newer checkpoints than the resumed one: an abandoned branch, kept aside
                set_aside_newer(checkpoint[0])
            config.save(self.output / "config.yaml", header=changes_header(self.config_changes))
        # New weights (hint encoders, T2I-Adapters, the discriminator) draw from the global RNG: same seed, same init.
        torch.manual_seed(step_seed(t.seed, 0, _INIT))
        self.models: TrainingModels = build_training_models(config, label_set, self.device, cache_dir=cache_dir)
        self.step_fn = LayoutDiffusionStep(
            self.models.bundle.unet,
            self.models.bundle.noise_scheduler,
            self.models.conditioner,
            config.adversarial,
            discriminator=self.models.discriminator,
            decoder=self.models.decoder,
            ignore_index=label_set.ignore_index,
        )
        self.g_opt = self.accelerator.prepare_optimizer(
            build_generator_optimizer(self.models.parameters, config.optim)
        )
        self.g_sched = build_lr_schedule(self.g_opt.optimizer, config.optim, t.steps)
        self.d_opt = self.d_sched = None
        if self.models.discriminator is not None:
            d_opt, self.d_sched = build_discriminator_optimizer(
                self.models.discriminator,
                config.discriminator,
                count_discriminator_updates(t.steps, config.adversarial),
            )
            self.d_opt = self.accelerator.prepare_optimizer(d_opt)
        self.ema = ParameterEMA(self.models.trainable, t.ema_decay) if t.ema else None
        self.cache = None
        if t.cache_encodings:
            b = self.models.bundle
            self.cache = EncodingCache(
                cache_dir,
                image_encoder_id=f"{b.source}|vae|{b.scaling_factor}|{b.dtype}|mean",
                text_encoder_id=f"{b.source}|text_encoder|{b.dtype}",
            )
        self.validator = None
        if self.val_dataset is not None:
            from .validation import Validator

            self.validator = Validator(v, self.val_dataset, self.models, self.device)

        self.step = 0
        self.skipped_steps = 0
        self.position = (0, 0)  # (epoch, batch) of the next batch
        if checkpoint is not None:
            self._resume(*checkpoint)
        self.sampler = ResumableBatchSampler(
            len(self.dataset),
            t.batch_size,
            t.seed,
            num_replicas=self.accelerator.num_processes,
            rank=self.accelerator.process_index,
            epoch=self.position[0],
            batch=self.position[1],
        )
        self._loader = DataLoader(
            ReportingDataset(self.dataset),  # a sample that fails now arrives as a message (SampleReadError)
            batch_sampler=self.sampler,
            collate_fn=collate_reporting,
            num_workers=t.num_workers,
            worker_init_fn=_ignore_sigint_in_worker if t.num_workers > 0 else None,
            persistent_workers=t.num_workers > 0,
            pin_memory=self.device.type == "cuda",
            # Its own generator: making the iterator must not draw from the global RNG (seeded per step).
            generator=torch.Generator().manual_seed(t.seed),
        )
        self._batches = None
        self._guard = _InterruptGuard()
        self._step_broken = False

    # ------------------------------------------------------------------ resume / checkpoints
    def _resume(self, folder: Path, state: CheckpointState, tensors: dict, objects: dict) -> None:
        """Load a checkpoint read (and its config checked) before the models were built."""
        self.models.load_trainable_state_dict(tensors["trainable"])
        self.g_opt.load_state_dict(objects["g_optimizer"])
        self.g_sched.load_state_dict(objects["g_schedule"])
        if self.models.discriminator is not None:
            if "discriminator" not in tensors:
                raise ValueError(f"{folder} has no discriminator weights; it was written without adversarial training")
            self.models.discriminator.load_state_dict(tensors["discriminator"])
            self.d_opt.load_state_dict(objects["d_optimizer"])
            self.d_sched.load_state_dict(objects["d_schedule"])
        if self.ema is not None:
            if "ema" in tensors:
                self.ema.load_state_dict(tensors["ema"], state.ema_updates)
            else:
                logger.warning("%s has no EMA weights; the EMA restarts from the current weights", folder)
        if self.accelerator.scaler is not None and objects.get("scaler"):
            self.accelerator.scaler.load_state_dict(objects["scaler"])
        self.step, self.skipped_steps = state.step, state.skipped_steps
        self.position = (state.epoch, state.batch)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", folder, state.step, state.epoch, state.batch)

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current state (main process; every process waits for it)."""
        self.accelerator.wait_for_everyone()
        path = None
        if self.accelerator.is_main_process:
            t = self.config.train
            tensors = {"trainable": self.models.trainable_state_dict()}
            objects: dict[str, Any] = {
                "g_optimizer": self.g_opt.state_dict(),
                "g_schedule": self.g_sched.state_dict(),
                "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
            }
            if self.models.discriminator is not None:
                tensors["discriminator"] = self.models.discriminator.state_dict()
                objects["d_optimizer"] = self.d_opt.state_dict()
                objects["d_schedule"] = self.d_sched.state_dict()
            if self.ema is not None:
                tensors["ema"] = self.ema.state_dict()
            state = CheckpointState(
                step=self.step,
                epoch=self.position[0],
                batch=self.position[1],
                skipped_steps=self.skipped_steps,
                config_hash=self.config_hash,
                ema_updates=self.ema.num_updates if self.ema is not None else 0,
                config_changes=list(self.config_changes),
            )
            extra = (lambda folder: self.export(folder / "export")) if t.export_on_checkpoint else None
            path = save_checkpoint(
                self.output / "checkpoints",
                state,
                tensors,
                objects,
                write_extra=extra,
                keep_last=t.keep_last,
                config_yaml=(changes_header(self.config_changes) or "") + self.config.to_yaml(),
            )
            if self._replaced is not None:  # --overwrite: the new run has its own checkpoint now
                import shutil

                shutil.rmtree(self._replaced, ignore_errors=True)
                logger.info("removed the replaced earlier run %s", self._replaced)
                self._replaced = None
        self.accelerator.wait_for_everyone()
        return path

    def export(self, folder: Path) -> ExportResult:
        """Write the export files (with the EMA weights swapped in when ``export.use_ema``)."""
        use_ema = self.ema is not None and self.config.export.use_ema
        if use_ema:
            self.ema.swap(self.models.parameters)
        try:
            result = export_models(self.models, folder, self.config, config_hash=self.config_hash, step=self.step)
        finally:
            if use_ema:
                self.ema.swap(self.models.parameters)
        if self.config_changes:  # the manifest also records the settings changed on resume
            manifest_path = Path(folder) / "manifest.json"
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            manifest["config_changes"] = list(self.config_changes)
            atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
        return result

    # ------------------------------------------------------------------ one step
    def _next_batch(self) -> dict[str, Any]:
        if self._batches is None:
            self._batches = iter(self._loader)
        batch = next(self._batches)
        raise_if_failed(batch, self.step)
        self.position = self.sampler.advance(*self.position)
        return batch

    @torch.no_grad()
    def encode(self, batch: dict[str, Any], generator: torch.Generator) -> EncodedBatch:
        """Latents, labels and prompt embeddings of a collated batch (no grad; cached when configured)."""
        b, t = self.models.bundle, self.config.train
        captions = list(batch["caption"])
        if t.empty_prompt_prob > 0:
            draws = torch.rand(len(captions), generator=generator).tolist()
            captions = ["" if d < t.empty_prompt_prob else c for d, c in zip(draws, captions)]
        if self.cache is not None:

            def mean_latents(x: torch.Tensor) -> torch.Tensor:
                dist = b.vae.encode(x.to(self.device, b.vae.dtype)).latent_dist
                return (dist.mean * b.scaling_factor).float()

            latents = self.cache.latents(batch, mean_latents, device=self.device)
            text = self.cache.text_embeddings(
                captions, lambda c: encode_prompts(b.text_encoder, b.tokenizer, c), device=self.device
            )
        else:
            latents = encode_images(b.vae, batch["pixel_values"].to(self.device), generator)
            text = encode_prompts(b.text_encoder, b.tokenizer, captions, device=self.device)
        return EncodedBatch(latents.float(), batch["labels"].to(self.device), text)

    def _backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def _finish_update(self, optimizer, parameters, max_norm: float | None) -> bool:
        """Sync, unscale and clip gradients; False when the norm is not finite (with fp16 the grad scaler decides)."""
        if self.accelerator.num_processes > 1:
            for p in parameters:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(self.accelerator.num_processes)
        self.accelerator.unscale_gradients(optimizer=optimizer)
        grads = [p for p in parameters if p.grad is not None]
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
        else:
            norm = (
                torch.linalg.vector_norm(torch.stack([g.grad.detach().float().norm() for g in grads])) if grads else 0
            )
        if not math.isfinite(float(norm)):
            if self.accelerator.scaler is not None:
                return True  # the grad scaler skips the step and lowers its scale
            return False
        return True

    def train_step(self) -> StepOutcome:
        """Run optimizer step ``self.step`` (see the module docstring) and advance the counters."""
        s, seed = self.step, self.config.train.seed
        if self._batches is None:  # before seeding: starting workers must not shift this step's draws
            self._batches = iter(self._loader)
        torch.manual_seed(step_seed(seed, s, _GLOBAL))
        position = self.position
        disc = self.models.discriminator
        # D's BatchNorm running statistics change in its forward passes: kept to put back if the step is abandoned.
        buffers = {name: b.detach().clone() for name, b in disc.named_buffers()} if disc is not None else {}
        try:
            return self._train_step(position, buffers)
        except BaseException:
            if self._guard.committing:
                self._step_broken = True  # interrupted between its optimizer updates: no consistent state to save
                raise
            # Nothing was updated yet (a sample that cannot be read, an interrupt): put back what the step changed;
            # a checkpoint now resumes this step from its first batch.
            self.position, self._batches = position, None
            with torch.no_grad():
                for name, b in disc.named_buffers() if disc is not None else ():
                    b.copy_(buffers[name])
            self.g_opt.zero_grad(set_to_none=True)
            if self.d_opt is not None:
                self.d_opt.zero_grad(set_to_none=True)
            raise
        finally:
            self._guard.committing = False

    def _train_step(self, position: tuple[int, int], buffers: dict[str, torch.Tensor]) -> StepOutcome:
        s, t = self.step, self.config.train
        seed, accumulation = t.seed, t.gradient_accumulation_steps
        batches = [self.encode(self._next_batch(), _generator(seed, s, _ENCODE, k)) for k in range(accumulation)]
        adversarial = self.step_fn.is_adversarial_step(s)
        autocast = self.accelerator.autocast
        terms: dict[str, float] = {}
        d_skipped = False
        if adversarial:
            disc = self.models.discriminator
            d_results = []
            for k, mb in enumerate(batches):
                with autocast():
                    r = self.step_fn.discriminator_step(
                        mb.latents, mb.labels, mb.text, _generator(seed, s, _DISC, k), self._backward
                    )
                d_results.append(r)
                if r.skipped:
                    break
            d_skipped = any(r.skipped for r in d_results)
            d_params = [p for p in disc.parameters() if p.requires_grad]
            if not d_skipped:
                d_skipped = not self._finish_update(self.d_opt, d_params, self.config.discriminator.max_grad_norm)
            if not d_skipped:
                self._guard.committing = True  # from here on the step is finished, not abandoned
                self.d_opt.step()
                d_skipped = self.d_opt.step_was_skipped  # fp16: the grad scaler found inf/NaN gradients
            if not d_skipped:
                # A run extended past its D schedule stays at the schedule's end.
                if self.d_sched.last_epoch < self.d_sched.total_steps:
                    self.d_sched.step()
            else:
                with torch.no_grad():
                    for name, b in disc.named_buffers():
                        b.copy_(buffers[name])
            self.d_opt.zero_grad(set_to_none=True)
            terms.update(_mean_terms(d_results))
            terms["d_lr"] = self.d_opt.param_groups[0]["lr"]
        g_results = []
        for k, mb in enumerate(batches):
            with autocast():
                r = self.step_fn.generator_step(
                    mb.latents, mb.labels, mb.text, s, _generator(seed, s, _GEN, k), self._backward
                )
            g_results.append(r)
            if r.skipped:
                break
        skipped = any(r.skipped for r in g_results)
        self._guard.committing = True
        if not skipped:
            skipped = not self._finish_update(self.g_opt, self.models.parameters, self.config.optim.max_grad_norm)
        lr = self.g_opt.param_groups[0]["lr"]
        if not skipped:
            self.g_opt.step()
            skipped = self.g_opt.step_was_skipped
        if not skipped and self.ema is not None:
            self.ema.update(self.models.parameters)
        self.g_opt.zero_grad(set_to_none=True)
        self.g_sched.step()
        if skipped or d_skipped:
            self.skipped_steps += 1
            logger.warning(
                "step %d: non-finite %s; update skipped (%d skipped so far)",
                s,
                "generator loss/gradient" if skipped else "discriminator loss/gradient",
                self.skipped_steps,
            )
        terms.update(_mean_terms(g_results))
        self.step += 1
        return StepOutcome(s, terms, skipped, d_skipped, adversarial, lr)

    # ------------------------------------------------------------------ the run
    def validate(self):
        folder = self.output / "validation" / f"step_{self.step:06d}"
        result = self.validator.run(self.step, folder, autocast=self.accelerator.autocast)
        if self.tensorboard:
            scalars = (
                {} if result.miou is None else {"val/miou": result.miou, "val/pixel_accuracy": result.pixel_accuracy}
            )
            self.accelerator.log(scalars, step=self.step)
            tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
            tracker.add_image("validation", result.grid, self.step, dataformats="HWC")
        return result

    def run(self, stop_at: int | None = None) -> TrainResult:
        """Train until ``train.steps`` (or ``stop_at`` steps, e.g. a time-boxed or test run), then checkpoint.

        Validation, checkpoints and exports happen at their intervals; at ``train.steps`` the final checkpoint,
        validation (``validation.at_end``) and ``<output>/export`` are written.
        """
        from tqdm.auto import tqdm

        t, v = self.config.train, self.config.validation
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        result = TrainResult(self.step, self.skipped_steps)
        if self.tensorboard:
            self.accelerator.init_trackers("layout2image")
            self.accelerator.get_tracker("tensorboard", unwrap=True).add_text(
                "config", f"```\n{self.config.to_yaml()}```"
            )
        main = self.accelerator.is_main_process
        if self.validator is not None and v.at_start and self.step == 0 and main:
            result.validations.append(self.validate())
        bar = tqdm(total=t.steps, initial=self.step, desc="train", disable=not main, dynamic_ncols=True)
        last_checkpoint = None
        guard = self._guard
        guard.requested = False
        self._last_checkpoint = None
        with guard:
            try:
                last_checkpoint = self._loop(result, bar, end)
                # The final save, under the guard: an interrupt during it lets it finish first.
                if self.step < t.steps:  # stopped early: keep the state so the run can resume
                    if last_checkpoint is None or checkpoint_step(last_checkpoint) != self.step:
                        last_checkpoint = self.save_checkpoint()
                else:
                    last_checkpoint = self.save_checkpoint()
                if guard.requested:
                    raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise self._interrupted(bar, last_checkpoint or self._last_checkpoint) from None
            except Exception:
                if not guard.requested:
                    raise
                # A DataLoader worker stopped by the signal (or the like) while the step was read: it was rewound.
                raise self._interrupted(bar, last_checkpoint or self._last_checkpoint) from None
            finally:
                bar.close()
        if self.step >= t.steps:
            if self.validator is not None and v.at_end and main:
                result.validations.append(self.validate())
            if main:
                result.export = self._final_export()
        self.accelerator.end_training()
        self._batches = None
        result.steps_done, result.skipped_steps, result.checkpoint = self.step, self.skipped_steps, last_checkpoint
        return result

    def _stop_requested(self) -> bool:
        """Whether any process got SIGINT/SIGTERM: all stop at the same step boundary (else the collectives hang)."""
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(self._guard.requested)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self._guard.requested = bool(flag.item())
        return self._guard.requested

    def _interrupted(self, bar, last_checkpoint: Path | None) -> TrainingInterrupted:
        """Save the state after the last completed step (unless saved already) and describe the stop."""
        bar.close()
        self._guard.requested = True  # a further signal now stops the save (atomic: nothing half-written)
        saved, broken = None, self._step_broken
        try:
            if broken:
                logger.warning("interrupted during step %d's update: no checkpoint of it is saved", self.step)
            elif last_checkpoint is not None and checkpoint_step(last_checkpoint) == self.step:
                saved = last_checkpoint
            else:
                saved = self.save_checkpoint()
        except KeyboardInterrupt:
            pass
        self.accelerator.end_training()
        self._batches = None
        found = list_checkpoints(self.output / "checkpoints")
        return TrainingInterrupted(self.step, saved, found[-1] if found else None, broken=broken)

    def _loop(self, result: TrainResult, bar, end: int) -> Path | None:
        """Steps until ``end`` or an interrupt (with validation and checkpoints at their intervals); returns the
        last checkpoint saved."""
        t, v = self.config.train, self.config.validation
        main = self.accelerator.is_main_process
        last_checkpoint = None
        while self.step < end and not self._stop_requested():
            started = time.perf_counter()
            try:
                outcome = self.train_step()
            except SampleReadError as e:
                bar.close()
                saved = self.save_checkpoint()
                self.accelerator.end_training()
                raise SampleReadError(
                    f"{str(e).rstrip('. ')}. Training stopped; checkpoint {saved} holds the {self.step} step(s) done: fix the file, "
                    "then continue with --resume latest"
                ) from None
            outcome.seconds = time.perf_counter() - started
            result.history.append(outcome)
            done = self.step
            postfix = {k: f"{outcome.terms[k]:.4g}" for k in ("loss", "loss_adv", "d_loss") if k in outcome.terms}
            postfix["lr"] = f"{outcome.lr:.2e}"
            postfix["mem"] = f"{_peak_memory_gib(self.device):.2f}G"
            if self.skipped_steps:
                postfix["skipped"] = self.skipped_steps
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if self.tensorboard and (done % t.log_every == 0 or done == end):
                scalars = {f"train/{k}": val for k, val in outcome.terms.items()}
                scalars.update({"train/lr": outcome.lr, "train/skipped_steps": self.skipped_steps})
                self.accelerator.log(scalars, step=done)
            if (
                self.validator is not None
                and v.every
                and done % v.every == 0
                and (done < t.steps or not v.at_end)
                and main
            ):
                result.validations.append(self.validate())
            if t.checkpoint_every and done % t.checkpoint_every == 0 and done < t.steps:
                last_checkpoint = self._last_checkpoint = self.save_checkpoint()
        return last_checkpoint

    def _final_export(self) -> ExportResult:
        import shutil

        final, tmp, old = self.output / "export", self.output / ".tmp-export", self.output / ".tmp-export-old"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        exported = self.export(tmp)
        # Renames, then the delete: the earlier export is never half-deleted under the name "export".
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        exported.folder = final
        logger.info("exported %s to %s: %s", self.models.mode, final, ", ".join(map(str, exported.files)))
        return exported


def train(config: Config) -> TrainResult:
    """Build a `Trainer` for ``config`` and run it to ``train.steps``."""
    return Trainer(config).run()
