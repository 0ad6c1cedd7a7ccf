"""What users see: ComfyUI's real frontend in headless Chromium, driven by Playwright, against a ComfyUI
with this package, twice: with the frontend ComfyUI pins (the venv's comfyui-frontend-package) and with
the newest one on the index (NEWEST_FRONTEND, served through ComfyUI's --front-end-root), since users
update the frontend before ComfyUI. Each frontend gets one fresh server of its own (this module's
``comfy_server``: input/ and models/loras as a new user has them; the next one starts while the first
one's tests run) and one page. The test waits on what the page does (a load finished, frames drawn,
pictures loaded, a run's end event), not for fixed times. In file order:

- The template browser lists this package's templates in their numbered order, titled by their names,
  each with a thumbnail that loads (status 200).
- The toy templates, opened from the template browser, run from the Run button in their listed order
  with no error (shortened by editing widgets, as a user would): the Placement Metric's score is read
  from the page and its picture is fetched; the LoRA that template 3 trains is offered by the LoRA lists
  of loader nodes already on the canvas and of new ones, without Refresh or a reload.
- Every UI-format workflow in example_workflows/ loads through the page's file input (what Load and drag
  and drop use) with no missing-node dialog and no node drawn red (unknown, or registered but not built
  by the frontend), and every EliGen node shows the widgets its /object_info inputs call for. Newer
  frontends also draw a loader red when its model file is missing (the real-model templates name files
  this server lacks): that is told apart.
- The toy-world painted-layout workflow runs from the page's Run button and its images appear on the page.

Responses with an error status and uncaught errors are collected per page; the only ones allowed are
those a frontend newer than the server makes by design (HARMLESS_MISSES) and one start-up error of an
older frontend (HARMLESS_PAGE_ERRORS). Screenshots go to $ELIGEN_BROWSER_ARTIFACTS (default
bench_out/browser/, not committed), named by frontend. The browser is Debian's `chromium`
(scripts/setup_browser.sh installs it, Playwright and the newest frontend); this test fails, never
skips, when any of them is missing.
"""

import glob
import json
import os
import re
import shutil
import time
import urllib.parse

import pytest

from comfyui_eligen.lab import painted
from comfyui_eligen.lab.workflows import LORA_NAME, TEMPLATE_NAMES
from comfyui_eligen.nodes.toyworld import TOY_DATASET_FOLDER
from comfyui_eligen.toyworld import data
from comfy_server import PACKAGE_NAME, ComfyServer
from conftest import running_server
from toy_lora import trained_toy_lora

pytestmark = pytest.mark.server

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "example_workflows")
UI_WORKFLOWS = sorted(glob.glob(os.path.join(EXAMPLES, "*.json")))
SETUP_HINT = ("run `bash scripts/setup_browser.sh` (apt-get install chromium; pip install playwright; "
              "the newest comfyui-frontend-package into .frontends/)")
