"""The package installed the way users install it, into a user's ComfyUI 0.3.75: a venv holding only
ComfyUI's own requirements (tests/support/user_comfyui.py; no scripts/setup.sh, no peft, no test tools), built
once per session and shared by the cases:

- (a) as ComfyUI-Manager (or a user by hand) installs it: a git clone of the committed HEAD into
  ``custom_nodes/ComfyUI-EliGen``, then ``pip install -r requirements.txt``;
- (b) as ``comfy node install`` installs it from the Registry: the ``comfy node pack`` archive unpacked into
  ``custom_nodes/comfyui-eligen``, then ``pip install -r`` its ``requirements.txt``;
- without peft: the clone, its requirements not installed.

Each case starts the user's ComfyUI on that install and checks: no import failure in the start-up log,
every EliGen node in /object_info, the toy workflow (a) through /prompt; with peft a short toy training
(the shipped workflow (c)) whose LoRA the stock LoraLoaderModelOnly and KSampler then use (workflow (d));
without peft one start-up line and the train node's message, both with the command that installs it.
Every case starts without peft (a fixture uninstalls it), so each install's own requirements.txt brings it.

The package folder is read-only while ComfyUI runs and nothing in it may change: its tree (names, sizes,
modification times, modes) is compared before and after. The comparison is what enforces it where the
tests run as root (permission bits do not stop root); the server runs with PYTHONDONTWRITEBYTECODE
because on a read-only folder Python skips its bytecode cache by itself.

It fails, never skips, when the environment cannot be built (no package index, no pip cache).
"""

import json
import os
import shutil
import stat
import subprocess
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

import user_comfyui
from comfy_server import REPO, ComfyServer, ServerError, expected_node_ids, find_comfyui_dir
from test_pack import run_comfy

from comfyui_eligen.lab.workflows import TEMPLATE_NAMES
from comfyui_eligen.toyworld import data

pytestmark = pytest.mark.user_install

MANAGER_FOLDER = "ComfyUI-EliGen"   # what a git clone of the repository is called
REGISTRY_FOLDER = "comfyui-eligen"  # what comfy node install names it: the Registry id
TOY_DATASET = "eligen_toy_train"    # the folder in input/ the shipped training workflow writes and reads


def say(text):
    """A line for the test log (pytest -s, and CI's output): what the report quotes."""
    print(f"[user-install] {text}", flush=True)


@pytest.fixture(scope="session")
def user_env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user-comfyui")
    try:
        env = user_comfyui.build(str(folder), find_comfyui_dir())
    except (user_comfyui.BuildError, subprocess.SubprocessError, OSError) as error:
        pytest.fail(f"could not build the user's ComfyUI environment in {folder}: {error}", pytrace=False)
    torch_file = subprocess.run([env.python, "-c", "import torch; print(torch.__file__)"], capture_output=True,
                                text=True, env=user_comfyui.clean_env()).stdout.strip()
    assert torch_file.startswith(os.path.join(str(folder), "torch-family")), f"torch comes from {torch_file!r}"
    say(f"user venv built in {env.seconds['total']:.0f} s (venv {env.seconds['venv']:.0f} s, torch-family overlay "
        f"{env.seconds['overlay']:.0f} s for {len(env.shared)} distributions, pip {env.seconds['pip']:.0f} s; "
        f"pip {env.version('pip')})")
    yield env
    shutil.rmtree(folder, ignore_errors=True)  # ~0.8 GB; pytest would keep it with its last three runs


@pytest.fixture(scope="session")
def head(tmp_path_factory):
    """The committed HEAD of this repository: its commit and a clone of it."""
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode != 0:
        pytest.fail(f"the user-install test needs a git checkout of the repository: {commit.stderr}", pytrace=False)
    clone = tmp_path_factory.mktemp("head") / MANAGER_FOLDER
    clone_head(commit.stdout.strip(), clone)
    return commit.stdout.strip(), clone


