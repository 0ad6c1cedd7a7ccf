"""A real, headless ComfyUI server for tests: start, talk to it over HTTP, stop.

Each server gets its own temporary base directory (``--base-directory``), so models, custom_nodes,
input, output, temp and user folders are private to it and the ComfyUI workspace is never written
to. Its ``custom_nodes/`` holds links to the node packages the caller names (by default only this
repo, as ``comfyui_eligen``), which is how a test starts a server on a deliberately broken copy.

    server = ComfyServer().start()
    try:
        server.check_nodes_loaded(expected_node_ids())
        history = server.run_workflow(api_graph)
    finally:
        server.stop()

Only the standard library is used, so this file also works outside pytest.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_NAME = "comfyui_eligen"  # the folder name inside custom_nodes/ (an importable identifier)
# Inside a ComfyUI folder: the frontend packages pinned by that ComfyUI version's requirements.txt, when
# they differ from the shared environment's (scripts/setup.sh installs them there); put first on the
# server's PYTHONPATH.
PINNED_PACKAGES_DIR = ".eligen-python"
NODES_DIR = os.path.join(REPO, "nodes")


class ServerError(RuntimeError):
    """The server failed to start, failed a graph, or is missing nodes. The message says which."""


def free_port():
    """A TCP port on the loopback interface that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def expected_node_ids(package_name=PACKAGE_NAME):
    """{node id: "nodes/<module>.py"} for every node the repo defines.

    Each ``nodes/*.py`` module is imported on its own (as ``<package_name>.nodes.<module>``; the caller
    must have registered the package, as tests/conftest.py does) and its ``NODES`` list read, so a
    module that defines nodes but is missing from the extension's module list shows up as missing on
    the server.
    """
    import importlib

    ids = {}
    for filename in sorted(os.listdir(NODES_DIR)):
        if not filename.endswith(".py") or filename == "__init__.py":
            continue
        where = f"nodes/{filename}"
        module = importlib.import_module(f"{package_name}.nodes.{filename[:-3]}")
        for node in getattr(module, "NODES", []):
            node_id = node.define_schema().node_id
            if node_id in ids:
                raise ServerError(f"node id {node_id} is defined twice: in {ids[node_id]} and {where}")
            ids[node_id] = where
    return ids


class ComfyServer:
    """One ComfyUI process on a free loopback port with private folders.

    comfyui_dir:  the ComfyUI folder (with main.py); default: $COMFYUI_DIR or the one setup.sh recorded.
    custom_nodes: {folder name: path} linked into the private custom_nodes/; default: this repo only.
    python:       interpreter that runs main.py (default: the one running the tests, i.e. the venv).
    log_path:     where stdout and stderr go (default: a new eligen-comfy-*.log in the temp folder).
    env:          the server's environment (default: this process's), plus the settings below.
    """

    def __init__(self, comfyui_dir=None, custom_nodes=None, python=None, log_path=None, extra_args=(),
                 torch_threads=None, env=None):
        self.comfyui_dir = os.path.abspath(comfyui_dir or find_comfyui_dir())
        self.custom_nodes = dict(custom_nodes) if custom_nodes is not None else {PACKAGE_NAME: REPO}
        self.python = python or sys.executable
        self.extra_args = list(extra_args)
        # Threads for torch in the server. On a small shared machine one thread is far faster for tiny
        # models (measured ~20 ms against ~1 s per sampling step on 2 busy cores); None keeps the
        # environment's setting.
        self.torch_threads = torch_threads
        self.env = env
        self.base_dir = tempfile.mkdtemp(prefix="eligen-comfy-")
        if log_path is None:  # outside base_dir, so the log outlives stop()
            handle, log_path = tempfile.mkstemp(prefix="eligen-comfy-", suffix=".log")
            os.close(handle)
        self.log_path = os.path.abspath(log_path)
        self.port = None
        self.process = None
        self.start_seconds = None  # wall time from launch to the first answered request

    # ---- folders (all private to this server) ------------------------------------------------
    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self):
        return os.path.join(self.base_dir, "output")

    @property
    def input_dir(self):
        return os.path.join(self.base_dir, "input")

    @property
    def temp_dir(self):
        return os.path.join(self.base_dir, "temp")

    @property
    def user_dir(self):
        return os.path.join(self.base_dir, "user")

    @property
    def models_dir(self):
        """ComfyUI's models/ for this server: drop LoRAs into ``models_dir/loras``."""
        return os.path.join(self.base_dir, "models")

    @property
    def custom_nodes_dir(self):
        return os.path.join(self.base_dir, "custom_nodes")

    # ---- life cycle --------------------------------------------------------------------------
    def command(self):
        return [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
            "--base-directory", self.base_dir,
            # explicit too, so the folders stay private even if a later ComfyUI changes the defaults
            "--output-directory", self.output_dir, "--input-directory", self.input_dir,
            "--temp-directory", self.temp_dir, "--user-directory", self.user_dir,
            *self.extra_args,
        ]

    def start(self, timeout=180):
        """Launch main.py (unless ``launch()`` already did) and wait until it answers HTTP; raise
        ServerError with the log tail if not."""
        if self.process is None:
            self.launch()
        deadline = self._launched + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.process.returncode} while starting; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            try:
                self._request("GET", "/system_stats", timeout=2)
                self.start_seconds = time.monotonic() - self._launched
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
                time.sleep(0.2)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {timeout} s; log {self.log_path}:\n{self.log_tail()}")

    def launch(self):
        """Start main.py and return at once; ``start()`` then waits for it. Lets a caller start a server
        it needs later while it does other work."""
        if not os.path.isfile(os.path.join(self.comfyui_dir, "main.py")):
            raise ServerError(f"{self.comfyui_dir} is not a ComfyUI folder (no main.py)")
        for sub in ("output", "input", "temp", "user", "custom_nodes", "models/loras"):
            os.makedirs(os.path.join(self.base_dir, sub), exist_ok=True)
        for name, path in self.custom_nodes.items():
            os.symlink(os.path.abspath(path), os.path.join(self.custom_nodes_dir, name))
        self.port = free_port()
        env = dict(os.environ if self.env is None else self.env, DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
        if self.torch_threads:
            env["OMP_NUM_THREADS"] = str(self.torch_threads)
        pinned = os.path.join(self.comfyui_dir, PINNED_PACKAGES_DIR)
        if os.path.isdir(pinned):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (pinned, env.get("PYTHONPATH")) if p)
        self._launched = time.monotonic()
        with open(self.log_path, "wb") as log:
            # a new session makes the server a process-group leader, so stop() can end all of it
            self.process = subprocess.Popen(
                self.command(), cwd=self.comfyui_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_end_with_parent,
            )
        return self

    def stop(self, keep_files=False):
        """End the server and everything it started (its process group); safe to call twice."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        if not keep_files:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- the log -----------------------------------------------------------------------------
    def log_text(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def log_tail(self, lines=60):
        try:
            return "\n".join(self.log_text().splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def failed_custom_nodes(self):
        """Custom-node folders ComfyUI reported as ``(IMPORT FAILED)``.

        Only custom nodes count: ComfyUI also prints ``IMPORT FAILED: nodes_x.py`` for its own optional
        comfy_extras nodes whose extra dependencies (torchaudio, ...) are not installed.
        """
        return re.findall(r"\(IMPORT FAILED\): (.+)$", self.log_text(), flags=re.MULTILINE)

    def check_nodes_loaded(self, expected_ids):
        """Raise ServerError unless every expected node id is in /object_info and no custom node failed.

        expected_ids: {node id: where it is defined} (see expected_node_ids) or a list of ids. The
        message names the failed package, ComfyUI's error lines, the missing ids and the modules that
        define them, and (when the package's folder is known) which node module fails to import.
        """
        where = expected_ids if isinstance(expected_ids, dict) else {i: "?" for i in expected_ids}
        failed = [path.strip() for path in self.failed_custom_nodes()]
        missing = sorted(set(where) - set(self.object_info()))
        if not failed and not missing:
            return
        problems = []
        for path in failed:
            problems.append(f"custom node package {path}: IMPORT FAILED")
            problems += [f"  log: {line}" for line in self._error_lines(path)]
            diagnosis = diagnose_package(path, self.comfyui_dir, self.python)
            problems += [f"  {line}" for line in diagnosis]
        if missing:
            modules = sorted({where[i] for i in missing})
            problems.append(f"missing from /object_info: {', '.join(missing)} (defined in {', '.join(modules)})")
        raise ServerError("EliGen nodes did not load:\n" + "\n".join(problems) + f"\nserver log: {self.log_path}")

    def _error_lines(self, package_path):
        """The log lines in which ComfyUI says why it could not load a custom-node folder."""
        return [line.strip() for line in self.log_text().splitlines()
                if package_path in line and ("Cannot import" in line or "comfy_entrypoint" in line)]

    # ---- HTTP API ----------------------------------------------------------------------------
    def _request(self, method, path, payload=None, timeout=30):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def object_info(self):
        return self._request("GET", "/object_info", timeout=60)

    def history(self, prompt_id=None):
        return self._request("GET", "/history" + (f"/{prompt_id}" if prompt_id else ""))

    def interrupt(self):
        self._request("POST", "/interrupt", {})

    def queue(self, graph):
        """Queue an API-format graph; return its prompt id. Raises with the node errors if invalid."""
        try:
            answer = self._request("POST", "/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
        except urllib.error.HTTPError as error:
            raise ServerError("ComfyUI rejected the graph:\n" + describe_rejection(error.read())) from None
        return answer["prompt_id"]

    def wait(self, prompt_id, timeout=300):
        """The history entry of a queued prompt once it finished; raise ServerError if it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id).get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise ServerError(describe_failure(prompt_id, status))
                return entry
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.1)
        self.interrupt()
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout} s (interrupted)")

    def run_workflow(self, graph, timeout=300):
        """Queue an API-format graph and wait for it: the history entry (``entry["outputs"]``)."""
        return self.wait(self.queue(graph), timeout)

    def output_files(self, entry, kind="images"):
        """Paths of the files a finished prompt's output nodes wrote (SaveImage: kind "images")."""
        paths = []
        for outputs in entry["outputs"].values():
            for item in outputs.get(kind, []):
                # ComfyUI keeps its temp files in a "temp" folder inside the one --temp-directory names
                folder = {"output": self.output_dir, "temp": os.path.join(self.temp_dir, "temp"),
                          "input": self.input_dir}[item["type"]]
                paths.append(os.path.join(folder, item.get("subfolder", ""), item["filename"]))
        return paths

    # ---- comfy-cli -----------------------------------------------------------------------------
    def comfy_cli(self):
        """comfy-cli next to the interpreter (the venv's), else the one on PATH."""
        beside = os.path.join(os.path.dirname(self.python), "comfy")
        found = beside if os.access(beside, os.X_OK) else shutil.which("comfy")
        if not found:
            raise ServerError("comfy-cli not found: run scripts/setup.sh (it installs the test extra)")
        return found

    def comfy_run(self, workflow_path, timeout=300):
        """Run an API-format workflow file with ``comfy run --wait``; return its history entry.

        comfy-cli runs with its own HOME (so it neither reads nor writes the user's comfy-cli config)
        and tracking off. Raises ServerError with comfy-cli's output when it fails.
        """
        before = set(self.history())
        home = os.path.join(self.base_dir, "cli-home")
        os.makedirs(home, exist_ok=True)
        env = dict(os.environ, HOME=home, DO_NOT_TRACK="1", NO_COLOR="1", COLUMNS="200")
        argv = [self.comfy_cli(), "--skip-prompt", "run", "--workflow", os.path.abspath(workflow_path),
                "--host", "127.0.0.1", "--port", str(self.port), "--wait", "--timeout", str(int(timeout))]
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout + 60,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            self.interrupt()
            raise ServerError(f"comfy run did not return within {timeout + 60} s") from None
        new = [pid for pid in self.history() if pid not in before]
        if done.returncode != 0 or len(new) != 1:
            detail = ""
            if len(new) == 1:
                entry = self.history(new[0])[new[0]]
                detail = "\n" + describe_failure(new[0], entry.get("status", {}))
            raise ServerError(f"comfy run exited {done.returncode} ({len(new)} new prompts):\n"
                              f"{done.stdout[-3000:]}{done.stderr[-3000:]}{detail}")
        return self.wait(new[0], timeout)


