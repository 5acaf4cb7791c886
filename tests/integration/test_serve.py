"""``pretune serve``: a real uvicorn server on a free port, hit over HTTP with httpx (and its page with
headless Chromium); answers are compared with ``pretune.load(model).predict`` on tiny models."""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import pretune
from pretune import serve
from pretune.cli import main
from pretune.data.images import load_digits
from pretune.errors import CheckpointError, DataError
from tests.integration.helpers import ENV

ROOT = Path(__file__).parents[2]
FAST = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.precision=fp32", "trainer.warmup=0", "trainer.lr=3e-3"]
ANIMALS = "cat dog bird fish horse cow sheep goat mouse lion tiger bear".split()
NER = [(["John", "lives", "in", "Paris"], ["B-PER", "O", "O", "B-LOC"]), (["Yesterday", "Mary", "went", "to", "London"], ["O", "B-PER", "O", "O", "B-LOC"])]


# -- tiny models ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_model(tmp_path_factory, tiny_encoder, topics):
    """A topic classifier (5 classes) with the run's test_metrics.json and a report.html beside its model/."""
    run_dir = tmp_path_factory.mktemp("serve") / "clf"
    result = pretune.train(ROOT / "recipes/text-classify.yaml", [f"model={tiny_encoder}", f"run_dir={run_dir}", f"data.train={topics / 'train.csv'}",
                                                                 f"data.test={topics / 'test.csv'}", "trainer.max_steps=4", "trainer.eval_every=4",
                                                                 "trainer.batch_size=16", "data.max_length=48", *FAST])
    (run_dir / "report.html").write_text("<html><body><h1>the training report</h1></body></html>")
    card = result.model_dir / "README.md"  # the model card a run writes (older runs have none)
    if not card.is_file():
        card.write_text("# clf\n\nA topic classifier.\n")
    return result.model_dir


@pytest.fixture(scope="module")
def pair_model(tmp_path_factory, tiny_encoder):
    """Sentence pairs (premise, hypothesis) labelled same / different animals."""
    folder, rng = tmp_path_factory.mktemp("serve"), random.Random(0)
    lines = ["premise,hypothesis,label"]
    for _ in range(48):
        a = rng.sample(ANIMALS, 3)
        same = rng.random() < 0.5
        b = rng.sample(a, 3) if same else rng.sample([w for w in ANIMALS if w not in a], 3)
        lines.append(f"{' '.join(a)},{' '.join(b)},{'same' if same else 'different'}")
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    return pretune.train(ROOT / "recipes/text-classify.yaml", [f"model={tiny_encoder}", f"run_dir={folder / 'pairs'}", f"data.train={folder / 'train.csv'}",
                                                               "data.text=premise", "data.text_pair=hypothesis", "trainer.max_steps=2",
                                                               "trainer.eval_every=2", *FAST]).model_dir


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("serve") / "img"
    return pretune.train(ROOT / "recipes/image-classify.yaml", [f"run_dir={run_dir}", "backbone.size=tiny", "data.size=8", "data.classes=[0,1,2,3]",
                                                                "trainer.max_steps=6", "trainer.eval_every=6", *FAST]).model_dir


