"""Serve one base model with many ReFT adapters over HTTP, batching concurrent requests for
different adapters into mixed batches (one ``generate`` call per batch).

Standard library only (``http.server``) besides torch, transformers and reft_ext. Run:

    python examples/serve/make_demo.py --out demo        # a tiny offline model and 3 adapters
    python examples/serve/server.py --model demo/model \\
        --adapter pirate=demo/adapters/pirate --adapter robot=demo/adapters/robot \\
        --adapter poet=demo/adapters/poet --port 8000

``--model`` is a folder ``AutoModelForCausalLM`` and ``AutoTokenizer`` load; each ``--adapter
name=path`` is a folder ``ReftModel.save_pretrained`` wrote for that base model. ``--port 0``
takes any free port; the server prints ``listening on http://HOST:PORT`` once it accepts.

Endpoints:
    POST /generate  {"prompt": str, "adapter": str, "max_new_tokens": int (optional)}
                    -> {"text": str, "tokens": [int, ...], "adapter": str}
                    "adapter" is a loaded adapter's name or "__base__" (the plain base model);
                    max_new_tokens defaults to, and may not exceed, --max-new-tokens;
                    "tokens" are the new tokens only (ending with the end-of-sequence token when
                    the model produced it), "text" their decoding without special tokens.
    GET /health     -> {"status": "ok", "adapters": [...], "max_new_tokens": int}
    GET /stats      -> batches run, requests, mixed batches, the largest batch, recent batches.

Batching: handler threads put requests on one queue; one worker takes the first waiting request,
waits at most ``--max-wait-ms`` for more (up to ``--max-batch``), left-pads the prompts and calls
``reft_model.generate(adapter_names=[one per row], do_sample=False)`` once for the batch, with the
largest ``max_new_tokens`` asked; each answer is cut to its own (greedy decoding makes a shorter
run a prefix of a longer one). Each answer equals generating that prompt alone with its adapter
(tests/test_serve_example.py checks it token for token). A batch runs to its end before the next
one starts (no continuous batching).

Errors: the body is JSON ``{"error": message, ...}``; an unknown adapter gets 404 naming it and
the known ones, malformed JSON or a missing, bad or unknown field 400 naming the field, a body
over 1 MiB 413. SIGTERM or SIGINT stops accepting, finishes the running batch, answers the
requests still queued with 503 and exits.
"""

from __future__ import annotations

import argparse
import collections
import json
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reft_ext import ReftModel
from reft_ext.hf import BASE_ADAPTER

MAX_BODY_BYTES = 1 << 20
RECENT_BATCHES = 50  # how many batches /stats lists


class RequestError(Exception):
    """A request answered with an error: its HTTP status and the JSON body that explains it
    (4xx for requests the server refuses, 5xx for failures of its own)."""

    def __init__(self, status: HTTPStatus, message: str, **details):
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **details}


@dataclass
class Request:
    """One queued generation: its prompt's token ids, adapter and token budget; the worker fills
    ``tokens`` (the answer's new tokens) or ``failure`` and sets ``done``."""

    input_ids: list[int]
    adapter: str
    max_new_tokens: int
    done: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] | None = None
    failure: RequestError | None = None


