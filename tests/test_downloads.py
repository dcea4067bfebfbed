"""Official weights are fetched as the models' own packages fetch them: from the Hub or the mirror ``HF_ENDPOINT``
names, by default, into the Hugging Face cache; offline, a missing file is one line in seconds.

A local HTTP server stands in for a Hub mirror: it answers the Hub's file protocol (``HEAD`` then ``GET`` on
``/<repo>/resolve/<revision>/<file>``, with the commit and ETag headers the client checks) for small random
checkpoints written in the official layouts under the official repository and file names.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import torch

from tabtune_cli.models.base import Task
from tabtune_cli.models.mitra import Tab2D
from tabtune_cli.models.orion_msp import OrionMSPAdapter
from tabtune_cli.models.specs.mitra import REPOS as MITRA_REPOS
from tabtune_cli.models.specs.orion_msp import CHECKPOINTS as ORION_FILES
from tabtune_cli.models.specs.orion_msp import REPO_ID as ORION_REPO

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def official_files(tmp_path) -> dict[str, bytes]:
    """URL path -> content: OrionMSP's ``Orion-MSP-v1.0.ckpt`` and Mitra's classifier folder, tiny and random."""
    torch.manual_seed(0)
    adapter = OrionMSPAdapter()
    orion = adapter.from_architecture({**adapter.sizes["tiny"], "max_classes": 10})
    written = adapter.write_checkpoint(orion, {**adapter.sizes["tiny"], "max_classes": 10},
                                       Task("classification", 2), tmp_path)
    mitra = Tab2D(dim=16, dim_output=10, n_layers=2, n_heads=2, task="CLASSIFICATION")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in mitra.state_dict().items()}, tmp_path / "model.safetensors")
    files = {f"{ORION_REPO}/{ORION_FILES['classification']}": written.read_bytes(),
             f"{MITRA_REPOS['classification']}/config.json": json.dumps(mitra.official_config()).encode(),
             f"{MITRA_REPOS['classification']}/model.safetensors": (tmp_path / "model.safetensors").read_bytes()}
    return {f"/{repo_file.rsplit('/', 1)[0]}/resolve/main/{repo_file.rsplit('/', 1)[1]}": data
            for repo_file, data in files.items()}


class Mirror:
    """A Hub mirror on 127.0.0.1 at a free port; ``gets`` counts the file bodies it sent, by path."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.gets, self.hosts = files, {}, set()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self, body: bool):
                # a proxy's request line carries the whole URL (http://host/path): the file is its path
                path = urlsplit(self.path).path
                mirror.hosts.add(self.headers.get("Host"))
                data = mirror.files.get(path)
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    mirror.gets[path] = mirror.gets.get(path, 0) + 1
                    self.wfile.write(data)

            def do_HEAD(self):  # noqa: N802 (http.server's names)
                self.answer(body=False)

            def do_GET(self):  # noqa: N802
                self.answer(body=True)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror(tmp_path):
    served = Mirror(official_files(tmp_path))
    yield served
    served.close()


def tabtune(*args, cwd, env):
    """The installed command in a fresh process (the Hub client reads HF_ENDPOINT when it is imported)."""
    # the machine's own Hub and proxy settings stay out: each test names the route it means
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("HF_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    return subprocess.run([sys.executable, "-m", "tabtune_cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**clean, **env})