NEWEST_FRONTEND = "1.58.1"  # scripts/setup_browser.sh installs the same version
FRONTENDS = ("pinned", NEWEST_FRONTEND)
# 404s the frontends get by design on a new user's server: {path prefix: why it is harmless}. Any other
# error status (our templates, thumbnails, extension, images, prompts) is a real error.
HARMLESS_MISSES = {
    "/api/jobs": "ComfyUI 0.3.75 and older have no Jobs API; newer frontends ask for it and fall back",
    "/api/userdata": "the frontend looks for user files and folders a new user does not have yet",
    "/user.css": "the frontend looks for the user's optional style sheet",
    "/templates/index_logo.json": "the core templates bundled with ComfyUI 0.3.75 and older predate the newer frontend's logo index",
    "/api/global_subgraphs": "ComfyUI 0.3.64 has no global subgraphs API; newer frontends ask for it and go on",
}
# Uncaught errors in the page that come from a frontend itself, not from this package: {a frame in the
# error's stack: why it is harmless}. Any other uncaught error fails the test.
HARMLESS_PAGE_ERRORS = {
    "at Proxy.addSetting": "frontend 1.27 (ComfyUI 0.3.64's pin) throws while it registers its own core settings "
                           "on a new user's first load (a setting's onChange sets another); the page works on",
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIEWPORT = {"width": 1800, "height": 1100}
APP_READY = "window.app && window.app.graph && window.app.vueAppReady"


def artifacts_dir():
    folder = os.environ.get("ELIGEN_BROWSER_ARTIFACTS") or os.path.join(REPO, "bench_out", "browser")
    os.makedirs(folder, exist_ok=True)
    return folder


def chromium_path():
    path = os.environ.get("ELIGEN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(f"no Chromium found (checked $ELIGEN_CHROMIUM, chromium, chromium-browser): {SETUP_HINT}",
                    pytrace=False)
    return path


def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError:
        pytest.fail(f"Playwright for Python is not installed: {SETUP_HINT}", pytrace=False)
    return start()


def widget_names(node_info):
    """The inputs the frontend draws as widgets (values typed in, not links)."""
    names = []
    for section in ("required", "optional"):
        for name, spec in node_info["input"].get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput"):
                names.append(name)
    return names


def newest_frontend_root(check=True):
    """The newest frontend's static folder; with check, the test fails when it is not installed."""
    folder = os.environ.get("ELIGEN_FRONTENDS_DIR") or os.path.join(REPO, ".frontends")
    root = os.path.join(folder, f"comfyui-frontend-package-{NEWEST_FRONTEND}", "comfyui_frontend_package", "static")
    if check and not os.path.isfile(os.path.join(root, "index.html")):
        pytest.fail(f"comfyui-frontend-package {NEWEST_FRONTEND} is not installed in {folder}: {SETUP_HINT}",
                    pytrace=False)
    return root


def frontend_server(frontend, tmp_path_factory, check=True):
    extra = [] if frontend == "pinned" else ["--front-end-root", newest_frontend_root(check)]
    server = ComfyServer(log_path=str(tmp_path_factory.getbasetemp() / f"comfy_server_browser_{frontend}.log"),
                         torch_threads=1, extra_args=extra)
    server.frontend = frontend
    return server


@pytest.fixture(scope="module")
def launched_servers():
    """{frontend: its server, launched ahead}; whatever is still running at the module's end is stopped."""
    servers = {}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module", params=FRONTENDS)
def comfy_server(request, tmp_path_factory, launched_servers):
    """This module's own server, one per frontend, in place of the session's: fresh, with input/ and
    models/loras as a new user has them (the first-run test needs that), serving that frontend. The next
    frontend's server is launched as this one is ready, so that it starts while these tests run (it
    stays untouched, so fresh, until its own tests)."""
    frontend = request.param
    if frontend != "pinned":
        newest_frontend_root()  # fails the test when the frontend is not installed
    server = launched_servers.pop(frontend, None) or frontend_server(frontend, tmp_path_factory)
    with running_server(server):
        later = FRONTENDS[FRONTENDS.index(frontend) + 1:]
        selected = {item.callspec.params.get("comfy_server") for item in request.session.items
                    if item.module is request.module and hasattr(item, "callspec")}
        following = next((f for f in later if f in selected), None)
        if following and following not in launched_servers:
            # unchecked: a missing frontend fails that frontend's tests, not these
            launched_servers[following] = frontend_server(following, tmp_path_factory, check=False).launch()
        yield server


# Collects what happens in the page (installed once per page): run events by prompt, in order, and the
# number of workflow loads finished. Every way in (the file input, a template card) goes through
# app.loadGraphData, which asks for the missing-node dialog (or the newer frontends' error overlay)
# before it returns: once a load is counted, what it has to say about the workflow is on its way.
RUN_EVENTS = """() => {
    window.__eligenRuns = [];
    const api = window.comfyAPI.api.api;
    for (const type of ['execution_success', 'execution_error', 'execution_interrupted'])
        api.addEventListener(type, (event) => window.__eligenRuns.push({type, detail: event.detail}));
    window.__eligenLoads = 0;
    const app = window.app, load = app.loadGraphData;
    app.loadGraphData = async function (...args) {
        try { return await load.apply(this, args); } finally { window.__eligenLoads += 1; } };
}"""
# Resolves once the page has drawn twice: the DOM that the last changes asked for (Vue renders on a
# microtask) is in place and the canvas has redrawn what changed (LiteGraph draws on animation frames).
DRAWN = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(() => done(true))))"
# The pictures that nodes show have finished loading.
NODE_PICTURES_LOADED = "() => window.app.graph._nodes.every(n => !n.imgs || n.imgs.every(i => i.complete))"


