"""ECG: pairs from templates and from a chat endpoint (a local server the test runs)."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ear_dist.data.ecg import ECGError, LLMPairGenerator, LLMSettings, extract_json, template_pairs, validate_pair

SECRET = "sk-test-do-not-leak-0123456789"


# --------------------------------------------------------------------------- templates


def test_template_pairs_fill_every_combination():
    pairs = template_pairs(
        "church", ["a {concept} in {place}", "a {style} photo of a {concept}"], ["barn", "mill"],
        slots={"place": ["snow", "fog"], "style": ["sepia"]},
    )
    assert len(pairs) == 2 * 2 + 1 * 2
    first = pairs[0]
    assert (first.target, first.surrogate, first.surrogate_concept) == ("a church in snow", "a barn in snow", "barn")
    assert {p.target for p in pairs} == {"a church in snow", "a church in fog", "a sepia photo of a church"}
    assert all("church" not in p.surrogate and p.source == "ecg-template" for p in pairs)


def test_template_pairs_sample_a_seeded_subset_without_repeats():
    kw = dict(concept="church", templates=["a {concept} at {time} in {place}"], surrogates=["barn", "mill", "tower"],
              slots={"time": ["dawn", "noon", "dusk"], "place": ["snow", "fog", "rain"]})
    a = template_pairs(num_pairs=10, seed=1, **kw)
    assert len(a) == 10 and len({(p.target, p.surrogate) for p in a}) == 10
    assert [p.id for p in a] == [p.id for p in template_pairs(num_pairs=10, seed=1, **kw)]
    assert [p.id for p in a] != [p.id for p in template_pairs(num_pairs=10, seed=2, **kw)]


def test_template_errors_name_the_template_and_slot():
    with pytest.raises(ECGError, match=r"template 'a \{thing\}': has no \{concept\} slot"):
        template_pairs("church", ["a {thing}"], ["barn"], slots={"thing": ["x"]})
    with pytest.raises(ECGError, match=r"slot \{place\} has no values"):
        template_pairs("church", ["a {concept} in {place}"], ["barn"])


# --------------------------------------------------------------------------- the local endpoint


class FakeChatServer:
    """An OpenAI-style /chat/completions endpoint scripted with (status, body) replies."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                server.requests.append({
                    "path": self.path, "auth": self.headers.get("Authorization"),
                    "body": json.loads(self.rfile.read(length)),
                })
                status, content, headers = server.script.pop(0) if server.script else (200, reply_pairs(0, 1), {})
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}) \
                    if status == 200 else json.dumps({"error": content})
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def reply_pairs(start, n, concept="church"):
    return json.dumps({"pairs": [
        {"target": f"a {concept} on hill {i}", "surrogate": f"a barn on hill {i}", "surrogate_concept": "barn"}
        for i in range(start, start + n)
    ]})


def ok(content):
    return (200, content, {})


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("EAR_TEST_KEY", SECRET)
    return "EAR_TEST_KEY"


def make_generator(url, api_key_env, tmp_path, sleeps, **kw):
    settings = LLMSettings(base_url=url, models=kw.pop("models", ["model-a"]), api_key_env=api_key_env,
                           pairs_per_request=3, cache_dir=str(tmp_path / "cache"), requests_per_minute=0, **kw)
    return LLMPairGenerator(settings, sleep=sleeps.append)


def test_llm_pairs_are_parsed_validated_and_deduplicated(tmp_path, api_key):
    bad = json.dumps({"pairs": [
        {"target": "a barn at noon", "surrogate": "a mill at noon"},           # no concept in target
        {"target": "a church at noon", "surrogate": "a church hall at noon"},  # surrogate keeps it
        {"target": "a church", "surrogate": ""},                               # empty surrogate
    ]})
    script = [ok(reply_pairs(0, 3)), ok("```json\n" + reply_pairs(2, 3) + "\n```"), ok(bad), ok(reply_pairs(5, 3))]
    with FakeChatServer(script) as server:
        gen = make_generator(server.url, api_key, tmp_path, [], models=["model-a", "model-b"])
        pairs = gen.generate("church", num_pairs=7)
    assert [p.target for p in pairs] == [f"a church on hill {i}" for i in range(7)]
    assert gen.stats.duplicates == 1  # hill 2 came twice
    assert gen.stats.rejected == {"target does not mention the concept": 1,
                                  "surrogate still mentions the concept": 1,
                                  "field 'surrogate' missing or empty": 1}
    # models alternate; the key goes in the header; the prompt asks for N pairs as JSON
    assert [r["body"]["model"] for r in server.requests] == ["model-a", "model-b", "model-a", "model-b"]
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == f"Bearer {SECRET}" for r in server.requests)
    prompt = server.requests[0]["body"]["messages"][1]["content"]
    assert "Write 3 new prompt pairs" in prompt and '"pairs"' in prompt and "church" in prompt
    assert {p.source for p in pairs} == {"ecg-llm:model-a", "ecg-llm:model-b"}