@pytest.mark.parametrize("model", ["orionmsp", "mitra"])
def test_a_run_with_no_setting_fetches_the_official_files_from_the_mirror_once(model, mirror, tmp_path):
    env = {"HF_ENDPOINT": mirror.url, "HF_HOME": str(tmp_path / "hf")}
    first = tabtune("train", f"model={model}", "strategy=inference", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    repo = ORION_REPO if model == "orionmsp" else MITRA_REPOS["classification"]
    weights = {p: n for p, n in mirror.gets.items() if p.startswith(f"/{repo}/")}
    weight_file = next(p for p in weights if not p.endswith("config.json"))
    assert weights[weight_file] == 1, mirror.gets
    # the file that ran is the mirror's, byte for byte, and the run's manifest names it with its hash
    manifest = json.loads(next((tmp_path / "runs").rglob("run.json")).read_text())
    assert manifest["status"] == "complete"
    served = hashlib.sha256(mirror.files[weight_file]).hexdigest()
    assert served in json.dumps(manifest["provenance"])
    metrics = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())
    assert metrics["rows"]["test"] > 0 and metrics["test"]["roc_auc"] is not None

    again = tabtune("train", f"model={model}", "strategy=inference", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert mirror.gets[weight_file] == 1, "the second run fetched the weights again instead of reading the cache"
    assert len(list((tmp_path / "runs").rglob("metrics.json"))) == 2


@pytest.mark.parametrize("model,file", [("orionmsp", "Orion-MSP-v1.0.ckpt"), ("mitra", "config.json")])
def test_offline_with_an_empty_cache_fails_in_one_line_in_seconds(model, file, mirror, tmp_path):
    env = {"HF_ENDPOINT": mirror.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    result = tabtune("train", f"model={model}", "strategy=inference", cwd=tmp_path, env=env)
    assert time.monotonic() - started < 10
    assert result.returncode == 2 and mirror.gets == {}
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("tabtune: error:") and "Traceback" not in result.stderr
    repo = ORION_REPO if model == "orionmsp" else MITRA_REPOS["classification"]
    assert f"'{file}'" in line and repo in line and "model.checkpoint=" in line and "HF_HUB_OFFLINE" in line
    assert mirror.url in line  # the endpoint actually in use, not huggingface.co
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("run.json"))


def test_an_unreachable_endpoint_or_allow_download_false_fails_in_one_line_naming_it(tmp_path):
    closed = Mirror({})
    url = closed.url
    closed.close()  # nothing listens there now: connection refused
    env = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    result = tabtune("train", "model=orionmsp", cwd=tmp_path, env=env)
    assert time.monotonic() - started < 30
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode == 2 and f"{url} cannot be reached" in line and "Orion-MSP-v1.0.ckpt" in line
    refused = tabtune("train", "model=orionmsp", "model.allow_download=false", cwd=tmp_path, env=env)
    (line,) = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and "model.allow_download=false keeps to the cache" in line


def test_a_mirror_that_lacks_the_file_says_what_it_answered(mirror, tmp_path):
    env = {"HF_ENDPOINT": mirror.url, "HF_HOME": str(tmp_path / "hf")}
    result = tabtune("train", "model=tabdpt", cwd=tmp_path, env=env)
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode == 2 and f"{mirror.url} answered 404" in line and "Layer6/TabDPT" in line


def test_a_machine_whose_only_way_out_is_a_proxy_downloads_through_it(mirror, tmp_path):
    """The Hub client's own proxy settings carry the download: here the endpoint's host does not even resolve,
    and the only route is the proxy (the mirror server answers as one)."""
    env = {"HF_ENDPOINT": "http://hub.example.invalid", "HTTP_PROXY": mirror.url, "HF_HOME": str(tmp_path / "hf")}
    result = tabtune("train", "model=mitra", "strategy=inference", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert mirror.hosts == {"hub.example.invalid"}  # the requests named the endpoint and went through the proxy
    assert mirror.gets[f"/{MITRA_REPOS['classification']}/resolve/main/model.safetensors"] == 1


def test_validate_looks_the_official_file_up_and_downloads_nothing(mirror, tmp_path):
    env = {"HF_ENDPOINT": mirror.url, "HF_HOME": str(tmp_path / "hf")}
    result = tabtune("validate", "model=mitra", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert mirror.gets == {} and not list((tmp_path / "hf").rglob("*.safetensors"))
    assert not (tmp_path / "runs").exists()
    missing = tabtune("validate", "model=tabdpt", cwd=tmp_path, env=env)  # the mirror lacks TabDPT's file
    (line,) = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and f"{mirror.url} answered 404" in line
