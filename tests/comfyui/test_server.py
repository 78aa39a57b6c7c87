"""Tier 3: a real ComfyUI server on 127.0.0.1 with the pack, driven over HTTP and in headless
Chromium. Skipped without COMFYUI_PATH; the browser test also needs Debian's chromium and the
playwright package (it uses the system browser, never downloads one)."""
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-fast-samplers").symlink_to(REPO, target_is_directory=True)
    port = _free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--base-directory", str(base), "--database-url", "sqlite:///:memory:"],
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
    yield url, base
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_object_info_lists_every_node_with_tooltips(server):
    url, _ = server
    info = _get(url + "/object_info")
    ours = {name: d for name, d in info.items() if name.startswith("FS_")}
    assert "FS_ERSDESolver" in ours and "FS_PlotSigmas" in ours
    for name, d in ours.items():
        assert d["description"], name
        assert d["category"].startswith("sampling/fs"), name
        for section in ("required", "optional"):
            for input_name, spec in d["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), (name, input_name)


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
    url, _ = server
    answer = _post(url + "/prompt", {"prompt": _sigma_plot_prompt(), "client_id": str(uuid.uuid4())})
    result = _wait_history(url, answer["prompt_id"])
    sigmas = result["outputs"]["2"]["fs_sigmas"]
    assert len(sigmas) == 13 and sigmas[-1] == 0 and abs(sigmas[0] - 14.6) < 1e-4


def test_bad_prompt_is_refused_with_a_message(server):
    url, _ = server
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


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_front_end_loads_workflow_and_draws_the_sigma_plot(server):
    playwright = pytest.importorskip("playwright.sync_api")
    url, base = server
    workflows = {p.stem: json.loads(p.read_text()) for p in sorted((REPO / "example_workflows").glob("*.json"))}
    shots = Path(os.environ.get("FS_SCREENSHOT_DIR", base / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        _post(url + "/settings/Comfy.TutorialCompleted", True)  # no first-run template dialog
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=90_000)
        page.wait_for_function("() => window.app.extensions.some(e => e.name === 'fs.sigmaPlot')", timeout=60_000)
        for name, workflow in workflows.items():
            missing = page.evaluate("""async (wf) => {
                await window.app.loadGraphData(wf);
                return wf.nodes.map(n => n.type).filter(t => !window.LiteGraph.registered_node_types[t]);
            }""", workflow)
            assert missing == [], name
            assert page.evaluate("() => window.app.graph._nodes.length") == len(workflow["nodes"]), name
            sent = page.evaluate("async () => (await window.app.graphToPrompt()).output")
            _assert_same_prompt(sent, json.loads((REPO / "example_workflows" / "api" / f"{name}.json").read_text()), name)
            page.keyboard.press("Escape")  # the missing-model notice: no weights on this machine
            page.screenshot(path=str(shots / f"{name}.png"))
        # Run a weight-free graph from the page and check the plot's data arrived on the node.
        page.evaluate("""async () => {
            const karras = window.LiteGraph.createNode("KarrasScheduler");
            const plot = window.LiteGraph.createNode("FS_PlotSigmas");
            window.app.graph.clear();
            window.app.graph.add(karras); window.app.graph.add(plot);
            karras.pos = [50, 50]; plot.pos = [400, 50];
            karras.connect(0, plot, 0);
            await window.app.queuePrompt(0, 1);
        }""")
        page.wait_for_function("() => window.app.graph._nodes.some(n => Array.isArray(n.fsSigmas))", timeout=60_000)
        n = page.evaluate("() => window.app.graph._nodes.find(n => n.fsSigmas).fsSigmas.length")
        assert n == 21  # KarrasScheduler default: 20 steps + the final 0
        page.keyboard.press("Escape")
        page.evaluate("() => { window.app.canvas.ds.offset = [0, 0]; window.app.canvas.ds.scale = 1.5; window.app.canvas.draw(true, true); }")
        page.screenshot(path=str(shots / "sigma_plot.png"))
        browser.close()
    print("screenshots in", shots)
