"""Tier 3: a real ComfyUI server on 127.0.0.1 with the pack, driven over HTTP and in headless
Chromium, once with the front end ComfyUI pins (comfyui-frontend-package in its requirements) and
once with a current one (tests/comfyui/requirements-frontend-current.txt; scripts/test.sh installs it
into a folder and names that folder's static/ in FS_FRONTEND_CURRENT). Skipped without COMFYUI_PATH;
the browser test also needs Debian's chromium and the playwright package (it uses the system browser,
never downloads one)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url, data):
    req = urllib.request.Request(url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
    return json.loads(body) if body.strip().startswith((b"{", b"[")) else body.decode()


# The test-only nodes of tier 2 (weight-free model, Gaussian latents...), loaded by the server as a pack.
TEST_NODES_PACK = f"""import sys
sys.path.insert(0, {str(HERE)!r})
from conftest import _test_nodes
NODE_CLASS_MAPPINGS = _test_nodes()
"""


def _current_front_end() -> str | None:
    root = os.environ.get("FS_FRONTEND_CURRENT")
    return root if root and (Path(root) / "index.html").is_file() else None


@pytest.fixture(scope="module", params=["pinned", "current"])
def server(request, tmp_path_factory):
    """(url, base folder, front end name). 'current' needs FS_FRONTEND_CURRENT (scripts/test.sh sets it)."""
    extra = []
    if request.param == "current":
        root = _current_front_end()
        if root is None:
            pytest.skip("current front end: FS_FRONTEND_CURRENT does not name a front end's static folder "
                        "(scripts/test.sh installs tests/comfyui/requirements-frontend-current.txt and sets it)")
        extra = ["--front-end-root", root]
    base = tmp_path_factory.mktemp(f"comfy_base_{request.param}")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-fast-samplers").symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "fs_test_nodes.py").write_text(TEST_NODES_PACK)
    port = _free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--base-directory", str(base), "--database-url", "sqlite:///:memory:", *extra],
        cwd=os.environ["COMFYUI_PATH"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited: see {base / 'server.log'}")
        try:
            _get(url + "/system_stats")
            break
        except OSError:
            time.sleep(1)
    else:
        proc.terminate()
        raise RuntimeError("ComfyUI did not start within 180 s")
    yield url, base, request.param
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_object_info_lists_every_node_with_tooltips(server):
    url, *_ = server
    info = _get(url + "/object_info")
    ours = {name: d for name, d in info.items() if name.startswith("FS_")}
    assert "FS_ERSDESolver" in ours and "FS_PlotSigmas" in ours
    for name, d in ours.items():
        assert d["description"], name
        assert d["category"].startswith("sampling/fs"), name
        for section in ("required", "optional"):
            for input_name, spec in d["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), (name, input_name)
    # plain display names and advanced flags reach the front end; the ids (what workflows store) stay
    er_sde = ours["FS_ERSDESolver"]["input"]["required"]
    assert er_sde["quadrature"][1]["display_name"] == "step coefficients" and er_sde["quadrature"][1]["advanced"]
    assert er_sde["order"][1]["display_name"] == "solver order" and not er_sde["order"][1].get("advanced")


def _sigma_plot_prompt():
    return {"1": {"class_type": "KarrasScheduler", "inputs": {"steps": 12, "sigma_max": 14.6, "sigma_min": 0.03, "rho": 7.0}},
            "2": {"class_type": "FS_PlotSigmas", "inputs": {"sigmas": ["1", 0]}}}


def _wait_history(url, prompt_id, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed"):
            return history[prompt_id]
        time.sleep(0.5)
    raise TimeoutError(prompt_id)


def test_prompt_over_http(server):
    url, *_ = server
    answer = _post(url + "/prompt", {"prompt": _sigma_plot_prompt(), "client_id": str(uuid.uuid4())})
    result = _wait_history(url, answer["prompt_id"])
    sigmas = result["outputs"]["2"]["fs_sigmas"]
    assert len(sigmas) == 13 and sigmas[-1] == 0 and abs(sigmas[0] - 14.6) < 1e-4


def test_bad_prompt_is_refused_with_a_message(server):
    url, *_ = server
    bad = {"1": {"class_type": "KarrasScheduler", "inputs": {"steps": 0, "sigma_max": 14.6, "sigma_min": 0.03, "rho": 7.0}},
           "2": {"class_type": "FS_PlotSigmas", "inputs": {"sigmas": ["1", 0]}}}
    req = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": bad}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and "value_smaller_than_min" in err.value.read().decode()


def _assert_same_prompt(sent: dict, api: dict, name: str) -> None:
    """What the front end serialises from the UI file is the API twin: same nodes, same inputs, same values
    (numbers to float32 precision; the front end's own control widgets are not sent)."""
    assert sorted(sent, key=int) == sorted(api, key=int), name
    for nid, node in api.items():
        got = sent[nid]["inputs"]
        assert set(got) == set(node["inputs"]), (name, nid, sorted(got), sorted(node["inputs"]))
        for key, value in node["inputs"].items():
            if isinstance(value, float) or isinstance(got[key], float):
                assert got[key] == pytest.approx(value, rel=1e-6), (name, nid, key, got[key], value)
            else:
                assert got[key] == value, (name, nid, key, got[key], value)


@pytest.fixture(scope="module")
def page(server):
    """A headless Chromium page on the server's front end, the pack's extensions loaded; (page, screenshot dir)."""
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium")
    playwright = pytest.importorskip("playwright.sync_api")
    url, base, front_end = server
    shots = Path(os.environ.get("FS_SCREENSHOT_DIR", base / "screenshots")) / front_end
    shots.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        _post(url + "/settings/Comfy.TutorialCompleted", True)  # no first-run template dialog
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=90_000)
        page.wait_for_function("() => ['fs.fixedSeed'].every(n => window.app.extensions.some(e => e.name === n))",
                               timeout=60_000)
        yield page, shots
        browser.close()
    print("screenshots in", shots)


def test_front_end_sends_what_the_api_twin_says(page):
    page, shots = page
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        name, workflow = path.stem, json.loads(path.read_text())
        missing = page.evaluate("""async (wf) => {
            await window.app.loadGraphData(wf);
            return wf.nodes.map(n => n.type).filter(t => !window.LiteGraph.registered_node_types[t]);
        }""", workflow)
        assert missing == [], name
        assert page.evaluate("() => window.app.graph._nodes.length") == len(workflow["nodes"]), name
        assert page.evaluate("() => window.app.canvas.ds.scale") == 1.0, name  # opens at 100 %: text readable
        sent = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        _assert_same_prompt(sent, json.loads((REPO / "example_workflows" / "api" / f"{name}.json").read_text()), name)
        page.keyboard.press("Escape")  # the missing-model notice: no weights on this machine
        page.screenshot(path=str(shots / f"{name}.png"))


BUILD_ONCE = ["FS_ELBOScheduleOptimizer", "FS_DPMOTTargetsFromLatents", "FS_DPMOTTargetsSelfGenerate", "FS_DPMOTFitMap"]

# Built in the page from fresh nodes (as from the node menu): a weight-free model with the exact Gaussian
# denoiser, Gaussian latents, a DPM-OT pool, its map and schedule, and the ELBO optimizer.
CACHE_GRAPH = """async () => {
    const g = window.app.graph, L = window.LiteGraph;
    g.clear();
    const add = (type, x, y) => { const n = L.createNode(type); n.pos = [x, y]; g.add(n); return n; };
    const set = (n, name, value) => { n.widgets.find(w => w.name === name).value = value; };
    const model = add("FSTest_WeightFreeModel", 0, 0), exact = add("FSTest_ExactGaussianModel", 300, 0);
    const latents = add("FSTest_GaussianLatents", 0, 300), cond = add("FSTest_ZeroConditioning", 0, 600);
    model.connect(0, exact, 0);
    for (const w of latents.widgets) if (w.name !== "seed" && w.options?.values?.includes?.("fixed")) w.value = "fixed";
    const targets = add("FS_DPMOTTargetsFromLatents", 600, 0), fit = add("FS_DPMOTFitMap", 900, 0);
    const schedule = add("FS_DPMOTSigmas", 1200, 0), plot = add("FS_PlotSigmas", 1500, 0);
    const elbo = add("FS_ELBOScheduleOptimizer", 600, 400);
    exact.connect(0, targets, 0); latents.connect(0, targets, 1); targets.connect(0, fit, 0);
    exact.connect(0, schedule, 0); fit.connect(0, schedule, 1); schedule.connect(0, plot, 0);
    exact.connect(0, elbo, 0); latents.connect(0, elbo, 1); cond.connect(0, elbo, 2);
    set(fit, "iterations", 50); set(fit, "device", "cpu"); set(schedule, "steps", 3);
    set(elbo, "candidates", 12); set(elbo, "steps", 4); set(elbo, "use_cache", false);
    window.fsEvents = [];
    for (const name of ["execution_cached", "executed", "execution_success", "execution_error"])
        window.app.api.addEventListener(name, (e) => window.fsEvents.push([name, e.detail]));
    return { targets: targets.id, fit: fit.id, elbo: elbo.id };
}"""


def _run_from_page(page) -> list:
    """The Run button's path (app.queuePrompt, control-after-generate applied); waits for the prompt's end."""
    page.evaluate("async () => { window.fsEvents = []; await window.app.queuePrompt(0, 1); }")
    page.wait_for_function("() => window.fsEvents.some(([n]) => n === 'execution_success' || n === 'execution_error')",
                           timeout=240_000)
    return page.evaluate("() => window.fsEvents")