def test_429_then_success_backs_off_and_honours_retry_after(tmp_path, api_key):
    script = [(429, "slow down", {"Retry-After": "3"}), (503, "busy", {}), ok(reply_pairs(0, 3))]
    sleeps = []
    with FakeChatServer(script) as server:
        gen = make_generator(server.url, api_key, tmp_path, sleeps, backoff_s=0.5)
        pairs = gen.generate("church", num_pairs=3)
    assert len(pairs) == 3 and len(server.requests) == 3
    assert gen.stats.retries == 2
    assert sleeps == [3.0, 1.0]  # Retry-After beats 0.5 s; then 0.5 * 2


def test_gives_up_after_max_retries_and_fails_fast_on_4xx(tmp_path, api_key, caplog):
    with FakeChatServer([(500, "down", {})] * 3) as server:
        gen = make_generator(server.url, api_key, tmp_path, [], max_retries=2)
        with caplog.at_level(logging.DEBUG), pytest.raises(ECGError, match=r"HTTP 500 .* \(gave up after 3 attempts\)") as err:
            gen.generate("church", num_pairs=3)
    assert SECRET not in str(err.value) and SECRET not in caplog.text
    with FakeChatServer([(401, "bad key", {})]) as server:
        gen = make_generator(server.url, api_key, tmp_path, [])
        with pytest.raises(ECGError, match="HTTP 401") as err:
            gen.generate("church", num_pairs=3)
        assert len(server.requests) == 1 and SECRET not in str(err.value)


def test_malformed_json_reply_is_counted_and_not_cached(tmp_path, api_key):
    script = [ok("Sure! Here are your pairs: {not json"), ok(json.dumps({"nothing": 1})), ok(reply_pairs(0, 3))]
    with FakeChatServer(script) as server:
        gen = make_generator(server.url, api_key, tmp_path, [])
        pairs = gen.generate("church", num_pairs=3)
    assert len(pairs) == 3 and gen.stats.invalid_replies == 2
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1  # only the usable reply


def test_rerun_is_served_from_the_cache_with_zero_requests(tmp_path, api_key):
    script = [ok(reply_pairs(0, 3)), ok(reply_pairs(3, 3))]
    with FakeChatServer(script) as server:
        first = make_generator(server.url, api_key, tmp_path, []).generate("church", num_pairs=6)
        assert len(server.requests) == 2
        again = make_generator(server.url, api_key, tmp_path, [])
        second = again.generate("church", num_pairs=6)
        assert len(server.requests) == 2  # nothing new reached the server
    assert [p.to_dict() for p in second] == [p.to_dict() for p in first]
    assert again.stats.requests == 0 and again.stats.cache_hits == 2
    for entry in (tmp_path / "cache").glob("*.json"):
        assert SECRET not in entry.read_text()


def test_rate_limit_spaces_requests():
    now = [0.0]
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        now[0] += s

    with FakeChatServer([ok(reply_pairs(i * 3, 3)) for i in range(3)]) as server:
        settings = LLMSettings(base_url=server.url, models=["m"], pairs_per_request=3, requests_per_minute=30)
        gen = LLMPairGenerator(settings, sleep=sleep, clock=lambda: now[0])
        gen.generate("church", num_pairs=9)
    assert sleeps == [2.0, 2.0]  # 30 per minute: one every 2 s


def test_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ECGError, match="environment variable NO_SUCH_KEY_VAR"):
        LLMPairGenerator(LLMSettings(base_url="http://127.0.0.1:9", models=["m"], api_key_env="NO_SUCH_KEY_VAR"))


def test_extract_json_and_validate_pair():
    assert extract_json('Here: {"pairs": []} done') == {"pairs": []}
    clean, reason = validate_pair({"target": " A  Church ", "surrogate": "A barn"}, "church")
    assert reason == "" and clean["target"] == "A Church"
    assert validate_pair({"target": "churches", "surrogate": "barns"}, "church")[1] == "target does not mention the concept"
    assert validate_pair({"target": "x", "surrogate": "y"}, "church", require_concept_word=False)[1] == ""
