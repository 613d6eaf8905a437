"""The chat-platform side of `lmstack rag serve`: the signed generic webhook and Feishu/Lark event callbacks,
on a real uvicorn server, with a real local fake of Feishu's open API that records what the server posts."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from fastapi import FastAPI, Request

from lmstack.infer import CompletionOutput, RequestOutput
from lmstack.rag._errors import RAGConfigError
from lmstack.rag._index import Index, Retrieval
from lmstack.rag.answer import DEFAULT_REFUSAL, Assistant
from lmstack.rag.server import RagServerConfig, create_app, running

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SECRET = "webhook-secret"
TOKEN = "verification-token"
ENCRYPT_KEY = "encrypt-key"
ANSWER = "Water the moonfern twice a week [1]."

DOCS = {
    "watering.md": "# Watering\n\nWater the moonfern twice a week; its soil should stay damp but never wet.",
    "light.md": "# Light\n\nThe moonfern grows best in indirect light, away from a south window.",
    "repotting.md": "# Repotting\n\nRepot a moonfern every two years in spring, into peat-free compost.",
    "pests.md": "# Pests\n\nSpider mites attack the moonfern in dry air; mist the fronds to keep them away.",
}
RELATED = [
    "How often should I water the moonfern?",
    "Should the moonfern soil be wet?",
    "How much light does a moonfern need?",
    "Can a moonfern stand in a south window?",
    "When should I repot my moonfern?",
    "What compost is best for repotting a moonfern?",
    "Which pests attack the moonfern?",
    "How do I keep spider mites off my fern?",
]
UNRELATED = [
    "What is the best pizza topping?",
    "Who painted the Mona Lisa?",
    "How do I change a car tyre?",
    "What is the population of Canada?",
    "Recommend a thriller novel",
    "How fast can a cheetah run?",
    "When does the train to Berlin leave?",
    "Write a poem about the sea",
]


class CountingLLM:
    """Answers every chat with ANSWER and counts the calls (the webhooks only use ``chat``)."""

    def __init__(self) -> None:
        self.questions: list[str] = []
        self.lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        raise NotImplementedError

    def chat(self, messages: Any, sampling_params: Any = None) -> list[RequestOutput]:
        with self.lock:
            self.questions.append(messages[-1]["content"].rsplit("Question: ", 1)[-1])
        return [
            RequestOutput(
                "counted", None, [], [CompletionOutput(0, ANSWER, finish_reason="stop")], finished=True
            )
        ]

    async def stream(self, prompt: Any, sampling_params: Any = None) -> Any:
        raise NotImplementedError
        yield

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def loglikelihood(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def loglikelihood_rolling(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class Counts:
    """How many searches and model calls the server made."""

    def __init__(self, index: Index, llm: CountingLLM) -> None:
        self.llm = llm
        self.searches = 0
        original = index.retrieve

        def counting(*args: Any, **kwargs: Any) -> Retrieval:
            self.searches += 1
            return original(*args, **kwargs)

        index.retrieve = counting  # type: ignore[method-assign]

    def snapshot(self) -> tuple[int, int]:
        return self.searches, len(self.llm.questions)


class FakeFeishu:
    """Feishu's open API on loopback: hands out a tenant token and records every reply posted."""

    def __init__(self) -> None:
        self.token_requests: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []
        self.app = FastAPI()

        @self.app.post("/open-apis/auth/v3/tenant_access_token/internal")
        async def token(request: Request) -> dict[str, Any]:
            self.token_requests.append(await request.json())
            return {"code": 0, "msg": "ok", "tenant_access_token": "t-fake-token", "expire": 7200}

        @self.app.post("/open-apis/im/v1/messages/{message_id}/reply")
        async def reply(message_id: str, request: Request) -> dict[str, Any]:
            body = await request.json()
            self.replies.append(
                {"message_id": message_id, "auth": request.headers.get("authorization"), **body}
            )
            return {"code": 0, "msg": "success", "data": {"message_id": "om_reply"}}

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.replies):
            assert time.monotonic() < deadline, f"no such reply posted; got {self.replies}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def index(calibrated_index: Any) -> Index:
    return calibrated_index("fern", DOCS, RELATED, UNRELATED)


@pytest.fixture(scope="module")
def feishu() -> Iterator[tuple[FakeFeishu, str]]:
    fake = FakeFeishu()
    with running(fake.app) as url:
        yield fake, url


@pytest.fixture(scope="module")
def setup(index: Index, feishu: tuple[FakeFeishu, str]) -> Iterator[tuple[str, Counts, FastAPI]]:
    llm = CountingLLM()
    counts = Counts(index, llm)
    config = RagServerConfig(
        webhook_secret=SECRET, feishu_verification_token=TOKEN, feishu_encrypt_key=ENCRYPT_KEY,
        feishu_api_base=f"{feishu[1]}/open-apis", feishu_app_id="cli_app", feishu_app_secret="app-secret",
    )  # fmt: skip
    app = create_app(index, Assistant(index, llm), config)
    with running(app) as url:
        yield url, counts, app


