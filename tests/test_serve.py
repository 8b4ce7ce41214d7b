"""The inspection service, as a real server on loopback: answers, 4xx for bad requests.

The server runs in a uvicorn subprocess: those tests are marked slow."""

import base64
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from adtr.render import defect_boxes
from adtr.serve import encode_multipart


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    _, run, files = tiny_run
    port = _free_port()
    workdir = tmp_path_factory.mktemp("cwd")
    proc = subprocess.Popen(
        [sys.executable, "-m", "adtr.cli", "serve", str(run), "--port", str(port), "--max-upload-mb", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=workdir,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read().decode()) from None
            time.sleep(0.3)
    yield url, files, workdir
    proc.terminate()
    proc.wait(timeout=10)


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_health_and_openapi(server):
    url, _, _ = server
    health = json.loads(urllib.request.urlopen(url + "/health").read())
    assert health["status"] == "ok" and health["image_size"] == [64, 64]
    spec = json.loads(urllib.request.urlopen(url + "/openapi.json").read())
    assert "/predict" in spec["paths"]


@pytest.mark.slow
def test_predict_returns_decision_and_heatmap(server, tiny_run):
    url, files, _ = server
    det = tiny_run[0]
    status, answer = _post(url + "/predict?heatmap=true", *encode_multipart(files[0].name, files[0].read_bytes()))
    assert status == 200, answer
    expected = det.predict([files[0]])[0]
    assert answer["anomaly_score"] == pytest.approx(expected.anomaly_score, abs=1e-5)
    assert answer["is_anomalous"] == expected.is_anomalous
    assert answer["normalized_score"] == pytest.approx(expected.normalized_score, abs=1e-5)
    assert answer["defect_boxes"] == defect_boxes(det.thresholds_, expected.anomaly_map, expected.is_anomalous)
    png = base64.b64decode(answer["heatmap_png_base64"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    "body,ctype,code",
    [
        (b"hello", "text/plain", 422),
        (encode_multipart("x.png", b"not an image at all")[0], None, 415),
        (encode_multipart("x.png", b"")[0], None, 415),
        (encode_multipart("x.png", b"a", field="other")[0], None, 422),
        (b"--zz\r\ngarbage", "multipart/form-data; boundary=zz", 422),
    ],
)
def test_bad_requests_get_4xx(server, body, ctype, code):
    url, _, _ = server
    if ctype is None:  # the boundary must match the body's
        ctype = "multipart/form-data; boundary=" + body.split(b"\r\n", 1)[0][2:].decode()
    status, answer = _post(url + "/predict", body, ctype)
    assert status == code, answer
    assert "detail" in answer


@pytest.mark.slow
def test_oversized_upload_is_413(server):
    import http.client
    from urllib.parse import urlparse

    url, _, _ = server
    body, ctype = encode_multipart("big.png", b"0" * (2 * 1024 * 1024))
    conn = http.client.HTTPConnection(urlparse(url).hostname, urlparse(url).port, timeout=30)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Type", ctype)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    try:
        conn.send(body)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered 413 and closed before reading the rest: the point
    response = conn.getresponse()
    assert response.status == 413
    assert "exceeds the limit" in json.loads(response.read())["detail"]
    conn.close()


@pytest.mark.slow
def test_concurrent_clients_all_succeed_and_nothing_is_written(server):
    url, files, workdir = server
    bodies = [encode_multipart(f.name, f.read_bytes()) for f in files]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: _post(url + "/predict", *b), bodies * 3))
    assert all(code == 200 for code, _ in results)
    scores = {}
    for (_, a), f in zip(results, files * 3, strict=True):
        scores.setdefault(f.name, set()).add(round(a["anomaly_score"], 6))
    assert all(len(v) == 1 for v in scores.values())  # same image, same score, under concurrency
    assert list(workdir.iterdir()) == []
    assert np.isfinite([a["anomaly_score"] for _, a in results]).all()


def test_app_honours_the_device(tiny_run):
    from adtr.serve import create_app

    _, run, _ = tiny_run
    app = create_app(run, engine="torch", device="cpu")
    health = next(r.endpoint for r in app.routes if getattr(r, "path", "") == "/health")()
    assert health["device"] == "cpu" and health["engine"] == "torch" and health["image_size"] == [64, 64]
    assert health["backend"] == "torch" and "forced" in health["backend_reason"]


def test_health_names_the_backend_auto_chose(tiny_run):
    from adtr.serve import create_app

    _, run, _ = tiny_run
    app = create_app(run)  # the default: auto, with the graph fit wrote
    health = next(r.endpoint for r in app.routes if getattr(r, "path", "") == "/health")()
    assert health["backend"] == health["engine"] == "onnx" and "agrees with PyTorch" in health["backend_reason"]
