"""The graph search agent end to end over real HTTP on loopback, with nothing scripted.

``lmstack serve``'s app (uvicorn on 127.0.0.1) serves a tiny random-weight model; a
:class:`LocalSearchServer` answers in SearxNG's JSON and serves the pages; the agent reaches the model
through :class:`RemoteLLM` and the search engine through :class:`SearxNGSearch`. The model is random
but for its output layer, which writes only the corpus's words (see :func:`_favour_words`), so its
queries find pages. It writes no sensible plan, so what this checks is the wiring and the guarantees
that do not depend on the model: the planner's JSON is generated under its schema
(``response_format``, with ``guided_json_fit`` so it always completes), every event is well formed
and in order, nodes search, read and answer, and every citation, in the nodes' answers and in the
final answer (both generated under the citation grammar, so there are citations to check), points
at a page the agent read (from the events)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from graph_script import QUESTION, write_corpus

from lmstack.agent import EVENT_SCHEMA_VERSION, GraphSearchAgent
from lmstack.agent.tools import LocalSearchServer, SearxNGSearch
from lmstack.agent.web import running
from lmstack.core import CausalLM, ModelConfig, save_pretrained, train_bpe_tokenizer
from lmstack.infer import LLM, RemoteLLM, SamplingParams
from lmstack.infer.server import ServerConfig, create_app

WORDS = ["kadadell", "velm", "amber", "sea", "river", "city", "flows", "into", "which", "the", "of",
         "is", "on", "a", "famous", "wine", "cold", "salty"]  # fmt: skip


def _favour_words(model: CausalLM, word_ids: list[int]) -> None:
    """Zero the output rows of every token but the corpus's whole words (with their leading space).

    A random model otherwise writes raw bytes that no search matches. With only the words' rows left,
    its greedy choice at every step is one of the words (their logits are random, the others' are 0,
    and some word's is above 0), so its queries find pages, its answers read as words, and the
    citation checks below have something to check. The rest of the model stays random.
    """
    with torch.no_grad():
        keep = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
        keep[word_ids] = True
        model.lm_head.weight[~keep] = 0.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(300)]
    tokenizer = train_bpe_tokenizer(iter(corpus), vocab_size=400, min_frequency=2)  # every word a token
    torch.manual_seed(0)
    config = ModelConfig(
        model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=112,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = CausalLM(config)
    model.reset_parameters(std=0.25)
    words = {f" {word}" for word in WORDS}
    _favour_words(model, [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) in words])
    out = tmp_path_factory.mktemp("models") / "tiny"
    save_pretrained(model, out, tokenizer=tokenizer)
    return out


def test_graph_search_over_lmstack_serve_and_a_searxng_compatible_server(
    model_dir: Path, tmp_path: Path
) -> None:
    app = create_app(LLM(model_dir), ServerConfig(model_name="tiny"))
    # guided_json_fit: the planner's JSON (generated under its schema) completes within max_tokens.
    params = SamplingParams(max_tokens=192, temperature=0, guided_json_fit=True)
    with (
        running(app) as base,
        LocalSearchServer(write_corpus(tmp_path / "docs")) as search,
        RemoteLLM(f"{base}/v1", model="tiny") as remote,
    ):
        backend = SearxNGSearch(search.url)
        agent = GraphSearchAgent(remote, backend, max_nodes=3, max_plan_steps=2, max_retries=1, params=params,
                                 concurrency=2)  # fmt: skip
        result = agent.run(QUESTION)

    events = [event.to_json() for event in result.events]
    assert events[0]["type"] == "start" and events[-1]["type"] == "done"
    assert all(e["v"] == EVENT_SCHEMA_VERSION for e in events)
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    plans = [e for e in events if e["type"] == "plan"]
    assert plans, [e for e in events if e["type"] in ("planner_error", "error")]
    for plan in plans:  # generated under the actions schema: always JSON with an actions list
        assert isinstance(json.loads(plan["raw"])["actions"], list)
    assert not [e for e in events if e["type"] == "planner_error" and "JSON" in e["error"]]
    assert isinstance(result.answer, str) and result.answer
    # Citations, checked from the transcript. Node answers and the final answer are generated under
    # the citation grammar, so even this random model cites: the check below is not vacuous.
    read = {e["url"] for e in events if e["type"] == "page_read"}
    read_by = {
        name: {e["url"] for e in events if e["type"] == "page_read" and e["node"] == name}
        for name in {e["node"] for e in events if e["type"] == "page_read"}
    }
    node_answers = [e for e in events if e["type"] == "node_answer" and e["citations"]]
    assert node_answers, "no node answered with a citation"
    for event in node_answers:
        for citation in event["citations"]:
            assert citation["url"] in read_by[event["node"]]  # the node cites only pages it read
    assert result.references, "the final answer cites nothing"
    for reference in result.references:
        assert reference.url in read  # only pages the agent actually read are cited
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", result.answer)}
    assert cited == {reference.n for reference in result.references}
