"""Block swap: train a model larger than the device memory by streaming transformer blocks.

A chosen set of transformer blocks keeps its frozen base tensors (weights, biases, fp8 scales, norms)
in (pinned) CPU memory. Each such block is brought to the compute device just before it runs and
released right after; the next swapped block is copied on a side CUDA stream while the current one
computes (prefetch), and an event orders the copy before its use. In the backward pass the swapped
blocks are recomputed (they always run under non-reentrant checkpointing, so none of their
activations or weights has to stay on the device between forward and backward): the recomputation
swaps the block in again, in reverse order, prefetching the previous swapped block.

The peft LoRA layers (and so the optimizer state) never move: only tensors that do not require grad
are swapped. A swapped-out tensor is replaced by an empty placeholder of its dtype on the compute
device, so a block that ran without its swap-in fails loudly instead of computing something else.

Why swapping in means installing *new* Parameter objects (not assigning ``.data``): autograd keeps
references to the tensors a block used; releasing a block replaces the module's entry and leaves those
references intact, so a backward that still needs them sees the real values, and the device memory is
freed when the last reference goes.

``memory_budget`` turns ``max_vram_gb`` into a budget: a number is that many GiB; 0 (the default) is
automatic: on CUDA what the device has minus ``DEVICE_RESERVE_BYTES``, no limit elsewhere.
``plan_memory`` estimates what a training step needs (before the model is loaded, so a run that fits
loads the usual way) and ``plan_block_swap`` chooses how many blocks to swap to stay within the budget;
``describe`` says what was chosen and why, for the log.
"""

import logging
from dataclasses import dataclass, field

import torch

from ..core import host

GIB = 1024 ** 3
# Activation model (per transformer block, in units of batch * tokens * width * compute-dtype bytes):
# a block's saved activations without checkpointing, and the working set of one block's forward and
# backward. Calibrated on FLUX.1 at 1024 px: bf16 without checkpointing needs ~0.6 GB per block more
# than with it, i.e. ~15 units.
ACTIVATION_UNITS_PER_BLOCK = 16
WORKING_UNITS = 32
RESERVE_BYTES = int(0.75 * GIB)   # allocator fragmentation, cuBLAS workspace, small tensors
ADAM_BYTES_PER_PARAM = 8          # two fp32 moments
# What the automatic budget (max_vram_gb = 0 on CUDA) leaves of the device's memory: what the estimate
# cannot see because PyTorch's allocator does not hold it. The CUDA context with its loaded kernels
# (cuBLAS, cuDNN) takes about 0.3-0.6 GiB with CUDA's lazy kernel loading, and a desktop drawn on the
# same card a few hundred MiB more. (RESERVE_BYTES, inside the estimate, is the allocator's own slack.)
DEVICE_RESERVE_BYTES = GIB


# ---------------------------------------------------------------------------------------------------
# Which blocks, and their sizes


def ordered_blocks(diffusion_model, training_blocks):
    """[(kind, index, module)] in execution order (the order of ``training_blocks``, then index)."""
    out = []
    for kind, (attribute, _) in training_blocks.items():
        for index, block in enumerate(getattr(diffusion_model, attribute)):
            out.append((kind, index, block))
    return out


def frozen_slots(module, trainable_ids):
    """[(owner, "_parameters"|"_buffers", name)] of the tensors under ``module`` that are not trained."""
    slots = []
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, tensor in getattr(owner, kind).items():
                if tensor is None or id(tensor) in trainable_ids or tensor.requires_grad:
                    continue
                slots.append((owner, kind, name))
    return slots


def tensor_bytes(tensor):
    return tensor.numel() * tensor.element_size()


def module_bytes(module):
    """Bytes of every parameter and buffer under ``module``."""
    return sum(tensor_bytes(t) for t in module.parameters()) + sum(tensor_bytes(t) for t in module.buffers())


def block_width(block):
    """The model width D: the most common ``in_features`` of the block's Linears (qkv, projections and
    MLP inputs all read D-wide tokens)."""
    counts = {}
    for module in block.modules():
        if isinstance(module, torch.nn.Linear):
            counts[module.in_features] = counts.get(module.in_features, 0) + 1
    if not counts:
        raise ValueError(f"cannot estimate activations: block {type(block).__name__} has no Linear layer")
    return max(counts, key=lambda width: (counts[width], width))


# ---------------------------------------------------------------------------------------------------
# The plan


