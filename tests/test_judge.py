"""MT-Bench and its chat backends: a real local HTTP server as the judge, a tiny causal LM, prompts, parsing, loading."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from balora.data.hub import HubLoadError
from balora.evaluation import chat_backends
from balora.evaluation.chat_backends import ChatBackend, JudgeError, LocalModelBackend, OpenAICompatibleBackend
from balora.evaluation.mt_bench import (
    JUDGE_PROMPTS,
    MTBenchQuestion,
    answer_questions,
    build_judge_messages,
    judge_answers,
    load_mt_bench_questions,
    parse_rating,
)

KEY = "sk-test-SECRET-0123456789"
MODEL = "judge-model-x"


# --------------------------------------------------------------------------------------------
# A real chat-completions server on 127.0.0.1
# --------------------------------------------------------------------------------------------


@dataclass
class FakeChatServer:
    """State shared with the handler: scripted replies first, then marker-based judgments."""

    base_url: str = ""
    requests: list[dict] = field(default_factory=list)
    script: list = field(default_factory=list)  # items: "drop", "slow" or (status, body_bytes, headers)
    replies: dict[str, str] = field(default_factory=dict)  # answer marker -> judgment text

    def judgment_for(self, content: str) -> str:
        """The reply for the marker that occurs LAST in the judge prompt (the graded answer)."""
        found = [(content.rfind(m), m) for m in self.replies if m in content]
        return self.replies[max(found)[1]] if found else "no marker found"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        fake: FakeChatServer = self.server.fake
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                              "content_type": self.headers.get("Content-Type"), "body": json.loads(raw)})
        if self.path != "/v1/chat/completions":
            return self._send(404, b'{"error": {"message": "no such route"}}')
        if fake.script:
            action = fake.script.pop(0)
            if action == "drop":  # close the connection without any reply
                self.close_connection = True
                return None
            if action == "slow":  # reply after the client's time-out, i.e. never
                time.sleep(0.8)
                self.close_connection = True
                return None
            return self._send(*action)
        body = json.loads(raw)
        text = fake.judgment_for(body["messages"][-1]["content"])
        reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": "stop"}]}
        return self._send(200, json.dumps(reply).encode())

    def _send(self, status, body, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def chat_server(monkeypatch):
    """A ThreadingHTTPServer on a free loopback port serving ``/v1/chat/completions``."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.fake = FakeChatServer(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _backend(fake: FakeChatServer, **kwargs) -> OpenAICompatibleBackend:
    kwargs.setdefault("backoff_s", 0.01)
    kwargs.setdefault("timeout_s", 5)
    return OpenAICompatibleBackend(fake.base_url, MODEL, **kwargs)


def _ok(text: str) -> tuple[int, bytes, dict]:
    return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode(), {}


MESSAGES = [{"role": "user", "content": "hi"}]


# --------------------------------------------------------------------------------------------
# Full judging run against the server
# --------------------------------------------------------------------------------------------


def _fixture_questions() -> list[MTBenchQuestion]:
    return [
        MTBenchQuestion(81, "writing", ["Write a haiku about rain.", "Now make it about snow."]),
        MTBenchQuestion(111, "math", ["What is 17 * 3?", "And 17 * 4?"], ["REF-ONE: 51", "REF-TWO: 68"]),
        MTBenchQuestion(91, "roleplay", ["Pretend to be a pirate."]),
    ]


def _fixture_answers() -> list[list[str]]:
    return [["ANS-81-1 drops fall", "ANS-81-2 flakes fall"], ["ANS-111-1 it is 51", "ANS-111-2 it is 68"],
            ["ANS-91-1 arr"]]