def _end_with_parent():
    """In the child before exec: on Linux, get SIGTERM when the test process dies (even by SIGKILL),
    so a killed test run leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def find_comfyui_dir():
    """$COMFYUI_DIR, else the ComfyUI folder scripts/setup.sh recorded in .comfyui-path."""
    path = os.environ.get("COMFYUI_DIR")
    if not path:
        marker = os.path.join(REPO, ".comfyui-path")
        if os.path.exists(marker):
            with open(marker) as f:
                path = f.read().strip()
    if not path or not os.path.isfile(os.path.join(path, "main.py")):
        raise ServerError("ComfyUI not found: run scripts/setup.sh or set COMFYUI_DIR to a ComfyUI folder")
    return path


def describe_rejection(body):
    """ComfyUI's /prompt validation answer as text naming every bad node."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")
    lines = [f"{answer['error'].get('message', '')} {answer['error'].get('details', '')}".strip()]
    for node_id, info in answer.get("node_errors", {}).items():
        for error in info.get("errors", []):
            lines.append(f"node {node_id} ({info.get('class_type')}): {error.get('message')}: {error.get('details')}")
    return "\n".join(lines)


def describe_failure(prompt_id, status):
    """A failed history status as text: the failing node, its type, ComfyUI's message and traceback."""
    for event, data in status.get("messages", []):
        if event == "execution_error":
            trace = "".join(data.get("traceback", []))
            return (f"prompt {prompt_id} failed in node {data['node_id']} ({data['node_type']}): "
                    f"{data['exception_type']}: {data['exception_message']}\n{trace}")
        if event == "execution_interrupted":
            return f"prompt {prompt_id} was interrupted in node {data['node_id']} ({data['node_type']})"
    return f"prompt {prompt_id} did not succeed: {status}"


