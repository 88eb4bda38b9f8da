"""Single-machine `wanrt serve` never imports Ray, even where the cluster extra is installed."""

from __future__ import annotations

import subprocess
import sys

# What `wanrt serve` does, in a fresh interpreter: parse its arguments, build the app, run its lifespan, serve a load
# and its status. Then no module of Ray may have been imported.
SERVE_WITHOUT_RAY = """
import sys
from litestar.testing import TestClient
from serve.cli import build_parser, settings_from_args
from serve.app import create_app

args = build_parser().parse_args(["serve", "--ice-interfaces", "loopback", "--models-dir", sys.argv[1]])
with TestClient(create_app(settings_from_args(args)), base_url="http://127.0.0.1") as client:
    load = client.post("/api/v1/pipeline/load", json={"pipeline_id": "passthrough"})
    assert load.status_code == 200, load.text
    assert client.get("/api/v1/pipeline/status").json()["pipeline_id"] == "passthrough"
    assert client.get("/api/v1/webrtc/sessions").json()["sessions"] == []
ray = sorted(name for name in sys.modules if name == "ray" or name.startswith("ray."))
assert not ray, ray
print("no ray")
"""


def test_wanrt_serve_never_imports_ray(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_RAY, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "no ray" in done.stdout, done.stdout + done.stderr


def test_the_cluster_commands_are_listed_without_importing_ray() -> None:
    code = (
        "import sys; from serve.cli import build_parser; import serve.cluster.names; "
        "build_parser().parse_args(['cluster', 'worker', '--cpu-workers', '2']); "
        "assert 'ray' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