def test_full_judge_run_gets_server_scores(chat_server, tmp_path):
    chat_server.replies = {
        "ANS-81-1": "Vivid imagery. Rating: [[8]]",
        "ANS-81-2": "Fine, a little flat.\nRating: [[6]]",
        "ANS-111-1": "Correct, but no working shown. [[3]]",
        "ANS-111-2": "Correct and clear. Rating: [[9.5]]",
        "ANS-91-1": "I refuse to give a number.",
    }
    questions, answers = _fixture_questions(), _fixture_answers()
    result = judge_answers(_backend(chat_server), questions, answers, progress=False, max_tokens=321)

    assert [(r.question_id, r.turn, r.score) for r in result.records] == [
        (81, 1, 8.0), (81, 2, 6.0), (111, 1, 3.0), (111, 2, 9.5), (91, 1, None)]
    assert [r.prompt for r in result.records] == ["single", "multi-turn", "single-ref", "multi-turn-ref", "single"]
    assert result.mean_score == pytest.approx((8 + 6 + 3 + 9.5) / 4)
    assert result.per_category == pytest.approx({"math": 6.25, "writing": 7.0})  # roleplay: nothing rated
    assert result.per_turn == pytest.approx({1: 5.5, 2: 7.75})
    assert result.unparsed == 1

    # what the server actually received
    assert len(chat_server.requests) == 5
    for req in chat_server.requests:
        assert req["path"] == "/v1/chat/completions"
        assert req["auth"] == f"Bearer {KEY}"
        assert req["content_type"] == "application/json"
        body = req["body"]
        assert set(body) == {"model", "messages", "max_tokens", "temperature"}
        assert body["model"] == MODEL and body["max_tokens"] == 321 and body["temperature"] == 0.0
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
    math_turn1 = chat_server.requests[2]["body"]["messages"][1]["content"]
    assert "REF-ONE: 51" in math_turn1 and "REF-TWO" not in math_turn1 and "ANS-111-2" not in math_turn1
    writing_turn2 = chat_server.requests[1]["body"]["messages"]
    conversation = writing_turn2[1]["content"]
    for text in ("Write a haiku about rain.", "Now make it about snow.", "ANS-81-1", "ANS-81-2"):
        assert text in conversation
    assert "second user question" in writing_turn2[0]["content"]

    # records are ready for JSONL
    out = tmp_path / "judgments.jsonl"
    result.write_jsonl(out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[3] == {"question_id": 111, "category": "math", "turn": 2, "score": 9.5,
                        "judgment": "Correct and clear. Rating: [[9.5]]", "prompt": "multi-turn-ref"}
    assert lines[4]["score"] is None
    assert result.summary()["per_turn"] == {"1": 5.5, "2": 7.75}
    json.dumps(result.summary())  # JSON-ready


# --------------------------------------------------------------------------------------------
# Retries and failures
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_status_is_retried(chat_server, status):
    chat_server.script = [(status, b'{"error": {"message": "busy"}}', {}), _ok("Rating: [[7]]")]
    assert _backend(chat_server).complete(MESSAGES, max_tokens=5, temperature=0.0) == "Rating: [[7]]"
    assert len(chat_server.requests) == 2
    assert chat_server.requests[0]["body"] == chat_server.requests[1]["body"]


def test_connection_reset_is_retried(chat_server):
    chat_server.script = ["drop", _ok("fine")]
    assert _backend(chat_server).complete(MESSAGES, max_tokens=5, temperature=0.0) == "fine"
    assert len(chat_server.requests) == 2


def test_timeout_is_retried(chat_server):
    chat_server.script = ["slow", _ok("on time")]
    assert _backend(chat_server, timeout_s=0.3).complete(MESSAGES, max_tokens=5, temperature=0.0) == "on time"
    assert len(chat_server.requests) == 2


def test_backoff_doubles_and_honours_retry_after(chat_server, monkeypatch):
    sleeps = []
    monkeypatch.setattr(chat_backends.time, "sleep", sleeps.append)
    chat_server.script = [(500, b"x", {}), (502, b"x", {}), (429, b"x", {"Retry-After": "2"}), _ok("ok")]
    assert _backend(chat_server, backoff_s=0.5).complete(MESSAGES, max_tokens=5, temperature=0.0) == "ok"
    assert sleeps == [0.5, 1.0, 2.0]


def test_gives_up_after_max_retries(chat_server):
    chat_server.script = [(503, b'{"error": {"message": "overloaded"}}', {})] * 5
    with pytest.raises(JudgeError, match="gave up after 3 attempts.*HTTP 503.*overloaded") as info:
        _backend(chat_server, max_retries=2).complete(MESSAGES, max_tokens=5, temperature=0.0)
    assert len(chat_server.requests) == 3
    assert "\n" not in str(info.value)


def test_401_raises_without_leaking_the_key(chat_server):
    echo = {"error": {"message": f"Incorrect API key provided: {KEY}.\nSee the docs."}}
    chat_server.script = [(401, json.dumps(echo).encode(), {})]
    with pytest.raises(JudgeError) as info:
        _backend(chat_server).complete(MESSAGES, max_tokens=5, temperature=0.0)
    message = str(info.value)
    assert "HTTP 401" in message and "OPENAI_API_KEY" in message and "Incorrect API key" in message
    assert KEY not in message and KEY[-10:] not in message
    assert "\n" not in message
    assert KEY not in repr(_backend(chat_server))
    assert len(chat_server.requests) == 1  # never retried


def test_other_4xx_is_not_retried(chat_server):
    chat_server.script = [(400, b'{"error": {"message": "max_tokens too large"}}', {})]
    with pytest.raises(JudgeError, match="HTTP 400: max_tokens too large"):
        _backend(chat_server).complete(MESSAGES, max_tokens=5, temperature=0.0)
    assert len(chat_server.requests) == 1


@pytest.mark.parametrize("body", [
    b"<html>not json{", b'{"choices": []}', b'{"choices": [{"message": {"content": null}}]}', b'["a list"]',
])
def test_malformed_reply_raises(chat_server, body):
    chat_server.script = [(200, body, {})]
    with pytest.raises(JudgeError, match="choices|content") as info:
        _backend(chat_server).complete(MESSAGES, max_tokens=5, temperature=0.0)
    assert "\n" not in str(info.value)
    assert len(chat_server.requests) == 1


def test_wrong_route_is_a_judge_error(chat_server):
    backend = OpenAICompatibleBackend(chat_server.base_url.removesuffix("/v1"), MODEL, backoff_s=0.01)
    with pytest.raises(JudgeError, match="HTTP 404"):
        backend.complete(MESSAGES, max_tokens=5, temperature=0.0)


def test_missing_key_names_the_variable(monkeypatch, chat_server):
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match="MY_JUDGE_KEY") as info:
        OpenAICompatibleBackend(chat_server.base_url, MODEL, api_key_env="MY_JUDGE_KEY")
    assert "\n" not in str(info.value)
    # a local server without keys: no Authorization header at all
    chat_server.script = [_ok("hello")]
    backend = OpenAICompatibleBackend(chat_server.base_url + "/", MODEL, api_key_env="MY_JUDGE_KEY", require_key=False)
    assert backend.complete(MESSAGES, max_tokens=5, temperature=0.3) == "hello"
    assert chat_server.requests[0]["auth"] is None
    assert chat_server.requests[0]["path"] == "/v1/chat/completions"  # trailing slash handled
    assert chat_server.requests[0]["body"]["temperature"] == 0.3


