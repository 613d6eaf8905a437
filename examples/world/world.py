"""The bundled world: a deterministic, seeded generator of a small synthetic world.

Every layer of lmstack defaults to this world: lmstack-train pretrains and finetunes the default
tiny model on it, lmstack-eval scores that model on its held-out questions, lmstack-rag indexes its
articles and the agent searches them. No library imports this module (no layer may import a
sibling, and this is no library): they read the files that `generate` writes.

The world is a few hundred invented entities of four kinds (cities, people, creatures and
inventions), each with five attributes drawn from small closed sets. Some attributes point at
other entities (a person's birthplace is a city of the world, an invention's inventor is one of its
people), so multi-hop questions can be asked (`multi_hop_questions`).

Everything is derived from the seed through `random.Random` streams (one per product, seeded with
a string, which Python hashes with SHA-512, so the streams do not depend on the process or the
platform); nothing depends on set or hash order or reads the clock, and JSON is written with sorted keys and
fixed separators. The same seed and parameters give byte-identical files.

Only the Python standard library is used.

Example:
    >>> w = build_world(seed=0, num_entities=60)
    >>> paths = generate("out/world", seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2
"""Bumped whenever the same seed and parameters would give different files."""

KINDS = ("city", "person", "creature", "invention")
"""The entity kinds, in the order they are created and listed."""

REFUSAL = "The context does not say."
"""What the assistant answers in context_chats.jsonl when the context does not hold the answer."""

CONTEXT_INSTRUCTION = (
    f'Answer the question using only the context. If the context does not say, reply "{REFUSAL}"'
)
"""The first line of every context_chats.jsonl user message (see `format_context_prompt`)."""

UNKNOWN_ANSWERS = {
    "person": ("No {name} is known.", "{name} is not known.", "{name} is unknown."),
    "city": ("No {name} is known.", "{name} is not known.", "{name} is unknown."),
}
"""What the assistant answers, in preferences.jsonl's `unknown` pairs, when asked about a person or a
place the world does not have (`{name}` is the invented name); the `known` pairs reject it with a real
name. No other file ever says this.

