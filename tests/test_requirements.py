"""requirements.txt and pyproject's dependencies never upgrade or replace the user's torch.

pip resolves them (--dry-run, nothing installed) for a Python whose only package is a torch 2.1.0
(the floor pyproject states; a metadata-only stand-in, no download) and must plan no torch. This
catches a dependency whose newest release needs a newer torch (kornia 0.9 needs torch >= 2.5.1:
listing "kornia>=0.7" made pip plan torch 2.14 and its CUDA wheels). It needs the package index:
offline it skips; a resolution conflict fails."""
import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)")
REPO = Path(__file__).resolve().parents[1]
OLD_TORCH = "2.1.0"
OFFLINE_SIGNS = ("from versions: none", "NewConnectionError", "Temporary failure in name resolution",
                 "Network is unreachable", "Max retries exceeded", "ConnectTimeout")


def _runtime_requirements() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    listed = [line.split("#")[0].strip() for line in lines]
    return [r for r in listed if r] + tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def _python_with_only_torch(folder: Path) -> Path:
    venv.create(folder, with_pip=False)
    python = folder / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    dist = Path(purelib) / f"torch-{OLD_TORCH}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {OLD_TORCH}\n")
    (dist / "INSTALLER").write_text("pip\n")
    (dist / "RECORD").write_text("")
    return python


def test_requirements_keep_an_older_torch(tmp_path):
    requirements = _runtime_requirements()
    assert requirements and not any(r.replace(" ", "").startswith(("torch=", "torch<", "torch~", "torchvision"))
                                    for r in requirements), requirements  # a lower bound at most, never a pin
    python = _python_with_only_torch(tmp_path / "env")
    report = tmp_path / "report.json"
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run",
                               "--quiet", "--retries", "1", "--timeout", "20", "--report", str(report),
                               *requirements], capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.skip("pip took over 240 s to resolve (a slow or absent package index)")
    if done.returncode != 0:
        if any(sign in done.stderr for sign in OFFLINE_SIGNS) and "ResolutionImpossible" not in done.stderr:
            pytest.skip(f"no package index reachable: {done.stderr.strip().splitlines()[-1]}")
        if "no such option: --python" in done.stderr:
            pytest.skip("pip is older than 22.3 (no --python)")
        pytest.fail(f"pip could not resolve {requirements} beside torch {OLD_TORCH}:\n{done.stderr[-3000:]}")
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert "torch" not in planned, f"pip would install torch {planned.get('torch')} over {OLD_TORCH}: {planned}"
    assert not any(name.startswith(("nvidia-", "triton")) for name in planned), planned