def drawn(page, pictures=False):
    """Wait until the page has drawn what the last action changed (and, with pictures, until the nodes'
    pictures have loaded), in place of a fixed pause before a screenshot or a look at the page."""
    if pictures:
        page.wait_for_function(NODE_PICTURES_LOADED, timeout=30_000)
    page.evaluate(DRAWN)


def loads_done(page):
    return page.evaluate("() => window.__eligenLoads")


def wait_for_load(page, name, count, before):
    """Wait until a workflow load started after ``before`` loads has finished, showing ``name`` with
    ``count`` nodes, and the page has drawn what it asked for (dialogs, the error overlay)."""
    page.wait_for_function(
        "([name, count, before]) => window.__eligenLoads > before && document.title.includes(name)"
        " && window.app.graph._nodes.length == count", arg=[name, count, before], timeout=30_000)
    drawn(page)


@pytest.fixture(scope="module")
def page(comfy_server):
    """The frontend in Chromium, first-run dialogs off. ``page.responses``: (status, url) of every
    response the page got; ``page.errors``: uncaught errors in the page."""
    # no first-run template browser; no missing-models dialog (the real-model examples name model files
    # this server does not have); the missing-nodes dialog stays on: it is what the test looks for
    comfy_server._request("POST", "/settings", {"Comfy.TutorialCompleted": True,
                                                 "Comfy.Workflow.ShowMissingModelsWarning": False,
                                                 "Comfy.Workflow.ShowMissingNodesWarning": True,
                                                 # screenshots: node text at any zoom, no minimap
                                                 "LiteGraph.Canvas.MinFontSizeForLOD": 0,
                                                 "Comfy.Minimap.Visible": False})
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport=VIEWPORT)
            tab.responses, tab.errors = [], []
            tab.on("response", lambda response: tab.responses.append((response.status, response.url)))
            tab.on("pageerror", lambda error: tab.errors.append(error.stack or str(error)))
            tab.goto(comfy_server.url)
            tab.wait_for_function(APP_READY, timeout=180_000)
            tab.evaluate(RUN_EVENTS)
            yield tab
        finally:
            browser.close()


def shot(page, comfy_server, name):
    path = os.path.join(artifacts_dir(), f"{name}_{comfy_server.frontend}.png")
    page.screenshot(path=path)
    return path


def page_errors(page):
    """Uncaught errors in the page but those HARMLESS_PAGE_ERRORS explains."""
    return [error for error in page.errors if not any(frame in error for frame in HARMLESS_PAGE_ERRORS)]


def error_responses(page):
    """Responses with an error status but those HARMLESS_MISSES explains."""
    return [(status, url) for status, url in page.responses if status >= 400 and not (
            status == 404 and any(urllib.parse.urlsplit(url).path.startswith(prefix) for prefix in HARMLESS_MISSES))]


def template_order():
    """This package's template names in their listed order (by the number in the name)."""
    names = [os.path.basename(path)[:-5] for path in UI_WORKFLOWS]
    return sorted(names, key=lambda name: int(re.match(r"EliGen (\d+) ", name).group(1)))


def open_template_browser(page):
    """The template browser, showing this package's category (extension packs are listed by folder)."""
    close_dialogs(page)
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text(PACKAGE_NAME, exact=True).first.click()
    page.wait_for_selector('[data-testid^="template-workflow-EliGen"]', timeout=30_000)