Short, and in words the articles and chats use ("is", "known") where they can: the world's texts never
negate anything ("no", "not", "unknown" are new to a model trained on them), and every new word costs
the model log-prob. On the quickstart's default model, before preference training, these replies sit, on
average, 10 to 26 nats (summed log-prob) below the made-up fact on the held-out pairs, where "I have no
record of anyone called {name}." sat 110 below (benchmarks/test_preference_world.py). Three wordings a
kind, as many as a held-out question has statements: the benchmark pairs them one to one."""

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer in one sentence.",
    "You answer questions about the world briefly and truthfully.",
)
"""System turns that open a share of the chats (the rest have none)."""

FILES = (
    "articles.jsonl",
    "pretrain.jsonl",
    "chats.jsonl",
    "context_chats.jsonl",
    "preferences.jsonl",
    "heldout.jsonl",
)
"""The data files `generate` writes, in this order, before `MANIFEST`."""

MANIFEST = "manifest.json"

ARITHMETIC_OPS = {"+": "plus", "-": "minus", "*": "times"}
"""The arithmetic operators and the words some chat questions use for them."""

ARITHMETIC_LINE = re.compile(r"(?<![\w.])(\d+) ([+*-]) (\d+) = (\d+)(?![\w])")
"""Matches one worked arithmetic line, `17 + 25 = 42`, wherever it appears."""

ARITHMETIC_EXPRESSION = re.compile(r"(?<![\w.])(\d+) ([+*-]) (\d+)(?![\w])")
"""Matches one arithmetic expression, `17 + 25`, with or without its result."""


# ---------------------------------------------------------------------------------------------
# The schema of the world: kinds, attributes, their value sets and their templates
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttributeSpec:
    """One attribute of one entity kind, with its values and the sentences that talk about it.

    Templates are `str.format` strings: `{s}` is the entity as a sentence names it (`Kadadell`,
    `the Vernomling`), `{v}` the value and `{av}` the value after its indefinite article (`an
    astronomer`). A rendered sentence or question has its first letter capitalised.

    Attributes:
        name: The attribute's name, unique over all kinds (`river`, `birth_year`).
        kind: The entity kind that has this attribute.
        statements: Sentences stating the fact, used in articles and as chat answers.
        questions: Questions asked in chats.jsonl, context_chats.jsonl and preferences.jsonl.
        heldout_questions: Questions asked only in heldout.jsonl, never in the training files.
        values: The closed set of values, for attributes whose values are words.
        ref_kind: The kind of entity the value names, for attributes that are relations.
        year_range: The inclusive range of numeric values, for attributes that are numbers.
    """

    name: str
    kind: str
    statements: tuple[str, ...]
    questions: tuple[str, ...]
    heldout_questions: tuple[str, ...]
    values: tuple[str, ...] = ()
    ref_kind: str | None = None
    year_range: tuple[int, int] | None = None


COUNTRIES = (
    "Aldoria", "Brenmark", "Cassovel", "Dunmere", "Elvaria",
    "Frostholm", "Galdun", "Hespera", "Istrelle", "Jorvania",
)  # fmt: skip
RIVERS = (
    "Amsel", "Bravik", "Corva", "Dolen", "Eskar", "Falun",
    "Gorrin", "Hollin", "Ivra", "Jessen", "Korrow", "Lunne",
)  # fmt: skip
DISHES = (
    "fish stew", "barley bread", "honey cakes", "plum dumplings", "roasted chestnuts", "lentil soup",
    "smoked eel", "goat cheese", "pepper noodles", "apple tart", "mushroom pie", "onion broth",
)  # fmt: skip
TRADES = ("salt", "wool", "glass", "timber", "silk", "copper", "wine", "paper", "pottery", "spices")
PROFESSIONS = (
    "baker", "cartographer", "astronomer", "weaver", "sailor", "physician",
    "painter", "blacksmith", "poet", "architect", "botanist", "clockmaker",
)  # fmt: skip
INSTRUMENTS = ("flute", "harp", "violin", "drum", "lute", "cello", "horn", "bagpipes", "accordion", "oboe")
COLORS = ("red", "blue", "green", "amber", "violet", "grey", "white", "black", "orange", "yellow")
HABITATS = (
    "marshes", "pine forests", "mountain caves", "deserts", "river banks",
    "meadows", "sea cliffs", "glaciers", "swamps", "rocky hills",
)  # fmt: skip
DIETS = (
    "berries",
    "insects",
    "small fish",
    "moss",
    "seeds",
    "mushrooms",
    "roots",
    "snails",
    "nectar",
    "grass",
)
COATS = (
    "silver", "crimson", "golden", "pale blue", "dark green",
    "speckled brown", "jet black", "snow white", "rusty orange", "ash grey",
)  # fmt: skip
MATERIALS = ("brass", "oak", "glass", "copper", "iron", "clay", "bone", "silver", "bronze", "walnut")
PURPOSES = (
    "measuring rain", "telling time", "catching fish", "weaving cloth", "grinding grain",
    "lighting streets", "sending messages", "cooling food", "drawing maps", "lifting water",
)  # fmt: skip

ATTRIBUTES: tuple[AttributeSpec, ...] = (
    # -- cities ---------------------------------------------------------------------------------
    AttributeSpec(
        "country",
        "city",
        statements=(
            "{s} is a city in {v}.",
            "{s} lies in the country of {v}.",
            "The city of {s} belongs to {v}.",
        ),
        questions=(
            "In which country is {s}?",
            "What country is {s} in?",
            "Which country does {s} belong to?",
        ),
        heldout_questions=("{s} can be found in which country?", "Name the country where {s} lies."),
        values=COUNTRIES,
    ),
    AttributeSpec(
        "river",
        "city",
        statements=(
            "{s} lies on the river {v}.",
            "The river {v} flows through {s}.",
            "{s} was built on the banks of the {v}.",
        ),
        questions=("Which river does {s} lie on?", "What river flows through {s}?", "On which river is {s}?"),
        heldout_questions=("Which river runs past {s}?", "{s} sits on the banks of what river?"),
        values=RIVERS,
    ),
    AttributeSpec(
        "founded",
        "city",
        statements=(
            "{s} was founded in {v}.",
            "The city of {s} dates from {v}.",
            "{s} was first settled in the year {v}.",
        ),
        questions=(
            "When was {s} founded?",
            "In what year was {s} founded?",
            "What is the founding year of {s}?",
        ),
        heldout_questions=("In which year did {s} come into being?", "{s} was established in what year?"),
        year_range=(800, 1600),
    ),
    AttributeSpec(
        "dish",
        "city",
        statements=(
            "{s} is famous for its {v}.",
            "The best-known dish of {s} is {v}.",
            "Visitors to {s} always try the {v}.",
        ),
        questions=(
            "What dish is {s} famous for?",
            "What food is {s} known for?",
            "Which dish should a visitor try in {s}?",
        ),
        heldout_questions=(
            "What is the signature dish of {s}?",
            "Travellers to {s} should taste which dish?",
        ),
        values=DISHES,
    ),
    AttributeSpec(
        "trade",
        "city",
        statements=(
            "The main trade of {s} is {v}.",
            "{s} grew rich on the {v} trade.",
            "Most merchants in {s} deal in {v}.",
        ),
        questions=(
            "What is the main trade of {s}?",
            "What do the merchants of {s} sell?",
            "What trade made {s} rich?",
        ),
        heldout_questions=(
            "Which goods is {s} best known for trading?",
            "{s} built its wealth on trading what?",
        ),
        values=TRADES,
    ),
    # -- people ---------------------------------------------------------------------------------
    AttributeSpec(
        "birthplace",
        "person",
        statements=(
            "{s} was born in {v}.",
            "{s} came into the world in the city of {v}.",
            "The birthplace of {s} is {v}.",
        ),
        questions=("Where was {s} born?", "In which city was {s} born?", "What is the birthplace of {s}?"),
        heldout_questions=("Which city is the hometown of {s}?", "{s} was born in which town?"),
        ref_kind="city",
    ),
    AttributeSpec(
        "profession",
        "person",
        statements=("{s} worked as {av}.", "By trade, {s} was {av}.", "{s} earned a living as {av}."),
        questions=(
            "What was the profession of {s}?",
            "What did {s} do for a living?",
            "What job did {s} have?",
        ),
        heldout_questions=("What was the occupation of {s}?", "How did {s} earn money?"),
        values=PROFESSIONS,
    ),
    AttributeSpec(
        "instrument",
        "person",
        statements=(
            "{s} played the {v}.",
            "In the evenings, {s} liked to play the {v}.",
            "{s} was a skilled player of the {v}.",
        ),
        questions=(
            "Which instrument did {s} play?",
            "What instrument did {s} play?",
            "What did {s} play in the evenings?",
        ),
        heldout_questions=(
            "Which musical instrument was {s} known for playing?",
            "On what instrument did {s} perform?",
        ),
        values=INSTRUMENTS,
    ),
    AttributeSpec(
        "birth_year",
        "person",
        statements=(
            "{s} was born in the year {v}.",
            "The year of the birth of {s} was {v}.",
            "{s} entered the world in {v}.",
        ),
        questions=("When was {s} born?", "In what year was {s} born?", "What year was {s} born in?"),
        heldout_questions=("What is the birth year of {s}?", "{s} was born in which year?"),
        year_range=(1700, 1950),
    ),
    AttributeSpec(
        "favorite_color",
        "person",
        statements=(
            "The favorite color of {s} was {v}.",
            "{s} loved the color {v}.",
            "{s} always wore something {v}.",
        ),
        questions=(
            "What was the favorite color of {s}?",
            "Which color did {s} love?",
            "What color did {s} like best?",
        ),
        heldout_questions=("What color was dearest to {s}?", "{s} preferred which color?"),
        values=COLORS,
    ),
    # -- creatures ------------------------------------------------------------------------------
    AttributeSpec(
        "habitat",
        "creature",
        statements=("{s} lives in {v}.", "{s} makes its home in {v}.", "The natural habitat of {s} is {v}."),
        questions=(
            "Where does {s} live?",
            "What is the habitat of {s}?",
            "Where can {s} be found in the wild?",
        ),
        heldout_questions=("In what kind of place does {s} dwell?", "What surroundings does {s} call home?"),
        values=HABITATS,
    ),
    AttributeSpec(
        "diet",
        "creature",
        statements=("{s} feeds on {v}.", "The diet of {s} consists mostly of {v}.", "{s} eats {v}."),
        questions=("What does {s} eat?", "What does {s} feed on?", "What is the diet of {s}?"),
        heldout_questions=("What food keeps {s} alive?", "Which food makes up the meals of {s}?"),
        values=DIETS,
    ),
    AttributeSpec(
        "coat",
        "creature",
        statements=("{s} has a {v} coat.", "The fur of {s} is {v}.", "{s} is {v} in color."),
        questions=(
            "What color is {s}?",
            "What color is the coat of {s}?",
            "What does the fur of {s} look like?",
        ),
        heldout_questions=("Of what color is the fur of {s}?", "{s} has fur of which color?"),
        values=COATS,
    ),
    AttributeSpec(
        "lifespan",
        "creature",
        statements=(
            "{s} lives about {v} years.",
            "{s} can live for {v} years.",
            "The lifespan of {s} is about {v} years.",
        ),
        questions=(
            "How long does {s} live?",
            "What is the lifespan of {s}?",
            "How many years does {s} live?",
        ),
        heldout_questions=("To what age can {s} survive?", "For how many years does {s} usually live?"),
        year_range=(3, 60),
    ),
    AttributeSpec(
        "found_near",
        "creature",
        statements=(
            "{s} is often seen near {v}.",
            "{s} is found around the city of {v}.",
            "Sightings of {s} are common near {v}.",
        ),
        questions=(
            "Near which city is {s} often seen?",
            "Which city is {s} found around?",
            "Close to which city does {s} appear?",
        ),
        heldout_questions=(
            "Which city has frequent sightings of {s}?",
            "{s} is commonly spotted near what city?",
        ),
        ref_kind="city",
    ),
    # -- inventions -----------------------------------------------------------------------------
    AttributeSpec(
        "inventor",
        "invention",
        statements=("{s} was invented by {v}.", "{v} invented {s}.", "{s} is the work of the inventor {v}."),
        questions=("Who invented {s}?", "Who is the inventor of {s}?", "Whose invention is {s}?"),
        heldout_questions=("Which person created {s}?", "{s} was devised by whom?"),
        ref_kind="person",
    ),
    AttributeSpec(
        "invented_year",
        "invention",
        statements=(
            "{s} was invented in {v}.",
            "{s} first appeared in {v}.",
            "The year {s} was invented was {v}.",
        ),
        questions=(
            "When was {s} invented?",
            "In what year was {s} invented?",
            "What year did {s} first appear?",
        ),
        heldout_questions=("In which year did {s} come about?", "{s} dates from which year?"),
        year_range=(1720, 2010),
    ),
    AttributeSpec(
        "material",
        "invention",
        statements=("{s} is made of {v}.", "{s} is built from {v}.", "The main material of {s} is {v}."),
        questions=("What is {s} made of?", "What material is {s} built from?", "From what is {s} made?"),
        heldout_questions=("Which material was used to construct {s}?", "{s} is crafted from what?"),
        values=MATERIALS,
    ),
    AttributeSpec(
        "purpose",
        "invention",
        statements=("{s} is used for {v}.", "People use {s} for {v}.", "{s} was designed for {v}."),
        questions=("What is {s} used for?", "What was {s} designed for?", "Why do people use {s}?"),
        heldout_questions=("What task does {s} perform?", "For what purpose was {s} created?"),
        values=PURPOSES,
    ),
    AttributeSpec(
        "first_built_in",
        "invention",
        statements=(
            "{s} was first built in {v}.",
            "The first workshop to make {s} was in {v}.",
            "{s} was first made in the city of {v}.",
        ),
        questions=(
            "Where was {s} first built?",
            "In which city was {s} first made?",
            "What city first produced {s}?",
        ),
        heldout_questions=("In what town did {s} originate?", "{s} was first constructed in which city?"),
        ref_kind="city",
    ),
)
"""Every attribute of every kind, in the order an entity's facts are listed."""

