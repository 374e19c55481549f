"""Offline prompts of the three ForeLen-style scenarios, deterministic given a seed."""

from __future__ import annotations

import random

from rl_lenbalance.builtin.tasks import INSTRUCTIONS, _bare, _instruction, _word

TOPICS = [
    "the history of the printing press", "climate change", "the human immune system", "black holes",
    "the French Revolution", "machine learning", "the water cycle", "ancient Rome", "renewable energy",
    "the life of honeybees", "the internet", "volcanoes", "the Renaissance", "photosynthesis", "the ocean floor",
    "the Industrial Revolution", "the human brain", "space exploration", "coffee", "the Silk Road", "electricity",
    "dinosaurs", "the Olympic Games", "democracy", "music theory", "the Moon", "urban gardening", "vaccines",
    "the Great Wall of China", "chess", "rainforests", "money and banking", "earthquakes", "the solar system",
    "friendship", "a trip to the mountains", "a lost robot", "a small bakery", "a lighthouse keeper", "winter",
]
LONG_TEMPLATES = [
    "Write a detailed essay about {}.",
    "Explain {} in depth, with examples, for a curious high-school student.",
    "Write a long story about {}.",
    "Write a comprehensive guide to {}, with sections and headings.",
    "Describe {} in as much detail as you can.",
    "Write a blog post of several paragraphs about {}.",
    "Give a thorough overview of {}: background, key facts, and open questions.",
    "Write a poem about {}.",
]
STEP_BY_STEP = [text for text, _ in INSTRUCTIONS if "step" in text.lower()]  # the built-in task's reasoning styles


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def long_form(count: int, rng: random.Random) -> list[str]:
    """Requests for long, detailed outputs: distinct (template, topic) pairs."""
    pairs = [(t, topic) for t in LONG_TEMPLATES for topic in TOPICS]
    if count > len(pairs):
        raise ValueError(f"At most {len(pairs)} long-form prompts exist, asked for {count}.")
    return [template.format(topic) for template, topic in rng.sample(pairs, count)]


def reasoning(count: int, rng: random.Random) -> list[str]:
    """Arithmetic word problems (the built-in task's generators) with a step-by-step instruction."""
    return [f"{_word(rng)[0]} {rng.choice(STEP_BY_STEP)}" for _ in range(count)]


def rl_sampling(count: int, rng: random.Random) -> list[str]:
    """The GRPO task's own prompt mix (bare and word problems, every instruction style)."""
    return [f"{(_bare if rng.random() < 0.5 else _word)(rng)[0]} {_instruction(rng)}".strip() for _ in range(count)]


SOURCES = {"long": long_form, "reasoning": reasoning, "rl": rl_sampling}


def scenario_prompts(scenario: str, count: int, seed: int) -> list[str]:
    """`count` distinct-or-fresh user prompts for `scenario`."""
    return SOURCES[scenario](count, random.Random(f"{scenario}-{seed}"))