CARDS = """() => Array.from(document.querySelectorAll('[data-testid^="template-workflow-"]'))
    .filter(card => card.dataset.testid != 'template-workflow-detail')
    .map(card => { const img = card.querySelector('img');
        return {name: card.dataset.testid.slice('template-workflow-'.length), text: card.innerText,
                thumbnail: img ? img.currentSrc || img.src : null,
                loaded: !!img && img.complete && img.naturalWidth > 0}; })"""


# The pictures of the cards in view have loaded (a card loads its picture only once in view).
VISIBLE_CARDS_LOADED = """() => Array.from(document.querySelectorAll('[data-testid^="template-workflow-"] img'))
    .filter(img => { const r = img.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight; })
    .every(img => img.complete)"""


def test_template_browser_lists_the_templates_in_order_with_titles_and_thumbnails(page, comfy_server):
    open_template_browser(page)
    names = template_order()
    shown = [card["name"] for card in page.evaluate(CARDS)]  # the cards in the order shown
    cards = []  # each as it is when in view: a card loads its picture only then
    for name in names:
        page.locator(f'[data-testid="template-workflow-{name}"]').scroll_into_view_if_needed()
        page.wait_for_function(f"(name) => ({CARDS})().some(c => c.name == name && c.loaded)", arg=name, timeout=30_000)
        cards.append(next(card for card in page.evaluate(CARDS) if card["name"] == name))
    page.locator(f'[data-testid="template-workflow-{names[0]}"]').scroll_into_view_if_needed()
    page.wait_for_function(VISIBLE_CARDS_LOADED, timeout=30_000)
    drawn(page)
    shot(page, comfy_server, "template_browser")
    assert shown == names
    for card in cards:
        assert card["name"] in card["text"], card  # the card's title is the template's name
        # the picture shown is the thumbnail (both frontends show it from a cached copy), not the fallback
        assert "default-template" not in card["thumbnail"], card
        thumbnail = f"/api/workflow_templates/{PACKAGE_NAME}/{card['name']}.jpg"
        statuses = {status for status, url in page.responses if urllib.parse.unquote(urllib.parse.urlsplit(url).path) == thumbnail}
        assert statuses == {200}, (thumbnail, statuses)
    close_dialogs(page)


def open_template(page, name):
    """Open a template from the template browser, as a user clicks its card; wait until it is loaded."""
    with open(os.path.join(EXAMPLES, f"{name}.json")) as f:
        expected = len(json.load(f)["nodes"])
    open_template_browser(page)
    before = loads_done(page)
    page.locator(f'[data-testid="template-workflow-{name}"]').click()
    wait_for_load(page, name, expected, before)
    close_dialogs(page)


# What a user edits to make the toy templates quick: {node type: {widget: value}}. The checks need a run
# that ends, a score and a saved LoRA, not good pictures: a few sampling steps on three images, one
# training step on one batch.
SHORTER_RUNS = {
    "EliGenToyLayouts": {"count": 3},
    "KSampler": {"steps": 3},
    "EmptyLatentImage": {"batch_size": 1},
    "EliGenToyDataset": {"count": 4, "size": 128},
    "EliGenTrain": {"steps": 1, "batch_size": 4, "warmup_steps": 0},
}
SET_WIDGETS = """(edits) => { for (const n of window.app.graph._nodes) for (const [name, value] of
    Object.entries(edits[n.type] || {})) { const w = n.widgets.find(w => w.name == name);
    w.value = value; w.callback && w.callback(value); } }"""


def run_from_the_run_button(page, timeout_s=600):
    """Press Run and wait for the run's end; returns the execution event (type and detail). A prompt the
    server refuses (POST /prompt answered with an error) fails the test with what the page says."""
    before, answered = page.evaluate("() => window.__eligenRuns.length"), len(page.responses)
    page.get_by_role("button", name="Run", exact=True).click()
    from playwright.sync_api import TimeoutError as NotYet
    deadline = time.monotonic() + timeout_s
    while True:
        try:  # the run's end, looking every second for a refusal meanwhile
            page.wait_for_function("(before) => window.__eligenRuns.length > before", arg=before, timeout=1_000)
            break
        except NotYet:
            pass
        refused = [(status, url) for status, url in page.responses[answered:]
                   if status >= 400 and urllib.parse.urlsplit(url).path.endswith("/prompt")]
        if refused:
            page.wait_for_timeout(1000)  # the page shows the server's answer
            pytest.fail(f"the server refused the prompt {refused}; the page says: {page.evaluate(DIALOG_TEXTS)}")
        assert time.monotonic() < deadline, f"the run did not end within {timeout_s} s"
    return page.evaluate("(before) => window.__eligenRuns[before]", before)