@pytest.fixture(scope="module")
def vector_model(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("serve") / "vec"
    return pretune.train(ROOT / "recipes/image-classify.yaml", [f"run_dir={run_dir}", "data.images=null", "data.vectors=builtin:digits",
                                                                "backbone.name=mlp", "backbone.size=tiny", "task.augment=null",
                                                                "trainer.max_steps=6", "trainer.eval_every=6", *FAST]).model_dir


@pytest.fixture(scope="module")
def tagger(tmp_path_factory, tiny_encoder):
    folder = tmp_path_factory.mktemp("serve")
    rows = [NER[i % 2] for i in range(32)]
    (folder / "train.jsonl").write_text("".join(json.dumps({"tokens": t, "tags": g}) + "\n" for t, g in rows))
    return pretune.train(ROOT / "recipes/text-tag.yaml", [f"model={tiny_encoder}", f"run_dir={folder / 'tag'}", f"data.train={folder / 'train.jsonl'}",
                                                          "trainer.max_steps=2", "trainer.eval_every=2", "data.max_length=32", *FAST]).model_dir


# -- a real server in a background thread --------------------------------------------------------------
@contextmanager
def serving(api):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(api, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def text_server(text_model):
    api = serve.app(text_model, max_batch=8, max_body_bytes=20_000, max_inputs=40, window_ms=100)
    with serving(api) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, api


def texts(topics, n=30) -> list[str]:
    with open(topics / "test.csv", newline="") as handle:
        return [row["text"] for row in csv.DictReader(handle)][:n]


def same(results: list[dict], expected: list[dict]) -> bool:
    """The same labels and probabilities up to float noise (batches pad texts differently)."""
    return len(results) == len(expected) and all(
        r["label"] == e["label"] and list(r["probabilities"]) == list(e["probabilities"])
        and np.allclose(list(r["probabilities"].values()), list(e["probabilities"].values()), atol=1e-5)
        for r, e in zip(results, expected))


def error(response: httpx.Response, status: int) -> str:
    """The one-line JSON error of a refused request (never a traceback)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert "Traceback" not in response.text and 'File "' not in response.text
    message = response.json()["error"]
    assert message and "\n" not in message
    return message


# -- text ------------------------------------------------------------------------------------------------
def test_text_classifier_answers_as_the_predictor(text_server, text_model, topics):
    client, _ = text_server
    predictor = pretune.load(text_model)
    assert client.get("/health").json() == {"status": "ok", "model": str(Path(text_model).resolve())}
    meta = client.get("/metadata").json()
    assert (meta["kind"], meta["modality"], meta["labels"]) == ("single", "text", predictor.labels) and len(meta["labels"]) == 5
    assert meta["meta"] == json.loads((text_model / "pretune.json").read_text())
    assert meta["test_metrics"] == json.loads((text_model.parent / "test_metrics.json").read_text())
    assert meta["report"] == "/report" and meta["limits"] == {"max_batch": 8, "max_inputs": 40, "max_body_bytes": 20_000}
    assert meta["model_card"] == (text_model / "README.md").read_text()
    report = client.get("/report")
    assert report.status_code == 200 and "the training report" in report.text

    inputs = texts(topics, 12)
    answer = client.post("/predict", json={"inputs": inputs})
    assert answer.status_code == 200 and same(answer.json()["predictions"], predictor.predict(inputs))
    one = client.post("/predict", json={"inputs": inputs[0]}).json()["predictions"]  # a string: one prediction
    assert same(one, predictor.predict(inputs[:1]))
    # curl -d sends application/x-www-form-urlencoded: the body is read as JSON whatever the content type
    plain = client.post("/predict", content=json.dumps({"inputs": inputs[:2]}), headers={"content-type": "application/x-www-form-urlencoded"})
    assert same(plain.json()["predictions"], predictor.predict(inputs[:2]))
    trimmed = client.post("/predict", json={"inputs": inputs[:3], "top_k": 2}).json()["predictions"]
    for result, full in zip(trimmed, predictor.predict(inputs[:3])):
        ranked = sorted(full["probabilities"].items(), key=lambda item: -item[1])[:2]
        assert result["label"] == full["label"] == ranked[0][0]
        assert list(result["probabilities"]) == [name for name, _ in ranked]
        np.testing.assert_allclose(list(result["probabilities"].values()), [p for _, p in ranked], atol=1e-5)


def test_concurrent_requests_are_batched_and_each_gets_its_own_results(text_server, text_model, topics):
    client, api = text_server
    pool = texts(topics, 30)
    rng = random.Random(0)
    requests = [rng.sample(pool, rng.randint(1, 3)) for _ in range(24)]
    expected = [pretune.load(text_model).predict(inputs) for inputs in [[text] for text in pool]]
    by_text = dict(zip(pool, expected))
    api.state.batcher.batches.clear()
    with ThreadPoolExecutor(12) as threads:
        answers = list(threads.map(lambda inputs: client.post("/predict", json={"inputs": inputs}), requests))
    for inputs, answer in zip(requests, answers):
        assert answer.status_code == 200
        assert same(answer.json()["predictions"], [by_text[text][0] for text in inputs])
    batches = api.state.batcher.batches
    assert sorted(n for batch in batches for n in batch) == sorted(map(len, requests))  # every request predicted once
    assert len(batches) < len(requests) and max(map(len, batches)) > 1  # requests were gathered...
    assert all(sum(batch) <= 8 for batch in batches)  # ... into batches of up to max_batch inputs
    big = client.post("/predict", json={"inputs": pool[:20]})  # more than max_batch: alone, split by predict
    assert same(big.json()["predictions"], [by_text[text][0] for text in pool[:20]]) and batches[-1] == [20]


def test_a_rejected_input_fails_only_its_own_request(text_server, topics, monkeypatch):
    client, api = text_server
    predictor = api.state.predictor
    original = predictor.predict

    def picky(inputs, pairs=None, batch_size=32):
        if "poison" in inputs:
            raise DataError("the text 'poison' cannot be read")
        return original(inputs, pairs, batch_size=batch_size)

    monkeypatch.setattr(predictor, "predict", picky)
    requests = [[text] for text in texts(topics, 7)]
    requests.insert(3, ["poison"])
    with ThreadPoolExecutor(8) as threads:
        answers = list(threads.map(lambda inputs: client.post("/predict", json={"inputs": inputs}), requests))
    assert error(answers[3], 422) == "the text 'poison' cannot be read"
    assert [a.status_code for i, a in enumerate(answers) if i != 3] == [200] * 7
    assert same([a.json()["predictions"][0] for i, a in enumerate(answers) if i != 3],
                [original(inputs)[0] for i, inputs in enumerate(requests) if i != 3])

    def broken(inputs, pairs=None, batch_size=32):
        raise RuntimeError("boom\nTraceback (most recent call last):\n  File \"x.py\"")

    monkeypatch.setattr(predictor, "predict", broken)
    message = error(client.post("/predict", json={"inputs": ["a"]}), 500)  # a bug: no detail leaks
    assert "internal error (RuntimeError)" in message and "boom" not in message


@pytest.mark.parametrize("request_, status, fragment", [
    (dict(content=b"{not json"), 400, "not valid JSON (Expecting property name"),
    (dict(content=b'{"inputs": NaN}'), 400, "NaN is not a JSON number"),
    (dict(content=b"\xff\xfe\xfa"), 400, "not valid JSON"),
    (dict(content=b"[1, 2]"), 422, "the body is a list; send a JSON object"),
    (dict(json={"inputs": 3}), 422, "inputs is a number; text models take a string or a list of strings"),
    (dict(json={"inputs": [{"text": "a"}]}), 422, "inputs[0] is an object"),
    (dict(json={"inputs": ["a", None]}), 422, "inputs[1] is null"),
    (dict(json={"inputs": []}), 422, "inputs is empty"),
    (dict(json={"inputs": ["a"] * 41}), 422, "too many inputs (41); at most 40 per request"),
    (dict(json={"text": "a"}), 422, "inputs: Field required"),
    (dict(json={"inputs": "a", "top_k": 0}), 422, "top_k: Input should be greater than or equal to 1"),
    (dict(json={"inputs": "a", "top_k": "2"}), 422, "top_k: Input should be a valid integer"),
    (dict(json={"inputs": "a", "pairs": ["b"]}), 422, "pairs applies to sentence-pair models"),
    (dict(json={"inputs": ["a" * 30_000]}), 413, "at most 20,000"),
    (dict(files={"image": ("a.png", b"x")}), 415, "multipart uploads are for image and audio models"),
])
def test_bad_requests_get_a_one_line_json_error(text_server, request_, status, fragment):
    client, _ = text_server
    assert fragment in error(client.post("/predict", **request_), status)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["inputs", "pairs", "top_k", "x"]), inner, max_size=3),
                    max_leaves=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.fixed_dictionaries({"inputs": JSON}, optional={"pairs": JSON, "top_k": JSON}) | JSON)
def test_any_json_body_gets_predictions_or_a_one_line_error(text_server, body):
    client, _ = text_server
    answer = client.post("/predict", content=json.dumps(body))
    if answer.status_code == 200:
        assert len(answer.json()["predictions"]) == (1 if isinstance(body["inputs"], str) else len(body["inputs"]))
    else:
        error(answer, 422)


def test_unknown_routes_and_methods_are_json_errors(text_server):
    client, _ = text_server
    assert "no route GET /nope; the routes are GET /, GET /health" in error(client.get("/nope"), 404)
    assert "GET is not allowed on /predict" in error(client.get("/predict"), 405)
    assert "DELETE is not allowed on /health" in error(client.delete("/health"), 405)
    chunked = client.post("/predict", content=iter([b'{"inputs": ["', b"a" * 15_000, b"a" * 15_000, b'"]}']))  # no content-length
    assert "over 20,000 bytes" in error(chunked, 413)


def test_tagger_gives_words_and_tags(tagger):
    predictor = pretune.load(tagger)
    with serving(serve.app(tagger)) as url, httpx.Client(base_url=url, timeout=60) as client:
        answer = client.post("/predict", json={"inputs": ["John lives in Paris", ["Yesterday", "Mary"]], "top_k": 1})
        assert answer.json()["predictions"] == predictor.predict([["John", "lives", "in", "Paris"], ["Yesterday", "Mary"]])
        assert answer.json()["predictions"][0]["words"] == ["John", "lives", "in", "Paris"]
        assert "inputs[0] has no words to tag" in error(client.post("/predict", json={"inputs": ["  "]}), 422)
        assert "(or lists of words)" in error(client.post("/predict", json={"inputs": [[1, 2]]}), 422)


def test_sentence_pair_model_takes_pairs(pair_model, tmp_path):
    predictor = pretune.load(pair_model)
    texts, pairs = ["cat dog bird", "cat dog bird", "lion cow goat"], ["bird dog cat", "lion tiger bear", "goat lion cow"]
    with serving(serve.app(pair_model)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert same(client.post("/predict", json={"inputs": texts, "pairs": pairs}).json()["predictions"], predictor.predict(texts, pairs))
        assert same(client.post("/predict", json={"inputs": texts[1], "pairs": pairs[1]}).json()["predictions"], predictor.predict(texts[1:2], pairs[1:2]))
        assert "reads sentence pairs (premise, hypothesis)" in error(client.post("/predict", json={"inputs": texts}), 422)
        assert "3 inputs but 2 pairs" in error(client.post("/predict", json={"inputs": texts, "pairs": pairs[:2]}), 422)
        if shutil.which("chromium"):  # the page shows a second box, named after the pair column, and sends both texts
            page = chromium(f"{url}/?{httpx.QueryParams({'text': texts[1], 'pair': pairs[1]})}", tmp_path, "--dump-dom").stdout
            assert 'id="pair-label">hypothesis</label>' in page and 'data-state="done"' in page, page[-2000:]
            assert f'id="answer">{predictor.predict(texts[1:2], pairs[1:2])[0]["label"]}</strong>' in page


# -- images and vectors ------------------------------------------------------------------------------------
def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).round().astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_model_takes_base64_json_and_multipart_uploads(image_model, tmp_path):
    x, _ = load_digits()
    images = [png(x[i, 0].numpy()) for i in range(6)]
    for i, data in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(data)
    predictor = pretune.load(image_model)
    expected = predictor.predict([str(tmp_path / f"{i}.png") for i in range(6)])
    leftovers = set(Path(tempfile.gettempdir()).glob("pretune-serve-*"))
    with serving(serve.app(image_model)) as url, httpx.Client(base_url=url, timeout=60) as client:
        inputs = [{"image_base64": base64.b64encode(data).decode()} for data in images]
        inputs[1] = {"image_base64": "data:image/png;base64," + inputs[1]["image_base64"]}  # a browser's data: URL
        answer = client.post("/predict", json={"inputs": inputs})
        assert answer.status_code == 200 and same(answer.json()["predictions"], expected)
        assert same(client.post("/predict", json={"inputs": inputs[2]}).json()["predictions"], expected[2:3])  # one object
        upload = client.post("/predict", files=[("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)], data={"top_k": "1"})
        assert upload.status_code == 200, upload.text
        assert [(r["label"], list(r["probabilities"])) for r in upload.json()["predictions"]] == [(r["label"], [r["label"]]) for r in expected]

        assert "inputs[0] is a string; image models take" in error(client.post("/predict", json={"inputs": ["0.png"]}), 422)
        assert "image_base64 is not valid base64" in error(client.post("/predict", json={"inputs": [{"image_base64": "@@"}]}), 422)
        garbage = base64.b64encode(b"GIF89a not really").decode()
        assert "inputs[0] is not a readable image" in error(client.post("/predict", json={"inputs": [{"image_base64": garbage}]}), 422)
        fields_only = b'--b\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n1\r\n--b--\r\n'
        multipart = {"content-type": "multipart/form-data; boundary=b"}
        assert "holds no file" in error(client.post("/predict", content=fields_only, headers=multipart), 422)
        assert "top_k is '0'" in error(client.post("/predict", files={"image": ("0.png", images[0])}, data={"top_k": "0"}), 422)
        assert "malformed multipart" in error(client.post("/predict", content=b"--b\r\nno end", headers=multipart), 400)
        assert "no training report" in error(client.get("/report"), 404)
        assert client.get("/metadata").json()["report"] is None
        page = client.get("/").text  # the page offers an image drop, and no report link
        assert '"modality": "image"' in page and '"report": false' in page and "__CONFIG__" not in page
    assert set(Path(tempfile.gettempdir()).glob("pretune-serve-*")) == leftovers  # uploaded images are removed


@pytest.fixture(scope="module")
def audio_model(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("serve") / "audio"
    return pretune.train(ROOT / "recipes/audio-classify.yaml", [f"run_dir={run_dir}", "data.duration=0.5", "backbone.size=tiny",
                                                                "task.augment=null", "trainer.max_steps=4", "trainer.eval_every=4",
                                                                *FAST]).model_dir


def test_audio_model_takes_base64_clips_and_multipart_uploads(audio_model):
    clips = sorted((ROOT / "src/pretune/data/builtin/spoken_digits/2").glob("*.flac"))[:3]
    expected = pretune.load(audio_model).predict([str(c) for c in clips])
    leftovers = set(Path(tempfile.gettempdir()).glob("pretune-serve-*"))
    with serving(serve.app(audio_model)) as url, httpx.Client(base_url=url, timeout=60) as client:
        inputs = [{"audio_base64": base64.b64encode(c.read_bytes()).decode()} for c in clips]
        answer = client.post("/predict", json={"inputs": inputs})
        assert answer.status_code == 200 and same(answer.json()["predictions"], expected)
        upload = client.post("/predict", files=[("clip", (c.name, c.read_bytes(), "audio/flac")) for c in clips])
        assert upload.status_code == 200 and same(upload.json()["predictions"], expected)
        assert 'audio models take {"audio_base64"' in error(client.post("/predict", json={"inputs": ["a.wav"]}), 422)
        garbage = base64.b64encode(b"RIFF not really a wave").decode()
        assert "inputs[0] is not a readable audio file" in error(client.post("/predict", json={"inputs": [{"audio_base64": garbage}]}), 422)
        page = client.get("/").text  # the page offers a clip drop
        assert '"modality": "audio"' in page and "audio/*" in page
    assert set(Path(tempfile.gettempdir()).glob("pretune-serve-*")) == leftovers  # uploaded clips are removed


def test_vector_model_takes_lists_of_numbers(vector_model):
    x, _ = load_digits()
    vectors = x[:5].flatten(1)
    predictor = pretune.load(vector_model)
    expected = predictor.predict(vectors)
    with serving(serve.app(vector_model)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert same(client.post("/predict", json={"inputs": vectors.tolist()}).json()["predictions"], expected)
        assert same(client.post("/predict", json={"inputs": vectors[0].tolist()}).json()["predictions"], expected[:1])  # one vector
        assert "inputs[0] has 10 numbers; the model takes vectors of 64" in error(client.post("/predict", json={"inputs": [[0.5] * 10]}), 422)
        assert "inputs[0] is a list; vector models take" in error(client.post("/predict", json={"inputs": [[0.5, "a"]]}), 422)
        assert "too large for a float" in error(client.post("/predict", content=b'{"inputs": [' + b"1e400, " * 63 + b"1]}"), 422)


# -- the page, in a real browser ----------------------------------------------------------------------------
def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("Debian's chromium is not installed (as root, .ci/test-assets installs it; the README's test command runs it)")
    return found


def chromium(url: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                           "--virtual-time-budget=10000", *flags, url], capture_output=True, text=True, timeout=120)


def test_the_page_predicts_what_is_typed(text_server, text_model, topics, tmp_path):
    client, _ = text_server
    text = texts(topics, 1)[0]
    expected = pretune.load(text_model).predict([text])[0]
    url = f"{client.base_url}/?{httpx.QueryParams({'text': text})}"  # ?text= fills the box and predicts
    page = chromium(url, tmp_path, "--dump-dom").stdout
    assert 'data-state="done"' in page, page[-3000:]
    assert f'id="answer">{expected["label"]}</strong>' in page
    rows = re.findall(r'<div class="row( chosen)?" data-label="([^"]+)">', page)
    assert [name for _, name in rows] == sorted(expected["probabilities"], key=lambda name: -expected["probabilities"][name])
    assert [name for chosen, name in rows if chosen] == [expected["label"]]  # one bar per class, the predicted one marked
    assert 'href="/report"' in page

    shot = tmp_path / "page.png"
    chromium(url, tmp_path, f"--screenshot={shot}", "--window-size=800,600", "--hide-scrollbars")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (800, 600)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # text and bars, not a blank page


# -- the command ----------------------------------------------------------------------------------------------
def test_cli_serves_until_ctrl_c(text_model):
    process = subprocess.Popen([sys.executable, "-m", "pretune", "serve", str(text_model), "--port", "0"], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        assert selector.select(timeout=120), "pretune serve printed nothing"
        line = process.stdout.readline()
        match = re.fullmatch(rf"pretune: serving {re.escape(str(text_model))} at (http://127\.0\.0\.1:\d+/) \(Ctrl-C to stop\)\n", line)
        assert match, line
        assert httpx.get(match.group(1) + "health", timeout=30).json()["status"] == "ok"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert out == "" and "Traceback" not in err


def test_cli_refuses_a_busy_port_and_a_language_model_in_one_line(text_model, tiny_decoder, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(text_model), "--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pretune: error: cannot listen on 127.0.0.1:") and err.count("\n") == 1
    with pytest.raises(CheckpointError, match="a causal language model generates text, which pretune serve does not serve"):
        serve.app(tiny_decoder)


def test_an_exported_onnx_model_serves_the_same_predictions(text_model, topics, tmp_path):
    pytest.importorskip("onnxruntime")
    from pretune.export import export

    folder = export(text_model, tmp_path / "onnx").folder
    batch = texts(topics, 12)
    with serving(serve.app(folder)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/metadata").json()["meta"]["export"]["format"] == "onnx"
        answer = client.post("/predict", json={"inputs": batch})
    assert answer.status_code == 200 and same(answer.json()["predictions"], pretune.load(text_model).predict(batch))
