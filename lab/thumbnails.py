"""Template thumbnails from real runs, and the run times the template notes state.

    .venv/bin/python scripts/toyworld.py thumbnails [--threads N] [--json times.json]

The template browser asks for example_workflows/<template name>.jpg beside each workflow. This starts a
fresh headless ComfyUI (empty input/ and models/loras, as a new user has them), runs the toy templates'
API twins in their listed order at their shipped settings, times each (the training template in two
stages: writing the toy dataset, then training) and makes each thumbnail from what the run wrote:

    toy 1, 2, 4   four of the generated images
    toy 3         the training loss graph it saves
    toy 5         the painted layout it reads and three generated images
    6 to 9        the entity layout as the template's own EliGen Preview Entities node draws it, on a
                  grey canvas (the real models are not run here; the masks and prompts are the template's)
"""

import argparse
import glob
import json
import os
import threading
import time
from datetime import date

import numpy as np
from PIL import Image

from ..core.files import atomic_path
from ..toyworld import files
from . import painted, workflows
from .demo import server_threads

SIDE = 384  # px: the cards show a square crop of a few hundred pixels
QUALITY = 82
CANVAS_GREY = 0x808080


def template_names(folder=workflows.EXAMPLES_DIR):
    """The templates' names in their listed order (by their number)."""
    names = [os.path.basename(p)[:-5] for p in glob.glob(os.path.join(folder, "*.json"))]
    return sorted(names, key=lambda name: int(name.split(" ")[1]))