class BatchStats:
    """Counts of the batches the worker ran, for /stats (and the test that checks mixing)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.batches = self.requests = self.mixed_batches = self.largest_batch = 0
        self.recent: collections.deque = collections.deque(maxlen=RECENT_BATCHES)

    def record(self, adapters: list[str]) -> None:
        """Count one batch whose rows had ``adapters``."""
        mix = collections.Counter(adapters)
        with self._lock:
            self.batches += 1
            self.requests += len(adapters)
            self.mixed_batches += len(mix) > 1
            self.largest_batch = max(self.largest_batch, len(adapters))
            self.recent.append({"size": len(adapters), "adapters": dict(mix)})

    def snapshot(self) -> dict:
        """The counts as a JSON-ready dict."""
        with self._lock:
            return {
                "batches": self.batches,
                "requests": self.requests,
                "mixed_batches": self.mixed_batches,
                "largest_batch": self.largest_batch,
                "recent": list(self.recent),
            }


class Batcher:
    """The one worker thread that drains the request queue into mixed batches and runs them.

    One thread runs every ``generate``: the model is used by one call at a time, so batches (not
    threads) give the concurrency, and the handler threads only parse, queue and wait.
    """

    def __init__(self, reft_model: ReftModel, pad_id: int, max_batch: int, max_wait_ms: float):
        self.reft_model = reft_model
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.stats = BatchStats()
        self._queue: queue.Queue[Request] = queue.Queue()
        self._stopping = threading.Event()
        # Held while queueing and while setting _stopping: after stop() sets it, nothing more is
        # queued, so its final drain answers every request that made it in.
        self._stop_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue ``request``; its ``done`` is set once answered."""
        with self._stop_lock:
            if self._stopping.is_set():
                raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down")
            self._queue.put(request)

    def stop(self) -> None:
        """Finish the batch in progress, answer every queued request with 503, end the thread."""
        with self._stop_lock:
            self._stopping.set()
        self._thread.join()
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            _fail(request, HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down")

    def _run(self) -> None:
        """The worker thread: batch after batch until ``stop``."""
        while not self._stopping.is_set():
            batch = self._collect()
            if batch:
                self._run_batch(batch)

    def _collect(self) -> list[Request]:
        """The next batch: the first request to arrive (waiting up to 0.1 s, so that ``stop`` is
        seen), then whatever else arrives within ``max_wait_s`` of it, up to ``max_batch``."""
        try:
            batch = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    batch.append(self._queue.get(timeout=remaining))
                else:  # past the deadline: only what is already queued joins
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run_batch(self, batch: list[Request]) -> None:
        """Generate for every request of ``batch`` in one mixed-adapter call and answer each."""
        adapters = [request.adapter for request in batch]
        try:
            new_tokens = self._generate(batch)
        except Exception as error:  # the model failed: a server error, reported to each client
            for request in batch:
                _fail(request, HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {error}")
            return
        self.stats.record(adapters)
        for request, tokens in zip(batch, new_tokens, strict=True):
            request.tokens = self._own_tokens(tokens, request.max_new_tokens)
            request.done.set()

    @torch.inference_mode()
    def _generate(self, batch: list[Request]) -> torch.Tensor:
        """The new tokens (B, n) of one greedy ``generate`` over the left-padded prompts, each
        row with its request's adapter, n up to the largest ``max_new_tokens`` asked."""
        width = max(len(request.input_ids) for request in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, request in enumerate(batch):
            # Left padding: every prompt ends at the last column, where generation continues.
            ids[row, width - len(request.input_ids) :] = torch.tensor(request.input_ids)
            mask[row, width - len(request.input_ids) :] = 1
        device = next(self.reft_model.parameters()).device
        out = self.reft_model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            adapter_names=[request.adapter for request in batch],
            max_new_tokens=max(request.max_new_tokens for request in batch),
            do_sample=False,
            pad_token_id=self.pad_id,
        )
        return out[:, width:].cpu()

    def _own_tokens(self, tokens: torch.Tensor, max_new_tokens: int) -> list[int]:
        """A row's answer: its first ``max_new_tokens`` new tokens, up to and including the first
        end-of-sequence token (after it the batch pads the rows that finished early)."""
        tokens = tokens[:max_new_tokens].tolist()
        eos = self.reft_model.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        for i, token in enumerate(tokens):
            if token in stops:
                return tokens[: i + 1]
        return tokens


def _fail(request: Request, status: HTTPStatus, message: str) -> None:
    """Answer ``request`` with an error."""
    request.failure = RequestError(status, message)
    request.done.set()


def _pad_id(tokenizer) -> int:
    """The id that pads prompts: the tokenizer's pad token, else its end-of-sequence token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("--model: the tokenizer has neither a pad nor an eos token to pad with")
    return pad


class Service:
    """What the HTTP handlers call: request checking, tokenization and the batcher."""

    def __init__(self, reft_model: ReftModel, tokenizer, batcher: Batcher, max_new_tokens: int):
        self.tokenizer = tokenizer
        self.batcher = batcher
        self.max_new_tokens = max_new_tokens
        self.adapters = [*reft_model.reft_configs, BASE_ADAPTER]
        self.max_positions = getattr(reft_model.model.config, "max_position_embeddings", None)
        # A fast tokenizer refuses concurrent use from several threads ("Already borrowed"), and
        # every handler thread encodes and decodes.
        self._tokenizer_lock = threading.Lock()

    def health(self) -> dict:
        """The body of GET /health."""
        return {"status": "ok", "adapters": self.adapters, "max_new_tokens": self.max_new_tokens}

    def generate(self, body: bytes) -> dict:
        """Answer one POST /generate body; RequestError for a refused or failed request."""
        request = self.parse(body)
        self.batcher.submit(request)
        request.done.wait()
        if request.failure is not None:
            raise request.failure
        with self._tokenizer_lock:
            text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
        return {"text": text, "tokens": request.tokens, "adapter": request.adapter}

    def parse(self, body: bytes) -> Request:
        """The Request that ``body`` asks for; RequestError naming what is wrong with it."""
        try:
            fields = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {error}"
            ) from None
        if not isinstance(fields, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        unknown = sorted(set(fields) - {"prompt", "adapter", "max_new_tokens"})
        if unknown:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"unknown field(s) {unknown}", fields=unknown
            )
        prompt = _required_str(fields, "prompt")
        adapter = _required_str(fields, "adapter")
        if adapter not in self.adapters:
            raise RequestError(
                HTTPStatus.NOT_FOUND,
                f"unknown adapter {adapter!r}; known adapters: {self.adapters}",
                adapter=adapter,
                adapters=self.adapters,
            )
        max_new_tokens = self._max_new_tokens(fields.get("max_new_tokens", self.max_new_tokens))
        with self._tokenizer_lock:
            input_ids = self.tokenizer(prompt)["input_ids"]
        if self.max_positions and len(input_ids) + max_new_tokens > self.max_positions:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"prompt: {len(input_ids)} tokens + max_new_tokens {max_new_tokens} exceed the "
                f"model's {self.max_positions} positions",
                field="prompt",
            )
        return Request(input_ids, adapter, max_new_tokens)

    def _max_new_tokens(self, value) -> int:
        """``value`` if it is a whole number from 1 to the server's --max-new-tokens."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"max_new_tokens must be an integer, got {json.dumps(value)}",
                field="max_new_tokens",
            )
        if not 1 <= value <= self.max_new_tokens:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"max_new_tokens must be from 1 to {self.max_new_tokens}, got {value}",
                field="max_new_tokens",
            )
        return value


