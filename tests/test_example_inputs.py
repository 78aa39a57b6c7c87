"""Every image an example workflow loads is shipped in example_workflows/input/ (the README tells users
to copy them into ComfyUI/input/), opens as an RGB image, and is what scripts/make_example_images.py
draws (so the files and the script cannot drift apart)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
INPUT = REPO / "example_workflows" / "input"
PIL = pytest.importorskip("PIL.Image")


def loaded_images():
    names = set()
    for path in sorted((REPO / "example_workflows" / "api").glob("*.json")):
        for node in json.loads(path.read_text()).values():
            if node["class_type"] == "LoadImage":
                names.add(node["inputs"]["image"])
    return sorted(names)


def test_the_examples_load_images():
    assert loaded_images() == ["handbag.png", "normals.png", "photo.png"]


@pytest.mark.parametrize("name", loaded_images())
def test_every_loaded_image_is_shipped_and_drawn_by_the_script(name):
    spec = importlib.util.spec_from_file_location("make_example_images", REPO / "scripts" / "make_example_images.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shipped = np.asarray(PIL.open(INPUT / name).convert("RGB"))
    drawn = np.asarray(script.IMAGES[name]().convert("RGB"))
    assert shipped.shape == (256, 256, 3)
    assert np.array_equal(shipped, drawn)