LORA_LOADERS = ("LoraLoader", "LoraLoaderModelOnly", "EliGenLoraLoader")
LORA_LISTS = """(lora) => window.app.graph._nodes.filter(n => %s.includes(n.type))
    .map(n => ({id: n.id, type: n.type, offers: n.widgets.find(w => w.name == 'lora_name').options.values.includes(lora)}))
    """ % json.dumps(LORA_LOADERS)
ADD_LOADERS = """([types, y]) => types.map((type, k) => { const node = LiteGraph.createNode(type);
    node.pos = [40 + 360 * k, y]; window.app.graph.add(node); return node.id; })"""


# Centres the view (scale 1, or less to fit) on some nodes; returns their box on the screen.
FRAME_NODES = """(ids) => { const c = window.app.canvas, title = LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = ids.map(id => window.app.graph.getNodeById(id)), r = c.canvas.getBoundingClientRect();
    const left = Math.min(...nodes.map(n => n.pos[0])), top = Math.min(...nodes.map(n => n.pos[1] - title));
    const right = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), bottom = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
    const scale = Math.min(1, 0.9 * r.width / (right - left), 0.9 * r.height / (bottom - top));
    c.ds.scale = scale;
    c.ds.offset[0] = r.width / (2 * scale) - (left + right) / 2; c.ds.offset[1] = r.height / (2 * scale) - (top + bottom) / 2;
    c.setDirty(true, true);
    return {x: r.left + (left + c.ds.offset[0]) * scale - 20, y: r.top + (top + c.ds.offset[1]) * scale - 20,
            width: (right - left) * scale + 40, height: (bottom - top) * scale + 40}; }"""


def shot_of_nodes(page, comfy_server, name, node_ids):
    box = page.evaluate(FRAME_NODES, node_ids)
    drawn(page, pictures=True)
    path = os.path.join(artifacts_dir(), f"{name}_{comfy_server.frontend}.png")
    page.screenshot(path=path, clip=box)
    return path


CLOSE_MENUS = "() => document.querySelectorAll('.litecontextmenu').forEach(menu => menu.close ? menu.close() : menu.remove())"


def open_lora_list(page, node_id):
    """Click a loader's lora_name widget, as a user opens the list; returns the texts of the list that
    opens. A list left open takes the next click to close it, so none is open before the click."""
    from playwright.sync_api import TimeoutError as NoListYet
    page.evaluate(CLOSE_MENUS)
    page.evaluate(FRAME_NODES, [node_id])
    point = page.evaluate("""(id) => { const c = window.app.canvas, n = window.app.graph.getNodeById(id);
        const w = n.widgets.find(w => w.name == 'lora_name'), r = c.canvas.getBoundingClientRect();
        const y = n.pos[1] + (w.y ?? w.last_y) + LiteGraph.NODE_WIDGET_HEIGHT / 2;
        return [r.left + (n.pos[0] + n.size[0] / 2 + c.ds.offset[0]) * c.ds.scale, r.top + (y + c.ds.offset[1]) * c.ds.scale]; }""",
                          node_id)
    for _ in range(3):  # as a user clicks again when a busy page missed the click
        drawn(page)
        page.mouse.click(*point)
        try:
            page.wait_for_selector(".litecontextmenu", timeout=5_000)
            break
        except NoListYet:
            continue
    else:
        pytest.fail(f"no list opened on a click on node {node_id}'s lora_name, three times")
    drawn(page)
    return page.evaluate("() => Array.from(document.querySelectorAll('.litecontextmenu')).map(m => m.innerText).join('\\n')")


