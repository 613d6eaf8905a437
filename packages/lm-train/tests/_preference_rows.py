"""Preference rows with a learnable preference, shared by the preference recipe tests."""

from __future__ import annotations

import random
from typing import Any

SUBJECTS = ["the river", "the city", "paris", "london", "zorbia", "the mountain", "the sun", "quill"]
GOOD = ["sure here is your answer", "thank you for the question", "the answer is one"]
BAD = ["no", "what", "the teeth the teeth", "minus minus"]


def polite_pairs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` TRL-style pairs: polite, on-topic answers chosen over short rude ones.

    Every third prompt starts with a system turn.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        subject = rng.choice(SUBJECTS)
        prompt = [{"role": "user", "content": f"What is {subject} {rng.choice(['called', 'near', 'for'])}?"}]
        if i % 3 == 0:
            prompt.insert(0, {"role": "system", "content": "You answer questions."})
        chosen = f"{rng.choice(GOOD).capitalize()}: {subject} is {rng.choice(SUBJECTS)}."
        rejected = " ".join(rng.choice(BAD) for _ in range(rng.randint(1, 6))).capitalize() + "."
        rows.append({"id": i, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows
