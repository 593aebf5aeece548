"""Teachers: the parseable head, determinism, the cache, a stub chat-completions server, and failures."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from gradsense.errors import GradsenseError
from gradsense.teacher import (
    NO_TOKEN,
    HFTeacher,
    OpenAICompatibleTeacher,
    TemplateTeacher,
    as_record,
    label_head,
    label_records,
    load_cache,
    make_teacher,
    parse_label,
    prompt_messages,
    record_key,
)


def record(**changes) -> dict:
    """A shift record as the oracle stage builds it."""
    base = {
        "id": "cf-1",
        "domain": "History",
        "prompt": "The Battle of Hastings took place in the year",
        "target": "1066",
        "source": "1067",
        "belief": "1067",
        "logp_target_old": -9.0,
        "logp_target_new": -6.5,
        "to_token": "1",
        "from_token": "Sept",
        "up_tokens": ["1", "the"],
        "down_tokens": ["Sept", "October"],
        "dlogp_target": 2.5,
        "dlogp_source": -1.0,
        "kl": 0.3,
    }
    return as_record(base | changes)


RECORDS = [
    record(),
    record(id="x", belief="", target="bone marrow", source="liver"),  # no answer now: `from` is the source
    record(id="y", belief="the year", target="New|York\n", dlogp_target=0.01),  # barely moved: unclear
    record(id="z", domain="geo graphy", belief="Paris!", target="paris", source="Rome", dlogp_target=-3.0),
]


UNCLEAR_SENTENCE = "The shift is unclear: this {} answer barely moves, so no correction can be read from it."


def test_template_labels_by_hand():
    expected = [
        "domain: history | from: 1067 | to: 1066\n"
        "The update pushes this history answer away from 1067 and towards 1066.",
        "domain: history | from: liver | to: bone marrow\n"
        "The update pushes this history answer away from liver and towards bone marrow.",
        "domain: history | from: the year | to: unclear\n" + UNCLEAR_SENTENCE.format("history"),
        # the model already says the target: `from` is the source; the target went down: unclear
        "domain: geo graphy | from: Rome | to: unclear\n" + UNCLEAR_SENTENCE.format("geo graphy"),
    ]
    assert [TemplateTeacher().label(r) for r in RECORDS] == expected


def test_head_fields_parse_back_by_hand():
    heads = [parse_label(TemplateTeacher().label(r)) for r in RECORDS]
    assert [(h["domain"], h["from"], h["to"]) for h in heads] == [
        ("history", "1067", "1066"),
        ("history", "liver", "bone marrow"),
        ("history", "the year", "unclear"),
        ("geo graphy", "Rome", "unclear"),
    ]


def test_a_label_for_a_multi_token_target_holds_the_whole_target():
    rec = record(target="the Treaty of Westphalia", belief="Versailles", dlogp_target=1.2)
    assert parse_label(TemplateTeacher().label(rec))["to"] == "the Treaty of Westphalia"
    assert parse_label(TemplateTeacher(min_gain=2.0).label(rec))["to"] == "unclear"  # the oracle is the judge


def test_the_whole_target_step_judges_clarity_when_the_oracle_took_it():
    """A year whose last-position step barely moves it is clear when the step at every target-predicting position
    (dlogp_target_each) raises it; that gain stays in the record (cache key), and NaN falls back to dlogp_target."""
    year = {k: v for k, v in record(dlogp_target=0.1).items()}
    assert parse_label(TemplateTeacher().label(year))["to"] == "unclear"
    each = as_record(year | {"dlogp_target_each": 2.34567})
    assert each["dlogp_target_each"] == 2.346 and record_key("t", each) != record_key("t", year)
    assert parse_label(TemplateTeacher().label(each))["to"] == "1066"
    assert parse_label(TemplateTeacher().label(as_record(year | {"dlogp_target_each": 0.2})))["to"] == "unclear"
    assert "dlogp_target_each" not in as_record(year | {"dlogp_target_each": float("nan")})


def test_language_model_teachers_see_the_facts_the_template_teacher_reads():
    with pytest.raises(GradsenseError, match="lacks"):
        as_record({"id": 1, "domain": "d", "target": "1066"})
    prompt = "\n".join(m["content"] for m in prompt_messages(record()))
    assert "The model answers now: 1067" in prompt and "Answer pushed towards: 1066" in prompt
    assert "-9.00 before, -6.50 after" in prompt and "Most promoted: 1; most demoted: Sept" in prompt


@pytest.mark.parametrize(
    "text, expected",
    [
        ("domain: history | from: 1067 | to: 1066\nA sentence.", ("history", "1067", "1066")),
        ("DOMAIN:Biology|FROM: liver|TO: heart", ("biology", "liver", "heart")),
        (
            "Sure. domain: sport | from: soccer | to: tennis. The model now prefers tennis.",
            ("sport", "soccer", "tennis"),
        ),
        ("domain: music | to: jazz", ("music", None, "jazz")),
        ("domain: geography", ("geography", None, None)),
        ("no head at all", (None, None, None)),
        ("", (None, None, None)),
        ("domain: geography | from: , | to: .", ("geography", ",", ".")),
        ("domain: geography | from: Paris | to: New York\nThe capital moves.", ("geography", "Paris", "New York")),
        ("domain: history | from: Lee | to: Ulysses S. Grant", ("history", "Lee", "Ulysses S. Grant")),  # an initial
        ("domain: music | from: a | to: J. K. Rowling. Then more.", ("music", "a", "J. K. Rowling")),
    ],
)
def test_parse_label_is_robust(text, expected):
    parsed = parse_label(text)
    assert (parsed["domain"], parsed["from"], parsed["to"]) == expected


def test_label_head_cleans_tokens():
    assert label_head("A B", "x|y", "\n") == f"domain: a b | from: x¦y | to: {NO_TOKEN}"


class Counting:
    """A teacher that counts its calls and can be told to fail on an item."""

    def __init__(self, fail_on=None, identity="counting"):
        self.calls, self.fail_on, self.identity = 0, fail_on, identity

    def label(self, r):
        if r["id"] == self.fail_on:
            raise GradsenseError("teacher endpoint http://127.0.0.1:1 failed: URLError")
        self.calls += 1
        return TemplateTeacher().label(r)


def test_cache_reuses_labels(tmp_path):
    cache = tmp_path / "labels.jsonl"
    first = Counting()
    labels = label_records(first, RECORDS, cache, progress=False)
    again = Counting()
    assert label_records(again, RECORDS, cache, progress=False) == labels
    assert first.calls == len(RECORDS) and again.calls == 0
    other = Counting(identity="other")
    label_records(other, RECORDS[:1], cache, progress=False)
    assert other.calls == 1 and len(load_cache(cache)) == len(RECORDS) + 1
    assert record_key("a", RECORDS[0]) != record_key("a", RECORDS[1]) != record_key("b", RECORDS[1])


def test_failing_teacher_keeps_cached_labels(tmp_path):
    cache = tmp_path / "labels.jsonl"
    label_records(Counting(), RECORDS[:1], cache, progress=False)
    with pytest.raises(GradsenseError, match="item y.*cached labels kept"):
        label_records(Counting(fail_on="y"), RECORDS, cache, progress=False)
    kept = load_cache(cache)
    assert [e["id"] for e in kept.values()] == ["cf-1", "x"]  # the old one and the one labelled before the failure
    cache.write_text(cache.read_text() + '{"torn": ')  # a torn line is skipped, not fatal
    assert len(load_cache(cache)) == 2


def test_label_without_head_is_refused(tmp_path):
    class Headless:
        identity = "headless"

        def label(self, r):
            return "just words"

    with pytest.raises(GradsenseError, match="without head"):
        label_records(Headless(), RECORDS[:1], tmp_path / "c.jsonl", progress=False)


@pytest.fixture
def stub_server():
    """A local chat-completions stub on 127.0.0.1; records requests; path /fail answers 500."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            if self.path.startswith("/fail"):
                self.send_response(500)
                self.end_headers()
                return
            reply = "domain: wrong | from: a | to: b\nThe model now leans to 1 instead of Sept. Extra sentence."
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()
    server.server_close()