def clone_head(commit, folder):
    # --no-hardlinks: a local clone would share its object files' inodes with this repository (and with a
    # clone another test run makes at the same time), so making this folder read-only would change theirs
    for command in (["git", "clone", "--quiet", "--no-checkout", "--no-hardlinks", REPO, str(folder)],
                    ["git", "-C", str(folder), "checkout", "--quiet", commit]):
        subprocess.run(command, check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def registry_archive(head):
    """``comfy node pack`` of the committed HEAD (what ``comfy node publish`` uploads)."""
    _, clone = head
    started = time.monotonic()
    run_comfy(clone, "node", "pack")
    say(f"comfy node pack: {time.monotonic() - started:.0f} s")
    return clone / "node.zip"


@pytest.fixture
def without_peft(user_env):
    if user_env.version("peft") is not None:
        user_env.pip("uninstall", "--yes", "peft")
    assert user_env.version("peft") is None
    return user_env


# ---- the package folder, read-only --------------------------------------------------------------------

def tree(folder):
    """{relative path: (kind, size, modification time, mode)} of everything under ``folder``."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            info = os.lstat(path)
            found[os.path.relpath(path, folder)] = (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns,
                                                    stat.S_IMODE(info.st_mode))
    return found


def set_writable(folder, writable):
    for root, dirs, files in os.walk(folder, topdown=not writable):
        for name in files:
            os.chmod(os.path.join(root, name), 0o644 if writable else 0o444)
        os.chmod(root, 0o755 if writable else 0o555)


class ReadOnlyPackage:
    """The package folder read-only from here on; ``changes()`` lists what differs from now."""

    def __init__(self, folder):
        self.folder = folder
        set_writable(folder, False)
        self.before = tree(folder)

    def changes(self):
        after = tree(self.folder)
        return sorted(path for path in set(self.before) | set(after) if self.before.get(path) != after.get(path))

    def restore(self):
        set_writable(self.folder, True)


def test_a_write_into_the_package_folder_is_seen(tmp_path):
    folder = tmp_path / "package"
    (folder / "core").mkdir(parents=True)
    (folder / "core" / "a.py").write_text("x = 1\n")
    guard = ReadOnlyPackage(str(folder))
    try:
        assert guard.changes() == []
        try:
            (folder / "core" / "cache.bin").write_bytes(b"0")
        except PermissionError:  # not root: the permission bits stop it already
            assert os.geteuid() != 0
            return
        assert guard.changes() == ["core", os.path.join("core", "cache.bin")]
    finally:
        guard.restore()


# ---- the user's ComfyUI --------------------------------------------------------------------------------

def start_comfyui(env, place_package, log_path):
    """The user's ComfyUI with the package put into its custom_nodes/ by ``place_package(folder)``; the
    package folder read-only. Returns (server, package folder, ReadOnlyPackage)."""
    server = ComfyServer(custom_nodes={}, python=env.python, log_path=str(log_path), torch_threads=1,
                         env=user_comfyui.clean_env(PYTHONDONTWRITEBYTECODE="1"))
    os.makedirs(server.custom_nodes_dir)
    package = place_package(server.custom_nodes_dir)
    guard = ReadOnlyPackage(package)
    try:
        server.start(timeout=300)
    except ServerError as error:
        server.stop()
        guard.restore()
        pytest.fail(str(error), pytrace=False)
    say(f"{os.path.basename(package)}: ComfyUI ready in {server.start_seconds:.1f} s")
    return server, package, guard


@pytest.fixture
def running():
    """Stops the servers a test started and checks their package folders were left as they were."""
    started = []
    yield started
    problems = []
    for server, package, guard in started:
        server.stop(keep_files=True)  # the package folder lies in the server's private folder
        changed = guard.changes()
        guard.restore()
        shutil.rmtree(server.base_dir, ignore_errors=True)
        if changed:
            problems.append(f"{package}: written at run time: {changed[:10]}")
    assert not problems, "\n".join(problems)


def check_nodes_load(server, package):
    failed = server.failed_custom_nodes()
    assert not failed, f"IMPORT FAILED in the start-up log: {failed}\n{server.log_tail()}"
    server.check_nodes_loaded(expected_node_ids())
    prefix = f"custom_nodes.{os.path.basename(package)}"
    ours = [name for name, node in server.object_info().items() if node.get("python_module", "") == prefix]
    assert sorted(ours) == sorted(expected_node_ids()), f"nodes of {prefix}: {ours}"


def shipped_workflow(package, name):
    """An API-format example workflow as the install has it."""
    with open(os.path.join(package, "example_workflows", "api", f"{name}.json")) as handle:
        return json.load(handle)


def saved_images(server, entry, node_id="8"):
    """The files the workflow's SaveImage node wrote (the Placement Metric shows a picture too)."""
    return server.output_files({"outputs": {node_id: entry["outputs"][node_id]}})


def run_toy_workflow_a(server, package):
    graph = shipped_workflow(package, TEMPLATE_NAMES["a"])
    graph["2"]["inputs"]["count"] = 2  # two layouts, four steps: the shipped graph, shortened
    graph["6"]["inputs"]["steps"] = 4
    entry = server.run_workflow(graph)
    images = saved_images(server, entry)
    assert len(images) == 2 and all(Image.open(p).size == (data.SIZE, data.SIZE) for p in images)
    assert "mean IoU" in entry["outputs"]["9"]["text"][0]


def toy_training_graph(package, lora_name):
    """The shipped training workflow (c) on a small toy dataset it writes itself: two steps of batch 2."""
    graph = shipped_workflow(package, TEMPLATE_NAMES["c"])
    train = graph["4"]["inputs"]
    assert graph["2"]["class_type"] == "EliGenToyDataset" and graph["2"]["inputs"]["folder"] == TOY_DATASET
    graph["2"]["inputs"].update(count=4, size=data.QUICK_SIZE)
    train.update(lora_name=lora_name, steps=2, batch_size=2, warmup_steps=0)
    return graph


def train_and_sample_with_the_stock_nodes(server, package):
    started = time.monotonic()
    server.run_workflow(toy_training_graph(package, "user_install_toy"), timeout=900)
    lora_file = os.path.join(server.models_dir, "loras", "user_install_toy.safetensors")
    assert os.path.isfile(lora_file)
    say(f"{os.path.basename(package)}: toy training (2 steps) {time.monotonic() - started:.1f} s")
    images = {}
    for strength in (1.0, 0.0):  # the shipped workflow (d): stock LoRA loader, EliGen Apply, stock KSampler
        graph = shipped_workflow(package, TEMPLATE_NAMES["d"])
        graph["2"]["inputs"]["count"] = 1
        graph["6"]["inputs"]["steps"] = 3
        graph["10"]["inputs"].update(lora_name="user_install_toy.safetensors", strength_model=strength)
        graph["8"]["inputs"]["filename_prefix"] = graph["9"]["inputs"]["filename_prefix"] = f"user_install/d{strength:g}"
        [path] = saved_images(server, server.run_workflow(graph))
        images[strength] = np.asarray(Image.open(path).convert("RGB"))
    assert not np.array_equal(images[1.0], images[0.0]), "the trained LoRA changes nothing"
    unused = [line for line in server.log_text().splitlines() if "lora key not loaded" in line]
    assert not unused, f"the stock loader left LoRA keys unused: {unused[:5]}"


def install_requirements(env, package):
    started = time.monotonic()
    env.pip("install", "-r", os.path.join(package, "requirements.txt"))
    peft = env.version("peft")
    assert peft is not None, "requirements.txt did not install peft"
    say(f"{os.path.basename(package)}: pip install -r requirements.txt {time.monotonic() - started:.0f} s "
        f"(peft {peft})")


def startup_lines(server):
    return [line for line in server.log_text().splitlines() if "EliGen" in line and "will not run" in line]


# ---- the cases ----------------------------------------------------------------------------------------

def test_manager_install(without_peft, head, running, tmp_path):
    env, (commit, _) = without_peft, head

    def place(custom_nodes):
        folder = os.path.join(custom_nodes, MANAGER_FOLDER)
        clone_head(commit, folder)
        install_requirements(env, folder)
        return folder

    server, package, guard = start_comfyui(env, place, tmp_path / "comfyui.log")
    running.append((server, package, guard))
    check_nodes_load(server, package)
    assert not startup_lines(server)
    run_toy_workflow_a(server, package)
    train_and_sample_with_the_stock_nodes(server, package)


def test_registry_archive_install(without_peft, registry_archive, running, tmp_path):
    env = without_peft

    def place(custom_nodes):
        folder = os.path.join(custom_nodes, REGISTRY_FOLDER)
        with zipfile.ZipFile(registry_archive) as archive:
            archive.extractall(folder)
        assert not os.path.exists(os.path.join(folder, "tests")), "the archive holds the tests"
        install_requirements(env, folder)
        return folder

    server, package, guard = start_comfyui(env, place, tmp_path / "comfyui.log")
    running.append((server, package, guard))
    check_nodes_load(server, package)
    run_toy_workflow_a(server, package)
    train_and_sample_with_the_stock_nodes(server, package)


def test_without_peft_every_other_node_works_and_training_says_how_to_install_it(without_peft, head, running,
                                                                                  tmp_path):
    env, (commit, _) = without_peft, head

    def place(custom_nodes):
        folder = os.path.join(custom_nodes, MANAGER_FOLDER)
        clone_head(commit, folder)  # requirements.txt not installed
        return folder

    server, package, guard = start_comfyui(env, place, tmp_path / "comfyui.log")
    running.append((server, package, guard))
    check_nodes_load(server, package)
    command = f'{env.python} -m pip install "peft>=0.13"'
    [line] = startup_lines(server)
    say(f"start-up line: {line.strip()}")
    assert f"({env.python}) has no peft. Install it with: {command} and restart ComfyUI" in line
    run_toy_workflow_a(server, package)
    with pytest.raises(ServerError) as failure:
        server.run_workflow(toy_training_graph(package, "user_install_no_peft"), timeout=600)
    message = str(failure.value)
    say("EliGen Train LoRA: " + next(l for l in message.splitlines() if "PeftUnavailable" in l))
    assert "(EliGenTrain): " in message and "PeftUnavailable: EliGen training needs peft>=0.13" in message
    assert f"Install it with: {command} and restart ComfyUI" in message
    assert not os.listdir(os.path.join(server.models_dir, "loras"))
