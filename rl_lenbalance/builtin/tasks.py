"""The built-in tasks, by name in `TASKS` (a recipe's `task.name`).

`arithmetic`: small arithmetic and word problems with a verifiable integer answer. Prompts mix instruction styles
(just the number ... show all your work) so that completion lengths are long-tailed and differ within a GRPO group,
which is what the length-aware scheduler is for.

`open_ended`: prompts unlike arithmetic (short facts, open questions, lists, code, translation, long explanations)
whose natural answers run from a word to hundreds of tokens, rewarded for answering in the requested form.
"""

from __future__ import annotations

import random
import re
from decimal import Decimal, InvalidOperation

__all__ = ["INSTRUCTIONS", "OPEN_REWARD_FUNCS", "OPEN_STYLES", "REWARD_FUNCS", "TASKS", "arithmetic_dataset",
           "correctness_reward", "extract_answer", "format_reward", "nonempty_reward", "open_ended_dataset",
           "open_format_reward"]

# (instruction, weight): short, medium and long answers.
INSTRUCTIONS: list[tuple[str, int]] = [
    ("Answer with just the number.", 3),
    ("Give only the final answer, no explanation.", 2),
    ("", 2),
    ("Think briefly, then write the final answer as 'Answer: N'.", 2),
    ("Explain step by step, then give the final answer as 'Answer: N'.", 3),
    ("Show your work in detail, explaining every step, and finish with a line 'Answer: N'.", 2),
    ("First restate the problem in your own words, then solve it carefully step by step, check your result, "
     "and end with 'Answer: N'.", 1),
]

NAMES = ["Tom", "Sara", "Ali", "Mia", "Ben", "Lena", "Omar", "Emma", "Raj", "Nora", "Leo", "Zoe"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "books", "cookies", "coins", "cards", "shells", "stamps"]


def _bare(rng: random.Random) -> tuple[str, int]:
    """A bare expression with one or two operations: 'What is 17 + 25?'."""
    kind = rng.choice(["+", "-", "*", "+-", "*+"])
    if kind == "+":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        return f"What is {a} + {b}?", a + b
    if kind == "-":
        a = rng.randint(10, 90)
        b = rng.randint(1, a)
        return f"What is {a} - {b}?", a - b
    if kind == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} * {b}?", a * b
    if kind == "+-":
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        c = rng.randint(1, a + b)
        return f"What is {a} + {b} - {c}?", a + b - c
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 30)
    return f"What is {a} * {b} + {c}?", a * b + c


def _word(rng: random.Random) -> tuple[str, int]:
    """A one- or two-step word problem."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        return f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?", a + b
    if kind == 1:
        a = rng.randint(5, 60)
        b = rng.randint(1, a - 1)
        return f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?", a - b
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 10)
        return f"A box holds {a} {item}. How many {item} are in {b} boxes?", a * b
    if kind == 3:
        a = rng.randint(10, 50)
        b = rng.randint(1, a - 1)
        c = rng.randint(1, 20)
        return (f"There are {a} birds on a tree. {b} birds fly away, then {c} more birds arrive. "
                f"How many birds are on the tree now?", a - b + c)
    if kind == 4:
        a, b = rng.randint(2, 8), rng.randint(2, 10)
        c = rng.randint(1, a * b - 1)
        return (f"{name} buys {a} packs of {item} with {b} {item} in each pack, then gives away {c} {item}. "
                f"How many {item} does {name} have left?", a * b - c)
    if kind == 5:
        q, b = rng.randint(2, 10), rng.randint(2, 8)
        return (f"{q * b} {item} are shared equally among {b} children. How many {item} does each child get?", q)
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    return f"A pen costs {a} dollars. How many dollars do {b} pens cost?", a * b


def _instruction(rng: random.Random) -> str:
    texts, weights = zip(*INSTRUCTIONS)
    return rng.choices(texts, weights=weights)[0]


def arithmetic_dataset(num_prompts: int = 64, seed: int = 0):
    """`num_prompts` conversational rows `{"prompt": [{"role": "user", "content": ...}], "answer": "<int>"}`,
    half bare arithmetic, half word problems, with varied instructions; deterministic given `seed`."""
    from datasets import Dataset

    if num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}.")
    rng = random.Random(seed)
    prompts, answers = [], []
    for _ in range(num_prompts):
        question, answer = (_bare if rng.random() < 0.5 else _word)(rng)
        instruction = _instruction(rng)
        content = f"{question} {instruction}".strip()
        prompts.append([{"role": "user", "content": content}])
        answers.append(str(answer))
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


# ----------------------------------------------------------------------------------------------------------- rewards

_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_ANSWER_LINE = re.compile(r"\banswer\s*[*_]*\s*:\s*[*_$\s]*(" + _NUMBER + r")", re.IGNORECASE)
_LAST_NUMBER = re.compile(r"(?<![\d.])" + _NUMBER)
_ENDS_WITH_NUMBER = re.compile(r"\d[\s.*_$)\]]*$")


def _text(completion) -> str:
    """A completion's text: a plain string, or the contents of a conversational list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    return "\n".join(str(message.get("content") or "") if isinstance(message, dict) else str(message)
                     for message in completion)


def extract_answer(text: str) -> str | None:
    """The number after the last 'Answer:' if there is one, else the last number in the text, else None."""
    matches = _ANSWER_LINE.findall(text)
    if matches:
        return matches[-1]
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _number(value) -> Decimal | None:
    try:
        return Decimal(str(value).replace(",", "").strip())
    except (InvalidOperation, ValueError):
        return None


