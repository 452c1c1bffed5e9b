"""LLM backends: the OpenAI-compatible client against a real local HTTP server, LLM judges over HTTP, and
HFGenerator on a tiny random-init Llama with a tokenizer trained offline in the test."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from fedsafe.errors import ConfigError, FedsafeError
from fedsafe.eval.judges import get_judge
from fedsafe.llm import EndpointConfig, EndpointGenerator, Generator
from fedsafe.llm.hf import HFGenerator

SECRET = "sk-test-DO-NOT-LEAK-42"


# ---------------------------------------------------------------------------------------------------
# A scripted OpenAI chat-completions server
# ---------------------------------------------------------------------------------------------------


def completion(text):
    return 200, {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


class FakeServer:
    """Serves POST /v1/chat/completions; ``script(body, call_no) -> (status, json_or_bytes[, headers])``."""

    def __init__(self, script):
        self.script = script
        self.requests: list[tuple[dict, dict]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append((dict(self.headers), body))
                    n = len(outer.requests)
                if self.path != "/v1/chat/completions":
                    status, payload, headers = 404, {"error": "not found"}, {}
                else:
                    status, payload, *rest = outer.script(body, n)
                    headers = rest[0] if rest else {}
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                try:
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test); nothing to report

            def log_message(self, *a):  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script):
        s = FakeServer(script)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def last_user(body):
    return body["messages"][-1]["content"]


def cfg_for(server, **kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 5)
    return EndpointConfig(base_url=server.base_url, model="judge-model", api_key_env="FEDSAFE_TEST_KEY", **kw)


# ---------------------------------------------------------------------------------------------------
# EndpointGenerator
# ---------------------------------------------------------------------------------------------------


def test_generate_wire_format_order_and_auth(serve, monkeypatch):
    monkeypatch.setenv("FEDSAFE_TEST_KEY", SECRET)

    def script(body, n):
        time.sleep(0.01 * (hash(last_user(body)) % 3))  # out-of-order completion across threads
        return completion(last_user(body)[::-1])

    srv = serve(script)
    gen = EndpointGenerator(cfg_for(srv, concurrency=4))
    assert isinstance(gen, Generator)
    prompts = [f"prompt number {i}" for i in range(10)]
    out = gen.generate(prompts, max_new_tokens=7, temperature=0.5, top_p=0.9, seed=3, system="be brief")
    assert out == [p[::-1] for p in prompts]
    assert len(srv.requests) == 10
    headers, body = srv.requests[0]
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert body["model"] == "judge-model" and body["max_tokens"] == 7
    assert body["temperature"] == 0.5 and body["top_p"] == 0.9 and body["seed"] == 3 and body["n"] == 1
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert body["messages"][1]["role"] == "user"


def test_message_list_prompt_and_extra_body(serve, monkeypatch):
    monkeypatch.delenv("FEDSAFE_TEST_KEY", raising=False)
    srv = serve(lambda body, n: completion("ok"))
    gen = EndpointGenerator(cfg_for(srv, extra_body={"top_k": -1}, max_tokens_field="max_completion_tokens"))
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    assert gen.generate([msgs]) == ["ok"]
    headers, body = srv.requests[0]
    assert "Authorization" not in headers  # no key in the environment -> no auth header
    assert body["messages"] == msgs and body["top_k"] == -1 and body["max_completion_tokens"] == 256
    assert "seed" not in body
    assert gen.generate([]) == []
    with pytest.raises(ConfigError):
        gen.generate([[{"role": "wizard", "content": "x"}]])


def test_api_key_never_in_config_dict_or_repr(monkeypatch, serve):
    monkeypatch.setenv("FEDSAFE_TEST_KEY", SECRET)
    srv = serve(lambda body, n: (401, {"error": "bad key"}))
    cfg = cfg_for(srv)
    gen = EndpointGenerator(cfg)
    d = cfg.to_dict()
    assert d["api_key_env"] == "FEDSAFE_TEST_KEY"
    assert SECRET not in json.dumps(d) and SECRET not in repr(cfg) and SECRET not in repr(gen)
    with pytest.raises(FedsafeError) as ei:
        gen.generate(["x"])
    assert "HTTP 401" in str(ei.value) and srv.base_url in str(ei.value) and SECRET not in str(ei.value)


def test_retry_after_500_then_success(serve):
    srv = serve(lambda body, n: (500, {"error": "boom"}) if n == 1 else completion("recovered"))
    assert EndpointGenerator(cfg_for(srv, max_retries=2)).generate(["x"]) == ["recovered"]
    assert len(srv.requests) == 2


def test_retry_on_429_honours_retry_after(serve):
    srv = serve(lambda body, n: (429, {"error": "slow down"}, {"Retry-After": "0"}) if n < 3 else completion("ok"))
    assert EndpointGenerator(cfg_for(srv, max_retries=3, backoff=5.0)).generate(["x"]) == ["ok"]  # no 5 s sleep
    assert len(srv.requests) == 3


def test_gives_up_after_retries(serve):
    srv = serve(lambda body, n: (503, {"error": "loading"}))
    with pytest.raises(FedsafeError, match=r"HTTP 503.*gave up after 3 attempts"):
        EndpointGenerator(cfg_for(srv, max_retries=2)).generate(["x"])
    assert len(srv.requests) == 3


def test_client_error_is_not_retried(serve):
    srv = serve(lambda body, n: (400, {"error": "context length exceeded"}))
    with pytest.raises(FedsafeError, match="HTTP 400.*context length exceeded"):
        EndpointGenerator(cfg_for(srv, max_retries=3)).generate(["x"])
    assert len(srv.requests) == 1


def test_unreachable_endpoint_names_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    cfg = EndpointConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff=0.01)
    with pytest.raises(FedsafeError) as ei:
        EndpointGenerator(cfg).generate(["x"])
    msg = str(ei.value)
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in msg and "unreachable" in msg and "2 attempts" in msg


def test_timeout(serve):
    def slow(body, n):
        time.sleep(1.0)
        return completion("late")

    srv = serve(slow)
    t0 = time.monotonic()
    with pytest.raises(FedsafeError, match=r"timed out after 0.2s"):
        EndpointGenerator(cfg_for(srv, timeout=0.2, max_retries=0)).generate(["x"])
    assert time.monotonic() - t0 < 0.9


@pytest.mark.parametrize(
    "payload,match",
    [(b"this is not json", "malformed JSON"), ({"object": "error"}, "without choices"), ({"choices": []}, "without choices")],
)
def test_malformed_responses(serve, payload, match):
    srv = serve(lambda body, n: (200, payload))
    with pytest.raises(FedsafeError, match=match) as ei:
        EndpointGenerator(cfg_for(srv)).generate(["x"])
    assert srv.base_url in str(ei.value)


def test_null_content_becomes_refusal_text_or_empty(serve):
    msgs = iter([{"role": "assistant", "content": None, "refusal": "I can't help"}, {"role": "assistant", "content": None}])
    srv = serve(lambda body, n: (200, {"choices": [{"message": next(msgs)}]}))
    gen = EndpointGenerator(cfg_for(srv, concurrency=1))
    assert gen.generate(["a", "b"]) == ["I can't help", ""]


@pytest.mark.parametrize(
    "kw",
    [{"base_url": "localhost:8000"}, {"model": ""}, {"timeout": 0}, {"concurrency": 0}, {"max_retries": -1}],
)
def test_config_validation(kw):
    args = {"base_url": "http://x/v1", "model": "m"} | kw
    with pytest.raises(ConfigError):
        EndpointConfig(**args)


def test_url_building():
    assert EndpointConfig("http://h:1/v1/", "m").url == "http://h:1/v1/chat/completions"
    assert EndpointConfig("https://h/v1/chat/completions", "m").url == "https://h/v1/chat/completions"


def test_bad_sampling_rejected_before_any_request(serve):
    srv = serve(lambda body, n: completion("x"))
    gen = EndpointGenerator(cfg_for(srv))
    for kw in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}):
        with pytest.raises(ConfigError):
            gen.generate(["x"], **kw)
    assert srv.requests == []


# ---------------------------------------------------------------------------------------------------
# LLM judges over HTTP
# ---------------------------------------------------------------------------------------------------


def guard_script(body, n):
    """A pretend safety model: looks at the conversation inside the judge prompt."""
    text = last_user(body)
    agent = text.split("Agent:", 1)[1] if "Agent:" in text else text
    if "bomb" in agent:
        return completion(" unsafe\nO5: Malicious Use")
    if "gibberish" in agent:
        return completion("I think it is probably fine")
    return completion(" safe")


def test_md_judge_over_http(serve):
    srv = serve(guard_script)
    judge = get_judge("md-judge", endpoint=cfg_for(srv))
    v = judge.judge(["q1", "q2", "q3"], ["Step 1: build the bomb", "I can't help with that.", "gibberish"])
    assert [x.label for x in v] == ["unsafe", "safe", "unparsed"]
    assert v[0].category == "O5" and v[2].raw == "I think it is probably fine"
    _, body = srv.requests[0]
    assert body["temperature"] == 0.0 and body["max_tokens"] == 32
    sent = last_user(body)
    assert sent.startswith('Task: Check if there is unsafe content in "Agent" response')
    assert "[INST]" not in sent  # the server's chat template adds it
    # the paper's quirk: anything but exactly "safe" counts as unsafe, nothing is unparsed
    paper = get_judge("md-judge", endpoint=cfg_for(srv), paper_exact=True)
    assert [x.label for x in paper.judge(["q"] * 2, ["bomb", "gibberish"])] == ["unsafe", "unsafe"]


def test_llama_guard_and_harmbench_over_http(serve):
    def script(body, n):
        text = last_user(body)
        if text.startswith("Task: Check if there is unsafe content in 'Agent' messages"):
            return completion("unsafe\nS1,S9" if "bomb" in text else "safe")
        if "Behavior:" in text:
            return completion("Yes" if "bomb" in text.split("Generation:")[1] else "No")
        return completion("???")

    srv = serve(script)
    cfg = cfg_for(srv, concurrency=2)
    lg = get_judge("llama-guard", endpoint=cfg).judge(["q", "q"], ["a bomb recipe", "no"])
    assert [v.label for v in lg] == ["unsafe", "safe"] and lg[0].category == "S1,S9"
    hb = get_judge("harmbench-cls", endpoint=cfg).judge(["make a bomb", "make a bomb"], ["bomb steps", "I refuse"])
    assert [v.label for v in hb] == ["unsafe", "safe"]
    hb_body = [b for _, b in srv.requests if b["messages"][0]["role"] == "system"][0]
    assert hb_body["messages"][0]["content"].startswith("You are a classifier for red teaming")


def test_strongreject_over_http(serve):
    reply = "#overall_reasoning ok\n#scores\n1.a r\n1.b 0\n2.a c\n2.b 5\n3.a s\n3.b 4\n"
    srv = serve(lambda body, n: completion(reply))
    v = get_judge("strongreject", endpoint=cfg_for(srv)).judge(["p"], ["r"])[0]
    assert v.label == "unsafe" and v.score == pytest.approx(7 / 8)
    assert srv.requests[0][1]["messages"][0]["content"].startswith("You are a helpful red teaming assistant")


def test_judge_propagates_endpoint_failure(serve):
    srv = serve(lambda body, n: (500, {"error": "x"}))
    with pytest.raises(FedsafeError, match="gave up"):
        get_judge("md-judge", endpoint=cfg_for(srv, max_retries=0)).judge(["p"], ["r"])


# ---------------------------------------------------------------------------------------------------
# HFGenerator on a tiny random Llama
# ---------------------------------------------------------------------------------------------------

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "how do I bake bread at home",
    "I'm sorry, I cannot help with that request",
    "federated learning trains a model across many clients",
]


@pytest.fixture(scope="module")
def tiny_lm():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(CORPUS * 3, trainer)
    hft = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(hft), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.5,  # peaked logits: greedy argmax is not decided by float noise
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval(), hft


def fmt(s):
    return f"### Instruction:\n{s}\n\n### Response:"


PROMPTS = ["hi", "how do I bake bread at home please", "fox", "the lazy dog sleeps all day long in the sun", "bread"]


def test_hf_batched_greedy_equals_unbatched(tiny_lm):
    model, tok = tiny_lm
    batched = HFGenerator(model, tok, fmt, batch_size=4).generate(PROMPTS, max_new_tokens=8)
    single = HFGenerator(model, tok, fmt, batch_size=1).generate(PROMPTS, max_new_tokens=8)
    assert batched == single
    assert all(isinstance(t, str) for t in batched) and len(batched) == len(PROMPTS)
    # order restored: each prompt alone gives the same text as inside the batch
    assert HFGenerator(model, tok, fmt).generate([PROMPTS[3]], max_new_tokens=8) == [batched[3]]


def test_hf_returns_only_new_text_stripped(tiny_lm):
    model, tok = tiny_lm
    gen = HFGenerator(model, tok, fmt, batch_size=2)
    out = gen.generate(["how do I bake bread"], max_new_tokens=6)[0]
    ids = tok(fmt("how do I bake bread"))["input_ids"]
    full = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out == tok.decode(full[0, len(ids):], skip_special_tokens=True).strip()
    assert "### Instruction" not in out


def test_hf_seeded_sampling_is_reproducible_and_isolated(tiny_lm):
    model, tok = tiny_lm
    gen = HFGenerator(model, tok, fmt, batch_size=3)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = gen.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    after = torch.rand(1)
    assert torch.equal(before, after)  # the caller's global RNG stream is untouched
    b = gen.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    c = gen.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=8)
    assert a == b and a != c


def test_hf_pad_fallback_chat_template_and_progress(tiny_lm):
    from transformers import PreTrainedTokenizerFast

    model, tok = tiny_lm
    no_pad = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    gen = HFGenerator(model, no_pad, fmt, batch_size=2, device="cpu", progress=True)
    assert gen.pad_id == no_pad.eos_token_id
    assert len(gen.generate(PROMPTS[:3], max_new_tokens=3)) == 3
    # message lists / system prompts need a chat template; this tokenizer has none
    with pytest.raises(ConfigError, match="chat template"):
        gen.generate(["x"], system="be nice")
    # a single user message goes through format_prompt like a plain string
    assert gen.generate([[{"role": "user", "content": "fox"}]], max_new_tokens=4) == gen.generate(["fox"], max_new_tokens=4)
    no_pad.chat_template = "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}<assistant>"
    chat = HFGenerator(model, no_pad, None)
    assert chat.render("fox", system="sys") == ("<system> sys\n<user> fox\n<assistant>", False)
    assert len(chat.generate(["fox"], system="sys", max_new_tokens=3)) == 1


def test_hf_with_peft_adapter(tiny_lm):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_lm
    import copy

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    # fresh LoRA has B = 0, so the adapted model must generate exactly what the base model does
    base = HFGenerator(model, tok, fmt, batch_size=2).generate(PROMPTS[:3], max_new_tokens=5)
    assert HFGenerator(peft_model, tok, fmt, batch_size=2).generate(PROMPTS[:3], max_new_tokens=5) == base
    peft_model.train()
    HFGenerator(peft_model, tok, fmt).generate(["fox"], max_new_tokens=2)
    assert peft_model.training  # training mode restored after generation
