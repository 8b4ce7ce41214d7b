"""HTTP inspection service (FastAPI): the model is loaded once, each upload is scored.

    POST /predict   multipart form with one image file in field `file`; `?heatmap=true`
                    adds the heatmap overlay as a base64 PNG. Returns score, normalised
                    score, decision, defect bounding boxes and input_warnings (the ways the
                    image departs from the training images: aspect ratio, colour; drift.py).
    GET  /health    status, the run's settings, the training images' profile and the
                    backend that scores (and why).
    GET  /docs      OpenAPI documentation.

Every bad request gets a 4xx answer with a one-line reason: over the upload limit or the
pixel limit (413, checked from the image header before decoding), not multipart or no file
(422), not a decodable image (415). Decoding, inference and rendering run one request at a
time behind a lock, so concurrent clients queue instead of multiplying memory: at most one
full-size image is decoded at a time, and after a large one the freed memory is handed
back to the system (glibc malloc_trim). The service writes no files.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import threading
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from adtr.data.images import DataError, ImageTooLarge, pixel_limit, read_image
from adtr.detector import ADTRDetector
from adtr.render import defect_boxes, display_range, heatmap_png

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
SERVICE_MAX_PIXELS = 50_000_000  # default pixel limit of the service, below the CLI's (data.images.MAX_PIXELS)
TRIM_ABOVE_PIXELS = 4_000_000  # after an image this large, hand freed memory back to the system


def service_pixel_limit(max_pixels: int | None = None) -> int:
    """The service's pixel limit: max_pixels if given, else the lower of SERVICE_MAX_PIXELS and pixel_limit()."""
    return int(max_pixels) if max_pixels is not None else min(SERVICE_MAX_PIXELS, pixel_limit())


def score_upload(
    det: ADTRDetector,
    name: str,
    data: bytes,
    max_pixels: int,
    heatmap: bool = False,
    vrange: tuple[float, float] | None = None,
    letterbox: bool = False,
) -> dict[str, Any]:
    """Decode one uploaded file, score it and build the answer; DataError when it cannot be used.

    The same decoding as for files (data.images.read_image) and the same scoring as for arrays
    (ADTRDetector.predict_image), so an upload scores as its file does. Call it one request at
    a time: it holds the full-size image and map until it returns.
    """
    image = read_image(name, data, max_pixels=max_pixels)
    pred = det.predict_image(image, name, letterbox=letterbox)
    thr = det.thresholds_
    answer = {
        "filename": name,
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "anomaly_score": pred.anomaly_score,
        "normalized_score": pred.normalized_score,
        "is_anomalous": pred.is_anomalous,
        "threshold": thr.image,
        "defect_boxes": defect_boxes(thr, pred.anomaly_map, pred.is_anomalous),
        "input_warnings": pred.input_warnings,
    }
    if heatmap:
        png = heatmap_png(image, pred.anomaly_map, vrange or display_range(det.record_.score_stats))
        answer["heatmap_png_base64"] = base64.b64encode(png).decode("ascii")
    return answer


def release_memory() -> bool:
    """Return freed heap memory to the system (glibc malloc_trim); False where there is no such call.

    The CLI's allocator settings (runtime.keep_freed_memory) keep freed blocks for reuse, which
    suits batches of equal size but would leave a service at its largest request's peak.
    """
    name = ctypes.util.find_library("c")
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0)) if name else False
    except (OSError, AttributeError):
        return False


def create_app(
    run_dir: Path | str,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    engine: str = "auto",
    device: str = "cpu",
    max_pixels: int | None = None,
    letterbox: bool = False,
) -> FastAPI:
    """The service for a run folder; engine is the backend ("auto", "torch" on `device`, "onnx"
    on the CPU; backend.select_backend), chosen here, before the first request.

    max_pixels: largest accepted width x height (default: service_pixel_limit()). letterbox:
    keep each upload's aspect ratio instead of stretching it (ADTRDetector.iter_predict).
    """
    limit = service_pixel_limit(max_pixels)
    det = ADTRDetector.load(run_dir, device=device, progress=False, backend=engine)
    det.check_letterbox(letterbox)  # refused at start, not with every request
    chosen = det.selected_backend()
    vrange = display_range(det.record_.score_stats)
    lock = threading.Lock()
    app = FastAPI(title="adtr inspection service", version=det.record_.provenance.get("adtr_version", "?"))

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "run": str(run_dir),
            "backend": chosen.name,
            "engine": chosen.name,  # the key's name before 0.2
            "backend_reason": chosen.reason,
            "device": str(det.device),
            "image_size": list(det.config.model.image_size),
            "threshold": det.thresholds_.image,
            "max_pixels": limit,
            "letterbox": letterbox,
            "training_inputs": det.inputs_.to_dict() if det.inputs_ is not None else None,
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
        del body

        def infer() -> dict[str, Any]:
            # Decoding inside the lock: concurrent large uploads never decode side by side.
            with lock:
                answer = score_upload(det, name, data, limit, heatmap, vrange, letterbox)
                if answer["width"] * answer["height"] >= TRIM_ABOVE_PIXELS:
                    release_memory()
                return answer

        # Off the event loop, so /health and uploads keep being served during inference.
        try:
            answer = await run_in_threadpool(infer)
        except ImageTooLarge as e:
            raise HTTPException(413, str(e)) from None
        except DataError as e:
            raise HTTPException(415, str(e)) from None
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
    engine: str = "auto",
    device: str = "cpu",
    quiet: bool = False,
    max_pixels: int | None = None,
    letterbox: bool = False,
) -> None:
    """Run the service until interrupted; quiet logs warnings and errors only (no access log)."""
    import uvicorn

    app = create_app(run_dir, max_upload_bytes, engine, device, max_pixels, letterbox)
    uvicorn.run(app, host=host, port=port, log_level="warning" if quiet else "info")
