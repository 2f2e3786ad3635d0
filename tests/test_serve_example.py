"""The serving example (examples/serve): concurrent requests for different adapters are batched
into mixed batches and each answer equals generating that prompt alone with its adapter; bad
requests get 4xx answers naming what is wrong; SIGTERM stops the server cleanly.

The server runs as a subprocess on 127.0.0.1 (port 0) on the demo that make_demo.py builds; the
references are computed here, independently: the same folders loaded into a ReftModel, each prompt
generated alone (``set_adapter``, or ``disable_adapter`` for the base model).
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from reft_ext import ReftModel  # noqa: E402

SERVE = Path(__file__).resolve().parents[1] / "examples" / "serve"
ADAPTERS = ["pirate", "robot", "poet"]
BASE = "__base__"
PROMPTS = ["hello there", "why is the sky blue? tell me", "sea"]  # different lengths: padding
MAX_BATCH = 8  # below the 12 requests sent at once: they need more than one batch
TIMEOUT_S = 60  # any single wait: the server's start, a request, its exit
# No proxy for 127.0.0.1, whatever the environment says.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo folder make_demo.py writes (model, tokenizer, three adapters)."""
    spec = importlib.util.spec_from_file_location("make_demo", SERVE / "make_demo.py")
    make_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_demo)
    out = tmp_path_factory.mktemp("demo")
    make_demo.main(["--out", str(out)])
    return out