def score_shown(page, comfy_server, prompt_id):
    """The metric's text as the page shows it, and the statuses of the page's fetches of the metric's
    picture (which the page makes just after the run's end event: waited for, up to 30 s)."""
    entry = comfy_server.history(prompt_id)[prompt_id]
    history, graph = entry["outputs"], entry["prompt"][2]
    metric_id = next(k for k, n in graph.items() if n["class_type"] == "EliGenPlacementMetric")
    card = history[metric_id]["images"][0]["filename"]

    def fetched():
        return [status for status, url in page.responses if "/view?" in url and f"filename={card}" in url]

    for _ in range(150):
        if fetched():
            break
        page.wait_for_timeout(200)
    # the text display node's widget, and what the page shows (its text area or rendered text)
    text = page.evaluate("""() => window.app.graph._nodes.filter(n => n.type == 'PreviewAny')
        .flatMap(n => n.widgets.map(w => w.value).filter(v => typeof v == 'string' && v.includes('mean IoU')))""")
    shown = page.evaluate("""() => [document.body.innerText,
        ...Array.from(document.querySelectorAll('textarea')).map(t => t.value)].join('\\n')""")
    return text, shown, history[metric_id]["text"][0], fetched()


def test_templates_run_in_their_listed_order_on_a_fresh_server(page, comfy_server):
    loras = os.path.join(comfy_server.models_dir, "loras")
    assert not os.listdir(loras) and not os.path.exists(os.path.join(comfy_server.input_dir, TOY_DATASET_FOLDER)), \
        "not a fresh server: this test must run first on it"
    assert os.path.isfile(os.path.join(comfy_server.input_dir, painted.LAYOUT_FILE)), "the package did not provide the painted layout"
    toy = [name for name in template_order() if name in TEMPLATE_NAMES.values()]
    assert toy == [TEMPLATE_NAMES[c] for c in "abcde"]
    for name in toy:
        open_template(page, name)
        page.evaluate(SET_WIDGETS, SHORTER_RUNS)
        trains = name == TEMPLATE_NAMES["c"]
        if trains:  # loader nodes already on the canvas while the LoRA trains
            page.evaluate(ADD_LOADERS, [list(LORA_LOADERS), -500])
            assert not any(node["offers"] for node in page.evaluate(LORA_LISTS, LORA_NAME))
        event = run_from_the_run_button(page)
        assert event["type"] == "execution_success", (name, event)
        page.get_by_role("button", name="Fit View (.)").click()
        drawn(page, pictures=True)
        shot(page, comfy_server, f"run_{name.split(' - ')[0].replace(' ', '_')}")
        if trains:
            assert os.listdir(loras) == [LORA_NAME]
            # the lists of the loaders on the canvas refresh by themselves, and new loaders offer it too
            page.wait_for_function(f"() => ({LORA_LISTS})({json.dumps(LORA_NAME)}).every(n => n.offers)", timeout=30_000)
            new_ids = page.evaluate(ADD_LOADERS, [list(LORA_LOADERS), -250])
            lists = page.evaluate(LORA_LISTS, LORA_NAME)
            assert len(lists) == 2 * len(LORA_LOADERS) and all(node["offers"] for node in lists), lists
            # and the list a user opens on a new loader shows it
            assert LORA_NAME in open_lora_list(page, new_ids[1])
            menu = page.locator(".litecontextmenu").first.bounding_box()  # the list and the loaders around it
            page.screenshot(path=os.path.join(artifacts_dir(), f"fresh_lora_list_{comfy_server.frontend}.png"),
                            clip={"x": max(0, menu["x"] - 500), "y": max(0, menu["y"] - 280), "width": 1000, "height": 420})
            page.evaluate(CLOSE_MENUS)
            continue
        page_text, shown, server_text, fetched = score_shown(page, comfy_server, event["detail"]["prompt_id"])
        assert page_text == [server_text] and "mean IoU" in server_text, (name, page_text, server_text)
        assert server_text in shown, f"{name}: the score is not on the page"
        assert fetched and set(fetched) == {200}, f"{name}: the page did not fetch the score picture: {fetched}"
        shot_of_nodes(page, comfy_server, f"score_{name.split(' - ')[0].replace(' ', '_')}", page.evaluate(
            "() => window.app.graph._nodes.filter(n => ['EliGenPlacementMetric', 'PreviewAny'].includes(n.type)).map(n => n.id)"))
    assert not error_responses(page), error_responses(page)
    assert not page_errors(page), page_errors(page)


