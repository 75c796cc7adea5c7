"""Built-in demo data and rewards: every post-training task runs with no download.

- sft: short chats (optional system turn) whose assistant turns are verifiable:
  reversing a word, adding two small numbers, upper-casing a word;
- dpo: preference pairs over the same prompts: the chosen reply is correct and polite
  ("Sure! ..."), the rejected one is wrong ("No. ..."); held-out pairs (other seeds) test
  whether the preference generalises;
- grpo: "Reverse: <word>" prompts with the answer as an extra field, and the built-in reward
  `reverse` (per-position character matches with the reversed word).
"""

from __future__ import annotations

import random
from typing import Any

from pipelines.chat import ListRows

ALPHABET = "abcd"
SYSTEM = "You are a terse assistant."


def _word(rng: random.Random, lo: int = 2, hi: int = 4) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(lo, hi)))


def _qa(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        w = _word(rng)
        return f"Reverse: {w}", w[::-1]
    if kind == 1:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"Add: {a}+{b}", str(a + b)
    w = _word(rng)
    return f"Upper: {w}", w.upper()


def sft_rows(n: int = 512, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 2)):
            question, answer = _qa(rng)
            messages += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        rows.append({"messages": messages})
    return rows


def dpo_rows(n: int = 512, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed + 1)
    rows = []
    for _ in range(n):
        question, answer = _qa(rng)
        wrong = answer[::-1] + "x" if answer[::-1] != answer else answer + "x"
        rows.append({"prompt": question, "chosen": f"Sure! {answer}", "rejected": f"No. {wrong}"})
    return rows


def grpo_rows(n: int = 256, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed + 2)
    rows = []
    for _ in range(n):
        w = _word(rng, 1, 3)
        rows.append({"prompt": f"Reverse: {w}", "answer": w[::-1]})
    return rows


def rows(task: str, seed: int = 0) -> ListRows:
    builders = {"sft": sft_rows, "dpo": dpo_rows, "grpo": grpo_rows}
    return ListRows(builders[task](seed=seed), f"built-in {task} demo set")


# ---- rewards: fn(prompts, completions, **row_fields) -> list[float] -----------------------


def reverse(prompts: list[Any], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """Per-position character matches with `answer`, over the longer of the two (so extra
    characters cost); 1.0 for exactly the answer."""
    del prompts
    out = []
    for text, want in zip(completions, answer, strict=True):
        text = text.strip()
        hits = sum(a == b for a, b in zip(text, want))
        out.append(hits / max(len(text), len(want), 1))
    return out


def exact(prompts: list[Any], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 when the completion (stripped) is the answer, else 0.0."""
    del prompts
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


REWARDS = {"reverse": reverse, "exact": exact}
