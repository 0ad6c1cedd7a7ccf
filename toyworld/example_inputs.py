"""The pictures the example workflows load (example_workflows/inputs/), copied into ComfyUI's input folder
at start-up when a file of that name is not there, so a template opened from the template browser runs
on the first Run. A file already there (the user's, or an earlier copy) is never replaced, and nothing
is written inside the package folder, which may be read-only."""

import logging
import os
import shutil

from ..core.files import atomic_path

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_INPUTS = os.path.join(PACKAGE, "example_workflows", "inputs")
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def provide_example_inputs(input_dir, source=EXAMPLE_INPUTS, log=logging.getLogger("comfyui_eligen")):
    """Copy each example picture into ``input_dir`` unless a file of its name is there. Returns the names
    copied. A folder that cannot be written gets one warning line naming it; start-up goes on."""
    copied = []
    if not os.path.isdir(source):
        return copied
    for name in sorted(os.listdir(source)):
        target = os.path.join(input_dir, name)
        if not name.lower().endswith(PICTURE_EXTENSIONS) or os.path.lexists(target):
            continue
        try:
            with atomic_path(target) as temp:
                shutil.copyfile(os.path.join(source, name), temp)
        except OSError as error:
            log.warning("EliGen: could not copy the example picture %s into %s (%s); upload it in the "
                        "Load Image node of the painted-layout template instead", name, input_dir, error)
            continue
        copied.append(name)
    return copied