def close_dialogs(page):
    """Press Escape while a dialog is open, as a user closes one. Stops at a dialog that stays open (the
    template dialog of frontend 1.32 does not close on Escape; opening a template or the dialog again
    replaces it)."""
    from playwright.sync_api import TimeoutError as StillOpen
    for _ in range(5):
        count = page.locator(".p-dialog-mask").count()
        if not count:
            return
        page.keyboard.press("Escape")
        try:  # the top dialog goes once its closing animation ends
            page.wait_for_function("(count) => document.querySelectorAll('.p-dialog-mask').length < count",
                                   arg=count, timeout=1_000)
        except StillOpen:
            return


# What the page says about a workflow it opened: dialogs, and the newer frontend's error overlay (which
# reports missing nodes there instead of in a dialog).
DIALOG_TEXTS = """() => Array.from(document.querySelectorAll('.p-dialog, [data-testid="error-overlay"]'))
    .map(d => d.innerText)"""


def load_workflow(page, path):
    """Open a workflow file through the page's file input, note any dialog it opens, close it and fit
    the view; returns (the graph's nodes as the page sees them, the dialogs' texts)."""
    with open(path) as f:
        expected = len(json.load(f)["nodes"])
    close_dialogs(page)
    before = loads_done(page)
    page.set_input_files("#comfy-file-input", path)
    wait_for_load(page, os.path.basename(path)[:-5], expected, before)  # with any dialog it opens
    dialogs = page.evaluate(DIALOG_TEXTS)
    close_dialogs(page)
    page.get_by_role("button", name="Fit View (.)").click()
    drawn(page)  # the canvas redrawn before the screenshot
    nodes = page.evaluate("""() => window.app.graph._nodes.map(n => ({
        id: n.id, type: n.type, error: !!n.has_errors, known: !!LiteGraph.registered_node_types[n.type],
        missing_model: (n.widgets || []).some(w => Array.isArray(w.options?.values) && !w.options.values.includes(w.value)
            && /\\.(safetensors|sft|gguf|ckpt|pt|pth|bin)$/.test(String(w.value))),
        widgets: (n.widgets || []).filter(w => !w.hidden && w.type != 'hidden').map(w => w.name)}))""")
    return nodes, dialogs


def stock_loader_builds(page):
    """Whether the frontend can build ComfyUI's own CheckpointLoaderSimple. Frontend 1.27 (ComfyUI 0.3.64's
    pin) builds no node with a ckpt_name/lora_name/vae_name input once one of the stock loaders it indexes
    for its model browser is missing from /object_info (UpscaleModelLoader, when spandrel is absent)."""
    return page.evaluate("() => !!LiteGraph.createNode('CheckpointLoaderSimple')")


def problems_in(nodes, dialogs, object_info, page, server):
    """What a user would see go wrong. A node drawn red is either unknown (its type is not registered:
    a missing node) or registered but not built by the frontend (it lost its widgets and cannot run);
    for the second kind the cause is named when the frontend cannot build ComfyUI's own loaders either."""
    problems = [f"missing-node dialog: {text[:300]!r}" for text in dialogs
                if re.search("missing nodes?|not found", text, re.IGNORECASE)]
    unbuilt = []
    for node in nodes:
        if not node["known"]:
            problems.append(f"node {node['id']} ({node['type']}) is unknown to the frontend (drawn red)")
        elif node["error"] and node["missing_model"]:
            continue  # newer frontends draw a built loader red while its model file is not on the server
        elif node["error"]:
            unbuilt.append(node["type"])
            problems.append(f"node {node['id']} ({node['type']}) is registered but the frontend could not build "
                            f"it (drawn red, no widgets)")
        elif node["type"].startswith("EliGen"):
            absent = [name for name in widget_names(object_info[node["type"]]) if name not in node["widgets"]]
            if absent:
                problems.append(f"node {node['id']} ({node['type']}) does not show the widgets {absent}")
    if unbuilt and not stock_loader_builds(page):
        failed = sorted(set(re.findall(r"^IMPORT FAILED: (\S+)", server.log_text(), re.MULTILINE)))
        problems.append(f"the frontend cannot build ComfyUI's own CheckpointLoaderSimple either, so {sorted(set(unbuilt))} "
                        f"fail for a reason outside this package: a stock loader node it expects is missing "
                        f"(ComfyUI modules that failed to import: {failed}; nodes_upscale_model.py needs spandrel)")
    return problems