def start_server(demo: Path, logs: Path) -> tuple[subprocess.Popen, str]:
    """Start the server on 127.0.0.1, any free port; (process, base URL) once it listens.

    Its output goes to files (a pipe nobody reads could fill and block it)."""
    command = [sys.executable, str(SERVE / "server.py"), "--model", str(demo / "model")]
    for name in ADAPTERS:
        command += ["--adapter", f"{name}={demo / 'adapters' / name}"]
    # A long batching window, so that requests sent together on a busy machine share batches.
    command += ["--host", "127.0.0.1", "--port", "0", "--max-batch", str(MAX_BATCH)]
    command += ["--max-wait-ms", "500", "--max-new-tokens", "16", "--device", "cpu"]
    stdout, stderr = logs / "stdout.txt", logs / "stderr.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        for line in stdout.read_text().splitlines():
            if line.startswith("listening on "):
                return process, line.removeprefix("listening on ")
        if process.poll() is not None:
            break
        time.sleep(0.1)
    stop(process)
    raise AssertionError(f"the server did not start:\n{stderr.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL if it has not exited after TIMEOUT_S; its exit code."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(TIMEOUT_S)


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    """The base URL of a running server; it is stopped (killed if need be) afterwards."""
    process, url = start_server(demo, tmp_path_factory.mktemp("logs"))
    try:
        yield url
    finally:
        stop(process)


def request(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET (no body) or a POST of ``body``; error statuses included."""
    try:
        with OPENER.open(url, data=body, timeout=TIMEOUT_S) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def generate(url: str, **fields) -> tuple[int, dict]:
    """POST /generate with ``fields`` as its JSON body."""
    return request(f"{url}/generate", json.dumps(fields).encode())


def alone(reft_model, tokenizer, prompt: str, adapter: str, max_new_tokens: int) -> list[int]:
    """The new tokens of greedy ``generate`` on ``prompt`` alone with ``adapter`` (the single-
    adapter path: set_adapter, or disable_adapter for the base model)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    kwargs = dict(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    if adapter == BASE:
        with reft_model.disable_adapter():
            out = reft_model.generate(**kwargs)
    else:
        reft_model.set_adapter(adapter)
        out = reft_model.generate(**kwargs)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_concurrent_requests_share_mixed_batches_and_equal_each_prompt_alone(server, demo):
    jobs = [
        (prompt, adapter, 4 + 2 * i)  # each prompt its own max_new_tokens: 4, 6, 8
        for i, prompt in enumerate(PROMPTS)
        for adapter in [*ADAPTERS, BASE]
    ]
    answers: dict[int, tuple[int, dict]] = {}
    start = threading.Barrier(len(jobs))

    def send(i: int) -> None:
        prompt, adapter, n = jobs[i]
        start.wait(TIMEOUT_S)  # all at once, so that the server batches them
        answers[i] = generate(server, prompt=prompt, adapter=adapter, max_new_tokens=n)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert len(answers) == len(jobs), "some requests got no answer"

    tokenizer = transformers.AutoTokenizer.from_pretrained(demo / "model")
    base = transformers.AutoModelForCausalLM.from_pretrained(demo / "model").eval()
    reft_model = ReftModel.from_pretrained(
        base, demo / "adapters" / ADAPTERS[0], "cpu", ADAPTERS[0]
    )
    for name in ADAPTERS[1:]:
        reft_model.load_adapter(demo / "adapters" / name, name)
    reft_model.eval()
    for i, (prompt, adapter, n) in enumerate(jobs):
        status, body = answers[i]
        assert status == 200, body
        want = alone(reft_model, tokenizer, prompt, adapter, n)
        assert body["tokens"] == want, (prompt, adapter)
        assert body["text"] == tokenizer.decode(want, skip_special_tokens=True)
        assert body["adapter"] == adapter
    # The adapters really differ: each prompt gets four different answers.
    for prompt in PROMPTS:
        got = [tuple(answers[i][1]["tokens"]) for i, job in enumerate(jobs) if job[0] == prompt]
        assert len(set(got)) == len(got), prompt

    stats = request(f"{server}/stats")[1]
    assert stats["mixed_batches"] >= 1, stats
    assert 1 < stats["largest_batch"] <= MAX_BATCH, stats
    assert any(len(batch["adapters"]) > 1 for batch in stats["recent"]), stats


def test_health_lists_the_adapters(server):
    status, body = request(f"{server}/health")
    assert status == 200
    assert body["status"] == "ok"
    assert body["adapters"] == [*ADAPTERS, BASE]


def test_unknown_adapter_gets_404_naming_it(server):
    status, body = generate(server, prompt="hello", adapter="no-such-adapter")
    assert status == 404, body
    assert "no-such-adapter" in body["error"]
    assert body["adapter"] == "no-such-adapter"
    assert body["adapters"] == [*ADAPTERS, BASE]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b'{"prompt": "hi", "adapter": ', "JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"adapter": "pirate"}', "'prompt'"),
        (b'{"prompt": "hi"}', "'adapter'"),
        (b'{"prompt": 5, "adapter": "pirate"}', "'prompt'"),
        (b'{"prompt": "", "adapter": "pirate"}', "'prompt'"),
        (b'{"prompt": "hi", "adapter": ["pirate"]}', "'adapter'"),
        (b'{"prompt": "hi", "adapter": "pirate", "max_new_tokens": "4"}', "max_new_tokens"),
        (b'{"prompt": "hi", "adapter": "pirate", "max_new_tokens": 0}', "max_new_tokens"),
        (b'{"prompt": "hi", "adapter": "pirate", "max_new_tokens": 17}', "max_new_tokens"),
        (b'{"prompt": "hi", "adapter": "pirate", "temperature": 1}', "temperature"),
    ],
)
def test_malformed_requests_get_400_naming_the_field(server, body, named):
    status, answer = request(f"{server}/generate", body)
    assert status == 400, answer
    assert named in answer["error"]


def test_unknown_path_gets_404(server):
    assert request(f"{server}/nowhere")[0] == 404
    assert request(f"{server}/nowhere", b"{}")[0] == 404


def test_sigterm_stops_the_server_cleanly(demo, tmp_path):
    process, url = start_server(demo, tmp_path)
    try:
        assert generate(url, prompt="hi", adapter="robot", max_new_tokens=2)[0] == 200
        assert stop(process) == 0
        assert (tmp_path / "stdout.txt").read_text().splitlines()[-1] == "stopped"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT_S)
