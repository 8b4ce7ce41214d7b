"""HTTP inspection service (FastAPI): the model is loaded once, each upload is scored.

    POST /predict   multipart form with one image file in field `file`; `?heatmap=true`
                    adds the heatmap overlay as a base64 PNG. Returns score, normalised
                    score, decision and defect bounding boxes.
    GET  /health    status and the run's settings.
    GET  /docs      OpenAPI documentation.

Every bad request gets a 4xx answer with a one-line reason: over the size limit (413),
not multipart or no file (422), not a decodable image (415). Inference runs one request at
a time behind a lock, so concurrent clients queue instead of multiplying memory. The
service writes no files.
"""

from __future__ import annotations

import base64
import threading
import uuid
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from adtr.data.images import DataError, read_image
from adtr.detector import ADTRDetector
from adtr.render import defect_boxes, display_range, heatmap_png

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024


def create_app(
    run_dir: Path | str, max_upload_bytes: int = DEFAULT_MAX_UPLOAD, engine: str = "torch", device: str = "cpu"
) -> FastAPI:
    """The service for a run folder; engine "torch" runs on `device`, "onnx" on the CPU."""
    det = ADTRDetector.load(run_dir, device=device, progress=False)
    if engine == "onnx":
        det.use_onnx(Path(run_dir) / "model.onnx")
    vrange = display_range(det.info_.get("score_stats", {}))
    lock = threading.Lock()
    app = FastAPI(title="adtr inspection service", version=det.info_.get("adtr_version", "?"))

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "run": str(run_dir),
            "engine": engine,
            "device": str(det.device),
            "image_size": list(det.config.model.image_size),
            "threshold": det.thresholds_.image,
        }

    @app.post("/predict")
    async def predict(request: Request, heatmap: bool = False) -> JSONResponse:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload_bytes:
            raise HTTPException(413, f"request of {length} bytes exceeds the limit of {max_upload_bytes}")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(422, "send the image as multipart/form-data in a field named 'file'")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_upload_bytes:
                raise HTTPException(413, f"request exceeds the limit of {max_upload_bytes} bytes")
        name, data = _file_field(bytes(body), request.headers["content-type"])
        try:
            image = await run_in_threadpool(read_image, name, data)
        except DataError as e:
            raise HTTPException(415, str(e)) from None

        def infer():
            with lock:
                return det.predict_image(image, name)

        # Off the event loop, so /health and uploads keep being served during inference.
        pred = await run_in_threadpool(infer)
        thr = det.thresholds_
        answer = {
            "filename": name,
            "anomaly_score": pred.anomaly_score,
            "normalized_score": pred.normalized_score,
            "is_anomalous": pred.is_anomalous,
            "threshold": thr.image,
            "defect_boxes": defect_boxes(thr, pred.anomaly_map, pred.is_anomalous),
        }
        if heatmap:
            png = heatmap_png(image, pred.anomaly_map, vrange)
            answer["heatmap_png_base64"] = base64.b64encode(png).decode("ascii")
        return JSONResponse(answer)

    return app


def _file_field(body: bytes, content_type: str) -> tuple[str, bytes]:
    """(filename, bytes) of the `file` field of a multipart body; 422 when there is none."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise HTTPException(422, "malformed multipart body")
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_filename() or "upload", part.get_payload(decode=True) or b""
    raise HTTPException(422, "no form field named 'file' in the request")


def encode_multipart(filename: str, data: bytes, field: str = "file") -> tuple[bytes, str]:
    """A multipart/form-data body with one file, and its content type: for clients and tests."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def serve(
    run_dir: Path | str,
    host: str,
    port: int,
    max_upload_bytes: int,
    engine: str = "torch",
    device: str = "cpu",
    quiet: bool = False,
) -> None:
    """Run the service until interrupted; quiet logs warnings and errors only (no access log)."""
    import uvicorn

    app = create_app(run_dir, max_upload_bytes, engine, device)
    uvicorn.run(app, host=host, port=port, log_level="warning" if quiet else "info")