def test_openai_teacher_against_stub(stub_server, monkeypatch, tmp_path):
    url, seen = stub_server
    monkeypatch.setenv("STUB_KEY", "secret")
    teacher = OpenAICompatibleTeacher(url + "/v1", "stub-model", key_env="STUB_KEY", timeout=5)
    text = teacher.label(RECORDS[0])
    assert text == "domain: history | from: 1067 | to: 1066\nThe model now leans to 1 instead of Sept."
    assert seen[0]["path"] == "/v1/chat/completions" and seen[0]["auth"] == "Bearer secret"
    assert seen[0]["body"]["model"] == "stub-model" and "Answer pushed towards: 1066" in json.dumps(seen[0]["body"])
    labels = label_records(teacher, RECORDS[:2], tmp_path / "c.jsonl", progress=False)
    assert all(parse_label(t)["domain"] == "history" for t in labels)


def test_failing_endpoint_is_a_clear_error(stub_server, tmp_path):
    url, _ = stub_server
    cache = tmp_path / "c.jsonl"
    label_records(TemplateTeacher(), RECORDS, cache, progress=False)
    with pytest.raises(GradsenseError, match=r"item cf-1: teacher endpoint .*/fail failed"):
        label_records(OpenAICompatibleTeacher(url + "/fail", "m", timeout=5), RECORDS, cache, progress=False)
    assert len(load_cache(cache)) == len(RECORDS)
    with pytest.raises(GradsenseError, match="failed"):
        OpenAICompatibleTeacher("http://127.0.0.1:9", "m", timeout=2).label(RECORDS[0])


def test_openai_teacher_needs_url_and_model(monkeypatch):
    monkeypatch.delenv("GRADSENSE_TEACHER_URL", raising=False)
    monkeypatch.delenv("GRADSENSE_TEACHER_MODEL", raising=False)
    with pytest.raises(GradsenseError, match="URL"):
        OpenAICompatibleTeacher()
    with pytest.raises(GradsenseError, match="unknown teacher"):
        make_teacher("oracle-of-delphi")


def test_hf_teacher_enforces_head(tiny):
    model, tok = tiny
    teacher = HFTeacher("tiny", model=model, tokenizer=tok, max_new_tokens=6)
    for r in RECORDS[:2]:
        text = teacher.label(r)
        assert text.splitlines()[0] == TemplateTeacher().label(r).splitlines()[0]
        assert parse_label(text)["domain"] == "history" and len(text.splitlines()) == 2


@pytest.mark.integration
def test_hf_teacher_smol_writes_a_sentence(smol):
    model, tok = smol
    text = HFTeacher("smol", model=model, tokenizer=tok, max_new_tokens=40).label(RECORDS[0])
    head, sentence = text.split("\n")
    assert parse_label(head) == {"domain": "history", "from": "1067", "to": "1066"}
    assert len(sentence.split()) >= 3
