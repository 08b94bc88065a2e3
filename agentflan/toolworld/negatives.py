"""Agent-FLAN's negative samples (arXiv 2403.12881, section 3.3), with gold direct answers.

Two kinds, both answered directly, with no tool call and no talk of calling one:

``no_tools``          (a) no tool is offered, but the query tempts a call ("What's the weather
                      in Oslo?"): the answer says what it cannot know, or answers from
                      knowledge when it can (arithmetic, facts, definitions, translations);
``irrelevant_tools``  (b) tools are offered but the query is ordinary conversation (a greeting,
                      advice, writing): the offered tools are unrelated to it.

Split as for tasks: train negatives use train templates and train entities; held-out ones
use a held-out template (``novelty="template"``) or a held-out main entity
(``novelty="entity"``). ``generate_negatives(split, n, seed)`` is a pure function of its
arguments; sample i is the same whatever ``n`` is, and kinds alternate a, b, a, b, ...
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator

from agentflan.toolworld.catalogue import TOOLS, convert_quantity, evaluate_expression, number_value
from agentflan.toolworld.protocol import CHAT, system_prompt
from agentflan.toolworld.tables import (
    CITIES,
    COMPANIES,
    COUNTRIES,
    EXAMPLES,
    FACTS,
    FIRST_NAMES,
    LANGUAGES,
    PHRASES,
    SPLITS,
    TIPS,
    UNIT_PAIRS,
    UNITS,
    WORDS,
)
from agentflan.toolworld.tasks import Draw, _arithmetic, fmt
from agentflan.toolworld.tools import Tool
from agentflan.toolworld.world import World

NO_TOOLS, IRRELEVANT_TOOLS = "no_tools", "irrelevant_tools"
KINDS = (NO_TOOLS, IRRELEVANT_TOOLS)
HELD_OUT_NEGATIVE_TEMPLATES = frozenset({"unit_question", "order_question", "birthday_message", "prime_check"})
PLAIN_SYSTEMS = ("You are a helpful assistant.", "You are a helpful assistant. Answer the user's questions directly.",
                 "You are a friendly and knowledgeable assistant.")


@dataclass(frozen=True)
class Negative:
    """A query whose right reply is a direct answer. ``tools`` is empty for kind ``no_tools``."""

    id: str
    kind: str
    template: str
    split: str
    query: str
    tools: tuple[Tool, ...]
    answer: str
    entities: tuple[str, ...]
    novelty: str | None = None

    def tool_specs(self) -> tuple[dict, ...]:
        return tuple(t.spec() for t in self.tools)

    def prompt(self, form: str = CHAT, rng: random.Random | None = None) -> list[dict[str, str]]:
        """The messages an agent answers: a plain system prompt (kind ``no_tools``) or the
        ``form``'s system prompt offering the tools (``irrelevant_tools``), then the query.
        ``rng`` draws phrasings (the corpus); None gives the canonical prompt (evaluation)."""
        if self.kind == IRRELEVANT_TOOLS:
            system = system_prompt(form, self.tool_specs(), rng=rng)
        else:
            system = PLAIN_SYSTEMS[0] if rng is None else rng.choice(PLAIN_SYSTEMS)
        return [{"role": "system", "content": system}, {"role": "user", "content": self.query}]


@dataclass(frozen=True)
class Drawn:
    query: str
    answer: str
    related: frozenset[str] = frozenset()  # tools that would make the query a tool task


# --------------------------------------------------------------------------- (a) no tools offered


def live_weather(d: Draw) -> Drawn:
    city = d.pick(CITIES)
    query = d.rng.choice([f"What's the weather like in {city} right now?", f"Is it raining in {city}?",
                          f"How cold is it in {city} today?"])
    return Drawn(query, f"I don't have access to live weather data, so I can't tell you the current conditions in "
                        f"{city}. A weather app or your national weather service will have an up-to-date forecast.")


def live_stock(d: Draw) -> Drawn:
    company, sym, _ = d.pick(COMPANIES, names=lambda c: c[:2])
    return Drawn(f"What's {company}'s stock price right now?",
                 f"I can't look up live market data, so I don't know {company}'s ({sym}) current price. A finance "
                 "site or your brokerage app will show the latest quote.")


def email_request(d: Draw) -> Drawn:
    name, addr = d.person()
    first = name.split()[0]
    return Drawn(f"Send an email to {addr} saying I'll be late.",
                 f"I can't send emails myself, but here's a message you can send to {first}:\n\nHi {first}, I'm running "
                 "a little late and will be there as soon as I can. Sorry for the wait!")


def arithmetic_question(d: Draw) -> Drawn:
    question, expr = _arithmetic(d.rng)
    value = evaluate_expression(expr)
    shown = str(number_value(value, 4))
    exact = Fraction(shown) == value
    return Drawn(question, f"{expr} = {shown}" + ("." if exact else " (rounded to four decimals)."))


def fact_question(d: Draw) -> Drawn:
    fact = d.pick(FACTS, names=lambda f: (f.title,))
    return Drawn(d.rng.choice(fact.questions), fact.answer)


def translation_question(d: Draw) -> Drawn:
    phrase = d.pick(list(PHRASES))
    lang = d.rng.choice(LANGUAGES)
    return Drawn(f"How do you say \"{phrase}\" in {lang}?", f"In {lang}, \"{phrase}\" is \"{PHRASES[phrase][lang]}\".")


def definition_question(d: Draw) -> Drawn:
    word, pos, definition = d.pick(WORDS, names=lambda w: (w[0],))
    return Drawn(f"What does \"{word}\" mean?", f"\"{word.capitalize()}\" ({pos}) means {definition}.")


def unit_question(d: Draw) -> Drawn:
    src, dst = d.pick([p for p in UNIT_PAIRS if UNITS[p[0]][0] != "temperature"], names=lambda p: p)
    value = d.rng.randint(1, 200)
    result = fmt(convert_quantity(value, src, dst), 2)
    return Drawn(f"How many {UNITS[dst][2]} is {value} {UNITS[src][2]}?",
                 f"{value} {UNITS[src][2]} is about {result} {UNITS[dst][2]}.")


def capital_question(d: Draw) -> Drawn:
    country, capital, _, _ = d.pick(COUNTRIES, names=lambda c: (c[0], c[1], c[3]))
    return Drawn(f"What is the capital of {country}?", f"The capital of {country} is {capital}.")


def order_question(d: Draw) -> Drawn:
    oid = f"A{d.rng.randint(10000, 99999)}"
    return Drawn(f"Has my order {oid} shipped yet?",
                 f"I can't look up shop orders, so I don't know the status of {oid}. The shop's order page or your "
                 "confirmation email will show whether it has shipped.")


# --------------------------------------------------------------------------- (b) ordinary conversation


def greeting(d: Draw) -> Drawn:
    return Drawn(*d.rng.choice([
        ("Hi there!", "Hello! How can I help you today?"),
        ("Good morning! How are you?", "Good morning! I'm doing well, thanks for asking. What can I do for you?"),
        ("Hey, what can you help me with?", "I can answer questions, explain things, and help with writing and "
                                            "planning. What would you like to do?")]))


def tips(d: Draw) -> Drawn:
    topic = d.rng.choice(list(TIPS))
    chosen = d.rng.sample(TIPS[topic], 3)
    return Drawn(f"Give me three tips to {topic}.",
                 "Here are three tips:\n" + "\n".join(f"{i}. {t[0].upper()}{t[1:]}." for i, t in enumerate(chosen, 1)))


def spell_backwards(d: Draw) -> Drawn:
    word = d.rng.choice(["planet", "library", "keyboard", "sunflower", "harbour", "notebook", "elephant", "lantern"])
    return Drawn(f"Spell \"{word}\" backwards.", f"\"{word}\" backwards is \"{word[::-1]}\".")


def sort_numbers(d: Draw) -> Drawn:
    nums = d.rng.sample(range(1, 200), d.rng.randint(4, 7))
    return Drawn(f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}",
                 ", ".join(map(str, sorted(nums))), frozenset({"calculator"}))


def prime_check(d: Draw) -> Drawn:
    n = d.rng.randint(11, 199)
    factor = next((k for k in range(2, int(n ** 0.5) + 1) if n % k == 0), None)
    answer = (f"Yes, {n} is a prime number: it has no divisors other than 1 and itself." if factor is None else
              f"No, {n} is not prime: it is divisible by {factor} ({n} = {factor} × {n // factor}).")
    return Drawn(f"Is {n} a prime number?", answer, frozenset({"calculator"}))


def birthday_message(d: Draw) -> Drawn:
    name = d.rng.choice(FIRST_NAMES)
    return Drawn(f"Can you write a short birthday message for my friend {name}?", d.rng.choice([
        f"Happy birthday, {name}! Wishing you a year full of good friends, new adventures and plenty of cake.",
        f"Happy birthday, {name}! I hope today is as wonderful as you are. Here's to a great year ahead!"]),
        frozenset({"send_email"}))


def small_talk(d: Draw) -> Drawn:
    return Drawn(*d.rng.choice([
        ("Thanks, that's all for now.", "You're welcome! Have a great day."),
        ("What's a good name for a grey cat?", "A few ideas for a grey cat: Smokey, Ash, Pebble, Misty or Earl Grey."),
        ("Tell me a fun fact about octopuses.", "Octopuses have three hearts and blue blood.")]))


def example_sentence(d: Draw) -> Drawn:
    word, pos, definition = d.pick(WORDS, names=lambda w: (w[0],))
    return Drawn(f"Use the word \"{word}\" in a sentence.",
                 f"\"{word.capitalize()}\" is {'an' if pos[0] in 'aeiou' else 'a'} {pos} meaning {definition}. For example: {EXAMPLES[word]}",
                 frozenset({"define_word"}))


def weather_small_talk(d: Draw) -> Drawn:
    city = d.pick(CITIES)
    return Drawn(f"I'm moving to {city} next year. Any advice for settling into a new city?",
                 f"Congratulations on the move to {city}! Explore your new neighbourhood on foot, find a regular café "
                 "or club to meet people, sort out the paperwork early, and give yourself a few months to feel at "
                 "home.", frozenset({"get_weather", "search_flights", "get_route"}))


@dataclass(frozen=True)
class NegativeTemplate:
    name: str
    kind: str
    build: Callable[[Draw], Drawn]
    has_entity: bool

    @property
    def held_out(self) -> bool:
        return self.name in HELD_OUT_NEGATIVE_TEMPLATES


NEGATIVE_TEMPLATES: tuple[NegativeTemplate, ...] = tuple(NegativeTemplate(f.__name__, kind, f, e) for kind, f, e in [
    (NO_TOOLS, live_weather, True), (NO_TOOLS, live_stock, True), (NO_TOOLS, email_request, False),
    (NO_TOOLS, arithmetic_question, False), (NO_TOOLS, fact_question, True), (NO_TOOLS, translation_question, True),
    (NO_TOOLS, definition_question, True), (NO_TOOLS, unit_question, True), (NO_TOOLS, capital_question, True),
    (NO_TOOLS, order_question, False),
    (IRRELEVANT_TOOLS, greeting, False), (IRRELEVANT_TOOLS, tips, False), (IRRELEVANT_TOOLS, spell_backwards, False),
    (IRRELEVANT_TOOLS, sort_numbers, False), (IRRELEVANT_TOOLS, prime_check, False),
    (IRRELEVANT_TOOLS, birthday_message, False), (IRRELEVANT_TOOLS, small_talk, False),
    (IRRELEVANT_TOOLS, example_sentence, True), (IRRELEVANT_TOOLS, weather_small_talk, True),
])
assert HELD_OUT_NEGATIVE_TEMPLATES <= {t.name for t in NEGATIVE_TEMPLATES}


def _unrelated_tools(rng: random.Random, related: frozenset[str]) -> tuple[Tool, ...]:
    return tuple(rng.sample([t for t in TOOLS if t.name not in related], rng.choice([1, 2, 2, 3])))


def generate_negatives(split: str, n: int, seed: int = 0) -> Iterator[Negative]:
    """``n`` negatives of ``split``, kinds alternating (a) no_tools, (b) irrelevant_tools."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    for i in range(n):
        rng = random.Random(f"negatives|{split}|{seed}|{i}")
        kind = KINDS[i % 2]
        templates = [t for t in NEGATIVE_TEMPLATES if t.kind == kind]
        novelty = None
        if split == "train":
            templates = [t for t in templates if not t.held_out]
        else:
            novelty = "template" if rng.random() < 0.5 else "entity"
            templates = [t for t in templates if t.held_out] if novelty == "template" else \
                [t for t in templates if not t.held_out and t.has_entity]
        template = rng.choice(templates)
        draw = Draw(rng, World(0), held_entity=novelty == "entity")
        drawn = template.build(draw)
        tools = _unrelated_tools(rng, drawn.related) if kind == IRRELEVANT_TOOLS else ()
        yield Negative(f"{split}-{seed}-{i:05d}-{template.name}", kind, template.name, split, drawn.query, tools,
                       drawn.answer, tuple(dict.fromkeys(draw.entities)), novelty)

