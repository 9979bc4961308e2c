"""Server side of flow-opd's remote reward protocol (docs/reward_protocol.md), standard library
only: request parsing and validation, error bodies, `GET /health`, `POST /score`, and a
threaded HTTP server. A reward server defines scorers and calls `serve`:

    def score(images, prompts, metadata):   # PIL RGB images, strings, dicts
        return [Score(value, metric) for ...]
    serve({"ocr": score}, port=8100, max_batch_size=32)
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import math
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from PIL import Image

PROTOCOL_VERSION = 1
log = logging.getLogger("reward_server")


@dataclass
class Score:
    """`value`: the training reward (about 0-1); `metric`: the paper's table number."""

    value: float
    metric: float

    def to_json(self) -> dict:
        return {"value": float(self.value), "metric": float(self.metric)}


class ProtocolError(Exception):
    """An error reply: HTTP `status` with body `{"error": message, "index": index}`."""

    def __init__(self, status: int, message: str, index: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.index, self.retry_after = status, message, index, retry_after

    def body(self) -> dict:
        body = {"error": self.message}
        if self.index is not None:
            body["index"] = self.index
        return body


@dataclass
class ScoreRequest:
    reward: str
    images: list  # PIL.Image.Image, RGB
    prompts: list[str]
    metadata: list[dict] = field(default_factory=list)


Scorer = Callable[[list, list, list], list]


def decode_image(text: object, index: int) -> Image.Image:
    if not isinstance(text, str):
        raise ProtocolError(400, f"images[{index}] is not a base64 string", index)
    try:
        png = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError(400, f"images[{index}] is not valid base64: {e}", index) from e
    try:
        image = Image.open(io.BytesIO(png), formats=["PNG"])
        image.load()
    except Exception as e:  # PIL raises several types for bad files
        raise ProtocolError(400, f"images[{index}] is not a PNG file: {e}", index) from e
    return image.convert("RGB")


def parse_score_request(body: bytes, rewards: dict, max_batch_size: int | None) -> ScoreRequest:
    """Validates a `POST /score` body; raises `ProtocolError` (400 / 404 / 413) naming the field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(400, f"body is not JSON: {e}") from e
    if not isinstance(data, dict):
        raise ProtocolError(400, "body is not a JSON object")
    for key, kind in (("reward", str), ("images", list), ("prompts", list)):
        if key not in data:
            raise ProtocolError(400, f"missing field `{key}`")
        if not isinstance(data[key], kind):
            raise ProtocolError(400, f"field `{key}` must be a {kind.__name__}")
    reward = data["reward"]
    if reward not in rewards:
        raise ProtocolError(404, f"unknown reward `{reward}`; this server scores {sorted(rewards)}")
    images, prompts = data["images"], data["prompts"]
    metadata = data.get("metadata")
    if metadata is None:
        metadata = [{} for _ in images]
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise ProtocolError(400, "field `metadata` must be a list of objects")
    if not (len(images) == len(prompts) == len(metadata)):
        raise ProtocolError(
            400, f"`images` ({len(images)}), `prompts` ({len(prompts)}) and `metadata` ({len(metadata)}) differ in length"
        )
    if max_batch_size is not None and len(images) > max_batch_size:
        raise ProtocolError(413, f"{len(images)} images in one request; this server takes at most {max_batch_size}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ProtocolError(400, f"prompts[{i}] is not a string", i)
    decoded = [decode_image(text, i) for i, text in enumerate(images)]
    return ScoreRequest(reward, decoded, prompts, metadata)


def score_reply(request: ScoreRequest, scorer: Scorer) -> dict:
    """Runs the scorer and checks it returned one finite score per image."""
    scores = scorer(request.images, request.prompts, request.metadata) if request.images else []
    if len(scores) != len(request.images):
        raise ProtocolError(500, f"scorer returned {len(scores)} scores for {len(request.images)} images")
    for i, s in enumerate(scores):
        if not (math.isfinite(s.value) and math.isfinite(s.metric)):
            raise ProtocolError(500, f"scorer returned a non-finite score for input {i}", i)
    return {"scores": [s.to_json() for s in scores]}


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, rewards: dict, max_batch_size: int | None = 32, exclusive: bool = True):
        super().__init__(address, Handler)
        self.rewards = rewards
        self.max_batch_size = max_batch_size
        # One scoring call at a time (a GPU model is not re-entrant); others wait.
        self.lock = threading.Lock() if exclusive else None
        self.ready = threading.Event()
        self.ready.set()


class Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        log.info("%s %s", self.address_string(), fmt % args)

    def reply(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def error_reply(self, e: ProtocolError) -> None:
        headers = {"Retry-After": f"{e.retry_after:g}"} if e.retry_after is not None else None
        self.reply(e.status, e.body(), headers)

    def do_GET(self):
        if self.path.rstrip("/") != "/health":
            return self.error_reply(ProtocolError(404, f"unknown path {self.path}; use GET /health or POST /score"))
        if not self.server.ready.is_set():
            return self.error_reply(ProtocolError(503, "loading models", retry_after=5))
        self.reply(
            200,
            {
                "status": "ok",
                "rewards": sorted(self.server.rewards),
                "max_batch_size": self.server.max_batch_size,
                "protocol": PROTOCOL_VERSION,
            },
        )

    def do_POST(self):
        try:
            if self.path.rstrip("/") != "/score":
                raise ProtocolError(404, f"unknown path {self.path}; use GET /health or POST /score")
            if not self.server.ready.is_set():
                raise ProtocolError(503, "loading models", retry_after=5)
            length = int(self.headers.get("Content-Length") or 0)
            request = parse_score_request(self.rfile.read(length), self.server.rewards, self.server.max_batch_size)
            scorer = self.server.rewards[request.reward]
            if self.server.lock is None:
                body = score_reply(request, scorer)
            else:
                with self.server.lock:
                    body = score_reply(request, scorer)
            self.reply(200, body)
        except ProtocolError as e:
            self.error_reply(e)
        except Exception as e:  # a scorer bug: report it, keep serving
            log.exception("scoring failed")
            self.error_reply(ProtocolError(500, f"{type(e).__name__}: {e}"))


def start(rewards: dict, host: str = "127.0.0.1", port: int = 8100, max_batch_size: int | None = 32) -> RewardServer:
    """Starts the server in a background thread and returns it (`server.shutdown()` stops it)."""
    server = RewardServer((host, port), rewards, max_batch_size)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serve(rewards: dict, host: str, port: int, max_batch_size: int | None) -> None:
    """Serves until interrupted."""
    server = RewardServer((host, port), rewards, max_batch_size)
    log.info("serving %s on http://%s:%d", sorted(rewards), host, server.server_address[1])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def common_args(description: str, default_port: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda", help="torch device for the model (cuda, cpu)")
    return parser