def save_thumbnail(image, path, side=SIDE):
    """A PIL image as a square JPEG: a near-square picture is centre-cropped, a wide or tall one (a loss
    graph) is fitted whole on white."""
    image = image.convert("RGB")
    width, height = image.size
    if max(width, height) > 1.25 * min(width, height):
        scale = side / max(width, height)
        fitted = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.LANCZOS)
        square = Image.new("RGB", (side, side), "white")
        square.paste(fitted, ((side - fitted.width) // 2, (side - fitted.height) // 2))
    else:
        crop = min(width, height)
        box = ((width - crop) // 2, (height - crop) // 2, (width + crop) // 2, (height + crop) // 2)
        square = image.crop(box).resize((side, side), Image.LANCZOS)
    with atomic_path(path) as temp:
        square.save(temp, format="JPEG", quality=QUALITY, optimize=True)
    return path


def grid(images, side=SIDE):
    """Up to four PIL images in a 2x2 grid (one image fills the square)."""
    images = images[:4]
    if len(images) == 1:
        return images[0]
    tile = side // 2
    sheet = Image.new("RGB", (side, side), "white")
    for k, image in enumerate(images):
        sheet.paste(image.convert("RGB").resize((tile, tile), Image.LANCZOS), ((k % 2) * tile, (k // 2) * tile))
    return sheet


def written_images(server, entry, node_ids=None):
    """PIL images a finished prompt's output nodes wrote (all nodes, or those in node_ids), in order."""
    outputs = {k: v for k, v in entry["outputs"].items() if node_ids is None or k in node_ids}
    return [Image.open(path) for path in server.output_files({"outputs": outputs})]


def layout_preview_graph(graph):
    """The part of a real-model template that feeds its EliGen Preview Entities node's entities, with the
    text encoder loader swapped for the toy one (the masks and prompts are what matter) and a grey
    canvas for the image."""
    preview_id = next(k for k, n in graph.items() if n["class_type"] == "EliGenPreviewEntities")
    clip_ids = {k for k, n in graph.items() if n["class_type"] in ("CLIPLoader", "DualCLIPLoader")}
    keep, todo = {}, [preview_id]
    while todo:
        key = todo.pop()
        if key in keep:
            continue
        keep[key] = json.loads(json.dumps(graph[key]))
        for name, value in keep[key]["inputs"].items():
            if isinstance(value, list) and not (key == preview_id and name == "image"):
                todo.append(str(value[0]))
    for key in clip_ids & set(keep):
        keep[key] = {"class_type": "EliGenToyModelLoader", "inputs": {"family": "flux", "weights": "pretrained", "seed": 0}}
    for node in keep.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and str(value[0]) in clip_ids:
                node["inputs"][name] = [str(value[0]), 1]  # the toy loader's CLIP output
        if node["class_type"] == "EliGenEntity":
            node["inputs"]["text_length"] = "real_length"  # the toy encoder has no 512-token padding
    canvas = max(int(k) for k in graph if k.isdigit()) + 1
    for node in keep.values():
        node.pop("_meta", None)
    side = [n["inputs"] for n in graph.values() if n["class_type"].startswith("Empty") and "width" in n["inputs"]][0]
    keep[str(canvas)] = {"class_type": "EmptyImage", "inputs": {
        "width": side["width"], "height": side["height"], "batch_size": 1, "color": CANVAS_GREY}}
    keep[preview_id]["inputs"]["image"] = [str(canvas), 0]
    return keep, preview_id


class LoadSampler:
    """The 1-minute load average every ``every`` seconds while it runs (other jobs share the machine)."""

    def __init__(self, every=10.0):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self):
        values = self.samples or [os.getloadavg()[0]]
        return {"min": round(min(values), 2), "mean": round(float(np.mean(values)), 2), "max": round(max(values), 2)}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def load_api(name, folder=workflows.EXAMPLES_DIR):
    with open(os.path.join(folder, "api", f"{name}.json")) as f:
        return json.load(f)


def timed_run(server, graph, timeout):
    started = time.monotonic()
    entry = server.run_workflow(graph, timeout=timeout)
    return entry, round(time.monotonic() - started, 1)


def toy_template_run(server, name, condition, timeout):
    """Runs one toy template; returns (its thumbnail, {stage: seconds})."""
    graph = load_api(name)
    if condition == "c":  # two stages: the toy dataset written, then the training
        dataset_id = next(k for k, n in graph.items() if n["class_type"] == "EliGenToyDataset")
        only_dataset = {dataset_id: graph[dataset_id],
                        "summary": {"class_type": "PreviewAny", "inputs": {"source": [dataset_id, 1]}}}
        _, written = timed_run(server, only_dataset, timeout)
        entry, trained = timed_run(server, graph, timeout)
        seconds = {f"{name}: toy dataset written": written,
                   f"{name}: training (dataset read and checked, encoding, steps)": trained}
        return written_images(server, entry)[0], seconds  # the loss graph
    entry, seconds = timed_run(server, graph, timeout)
    metric_id = next(k for k, n in graph.items() if n["class_type"] == "EliGenPlacementMetric")
    print(f"  {name}: {entry['outputs'][metric_id]['text'][0]}", flush=True)
    save_ids = {k for k, n in graph.items() if n["class_type"] == "SaveImage"}
    generated = written_images(server, entry, save_ids)
    if condition == "e":
        generated = [Image.open(os.path.join(server.input_dir, painted.LAYOUT_FILE))] + generated[:3]
    return grid(generated), {name: seconds}


def layout_preview_run(server, name, timeout):
    graph, preview_id = layout_preview_graph(load_api(name))
    entry, _ = timed_run(server, graph, timeout)
    return written_images(server, entry, {preview_id})[0], {}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Template thumbnails from real runs, and their run times.")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the server; 0: the demo's rule (every core unless busy, then 1)")
    parser.add_argument("--only", choices=("toy", "real"), help="only the toy templates, or only the real-model ones")
    parser.add_argument("--json", help="also write the times and the machine's load here")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds allowed per workflow")
    args = parser.parse_args(argv)
    toy = {name: condition for condition, name in workflows.TEMPLATE_NAMES.items()}
    names = [name for name in template_names() if args.only is None or (name in toy) == (args.only == "toy")]
    server_module = workflows.load_server_class()
    threads = args.threads or server_threads()
    print(f"{len(names)} templates; ComfyUI on {threads} torch thread(s); load average {os.getloadavg()}", flush=True)
    seconds = {}
    with LoadSampler() as load, server_module.ComfyServer(torch_threads=threads) as server:
        server.check_nodes_loaded(server_module.expected_node_ids("comfyui_eligen"))
        for name in names:  # in the listed order: a template may need an earlier one's output
            if name in toy:
                thumbnail, took = toy_template_run(server, name, toy[name], args.timeout)
            else:
                thumbnail, took = layout_preview_run(server, name, args.timeout)
            seconds.update(took)
            path = save_thumbnail(thumbnail, os.path.join(workflows.EXAMPLES_DIR, f"{name}.jpg"))
            print(f"wrote {os.path.relpath(path, workflows.REPO)} ({os.path.getsize(path) // 1024} KB); {took}", flush=True)
    report = {"date": date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads,
              "load_average_1min_during": load.summary(), "seconds": seconds}
    print(json.dumps(report, indent=1))
    if args.json:
        files.write_json(args.json, report)
    return True