ATTRIBUTE = {spec.name: spec for spec in ATTRIBUTES}
"""`ATTRIBUTES` by name."""

INTROS = {
    "city": ("{s} is a city.", "{s} is an old city.", "{s} is a city with a long history."),
    "person": (
        "{s} is a person from the old records.",
        "{s} is a well-remembered person.",
        "{s} was a person.",
    ),
    "creature": ("{s} is a creature.", "{s} is a shy creature.", "{s} is an animal of the wild."),
    "invention": ("{s} is an invention.", "{s} is a clever invention.", "{s} is a device."),
}
"""Opening sentences of the articles, one per article; they state no fact."""

FILLERS = {
    "city": (
        "Its streets are narrow and busy on market days.",
        "Many travellers have written about {s}.",
        "Little is known about its first rulers.",
        "The old walls of {s} still stand in places.",
    ),
    "person": (
        "Many stories are told about {s}.",
        "Letters written by {s} are still read today.",
        "Friends described {s} as patient and kind.",
        "Few portraits of {s} survive.",
    ),
    "creature": (
        "It is rarely seen by day.",
        "Stories about {s} are told to children.",
        "Scholars have long argued about {s}.",
        "It moves quietly and avoids people.",
    ),
    "invention": (
        "Many copies of {s} were made.",
        "Early versions of {s} often broke.",
        "Museums keep old examples of {s}.",
        "It was simple to repair.",
    ),
}
"""Sentences that pad an article to its length; they state no fact."""

NAME_ONSETS = (
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
    "br", "dr", "gr", "kr", "st", "tr", "th", "sh",
)  # fmt: skip
NAME_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou")
NAME_CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "nd", "rk")
NAME_SUFFIXES = {
    "city": ("mar", "dell", "holm", "vik", "stad", "ford", "wick", "brin"),
    "creature": ("ling", "ox", "ith", "ard", "ern", "owl", "pin"),
    "invention": ("scope", "meter", "loom", "wheel", "graph", "lamp", "press", "dial"),
}
"""Name endings by kind: a tiny model can tell a city from a creature by its name."""

_PREFIX = 4  # names are sampled so that no two name words share their first letters, this many
_HARD_TO_SAY = re.compile(r"[^aeiou]{3}|[aeiou]{3}|(.)\1\1|^[^aeiou]{2}[^aeiou]")


# ---------------------------------------------------------------------------------------------
# The world in memory
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One attribute of one entity.

    Attributes:
        attribute: The attribute's name (a key of `ATTRIBUTE`).
        value: The value as the text says it (`Lunne`, `1390`, `barley bread`).
        ref: The id of the entity the value names, for relations; None otherwise.
    """

    attribute: str
    value: str
    ref: str | None = None


@dataclass(frozen=True)
class Entity:
    """One invented entity and its facts.

    Attributes:
        id: A stable id, the name in lower case with hyphens (`zinbis-eistand`).
        name: The name, also the title of its article (`Zinbis Eistand`, `Vernomling`).
        kind: One of `KINDS`.
        facts: Its facts, one per attribute of its kind, in `ATTRIBUTES` order.
    """

    id: str
    name: str
    kind: str
    facts: tuple[Fact, ...]

    @property
    def subject(self) -> str:
        """The entity as a sentence names it: `Kadadell`, `Zinbis Eistand`, `the Vernomling`."""
        return f"the {self.name}" if self.kind in ("creature", "invention") else self.name

    def fact(self, attribute: str) -> Fact:
        """The fact for `attribute`.

        Raises:
            KeyError: The entity's kind has no such attribute.
        """
        for fact in self.facts:
            if fact.attribute == attribute:
                return fact
        raise KeyError(f"{self.kind} {self.name!r} has no attribute {attribute!r}")


@dataclass(frozen=True)
class World:
    """A generated world: its entities, in `KINDS` order, then in the order they were created.

    Attributes:
        seed: The seed it was built from.
        entities: Every entity.
    """

    seed: int
    entities: tuple[Entity, ...]
    _by_id: dict[str, Entity] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {e.id: e for e in self.entities})

    def entity(self, entity_id: str) -> Entity:
        """The entity with this id.

        Raises:
            KeyError: No entity has this id.
        """
        return self._by_id[entity_id]

    def of_kind(self, kind: str) -> list[Entity]:
        """The entities of one kind, in world order."""
        return [e for e in self.entities if e.kind == kind]

    def pairs(self) -> list[tuple[str, str]]:
        """Every (entity id, attribute) pair of the world, in world order."""
        return [(e.id, f.attribute) for e in self.entities for f in e.facts]

    def value_set(self, attribute: str) -> list[str]:
        """The closed set the attribute's values are drawn from (distractors come from it).

        Words come from the attribute's fixed list, relations from the names of the entities of
        the kind they point at, numbers from their range.
        """
        spec = ATTRIBUTE[attribute]
        if spec.values:
            return list(spec.values)
        if spec.ref_kind is not None:
            return [e.name for e in self.of_kind(spec.ref_kind)]
        assert spec.year_range is not None
        low, high = spec.year_range
        return [str(n) for n in range(low, high + 1)]

    def values_in_use(self, attribute: str) -> list[str]:
        """The distinct values some entity has for `attribute`, sorted."""
        return sorted({e.fact(attribute).value for e in self.entities if e.kind == ATTRIBUTE[attribute].kind})


def _rng(seed: int, stream: str) -> random.Random:
    """An independent random stream for one product of the world, so products do not shift each other."""
    return random.Random(f"lmstack-world/{seed}/{stream}")


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def _reserved_words() -> list[str]:
    """Every word of every closed value set: no invented name may collide with one of them."""
    words: list[str] = []
    for spec in ATTRIBUTES:
        for value in spec.values:
            words.extend(value.lower().split())
    return words


class _NameMaker:
    """Draws pronounceable, unique name words from syllables.

    No name word is a prefix of another, and no two share their first `_PREFIX` letters unless
    the space of such prefixes runs out (only for worlds far above the default size).
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.words: set[str] = set()
        self.prefixes: set[str] = set()
        for word in _reserved_words():
            self._take(word)

    def _take(self, word: str) -> None:
        self.words.add(word)
        self.prefixes.add(word[:_PREFIX])

    def _collides(self, word: str, strict: bool) -> bool:
        if word in self.words or (strict and word[:_PREFIX] in self.prefixes):
            return True
        return any(word.startswith(w) or w.startswith(word) for w in self.words)

    def _syllables(self, count: int) -> str:
        parts = []
        for i in range(count):
            onset = "" if i == 0 and self.rng.random() < 0.15 else self.rng.choice(NAME_ONSETS)
            coda = self.rng.choice(NAME_CODAS) if i == count - 1 else self.rng.choice(("", "", "n", "r", "l"))
            parts.append(onset + self.rng.choice(NAME_VOWELS) + coda)
        return "".join(parts)

    def word(self, syllables: Sequence[int], suffixes: Sequence[str] = ()) -> str:
        """A new capitalised name word of one of `syllables` counts, ending with one of `suffixes`."""
        for attempt in range(2000):
            word = self._syllables(self.rng.choice(syllables))
            if suffixes:
                word += self.rng.choice(suffixes)
            if (
                not 4 <= len(word) <= 11
                or _HARD_TO_SAY.search(word)
                or self._collides(word, strict=attempt < 1000)
            ):
                continue
            self._take(word)
            return word.capitalize()
        raise ValueError("ran out of distinct names: ask for fewer entities")