def post_webhook(
    url: str, message: dict[str, Any], *, secret: str = SECRET, age: float = 0
) -> httpx.Response:
    body = json.dumps(message).encode()
    stamp = str(int(time.time() - age))
    digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    headers = {
        "X-Lmstack-Timestamp": stamp,
        "X-Lmstack-Signature": f"sha256={digest}",
        "Content-Type": "application/json",
    }
    return httpx.post(f"{url}/webhook", content=body, headers=headers, timeout=60)


def test_webhook_answers_a_signed_message(setup: tuple[str, Counts, FastAPI], index: Index) -> None:
    url, counts, _ = setup
    question = RELATED[0]
    before = counts.snapshot()
    r = post_webhook(url, {"text": question, "chat_type": "group", "user": "ana"})
    assert r.status_code == 200
    top = index.search(question, 4)[0]
    citation = {"number": 1, "source": top.source, "score": pytest.approx(top.score)}
    assert r.json() == {"reply": ANSWER, "relevant": True, "citations": [citation]}
    assert counts.llm.questions[-1] == question
    assert counts.snapshot()[1] == before[1] + 1


@pytest.mark.parametrize("tamper", ["bad signature", "stale", "unsigned", "tampered body"])
def test_webhook_rejects_and_runs_nothing(setup: tuple[str, Counts, FastAPI], tamper: str) -> None:
    url, counts, _ = setup
    before = counts.snapshot()
    message = {"text": RELATED[2], "chat_type": "direct"}
    if tamper == "bad signature":
        r = post_webhook(url, message, secret="not-the-secret")
    elif tamper == "stale":
        r = post_webhook(url, message, age=301)
    elif tamper == "unsigned":
        r = httpx.post(f"{url}/webhook", json=message)
    else:
        stamp = str(int(time.time()))
        signed = hmac.new(
            SECRET.encode(), stamp.encode() + b"." + json.dumps(message).encode(), hashlib.sha256
        )
        headers = {"X-Lmstack-Timestamp": stamp, "X-Lmstack-Signature": f"sha256={signed.hexdigest()}"}
        r = httpx.post(f"{url}/webhook", json={**message, "text": "something else"}, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert counts.snapshot() == before  # no search, no model call


def test_group_silence_and_direct_refusal(setup: tuple[str, Counts, FastAPI], index: Index) -> None:
    url, counts, _ = setup
    question = UNRELATED[0]
    assert not index.retrieve(question).relevant  # the gate's verdict, the reference
    before = counts.snapshot()
    group = post_webhook(url, {"text": question, "chat_type": "group"}).json()
    assert group == {"reply": None, "relevant": False, "citations": []}
    direct = post_webhook(url, {"text": question, "chat_type": "direct"}).json()
    assert direct == {"reply": DEFAULT_REFUSAL, "relevant": False, "citations": []}
    assert counts.snapshot()[1] == before[1]  # refused by the gate: the model was never called


def test_webhook_dedupes_retries(setup: tuple[str, Counts, FastAPI]) -> None:
    url, counts, _ = setup
    message = {"text": RELATED[4], "chat_type": "group", "chat_id": "c1", "message_id": "m-42"}
    first = post_webhook(url, message).json()
    after_first = counts.snapshot()
    again = post_webhook(url, message).json()
    assert again == first and counts.snapshot() == after_first
    other_chat = post_webhook(url, {**message, "chat_id": "c2"}).json()
    assert other_chat == first and counts.snapshot()[1] == after_first[1] + 1


def test_webhook_off_without_secret_and_bad_body(index: Index, setup: tuple[str, Counts, FastAPI]) -> None:
    with running(create_app(index)) as url:
        r = httpx.post(f"{url}/webhook", json={"text": "hi"})
        assert r.status_code == 404 and "--webhook-secret" in r.json()["error"]["message"]
        assert httpx.post(f"{url}/feishu/events", json={}).status_code == 404
    r = post_webhook(setup[0], {"text": "hi", "chat_type": "channel"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "chat_type"


# -- Feishu ------------------------------------------------------------------------------------------


def encrypt(payload: dict[str, Any], key: str = ENCRYPT_KEY) -> str:
    padder = padding.PKCS7(128).padder()
    data = padder.update(json.dumps(payload).encode()) + padder.finalize()
    iv = os.urandom(16)
    encryptor = Cipher(algorithms.AES(hashlib.sha256(key.encode()).digest()), modes.CBC(iv)).encryptor()
    return base64.b64encode(iv + encryptor.update(data) + encryptor.finalize()).decode()


def post_feishu(
    url: str, payload: dict[str, Any], *, signed: bool = True, key: str = ENCRYPT_KEY
) -> httpx.Response:
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if signed:
        stamp, nonce = str(int(time.time())), "n0nce"
        digest = hashlib.sha256((stamp + nonce + key).encode() + body).hexdigest()
        headers |= {
            "X-Lark-Request-Timestamp": stamp,
            "X-Lark-Request-Nonce": nonce,
            "X-Lark-Signature": digest,
        }
    return httpx.post(f"{url}/feishu/events", content=body, headers=headers, timeout=10)


def message_event(event_id: str, message_id: str, text: str, chat_type: str = "group") -> dict[str, Any]:
    return {
        "schema": "2.0",
        "header": {"event_id": event_id, "token": TOKEN, "event_type": "im.message.receive_v1",
                   "create_time": "1700000000000", "app_id": "cli_app", "tenant_key": "t1"},
        "event": {
            "sender": {"sender_id": {"open_id": "ou_1"}, "sender_type": "user", "tenant_key": "t1"},
            "message": {"message_id": message_id, "chat_id": "oc_1", "chat_type": chat_type,
                        "message_type": "text", "content": json.dumps({"text": text}),
                        "mentions": [{"key": "@_user_1", "name": "Bot"}]},
        },
    }  # fmt: skip


def test_feishu_url_verification(setup: tuple[str, Counts, FastAPI]) -> None:
    url = setup[0]
    challenge = {"type": "url_verification", "challenge": "ch-123", "token": TOKEN}
    assert post_feishu(url, challenge, signed=False).json() == {"challenge": "ch-123"}
    assert post_feishu(url, {"encrypt": encrypt(challenge)}, signed=False).json() == {"challenge": "ch-123"}
    r = post_feishu(url, {**challenge, "token": "wrong"}, signed=False)
    assert r.status_code == 401


def test_feishu_signature_checked_before_anything_runs(
    setup: tuple[str, Counts, FastAPI], feishu: tuple[FakeFeishu, str]
) -> None:
    url, counts, _ = setup
    before, posted = counts.snapshot(), len(feishu[0].replies)
    event = message_event("ev-sig", "om_sig", f"@_user_1 {RELATED[1]}")
    assert post_feishu(url, event, key="wrong-key").status_code == 401
    assert post_feishu(url, event, signed=False).status_code == 401
    wrong_token = {**event, "header": {**event["header"], "token": "nope"}}
    assert post_feishu(url, wrong_token).status_code == 401
    assert counts.snapshot() == before and len(feishu[0].replies) == posted


def test_feishu_message_is_answered_through_the_api(
    setup: tuple[str, Counts, FastAPI], feishu: tuple[FakeFeishu, str], index: Index
) -> None:
    url, counts, _ = setup
    fake = feishu[0]
    question = RELATED[3]
    r = post_feishu(url, message_event("ev-1", "om_1", f"@_user_1 {question}"))
    assert r.status_code == 200 and r.json() == {}
    fake.wait_for(lambda replies: any(x["message_id"] == "om_1" for x in replies))
    reply = next(x for x in fake.replies if x["message_id"] == "om_1")
    assert reply["auth"] == "Bearer t-fake-token" and reply["msg_type"] == "text"
    source = index.search(question, 4)[0].source
    assert json.loads(reply["content"])["text"] == f"{ANSWER}\n\n[1] {source}"
    assert question in counts.llm.questions and "@_user_1" not in counts.llm.questions[-1]
    assert fake.token_requests == [{"app_id": "cli_app", "app_secret": "app-secret"}]

    # a redelivery of the same event, and an unrelated group message, get no reply; a direct one does
    calls = len(counts.llm.questions)
    assert post_feishu(url, message_event("ev-1", "om_1", f"@_user_1 {question}")).status_code == 200
    assert not index.retrieve(UNRELATED[1]).relevant
    assert post_feishu(url, message_event("ev-2", "om_2", f"@_user_1 {UNRELATED[1]}")).status_code == 200
    encrypted = {"encrypt": encrypt(message_event("ev-3", "om_3", RELATED[5], chat_type="p2p"))}
    assert post_feishu(url, encrypted).status_code == 200
    fake.wait_for(lambda replies: any(x["message_id"] == "om_3" for x in replies))
    deadline = time.monotonic() + 60
    while setup[2].state.lmstack_rag.tasks:  # om_2's answer runs in the background too: wait for it
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert [x["message_id"] for x in fake.replies].count("om_1") == 1
    assert len(counts.llm.questions) == calls + 1  # only the direct message reached the model
    assert len(fake.token_requests) == 1  # the tenant token is cached
    assert "om_2" not in [x["message_id"] for x in fake.replies]


def test_feishu_route_config(index: Index) -> None:
    with pytest.raises(RAGConfigError, match="assistant"):
        create_app(index, None, RagServerConfig(feishu_verification_token=TOKEN))
    with pytest.raises(RAGConfigError, match="feishu_app_secret"):
        RagServerConfig(feishu_verification_token=TOKEN, feishu_app_id="cli_app")
