"""The headless trainer: a run file (training/run_file.py) trained without a ComfyUI server, in one
process or under torchrun (scripts/train.py is the command).

"run file -> job" plus loaders: it loads the models as the loader nodes of the run file would
(ComfyUI's own loading functions, through core/host/; other loaders, such as the toy world's, are
passed in by the caller) and hands the job to training/runner.py, the node's runner. The run folder
holds the checkpoints, the LoRA ``<lora_name>.safetensors``, ``loss.png`` and validation images.
"""

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, replace

import torch

from ..core import host
from . import distributed as dist_lib
from .dataset import load_dataset
from .hooks import Hooks
from .job import COMPONENTS, LOADERS, RunFileError
from .outputs import folder_outputs
from .rank_watch import RankWatch
from .run_file import load_run
from .runner import JobInputs, run_job

STOCK_LOADERS = {  # loader node -> its outputs, loaded as that node does
    "CheckpointLoaderSimple": lambda ckpt_name: host.files.load_checkpoint_file(ckpt_name),
    "UNETLoader": lambda unet_name, weight_dtype: (host.files.load_diffusion_model_file(unet_name, weight_dtype),),
    "CLIPLoader": lambda clip_name, type, device: (host.files.load_text_encoder_files([clip_name], type, device),),
    "DualCLIPLoader": lambda clip_name1, clip_name2, type, device: (
        host.files.load_text_encoder_files([clip_name1, clip_name2], type, device),),
    "VAELoader": lambda vae_name: (host.files.load_vae_file(vae_name),),
}


def load_components(job, loaders):
    """(model, clip, vae) of a job read from a run file; a loader shared by several components is called
    once. ``loaders``: loader node -> function of its inputs giving its outputs."""
    loaded, out = {}, []
    for component in COMPONENTS:
        spec = getattr(job, component)
        if spec.loader not in loaders:
            raise RunFileError(f"field '{component}.loader': {spec.loader} cannot be loaded by this program "
                               f"(it loads {', '.join(loaders)})")
        key = json.dumps([spec.loader, spec.inputs], sort_keys=True)
        if key not in loaded:
            loaded[key] = loaders[spec.loader](**spec.inputs)
        out.append(loaded[key][LOADERS[spec.loader][1][component]])
    return tuple(out)


@dataclass
class Options:
    run_dir: str                      # checkpoints, the LoRA, loss.png (default: the run file's folder)
    resume: str | None = None         # None, "latest" or a checkpoint file name
    batch_size: int | None = None     # per-rank micro-batch (default: the run file's train.batch_size)
    steps: int | None = None          # total steps (default: the run file's)
    cache_dir: str | None = None      # disk cache (default: <run_dir>/../cache)


def printing_hooks(group, check_cancel=None):
    """Progress lines on stdout (the writing rank only); ``check_cancel`` before each micro-batch."""
    started = time.monotonic()
    ranks = "" if group is None else f" ({group.world} ranks)"

    def progress(step, total, loss, seconds_left):
        print(f"step {step}/{total} loss {loss:.6f}{ranks} ~{seconds_left / 60:.1f} min left "
              f"[{time.monotonic() - started:.1f} s]", flush=True)

    def log(message):
        print(f"EliGen training: {message}", flush=True)

    if group is not None and not group.is_writer:
        return Hooks(check_cancel=check_cancel)
    return Hooks(progress=progress, log=log, check_cancel=check_cancel)


def run(job, options, group=None, loaders=None, watch=None):
    """Train a job read from a run file. Returns the runner's JobResult (on every rank; ``lora_path``
    only on the writing rank). ``loaders`` adds loader nodes to the stock ones (e.g. the toy world's);
    ``watch``: the rank's RankWatch under torchrun (the loop stops at a safe point after SIGTERM)."""
    overrides = {k: v for k, v in (("batch_size", options.batch_size), ("steps", options.steps)) if v is not None}
    job = replace(job, train=replace(job.train, **overrides))
    job.validate()
    folders = folder_outputs(options.run_dir, options.cache_dir)
    with torch.inference_mode():  # as ComfyUI runs nodes: loaders see the same mode
        model, clip, vae = load_components(job, {**STOCK_LOADERS, **(loaders or {})})
        dataset = load_dataset(job.dataset.folder, job.dataset.max_pixels)
    hooks = printing_hooks(group, watch.check_stop if watch is not None else None)
    return run_job(job, JobInputs(model, clip, vae, dataset), folders, hooks, options.resume, group)


def _eligen_or_warning(record):
    return record.levelno >= logging.WARNING or record.getMessage().startswith("EliGen")


def show_eligen_info():
    """Log to stderr what the run decides at INFO (block swap, removed temp files), as the node's log
    does; ComfyUI's own INFO lines (model loads) stay out."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(_eligen_or_warning)
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def main(argv=None, device="cpu", loaders=None):
    """Command line of scripts/train.py (after ComfyUI is importable); ``loaders`` as for ``run``."""
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_file", help="run.json written by the EliGen Train node (or by hand)")
    parser.add_argument("--run-dir", help="folder for checkpoints, the LoRA and loss.png (default: the run file's)")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint file name in the run folder")
    parser.add_argument("--batch-size", type=int, help="micro-batch per process (default: the run file's)")
    parser.add_argument("--steps", type=int, help="total optimizer steps (default: the run file's)")
    parser.add_argument("--cache-dir", help="shared disk cache (default: <run-dir>/../cache)")
    parser.add_argument("--models-dir", help="also look for model files in this folder (ComfyUI's layout)")
    parser.add_argument("--device", default=device, choices=["cpu", "cuda"])
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the frozen base weights over the processes (FSDP fully_shard)")
    args = parser.parse_args(argv)
    show_eligen_info()

    if args.models_dir:
        host.files.add_models_dir(args.models_dir)
    group = dist_lib.init_from_environment(args.device)
    rank = 0 if group is None else group.rank
    if args.fsdp and group is None:
        parser.error("--fsdp shards over processes: start it with torchrun --nproc_per_node N (N > 1)")
    if group is not None:
        group.fsdp = args.fsdp
    watch = None
    try:
        run_dir = args.run_dir or os.path.dirname(os.path.abspath(args.run_file))
        if group is not None:  # a rank that dies is named by the others (training/rank_watch.py)
            watch = RankWatch(group, run_dir).start()
        job = load_run(args.run_file)
        options = Options(run_dir=run_dir, resume=args.resume, batch_size=args.batch_size, steps=args.steps,
                          cache_dir=args.cache_dir)
        done = run(job, options, group, loaders, watch)
        if done.lora_path is not None:
            print(f"saved {done.lora_path} after {done.result.step} steps", flush=True)
        if watch is not None:
            watch.finished()
    except BaseException as error:
        if watch is None:
            where = "" if group is None else f"rank {rank} of {group.world}: "
            print(f"EliGen training failed: {where}{type(error).__name__}: {error}", file=sys.stderr, flush=True)
            if group is None and isinstance(error, ValueError):
                # the package's named errors (bad run file, outputs, resume) say it all: no traceback
                raise SystemExit(1) from None
            raise
        if watch.report(error):
            raise  # this rank's own error: its traceback too
        raise SystemExit(1) from None  # another rank's failure, already named
    finally:
        if group is not None:
            group.close()