@dataclass
class MemoryEstimate:
    """Bytes the training step needs on the device, by kind (what the planner compares to the budget)."""
    block_bytes: list            # frozen bytes per block, execution order
    other_bytes: int             # frozen bytes outside the blocks (embedders, final layer)
    lora_bytes: int              # LoRA parameters + gradients + AdamW moments
    unit_bytes: int              # batch * tokens * width * compute bytes: one block input
    mask_bytes: int              # the EliGen attention mask (additive, compute dtype)
    cast_bytes: int              # compute-dtype copies of the largest block (fp8 weights are cast per layer)
    checkpointing: bool

    def device_bytes(self, swapped):
        """Estimated peak with the blocks at positions ``swapped`` kept off the device."""
        swapped = set(swapped)
        resident = sum(b for i, b in enumerate(self.block_bytes) if i not in swapped)
        # the swapped block running and the next one arriving
        buffers = 2 * max((self.block_bytes[i] for i in swapped), default=0)
        activations = sum(
            self.unit_bytes if (self.checkpointing or i in swapped) else ACTIVATION_UNITS_PER_BLOCK * self.unit_bytes
            for i in range(len(self.block_bytes))
        ) + WORKING_UNITS * self.unit_bytes
        return (self.other_bytes + resident + buffers + self.lora_bytes + activations + self.mask_bytes
                + self.cast_bytes + RESERVE_BYTES)


@dataclass
class SwapPlan:
    positions: list              # execution positions of the swapped blocks
    total_blocks: int
    budget_bytes: int | None     # None: no limit
    estimate: MemoryEstimate | None = None
    reason: str = ""
    fits: bool = True
    block_names: list = field(default_factory=list)
    fixed: bool = False          # the count was given (blocks_to_swap), not chosen from the budget
    budget_reason: str = ""      # where the budget comes from (memory_budget)

    @property
    def count(self):
        return len(self.positions)

    @property
    def swaps(self):
        """Whether training runs through block swap (a fixed count, or blocks chosen from the budget)."""
        return self.fixed or self.count > 0


def spread(count, total):
    """``count`` positions out of ``total``, evenly spread, so every swapped block's copy overlaps the
    compute of the resident blocks before it."""
    if count <= 0:
        return []
    if count >= total:
        return list(range(total))
    return sorted({int((i + 0.5) * total / count) for i in range(count)})


def plan_block_swap(estimate, budget_bytes, fixed_count=None):
    """The fewest evenly spread swapped blocks whose estimated peak fits ``budget_bytes``.

    ``fixed_count`` (>= 0) overrides the choice. Without a budget nothing is swapped. When even swapping
    every block does not fit, every block is swapped and ``fits`` is False (the log says so)."""
    total = len(estimate.block_bytes)
    if fixed_count is not None and fixed_count >= 0:
        positions = spread(min(fixed_count, total), total)
        need = estimate.device_bytes(positions)
        return SwapPlan(positions, total, budget_bytes, estimate,
                        f"blocks_to_swap = {fixed_count} was set; estimated peak {need / GIB:.2f} GiB",
                        budget_bytes is None or need <= budget_bytes, fixed=True)
    if budget_bytes is None:
        need = estimate.device_bytes([])
        return SwapPlan([], total, None, estimate, f"no memory limit; estimated peak {need / GIB:.2f} GiB")
    for count in range(total + 1):
        positions = spread(count, total)
        need = estimate.device_bytes(positions)
        if need <= budget_bytes:
            why = (f"estimated peak {need / GIB:.2f} GiB <= budget {budget_bytes / GIB:.2f} GiB"
                   + ("" if count == 0 else
                      f"; with {count - 1} it would be {estimate.device_bytes(spread(count - 1, total)) / GIB:.2f} GiB"))
            return SwapPlan(positions, total, budget_bytes, estimate, why)
    need = estimate.device_bytes(list(range(total)))
    return SwapPlan(list(range(total)), total, budget_bytes, estimate,
                    f"even with every block swapped the estimated peak is {need / GIB:.2f} GiB > budget "
                    f"{budget_bytes / GIB:.2f} GiB (lower the image size, batch or rank, or turn on "
                    "gradient checkpointing)", fits=False)