def test_every_example_workflow_loads_with_known_nodes_and_widgets(page, comfy_server):
    assert len(UI_WORKFLOWS) >= 9
    object_info = comfy_server.object_info()
    report = {}
    for path in UI_WORKFLOWS:
        name = os.path.basename(path)[:-5]
        nodes, dialogs = load_workflow(page, path)
        shot(page, comfy_server, name)
        assert any(n["type"].startswith("EliGen") for n in nodes), name
        problems = problems_in(nodes, dialogs, object_info, page, comfy_server)
        if problems:
            report[name] = problems
    assert not report, json.dumps(report, indent=1)


def test_the_checks_see_an_unknown_node(page, comfy_server, tmp_path):
    """The detectors above are live: a workflow naming a node type nobody defines trips both."""
    with open(os.path.join(EXAMPLES, f"{TEMPLATE_NAMES['a']}.json")) as f:
        workflow = json.load(f)
    eligen = next(n for n in workflow["nodes"] if n["type"] == "EliGenToyLayouts")
    eligen["type"] = "EliGenNoSuchNode"
    path = tmp_path / "toyworld_unknown_node.json"
    path.write_text(json.dumps(workflow))
    nodes, dialogs = load_workflow(page, str(path))
    problems = problems_in(nodes, dialogs, comfy_server.object_info(), page, comfy_server)
    assert any("missing-node dialog" in p and "EliGenNoSuchNode" in p for p in problems), problems
    assert any("EliGenNoSuchNode) is unknown" in p for p in problems), problems


def test_painted_layout_workflow_runs_from_the_run_button(page, comfy_server):
    if not os.path.exists(os.path.join(comfy_server.models_dir, "loras", LORA_NAME)):  # run on its own
        trained_toy_lora(comfy_server)
    nodes, dialogs = load_workflow(page, os.path.join(EXAMPLES, f"{painted.NAME}.json"))
    assert problems_in(nodes, dialogs, comfy_server.object_info(), page, comfy_server) == []
    # a user shortening the run: fewer steps in the KSampler widget
    page.evaluate(SET_WIDGETS, {"KSampler": {"steps": 3}})
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_function("""() => window.app.graph._nodes.some(n => n.type == 'SaveImage' && n.imgs
        && n.imgs.length == 4 && n.imgs.every(i => i.complete && i.naturalWidth == %d))""" % data.SIZE, timeout=300_000)
    page.get_by_role("button", name="Fit View (.)").click()
    drawn(page, pictures=True)
    shot(page, comfy_server, "painted_layout_run")
    sources = page.evaluate("""() => window.app.graph._nodes.filter(n => n.type == 'SaveImage')
        .flatMap(n => n.imgs.map(i => i.src))""")
    # the images shown are this run's outputs, served by the server
    assert all("painted_lora" in src and "type=output" in src for src in sources), sources
    saved = glob.glob(os.path.join(comfy_server.output_dir, "eligen_toy", "painted_lora_*.png"))
    assert len(saved) >= 4
    previews = page.evaluate("""() => window.app.graph._nodes.filter(n => n.type == 'EliGenPreviewEntities')
        .map(n => (n.imgs || []).filter(i => i.complete && i.naturalWidth > 0).length)""")
    assert previews == [1]
