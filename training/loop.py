"""The EliGen LoRA training loop: ``train(model, data, lora_settings, settings, checkpoints, hooks)``.

One step = ``grad_accumulation`` micro-batches (training/batching.py), then one AdamW update. A
non-finite loss or gradient stops the run and keeps the last checkpoint whose weights were finite;
Cancel (a hook that raises) or any failure keeps the last completed step. Under torchrun
(``distributed``, training/distributed.py) every rank trains its part of each step and only rank 0
writes. The model context is training/model.py, validation training/validation.py.
"""

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import checkpoints, lora, offload
from .batching import BatchStream, micro_batch, step_generator
from .faults import check_finite_samples
from .hooks import Hooks
from .loss import TimestepSampler
from .model import TrainingModel, batch_loss
from .outputs import resolve_resume
from .settings import PRECISIONS, lr_lambda
from .validation import validation_images


@dataclass
class TrainingData:
    samples: list                               # encoded ``Sample``s (what encode_dataset returns)
    validation: list = field(default_factory=list)  # samples drawn every ``validation_every`` steps
    empty: tuple | None = None                  # (context, pooled) of the empty prompt, for caption dropout
    decode: Callable | None = None              # latents [B, C, h, w] -> images [B, H, W, 3] (None: latents)


@dataclass
class CheckpointFolder:
    path: str                                   # checkpoints and latest.json of one run
    resume: str | None = None                   # None, "latest" or a checkpoint file name in ``path``
    info: dict = field(default_factory=dict)    # more JSON written into every checkpoint


@dataclass
class TrainResult:
    lora: dict                       # ComfyUI-format LoRA state dict (float32)
    losses: list                     # (step, loss) per optimizer step of this and resumed runs
    step: int
    checkpoint: str | None = None    # last checkpoint written
    validation: list = field(default_factory=list)  # (step, images [B, H, W, 3] float in [0, 1])
    stopped: str | None = None       # why the run ended early, if it did


class TrainingStopped(RuntimeError):
    """A non-finite loss or gradient: training stopped, the last good checkpoint kept."""


def train(model_patcher, data, lora_settings, settings, folder=None, hooks=None, distributed=None):
    """Train an EliGen LoRA on ``model_patcher`` (left unmodified) and return a ``TrainResult``.
    ``data``: TrainingData; ``folder``: a CheckpointFolder (None: no checkpoints, no resume); ``hooks``:
    progress, previews and Cancel (training/hooks.py); ``distributed``: a training.distributed.Group
    under torchrun (``settings.batch_size`` is then per rank)."""
    settings.validate()
    if not data.samples:
        raise ValueError("the dataset has no samples to train on")
    check_finite_samples(data.samples)
    check_finite_samples(data.validation, "validation")
    samples = [s.to() for s in data.samples]  # out of inference mode (nodes encode under it)
    first = samples[0]
    empty = (torch.zeros_like(first.context[:, :1]), None if first.pooled is None else torch.zeros_like(first.pooled)) \
        if data.empty is None else tuple(None if t is None else t.detach().clone() for t in data.empty)
    data = TrainingData(samples, [s.to() for s in data.validation], empty, data.decode)
    memory = offload.MemoryRequest(settings.max_vram_gb, settings.blocks_to_swap, samples, settings.batch_size,
                                   PRECISIONS[settings.precision])
    with torch.inference_mode(False), TrainingModel(model_patcher, lora_settings, settings.gradient_checkpointing,
                                                     settings.seed, memory, distributed) as model:
        return _train(model, data, lora_settings, settings, folder, hooks or Hooks(), distributed)