def estimate_memory(diffusion_model, training_blocks, lora_parameters, lora_dtype, samples, batch_size,
                    compute_dtype, checkpointing):
    """A ``MemoryEstimate`` for training ``diffusion_model`` (before the LoRA layers are injected: every
    tensor it has is frozen base) with ``lora_parameters`` LoRA weights of ``lora_dtype`` on ``samples``
    (the largest sample decides: latent ``[C, (T,) h, w]``, text and entity lengths). Reads shapes and
    dtypes only, so it works on a model on the meta device or on its offload device."""
    blocks = ordered_blocks(diffusion_model, training_blocks)
    block_bytes = [module_bytes(block) for _, _, block in blocks]
    other_bytes = module_bytes(diffusion_model) - sum(block_bytes)
    lora_element = torch.empty((), dtype=lora_dtype).element_size()
    lora_bytes = lora_parameters * (2 * lora_element + ADAM_BYTES_PER_PARAM)  # weights, gradients, moments
    width = block_width(blocks[0][2])
    compute_bytes = torch.empty((), dtype=compute_dtype).element_size()
    tokens = max(_tokens(s) for s in samples) if samples else 0
    unit = batch_size * tokens * width * compute_bytes
    largest = max(range(len(blocks)), key=lambda i: block_bytes[i])
    # The LoRA's dtype counts as the block's too (its weights sit in every block): under autocast its float32
    # weights get compute-dtype copies. A block's worth for it keeps the estimate above the peaks measured
    # with bf16 bases (FLUX.1 27.0 against 26.4 GiB, Qwen-Image 43.6 against 43.0 on an H200).
    weight_dtypes = {t.dtype for t in blocks[largest][2].parameters() if t.is_floating_point()} | {lora_dtype}
    cast_bytes = 0
    if any(d != compute_dtype for d in weight_dtypes):
        cast_bytes = sum(t.numel() for t in blocks[largest][2].parameters()) * compute_bytes
    return MemoryEstimate(block_bytes, other_bytes, lora_bytes, unit, batch_size * tokens * tokens * compute_bytes,
                          cast_bytes, checkpointing)


