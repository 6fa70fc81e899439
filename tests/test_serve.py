"""`minimoe serve` over loopback: the real `openai` client and plain HTTP against a server started in a
subprocess on 127.0.0.1 and a free port, on a tiny checkpoint trained here. Every request is bounded in
time (client timeouts) and every loop in count."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import generated_text

openai = pytest.importorskip("openai", reason="the test extra installs openai")
httpx = pytest.importorskip("httpx", reason="the test extra installs httpx")

from minimoe.cli import main  # noqa: E402

NAME = "tinymoe"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "corpus.txt").write_text(generated_text(300))
    settings = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=512", "model.moe_every=1",
                "model.k=2", "train.batch_size=8", "train.max_steps=40", "train.eval_interval=40",
                "train.eval_batches=1", "train.sample_tokens=0", "optim.lr=0.01", f"data.path={root / 'corpus.txt'}",
                f"train.out_dir={root / NAME}"]
    assert main(["train", *(arg for s in settings for arg in ("--set", s))]) == 0
    return root / NAME / "checkpoint.bin"


class Server:
    """`minimoe serve` in a subprocess, up once /health answers (within 60 s)."""

    def __init__(self, checkpoint, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "minimoe.cli", "serve", "--ckpt", str(checkpoint),
                                         "--port", str(self.port), "--device", "cpu", "--name", NAME, *flags],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"the server did not come up: {self.process.stdout.read()}")
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", timeout=60, max_retries=0)

    def post(self, path, body, raw=None):
        return httpx.post(f"{self.url}{path}", content=raw if raw is not None else json.dumps(body), timeout=60)

    def metric(self, name) -> float:
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=20)


@pytest.fixture(scope="module")
def server(checkpoint):
    running = Server(checkpoint, "--max-batch", "8")
    yield running
    running.stop()


def spawned_children(pid: int) -> list[int]:
    """The processes that `pid` started through multiprocessing's spawn (its resource tracker aside), from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                spawned = b"spawn_main" in cmdline.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and spawned:
            children.append(int(entry))
    return children


def complete(server, **fields):
    return server.client.completions.create(model=NAME, **{"max_tokens": 24, **fields})


