"""Progress and Cancel for the encoding stage of training (the first run over a large dataset can take
minutes): the node's progress bar fills per encoder call and a Cancel stops between calls. What was
encoded before the Cancel stays in the encoding cache, so the next run starts where this one stopped."""

import logging
import time

from ..core import host


def encoding_progress(node_id=None, every_seconds=2.0):
    """A ``progress(done, total)`` callback for ``training.cache.encode_dataset``: checks Cancel, moves
    the node's bar and (at most every ``every_seconds``) writes "encoding dataset: done/total" under
    the node and in the log."""
    check = host.files.interrupt_check()
    state = {"bar": None, "total": None, "shown": 0.0}

    def report(done, total):
        check()  # raises ComfyUI's interrupt exception when the user pressed Cancel
        if state["bar"] is None or state["total"] != total:
            state["bar"], state["total"] = host.files.progress_bar(total, node_id), total
        state["bar"].update_absolute(done, total)
        now = time.monotonic()
        if done >= total or now - state["shown"] >= every_seconds:
            state["shown"] = now
            text = f"encoding dataset: {done}/{total}"
            logging.info("EliGen training: %s", text)
            host.files.send_progress_text(text, node_id)

    return report
