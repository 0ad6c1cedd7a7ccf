"""Test set-up: import this repo as the package ``comfyui_eligen`` and put ComfyUI on sys.path.

Also provides the session fixture ``comfy_server``: one real ComfyUI server (scripts/comfy_server.py)
with this package loaded, shared by all server tests and always stopped at the end.
"""

import contextlib
import importlib.util
import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
SUPPORT = os.path.join(TESTS, "support")  # helpers the tests share (tiny models, the toy LoRA, the reference)
SCRIPTS = os.path.join(REPO, "scripts")  # the server harness (scripts/comfy_server.py), shared with the demo
for folder in (TESTS, SUPPORT, SCRIPTS):  # test modules import tiny_models and ``comfy_server`` under any import mode
    if folder not in sys.path:
        sys.path.insert(0, folder)

from comfy_server import ComfyServer, ServerError, expected_node_ids, find_comfyui_dir  # noqa: E402


def comfyui_dir():
    """The ComfyUI folder: $COMFYUI_DIR, else the one scripts/setup.sh recorded."""
    return find_comfyui_dir()


def _import_comfy():
    path = comfyui_dir()
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args  # must be set before comfy.model_management is imported

    args.cpu = True


def _register_package():
    if "comfyui_eligen" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "comfyui_eligen", os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_eligen"] = module
    spec.loader.exec_module(module)


_import_comfy()
_register_package()


# ---- the real server ---------------------------------------------------------------------------

_started_servers = []  # for the summary line


@contextlib.contextmanager
def running_server(server):
    """``server`` started, with every EliGen node loaded (else the test fails loudly), stopped at the end."""
    _started_servers.append(server)
    try:
        server.start()
        server.check_nodes_loaded(expected_node_ids())
        yield server
    except ServerError as error:
        pytest.fail(str(error), pytrace=False)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A running ComfyUI with this package; fails loudly if any EliGen node did not load."""
    log_path = tmp_path_factory.getbasetemp() / "comfy_server.log"
    with running_server(ComfyServer(log_path=str(log_path), torch_threads=1)) as server:
        yield server


LAB = os.path.join(TESTS, "lab")
SERVER = os.path.join(TESTS, "server")


def pytest_collection_modifyitems(items):
    """Mark the tests by kind from their folder: tests/server/ (a real ComfyUI server or other processes)
    gets ``server``, so ``-m "not server"`` runs only the in-process tests; tests/lab/ (the measurement
    lab, lab/) gets ``lab``, so ``-m "not lab"`` leaves them out. A test elsewhere that asks for the
    server is marked ``server`` too."""
    for item in items:
        path = str(item.path)
        if "comfy_server" in getattr(item, "fixturenames", ()) or os.path.commonpath([SERVER, path]) == SERVER:
            item.add_marker(pytest.mark.server)
        if os.path.commonpath([LAB, path]) == LAB:
            item.add_marker(pytest.mark.lab)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """When a test that used the server fails, attach the tail of the server log to its report."""
    outcome = yield
    report = outcome.get_result()
    server = getattr(item, "funcargs", {}).get("comfy_server")
    if report.failed and isinstance(server, ComfyServer):
        report.sections.append((f"ComfyUI server log (tail of {server.log_path})", server.log_tail(80)))


def pytest_report_header(config):
    return f"ComfyUI: {comfyui_dir()}"


def pytest_terminal_summary(terminalreporter):
    for server in _started_servers:
        started = f"{server.start_seconds:.1f} s" if server.start_seconds is not None else "did not start"
        terminalreporter.write_line(f"ComfyUI server: ready after {started}; log {server.log_path}")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run much faster on one thread when the two cores are shared with the server (measured
    ~50x per forward on a busy machine); restored after each test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def comfy_folders(tmp_path, monkeypatch):
    """ComfyUI's output and loras folders pointed at a temp dir (the ComfyUI copy is never written)."""
    import folder_paths  # ComfyUI's: importable once the module-level set-up above has run

    output, loras = tmp_path / "output", tmp_path / "loras"
    output.mkdir()
    loras.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(output))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(loras)], folder_paths.supported_pt_extensions))
    return output, loras