def test_build_once_nodes_start_fixed_and_the_second_run_is_cached(page):
    page, _shots = page
    controls = page.evaluate("""(types) => Object.fromEntries(types.map(t => {
        const n = window.LiteGraph.createNode(t);
        return [t, (n.widgets.find(w => w.name === "seed").linkedWidgets ?? []).map(w => w.value)];
    }))""", BUILD_ONCE + ["FS_BridgeSampler"])
    for node_type in BUILD_ONCE:
        assert controls[node_type] == ["fixed"], (node_type, controls[node_type])
    assert controls["FS_BridgeSampler"] == ["randomize"]  # a per-image seed keeps the front end's default
    ids = page.evaluate(CACHE_GRAPH)
    first = _run_from_page(page)
    assert [d for n, d in first if n == "execution_error"] == []
    seeds = page.evaluate("() => window.app.graph._nodes.filter(n => n.type.startsWith('FS_')).map(n => "
                          "(n.widgets ?? []).find(w => w.name === 'seed')?.value)")
    second = _run_from_page(page)
    assert [d for n, d in second if n == "execution_error"] == []
    cached = {str(i) for n, d in second if n == "execution_cached" for i in d["nodes"]}
    assert {str(ids["targets"]), str(ids["fit"]), str(ids["elbo"])} <= cached, (ids, cached)
    # nothing ran again (output nodes still send their cached "executed" message)
    assert cached == {str(i) for i in page.evaluate("() => window.app.graph._nodes.map(n => n.id)")}
    assert page.evaluate("() => window.app.graph._nodes.filter(n => n.type.startsWith('FS_')).map(n => "
                         "(n.widgets ?? []).find(w => w.name === 'seed')?.value)") == seeds
    page.evaluate("() => { window.app.canvas.ds.offset = [0, 0]; window.app.canvas.ds.scale = 0.9; window.app.canvas.setDirty(true, true); }")
    page.wait_for_timeout(300)
    page.screenshot(path=str(_shots / "build_once_cached.png"))


def _plot_graph_and_run(page) -> dict:
    """Karras (20 steps) -> Plot Sigmas, built and Run in the page; the plot node's 'executed' output."""
    page.evaluate("""async () => {
        const g = window.app.graph, L = window.LiteGraph;
        g.clear();
        const karras = L.createNode("KarrasScheduler"), plot = L.createNode("FS_PlotSigmas");
        g.add(karras); g.add(plot);
        karras.pos = [50, 50]; plot.pos = [420, 50];
        karras.connect(0, plot, 0);
        window.fsPlotId = plot.id;
    }""")
    events = _run_from_page(page)
    return next(d["output"] for n, d in events if n == "executed" and str(d["node"]) == str(page.evaluate("window.fsPlotId")))


@pytest.mark.parametrize("rendering", ["canvas", "vue"])
def test_sigma_plot_shows_as_an_image_preview(page, rendering):
    """The plot is a backend-drawn image preview: the classic canvas shows it as the node's image, Vue node
    rendering ("Nodes 2.0", current front end only) as an <img> in the node."""
    page, shots = page
    front_end = shots.name
    if rendering == "vue" and front_end == "pinned":
        pytest.skip("the pinned front end has no Vue node rendering")
    page.evaluate("(on) => window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on)", rendering == "vue")
    output = _plot_graph_and_run(page)
    assert len(output["fs_sigmas"]) == 21  # KarrasScheduler default: 20 steps + the final 0
    (image,) = output["images"]
    assert image["type"] == "temp"
    url = page.evaluate("() => window.location.origin")
    with urllib.request.urlopen(f"{url}/view?filename={image['filename']}&type=temp&subfolder={image['subfolder']}",
                                timeout=30) as r:
        assert r.read(8) == b"\x89PNG\r\n\x1a\n"
    if rendering == "canvas":
        page.wait_for_function("""(name) => {
            const n = window.app.graph.getNodeById(window.fsPlotId);
            return n.imgs?.length === 1 && n.imgs[0].complete && n.imgs[0].naturalWidth >= 400
                && n.imgs[0].src.includes(name);
        }""", arg=image["filename"], timeout=30_000)
    else:
        page.wait_for_function("""(name) => [...document.querySelectorAll('img')].some(
            i => i.src.includes(name) && i.complete && i.naturalWidth >= 400 && i.getBoundingClientRect().width > 100)""",
                               arg=image["filename"], timeout=30_000)
    page.keyboard.press("Escape")
    page.evaluate("() => { window.app.canvas.ds.offset = [0, 0]; window.app.canvas.ds.scale = 1.2; window.app.canvas.setDirty(true, true); }")
    page.wait_for_timeout(300)
    page.screenshot(path=str(shots / f"sigma_plot_{rendering}.png"))
    page.evaluate("() => window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false)")