# Imports one package's node modules one by one, the way ComfyUI would, and prints each failure with
# the package file and line where it was raised. nodes/__init__.py is not run (it imports every module,
# which would blame them all for one broken file).
_DIAGNOSE = r"""
import importlib, importlib.util, os, sys, traceback
comfy_dir, package = sys.argv[1], os.path.realpath(sys.argv[2])
sys.path.insert(0, comfy_dir)
from comfy.cli_args import args
args.cpu = True

def load_package(name, folder, run_init):
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if run_init:
        spec.loader.exec_module(module)

def failure():
    exc = sys.exc_info()[1]
    places = [(f.filename, f.lineno) for f in traceback.extract_tb(exc.__traceback__)]
    if isinstance(exc, SyntaxError):  # raised while compiling: the file is on the exception
        places.append((exc.filename or "", exc.lineno))
    places = [(os.path.realpath(f), line) for f, line in places if os.path.realpath(f).startswith(package)]
    where = f" at {os.path.relpath(places[-1][0], package)}:{places[-1][1]}" if places else ""
    return f"{type(exc).__name__}: {exc}{where}"

name = "eligen_bench_diagnosis"
try:
    load_package(name, package, run_init=True)
except BaseException:
    print("__init__.py fails to import:", failure())
    sys.exit(0)
node_dir = os.path.join(package, "nodes")
load_package(name + ".nodes", node_dir, run_init=False)
for filename in sorted(os.listdir(node_dir)):
    if filename.endswith(".py") and filename != "__init__.py":
        try:
            importlib.import_module(f"{name}.nodes.{filename[:-3]}")
        except BaseException:
            print(f"nodes/{filename} fails to import: {failure()}")
"""


def diagnose_package(package_path, comfyui_dir, python=sys.executable, timeout=120):
    """Which node module of a failed package breaks, found by importing each in a fresh interpreter.

    ComfyUI logs only the exception text when an extension's entry point fails, not the file, so the
    bench finds the file itself. Returns lines of text (empty when nothing fails on its own).
    """
    if not os.path.isfile(os.path.join(package_path, "__init__.py")):
        return [f"{package_path} has no __init__.py"]
    done = subprocess.run([python, "-c", _DIAGNOSE, comfyui_dir, package_path], capture_output=True,
                          text=True, timeout=timeout, cwd=comfyui_dir, env=dict(os.environ, DO_NOT_TRACK="1"))
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0:
        lines.append(f"diagnosis itself failed: {done.stderr.strip().splitlines()[-1:]}")
    return lines
