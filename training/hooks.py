"""How a training run reports and is stopped: the node gives ComfyUI's progress bar, previews and
Cancel; the command line prints. Every hook is optional."""

import logging
from dataclasses import dataclass
from typing import Callable


def log_info(message):
    logging.info("EliGen training: %s", message)


@dataclass
class Hooks:
    progress: Callable | None = None           # (step, total, loss, seconds_left) after each optimizer step
    preview: Callable | None = None            # (step, images [B, H, W, 3]) when validation images were made
    check_cancel: Callable | None = None       # before each micro-batch; raising stops (a checkpoint is kept)
    encoding_progress: Callable | None = None  # (done, total) while the dataset is encoded; may raise to stop
    log: Callable = log_info                   # (message) for what a run does (the dataset summary)
    started: Callable | None = None            # (job, run folder) once the outputs are checked, before encoding