def correctness_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 where the completion's answer (see `extract_answer`) equals the reference exactly, else 0.0."""
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        found = extract_answer(_text(completion))
        got, want = _number(found) if found is not None else None, _number(reference)
        rewards.append(1.0 if got is not None and want is not None and got == want else 0.0)
    return rewards


def format_reward(prompts, completions, answer=None, **kwargs) -> list[float]:
    """0.2 where the completion has an 'Answer: <number>' line or ends with a number, else 0.0."""
    rewards = []
    for completion in completions:
        text = _text(completion).strip()
        rewards.append(0.2 if _ANSWER_LINE.search(text) or _ENDS_WITH_NUMBER.search(text) else 0.0)
    return rewards


REWARD_FUNCS = [correctness_reward, format_reward]


# -------------------------------------------------------------------------------------------------------- open-ended

OPEN_FILLERS: dict[str, list[str]] = {
    "country": ["France", "Japan", "Brazil", "Canada", "Egypt", "India", "Italy", "Kenya", "Norway", "Mexico"],
    "element": ["oxygen", "gold", "iron", "sodium", "carbon", "helium", "silver", "potassium"],
    "topic": ["photosynthesis", "the water cycle", "black holes", "inflation", "vaccines", "the printing press",
              "plate tectonics", "machine learning", "the Roman Empire", "compound interest", "recycling",
              "the internet"],
    "things": ["fruits", "countries in Europe", "programming languages", "musical instruments", "board games",
               "things to pack for a beach trip", "ways to save energy at home", "famous painters"],
    "n": ["3", "5", "7", "10"],
    "language": ["Python", "JavaScript", "C", "Rust", "Go"],
    "job": ["reverses a string", "checks whether a number is prime", "counts the words in a sentence",
            "merges two sorted lists", "returns the n-th Fibonacci number", "removes duplicates from a list",
            "parses a date like 2024-05-17"],
    "target": ["French", "Spanish", "German", "Italian", "Portuguese"],
    "sentence": ["Good morning, how are you?", "The train leaves at seven.", "I would like a cup of coffee, please.",
                 "Where is the nearest library?",
                 "It is raining again today, so we will stay at home, read our books and cook a large dinner."],
}

# style -> templates over OPEN_FILLERS' keys, short to long answers within each style.
OPEN_STYLES: dict[str, list[str]] = {
    "short": ["What is the capital of {country}? Answer in one word.",
              "What is the chemical symbol for {element}? Reply with the symbol only.",
              "On which continent is {country}?"],
    "open": ["What is the most interesting thing about {topic}?", "Why do people disagree about {topic}?",
             "What would the world be like without {topic}? Give your opinion."],
    "list": ["List {n} {things}.", "List {n} {things}, one per line, with no other text.",
             "List {n} {things}, with a sentence or two about each."],
    "code": ["Write a {language} function that {job}.",
             "Write a {language} function that {job}. Only the code, no explanation.",
             "Write a {language} function that {job}, with comments, tests and an explanation of how it works."],
    "translation": ['Translate into {target}: "{sentence}"',
                    'Translate into {target} and give only the translation: "{sentence}"',
                    'Translate into {target}, then explain the grammar of the translation word by word: "{sentence}"'],
    "explanation": ["Explain {topic} in one sentence.", "Explain {topic} to a ten-year-old.",
                    "Write a long, detailed explanation of {topic}: where it comes from, its main ideas, "
                    "and why it matters."],
}


def open_ended_dataset(num_prompts: int = 64, seed: int = 0):
    """`num_prompts` conversational rows `{"prompt": [{"role": "user", "content": ...}], "style": <OPEN_STYLES key>}`
    of styles unlike arithmetic, each a template of `OPEN_STYLES` filled from `OPEN_FILLERS`; deterministic given
    `seed`."""
    from datasets import Dataset

    if num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}.")
    rng = random.Random(seed)
    prompts, styles = [], []
    for _ in range(num_prompts):
        style = rng.choice(list(OPEN_STYLES))
        fillers = {key: rng.choice(values) for key, values in OPEN_FILLERS.items()}
        prompts.append([{"role": "user", "content": rng.choice(OPEN_STYLES[style]).format(**fillers)}])
        styles.append(style)
    return Dataset.from_dict({"prompt": prompts, "style": styles})


_LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+\S", re.MULTILINE)
_CODE = re.compile(r"```|^\s*(?:def|function|fn|func|int|void|#include|public)\b", re.MULTILINE)


def nonempty_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 where the completion has any visible text, else 0.0."""
    return [1.0 if _text(completion).strip() else 0.0 for completion in completions]


def open_format_reward(prompts, completions, style=None, **kwargs) -> list[float]:
    """0.2 where the completion has its prompt's `style` form (list: two list items or more; code: a code fence or a
    line opening a function; any other style or none given: visible text), else 0.0. Length plays no part."""
    checks = {"list": lambda text: len(_LIST_ITEM.findall(text)) >= 2, "code": lambda text: bool(_CODE.search(text))}
    rewards = []
    for completion, kind in zip(completions, style or [None] * len(completions), strict=True):
        text = _text(completion)
        rewards.append(0.2 if checks.get(kind, str.strip)(text) else 0.0)
    return rewards


OPEN_REWARD_FUNCS = [nonempty_reward, open_format_reward]

TASKS = {  # a recipe's task.name -> (dataset(num_prompts, seed), reward functions)
    "arithmetic": (arithmetic_dataset, REWARD_FUNCS),
    "open_ended": (open_ended_dataset, OPEN_REWARD_FUNCS),
}