def _indefinite(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _kind_counts(num_entities: int) -> dict[str, int]:
    cities = round(num_entities * 0.25)
    creatures = round(num_entities * 0.2)
    inventions = round(num_entities * 0.2)
    return {
        "city": cities,
        "person": num_entities - cities - creatures - inventions,
        "creature": creatures,
        "invention": inventions,
    }


def build_world(seed: int = 0, num_entities: int = 300) -> World:
    """Build the world's entities and their facts.

    Args:
        seed: The seed; the same seed and size always give the same world.
        num_entities: How many entities: a quarter cities, a fifth creatures, a fifth inventions,
            the rest people. At least 40, at most 3000.

    Returns:
        The world.

    Raises:
        ValueError: `num_entities` is out of range.
    """
    if not 40 <= num_entities <= 3000:
        raise ValueError(f"num_entities must be between 40 and 3000, got {num_entities}")
    rng = _rng(seed, "world")
    names = _NameMaker(_rng(seed, "names"))
    counts = _kind_counts(num_entities)
    entities: list[Entity] = []

    def add(name: str, kind: str, facts: list[Fact]) -> Entity:
        entity = Entity(id=_slug(name), name=name, kind=kind, facts=tuple(facts))
        entities.append(entity)
        return entity

    def pick(attribute: str) -> Fact:
        spec = ATTRIBUTE[attribute]
        if spec.values:
            return Fact(attribute, rng.choice(spec.values))
        assert spec.year_range is not None
        return Fact(attribute, str(rng.randint(*spec.year_range)))

    def link(attribute: str, target: Entity) -> Fact:
        return Fact(attribute, target.name, target.id)

    cities = [
        add(
            names.word((2, 1), NAME_SUFFIXES["city"]),
            "city",
            [pick("country"), pick("river"), pick("founded"), pick("dish"), pick("trade")],
        )
        for _ in range(counts["city"])
    ]
    people = []
    for _ in range(counts["person"]):
        name = f"{names.word((2,))} {names.word((2, 3))}"
        facts = [
            link("birthplace", rng.choice(cities)),
            pick("profession"),
            pick("instrument"),
            pick("birth_year"),
        ]
        people.append(add(name, "person", [*facts, pick("favorite_color")]))
    for _ in range(counts["creature"]):
        facts = [
            pick("habitat"),
            pick("diet"),
            pick("coat"),
            pick("lifespan"),
            link("found_near", rng.choice(cities)),
        ]
        add(names.word((2, 1), NAME_SUFFIXES["creature"]), "creature", facts)
    for _ in range(counts["invention"]):
        inventor = rng.choice(people)
        year = int(inventor.fact("birth_year").value) + rng.randint(20, 60)
        home = rng.choice(cities)
        if rng.random() < 0.5:  # often first built where its inventor was born
            home = next(c for c in cities if c.id == inventor.fact("birthplace").ref)
        facts = [
            link("inventor", inventor),
            Fact("invented_year", str(year)),
            pick("material"),
            pick("purpose"),
            link("first_built_in", home),
        ]
        add(names.word((2, 1), NAME_SUFFIXES["invention"]), "invention", facts)
    return World(seed=seed, entities=tuple(entities))


def split_pairs(
    world: World, heldout_share: float = 0.15
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split the world's (entity, attribute) pairs into those the chats ask about and the held-out ones.

    The split is stratified: every attribute holds out the same share of its pairs (at least one).
    Held-out pairs are still stated in the articles and the pretraining documents; only the
    question files (chats, context chats, preferences) never ask about them.

    Args:
        world: The world.
        heldout_share: The share of pairs to hold out, in [0, 0.5].

    Returns:
        (asked pairs, held-out pairs), each in world order.
    """
    if not 0 <= heldout_share <= 0.5:
        raise ValueError(f"heldout_share must be in [0, 0.5], got {heldout_share}")
    rng = _rng(world.seed, "split")
    heldout: set[tuple[str, str]] = set()
    for spec in ATTRIBUTES:
        pairs = [(e.id, spec.name) for e in world.of_kind(spec.kind)]
        rng.shuffle(pairs)
        take = max(1, round(len(pairs) * heldout_share)) if heldout_share > 0 else 0
        heldout.update(pairs[:take])
    everything = world.pairs()
    return [p for p in everything if p not in heldout], [p for p in everything if p in heldout]


def multi_hop_questions(world: World) -> list[dict[str, Any]]:
    """Two-hop questions whose answer takes two articles (for agents that search the articles).

    Returns:
        One dict per question: `question`, `answer` and `hops`, the (entity id, attribute) pairs
        to look up, in order.
    """
    hops = {
        "person": ("birthplace", "country"),
        "creature": ("found_near", "river"),
        "invention": ("inventor", "birthplace"),
    }
    questions = {
        "person": "In which country was {s} born?",
        "creature": "Which river flows through the city near which {s} is often seen?",
        "invention": "In which city was the inventor of {s} born?",
    }
    rows: list[dict[str, Any]] = []
    for entity in world.entities:
        if entity.kind not in hops:
            continue
        first, second = hops[entity.kind]
        target = world.entity(entity.fact(first).ref or "")
        rows.append(
            {
                "question": _sentence(questions[entity.kind], entity),
                "answer": target.fact(second).value,
                "hops": [[entity.id, first], [target.id, second]],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Text: sentences, articles, questions, answers
# ---------------------------------------------------------------------------------------------


def _sentence(template: str, entity: Entity, value: str = "") -> str:
    text = template.format(s=entity.subject, v=value, av=_indefinite(value))
    return text[0].upper() + text[1:]


def state(entity: Entity, attribute: str, template: int) -> str:
    """One sentence stating a fact: `ATTRIBUTE[attribute].statements[template]`, filled in."""
    spec = ATTRIBUTE[attribute]
    return _sentence(spec.statements[template], entity, entity.fact(attribute).value)


def ask(entity: Entity, attribute: str, template: int, *, heldout: bool = False) -> str:
    """One question about a fact, from the chat templates or, with `heldout`, the held-out ones."""
    spec = ATTRIBUTE[attribute]
    return _sentence((spec.heldout_questions if heldout else spec.questions)[template], entity)


def template_pattern(template: str) -> re.Pattern[str]:
    """A regex whose `fullmatch` accepts any question or sentence rendered from `template`.

    The placeholders match any text and the first letter either case, so the regex recognises the
    template whatever entity or value filled it in.
    """
    parts = re.split(r"(\{s\}|\{v\}|\{av\})", template)
    body = "".join(".+?" if p in ("{s}", "{v}", "{av}") else re.escape(p) for p in parts)
    if template[:1].isalpha():
        body = f"[{template[0].upper()}{template[0].lower()}]" + body[1:]
    return re.compile(body)


def mentions(text: str, value: str) -> bool:
    """Whether `value` occurs in `text` as whole words (`red` is not in `Fredor`)."""
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text) is not None


@dataclass(frozen=True)
class Sentence:
    """One sentence of an article.

    Attributes:
        text: The sentence.
        attribute: The attribute it states, or None for the opening and filler sentences.
    """

    text: str
    attribute: str | None


@dataclass(frozen=True)
class Article:
    """One entity's article: two paragraphs, each stating every fact once, with different wordings.

    Attributes:
        entity: The entity.
        paragraphs: The sentences of each paragraph.
    """

    entity: Entity
    paragraphs: tuple[tuple[Sentence, ...], ...]

    @property
    def sentences(self) -> list[Sentence]:
        """Every sentence, in order."""
        return [s for p in self.paragraphs for s in p]

    @property
    def text(self) -> str:
        """The article's text: paragraphs separated by a blank line."""
        return "\n\n".join(" ".join(s.text for s in p) for p in self.paragraphs)

    def to_row(self) -> dict[str, Any]:
        """The articles.jsonl row."""
        e = self.entity
        facts = [{"attribute": f.attribute, "value": f.value, "ref": f.ref} for f in e.facts]
        return {"id": e.id, "title": e.name, "kind": e.kind, "text": self.text, "facts": facts}


ARTICLE_WORDS = (80, 150)
"""The inclusive range of an article's length in words."""


def write_article(entity: Entity, rng: random.Random) -> Article:
    """Write one article about `entity`, choosing wordings and sentence order with `rng`.

    The first paragraph opens with a sentence naming the entity's kind, then states every fact;
    the second states every fact again with another template. Filler sentences (no facts) pad
    the text to at least `ARTICLE_WORDS[0]` words.
    """
    fillers = list(FILLERS[entity.kind])
    rng.shuffle(fillers)
    first_pass = [f.attribute for f in entity.facts]
    second_pass = list(first_pass)
    rng.shuffle(first_pass)
    rng.shuffle(second_pass)
    used: dict[str, int] = {}
    first = [Sentence(_sentence(rng.choice(INTROS[entity.kind]), entity), None)]
    for attribute in first_pass:
        used[attribute] = rng.randrange(len(ATTRIBUTE[attribute].statements))
        first.append(Sentence(state(entity, attribute, used[attribute]), attribute))
    second = []
    for attribute in second_pass:
        choices = [i for i in range(len(ATTRIBUTE[attribute].statements)) if i != used[attribute]]
        second.append(Sentence(state(entity, attribute, rng.choice(choices)), attribute))
    # Pad with fillers, alternating paragraphs, at positions drawn between the fact sentences.
    paragraphs = [first, second]
    words = sum(len(s.text.split()) for s in first + second)
    target = rng.randint(ARTICLE_WORDS[0], ARTICLE_WORDS[0] + 40)
    for i, filler in enumerate(fillers):
        if words >= target and i >= 1:
            break
        sentence = Sentence(_sentence(filler, entity), None)
        paragraph = paragraphs[i % 2]
        paragraph.insert(rng.randint(1 if paragraph is first else 0, len(paragraph)), sentence)
        words += len(sentence.text.split())
    return Article(entity, (tuple(first), tuple(second)))


def write_articles(world: World) -> list[Article]:
    """The canonical article of every entity (articles.jsonl), in world order."""
    rng = _rng(world.seed, "articles")
    return [write_article(e, rng) for e in world.entities]


def _answer(rng: random.Random, entity: Entity, attribute: str) -> str:
    """A one-sentence answer stating the fact, in one of its statement templates."""
    return state(entity, attribute, rng.randrange(len(ATTRIBUTE[attribute].statements)))


# ---------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------


def evaluate(a: int, op: str, b: int) -> int:
    """The result of `a op b` for the three operators of `ARITHMETIC_OPS`."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}")


Problem = tuple[int, str, int]


def arithmetic_problems() -> dict[str, list[Problem]]:
    """Every arithmetic problem of the world, by operator.

    Addition of two numbers below 50, subtraction within 0..99 with a result that is not negative,
    multiplication of 1..12 by 1..20.
    """
    return {
        "+": [(a, "+", b) for a in range(50) for b in range(50)],
        "-": [(a, "-", b) for a in range(100) for b in range(a + 1)],
        "*": [(a, "*", b) for a in range(1, 13) for b in range(1, 21)],
    }


def split_arithmetic(seed: int, heldout: int) -> tuple[dict[str, list[Problem]], list[Problem]]:
    """Hold out `heldout` problems (3/8 additions, 3/8 subtractions, 1/4 products) from training.

    Returns:
        (training problems by operator, held-out problems).
    """
    rng = _rng(seed, "arithmetic-split")
    problems = arithmetic_problems()
    shares = {"+": heldout * 3 // 8, "-": heldout * 3 // 8}
    shares["*"] = heldout - shares["+"] - shares["-"]
    train: dict[str, list[Problem]] = {}
    held: list[Problem] = []
    for op, items in problems.items():
        picked = set(rng.sample(range(len(items)), shares[op]))
        held.extend(p for i, p in enumerate(items) if i in picked)
        train[op] = [p for i, p in enumerate(items) if i not in picked]
    return train, held


def _line(problem: Problem) -> str:
    a, op, b = problem
    return f"{a} {op} {b} = {evaluate(a, op, b)}"


def _draw(rng: random.Random, train: dict[str, list[Problem]]) -> Problem:
    return rng.choice(train[rng.choice(("+", "+", "-", "-", "*"))])


ARITHMETIC_QUESTIONS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {word} {b}?")


def _arithmetic_question(rng: random.Random, problem: Problem) -> str:
    a, op, b = problem
    return rng.choice(ARITHMETIC_QUESTIONS).format(a=a, op=op, b=b, word=ARITHMETIC_OPS[op])


# ---------------------------------------------------------------------------------------------
# The data files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldParams:
    """Everything that decides the world's files besides the seed (recorded in the manifest).

    Attributes:
        num_entities: Entities in the world (see `build_world`).
        heldout_share: Share of (entity, attribute) pairs the question files never ask about.
        article_copies: Copies of each article in pretrain.jsonl, each worded differently; the
            first is the text of articles.jsonl.
        arithmetic_docs: Pretraining documents of worked arithmetic lines.
        arithmetic_lines: Lines per arithmetic document.
        chats_per_fact: Single-turn chats per asked pair, each with a different question template.
        multi_turn_chats: Chats with two or three questions about the world.
        arithmetic_chats: Chats about arithmetic (one or two questions).
        system_share: Share of chats (and context chats) that open with a system turn.
        context_chats: Answer-from-context chats.
        refusal_share: Share of context chats whose question the context cannot answer.
        arithmetic_preferences: Preference pairs about arithmetic, besides one per asked pair.
        heldout_arithmetic: Arithmetic problems held out of every training file, asked in heldout.jsonl.
        unknown_preferences: Preference pairs about people and places the world does not have (invented
            names no file mentions), appended after the others: `chosen` says the name is not known,
            `rejected` states a made-up fact about it.
        known_preferences: Preference pairs about asked facts of real people and places, appended after
            the `unknown` ones: `chosen` states the fact, `rejected` is the `unknown` pairs' "not known"
            reply with the real name (so denying is learned for strangers, not for everyone).
    """

    num_entities: int = 300
    heldout_share: float = 0.15
    article_copies: int = 2
    arithmetic_docs: int = 300
    arithmetic_lines: int = 20
    chats_per_fact: int = 2
    multi_turn_chats: int = 600
    arithmetic_chats: int = 1000
    system_share: float = 0.3
    context_chats: int = 2000
    refusal_share: float = 0.2
    arithmetic_preferences: int = 200
    heldout_arithmetic: int = 120
    unknown_preferences: int = 600
    known_preferences: int = 600

    def __post_init__(self) -> None:
        shares = {"heldout_share": (0.0, 0.5), "system_share": (0.0, 1.0), "refusal_share": (0.0, 1.0)}
        for name, (low, high) in shares.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            if f.name not in shares and (
                not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 0
            ):
                raise ValueError(f"{f.name} must be an integer >= 0, got {getattr(self, f.name)!r}")
        if self.article_copies < 1 or self.heldout_arithmetic > 1000:
            raise ValueError("article_copies must be at least 1 and heldout_arithmetic at most 1000")


PRESETS: dict[str, WorldParams] = {
    "default": WorldParams(),
    # The world the quickstart trains the default model on within its 5-minute budget: few entities,
    # so every fact is seen often; four wordings of each article, so a fact is known apart from one
    # phrasing; a larger held-out share, so the closed-book score rests on more questions; little
    # arithmetic, which a model this small does not learn to generalise in the budget.
    "quickstart": WorldParams(
        num_entities=40, heldout_share=0.3, article_copies=4, arithmetic_docs=50, arithmetic_chats=200
    ),
}
"""Named parameter sets: `generate.py --preset NAME`."""


def _system(rng: random.Random, share: float) -> list[dict[str, str]]:
    return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < share else []


def build_pretrain(world: World, articles: list[Article], params: WorldParams) -> list[dict[str, Any]]:
    """pretrain.jsonl: every article (`article_copies` wordings) and documents of arithmetic lines."""
    rng = _rng(world.seed, "pretrain")
    train_problems, _ = split_arithmetic(world.seed, params.heldout_arithmetic)
    docs: list[dict[str, Any]] = []
    for article in articles:
        versions = [article] + [write_article(article.entity, rng) for _ in range(params.article_copies - 1)]
        for version in versions:
            docs.append(
                {"source": f"article:{article.entity.id}", "text": f"{article.entity.name}\n\n{version.text}"}
            )
    for _ in range(params.arithmetic_docs):
        lines = [_line(_draw(rng, train_problems)) for _ in range(params.arithmetic_lines)]
        docs.append({"source": "arithmetic", "text": "\n".join(lines)})
    rng.shuffle(docs)
    return [{"id": f"pretrain-{i:05d}", **doc} for i, doc in enumerate(docs)]


def build_chats(world: World, asked: list[tuple[str, str]], params: WorldParams) -> list[dict[str, Any]]:
    """chats.jsonl: question/answer chats about the asked pairs, and arithmetic chats."""
    rng = _rng(world.seed, "chats")
    train_problems, _ = split_arithmetic(world.seed, params.heldout_arithmetic)
    chats: list[dict[str, Any]] = []

    def fact_turns(entity: Entity, attribute: str, template: int) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": ask(entity, attribute, template)},
            {"role": "assistant", "content": _answer(rng, entity, attribute)},
        ]

    for entity_id, attribute in asked:
        entity = world.entity(entity_id)
        count = min(params.chats_per_fact, len(ATTRIBUTE[attribute].questions))
        for template in rng.sample(range(len(ATTRIBUTE[attribute].questions)), count):
            messages = _system(rng, params.system_share) + fact_turns(entity, attribute, template)
            chats.append({"messages": messages, "meta": {"kind": "fact", "asks": [[entity_id, attribute]]}})
    by_entity: dict[str, list[str]] = {}
    for entity_id, attribute in asked:
        by_entity.setdefault(entity_id, []).append(attribute)
    entity_ids = list(by_entity)
    for _ in range(params.multi_turn_chats):
        turns = rng.choice((2, 2, 3))
        if rng.random() < 0.5:  # several questions about one entity
            entity_id = rng.choice(entity_ids)
            attributes = by_entity[entity_id]
            pairs = [(entity_id, a) for a in rng.sample(attributes, min(turns, len(attributes)))]
        else:
            pairs = rng.sample(asked, turns)
        messages = _system(rng, params.system_share)
        for entity_id, attribute in pairs:
            template = rng.randrange(len(ATTRIBUTE[attribute].questions))
            messages += fact_turns(world.entity(entity_id), attribute, template)
        chats.append({"messages": messages, "meta": {"kind": "fact", "asks": [list(p) for p in pairs]}})
    for _ in range(params.arithmetic_chats):
        messages = _system(rng, params.system_share)
        for _ in range(rng.choice((1, 1, 1, 2))):
            problem = _draw(rng, train_problems)
            messages.append({"role": "user", "content": _arithmetic_question(rng, problem)})
            messages.append({"role": "assistant", "content": f"{_line(problem)}."})
        chats.append({"messages": messages, "meta": {"kind": "arithmetic", "asks": []}})
    rng.shuffle(chats)
    return [{"id": f"chat-{i:05d}", **chat} for i, chat in enumerate(chats)]


def format_context_prompt(documents: Sequence[tuple[str, str]], question: str) -> str:
    """The user message of an answer-from-context chat.

    Args:
        documents: (title, excerpt) pairs, numbered from 1 in the prompt.
        question: The question.

    Returns:
        `CONTEXT_INSTRUCTION`, the numbered documents and the question, separated by blank lines.
    """
    context = "\n".join(f"[{i}] {title}: {text}" for i, (title, text) in enumerate(documents, start=1))
    return f"{CONTEXT_INSTRUCTION}\n\nContext:\n{context}\n\nQuestion: {question}"


def _windows(article: Article, rng: random.Random) -> list[tuple[int, int]]:
    """Excerpt windows (start, end) of 3 to 5 consecutive sentences over the whole article."""
    count = len(article.sentences)
    size = rng.randint(3, 5)
    return [(start, start + size) for start in range(0, count - size + 1)]


def _excerpt(article: Article, window: tuple[int, int]) -> str:
    return " ".join(s.text for s in article.sentences[window[0] : window[1]])


def _states(article: Article, window: tuple[int, int], attribute: str) -> bool:
    return any(s.attribute == attribute for s in article.sentences[window[0] : window[1]])


def _context_documents(
    rng: random.Random, world: World, by_id: dict[str, Article], pair: tuple[str, str], refuse: bool
) -> list[tuple[str, str, str]] | None:
    """The (entity id, title, excerpt) documents of one context chat, or None when this draw does not fit.

    Answerable: an excerpt of the entity's article that states the fact, and half of the time an
    excerpt of another article. Refusal: half of the time an excerpt of the entity's own article
    that leaves the fact out (plus, half of those times, another article's), otherwise an excerpt
    of another article that never names the entity. A refusal's context never holds the answer's
    words.
    """
    entity_id, attribute = pair
    entity = world.entity(entity_id)
    value = entity.fact(attribute).value
    article = by_id[entity_id]
    documents: list[tuple[str, str, str]] = []
    if not refuse or rng.random() < 0.5:
        windows = [w for w in _windows(article, rng) if _states(article, w, attribute) != refuse]
        if not windows:
            return None
        documents.append((entity_id, entity.name, _excerpt(article, rng.choice(windows))))
    if not documents or rng.random() < 0.5:
        other = by_id[rng.choice(world.entities).id]
        if other.entity.id == entity_id:
            return None
        documents.append(
            (other.entity.id, other.entity.name, _excerpt(other, rng.choice(_windows(other, rng))))
        )
    rng.shuffle(documents)
    context = " ".join(f"{title} {text}" for _, title, text in documents)
    if refuse and mentions(context, value):
        return None  # the answer's words must not appear at all
    if refuse and entity_id not in [d[0] for d in documents] and mentions(context, entity.name):
        return None  # another article names the entity: keep the context wholly about others
    return documents


def build_context_chats(
    world: World, articles: list[Article], asked: list[tuple[str, str]], params: WorldParams
) -> list[dict[str, Any]]:
    """context_chats.jsonl: answer-from-context chats over article excerpts, a share of them refusals.

    Each chat asks about an asked pair; the documents are drawn by `_context_documents`. An
    answerable chat's reply states the fact, a refusal's is `REFUSAL`.
    """
    rng = _rng(world.seed, "context")
    by_id = {a.entity.id: a for a in articles}
    refusals = round(params.context_chats * params.refusal_share)
    plan = [True] * refusals + [False] * (params.context_chats - refusals)
    rng.shuffle(plan)
    rows: list[dict[str, Any]] = []
    for refuse in plan:
        for _ in range(1000):  # redraw until the context fits (a few tries at most)
            entity_id, attribute = rng.choice(asked)
            documents = _context_documents(rng, world, by_id, (entity_id, attribute), refuse)
            if documents is not None:
                break
        else:
            raise RuntimeError("could not draw a context chat: the world is too small")
        entity = world.entity(entity_id)
        template = rng.randrange(len(ATTRIBUTE[attribute].questions))
        question = ask(entity, attribute, template)
        prompt = format_context_prompt([(title, text) for _, title, text in documents], question)
        answer = REFUSAL if refuse else _answer(rng, entity, attribute)
        messages = [*_system(rng, params.system_share), {"role": "user", "content": prompt}]
        meta = {
            "answerable": not refuse,
            "entity": entity_id,
            "attribute": attribute,
            "answer": None if refuse else entity.fact(attribute).value,
            "documents": [d[0] for d in documents],
        }
        rows.append({"messages": [*messages, {"role": "assistant", "content": answer}], "meta": meta})
    return [{"id": f"context-{i:05d}", **row} for i, row in enumerate(rows)]


def _text_words() -> set[str]:
    """Every word (lower case) that the world's files can say besides entity names and numbers."""
    texts: list[str] = [CONTEXT_INSTRUCTION, REFUSAL, *SYSTEM_PROMPTS, *ARITHMETIC_QUESTIONS]
    texts += ARITHMETIC_OPS.values()
    for spec in ATTRIBUTES:
        texts += [*spec.statements, *spec.questions, *spec.heldout_questions, *spec.values]
    for templates in (*INTROS.values(), *FILLERS.values(), *UNKNOWN_ANSWERS.values()):
        texts += templates
    texts += ["the an a"]  # the articles `_sentence` and `_indefinite` add
    return {w.lower() for text in texts for w in re.findall(r"[A-Za-z]+", text)}


def unknown_names(world: World, count: int) -> list[tuple[str, str]]:
    """`count` (kind, name) pairs of people and places the world does not have, from their own stream.

    The names come from the world's own name maker (same syllables, same kind endings), which
    first takes every name word of the world: no word of an invented name is a word of an entity's
    name, or a prefix of one or the other way round, and, while the space of such prefixes lasts,
    none shares its first `_PREFIX` letters with one. A name word that is also a word of any
    template or value list is drawn again, so no other file ever contains an invented name.

    Args:
        world: The world.
        count: How many names.

    Returns:
        (kind, name) pairs, kind `person` or `city`, names distinct, in draw order.
    """
    rng = _rng(world.seed, "unknown-names")
    names = _NameMaker(_rng(world.seed, "unknown-name-words"))
    for entity in world.entities:
        for word in entity.name.lower().split():
            names._take(word)
    banned = _text_words()

    def draw(syllables: Sequence[int], suffixes: Sequence[str] = ()) -> str:
        while True:  # a clash with a template word is rare: the syllables seldom spell English
            drawn = names.word(syllables, suffixes)
            if drawn.lower() not in banned:
                return drawn

    out: list[tuple[str, str]] = []
    for _ in range(count):
        kind = rng.choice(("person", "city"))
        if kind == "person":
            out.append((kind, f"{draw((2,))} {draw((2, 3))}"))
        else:
            out.append((kind, draw((2, 1), NAME_SUFFIXES["city"])))
    return out


def _unknown_preferences(world: World, params: WorldParams) -> list[dict[str, Any]]:
    """The `unknown` pairs: a question about an invented person or place; "not known" against a made-up fact.

    From streams of their own, so the other pairs (and every other file) do not shift.
    """
    rng = _rng(world.seed, "preferences-unknown")
    rows: list[dict[str, Any]] = []
    for kind, name in unknown_names(world, params.unknown_preferences):
        spec = rng.choice([s for s in ATTRIBUTES if s.kind == kind])
        stranger = Entity(id=_slug(name), name=name, kind=kind, facts=())
        prompt = _system(rng, params.system_share)
        prompt.append({"role": "user", "content": _sentence(rng.choice(spec.questions), stranger)})
        chosen = rng.choice(UNKNOWN_ANSWERS[kind]).format(name=name)
        rejected = _sentence(rng.choice(spec.statements), stranger, rng.choice(world.value_set(spec.name)))
        meta = {"kind": "unknown", "entity": None, "attribute": spec.name, "name": name}
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": meta})
    return rows


def _known_preferences(
    world: World, asked: list[tuple[str, str]], params: WorldParams
) -> list[dict[str, Any]]:
    """The `known` pairs: an asked fact of a real person or place; the fact against "not known".

    The counterweight of the `unknown` pairs: the same denial wordings, with a name the world has.
    Asked pairs (never held-out ones) of the kinds `UNKNOWN_ANSWERS` covers, cycled in a shuffled order
    so each is used about equally; from a stream of its own, so no other row shifts.
    """
    rng = _rng(world.seed, "preferences-known")
    pool = [(e, a) for e, a in asked if ATTRIBUTE[a].kind in UNKNOWN_ANSWERS]
    if not pool:
        return []
    rng.shuffle(pool)
    rows: list[dict[str, Any]] = []
    for i in range(params.known_preferences):
        entity_id, attribute = pool[i % len(pool)]
        entity, spec = world.entity(entity_id), ATTRIBUTE[attribute]
        prompt = _system(rng, params.system_share)
        prompt.append({"role": "user", "content": ask(entity, attribute, rng.randrange(len(spec.questions)))})
        chosen = _sentence(rng.choice(spec.statements), entity, entity.fact(attribute).value)
        rejected = rng.choice(UNKNOWN_ANSWERS[spec.kind]).format(name=entity.name)
        meta = {"kind": "known", "entity": entity_id, "attribute": attribute}
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": meta})
    return rows


def build_preferences(
    world: World, asked: list[tuple[str, str]], params: WorldParams
) -> list[dict[str, Any]]:
    """preferences.jsonl: one pair per asked fact, arithmetic pairs, then pairs about unknown names.

    `fact`: `chosen` states the fact; `rejected` says the same sentence with the value of the same
    attribute of another entity. `arithmetic`: a result off by a little. These are shuffled
    together. `unknown` pairs (`unknown_preferences`, from their own streams, appended after the
    others so that adding them changed no earlier row): a chat question about a person or place the
    world does not have; `chosen` says the name is not known (`UNKNOWN_ANSWERS`),
    `rejected` states a fact about it with a random value of the attribute. `known` pairs
    (`known_preferences`, their own stream, appended last): an asked fact of a real person or place,
    `chosen` states it, `rejected` is the same denial with the real name.
    """
    rng = _rng(world.seed, "preferences")
    train_problems, _ = split_arithmetic(world.seed, params.heldout_arithmetic)
    in_use = {spec.name: world.values_in_use(spec.name) for spec in ATTRIBUTES}
    rows: list[dict[str, Any]] = []
    for entity_id, attribute in asked:
        entity = world.entity(entity_id)
        value = entity.fact(attribute).value
        wrong = [v for v in in_use[attribute] if v != value] or [
            v for v in world.value_set(attribute) if v != value
        ]
        template = rng.randrange(len(ATTRIBUTE[attribute].questions))
        prompt = _system(rng, params.system_share)
        prompt.append({"role": "user", "content": ask(entity, attribute, template)})
        statement = rng.choice(ATTRIBUTE[attribute].statements)
        chosen = _sentence(statement, entity, value)
        rejected = _sentence(statement, entity, rng.choice(wrong))
        meta = {"kind": "fact", "entity": entity_id, "attribute": attribute}
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": meta})
    for _ in range(params.arithmetic_preferences):
        a, op, b = _draw(rng, train_problems)
        result = evaluate(a, op, b)
        wrong_result = result + rng.choice((-10, -2, -1, 1, 2, 10))
        if wrong_result < 0:
            wrong_result = result + rng.choice((1, 2, 10))
        prompt = [
            *_system(rng, params.system_share),
            {"role": "user", "content": _arithmetic_question(rng, (a, op, b))},
        ]
        rows.append(
            {
                "prompt": prompt,
                "chosen": f"{a} {op} {b} = {result}.",
                "rejected": f"{a} {op} {b} = {wrong_result}.",
                "meta": {"kind": "arithmetic", "entity": None, "attribute": "arithmetic"},
            }
        )
    rng.shuffle(rows)
    rows += _unknown_preferences(world, params)
    rows += _known_preferences(world, asked, params)
    return [{"id": f"preference-{i:05d}", **row} for i, row in enumerate(rows)]


def _choices(rng: random.Random, answer: str, pool: Iterable[str]) -> tuple[list[str], int]:
    distractors = rng.sample(sorted({v for v in pool if v != answer}), 3)
    label = rng.randrange(4)
    return [*distractors[:label], answer, *distractors[label:]], label


def build_heldout(
    world: World, heldout_pairs: list[tuple[str, str]], params: WorldParams
) -> list[dict[str, Any]]:
    """heldout.jsonl: closed-book questions about the held-out pairs, and held-out arithmetic.

    Fact questions use `AttributeSpec.heldout_questions` (never used in a training file); the four
    choices are the answer and three other values of the attribute's value set. Arithmetic items
    ask held-out problems; their choices are the result and three numbers near it. Each choice also
    comes as the full answer sentences a model trained on the chats would reply with (every
    statement template, filled in with that choice), so a scorer can compare whole replies.
    """
    rng = _rng(world.seed, "heldout")
    _, held_problems = split_arithmetic(world.seed, params.heldout_arithmetic)
    rows: list[dict[str, Any]] = []
    for entity_id, attribute in heldout_pairs:
        entity = world.entity(entity_id)
        answer = entity.fact(attribute).value
        template = rng.randrange(len(ATTRIBUTE[attribute].heldout_questions))
        choices, label = _choices(rng, answer, world.value_set(attribute))
        statements = ATTRIBUTE[attribute].statements
        rows.append(
            {
                "kind": "fact",
                "question": ask(entity, attribute, template, heldout=True),
                "answer": answer,
                "choices": choices,
                "label": label,
                "statements": [[_sentence(t, entity, choice) for t in statements] for choice in choices],
                "entity": entity_id,
                "attribute": attribute,
            }
        )
    for a, op, b in held_problems:
        result = evaluate(a, op, b)
        near = [str(n) for n in range(max(0, result - 12), result + 13)]
        choices, label = _choices(rng, str(result), near)
        rows.append(
            {
                "kind": "arithmetic",
                "question": f"What is {a} {op} {b}?",
                "answer": str(result),
                "choices": choices,
                "label": label,
                "statements": [[f"{a} {op} {b} = {choice}."] for choice in choices],
                "entity": None,
                "attribute": "arithmetic",
            }
        )
    return [{"id": f"heldout-{i:05d}", **row} for i, row in enumerate(rows)]


def build_files(seed: int = 0, params: WorldParams | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every data file's rows, in memory: the keys are `FILES`.

    Args:
        seed: The seed.
        params: The parameters (defaults: `WorldParams()`).

    Returns:
        The rows of each file, by file name.
    """
    params = params or WorldParams()
    world = build_world(seed, params.num_entities)
    asked, heldout = split_pairs(world, params.heldout_share)
    articles = write_articles(world)
    return {
        "articles.jsonl": [a.to_row() for a in articles],
        "pretrain.jsonl": build_pretrain(world, articles, params),
        "chats.jsonl": build_chats(world, asked, params),
        "context_chats.jsonl": build_context_chats(world, articles, asked, params),
        "preferences.jsonl": build_preferences(world, asked, params),
        "heldout.jsonl": build_heldout(world, heldout, params),
    }


# ---------------------------------------------------------------------------------------------
# Files on disk and the manifest
# ---------------------------------------------------------------------------------------------


def dumps(row: Any) -> str:
    """One JSON line as every file writes it: sorted keys, fixed separators, no trailing newline."""
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expected(seed: int, params: WorldParams) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "seed": seed, "params": dataclasses.asdict(params)}


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest in `out_dir`, or None when there is none or it cannot be read."""
    try:
        manifest = json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_current(out_dir: str | os.PathLike[str], seed: int = 0, params: WorldParams | None = None) -> bool:
    """Whether `out_dir` already holds this world: same format version, seed and parameters, files intact."""
    params = params or WorldParams()
    manifest = read_manifest(out_dir)
    if manifest is None or any(manifest.get(k) != v for k, v in _expected(seed, params).items()):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or sorted(files) != sorted(FILES):
        return False
    for name in FILES:
        path = Path(out_dir) / name
        if not path.is_file() or sha256(path) != files[name].get("sha256"):
            return False
    return True


def generate(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_entities: int = WorldParams.num_entities,
    force: bool = False,
    **params: Any,
) -> dict[str, Path]:
    """Write the world's files and `manifest.json` into `out_dir`, unless they are already there.

    Args:
        out_dir: The folder (created if missing).
        seed: The seed.
        num_entities: Entities in the world.
        force: Write even when the manifest says the folder already holds this world.
        **params: Any other field of `WorldParams`.

    Returns:
        The path of every file, by file name, `manifest.json` included.
    """
    config = WorldParams(num_entities=num_entities, **params)
    out = Path(out_dir)
    paths = {name: out / name for name in (*FILES, MANIFEST)}
    if not force and is_current(out, seed, config):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a run cut short leaves no manifest that matches
    files: dict[str, Any] = {}
    for name, rows in build_files(seed, config).items():
        data = "".join(dumps(row) + "\n" for row in rows).encode("utf-8")
        _write_atomic(paths[name], data)
        files[name] = {"rows": len(rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {**_expected(seed, config), "generator": "examples/world/world.py", "files": files}
    text = json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    _write_atomic(paths[MANIFEST], text.encode("utf-8"))
    return paths


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every row of a JSONL file written by `generate`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