def _train(model, data, lora_settings, settings, folder, hooks, distributed):
    sampler = TimestepSampler(settings.timestep_sampling, schedule=model.adapter.reference_schedule)
    optimizer = torch.optim.AdamW(model.parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    # fp16 autocast needs loss scaling (its gradients underflow); a disabled scaler is a no-op.
    scaler = torch.amp.GradScaler(model.device.type, enabled=settings.precision == "fp16")
    world = 1 if distributed is None else distributed.world
    stream = BatchStream(data.samples, settings.batch_size * world, settings.seed)  # the global micro-batches
    result = TrainResult(lora={}, losses=[], step=0)
    if folder is not None and folder.resume:
        result.checkpoint = resolve_resume(folder.path, folder.resume, settings.steps)
        result.step, result.losses = checkpoints.Checkpoint(result.checkpoint).restore(
            model, lora_settings, settings, optimizer, scheduler, scaler)
    writer = folder if folder is not None and (distributed is None or distributed.is_writer) else None

    def info(losses):
        return {"family": model.adapter.family, "train": asdict(settings), "lora": lora_settings.to_dict(),
                "losses": losses, **(folder.info if folder else {})}

    def save():
        if writer is not None:
            result.checkpoint = checkpoints.save_checkpoint(
                writer.path, result.step, lora.named_lora_parameters(model.diffusion_model), optimizer, scheduler,
                {**info(result.losses), "grad_scaler": scaler.state_dict()}, keep_last=settings.keep_checkpoints)

    started, first_step = time.monotonic(), result.step
    last_finite = checkpoints.LastFiniteWeights(writer.path if writer else None)
    while result.step < settings.steps:
        step = result.step
        try:
            loss = _one_step(model, stream, sampler, settings, data.empty, optimizer, scaler, step, hooks.check_cancel,
                             distributed, before_update=last_finite.remember)
        except TrainingStopped as error:
            # The weights of `step` gave the non-finite value: keep the checkpoint before them.
            result.checkpoint = last_finite.save(
                step, checkpoints.keep_last_finite(last_finite.run_dir, step),
                torch.optim.AdamW(model.parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay),
                scheduler.state_dict(), info([l for l in result.losses if l[0] < step]))
            where = (f"; last checkpoint with a finite loss: {result.checkpoint}" if result.checkpoint else
                     "; no checkpoint before it was kept (set checkpoint_every to keep some)")
            result.stopped = str(error)
            raise TrainingStopped(f"{error}; training stopped after {step} completed steps{where}") from None
        except BaseException:
            save()  # interrupt (or any failure): keep the last completed step
            raise
        scheduler.step()
        result.step = step + 1
        result.losses.append((result.step, loss))
        try:
            if settings.validation_every and data.validation and result.step % settings.validation_every == 0:
                images = validation_images(model, data.validation, settings, data.decode)
                result.validation.append((result.step, images))
                if hooks.preview is not None:
                    hooks.preview(result.step, images)
            if settings.checkpoint_every and result.step % settings.checkpoint_every == 0:
                save()
            if hooks.progress is not None:  # ComfyUI's progress hook also raises on Cancel / POST /interrupt
                left = (time.monotonic() - started) / (result.step - first_step) * (settings.steps - result.step)
                hooks.progress(result.step, settings.steps, loss, left)
        except BaseException:
            save()  # the step completed: keep it
            raise

    if writer is not None and (result.checkpoint is None or not result.checkpoint.endswith(f"{result.step:06d}.safetensors")):
        save()
    result.lora = lora.lora_state_dict(model.diffusion_model)
    return result


def _one_step(model, stream, sampler, settings, empty, optimizer, scaler, step, check_cancel, distributed=None,
              before_update=None):
    """Accumulate gradients over the micro-batches of ``step`` and apply one update. Returns the loss
    (under torchrun: of the whole step, summed over ranks; the gradients are summed the same way).
    ``before_update(step, named LoRA parameters)`` is called once the loss and gradients are finite."""
    generator = step_generator(settings.seed, step, purpose=0)
    rank = 0 if distributed is None else distributed.rank
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    gradients = GradientSum(model.parameters)
    devices = [] if model.device.type != "cuda" else [model.device]
    with torch.random.fork_rng(devices=devices):
        # peft's LoRA dropout draws from the global generator: seed it per step, restore it after.
        torch.manual_seed(int(torch.randint(0, 2**62, (), generator=generator)))
        for micro in range(settings.grad_accumulation):
            if check_cancel is not None:
                check_cancel()
            # Every rank has batch_size samples of one bucket: one forward and backward each, so FSDP's
            # collectives match on every rank.
            batch = micro_batch(stream, settings, step, micro, rank, empty)
            loss = batch_loss(model, batch.samples, sampler, settings, batch.generators, batch.whole)
            loss = loss / settings.grad_accumulation
            if distributed is None and not torch.isfinite(loss):
                raise TrainingStopped(f"the loss became {loss.item()} at step {step + 1}")
            scaler.scale(loss).backward()
            gradients.add()
            total += loss.item()
    if distributed is not None:
        total = distributed.reduce_step(gradients, total)
    gradients.apply()
    if not math.isfinite(total):
        raise TrainingStopped(f"the loss became {total} at step {step + 1}")
    scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters if p.grad is not None]
    if settings.max_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters, settings.max_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    if not torch.isfinite(norm) and not scaler.is_enabled():
        raise TrainingStopped(f"the gradients became non-finite (norm {norm.item()}) at step {step + 1}")
    if before_update is not None:  # loss and gradients of these weights were finite
        before_update(step, lora.named_lora_parameters(model.diffusion_model))
    scaler.step(optimizer)  # with fp16 loss scaling, an overflowing step is skipped and the scale lowered
    scaler.update()
    return total


class GradientSum:
    """The step's gradients summed in float64, one micro-batch at a time (``add`` after each backward),
    then over ranks (``Group.reduce_step``), then written back in each parameter's dtype (``apply``).

    A float64 sum of a few float32 gradients does not depend on their order (to float64 rounding), so
    one process with the whole batch and several ranks with parts of it, with or without accumulation,
    sum the same numbers to the same float32 result; summing in float32 in different orders (each rank
    its micro-batches, then the ranks) differed by float32 roundings that AdamW magnifies."""

    def __init__(self, parameters):
        self.parameters = list(parameters)
        self.total = None          # one flat float64 vector of every parameter's gradient
        self.seen = None           # bool per parameter: some micro-batch gave it a gradient

    def add(self):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                          for p in self.parameters]) if self.parameters else None
        seen = torch.tensor([p.grad is not None for p in self.parameters], dtype=torch.bool)
        self.total = flat if self.total is None else self.total + flat
        self.seen = seen if self.seen is None else self.seen | seen
        for p in self.parameters:
            p.grad = None

    def apply(self):
        """Put the sum into ``p.grad``; a parameter no micro-batch (of any rank) reached keeps None, as
        in one process (AdamW skips such parameters)."""
        offset = 0
        for p, seen in zip(self.parameters, self.seen.tolist() if self.seen is not None else []):
            size = p.numel()
            p.grad = self.total[offset:offset + size].view_as(p).to(p.dtype) if seen else None
            offset += size
