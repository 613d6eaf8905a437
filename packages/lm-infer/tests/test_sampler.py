"""Sampler: each stage against a plain per-row Python reference, sampling statistics, seeded rows."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from lmstack.infer._sampling_params import SamplingParams
from lmstack.infer.engine._sampler import Sampler, SamplingState, SamplingTensors, make_generator

# ---------------------------------------------------------------------------------------------
# references: one row at a time, Python floats (float64), dict counts and plain sorting
# ---------------------------------------------------------------------------------------------


def ref_penalised(row: Sequence[float], p: SamplingParams, prompt: Sequence[int], output: Sequence[int]):
    counts: dict[int, int] = {}
    for token in output:
        counts[token] = counts.get(token, 0) + 1
    seen = set(prompt) | set(output)
    result = []
    for token, x in enumerate(row):
        if token in seen:
            x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        count = counts.get(token, 0)
        x -= p.frequency_penalty * count
        if count > 0:
            x -= p.presence_penalty
        result.append(x)
    return result


def ref_log_softmax(row: Sequence[float]) -> list[float]:
    top = max(row)
    log_z = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - log_z for x in row]


def ref_distribution(row: Sequence[float], p: SamplingParams) -> tuple[dict[int, float], float]:
    """The distribution a non-greedy row samples from, and the smallest margin of its top-p cut."""
    scaled = [x / p.temperature for x in row]
    order = sorted(range(len(row)), key=lambda i: (-scaled[i], i))
    if p.top_k > 0:
        order = order[: p.top_k]
    top = scaled[order[0]]
    weight = {i: math.exp(scaled[i] - top) for i in order}
    total = sum(weight.values())
    nucleus, mass, margin = [], 0.0, math.inf
    for i in order:
        if p.top_p < 1:
            margin = min(margin, abs(mass - p.top_p))
            if mass >= p.top_p:
                break
        nucleus.append(i)
        mass += weight[i] / total
    kept = [i for i in nucleus if weight[i] >= p.min_p * weight[nucleus[0]]]
    kept_total = sum(weight[i] for i in kept)
    return {i: weight[i] / kept_total for i in kept}, margin


def build(
    params: Sequence[SamplingParams],
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    vocab: int = 32,
    eos: Sequence[int] = (),
) -> SamplingTensors:
    n = len(params)
    return SamplingTensors.build(
        params,
        prompts if prompts is not None else [[]] * n,
        outputs if outputs is not None else [[]] * n,
        generators if generators is not None else [None] * n,
        vocab,
        "cpu",
        eos_token_ids=eos,
    )


@pytest.fixture
def sampler() -> Sampler:
    return Sampler()


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------------------------------------
# penalties, greedy, log-probs
# ---------------------------------------------------------------------------------------------

PENALTY_CASES = [
    SamplingParams(temperature=0, repetition_penalty=1.5),
    SamplingParams(temperature=0, repetition_penalty=0.7),
    SamplingParams(temperature=0, presence_penalty=1.2),
    SamplingParams(temperature=0, frequency_penalty=0.8),
    SamplingParams(temperature=0, frequency_penalty=-0.6, presence_penalty=-1.5),
    SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=2.0),
    SamplingParams(temperature=0),
]


def test_penalised_log_probs_and_greedy_match_reference(sampler: Sampler, rng: torch.Generator) -> None:
    vocab = 20  # logprobs=20 covers the whole vocabulary: top_logprobs is the full distribution
    params = [SamplingParams(**{**vars(p), "logprobs": 20}) for p in PENALTY_CASES]
    prompts = [[int(i) for i in torch.randint(vocab, (6,), generator=rng)] for _ in params]
    outputs = [[int(i) for i in torch.randint(vocab, (9,), generator=rng)] for _ in params]
    outputs[0] = []  # repetition penalty from the prompt alone
    logits = torch.randn(len(params), vocab, generator=rng) * 3
    out = sampler(logits, build(params, prompts, outputs, vocab=vocab))
    assert out.top_logprobs is not None
    values, ids = out.top_logprobs
    for row, p in enumerate(params):
        penalised = ref_penalised(logits[row].tolist(), p, prompts[row], outputs[row])
        expected = ref_log_softmax(penalised)
        got = [0.0] * vocab
        for value, token in zip(values[row].tolist(), ids[row].tolist(), strict=True):
            got[token] = value
        assert sorted(ids[row].tolist()) == list(range(vocab))
        assert got == pytest.approx(expected, abs=1e-5)
        assert int(out.token_ids[row]) == int(torch.argmax(torch.tensor(penalised, dtype=torch.float32)))
        assert float(out.logprobs[row]) == pytest.approx(expected[int(out.token_ids[row])], abs=1e-5)


def test_greedy_is_argmax_of_penalised_logits(sampler: Sampler, rng: torch.Generator) -> None:
    vocab, rows = 257, 12
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.2 + 0.1 * (i % 3), frequency_penalty=0.3 * (i % 4))
        for i in range(rows)
    ]
    params[3] = SamplingParams(temperature=5.0, top_k=1, presence_penalty=1.0)  # top_k=1 is greedy too
    prompts = [[int(i) for i in torch.randint(vocab, (40,), generator=rng)] for _ in range(rows)]
    outputs = [[int(i) for i in torch.randint(vocab, (30,), generator=rng)] for _ in range(rows)]
    logits = torch.randn(rows, vocab, generator=rng)
    out = sampler(logits.to(torch.bfloat16), build(params, prompts, outputs, vocab=vocab))
    reference_logits = logits.to(torch.bfloat16).float()
    for row in range(rows):
        penalised = ref_penalised(reference_logits[row].tolist(), params[row], prompts[row], outputs[row])
        assert int(out.token_ids[row]) == int(torch.argmax(torch.tensor(penalised, dtype=torch.float32)))
    assert out.token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32


def test_greedy_ties_take_lowest_id(sampler: Sampler) -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    out = sampler(logits, build([SamplingParams(temperature=0)] * 2, vocab=5))
    assert out.token_ids.tolist() == [1, 0]


def test_logprobs_and_top_logprobs_match_log_softmax(sampler: Sampler, rng: torch.Generator) -> None:
    vocab = 100
    params = [
        SamplingParams(logprobs=3, temperature=0.7, top_k=10, repetition_penalty=1.4),
        SamplingParams(logprobs=7, temperature=1.3, top_p=0.5),
        SamplingParams(temperature=0),  # asks for none; still gets its token's log-prob
        SamplingParams(logprobs=0, min_p=0.2, presence_penalty=0.4),
    ]
    prompts = [[1, 2, 3], [4, 5], [6], []]
    outputs = [[7, 7, 8], [9], [], [10, 10, 10]]
    logits = torch.randn(len(params), vocab, generator=rng) * 2
    out = sampler(logits, build(params, prompts, outputs, vocab=vocab))
    assert out.top_logprobs is not None
    values, ids = out.top_logprobs
    assert values.shape == ids.shape == (len(params), 7)
    for row, p in enumerate(params):
        penalised = torch.tensor(ref_penalised(logits[row].tolist(), p, prompts[row], outputs[row]))
        reference = torch.log_softmax(penalised.double(), dim=-1)
        token = int(out.token_ids[row])
        torch.testing.assert_close(out.logprobs[row].double(), reference[token], atol=1e-5, rtol=0)
        ref_values, ref_ids = torch.topk(reference, 7)
        assert ids[row].tolist() == ref_ids.tolist()
        torch.testing.assert_close(values[row].double(), ref_values, atol=1e-5, rtol=0)


def test_top_logprobs_absent_when_nobody_asks(sampler: Sampler) -> None:
    out = sampler(torch.randn(2, 10), build([SamplingParams(), SamplingParams(logprobs=0)], vocab=10))
    assert out.top_logprobs is None
    assert out.logprobs.shape == (2,)


def test_logits_are_not_modified(sampler: Sampler, rng: torch.Generator) -> None:
    logits = torch.randn(3, 16, generator=rng)
    before = logits.clone()
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, min_tokens=2, temperature=0.5)
    ] * 3
    sampler(logits, build(params, [[1, 2]] * 3, [[3]] * 3, vocab=16, eos=[0]))
    assert torch.equal(logits, before)


# ---------------------------------------------------------------------------------------------
# min_tokens
# ---------------------------------------------------------------------------------------------


def test_min_tokens_suppresses_eos_and_stop_ids(sampler: Sampler) -> None:
    vocab, eos, stop = 12, 2, 7
    logits = torch.zeros(5, vocab)
    logits[:, eos] = 50.0
    logits[:, stop] = 40.0
    logits[:, 5] = 10.0
    params = [
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop]),  # too short: both masked
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop]),  # long enough
        SamplingParams(temperature=0, min_tokens=3, ignore_eos=True, stop_token_ids=[stop]),
        SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[stop], logprobs=2),
        SamplingParams(temperature=0, min_tokens=3),  # only eos masked
    ]
    outputs = [[1, 1], [1, 1, 1], [1], [1], []]
    out = sampler(logits, build(params, outputs=outputs, vocab=vocab, eos=[eos]))
    assert out.token_ids.tolist() == [5, eos, eos, 5, stop]
    assert out.top_logprobs is not None
    assert out.top_logprobs[1][3, 0] == 5
    assert eos not in out.top_logprobs[1][3].tolist() and stop not in out.top_logprobs[1][3].tolist()
    assert out.logprobs[0] > -1e-3  # token 5 holds almost all the mass once eos and stop are masked
    assert out.top_logprobs[0][0, 0] == out.logprobs[0]
    # The masked tokens have probability 0 in the reported distribution.
    probs = sampler.probs(logits, build(params, outputs=outputs, vocab=vocab, eos=[eos]))
    assert probs[3, eos] == 0 and probs[3, stop] == 0
    # Many draws of the sampled row never produce them.
    many = build([params[3]] * 500, outputs=[[1]] * 500, vocab=vocab, eos=[eos])
    torch.manual_seed(0)
    drawn = sampler(logits[3:4].expand(500, vocab), many).token_ids
    assert not torch.isin(drawn, torch.tensor([eos, stop])).any()


# ---------------------------------------------------------------------------------------------
# temperature, top-k, top-p, min-p
# ---------------------------------------------------------------------------------------------

TRUNCATION_CASES = [
    SamplingParams(),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=2.0, top_k=5),
    SamplingParams(top_k=40),  # k larger than the vocabulary
    SamplingParams(top_k=0),  # disabled
    SamplingParams(top_p=0.6),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.5, top_k=8, top_p=0.7),
    SamplingParams(min_p=0.15),
    SamplingParams(temperature=0.8, top_k=12, top_p=0.95, min_p=0.05),
    SamplingParams(top_p=0.01),  # keeps only the most likely token
    SamplingParams(min_p=1.0),  # likewise
]


def test_truncation_support_and_probabilities_match_reference(sampler: Sampler, rng: torch.Generator) -> None:
    vocab = 30
    logits = torch.randn(len(TRUNCATION_CASES), vocab, generator=rng) * 2
    probs = sampler.probs(logits, build(TRUNCATION_CASES, vocab=vocab))
    for row, p in enumerate(TRUNCATION_CASES):
        expected, margin = ref_distribution(logits[row].tolist(), p)
        assert margin > 1e-4, "the test's logits put a token right at the top-p boundary"
        support = set(torch.nonzero(probs[row]).flatten().tolist())
        assert support == set(expected), (row, p)
        assert probs[row].tolist() == pytest.approx([expected.get(i, 0.0) for i in range(vocab)], abs=1e-5)
    assert torch.nonzero(probs[-1]).flatten().tolist() == [int(logits[-1].argmax())]
    assert torch.nonzero(probs[-2]).flatten().tolist() == [int(logits[-2].argmax())]


def test_a_row_is_unaffected_by_its_neighbours_settings(sampler: Sampler, rng: torch.Generator) -> None:
    # A plain row's distribution must be exactly the same whether or not other rows enable the
    # sorting / min-p stages (top_p == 1 keeps every token, even where float sums reach 1 early).
    vocab = 1000
    logits = torch.randn(1, vocab, generator=rng) * 4
    alone = sampler.probs(logits, build([SamplingParams()], vocab=vocab))
    mixed = build([SamplingParams(), SamplingParams(top_p=0.5, top_k=3, min_p=0.1)], vocab=vocab)
    together = sampler.probs(logits.expand(2, vocab), mixed)
    assert torch.equal(alone[0], together[0])
    assert bool((together[0] > 0).all())


CHI2_CRITICAL_0_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def chi_square(tokens: torch.Tensor, expected: dict[int, float], vocab: int) -> tuple[float, int]:
    counts = torch.bincount(tokens, minlength=vocab).tolist()
    assert all(counts[i] == 0 for i in range(vocab) if i not in expected), "drew a truncated token"
    draws = len(tokens)
    stat = sum((counts[i] - draws * q) ** 2 / (draws * q) for i, q in expected.items())
    return stat, len(expected) - 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=1.3, top_k=5, top_p=0.9),
        SamplingParams(top_p=0.8, min_p=0.1),
    ],
)
def test_sampling_frequencies_match_distribution(sampler: Sampler, params: SamplingParams) -> None:
    vocab, draws = 8, 4000
    logits = torch.tensor([[1.0, 0.2, -0.5, 1.5, 0.0, -1.0, 0.7, -2.0]])
    expected, _ = ref_distribution(logits[0].tolist(), params)
    torch.manual_seed(0)
    # Unseeded rows: one shared draw from the default generator.
    tokens = sampler(logits.expand(draws, vocab), build([params] * draws, vocab=vocab)).token_ids
    stat, dof = chi_square(tokens, expected, vocab)
    assert stat < CHI2_CRITICAL_0_001[dof], (stat, dof)
    # Seeded rows: each row draws from its own generator.
    generators = [make_generator(99, i) for i in range(draws)]
    seeded = build([params] * draws, generators=generators, vocab=vocab)
    stat, dof = chi_square(sampler(logits.expand(draws, vocab), seeded).token_ids, expected, vocab)
    assert stat < CHI2_CRITICAL_0_001[dof], (stat, dof)


# ---------------------------------------------------------------------------------------------
# seeded rows: reproducible and independent of the batch
# ---------------------------------------------------------------------------------------------


def fake_logits(request: int, step: int, vocab: int) -> torch.Tensor:
    # Each request's logits depend on (request, step) only, like a model's would on its own history.
    return torch.randn(vocab, generator=torch.Generator().manual_seed(1000 * request + step)) * 2


REQUESTS = {
    0: SamplingParams(seed=7, temperature=0.9),
    1: SamplingParams(seed=7, temperature=0.9, top_k=10, top_p=0.8, repetition_penalty=1.2),  # same seed
    2: SamplingParams(seed=-3, min_p=0.05, frequency_penalty=0.5, logprobs=2),
    3: SamplingParams(),  # unseeded
    4: SamplingParams(temperature=0, presence_penalty=0.3),  # greedy
}


def generate(sampler: Sampler, order: Sequence[int], steps: int, vocab: int) -> dict[int, list[int]]:
    seeds = {r: REQUESTS[r].seed for r in order}
    generators = {r: None if seed is None else make_generator(seed, 0) for r, seed in seeds.items()}
    outputs: dict[int, list[int]] = {r: [] for r in order}
    for step in range(steps):
        t = build(
            [REQUESTS[r] for r in order],
            [[r, r + 1] for r in order],
            [outputs[r] for r in order],
            [generators[r] for r in order],
            vocab=vocab,
        )
        logits = torch.stack([fake_logits(r, step, vocab) for r in order])
        for r, token in zip(order, sampler(logits, t).token_ids.tolist(), strict=True):
            outputs[r].append(token)
    return outputs


def test_seeded_rows_do_not_depend_on_the_batch(sampler: Sampler) -> None:
    vocab, steps = 64, 12
    batch = generate(sampler, [0, 1, 2, 3, 4], steps, vocab)
    shuffled = generate(sampler, [4, 2, 3, 1, 0], steps, vocab)
    for request in (0, 1, 2):
        alone = generate(sampler, [request], steps, vocab)[request]
        assert batch[request] == alone == shuffled[request], request
    smaller = generate(sampler, [3, 2], steps, vocab)
    assert smaller[2] == batch[2]
    # Not degenerate: the sampled rows vary, and the two requests sharing a seed differ (other params).
    assert len(set(batch[0])) > 3 and batch[0] != batch[1]
    # A rerun reproduces the seeded rows exactly.
    assert generate(sampler, [0, 1, 2, 3, 4], steps, vocab)[2] == batch[2]


def test_make_generator_streams() -> None:
    def draw(g: torch.Generator) -> list[float]:
        return torch.rand(4, generator=g).tolist()

    assert draw(make_generator(5, 0)) == draw(make_generator(5, 0))
    streams = {tuple(draw(make_generator(seed, index))) for seed in (0, 1, -1, 2) for index in range(3)}
    assert len(streams) == 12
    assert draw(make_generator(2**64 + 1, 0)) == draw(make_generator(1, 0))  # seeds are taken mod 2**64


# ---------------------------------------------------------------------------------------------
# building the tensors
# ---------------------------------------------------------------------------------------------


def test_build_counts_and_flags() -> None:
    params = [SamplingParams(frequency_penalty=0.5, min_tokens=2), SamplingParams(temperature=0, top_k=50)]
    t = build(params, [[1, 1], [2]], [[3, 3, 4], []], vocab=8, eos=[0])
    assert t.output_counts is not None and t.seen_mask is None
    assert t.output_counts.tolist() == [[0, 0, 0, 2, 1, 0, 0, 0], [0] * 8]
    assert t.top_k.tolist() == [8, 8]  # disabled and k > vocab both mean "all"
    assert t.suppress is None  # row 0 has 3 >= min_tokens outputs
    assert not t.do_top_k and not t.do_top_p and not t.do_min_p and not t.all_greedy
    assert t.greedy.tolist() == [False, True] and t.temperature.tolist() == [1.0, 1.0]
    plain = build([SamplingParams()], vocab=8)
    assert plain.output_counts is None and plain.seen_mask is None and plain.max_logprobs == 0


def test_build_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="one entry per row"):
        SamplingTensors.build([SamplingParams()], [[]], [[], []], [None], 8, "cpu")
    with pytest.raises(ValueError, match=r"logits must be \[1, 8\]"):
        Sampler()(torch.zeros(1, 9), build([SamplingParams()], vocab=8))


def test_empty_batch(sampler: Sampler) -> None:
    out = sampler(torch.zeros(0, 8), build([], vocab=8))
    assert out.token_ids.shape == (0,) and out.top_logprobs is None


# ---------------------------------------------------------------------------------------------
# the persistent state: running counts against a rebuild from the histories
# ---------------------------------------------------------------------------------------------

STATE_PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, repetition_penalty=1.4),
    SamplingParams(temperature=0.8, frequency_penalty=0.5, presence_penalty=0.25, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.8, repetition_penalty=0.8, presence_penalty=-0.5, logprobs=3),
    SamplingParams(temperature=0.5, min_p=0.1, min_tokens=4, stop_token_ids=[7]),
    SamplingParams(temperature=0, frequency_penalty=1.0, min_tokens=2),
    SamplingParams(temperature=0, logprobs=0),  # the chosen token's log-prob only
]


def test_state_running_counts_equal_a_rebuild_through_joins_and_leaves() -> None:
    """Many steps of rows joining, sampling and leaving: the gathered tensors equal a rebuild.

    Rows freed by a leaving sequence are reused (with their penalty slots) by later ones, which must
    start from their own prompt only; the processed logits must equal those of the rebuild exactly.
    """
    import random

    vocab, eos = 24, [0]
    pick = random.Random(5)
    state = SamplingState(vocab, "cpu", eos_token_ids=eos, capacity=2)  # small: it must grow
    live: dict[int, tuple[SamplingParams, list[int], list[int]]] = {}  # row -> params, prompt, output
    rows_seen: set[int] = set()
    joins = 0
    for _ in range(120):
        if len(live) < 7 and pick.random() < 0.5:
            params = pick.choice(STATE_PARAMS)
            prompt = [pick.randrange(vocab) for _ in range(pick.randint(1, 9))]
            output: list[int] = [pick.randrange(vocab) for _ in range(pick.choice([0, 0, 3]))]
            row = state.add(params, prompt, output, None)
            assert row not in live
            live[row] = (params, prompt, output)
            rows_seen.add(row)
            joins += 1
        if live and pick.random() < 0.2:
            row = pick.choice(sorted(live))
            del live[row]
            state.remove(row)
        if not live:
            continue
        rows = pick.sample(sorted(live), pick.randint(1, len(live)))  # any subset samples, any order
        params = [live[r][0] for r in rows]
        got = state.tensors(rows)
        want = SamplingTensors.build(
            params, [live[r][1] for r in rows], [live[r][2] for r in rows], [None] * len(rows), vocab,
            "cpu", eos_token_ids=eos,
        )  # fmt: skip
        logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(len(rows_seen)))
        assert torch.equal(Sampler._processed(logits, got), Sampler._processed(logits, want))
        for name in ("temperature", "top_p", "top_k", "min_p", "greedy"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        # Rows without a penalty read the shared zero row: only penalised rows' histories must match.
        counted = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
        if counted:
            assert got.output_counts is not None and want.output_counts is not None
            assert torch.equal(got.output_counts[counted], want.output_counts[counted])
        repeated = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if repeated:
            assert got.seen_mask is not None and want.seen_mask is not None
            assert torch.equal(got.seen_mask[repeated], want.seen_mask[repeated])
        assert got.all_greedy == want.all_greedy
        assert got.max_logprobs >= want.max_logprobs
        # Like max_logprobs, need_logprobs describes every live row (logprobs=0 counts: it asks too).
        assert got.need_logprobs == any(p.logprobs is not None for p, _, _ in live.values())
        out = Sampler()(logits, got)
        assert (out.logprobs is None) == (not got.need_logprobs)
        assert torch.equal(out.token_ids[got.greedy], Sampler()(logits, want).token_ids[got.greedy])
        tokens = [pick.randrange(vocab) for _ in rows]
        for r, t in zip(rows, tokens, strict=True):
            live[r][2].append(t)
        state.record(rows, tokens)
    assert joins > 20 and len(rows_seen) < joins  # rows were reused
    assert state.num_rows == len(live)


def test_no_log_probs_are_computed_when_no_row_asks() -> None:
    state = SamplingState(16, "cpu")
    plain = state.add(SamplingParams(temperature=0), [1, 2], [], None)
    logits = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits, state.tensors([plain]))
    assert out.logprobs is None and out.top_logprobs is None
    assert out.token_ids.tolist() == [int(logits.argmax())]
    asks = state.add(SamplingParams(temperature=0, logprobs=0), [3], [], None)
    out = Sampler()(logits.repeat(2, 1), state.tensors([plain, asks]))
    assert out.logprobs is not None and out.top_logprobs is None
    torch.testing.assert_close(out.logprobs, logits.log_softmax(-1).max(-1).values.repeat(2))
    state.remove(asks)
    assert not state.tensors([plain]).need_logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_untouched_greedy_fast_path_picks_what_the_full_path_picks(dtype: torch.dtype) -> None:
    """All greedy, no penalty/mask/constraint, no log-probs: argmax of the raw logits, no float32 copy."""
    import dataclasses

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 40, generator=g).to(dtype)
    logits[2, [3, 17]] = logits[2].max() + 1  # a tie: the lowest id wins on both paths
    params = [SamplingParams(temperature=0)] * 5
    full = build(params, vocab=40)
    fast = dataclasses.replace(full, need_logprobs=False)
    got, want = Sampler()(logits, fast), Sampler()(logits, full)
    assert got.logprobs is None and want.logprobs is not None
    assert got.token_ids.tolist() == want.token_ids.tolist() and got.token_ids[2] == 3
    penalised = dataclasses.replace(
        build([SamplingParams(temperature=0, repetition_penalty=2.0)] * 5, vocab=40), need_logprobs=False
    )
    assert penalised.seen_mask is not None  # a penalty: the full path runs, log-probs still skipped
    assert Sampler()(logits, penalised).logprobs is None
    with pytest.raises(ValueError, match="logits must be"):
        Sampler()(logits[:, :39], fast)


def test_state_refuses_a_bad_row_without_taking_it() -> None:
    state = SamplingState(8, "cpu", capacity=1)
    bad = SamplingParams(temperature=0.5)
    bad.top_k = None  # type: ignore[assignment]  # set after the checks: breaks only here
    with pytest.raises(TypeError):
        state.add(bad, [1], [], None)
    assert state.num_rows == 0
    assert state.add(SamplingParams(repetition_penalty=1.2), [1], [], None) == 0
    with pytest.raises(ValueError, match="not in use"):
        state.remove(1)
