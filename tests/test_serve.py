"""`mrtune serve`: the HTTP API, its batching, its refusals and its process behaviour, on a tiny random-init run.

In-process tests drive the app through Starlette's TestClient; the `slow` ones start `python -m mrtune serve` as a
real process and talk to it over TCP (the `openai` client, httpx, a headless Chromium).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import train_tiny_run, viggo_rows

from mrtune.task.mr import parse_mr

SENTENCES = [r["target"] for r in viggo_rows("test", 3)]
ROOT = Path(__file__).parents[1]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def serve_run(tmp_path_factory, tiny_model_dir):
    """A finished tiny run (one training step): what `mrtune serve` loads."""
    base = tmp_path_factory.mktemp("serve-run")
    return train_tiny_run(base, tiny_model_dir, {"train": 16, "validation": 12, "test": 4})


@pytest.fixture(scope="module")
def engine(serve_run):
    from mrtune.serve.engine import Engine

    return Engine.load(serve_run.path, max_batch=8)


def make_client(engine, **settings):
    from fastapi.testclient import TestClient

    from mrtune.serve.app import ServeSettings, create_app

    return TestClient(create_app(engine, ServeSettings(**settings)), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(engine):
    with make_client(engine) as client:
        yield client


def assert_error(response, status: int, code: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and fragment in error["message"], error
    assert "\n" not in error["message"]


# ---- the API, in process --------------------------------------------------------------------------------------


def test_parse_gives_the_predict_command_s_mrs_split_into_act_and_slots(client, serve_run):
    from mrtune.infer.predict import predict

    response = client.post("/v1/parse", json={"sentences": SENTENCES})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["sentence"] for r in results] == SENTENCES
    # The same decoding as `mrtune predict` (constrained, the run's eval settings), whatever the batch.
    assert [r["meaning_representation"] for r in results] == predict(serve_run.path, sentences=SENTENCES)
    for result in results:
        parsed = parse_mr(result["meaning_representation"])  # constrained: always a valid MR
        assert result["dialogue_act"] == parsed.dialogue_act
        assert result["slots"] == dict(parsed.slots)


@pytest.mark.parametrize(
    ("body", "status", "code", "fragment"),
    [
        (b'{"sentences": ["a", }', 400, "invalid_json", "the body is not valid JSON"),
        (b"", 422, "invalid_request", "the request has no body"),
        (b"[1, 2]", 422, "invalid_request", "the body must be a JSON object"),
        (b"{}", 422, "invalid_request", "sentences: Field required"),
        (b'{"sentences": "Is it fun?"}', 422, "invalid_request", "sentences: Input should be a valid list"),
        (b'{"sentences": ["fine", 3]}', 422, "invalid_request", "sentences.1: Input should be a valid string"),
        (b'{"sentences": []}', 422, "invalid_request", "sentences: List should have at least 1 item"),
        (b'{"sentences": ["ok"], "sentence": "x"}', 422, "invalid_request", "sentence: Extra inputs are not permitted"),
        (b'{"sentences": ["ok", "  "]}', 422, "empty_row", "sentences[1] is empty"),
        (json.dumps({"sentences": ["ok", "word " * 600]}).encode(), 422, "row_too_long", "over this model's limit"),
        (json.dumps({"sentences": ["ok"] * 257}).encode(), 422, "too_many_rows", "over the limit of 256"),
    ],
)
def test_bad_parse_requests_get_a_one_line_4xx(client, body, status, code, fragment):
    response = client.post("/v1/parse", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, status, code, fragment)


def test_a_body_over_the_size_limit_is_413(engine):
    with make_client(engine, max_body_bytes=4096) as client:
        big = json.dumps({"sentences": ["Is Portal 2 fun?"] * 400}).encode()
        response = client.post("/v1/parse", content=big, headers={"Content-Type": "application/json"})
        assert_error(response, 413, "body_too_large", "over 4096 bytes")
        # Without Content-Length (chunked), the limit holds as the bytes arrive.
        chunks = (big[i : i + 1000] for i in range(0, len(big), 1000))
        response = client.post("/v1/parse", content=chunks, headers={"Content-Type": "application/json"})
        assert_error(response, 413, "body_too_large", "over 4096 bytes")
        assert client.post("/v1/parse", json={"sentences": SENTENCES[:1]}).status_code == 200


def test_openai_errors_name_the_model_and_unsupported_options(client):
    assert_error(
        client.post("/v1/completions", json={"model": "../etc", "prompt": "x"}), 404, "model_not_found", "'run'"
    )
    ok = {"model": "run", "prompt": "x"}
    assert_error(client.post("/v1/completions", json={**ok, "n": 2}), 422, "unsupported", "n must be 1")
    assert_error(client.post("/v1/completions", json={**ok, "stream": True}), 422, "unsupported", "stream=true")
    assert_error(client.post("/v1/completions", json={**ok, "prompt": []}), 422, "invalid_request", "empty list")
    chat = {"model": "run", "messages": [{"role": "system", "content": "be brief"}]}
    assert_error(client.post("/v1/chat/completions", json=chat), 422, "invalid_request", "no user message")
    assert_error(client.get("/v1/nothing"), 404, "not_found", "no endpoint '/v1/nothing'")
    assert_error(client.get("/v1/parse"), 405, "method_not_allowed", "GET is not allowed")


def test_api_key_is_required_and_compared_in_constant_time(engine, monkeypatch):
    import mrtune.serve.app as app_module

    compared = []
    real = app_module.hmac.compare_digest
    monkeypatch.setattr(app_module.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    with make_client(engine, api_key="s3cret-key") as client:
        body = {"sentences": SENTENCES[:1]}
        assert_error(client.post("/v1/parse", json=body), 401, "unauthorized", "Authorization: Bearer KEY")
        wrong = client.post("/v1/parse", json=body, headers={"Authorization": "Bearer s3cret-kez"})
        assert_error(wrong, 401, "unauthorized", "wrong API key")
        assert client.get("/metrics").status_code == 401 and client.get("/v1/models").status_code == 401
        right = client.post("/v1/parse", json=body, headers={"Authorization": "Bearer s3cret-key"})
        assert right.status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    assert (b"Bearer s3cret-kez", b"Bearer s3cret-key") in compared


def test_a_request_over_its_timeout_gets_504_and_the_server_carries_on(engine):
    with make_client(engine, timeout_s=0.001) as client:
        response = client.post("/v1/parse", json={"sentences": SENTENCES})
        assert_error(response, 504, "timeout", "per-request timeout of 0.001 s")
        assert client.get("/health").json()["status"] == "ok"


def test_no_request_field_reaches_the_filesystem(client, monkeypatch):
    """Every field of every endpoint carries a marker; no file system call made while answering sees it (opens,
    listings, removals... through audit events; existence checks, which raise none, through os.stat/lstat)."""
    seen: list[str] = []
    recording = [True]

    def hook(event, args):
        if recording[0] and (event == "open" or event.startswith(("os.", "shutil.", "pathlib."))):
            seen.append(f"{event} {args!r}")

    sys.addaudithook(hook)  # audit hooks cannot be removed: this one stops recording at the end
    for name in ("stat", "lstat"):
        real = getattr(os, name)
        monkeypatch.setattr(
            os,
            name,
            lambda path, *a, _real=real, _name=name, **k: seen.append(f"{_name} {path!r}") or _real(path, *a, **k),
        )
    marker = "/tmp/MARKER-../../etc/passwd"
    try:
        client.post("/v1/parse", json={"sentences": [marker]})
        client.post("/v1/completions", json={"model": marker, "prompt": marker, "user": marker})
        client.post("/v1/completions", json={"model": "run", "prompt": marker, "suffix": marker})
        client.post("/v1/chat/completions", json={"model": "run", "messages": [{"role": "user", "content": marker}]})
        client.get(f"/{marker}", headers={"X-File": marker})
    finally:
        recording[0] = False
    assert not [call for call in seen if "MARKER" in call]


def test_metrics_count_requests_rows_batches_latency_and_errors(engine):
    from prometheus_client.parser import text_string_to_metric_families

    with make_client(engine) as client:
        assert client.post("/v1/parse", json={"sentences": SENTENCES}).status_code == 200
        client.post("/v1/parse", content=b"{", headers={"Content-Type": "application/json"})
        for n in range(5):
            client.get(f"/random-path-{n}")
        response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert samples[("mrtune_requests_total", (("endpoint", "/v1/parse"), ("status", "200")))] == 1
    assert samples[("mrtune_requests_total", (("endpoint", "/v1/parse"), ("status", "400")))] == 1
    assert samples[("mrtune_requests_total", (("endpoint", "other"), ("status", "404")))] == 5  # not one per path
    assert samples[("mrtune_rows_total", ())] == len(SENTENCES)
    assert samples[("mrtune_batch_size_sum", ())] == len(SENTENCES)
    assert samples[("mrtune_request_latency_seconds_count", (("endpoint", "/v1/parse"),))] == 2
    assert samples[("mrtune_errors_total", (("kind", "invalid_json"),))] == 1
    assert samples[("mrtune_errors_total", (("kind", "not_found"),))] == 5


def test_health_and_models(client):
    health = client.get("/health").json()
    assert health == {
        "status": "ok",
        "model": "run",
        "device": "cpu",
        "constrained": True,
        "max_batch": 8,
        "queued_rows": 0,
    }
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["run"]


# ---- the batcher alone (no model) -----------------------------------------------------------------------------


def test_the_masks_computed_while_serving_are_saved_when_the_server_stops(serve_run, tmp_path, monkeypatch):
    from mrtune.infer.predict import CONSTRAINT_CACHE
    from mrtune.serve.engine import Engine

    monkeypatch.setenv("MRTUNE_CACHE", str(tmp_path))
    engine = Engine.load(serve_run.path, max_batch=8)
    with make_client(engine) as client:
        assert client.post("/v1/parse", json={"sentences": SENTENCES}).status_code == 200
        assert not (tmp_path / CONSTRAINT_CACHE).exists()  # written once, at the end, not at every request
    (saved,) = (tmp_path / CONSTRAINT_CACHE).iterdir()
    reloaded = Engine.load(serve_run.path, max_batch=8).constraint
    assert reloaded.saved == engine.constraint.learned and reloaded.learned == reloaded.saved


def test_batcher_decodes_rows_arriving_together_in_one_batch_and_survives_a_failure():
    from mrtune.serve.batcher import DynamicBatcher, Overloaded

    batches: list[list[str]] = []

    def decode(prompts):
        batches.append(prompts)
        time.sleep(0.05)  # a decoding step: requests arriving meanwhile form the next batch
        if "boom" in prompts:
            raise ValueError("decode failed")
        return [p.upper() for p in prompts]

    async def scenario():
        batcher = DynamicBatcher(decode, max_batch=4, window_s=0.02, max_queued_rows=20)
        batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit([f"s{i}"]) for i in range(10)))
            assert results == [[f"S{i}"] for i in range(10)]
            assert [len(b) for b in batches] == [4, 4, 2]
            with pytest.raises(ValueError, match="decode failed"):
                await batcher.submit(["boom"])
            assert await batcher.submit(["a", "b"]) == ["A", "B"]  # the worker lives on
            # A request that gives up before its batch starts leaves no row to decode.
            blocker = asyncio.ensure_future(batcher.submit(["first"]))
            await asyncio.sleep(0.03)  # "first" is decoding now
            gone = asyncio.ensure_future(batcher.submit(["abandoned"]))
            await asyncio.sleep(0)
            gone.cancel()
            assert await blocker == ["FIRST"] and await batcher.submit(["next"]) == ["NEXT"]
            assert ["abandoned"] not in batches
            with pytest.raises(Overloaded):
                await batcher.submit(["x"] * 21)
        finally:
            await batcher.stop()

    asyncio.run(scenario())


# ---- options refused before the model loads -------------------------------------------------------------------


def test_a_non_local_bind_needs_an_api_key(serve_run, capsys, monkeypatch):
    from mrtune.cli import build_parser, main
    from mrtune.serve.command import is_local

    monkeypatch.delenv("MRTUNE_API_KEY", raising=False)
    assert build_parser().parse_args(["serve", "runs/demo"]).host == "127.0.0.1"
    assert main(["serve", str(serve_run.path), "--host", "0.0.0.0"]) == 2
    assert "--host 0.0.0.0 makes the server reachable from other machines: also set an API key" in (
        capsys.readouterr().err
    )
    assert main(["serve", str(serve_run.path), "--host", "::1", "--api-key", " ", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "API key (--api-key or MRTUNE_API_KEY) is empty" in err and "--port 70000 is not a port number" in err
    assert [
        is_local(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "localhost", "0.0.0.0", "10.0.0.2", "example.org")
    ] == [
        True,
        True,
        True,
        True,
        False,
        False,
        False,
    ]


def test_a_busy_port_is_refused_before_the_model_loads(serve_run, capsys):
    import socket

    from mrtune.cli import main

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["serve", str(serve_run.path), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# ---- a real server process ------------------------------------------------------------------------------------


class ServerProcess:
    """`python -m mrtune serve RUN --port 0 ...`, its URL read from the line it prints when it listens."""

    def __init__(self, run_path: Path, log: Path, *args: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MRTUNE_API_KEY": ""}
        env.pop("MRTUNE_API_KEY")
        self.log = log
        command = [sys.executable, "-m", "mrtune", "serve", str(run_path), "--port", "0", "--log-level", "warning"]
        self.process = subprocess.Popen([*command, *args], stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
        try:
            self.url = self._wait_for_url()
        except BaseException:  # no server left behind by a failed start
            self.process.kill()
            self.process.wait()
            raise

    def _wait_for_url(self, timeout_s: float = 180) -> str:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            found = re.search(r"on (http://\S+) \(", self.log.read_text())
            if found:
                try:
                    if httpx.get(found.group(1) + "/health", timeout=5).status_code == 200:
                        return found.group(1)
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"the server did not start: {self.log.read_text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def live_server(serve_run, tmp_path_factory):
    server = ServerProcess(serve_run.path, tmp_path_factory.mktemp("serve-log") / "server.log", "--max-batch", "8")
    yield server
    server.stop()


def metric(url: str, name: str, **labels) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@pytest.mark.slow
def test_the_openai_client_works_against_the_server(live_server, serve_run):
    import httpx
    import openai

    from mrtune.task.prompts import build_prompt

    expected = httpx.post(live_server.url + "/v1/parse", json={"sentences": SENTENCES[:2]}, timeout=60).json()
    mrs = [r["meaning_representation"] for r in expected["results"]]
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="not-needed-on-127.0.0.1", max_retries=0)
    assert [m.id for m in client.models.list()] == ["run"]
    chat = client.chat.completions.create(
        model="run",
        messages=[{"role": "system", "content": "ignored"}, {"role": "user", "content": SENTENCES[0]}],
    )
    assert chat.choices[0].message.content == mrs[0] and chat.usage.completion_tokens > 0
    # Completions take the whole prompt: the run's training prompt around the sentence.
    prompts = [build_prompt(serve_run.config().data.prompt_style, s) for s in SENTENCES[:2]]
    completion = client.completions.create(model="run", prompt=prompts)
    assert [c.text for c in completion.choices] == mrs and completion.usage.prompt_tokens > 2 * 5
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' is not served here"):
        client.completions.create(model="gpt-4o", prompt="x")


@pytest.mark.slow
def test_concurrent_requests_share_batches_and_get_their_own_answers(live_server):
    import httpx

    sentences = [r["target"] for r in viggo_rows("validation", 8)]
    alone = [
        httpx.post(live_server.url + "/v1/parse", json={"sentences": [s]}, timeout=60).json()["results"][0]
        for s in sentences
    ]
    batches_before = metric(live_server.url, "mrtune_batch_size_count")
    rows_before = metric(live_server.url, "mrtune_rows_total")

    async def together():
        async with httpx.AsyncClient(base_url=live_server.url, timeout=60) as client:
            responses = await asyncio.gather(*(client.post("/v1/parse", json={"sentences": [s]}) for s in sentences))
        return [r.json()["results"][0] for r in responses]

    assert asyncio.run(together()) == alone  # each request its own row, whatever batch it shared
    assert metric(live_server.url, "mrtune_rows_total") - rows_before == len(sentences)
    assert metric(live_server.url, "mrtune_batch_size_count") - batches_before < len(sentences)


@pytest.mark.slow
def test_a_flood_of_malformed_requests_leaves_the_server_up_and_its_memory_flat(live_server):
    import httpx
    import psutil

    bodies = [
        b"{",
        b'{"sentences": 5}',
        b'{"sentences": [null]}',
        b'{"sentences": []}',
        b"\xff\xfe not even text",
        json.dumps({"sentences": ["x " * 400]}).encode(),
        b"[" * 5000,
        b'{"model": "run", "messages": "hi"}',
    ]
    paths = [
        "/v1/parse",
        "/v1/parse",
        "/v1/parse",
        "/v1/parse",
        "/v1/parse",
        "/v1/parse",
        "/v1/parse",
        "/v1/chat/completions",
    ]
    process = psutil.Process(live_server.process.pid)
    with httpx.Client(base_url=live_server.url, timeout=30) as client:

        def flood(n: int) -> None:
            for i in range(n):
                response = client.post(
                    paths[i % 8], content=bodies[i % 8], headers={"Content-Type": "application/json"}
                )
                assert 400 <= response.status_code < 500 and "\n" not in response.json()["error"]["message"]
            big = client.post("/v1/parse", content=b"x" * (2 << 20), headers=JSON)
            assert big.status_code == 413

        flood(200)  # allocator and caches warm up
        before = process.memory_info().rss
        flood(1000)
        grown = process.memory_info().rss - before
        assert grown < 16 * 2**20, f"memory grew by {grown / 2**20:.1f} MiB over 1,000 malformed requests"
        assert client.post("/v1/parse", json={"sentences": SENTENCES[:1]}).status_code == 200
    assert metric(live_server.url, "mrtune_errors_total", kind="invalid_json") >= 300


@pytest.mark.slow
def test_a_client_leaving_mid_request_does_not_break_the_others(live_server):
    import httpx

    gone_before = metric(live_server.url, "mrtune_errors_total", kind="client_disconnected")
    many = [r["target"] for r in viggo_rows("validation", 40)]

    async def scenario():
        async with httpx.AsyncClient(base_url=live_server.url, timeout=60) as patient:
            async with httpx.AsyncClient(base_url=live_server.url, timeout=0.2) as impatient:
                leaving = asyncio.ensure_future(impatient.post("/v1/parse", json={"sentences": many}))
                await asyncio.sleep(0.05)
                others = [patient.post("/v1/parse", json={"sentences": [s]}) for s in SENTENCES]
                results = await asyncio.gather(*others)
                with pytest.raises(httpx.ReadTimeout):
                    await leaving  # the client closed its connection
        return results

    results = asyncio.run(scenario())
    assert [r.status_code for r in results] == [200] * len(SENTENCES)
    assert [r.json()["results"][0]["sentence"] for r in results] == SENTENCES
    deadline = time.monotonic() + 30
    while metric(live_server.url, "mrtune_errors_total", kind="client_disconnected") == gone_before:
        assert time.monotonic() < deadline, "the server never noticed the client leave"
        time.sleep(0.2)
    assert httpx.get(live_server.url + "/health", timeout=10).json()["status"] == "ok"


@pytest.mark.slow
def test_sigterm_answers_requests_in_flight_then_exits_0(serve_run, tmp_path):
    import httpx

    server = ServerProcess(serve_run.path, tmp_path / "server.log", "--max-batch", "2")
    many = [r["target"] for r in viggo_rows("validation", 120)]
    answer = {}

    def ask():
        answer["response"] = httpx.post(server.url + "/v1/parse", json={"sentences": many}, timeout=120)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        deadline = time.monotonic() + 60
        while metric(server.url, "mrtune_rows_total") < 2:  # decoding has started
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        in_flight = asker.is_alive()
        assert server.process.wait(timeout=120) == 0, server.log.read_text()
    finally:
        if server.process.poll() is None:
            server.process.kill()
        asker.join()
    assert in_flight, "the request ended before SIGTERM: make it longer"
    response = answer["response"]
    assert response.status_code == 200 and len(response.json()["results"]) == len(many)
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)


@pytest.mark.slow
def test_the_server_binds_loopback_by_default(live_server):
    import psutil

    addresses = {c.laddr.ip for c in psutil.Process(live_server.process.pid).net_connections() if c.status == "LISTEN"}
    assert addresses == {"127.0.0.1"}


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.slow
def test_the_web_page_parses_a_typed_sentence_in_headless_chromium(live_server, tmp_path):
    if not Path(CHROMIUM).is_file():
        if os.environ.get("MRTUNE_REQUIRE_BROWSER"):
            pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium); CI installs it")
    import httpx
    from playwright.sync_api import sync_playwright

    sentence = SENTENCES[1]
    expected = httpx.post(live_server.url + "/v1/parse", json={"sentences": [sentence]}, timeout=60).json()
    expected = expected["results"][0]
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]  # fmt: skip
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page()
            page.goto(live_server.url + "/")
            assert page.text_content("#model") == "run"
            page.fill("#sentences", sentence)
            page.click("#parse")
            page.wait_for_selector(".result .mr", timeout=60_000)
            assert page.text_content(".result .sentence") == sentence
            assert page.text_content(".result .mr") == expected["meaning_representation"]
            assert page.text_content(".result .act") == expected["dialogue_act"]
            slots = {row.query_selector("th").text_content(): row.query_selector("td").text_content()
                     for row in page.query_selector_all(".result tr.slot")}  # fmt: skip
            assert slots == expected["slots"]
            assert re.fullmatch(r"1 sentence in \d+ ms", page.text_content("#status"))
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            # An example sentence, clicked, is parsed in its turn.
            example = page.query_selector_all("button.example")[0]
            example_text = example.text_content()
            example.click()
            page.wait_for_function(
                "text => document.querySelector('.result .sentence')?.textContent === text", arg=example_text
            )
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000