def test_refused_connection_fails_fast(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = OpenAICompatibleBackend(f"http://127.0.0.1:{port}/v1", MODEL, require_key=False,
                                      api_key_env="UNSET_KEY_FOR_TEST", backoff_s=5.0)
    start = time.perf_counter()
    with pytest.raises(JudgeError, match="cannot connect"):
        backend.complete(MESSAGES, max_tokens=5, temperature=0.0)
    assert time.perf_counter() - start < 2.0  # not retried with a 5 s backoff


class _RecordingHandler(BaseHTTPRequestHandler):
    """Server B: records every request's path and Authorization header (POST or GET), answers a reply."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        body = _ok("from B")[1]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST  # urllib turns a followed 301/302 into a GET


def _serve(handler, **attrs):
    """Start a ThreadingHTTPServer on a free 127.0.0.1 port; returns (server, thread)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    for name, value in attrs.items():
        setattr(server, name, value)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


def _stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_is_refused_and_the_key_never_leaves(monkeypatch, status):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server_b, thread_b = _serve(_RecordingHandler, seen=[])
    target = f"http://127.0.0.1:{server_b.server_address[1]}/v1/chat/completions"

    class Redirector(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.server.seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(status)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server_a, thread_a = _serve(Redirector, seen=[])
    try:
        backend = OpenAICompatibleBackend(f"http://127.0.0.1:{server_a.server_address[1]}/v1", MODEL,
                                          backoff_s=0.01, timeout_s=5)
        with pytest.raises(JudgeError, match=f"HTTP {status} redirect to {target} refused") as info:
            backend.complete(MESSAGES, max_tokens=5, temperature=0.0)
    finally:
        _stop(server_a, thread_a)
        _stop(server_b, thread_b)
    message = str(info.value)
    assert "\n" not in message and KEY not in message
    assert server_a.seen == [("/v1/chat/completions", f"Bearer {KEY}")]  # asked once, never retried
    assert server_b.seen == []  # B never saw a request, with or without the key


class _DripHandler(BaseHTTPRequestHandler):
    """Announces a 40-byte body, then sends one byte every 0.2 s (8 s in all, unless the client leaves)."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests += 1
        self.send_response(200)
        self.send_header("Content-Length", "40")
        self.end_headers()
        try:
            for _ in range(40):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:  # the client gave up and closed the connection
            pass


def test_a_drip_feeding_server_cannot_outlast_the_timeout(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server, thread = _serve(_DripHandler, requests=0)
    backend = OpenAICompatibleBackend(f"http://127.0.0.1:{server.server_address[1]}/v1", MODEL,
                                      require_key=False, api_key_env="UNSET_KEY_FOR_TEST",
                                      timeout_s=1, max_retries=0)
    start = time.perf_counter()
    try:
        with pytest.raises(JudgeError, match="gave up after 1 attempts.*no complete reply within 1 s") as info:
            backend.complete(MESSAGES, max_tokens=5, temperature=0.0)
    finally:
        elapsed = time.perf_counter() - start
        _stop(server, thread)
    assert elapsed < 2.0  # each byte came within the socket timeout: only the deadline stops it
    assert "\n" not in str(info.value) and server.requests == 1


def test_bad_base_url():
    with pytest.raises(JudgeError, match="http://"):
        OpenAICompatibleBackend("localhost:8000/v1", MODEL, require_key=False)


# --------------------------------------------------------------------------------------------
# Local model backend
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tiny_causal_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir), AutoTokenizer.from_pretrained(tiny_causal_lm_dir)


def _naive_greedy(model, tokenizer, messages, n_new):
    """Reference: argmax over full forward passes (no cache), stopping at EOS."""
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")["input_ids"]
    prompt_len = ids.shape[1]
    with torch.no_grad():
        for _ in range(n_new):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            if next_id.item() == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True).strip()


def test_local_backend_matches_naive_greedy(tiny_lm):
    model, tokenizer = tiny_lm
    backend = LocalModelBackend(model, tokenizer, max_new_tokens=6)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    text = backend.complete(messages, max_tokens=100, temperature=0.0)  # capped at 6 new tokens
    assert isinstance(text, str)
    assert text == _naive_greedy(model, tokenizer, messages, 6)
    assert backend.complete(messages, max_tokens=3, temperature=0.0) == _naive_greedy(model, tokenizer, messages, 3)
    assert "<|im_start|>" not in text and "Name a colour" not in text  # only new text, no specials
    assert model.training is False


def test_local_backend_answers_and_judges(tiny_lm):
    model, tokenizer = tiny_lm
    backend = LocalModelBackend(model, tokenizer, max_new_tokens=4)
    questions = [MTBenchQuestion(1, "writing", ["Say hi.", "Say bye."])]
    answers = answer_questions(backend, questions, progress=False)
    assert len(answers) == 1 and len(answers[0]) == 2 and all(isinstance(a, str) for a in answers[0])
    result = judge_answers(backend, questions, answers, progress=False)
    assert len(result.records) == 2
    rated = [r.score for r in result.records if r.score is not None]
    assert result.unparsed == 2 - len(rated)  # random weights: most likely both unparsed
    assert result.mean_score == (sum(rated) / len(rated) if rated else None)


def test_local_backend_uses_the_one_generation_loop(tiny_lm, monkeypatch):
    from balora.evaluation import generate

    model, tokenizer = tiny_lm
    calls = []
    real = generate.generate_texts

    def spy(model, tokenizer, prompts, **kwargs):
        calls.append((prompts, kwargs["sampling"].max_new_tokens))
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(generate, "generate_texts", spy)
    messages = [{"role": "user", "content": "Name a colour."}]
    LocalModelBackend(model, tokenizer, max_new_tokens=6).complete(messages, max_tokens=4)
    assert calls == [([tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)], 4)]


def test_local_backend_needs_chat_template(tiny_lm):
    model, tokenizer = tiny_lm

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="chat template"):
        LocalModelBackend(model, NoTemplate())


# --------------------------------------------------------------------------------------------
# Rating parsing and prompts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Good answer.\nRating: [[8]]", 8.0),
    ("Rating: [[8.5]]", 8.5),
    ("[[ 7 ]]", 7.0),
    ("[[10]]", 10.0),
    ("[[1]]", 1.0),
    ("The format is [[rating]]. Early guess [[4]], final: Rating: [[6]]", 6.0),  # last one wins
    ("Rating: [8]", 8.0),  # "Rating: N" with the number in single brackets
    ("[[9]] and a citation [2]", 9.0),  # double brackets beat single ones
    ("Rating: 8", 8.0),
    ("rating: 7.5/10.", 7.5),
    ("[[7]]", 7.0),
    ("See [1] and [2].", None),  # citations are not a rating
    ("As shown in [3], the answer is fine.", None),
    ("My rating is 4", None),  # not the prompt's format: unparsed, not guessed
    ("Rating: [[7]] as per [2]", 7.0),
    ("[[11]]", None),
    ("[[0]]", None),
    ("[[0.5]]", None),
    ("[[-3]]", None),
    ("Rating: [[12]] (typo) [5]", None),  # an out-of-range verdict is not rescued by a weaker pattern
    ("no number here", None),
    ("", None),
    ("Rating: [[eight]]", None),
    ("Rating: 11", None),
    ("Rating: [[11]] Rating: 5", None),
])
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


def test_prompt_variants_are_chosen_by_category_and_reference():
    math = MTBenchQuestion(1, "math", ["q1", "q2"], ["r1", "r2"])
    assert build_judge_messages(math, ["a1", "a2"], 1)[0] == "single-ref"
    assert build_judge_messages(math, ["a1", "a2"], 2)[0] == "multi-turn-ref"
    only_first_ref = MTBenchQuestion(2, "coding", ["q1", "q2"], ["r1"])
    assert build_judge_messages(only_first_ref, ["a1", "a2"], 1)[0] == "single-ref"
    assert build_judge_messages(only_first_ref, ["a1", "a2"], 2)[0] == "multi-turn"
    no_ref = MTBenchQuestion(3, "reasoning", ["q1"], None)
    assert build_judge_messages(no_ref, ["a1"], 1)[0] == "single"
    writing_with_ref = MTBenchQuestion(4, "writing", ["q1"], ["r1"])  # references only for math/reasoning/coding
    assert build_judge_messages(writing_with_ref, ["a1"], 1)[0] == "single"
    with pytest.raises(ValueError, match="turn 2"):
        build_judge_messages(no_ref, ["a1"], 2)


def test_prompts_ask_for_the_rating_format():
    for prompt in JUDGE_PROMPTS.values():
        instructions = prompt.system + prompt.template
        assert '"Rating: [[5]]"' in instructions and "1 to 10" in instructions
    name, messages = build_judge_messages(MTBenchQuestion(5, "math", ["2+2?"], ["4"]), ["5"], 1)
    user = messages[1]["content"]
    assert user.index("2+2?") < user.index("[The Start of Reference Answer]\n4\n") < user.index(
        "[The Start of Assistant's Answer]\n5\n")


# --------------------------------------------------------------------------------------------
# Loading questions
# --------------------------------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def test_load_questions_from_fastchat_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "question.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["t1", "t2"]},
        {"question_id": 111, "category": "math", "turns": ["m1", "m2"], "reference": ["r1", "r2"]},
        {"question_id": 130, "category": "coding", "turns": ["c1"], "reference": []},
    ])
    questions = load_mt_bench_questions(path)
    assert questions == [
        MTBenchQuestion(81, "writing", ["t1", "t2"], None),
        MTBenchQuestion(111, "math", ["m1", "m2"], ["r1", "r2"]),
        MTBenchQuestion(130, "coding", ["c1"], None),
    ]
    assert [q.question_id for q in load_mt_bench_questions(str(path), max_questions=2)] == [81, 111]


@pytest.mark.parametrize("rows, match", [
    ([{"question_id": 1, "category": "x"}], "missing field.*turns"),
    ([{"question_id": 1, "category": "x", "turns": ["a", "b", "c"]}], "1 or 2"),
    ([{"question_id": 1, "category": "x", "turns": []}], "1 or 2"),
    ([{"question_id": 1, "category": "x", "turns": "just a string"}], "1 or 2"),
    ([{"question_id": 1, "category": "x", "turns": ["a"], "reference": "r"}], "reference"),
    ([], "no rows"),
])
def test_load_questions_rejects_bad_rows(tmp_path, rows, match):
    path = _write_jsonl(tmp_path / "q.jsonl", rows)
    with pytest.raises(ValueError, match=match):
        load_mt_bench_questions(path)


def test_load_questions_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="MT-Bench question file not found"):
        load_mt_bench_questions(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "x", "turns": ["a"]}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_mt_bench_questions(bad)
    with pytest.raises(ValueError, match="max_questions"):
        load_mt_bench_questions(bad, max_questions=0)


def test_load_questions_from_hub(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, *args, **kwargs):
        calls.append((name, args, kwargs))
        return datasets.Dataset.from_list([
            {"prompt": ["Write a poem.", "Shorter."], "category": "writing", "reference": [], "prompt_id": 58421},
            {"prompt": ["1+1?", "2+2?"], "category": "math", "reference": ["2", "4"], "prompt_id": 1234},
            {"prompt": ["Hi"], "category": "roleplay", "reference": [], "prompt_id": 99},
        ])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    questions = load_mt_bench_questions(max_questions=2)
    assert calls == [("HuggingFaceH4/mt_bench_prompts", (), {"split": "train"})]
    assert questions == [
        MTBenchQuestion(58421, "writing", ["Write a poem.", "Shorter."], None),
        MTBenchQuestion(1234, "math", ["1+1?", "2+2?"], ["2", "4"]),
    ]


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub\nlong details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HubLoadError, match="mt_bench_prompts.*Couldn't reach the hub.*question.jsonl") as info:
        load_mt_bench_questions()
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Answering and input checks
# --------------------------------------------------------------------------------------------


def test_answer_questions_runs_a_conversation():
    seen = []

    def answer_fn(messages):
        seen.append(messages)
        return f"reply-{len(messages)}"

    questions = [MTBenchQuestion(1, "writing", ["first", "second"]), MTBenchQuestion(2, "stem", ["only"])]
    assert answer_questions(answer_fn, questions, progress=False) == [["reply-1", "reply-3"], ["reply-1"]]
    assert seen[1] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "reply-1"},
                       {"role": "user", "content": "second"}]
    assert seen[2] == [{"role": "user", "content": "only"}]
    # each call gets its own copy: mutating it cannot corrupt the conversation
    assert len(seen[0]) == 1


def test_answer_fn_must_return_text():
    with pytest.raises(ValueError, match="must return a string"):
        answer_questions(lambda messages: None, [MTBenchQuestion(1, "x", ["q"])], progress=False)


def test_judge_answers_checks_shapes():
    class NeverCalled:
        def complete(self, messages, *, max_tokens, temperature):
            raise AssertionError("should not be called")

    questions = _fixture_questions()
    with pytest.raises(ValueError, match="3 questions"):
        judge_answers(NeverCalled(), questions, _fixture_answers()[:2], progress=False)
    bad = _fixture_answers()
    bad[1] = bad[1][:1]
    with pytest.raises(ValueError, match="question 111: 1 answer"):
        judge_answers(NeverCalled(), questions, bad, progress=False)


def test_empty_run_has_no_mean():
    class Unreadable:
        def complete(self, messages, *, max_tokens, temperature):
            return "no verdict"

    result = judge_answers(Unreadable(), [MTBenchQuestion(1, "x", ["q"])], [["a"]], progress=False)
    assert result.mean_score is None and result.per_category == {} and result.per_turn == {}
    assert result.unparsed == 1
    assert isinstance(Unreadable(), ChatBackend)
