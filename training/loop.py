"""The EliGen LoRA training loop: a plain function (``train``) with a settings dataclass.

Usable without a server (the toy-world demo calls it directly); the training node adds the progress
bar, the interrupt check and file locations through arguments.

One step = ``grad_accumulation`` micro-batches of ``batch_size`` samples, then one AdamW update.
Everything random in step k is drawn from generators seeded by (seed, k) alone (batch order, LoRA
dropout) or by (seed, k, slot of the sample in the step) (noise, timestep, entity and caption
dropout), so a resumed run repeats an uninterrupted one, and under torchrun (``distributed``, see
training/distributed.py) the result does not depend on how the samples of a step are spread over ranks.
"""

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..core import blocks, host
from ..core.adapters import adapter_for
from ..core.conditioning import EntityCondition
from ..core.patch import patch_model
from . import checkpoints, lora, offload
from .faults import check_finite_samples
from .sample import Sample  # noqa: F401 - the sample type train() takes, importable from here too
from .loss import (TIMESTEP_SAMPLERS, TimestepSampler, entity_region_weight, flow_matching_loss, noisy_latent,
                   velocity_target)

SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def setting(default, help, **ui):
    """A ``TrainSettings`` field: its default, its help text (the EliGen Train node's tooltip) and how the
    node shows it (``min``, ``max``, ``step``, ``choices``; ``node=False`` keeps it off the node,
    ``optional=True`` makes it an optional input)."""
    return field(default=default, metadata={"help": help, **ui})