def _tokens(sample):
    latent = sample.latent
    grid = 1
    for size in latent.shape[-2:]:
        grid *= -(-int(size) // 2)  # patch 2
    frames = latent.shape[1] if latent.ndim == 4 else 1
    text = sample.context.shape[1] + sum(e.shape[1] for e in sample.entity_embeds)
    return grid * frames + text


def describe(plan):
    """One log line: where the budget comes from, what was chosen and why."""
    budget = f"{plan.budget_reason}; " if plan.budget_reason else ""
    if plan.estimate is None:
        return f"{budget}block swap: {plan.count} of {plan.total_blocks} blocks ({plan.reason})"
    e = plan.estimate
    parts = (f"weights {(e.other_bytes + sum(e.block_bytes)) / GIB:.2f} GiB in {plan.total_blocks} blocks "
             f"(largest {max(e.block_bytes) / GIB:.3f} GiB), LoRA+AdamW {e.lora_bytes / GIB:.3f} GiB, "
             f"activation unit {e.unit_bytes / 2**20:.1f} MiB, checkpointing {'on' if e.checkpointing else 'off'}")
    swapped = sum(e.block_bytes[i] for i in plan.positions)
    return (f"{budget}block swap: {plan.count} of {plan.total_blocks} blocks kept in CPU memory "
            f"({swapped / GIB:.2f} GiB streamed per pass): {plan.reason}. Estimate from {parts}.")


# ---------------------------------------------------------------------------------------------------
# The budget and the plan of a training run


@dataclass
class MemoryBudget:
    bytes: int | None            # None: no limit
    reason: str                  # where it comes from, for the log


def device_memory(device):
    """(bytes this process may use, a description) of a CUDA device, as torch reports them: its total
    memory, times the process's memory fraction when one is set. The one place that reads them."""
    properties = torch.cuda.get_device_properties(device)
    total, name = properties.total_memory, f"{properties.name} ({device})"
    read_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # absent from older torch
    share = read_fraction(device) if read_fraction is not None else 1.0
    if share < 1.0:
        return int(total * share), f"{name} (this process may use {share:.3f} of its {total / GIB:.2f} GiB)"
    return total, name


def automatic_budget(total_bytes, device_name):
    """The budget ``max_vram_gb`` = 0 gives on a CUDA device of ``total_bytes``: all but the reserve."""
    budget = max(0, total_bytes - DEVICE_RESERVE_BYTES)
    return MemoryBudget(budget, f"max_vram_gb automatic: {device_name} has {total_bytes / GIB:.2f} GiB; keeping "
                                f"{DEVICE_RESERVE_BYTES / GIB:.2f} GiB free for the CUDA context and the display "
                                f"leaves a budget of {budget / GIB:.2f} GiB")


def memory_budget(max_vram_gb, device, sharded=False):
    """The device budget of a training run: ``max_vram_gb`` GiB when it is above 0; else automatic: on
    CUDA ``automatic_budget`` of what the device has, no limit on other devices and under FSDP
    (``sharded``: each GPU holds only a shard of the base, which the estimate does not model)."""
    if max_vram_gb > 0:
        return MemoryBudget(int(max_vram_gb * GIB), f"max_vram_gb = {max_vram_gb:g} GiB")
    device = torch.device(device)
    if device.type != "cuda":
        return MemoryBudget(None, f"max_vram_gb automatic: no limit on the {device.type} device (a budget applies "
                                  "on CUDA only)")
    if sharded:
        return MemoryBudget(None, "max_vram_gb automatic: no limit under FSDP (each GPU holds a shard of the "
                                  "base); set max_vram_gb to swap blocks")
    return automatic_budget(*device_memory(device))


def plan_memory(diffusion_model, training_blocks, lora_parameters, lora_dtype, request, budget, compute_dtype,
                checkpointing):
    """The block-swap plan of a training run, made before the model is loaded; None when there is no
    limit and no fixed block count (nothing to estimate). ``request``: a MemoryRequest; ``budget``: a
    MemoryBudget. A plan that swaps nothing (``not plan.swaps``) trains the usual way."""
    fixed = request.blocks_to_swap if request.blocks_to_swap >= 0 else None
    if budget.bytes is None and fixed is None:
        return None
    estimate = estimate_memory(diffusion_model, training_blocks, lora_parameters, lora_dtype, request.samples,
                               request.batch_size, request.autocast_dtype or compute_dtype, checkpointing)
    plan = plan_block_swap(estimate, budget.bytes, fixed)
    plan.budget_reason = budget.reason
    blocks = ordered_blocks(diffusion_model, training_blocks)
    plan.block_names = [f"{kind} {index}" for kind, index, _ in (blocks[i] for i in plan.positions)]
    return plan


def log_plan(budget, plan):
    """The training run's one memory line: the plan, or why there is no limit."""
    if plan is None:
        logging.info("EliGen training: %s.", budget.reason)
    else:
        (logging.info if plan.fits else logging.warning)("EliGen training: %s", describe(plan))


# ---------------------------------------------------------------------------------------------------
# The swapper


class _Slot:
    __slots__ = ("owner", "kind", "name", "original", "store", "placeholder")


class BlockSwapper:
    """Keeps the frozen tensors of the blocks at ``positions`` off the device and swaps them in around
    each run. ``blocks``: modules in execution order. ``trainable``: tensors never touched.

    Use ``wrap(position, function)`` for the function that runs a block; ``close()`` puts the original
    tensors back (also on failure). ``events`` records ("in"/"out", position, "forward"/"backward") when
    ``record`` is true (tests check the order)."""

    def __init__(self, blocks, positions, device, trainable=(), record=False):
        self.device = torch.device(device)
        self.positions = sorted(positions)
        self.record = record
        self.events = []
        self.use_streams = self.device.type == "cuda" and torch.cuda.is_available()
        self._copy_stream = torch.cuda.Stream(self.device) if self.use_streams else None
        self._pending = {}      # position -> (event, {slot index: device tensor}) prefetched
        self._resident = {}     # position -> count of active runs
        trainable_ids = {id(t) for t in trainable}
        self.slots = {}
        try:
            for position in self.positions:
                slots = []
                for owner, kind, name in frozen_slots(blocks[position], trainable_ids):
                    slot = _Slot()
                    slot.owner, slot.kind, slot.name = owner, kind, name
                    slot.original = getattr(owner, kind)[name]
                    slot.store = self._host_copy(slot.original)
                    slot.placeholder = self._wrap_like(slot.original, torch.empty(0, dtype=slot.original.dtype,
                                                                                  device=self.device))
                    slots.append(slot)
                self.slots[position] = slots
                self._install(position, [s.placeholder for s in slots])
        except BaseException:
            self.close()
            raise

    # -- storage --------------------------------------------------------------------------------
    def _host_copy(self, tensor):
        data = tensor.detach()
        if not self.use_streams:
            return data if data.device.type == "cpu" else data.to("cpu")
        if data.device.type == "cpu" and data.is_pinned():
            return data
        return data.to("cpu").contiguous().pin_memory()

    @staticmethod
    def _wrap_like(original, data):
        if isinstance(original, torch.nn.Parameter):
            return torch.nn.Parameter(data, requires_grad=False)
        return data

    def _install(self, position, tensors):
        for slot, tensor in zip(self.slots[position], tensors):
            getattr(slot.owner, slot.kind)[slot.name] = tensor

    def _copy_to_device(self, position):
        slots = self.slots[position]
        if not self.use_streams:
            return None, [s.store.to(self.device) for s in slots]
        with torch.cuda.stream(self._copy_stream):
            tensors = [s.store.to(self.device, non_blocking=True) for s in slots]
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return event, tensors

    @property
    def bytes_swapped(self):
        return sum(tensor_bytes(s.store) for slots in self.slots.values() for s in slots)

    # -- swapping -------------------------------------------------------------------------------
    def _direction(self):
        # Inside backward (checkpoint recomputation) the autograd engine runs a graph task.
        return "backward" if torch._C._current_graph_task_id() != -1 else "forward"

    def prefetch(self, position):
        if position is None or position in self._pending or self._resident.get(position):
            return
        self._pending[position] = self._copy_to_device(position)
        if self.record:
            self.events.append(("prefetch", position, self._direction()))

    def swap_in(self, position):
        direction = self._direction()
        if self._resident.get(position):
            self._resident[position] += 1
            return
        event, tensors = self._pending.pop(position, None) or self._copy_to_device(position)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for tensor in tensors:
                # memory made on the copy stream is used on the compute stream: keep it until then
                tensor.record_stream(compute)
        self._install(position, [self._wrap_like(s.original, t) for s, t in zip(self.slots[position], tensors)])
        self._resident[position] = 1
        if self.record:
            self.events.append(("in", position, direction))
        self.prefetch(self._neighbour(position, direction))

    def swap_out(self, position):
        self._resident[position] -= 1
        if self._resident[position]:
            return
        del self._resident[position]
        self._install(position, [s.placeholder for s in self.slots[position]])
        direction = self._direction()
        if self.record:
            self.events.append(("out", position, direction))
        if direction == "forward" and torch.is_grad_enabled() and position == self.positions[-1]:
            # backward recomputes the last swapped block first: start its copy now, during the blocks
            # after it and the loss
            self.prefetch(position)

    def _neighbour(self, position, direction):
        index = self.positions.index(position)
        index += 1 if direction == "forward" else -1
        return self.positions[index] if 0 <= index < len(self.positions) else None

    def wrap(self, position, function):
        """``function`` with the block at ``position`` swapped in while it runs (forward, validation and
        checkpoint recomputation alike). Swap-out sits in ``finally``: checkpoint recomputation stops
        the function early once it has what backward needs."""
        if position not in self.slots:
            return function

        def run(*args, **kwargs):
            self.swap_in(position)
            try:
                return function(*args, **kwargs)
            finally:
                self.swap_out(position)

        return run

    def close(self):
        """Original tensors back in every swapped block; pending copies dropped."""
        if self.use_streams:
            self._copy_stream.synchronize()
        self._pending.clear()
        self._resident.clear()
        for position, slots in self.slots.items():
            self._install(position, [s.original for s in slots])
        self.slots = {}


# ---------------------------------------------------------------------------------------------------
# Loading a model for block swap (used by training/loop.py TrainingModel)


@dataclass
class MemoryRequest:
    """What the trainer asks of block swap: a device budget (GiB, 0 = automatic, see ``memory_budget``)
    or a fixed block count (-1 = choose from the budget), and what the activation estimate needs."""
    max_vram_gb: float = 0.0
    blocks_to_swap: int = -1
    samples: list = field(default_factory=list)
    batch_size: int = 1
    autocast_dtype: torch.dtype | None = None


class SwapSession:
    """The model side of block swap for one training run.

    ``load``: every other model leaves the device, the ModelPatcher's weight patches are applied with
    all weights on its offload device (CPU). ``start`` (after the LoRA layers exist): keep the frozen
    tensors of the blocks the plan (``plan_memory``) names in pinned CPU memory, move everything else
    (LoRA included) to the device. ``close``: original tensors back, weight patches undone, model on the
    offload device."""

    def __init__(self, model_patcher, device, plan, record=False):
        self.patcher, self.device, self.plan, self.record = model_patcher, torch.device(device), plan, record
        self.swapper, self._loaded = None, False

    def load(self):
        host.memory.unload_models_on(self.device)
        host.memory.patch_weights_on_offload_device(self.patcher)
        self._loaded = True

    def start(self, diffusion_model, training_blocks, trainable):
        blocks = ordered_blocks(diffusion_model, training_blocks)
        self.swapper = BlockSwapper([b for _, _, b in blocks], self.plan.positions, self.device, trainable,
                                    record=self.record)
        self.patcher.model.to(self.device)  # the resident part, LoRA layers and the placeholders

    def block_wrapper(self, position):
        if self.swapper is None or position not in self.swapper.slots:
            return None
        return lambda function: self.swapper.wrap(position, function)

    def close_swapper(self):
        if self.swapper is not None:
            self.swapper.close()

    def unload(self):
        if self._loaded:
            self._loaded = False
            host.memory.unpatch_weights(self.patcher)