def test_a_greedy_completion_is_minimoe_generates_greedy_text(server, checkpoint, capsys):
    response = complete(server, prompt="The king", temperature=0)
    assert main(["generate", "--ckpt", str(checkpoint), "--prompt", "The king", "--max-new-tokens", "24",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "The king" + response.choices[0].text + "\n"
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == 8 and response.usage.completion_tokens == 24
    assert response.usage.total_tokens == 32 and response.model == NAME


def test_streamed_chunks_joined_are_the_whole_text(server):
    whole = complete(server, prompt="A knight", temperature=0.9, seed=7).choices[0].text
    chunks = list(complete(server, prompt="A knight", temperature=0.9, seed=7, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole
    # How many chunks depends on timing: the deltas that pile up while the server's loop is busy go out as
    # one chunk (on a loaded machine all 24 tokens once came as one), so only the finish is asserted here.
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(chunk.choices[0].text for chunk in chunks[:-1])
    # A stop string's first character held back whenever the text ends with it: those tokens settle no
    # text, and no chunk goes out for them (only the finishing chunk may carry no text).
    stop = {"stop": "e#", "max_tokens": 60}
    held = complete(server, prompt="A knight", temperature=0.9, seed=7, **stop).choices[0].text
    chunks = list(complete(server, prompt="A knight", temperature=0.9, seed=7, stream=True, **stop))
    assert "".join(chunk.choices[0].text for chunk in chunks) == held and "e" in held
    assert all(chunk.choices[0].text for chunk in chunks[:-1])
    chat = {"messages": [{"role": "user", "content": "Speak"}], "max_tokens": 20, "temperature": 0.7, "seed": 3}
    reply = server.client.chat.completions.create(model=NAME, **chat).choices[0].message.content
    streamed = server.client.chat.completions.create(model=NAME, stream=True, **chat)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == reply
    # the chat endpoint's newer name for the length limit
    limited = server.client.chat.completions.create(model=NAME, **{**chat, "max_tokens": None}, max_completion_tokens=3)
    assert limited.usage.completion_tokens <= 3 and limited.choices[0].finish_reason in ("length", "stop")
    # Two prompts, two choices each: four interleaved streams in one response, told apart by index.
    several = {"prompt": ["A knight", "The sea"], "n": 2, "temperature": 0.9, "seed": 7, "max_tokens": 12}
    wholes = [choice.text for choice in complete(server, **several).choices]
    parts = [""] * 4
    for chunk in complete(server, stream=True, **several):
        for choice in chunk.choices:
            parts[choice.index] += choice.text
    assert parts == wholes


def test_stop_cuts_the_text_and_says_so(server):
    free = complete(server, prompt="Good night", temperature=0.8, seed=1).choices[0].text
    stop = free[5:7]
    stopped = complete(server, prompt="Good night", temperature=0.8, seed=1, stop=[stop, "zzzz"]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == free[:free.find(stop)]


def test_the_same_seed_gives_the_same_sample(server):
    texts = [complete(server, prompt="The queen", temperature=1.0, seed=seed).choices[0].text for seed in (5, 5, 6)]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    several = complete(server, prompt="The queen", temperature=1.0, seed=5, n=3)
    assert [c.text for c in several.choices][0] == texts[0] and len({c.text for c in several.choices}) > 1


def test_sixteen_concurrent_requests_each_answer_as_alone(server):
    requests = [{"prompt": ["The", "A castle of gold", "Sword"][i % 3] * (1 + i % 2), "max_tokens": 4 + 2 * i,
                 "temperature": 0.9, "seed": i} for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda body: complete(server, **body), requests))
    for body, response in zip(requests, together):
        alone = complete(server, **body)
        assert response.choices[0].text == alone.choices[0].text
        assert response.usage.completion_tokens == alone.usage.completion_tokens


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    """A stream that would run to the context (500 tokens) is dropped after its first chunk: its
    sequence stops within a few steps and leaves its slot, and the server goes on serving."""
    before = server.metric("minimoe_generated_tokens_total")
    body = {"model": NAME, "prompt": "The river", "max_tokens": 10_000, "stream": True, "temperature": 0.5}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        next(response.iter_lines())  # one chunk, then the client goes away
    for _ in range(100):
        if server.metric("minimoe_running_sequences") == 0 and server.metric("minimoe_queue_length") == 0:
            break
        time.sleep(0.1)
    assert server.metric("minimoe_running_sequences") == 0
    assert server.metric("minimoe_generated_tokens_total") - before < 200  # far from the 500 it would make
    assert complete(server, prompt="Still serving", max_tokens=3).choices[0].finish_reason == "length"


def test_requests_cancelled_while_they_wait_leave_the_queue(checkpoint):
    """One slot and four streams at once, whose clients give up after half a second without a chunk: the
    three that waited for the slot are cancelled before they started, and the queue is empty after."""
    small = Server(checkpoint, "--max-batch", "1")
    body = {"model": NAME, "prompt": "The", "max_tokens": 10_000, "stream": True, "temperature": 0.5}

    def impatient(_) -> str:
        try:
            with httpx.stream("POST", f"{small.url}/v1/completions", json=body,
                              timeout=httpx.Timeout(60, read=0.5)) as response:
                for _ in zip(response.iter_lines(), range(2000)):  # bounded: at most the context's tokens
                    pass
            return "finished"
        except httpx.ReadTimeout:
            return "gave up"

    try:
        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(impatient, range(4)))
        assert "gave up" in outcomes
        for _ in range(100):
            if small.metric("minimoe_queue_length") == 0 and small.metric("minimoe_running_sequences") == 0:
                break
            time.sleep(0.1)
        assert small.metric("minimoe_queue_length") == 0 and small.metric("minimoe_running_sequences") == 0
    finally:
        small.stop()


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", "ten"), ("temperature", -1), ("temperature", "hot"), ("top_p", 0),
    ("top_p", 1.5), ("top_k", -3), ("n", 0), ("n", 17), ("seed", -1), ("stop", ""), ("stop", ["a"] * 5),
    ("stream", "yes"), ("prompt", ""), ("prompt", 5), ("prompt", []), ("prompt", "x" * 513),
    ("logprobs", 0), ("logprobs", 2), ("echo", True), ("best_of", 3), ("presence_penalty", 0.5),
    ("logit_bias", {"65": 5}),  # OpenAI's, not implemented: refused rather than ignored
])
def test_every_bad_parameter_is_a_400_naming_it(server, field, value):
    response = server.post("/v1/completions", {"model": NAME, "prompt": "The", field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error" and error["message"]


def test_unknown_models_malformed_bodies_and_bad_messages(server):
    unknown = server.post("/v1/completions", {"model": "gpt-4", "prompt": "The"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    malformed = server.post("/v1/completions", None, raw=b'{"prompt": ')
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
    not_utf8 = server.post("/v1/completions", None, raw=b'{"prompt": "\xff\xfe"}')
    assert not_utf8.status_code == 400
    chat = server.post("/v1/chat/completions", {"model": NAME, "messages": "hello"})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        complete(server, prompt="The", top_p=3)
    assert complete(server, prompt="The", max_tokens=2).choices[0].text is not None  # still serving


def test_models_health_and_metrics(server):
    models = server.client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    before = server.metric("minimoe_generated_tokens_total")
    steps_before = server.metric("minimoe_decode_steps_total")
    complete(server, prompt="The", max_tokens=5)
    assert server.metric("minimoe_generated_tokens_total") == before + 5
    # The prefill samples the first token, four decode steps the others; each step decoded its one row.
    assert server.metric("minimoe_decode_steps_total") == steps_before + 4
    assert server.metric("minimoe_decoded_rows_total") >= server.metric("minimoe_decode_steps_total")
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'minimoe_expert_tokens_total{layer="1",expert="7"}' in text
    assert server.metric('minimoe_scheduler_seconds_total{phase="step"}') > 0
    assert server.metric("minimoe_requests_total") >= 1 and server.metric("minimoe_prompt_tokens_total") >= 3


def test_a_full_queue_answers_429_and_sigterm_ends_what_runs(checkpoint):
    """One slot and room for one waiting request: of four long requests at once, the ones past the queue
    get 429 with OpenAI's error body. Then SIGTERM, with a stream in flight: the stream ends and the
    server exits within seconds."""
    small = Server(checkpoint, "--max-batch", "1", "--max-queue", "1")
    try:
        body = {"model": NAME, "prompt": "The", "max_tokens": 300, "temperature": 0}
        with ThreadPoolExecutor(4) as pool:
            statuses = sorted(pool.map(lambda _: small.post("/v1/completions", body).status_code, range(4)))
        assert statuses[0] == 200 and 429 in statuses
        stream_body = {**body, "max_tokens": 10_000, "stream": True}
        with httpx.stream("POST", f"{small.url}/v1/completions", json=stream_body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            started = time.perf_counter()
            small.process.send_signal(signal.SIGTERM)
            rest = list(lines)  # bounded: the server ends the stream when it shuts down
        assert any('"finish_reason": "length"' in line for line in rest)
        assert len(rest) < 2 * 400  # ended early: a whole run would stream about 500 chunks (2 lines each)
        assert small.process.wait(timeout=20) is not None and time.perf_counter() - started < 10
    finally:
        if small.process.poll() is None:
            os.kill(small.process.pid, signal.SIGKILL)


def test_a_dead_engine_process_fails_what_runs_and_health_says_so(checkpoint):
    """The engine process killed mid-stream: the stream ends with OpenAI's error object, later requests get
    503 with code engine_gone, /health answers 503, and the HTTP process still answers."""
    small = Server(checkpoint, "--max-batch", "1")
    try:
        children = spawned_children(small.process.pid)
        assert len(children) == 1, children  # the engine process
        body = {"model": NAME, "prompt": "The", "max_tokens": 10_000, "stream": True, "temperature": 0.5}
        with httpx.stream("POST", f"{small.url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            os.kill(children[0], signal.SIGKILL)
            rest = [line for line, _ in zip(lines, range(2000))]  # bounded: the stream ends with the error
        errors = [json.loads(line[6:])["error"] for line in rest if line.startswith('data: {"error"')]
        assert errors and errors[0]["code"] == "engine_gone"
        for _ in range(100):
            if httpx.get(f"{small.url}/health", timeout=10).status_code == 503:
                break
            time.sleep(0.1)
        assert httpx.get(f"{small.url}/health", timeout=10).status_code == 503
        later = small.post("/v1/completions", {"model": NAME, "prompt": "The", "max_tokens": 3})
        assert later.status_code == 503 and later.json()["error"]["code"] == "engine_gone"
    finally:
        small.stop()