@dataclass
class TrainSettings:
    """Every training option, its default and its help text: the single source of the EliGen Train node's
    inputs and tooltips (nodes/settings_inputs.py). Adding an option = adding one field here."""

    steps: int = setting(1000, "Optimizer steps.", min=1, max=1_000_000)
    learning_rate: float = setting(1e-4, "AdamW learning rate (reference: 1e-4).", min=1e-8, max=1.0, step=1e-5)
    batch_size: int = setting(1, "Images per micro-batch (one training size per batch).", min=1, max=64)
    grad_accumulation: int = setting(1, "Micro-batches per optimizer step.", min=1, max=256)
    schedule: str = setting("constant", "Learning-rate schedule after warm-up (linear and cosine decay to 0).",
                            choices=SCHEDULES)
    warmup_steps: int = setting(0, "Linear warm-up steps.", min=0, max=100_000)
    weight_decay: float = setting(0.01, "AdamW weight decay (reference: 0.01).", min=0.0, max=1.0, step=0.001)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm; 0 turns it off.", min=0.0, max=100.0, step=0.1)
    timestep_sampling: str = setting(
        "reference", "reference: the reference's 1000 shifted timesteps with its Gaussian loss weighting; "
                     "logit_normal: sigmoid of a normal; uniform.", choices=TIMESTEP_SAMPLERS)
    entity_weight: float = setting(0.0, "Extra loss weight inside the entity masks (0 = plain MSE, as the reference).",
                                   min=0.0, max=10.0, step=0.1)
    precision: str = setting("bf16", "Autocast for the forward pass; the LoRA weights keep their own dtype. On CPU "
                                     "only fp32 or bf16 make sense.", choices=tuple(PRECISIONS))
    gradient_checkpointing: bool = setting(True, "Recompute each block in the backward pass: much less memory, "
                                                 "~30% slower.")
    entity_dropout: float = setting(0.0, "Probability of dropping each entity of a sample in a step.",
                                    min=0.0, max=0.95, step=0.05)
    caption_dropout: float = setting(0.0, "Probability of replacing the global caption with the empty prompt.",
                                     min=0.0, max=0.95, step=0.05)
    seed: int = setting(0, "Seeds everything random in training: the same seed repeats a run exactly.",
                        min=0, max=2**31 - 1)
    checkpoint_every: int = setting(250, "Write a checkpoint every N steps (0: only at the end, on Cancel or on a "
                                         "non-finite loss). The last keep_checkpoints (3) are kept.", min=0, max=1_000_000)
    keep_checkpoints: int = setting(3, "How many step checkpoints to keep.", min=0, max=1000, node=False)
    validation_every: int = setting(0, "Sample validation images every N steps (0: off), previewed on the node.",
                                    min=0, max=1_000_000)
    validation_steps: int = setting(20, "Euler steps of each validation image.", min=1, max=200)
    validation_guidance: float = setting(
        3.5, "Embedded guidance of the validation images for guidance-distilled models (FLUX.1-dev; training "
             "itself uses 1 as the reference). Others ignore it.", min=0.0, max=100.0, step=0.1, optional=True)
    max_vram_gb: float = setting(
        0.0, "GPU memory budget in GB (0 = no limit). The trainer estimates what a step needs and keeps just enough "
             "transformer blocks in CPU memory, streaming each to the GPU when it runs (block swap); the log says "
             "how many and why. E.g. 11 on a 12 GB card, 15 on 16 GB.", min=0.0, max=1024.0, step=0.5, optional=True)
    blocks_to_swap: int = setting(-1, "Transformer blocks kept in CPU memory and streamed to the GPU: -1 chooses "
                                      "from max_vram_gb; N swaps exactly N blocks.", min=-1, max=1000, optional=True)

    def validate(self):
        problems = []
        for name in ("steps", "batch_size", "grad_accumulation", "validation_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("warmup_steps", "checkpoint_every", "validation_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative (got {getattr(self, name)})")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            problems.append(f"learning_rate must be a positive number (got {self.learning_rate})")
        if self.blocks_to_swap < -1:
            problems.append(f"blocks_to_swap must be -1 (automatic) or >= 0 (got {self.blocks_to_swap})")
        for name in ("weight_decay", "max_grad_norm", "entity_weight", "validation_guidance", "max_vram_gb"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                problems.append(f"{name} must be a finite number >= 0 (got {value})")
        for name in ("entity_dropout", "caption_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1) (got {getattr(self, name)})")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.timestep_sampling not in TIMESTEP_SAMPLERS:
            problems.append(f"timestep sampling {self.timestep_sampling!r} is not one of {', '.join(TIMESTEP_SAMPLERS)}")
        if problems:
            raise ValueError("training settings: " + "; ".join(problems))
        return self


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


# ---------------------------------------------------------------------------------------------------
# Pieces


def lr_lambda(settings):
    """Multiplier of the base learning rate after ``step`` optimizer updates (LambdaLR convention)."""
    warmup, total = settings.warmup_steps, settings.steps

    def factor(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if settings.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if settings.schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def step_generator(seed, step, purpose):
    """A generator for step ``step`` that depends only on (seed, step, purpose)."""
    mixed = (seed * 1_000_003 + step * 7919 + purpose * 104_729) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def sample_generator(seed, step, slot):
    """The generator of the sample in position ``slot`` of step ``step`` (a function of those alone)."""
    digest = hashlib.sha256(f"eligen-sample:{seed}:{step}:{slot}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def layout_key(sample):
    """Samples with equal keys run in one forward: same latent shape and text segment lengths."""
    return (tuple(sample.latent.shape), tuple(e.shape[1] for e in sample.entity_embeds), sample.context.shape[1])


def epoch_batches(samples, batch_size, seed, epoch):
    """Batches of sample indices for one epoch, reproducible from (seed, epoch). Each batch holds one
    layout (``layout_key``) so it is one forward pass; a layout's remainder makes a smaller batch."""
    generator = step_generator(seed, epoch, purpose=1)
    groups = {}
    for index, sample in enumerate(samples):
        groups.setdefault(layout_key(sample), []).append(index)
    batches = []
    for key in sorted(groups):
        members = [groups[key][i] for i in torch.randperm(len(groups[key]), generator=generator).tolist()]
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class BatchStream:
    """Endless stream of batches over epochs; position k is a pure function of (seed, k)."""

    def __init__(self, samples, batch_size, seed):
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self._epoch, self._batches = None, None

    def batch(self, position):
        per_epoch = len(epoch_batches(self.samples, self.batch_size, self.seed, 0))
        epoch, index = divmod(position, per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.samples, self.batch_size, self.seed, epoch)
        return [self.samples[i] for i in self._batches[index]]


def drop_entities(sample, settings, empty, generator):
    """Entity and caption dropout for one sample (a new Sample; the input is not modified)."""
    keep = [i for i in range(len(sample.entity_embeds))
            if torch.rand((), generator=generator).item() >= settings.entity_dropout]
    context, pooled = sample.context, sample.pooled
    if settings.caption_dropout and torch.rand((), generator=generator).item() < settings.caption_dropout:
        context, pooled = empty
    return Sample(sample.latent, context, pooled, [sample.entity_embeds[i] for i in keep], sample.masks[keep])


def group_by_layout(batch):
    """Samples that can share one forward (dropout can split a batch that started as one layout)."""
    groups = {}
    for sample in batch:
        groups.setdefault(layout_key(sample), []).append(sample)
    return list(groups.values())


def stack_condition(samples, device):
    """Joint text context ``[E1..EN, G]`` per sample, pooled vectors and the EntityCondition (None
    without entities) for samples of one layout."""
    context = torch.cat([torch.cat(list(s.entity_embeds) + [s.context], dim=1) for s in samples]).to(device)
    pooled = None if samples[0].pooled is None else torch.cat([s.pooled for s in samples]).to(device)
    if not samples[0].entity_embeds:
        return context, pooled, None
    lengths = [e.shape[1] for e in samples[0].entity_embeds] + [samples[0].context.shape[1]]
    masks = torch.stack([s.masks for s in samples]).to(device)
    return context, pooled, EntityCondition.for_training(lengths, masks)


# ---------------------------------------------------------------------------------------------------
# The model side


alias_inference_tensors = host.memory.alias_inference_tensors  # writes module tensor slots: a host contact point
restore_tensors = host.memory.restore_tensors


class TrainingModel:
    """The patched MODEL with LoRA layers injected, and the forward used by training and validation.

    Use as a context manager: leaving it removes the LoRA layers, whatever happened.
    """

    def __init__(self, model_patcher, lora_settings, gradient_checkpointing=False, seed=0, memory=None,
                 distributed=None):
        self.adapter = adapter_for(model_patcher)
        lora_settings.validate(self.adapter)
        self.patched = patch_model(model_patcher)
        self.base_model = self.patched.model
        self.diffusion_model = self.base_model.diffusion_model
        self.lora_settings = lora_settings
        self.gradient_checkpointing = gradient_checkpointing
        self.seed = seed
        self.device = self.patched.load_device
        # block swap (training/offload.py) when a memory budget or a block count is asked for
        self.offload = offload.SwapSession(self.patched, self.device, memory) if memory and memory.active else None
        self._swapped = []
        # FSDP (headless under torchrun only): the base is sharded, so the MODEL is not reusable afterwards.
        self.fsdp = distributed if distributed is not None and distributed.fsdp else None

    def __enter__(self):
        if self.offload is not None:
            self.offload.load()
        else:
            host.memory.unload_models_on(self.device)  # text encoders, VAE: nothing else on the device during steps
            if self.fsdp is None or self.device.type == "cpu":  # on GPUs FSDP moves only each rank's shard there
                host.memory.load_for_training(self.patched)
        try:
            self._swapped = alias_inference_tensors(self.diffusion_model)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)  # peft draws the initial A matrices from the global generator
                self.targets = lora.inject(self.diffusion_model, self.lora_settings, self.adapter)
            self.parameters = lora.lora_parameters(self.diffusion_model)
            if self.offload is not None:
                self.offload.start(self.diffusion_model, self.adapter.training_blocks, self.parameters,
                                   self.compute_dtype, self.gradient_checkpointing)
            if self.fsdp is not None:
                self.fsdp.shard_frozen_base(self.diffusion_model, self.parameters)
            self._options = self._transformer_options()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        try:
            if self.offload is not None:
                self.offload.close_swapper()
            lora.remove(self.diffusion_model)
        finally:
            restore_tensors(self._swapped)
            if self.offload is not None:
                self.offload.unload()
        return False

    def _transformer_options(self):
        # What sampling would give the diffusion model (patches, attention override, wrappers), plus
        # the out-of-place training blocks.
        options = host.models.sampling_transformer_options(self.patched)
        return blocks.training_transformer_options(
            self.diffusion_model, self.adapter.training_blocks, options, self.gradient_checkpointing,
            block_wrapper=self.offload.block_wrapper if self.offload is not None else None,
        )

    def velocity(self, x_t, sigma, context, pooled, entity_condition, guidance=1.0):
        return self.adapter.training_forward(
            self.base_model, x_t, sigma, context, pooled, entity_condition, dict(self._options), guidance
        )

    @property
    def compute_dtype(self):
        """The dtype the model computes in (as BaseModel.apply_model: fp8 weights run in their cast dtype)."""
        return host.models.compute_dtype(self.base_model)

    @property
    def latent_format(self):
        return self.patched.get_model_object("latent_format")


def batch_loss(training_model, batch, sigma_sampler, settings, generator, denominator=None):
    """Weighted flow-matching loss of one micro-batch: the sum over its samples / ``denominator`` (default:
    their count, i.e. the mean). ``generator``: one per sample (noise, then timestep), or one for all."""
    generators = generator if isinstance(generator, (list, tuple)) else [generator] * len(batch)
    total, count = 0.0, 0
    device = training_model.device
    autocast = PRECISIONS[settings.precision]
    by_sample = {id(s): g for s, g in zip(batch, generators)}
    for group in group_by_layout(batch):
        x0 = torch.stack([s.latent for s in group]).to(device)
        x0 = x0.to(torch.promote_types(x0.dtype, torch.float32))
        noise, sigma, weight = [], [], []
        for s in group:
            noise.append(torch.randn((1,) + tuple(s.latent.shape), generator=by_sample[id(s)]))
            sigma_s, weight_s = sigma_sampler(1, by_sample[id(s)])
            sigma.append(sigma_s)
            weight.append(weight_s)
        noise = torch.cat(noise).to(x0)
        sigma, weight = torch.cat(sigma).to(device), torch.cat(weight).to(device)
        context, pooled, condition = stack_condition(group, device)
        region = None
        if settings.entity_weight and condition is not None:
            region = entity_region_weight(condition_masks(group), x0.shape[-2:], settings.entity_weight).to(device)
        x_t = noisy_latent(x0, noise, sigma)
        dtype = training_model.compute_dtype
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            prediction = training_model.velocity(x_t.to(dtype), sigma, context.to(dtype),
                                                 None if pooled is None else pooled.to(dtype), condition)
        loss = flow_matching_loss(prediction, velocity_target(x0, noise), weight, region)
        total = total + loss * len(group)
        count += len(group)
    return total / (denominator or count)


def condition_masks(group):
    return torch.stack([s.masks for s in group])


# ---------------------------------------------------------------------------------------------------
# Validation: a small Euler sampler through the same forward


@torch.no_grad()
def sample_latents(training_model, sample, steps, seed, guidance=1.0):
    """Euler flow sampling of one latent with the sample's prompt and entities (no CFG: FLUX-dev style
    guidance distillation or a LoRA trained without a negative)."""
    model_sampling = training_model.patched.get_model_object("model_sampling")
    sigmas = host.models.simple_sigmas(model_sampling, steps).float()
    device = training_model.device
    x = torch.randn((1,) + tuple(sample.latent.shape), generator=torch.Generator().manual_seed(seed)).to(device)
    context, pooled, condition = stack_condition([sample], device)
    dtype = training_model.compute_dtype
    for i in range(steps):
        sigma = sigmas[i:i + 1].to(device)
        v = training_model.velocity(x.to(dtype), sigma, context.to(dtype),
                                    None if pooled is None else pooled.to(dtype), condition, guidance).float()
        x = x + (sigmas[i + 1] - sigmas[i]).to(device) * v
    return x


# ---------------------------------------------------------------------------------------------------
# The loop


def _run_info(settings, lora_settings, family, losses, extra):
    return {"family": family, "train": asdict(settings), "lora": lora_settings.to_dict(),
            "losses": losses, **(extra or {})}


def train(model_patcher, samples, lora_settings, settings, run_dir=None, resume=None, validation=None,
          decode=None, empty_condition=None, on_progress=None, check_interrupt=None, info=None, distributed=None):
    """Train an EliGen LoRA on ``model_patcher`` (left unmodified) and return a ``TrainResult``.

    samples:         ``Sample`` objects (training/sample.py; what encode_dataset returns).
    run_dir:         folder for checkpoints (None: no checkpoints).
    resume:          None, "latest" or a checkpoint file name inside run_dir.
    validation:      ``Sample`` objects to sample every ``validation_every`` steps.
    decode:          latent [B, C, h, w] (model space, process_out applied by us) -> images [B, H, W, 3].
    empty_condition: (context, pooled) of the empty prompt, for caption dropout (zeros if None).
    on_progress:     callback(step, total, loss, seconds_left, preview_images or None).
    check_interrupt: called every micro-batch; raising stops training after a checkpoint is written.
    distributed:     a training.distributed.Group under torchrun (None: one process). Each rank trains its
                     part of every step; ``settings.batch_size`` is per rank; only rank 0 writes.
    """
    settings.validate()
    if not samples:
        raise ValueError("the dataset has no samples to train on")
    if resume and run_dir is None:
        raise ValueError("resume needs a checkpoint folder (run_dir)")
    check_finite_samples(samples)
    check_finite_samples(validation or [], "validation")
    samples = [s.to() for s in samples]  # out of inference mode (nodes encode under it)
    validation = [s.to() for s in (validation or [])]
    if empty_condition is None:
        first = samples[0]
        empty_condition = (torch.zeros_like(first.context[:, :1]),
                           None if first.pooled is None else torch.zeros_like(first.pooled))
    else:
        empty_condition = tuple(None if t is None else t.detach().clone() for t in empty_condition)

    memory = offload.MemoryRequest(settings.max_vram_gb, settings.blocks_to_swap, samples, settings.batch_size,
                                   PRECISIONS[settings.precision])
    with torch.inference_mode(False), TrainingModel(model_patcher, lora_settings, settings.gradient_checkpointing,
                                                     settings.seed, memory, distributed) as model:
        return _train(model, samples, lora_settings, settings, run_dir, resume, validation, decode,
                      empty_condition, on_progress, check_interrupt, info, distributed)


def _train(model, samples, lora_settings, settings, run_dir, resume, validation, decode, empty,
           on_progress, check_interrupt, info, distributed=None):
    family = model.adapter.family
    sampler = TimestepSampler(settings.timestep_sampling, schedule=model.adapter.reference_schedule)
    optimizer = torch.optim.AdamW(model.parameters, lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    # fp16 autocast needs loss scaling (its gradients underflow); a disabled scaler is a no-op.
    scaler = torch.amp.GradScaler(model.device.type, enabled=settings.precision == "fp16")
    world = 1 if distributed is None else distributed.world
    stream = BatchStream(samples, settings.batch_size * world, settings.seed)  # the global micro-batches
    result = TrainResult(lora={}, losses=[], step=0)

    if resume:
        path = (checkpoints.latest_checkpoint(run_dir) if resume == "latest"
                else checkpoints.resolve_checkpoint(run_dir, resume))
        if path is None:
            raise ValueError(f"resume: there is no checkpoint yet in {run_dir}")
        state = checkpoints.Checkpoint(path)
        if state.info.get("family") != family:
            raise ValueError(f"resume: checkpoint {path} is for {state.info.get('family')}, this model is {family}")
        state.check_lora_settings(lora_settings)
        lora.load_lora_tensors(model.diffusion_model, state.lora)
        state.restore_optimizer(optimizer)
        state.restore_scheduler(scheduler)
        use_learning_rate(optimizer, scheduler, settings)  # this run's rate, not the checkpoint's
        if state.info.get("grad_scaler"):
            scaler.load_state_dict(state.info["grad_scaler"])
        result.step = state.step
        result.losses = [tuple(x) for x in state.info.get("losses", [])]
        result.checkpoint = path

    def save():
        if run_dir is None or (distributed is not None and distributed.rank != 0):
            return None
        result.checkpoint = checkpoints.save_checkpoint(
            run_dir, result.step, lora.named_lora_parameters(model.diffusion_model), optimizer, scheduler,
            _run_info(settings, lora_settings, family, result.losses, {**(info or {}), "grad_scaler": scaler.state_dict()}),
            keep_last=settings.keep_checkpoints,
        )
        return result.checkpoint

    started, first_step = time.monotonic(), result.step
    writer_dir = run_dir if distributed is None or distributed.rank == 0 else None  # only rank 0 writes
    last_finite = checkpoints.LastFiniteWeights(writer_dir)
    while result.step < settings.steps:
        step = result.step
        try:
            loss_value = _one_step(model, stream, sampler, settings, empty, optimizer, scaler, step, check_interrupt,
                                   distributed, before_update=last_finite.remember)
        except TrainingStopped as error:
            # The weights of `step` gave the non-finite value: keep the checkpoint before them.
            result.checkpoint = last_finite.save(
                step, checkpoints.keep_last_finite(writer_dir, step),
                torch.optim.AdamW(model.parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay),
                scheduler.state_dict(), _run_info(settings, lora_settings, family, [l for l in result.losses if l[0] < step], info))
            where = (f"; last checkpoint with a finite loss: {result.checkpoint}" if result.checkpoint else
                     "; no checkpoint before it was kept (set checkpoint_every to keep some)")
            result.stopped = str(error)
            raise TrainingStopped(f"{error}; training stopped after {step} completed steps{where}") from None
        except BaseException:
            save()  # interrupt (or any failure): keep the last completed step
            raise
        scheduler.step()
        result.step = step + 1
        result.losses.append((result.step, loss_value))

        try:
            previews = None
            if settings.validation_every and validation and result.step % settings.validation_every == 0:
                previews = validate(model, validation, settings, decode, result.step)
                result.validation.append((result.step, previews))
            if settings.checkpoint_every and result.step % settings.checkpoint_every == 0:
                save()
            if on_progress is not None:
                done = result.step - first_step
                left = (time.monotonic() - started) / done * (settings.steps - result.step)
                # ComfyUI's progress hook also raises on Cancel / POST /interrupt
                on_progress(result.step, settings.steps, loss_value, left, previews)
        except BaseException:
            save()  # the step completed: keep it
            raise

    if run_dir is not None and (result.checkpoint is None or not result.checkpoint.endswith(f"{result.step:06d}.safetensors")):
        save()
    result.lora = lora.lora_state_dict(model.diffusion_model)
    return result


def use_learning_rate(optimizer, scheduler, settings):
    """Set the learning rate of ``settings`` (with the schedule at its current step) on a restored
    optimizer and scheduler, which otherwise keep the rate of the run that wrote the checkpoint."""
    scheduler.base_lrs = [settings.learning_rate] * len(optimizer.param_groups)
    factor = lr_lambda(settings)(scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["initial_lr"] = settings.learning_rate
        group["lr"] = settings.learning_rate * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _one_step(model, stream, sampler, settings, empty, optimizer, scaler, step, check_interrupt, distributed=None,
              before_update=None):
    """Accumulate gradients over the micro-batches of ``step`` and apply one update. Returns the loss
    (under torchrun: of the whole step, summed over ranks; the gradients are summed the same way).
    ``before_update(step, named LoRA parameters)`` is called once the loss and gradients are finite."""
    generator = step_generator(settings.seed, step, purpose=0)
    rank = 0 if distributed is None else distributed.rank
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    devices = [] if model.device.type != "cuda" else [model.device]
    with torch.random.fork_rng(devices=devices):
        # peft's LoRA dropout draws from the global generator: seed it per step, restore it after.
        torch.manual_seed(int(torch.randint(0, 2**62, (), generator=generator)))
        for micro in range(settings.grad_accumulation):
            if check_interrupt is not None:
                check_interrupt()
            whole = stream.batch(step * settings.grad_accumulation + micro)  # all ranks' samples
            slots = range(rank * settings.batch_size, min(len(whole), (rank + 1) * settings.batch_size))
            generators = [sample_generator(settings.seed, step, micro * stream.batch_size + j) for j in slots]
            batch = [drop_entities(whole[j], settings, empty, g) for j, g in zip(slots, generators)]
            if model.fsdp is not None:
                # Sharded weights are gathered by collectives in every forward and backward: each rank runs
                # exactly batch_size of them, one sample each, padded with zero-weighted ones.
                total += model.fsdp.lockstep_backward(model, batch, generators, settings.batch_size, whole[0],
                                                      lambda b, g: batch_loss(model, b, sampler, settings, g, len(whole))
                                                      / settings.grad_accumulation, scaler)
                continue
            if not batch:
                continue  # a short last batch of a layout: this rank has nothing in it
            loss = batch_loss(model, batch, sampler, settings, generators, len(whole)) / settings.grad_accumulation
            if distributed is None and not torch.isfinite(loss):
                raise TrainingStopped(f"the loss became {loss.item()} at step {step + 1}")
            scaler.scale(loss).backward()
            total += loss.item()
    if distributed is not None:
        total = distributed.reduce_step(model.parameters, total)
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


def validate(model, validation, settings, decode, step):
    """Validation images [B, H, W, 3] (or latents when no decoder is given)."""
    outputs = []
    for index, sample in enumerate(validation):
        latent = sample_latents(model, sample, settings.validation_steps, seed=settings.seed + index,
                                guidance=settings.validation_guidance)
        latent = model.latent_format.process_out(latent.cpu())
        outputs.append(decode(latent) if decode is not None else latent)
    if decode is None:
        return outputs
    return torch.cat([o.float().cpu().clamp(0, 1) for o in outputs])


# ---------------------------------------------------------------------------------------------------
# Loss graph


def loss_graph(losses, width=640, height=320):
    """A PIL image of the loss per step (grey) and its moving average (blue), drawn with PIL alone."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, width - 12, 12, height - 28
    draw.rectangle([left, top, right, bottom], outline="black")
    values = [float(v) for _, v in losses if math.isfinite(float(v))]
    if not values:
        draw.text((left + 8, top + 8), "no loss values yet", fill="black")
        return image
    low, high = min(values), max(values)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    steps = [s for s, v in losses if math.isfinite(float(v))]
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def point(step, value):
        x = left + (step - first) / (last - first) * (right - left)
        y = bottom - (value - low) / (high - low) * (bottom - top)
        return x, y

    draw.line([point(s, v) for s, v in zip(steps, values)], fill=(170, 170, 170), width=1)
    window = max(1, len(values) // 20)
    smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
              for i in range(len(values))]
    draw.line([point(s, v) for s, v in zip(steps, smooth)], fill=(30, 90, 200), width=2)
    draw.text((4, top), f"{high:.4g}", fill="black")
    draw.text((4, bottom - 10), f"{low:.4g}", fill="black")
    draw.text((left, bottom + 6), f"step {first}", fill="black")
    draw.text((right - 70, bottom + 6), f"step {steps[-1]}", fill="black")
    draw.text((left + 8, top + 4), f"loss (last {values[-1]:.4g})", fill=(30, 90, 200))
    return image