def _required_str(fields: dict, name: str) -> str:
    """``fields[name]`` if it is a non-empty string; RequestError naming ``name`` otherwise."""
    if name not in fields:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"missing field {name!r}", field=name)
    value = fields[name]
    if not isinstance(value, str) or not value:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"field {name!r} must be a non-empty string, got {json.dumps(value)}",
            field=name,
        )
    return value


class Handler(BaseHTTPRequestHandler):
    """Routes the three endpoints to the server's Service; every answer is JSON."""

    server: ServingHTTPServer

    def do_GET(self):
        """GET /health and GET /stats."""
        if self.path == "/health":
            self._send(HTTPStatus.OK, self.server.service.health())
        elif self.path == "/stats":
            self._send(HTTPStatus.OK, self.server.service.batcher.stats.snapshot())
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}"})

    def do_POST(self):
        """POST /generate."""
        if self.path != "/generate":
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}"})
            return
        try:
            answer = self.server.service.generate(self._body())
        except RequestError as error:
            self._send(error.status, error.body)
        else:
            self._send(HTTPStatus.OK, answer)

    def _body(self) -> bytes:
        """The request body; RequestError for a missing, bad or oversized Content-Length."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"header Content-Length must be a byte count, got {length!r}",
                field="Content-Length",
            )
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body has {length} bytes, at most {MAX_BODY_BYTES} are accepted",
            )
        return self.rfile.read(int(length))

    def _send(self, status: HTTPStatus, body: dict) -> None:
        """Write ``body`` as the JSON answer with ``status``."""
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        """Access log lines on stderr, prefixed with ``[serve]``."""
        print(f"[serve] {self.address_string()} {format % args}", file=sys.stderr, flush=True)


class ServingHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the Service its handlers call."""

    daemon_threads = True  # a handler still waiting never holds up the exit

    def __init__(self, address: tuple[str, int], service: Service):
        super().__init__(address, Handler)
        self.service = service


def load(model_dir: Path, adapters: dict[str, Path], device: str) -> tuple[ReftModel, object]:
    """The base model from ``model_dir`` with every adapter of ``adapters`` ({name: folder}),
    in eval mode on ``device``, and the tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    (first, first_path), *rest = adapters.items()
    reft_model = ReftModel.from_pretrained(base, first_path, adapter_name=first)
    for name, path in rest:
        reft_model.load_adapter(path, name)
    return reft_model.eval(), tokenizer


def adapter_arg(text: str) -> tuple[str, Path]:
    """Parse ``--adapter name=path``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter must be name=path, got {text!r}")
    return name, Path(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="transformers model folder")
    parser.add_argument(
        "--adapter",
        type=adapter_arg,
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="an adapter folder and the name requests use for it (repeat for more)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: any free one)")
    parser.add_argument("--max-batch", type=int, default=32, help="most requests in one batch")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="how long the first request of a batch waits for others to join it",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="the default and the largest max_new_tokens a request may ask",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs (default: cuda when available, else cpu)",
    )
    args = parser.parse_args(argv)
    names = [name for name, _ in args.adapter]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        parser.error(f"--adapter: the name(s) {duplicates} are given more than once")
    if BASE_ADAPTER in names:
        parser.error(f"--adapter: {BASE_ADAPTER!r} is reserved for the plain base model")
    for option in ("max_batch", "max_new_tokens"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.max_wait_ms < 0:
        parser.error("--max-wait-ms must be at least 0")
    args.adapter = dict(args.adapter)
    return args


def main(argv: list[str] | None = None) -> None:
    """Load, serve until SIGTERM or SIGINT, shut down cleanly."""
    args = parse_args(argv)
    reft_model, tokenizer = load(args.model, args.adapter, args.device)
    batcher = Batcher(reft_model, _pad_id(tokenizer), args.max_batch, args.max_wait_ms)
    service = Service(reft_model, tokenizer, batcher, args.max_new_tokens)
    httpd = ServingHTTPServer((args.host, args.port), service)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    batcher.start()
    # serve_forever runs in a thread so that the main thread, which receives the signals, can
    # call shutdown() (which waits for serve_forever to return and would block it in its own).
    server_thread = threading.Thread(target=httpd.serve_forever, name="http", daemon=True)
    server_thread.start()
    host, port = httpd.server_address[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    stop.wait()
    httpd.shutdown()
    batcher.stop()
    httpd.server_close()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
