"""Tasks: a query, the tools offered, the gold calls and the gold final answer, and the
fixed train / held-out split.

A task template draws its entities and numbers, runs its gold calls in a ``World`` and
writes the answer from the observations the calls returned, so every gold answer is what
the tools say. ``Task.world()`` rebuilds that world for an agent: replaying the gold calls
in it gives the same observations.

Split (fixed; it does not depend on any seed):

* train: the templates not in ``HELD_OUT_TEMPLATES``, with train entities only
  (``agentflan.toolworld.tables.HELD_OUT`` names the held-out ones);
* heldout: half ``novelty="template"`` (a held-out template, train entities) and half
  ``novelty="entity"`` (a train template whose main entity is held out). Templates with no
  entity to hold out (arithmetic, loans, ...) appear in held-out tasks only through
  held-out templates.

``generate_tasks(split, n, seed)`` is a pure function of its arguments; task i is the same
whatever ``n`` is.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterator, Sequence

from agentflan.toolworld.catalogue import TOOLS, TOOLS_BY_NAME, evaluate_expression
from agentflan.toolworld.protocol import dumps
from agentflan.toolworld.tables import (
    CITIES,
    COMPANIES,
    COUNTRIES,
    CURRENCIES,
    DEPARTMENTS,
    EVENT_TITLES,
    FACTS,
    FIRST_NAMES,
    LANGUAGES,
    LAST_NAMES,
    MONTHS,
    PHRASES,
    PLACES,
    SPLITS,
    STREETS,
    TIMEZONES,
    UNIT_PAIRS,
    UNITS,
    WEEKDAYS,
    WORDS,
    pool,
)
from agentflan.toolworld.tools import JSON, Tool
from agentflan.toolworld.trajectory import Final, Step, Trajectory
from agentflan.toolworld.world import World, is_error

HELD_OUT_TEMPLATES = frozenset({"weather_compare", "currency_split", "years_since", "sql_average_salary",
                                "nonstop_flights", "capital_weather", "country_currency"})
NOVELTIES = ("template", "entity")


@dataclass(frozen=True)
class GoldCall:
    name: str
    arguments: JSON
    thought: str


@dataclass(frozen=True)
class Task:
    """One task with its gold solution. ``answer_keys`` are strings a right final answer
    contains (numbers as the tools return them, names); ``entities`` the table entities it
    uses; ``novelty`` is None for train tasks, else what is new about it."""

    id: str
    template: str
    split: str
    query: str
    tools: tuple[Tool, ...]
    calls: tuple[GoldCall, ...]
    answer: str
    answer_keys: tuple[str, ...]
    final_thought: str
    entities: tuple[str, ...]
    world_seed: int
    novelty: str | None = None

    def world(self) -> World:
        """A fresh copy of the world the task was generated in."""
        return World(self.world_seed)

    def tool_specs(self) -> tuple[JSON, ...]:
        return tuple(t.spec() for t in self.tools)

    def trajectory(self) -> Trajectory:
        """The gold trajectory: each gold call with the observation it gets in a fresh world."""
        world = self.world()
        steps = tuple(Step(c.thought, c.name, dict(c.arguments), dumps(world.call(c.name, c.arguments, self.tools)))
                      for c in self.calls)
        return Trajectory(self.id, self.query, steps, Final(self.final_thought, self.answer), self.tool_specs())

    def answer_is_right(self, answer: str) -> bool:
        """Whether ``answer`` contains every answer key (case-insensitive)."""
        text = answer.lower()
        return all(key.lower() in text for key in self.answer_keys)


# --------------------------------------------------------------------------- formatting


def fmt(x: float | int | Fraction, places: int = 2) -> str:
    """Plain decimal text: integers without a fraction, others rounded to ``places``."""
    if isinstance(x, Fraction) and x.denominator == 1:
        return str(x.numerator)
    if isinstance(x, int):
        return str(x)
    r = round(float(x), places)
    return str(int(r)) if r == int(r) else f"{r:.{places}f}".rstrip("0")


def money(x: float) -> str:
    return f"{x:,.2f}"


def long_date(d: dt.date) -> str:
    return f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}"


def duration(minutes: int) -> str:
    h, m = divmod(minutes, 60)
    if not h:
        return f"{m} min"
    return f"{h} h {m} min" if m else f"{h} h"


# --------------------------------------------------------------------------- drawing


@dataclass
class Draw:
    """What a template builds a task with: a generator, the world, and entity pools.

    ``pick`` takes the task's main entity from the held-out pool when the task is held out
    by entity, and every other entity from the train pool.
    """

    rng: random.Random
    world: World
    held_entity: bool  # the main entity comes from the held-out pool
    calls: list[GoldCall] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)
    used_held: bool = False

    def pick(self, table: Sequence, names: Callable = lambda x: (x,), main: bool = True):
        split = "heldout" if self.held_entity and main and not self.used_held else "train"
        choice = self.rng.choice(pool(table, split, names))
        self.used_held |= split == "heldout"
        self.entities.extend(names(choice))
        return choice

    def sample(self, table: Sequence, k: int, names: Callable = lambda x: (x,)) -> list:
        """``k`` distinct entries; the first is the main one."""
        first = self.pick(table, names)
        rest = self.rng.sample([x for x in pool(table, "train", names) if x != first], k - 1)
        for x in rest:
            self.entities.extend(names(x))
        return [first, *rest]

    def call(self, name: str, arguments: JSON, thought: str, expect_error: bool = False) -> JSON:
        observation = self.world.call(name, arguments)
        if is_error(observation) != expect_error:
            raise AssertionError(f"gold call {name}({arguments}) returned {observation}")
        self.calls.append(GoldCall(name, arguments, thought))
        return observation

    def date(self) -> dt.date:
        return self.world.now.date() + dt.timedelta(days=self.rng.randint(-20, 120))

    def spoken_date(self, d: dt.date) -> str:
        style = self.rng.randrange(3)
        if style == 0:
            return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"
        if style == 1:
            return f"{d.day} {MONTHS[d.month - 1]} {d.year}"
        return d.isoformat()

    def person(self) -> tuple[str, str]:
        first, last = self.rng.choice(FIRST_NAMES), self.rng.choice(LAST_NAMES)
        return f"{first} {last}", f"{first.lower()}.{last.lower()}@example.com"


@dataclass(frozen=True)
class Built:
    query: str
    answer: str
    keys: tuple[str, ...]
    final_thought: str = "I now know the final answer."


# --------------------------------------------------------------------------- templates


def weather_now(d: Draw) -> Built:
    city = d.pick(CITIES)
    obs = d.call("get_weather", {"city": city}, d.rng.choice([
        f"I need the current weather in {city}.", f"The user asks about the weather in {city}, so I'll check it."]))
    t, cond = obs["temperature"], obs["condition"]
    query = d.rng.choice([f"What's the weather like in {city} right now?", f"How's the weather in {city}?",
                          f"Can you check the current weather in {city} for me?"])
    return Built(query, f"It's currently {t}°C and {cond} in {city}, with {obs['humidity']}% humidity and wind at "
                        f"{obs['wind_kph']} km/h.", (str(t), cond))


def weather_fahrenheit(d: Draw) -> Built:
    city = d.pick(CITIES)
    obs = d.call("get_weather", {"city": city, "unit": "fahrenheit"},
                 f"The user wants Fahrenheit, so I'll ask for the weather in {city} in that unit.")
    t = obs["temperature"]
    query = d.rng.choice([f"How warm is it in {city} today? Fahrenheit, please.",
                          f"What's the temperature in {city} in Fahrenheit?"])
    return Built(query, f"It's {t}°F in {city} right now, and the sky is {obs['condition']}.", (str(t),))


def weather_umbrella(d: Draw) -> Built:
    city = d.pick(CITIES)
    obs = d.call("get_weather", {"city": city}, f"Whether it's raining depends on the current weather in {city}.")
    t, cond = obs["temperature"], obs["condition"]
    wet = any(w in cond for w in ("rain", "drizzle", "thunder"))
    query = d.rng.choice([f"Is it raining in {city} at the moment?", f"Do I need an umbrella in {city} today?"])
    answer = (f"Yes: there's {cond} in {city} right now ({t}°C), so take an umbrella." if wet else
              f"No, it isn't raining in {city} right now; it's {cond} and {t}°C.")
    return Built(query, answer, ("Yes" if wet else "No", cond))


def weather_compare(d: Draw) -> Built:
    a, b = d.sample(CITIES, 2)
    oa = d.call("get_weather", {"city": a}, f"I need the temperature in both cities, starting with {a}.")
    ob = d.call("get_weather", {"city": b}, f"{a} is at {oa['temperature']}°C. Now {b}.")
    ta, tb = oa["temperature"], ob["temperature"]
    query = d.rng.choice([f"Which is warmer right now, {a} or {b}?", f"Compare the current temperature in {a} and {b}."])
    if ta == tb:
        return Built(query, f"They're the same right now: {ta}°C in both {a} and {b}.", (str(ta),))
    warm, cold = (a, b) if ta > tb else (b, a)
    hi, lo = max(ta, tb), min(ta, tb)
    return Built(query, f"{warm} is warmer: it's {hi}°C there versus {lo}°C in {cold}, a difference of {hi - lo} "
                        "degrees.", (warm, str(hi), str(lo)))


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    """(question, expression)."""
    kind = rng.randrange(7)
    a, b, c = rng.randint(12, 999), rng.randint(2, 99), rng.randint(2, 30)
    if kind == 0:
        return rng.choice([f"What is {a} times {b}?", f"Multiply {a} by {b}."]), f"{a} * {b}"
    if kind == 1:
        x, y = rng.randint(1000, 99999), rng.randint(1000, 99999)
        return rng.choice([f"What's {x} plus {y}?", f"Add {x} and {y}."]), f"{x} + {y}"
    if kind == 2:
        x, y = rng.randint(1000, 99999), rng.randint(100, 9999)
        return f"What is {x} minus {y}?", f"{x} - {y}"
    if kind == 3:
        x = a * b if rng.random() < 0.5 else a * b + rng.randint(1, b - 1)
        return rng.choice([f"Divide {x} by {b}.", f"What is {x} divided by {b}?"]), f"{x} / {b}"
    if kind == 4:
        p, x = rng.choice([5, 10, 12, 15, 18, 20, 25, 30, 35, 40, 75]), rng.randint(20, 5000)
        return f"What is {p}% of {x}?", f"{x} * {p} / 100"
    if kind == 5:
        return f"Compute ({a} + {b}) * {c}.", f"({a} + {b}) * {c}"
    return rng.choice([f"What is {a} squared?", f"What's {a} to the power of 2?"]), f"{a} ** 2"


def arithmetic(d: Draw) -> Built:
    question, expr = _arithmetic(d.rng)
    obs = d.call("calculator", {"expression": expr}, d.rng.choice([
        "I'll use the calculator to get an exact result.", f"I should evaluate {expr}."]))
    shown = str(obs["result"])
    exact = Fraction(str(obs["result"])) == evaluate_expression(expr)
    answer = d.rng.choice([f"{expr} = {shown}" + ("." if exact else " (rounded)."),
                           f"The result is {shown}" + ("." if exact else ", rounded to six decimals.")])
    return Built(question, answer, (shown,))


def tip_split(d: Draw) -> Built:
    cents = d.rng.randint(1500, 25000)
    bill = f"{cents // 100}.{cents % 100:02d}"
    tip, people = d.rng.choice([10, 12, 15, 18, 20, 22]), d.rng.randint(2, 8)
    expr = f"{bill} * (1 + {tip} / 100) / {people}"
    obs = d.call("calculator", {"expression": expr}, f"I need the bill plus a {tip}% tip, divided by {people}.")
    share = money(obs["result"])
    query = f"Our bill is ${bill} and we want to leave a {tip}% tip. How much does each of the {people} of us pay?"
    return Built(query, f"With a {tip}% tip, each of you pays about ${share}.", (share,))


def unit_convert(d: Draw) -> Built:
    src, dst = d.pick(UNIT_PAIRS, names=lambda p: p)
    temperature = UNITS[src][0] == "temperature"
    if src == "K":
        value = d.rng.randint(240, 320)
    elif temperature:
        value = d.rng.randint(-20, 40) if src == "C" else d.rng.randint(-4, 104)
    else:
        value = d.rng.choice([d.rng.randint(1, 500), round(d.rng.uniform(0.5, 100), 1)])
    src_name, dst_name = UNITS[src][2], UNITS[dst][2]
    obs = d.call("convert_units", {"value": value, "from_unit": src, "to_unit": dst},
                 d.rng.choice([f"I'll convert {fmt(value)} {src} to {dst}.", "A unit conversion; the converter will do."]))
    result = fmt(obs["result"], 4)
    query = d.rng.choice([f"Convert {fmt(value)} {src_name} to {dst_name}.",
                          f"How many {dst_name} is {fmt(value)} {src_name}?",
                          f"What's {fmt(value)} {src_name} in {dst_name}?"])
    return Built(query, f"{fmt(value)} {src_name} is about {result} {dst_name}.", (result,))


_CURRENCY_CODES = list(CURRENCIES)


def currency_convert(d: Draw) -> Built:
    src = d.pick(_CURRENCY_CODES)
    dst = d.rng.choice([c for c in pool(_CURRENCY_CODES, "train") if c != src])
    if d.rng.random() < 0.5:
        src, dst = dst, src
    amount = d.rng.choice([d.rng.randint(5, 5000), d.rng.randint(1, 200) * 50])
    obs = d.call("convert_currency", {"amount": amount, "from_currency": src, "to_currency": dst},
                 f"I need the {src} to {dst} rate to convert {amount} {src}.")
    query = d.rng.choice([f"How much is {amount} {src} in {dst}?",
                          f"Convert {amount} {CURRENCIES[src][1]} to {CURRENCIES[dst][1]}.",
                          f"I have {amount} {src}. What's that in {CURRENCIES[dst][1]}?"])
    converted = money(obs["converted"])
    return Built(query, f"{amount} {src} is about {converted} {dst} at the rate of {obs['rate']} {dst} per {src}.",
                 (converted,))


def currency_split(d: Draw) -> Built:
    src, dst = d.sample(_CURRENCY_CODES, 2)
    amount, people = d.rng.randint(2, 60) * 50, d.rng.randint(2, 6)
    obs = d.call("convert_currency", {"amount": amount, "from_currency": src, "to_currency": dst},
                 f"First I convert {amount} {src} to {dst}.")
    share = d.call("calculator", {"expression": f"{obs['converted']} / {people}"},
                   f"The total is {obs['converted']} {dst}; now I divide it by {people}.")
    query = f"We're {people} friends sharing a rental that costs {amount} {src}. How much is each share in {dst}?"
    each = money(share["result"])
    return Built(query, f"The rental comes to {money(obs['converted'])} {dst}, so each of the {people} shares is about "
                        f"{each} {dst}.", (each,))


def stock_quote(d: Draw) -> Built:
    company, sym, _ = d.pick(COMPANIES, names=lambda c: c[:2])
    obs = d.call("get_stock_quote", {"symbol": sym}, d.rng.choice([
        f"I need the latest quote for {sym}.", f"{company} trades as {sym}; let me get its quote."]))
    change = obs["change_percent"]
    move = "unchanged" if change == 0 else f"{'up' if change > 0 else 'down'} {abs(change):.2f}% today"
    query = d.rng.choice([f"How is {company} stock doing today?", f"What's the current price of {sym}?",
                          f"Give me the latest quote for {company}."])
    return Built(query, f"{company} ({sym}) is trading at ${obs['price']:.2f}, {move}.", (f"{obs['price']:.2f}",))


def stock_value(d: Draw) -> Built:
    company, sym, _ = d.pick(COMPANIES, names=lambda c: c[:2])
    shares = d.rng.randint(2, 400)
    quote = d.call("get_stock_quote", {"symbol": sym}, f"I need the current price of {sym}.")
    total = d.call("calculator", {"expression": f"{shares} * {quote['price']}"},
                   f"{sym} is at ${quote['price']:.2f}; I multiply by {shares} shares.")
    worth = money(total["result"])
    return Built(f"I own {shares} shares of {company}. What are they worth right now?",
                 f"At ${quote['price']:.2f} a share, your {shares} shares of {company} are worth ${worth}.", (worth,))


def fact_search(d: Draw) -> Built:
    fact = d.pick(FACTS, names=lambda f: (f.title,))
    d.call("web_search", {"query": fact.search}, d.rng.choice([
        "Let me search the web for this.", f"I'll search for \"{fact.search}\"."]))
    return Built(d.rng.choice(fact.questions), fact.answer, fact.keys)


def years_since(d: Draw) -> Built:
    fact = d.pick([f for f in FACTS if f.year], names=lambda f: (f.title,))
    now = d.rng.randint(2024, 2026)
    d.call("web_search", {"query": fact.search}, "First I need the year.")
    obs = d.call("calculator", {"expression": f"{now} - {fact.year}"}, f"It was {fact.year}; I subtract that from {now}.")
    query = d.rng.choice([f"How many years have passed since {fact.event}? Count from {now}.",
                          f"As of {now}, how long ago was {fact.event}?"])
    event = fact.event[0].upper() + fact.event[1:]
    return Built(query, f"{event} was in {fact.year}, so {obs['result']} years have passed as of {now}.",
                 (str(obs["result"]),))


def _event_title(d: Draw) -> str:
    return d.rng.choice(EVENT_TITLES).format(name=d.rng.choice(FIRST_NAMES))


def _spoken_time(hour: int, minute: int) -> str:
    return f"{hour % 12 or 12}{f':{minute:02d}' if minute else ''} {'PM' if hour >= 12 else 'AM'}"


def create_event(d: Draw) -> Built:
    day, title = d.date(), _event_title(d)
    hour, minute = d.rng.randint(7, 19), d.rng.choice([0, 15, 30, 45])
    length = d.rng.choice([15, 30, 45, 60, 90, 120])
    start = f"{hour:02d}:{minute:02d}"
    args = {"title": title, "date": day.isoformat(), "start_time": start, "duration_minutes": length}
    d.call("create_event", args, "I'll create the calendar event with these details.")
    query = d.rng.choice([
        f"Add \"{title}\" to my calendar on {d.spoken_date(day)} at {_spoken_time(hour, minute)} for {length} minutes.",
        f"Please schedule \"{title}\" on {d.spoken_date(day)}, {_spoken_time(hour, minute)}, {length} minutes long."])
    return Built(query, f"Done: \"{title}\" is on your calendar for {long_date(day)} at {start} ({duration(length)}).",
                 (title, start))


def _event_list(events: list[JSON]) -> str:
    return "; ".join(f"{e['title']} from {e['start_time']} to {e['end_time']}" for e in events)


def list_events(d: Draw) -> Built:
    day = d.date()
    obs = d.call("list_events", {"date": day.isoformat()}, f"I'll list the events for {day.isoformat()}.")
    events = obs["events"]
    query = d.rng.choice([f"What's on my calendar on {d.spoken_date(day)}?",
                          f"Do I have anything scheduled for {d.spoken_date(day)}?"])
    if not events:
        return Built(query, f"Your calendar is free on {long_date(day)}: nothing is scheduled.", ("free",))
    n = len(events)
    return Built(query, f"On {long_date(day)} you have {n} event{'s' if n > 1 else ''}: {_event_list(events)}.",
                 tuple(e["title"] for e in events))


def cancel_event(d: Draw) -> Built:
    day = d.date()
    while not d.world.events_on(day):
        day += dt.timedelta(days=1)
    target = d.rng.choice(d.world.events_on(day))
    d.call("list_events", {"date": day.isoformat()}, f"I need the id of \"{target['title']}\" on {day.isoformat()}.")
    d.call("delete_event", {"event_id": target["event_id"]},
           f"\"{target['title']}\" at {target['start_time']} has id {target['event_id']}; I'll delete it.")
    query = f"Cancel my \"{target['title']}\" on {d.spoken_date(day)}."
    return Built(query, f"Done: \"{target['title']}\" at {target['start_time']} on {long_date(day)} is cancelled.",
                 (target["title"],), "The event is deleted.")


def schedule_and_check(d: Draw) -> Built:
    day, title = d.date(), _event_title(d)
    hour = d.rng.randint(8, 18)
    start = f"{hour:02d}:00"
    d.call("create_event", {"title": title, "date": day.isoformat(), "start_time": start},
           "First I add the event.")
    obs = d.call("list_events", {"date": day.isoformat()}, "Now I list that day to see everything on it.")
    events = obs["events"]
    query = (f"Put \"{title}\" in my calendar on {d.spoken_date(day)} at {_spoken_time(hour, 0)} and tell me what "
             "else I have that day.")
    others = [e for e in events if e["title"] != title or e["start_time"] != start]
    rest = f"you also have {_event_list(others)}" if others else "nothing else is scheduled"
    return Built(query, f"Added \"{title}\" at {start} on {long_date(day)}; {rest}.",
                 (title,) + tuple(e["title"] for e in others))


def translate(d: Draw) -> Built:
    phrase = d.pick(list(PHRASES))
    lang = d.rng.choice(LANGUAGES)
    obs = d.call("translate_text", {"text": phrase, "target_language": lang}, f"I'll translate the phrase into {lang}.")
    query = d.rng.choice([f"How do you say \"{phrase}\" in {lang}?", f"Translate \"{phrase}\" into {lang}.",
                          f"What's the {lang} for \"{phrase}\"?"])
    return Built(query, f"In {lang}, \"{phrase}\" is \"{obs['translation']}\".", (obs["translation"],))


def order_status(d: Draw) -> Built:
    if d.rng.random() < 0.15:
        oid = f"A{d.rng.randint(10000, 99999)}"
        while oid in d.world.orders:
            oid = f"A{d.rng.randint(10000, 99999)}"
        d.call("lookup_order", {"order_id": oid}, f"I need to look up order {oid}.", expect_error=True)
        return Built(f"Where is my order {oid}?", f"I couldn't find an order with the id {oid}. Could you double-check "
                     "the number on your confirmation email?", (oid, "couldn't find"), "The order does not exist.")
    oid = d.rng.choice(sorted(d.world.orders))
    obs = d.call("lookup_order", {"order_id": oid}, f"I need to look up order {oid}.")
    query = d.rng.choice([f"Where is my order {oid}?", f"Can you check the status of order {oid}?",
                          f"Has order {oid} shipped yet?"])
    status = obs["status"]
    if status == "shipped":
        eta = dt.date.fromisoformat(obs["estimated_delivery"])
        return Built(query, f"Order {oid} has shipped with {obs['carrier']} and should arrive on {long_date(eta)}.",
                     ("shipped", obs["carrier"]))
    if status == "delivered":
        return Built(query, f"Order {oid} was delivered on {long_date(dt.date.fromisoformat(obs['delivered_on']))}.",
                     ("delivered",))
    if status == "processing":
        return Built(query, f"Order {oid} is still being processed and hasn't shipped yet.", ("processed",))
    return Built(query, f"Order {oid} was cancelled. If that's unexpected, please contact the shop's support team.",
                 ("cancelled",))


def sql_headcount(d: Draw) -> Built:
    dept = d.pick(DEPARTMENTS)
    obs = d.call("query_database", {"sql": f"SELECT COUNT(*) AS n FROM employees WHERE department = '{dept}'"},
                 "I'll count the rows of the employees table for that department.")
    n = obs["rows"][0]["n"]
    query = d.rng.choice([f"How many employees work in {dept}?", f"What's the headcount of the {dept} team?"])
    return Built(query, f"{n} employee{'s work' if n != 1 else ' works'} in {dept}.", (str(n),))


def sql_average_salary(d: Draw) -> Built:
    dept = d.pick(DEPARTMENTS)
    sql = f"SELECT ROUND(AVG(salary), 2) AS avg_salary FROM employees WHERE department = '{dept}'"
    obs = d.call("query_database", {"sql": sql}, "I'll average the salaries in that department.")
    avg = money(obs["rows"][0]["avg_salary"])
    return Built(f"What's the average salary in the {dept} department?", f"The average salary in {dept} is ${avg}.",
                 (avg,))


def sql_recent_hires(d: Draw) -> Built:
    dept = d.pick(DEPARTMENTS)
    k = d.rng.randint(2, 4)
    sql = f"SELECT name, hire_date FROM employees WHERE department = '{dept}' ORDER BY hire_date DESC, name LIMIT {k}"
    rows = d.call("query_database", {"sql": sql}, "I'll sort that department's employees by hire date.")["rows"]
    listing = ", ".join(f"{r['name']} ({r['hire_date']})" for r in rows)
    return Built(f"Who are the {k} most recent hires in {dept}?", f"The {k} most recent hires in {dept} are {listing}.",
                 tuple(r["name"] for r in rows))


EMAIL_TOPICS = [
    ("the meeting moves to {time}", "Meeting moved to {time}", "the meeting has moved to {time}"),
    ("I'll be about 15 minutes late", "Running late", "I'm running about 15 minutes late"),
    ("the report is ready for review", "Report ready for review", "the report is ready for your review"),
    ("thanks for yesterday's presentation", "Thank you", "thank you for yesterday's presentation"),
    ("the invoice was paid today", "Invoice paid", "the invoice was paid today"),
]


def send_email(d: Draw) -> Built:
    name, addr = d.person()
    ask, subject, line = d.rng.choice(EMAIL_TOPICS)
    time = f"{d.rng.randint(9, 17)}:{d.rng.choice(['00', '30'])}"
    ask, subject, line = ask.format(time=time), subject.format(time=time), line.format(time=time)
    first = name.split()[0]
    body = f"Hi {first},\n\nJust a quick note: {line}.\n\nBest regards"
    obs = d.call("send_email", {"to": addr, "subject": subject, "body": body}, f"I'll write a short email to {first}.")
    query = d.rng.choice([f"Email {name} at {addr} to say {ask}.", f"Please send {first} ({addr}) a note that {ask}."])
    return Built(query, f"Sent: {first} will get an email with the subject \"{subject}\" (message id "
                        f"{obs['message_id']}).", (subject,))


def _flight_text(f: JSON) -> str:
    stops = f"{f['stops'] or 'no'} stop{'s' if f['stops'] != 1 else ''}"
    return f"{f['flight']} at ${f['price_usd']}, departing {f['depart']} and arriving {f['arrive']} with {stops}"


def cheapest_flight(d: Draw) -> Built:
    a, b = d.sample(CITIES, 2)
    day = d.date()
    obs = d.call("search_flights", {"origin": a, "destination": b, "date": day.isoformat()},
                 f"I'll search flights from {a} to {b} on {day.isoformat()}.")
    best = min(obs["flights"], key=lambda f: (f["price_usd"], f["depart"]))
    return Built(f"Find me the cheapest flight from {a} to {b} on {d.spoken_date(day)}.",
                 f"The cheapest option is {_flight_text(best)}.", (best["flight"], str(best["price_usd"])))


def nonstop_flights(d: Draw) -> Built:
    a, b = d.sample(CITIES, 2)
    day = d.date()
    obs = d.call("search_flights", {"origin": a, "destination": b, "date": day.isoformat()},
                 f"I'll search flights from {a} to {b} and keep the nonstop ones.")
    direct = [f for f in obs["flights"] if f["stops"] == 0]
    query = f"Are there any nonstop flights from {a} to {b} on {d.spoken_date(day)}?"
    if not direct:
        return Built(query, f"No, every flight from {a} to {b} that day has at least one stop.", ("No",))
    listing = "; ".join(f"{f['flight']} departs {f['depart']}, arrives {f['arrive']}, ${f['price_usd']}" for f in direct)
    return Built(query, f"Yes: {listing}.", tuple(f["flight"] for f in direct))


def flight_to_calendar(d: Draw) -> Built:
    a, b = d.sample(CITIES, 2)
    day = d.date()
    obs = d.call("search_flights", {"origin": a, "destination": b, "date": day.isoformat()},
                 f"First I search flights from {a} to {b}.")
    best = min(obs["flights"], key=lambda f: (f["price_usd"], f["depart"]))
    dh, dm = map(int, best["depart"].split(":"))
    ah, am = map(int, best["arrive"].split(":"))
    title = f"Flight {best['flight']} to {b}"
    d.call("create_event", {"title": title, "date": day.isoformat(), "start_time": best["depart"],
                            "duration_minutes": ah * 60 + am - dh * 60 - dm},
           f"The cheapest is {best['flight']} at ${best['price_usd']}; now I add it to the calendar.")
    query = (f"I'm planning a trip: find the cheapest flight from {a} to {b} on {day.isoformat()} and put it in my "
             "calendar.")
    return Built(query, f"The cheapest flight is {_flight_text(best)}. I've added \"{title}\" to your calendar on "
                        f"{long_date(day)}.", (best["flight"],))


def define_word(d: Draw) -> Built:
    word = d.pick([w for w, _, _ in WORDS])
    obs = d.call("define_word", {"word": word}, "Let me check the dictionary.")
    query = d.rng.choice([f"What does \"{word}\" mean?", f"Define {word}.", f"What's the meaning of the word {word}?"])
    return Built(query, f"\"{word.capitalize()}\" ({obs['part_of_speech']}) means {obs['definition']}. For example: "
                        f"{obs['example']}", (obs["definition"],))


def local_time(d: Draw) -> Built:
    city, tz, _ = d.pick(TIMEZONES, names=lambda z: z[:2])
    obs = d.call("get_current_time", {"timezone": tz}, f"{city} is in the {tz} time zone.")
    when = dt.datetime.strptime(obs["local_time"], "%Y-%m-%d %H:%M")
    query = d.rng.choice([f"What time is it in {city} right now?", f"What's the local time in {city}?"])
    return Built(query, f"It's {when:%H:%M} on {obs['weekday']}, {MONTHS[when.month - 1]} {when.day} in {city}.",
                 (f"{when:%H:%M}",))


def bmi(d: Draw) -> Built:
    w, h = d.rng.randint(45, 120), d.rng.randint(150, 200)
    obs = d.call("calculate_bmi", {"weight_kg": w, "height_cm": h}, "I'll compute the BMI.")
    query = d.rng.choice([f"I'm {h} cm tall and weigh {w} kg. What's my BMI?", f"Calculate the BMI for {w} kg and {h} cm."])
    return Built(query, f"A weight of {w} kg at {h} cm gives a BMI of {obs['bmi']}, which is in the {obs['category']} "
                        "range.", (str(obs["bmi"]), obs["category"]))


def loan(d: Draw) -> Built:
    principal = d.rng.randint(20, 800) * 1000
    rate = d.rng.choice([2.5, 3.0, 3.5, 3.9, 4.25, 4.75, 5.0, 5.5, 6.0, 6.9, 7.5])
    years = d.rng.choice([5, 10, 15, 20, 25, 30])
    obs = d.call("loan_payment", {"principal": principal, "annual_rate_percent": rate, "years": years},
                 "I'll compute the amortized monthly payment.")
    pay = money(obs["monthly_payment"])
    return Built(f"What would the monthly payment be on a {years}-year loan of ${principal:,} at {fmt(rate)}% interest?",
                 f"The monthly payment would be ${pay}; over {years} years you'd pay about "
                 f"${money(obs['total_interest'])} in interest.", (pay,))


def route(d: Draw) -> Built:
    origin = f"{d.rng.randint(1, 250)} {d.rng.choice(STREETS)}"
    dest = d.rng.choice(PLACES)
    mode = d.rng.choice(["driving", "walking", "cycling", "transit"])
    how = {"driving": "by car", "walking": "on foot", "cycling": "by bike", "transit": "by public transport"}[mode]
    obs = d.call("get_route", {"origin": origin, "destination": dest, "mode": mode}, "I'll ask the router for this trip.")
    query = d.rng.choice([f"How long does it take to get from {origin} to {dest} {how}?",
                          f"How far is {dest} from {origin}? I'm going {how}."])
    return Built(query, f"It's {fmt(obs['distance_km'], 1)} km from {origin} to {dest}: about "
                        f"{duration(obs['duration_minutes'])} {how}.", (fmt(obs["distance_km"], 1),))


def days_until(d: Draw) -> Built:
    start = d.date()
    end = start + dt.timedelta(days=d.rng.randint(3, 400))
    obs = d.call("days_between", {"start_date": start.isoformat(), "end_date": end.isoformat()},
                 "I'll count the days between the two dates.")
    query = d.rng.choice([f"How many days are there from {d.spoken_date(start)} to {d.spoken_date(end)}?",
                          f"Count the days between {d.spoken_date(start)} and {d.spoken_date(end)}."])
    return Built(query, f"There are {obs['days']} days from {long_date(start)} to {long_date(end)}.", (str(obs["days"]),))


def date_after(d: Draw) -> Built:
    start = d.date()
    days = d.rng.choice([7, 10, 14, 21, 30, 45, 60, 90, 100, 180])
    obs = d.call("add_days", {"date": start.isoformat(), "days": days}, f"I'll add {days} days to {start.isoformat()}.")
    end = dt.date.fromisoformat(obs["date"])
    query = d.rng.choice([f"What date is {days} days after {d.spoken_date(start)}?",
                          f"If I start on {d.spoken_date(start)}, which day is {days} days later?"])
    return Built(query, f"{days} days after {long_date(start)} is {long_date(end)}.", (obs["weekday"], str(end.day)))


def country_info(d: Draw) -> Built:
    country, capital, continent, currency = d.pick(COUNTRIES, names=lambda c: (c[0], c[1], c[3]))
    d.call("get_country_info", {"country": country}, f"I'll look up {country} in the country table.")
    kind = d.rng.randrange(3)
    if kind == 0:
        return Built(f"What is the capital of {country}?", f"The capital of {country} is {capital}.", (capital,))
    if kind == 1:
        return Built(f"Which currency is used in {country}?", f"{country} uses {CURRENCIES[currency][1]} ({currency}).",
                     (currency,))
    return Built(f"Tell me the capital, continent and currency of {country}.",
                 f"{country}: capital {capital}, in {continent}, currency {currency}.", (capital, continent, currency))


_CITY_SET = set(CITIES)


def capital_weather(d: Draw) -> Built:
    country, capital, _, _ = d.pick([c for c in COUNTRIES if c[1] in _CITY_SET], names=lambda c: (c[0], c[1], c[3]))
    d.call("get_country_info", {"country": country}, f"First I need the capital of {country}.")
    obs = d.call("get_weather", {"city": capital}, f"The capital is {capital}; now its weather.")
    return Built(f"What's the weather like in the capital of {country}?",
                 f"The capital of {country} is {capital}, where it's {obs['temperature']}°C and {obs['condition']}.",
                 (capital, str(obs["temperature"])))


def country_currency(d: Draw) -> Built:
    country, _, _, currency = d.pick([c for c in COUNTRIES if c[3] != "USD"], names=lambda c: (c[0], c[1], c[3]))
    amount = d.rng.choice([20, 50, 100, 250, 500, 1000])
    d.call("get_country_info", {"country": country}, f"I need the currency of {country} first.")
    obs = d.call("convert_currency", {"amount": amount, "from_currency": "USD", "to_currency": currency},
                 f"{country} uses {currency}; now I convert {amount} USD.")
    converted = money(obs["converted"])
    return Built(f"I'm travelling to {country}. How much is {amount} US dollars in the local currency?",
                 f"{country} uses {CURRENCIES[currency][1]} ({currency}); {amount} USD is about {converted} {currency}.",
                 (currency, converted))


@dataclass(frozen=True)
class Template:
    name: str
    build: Callable[[Draw], Built]
    weight: float
    has_entity: bool  # draws an entity that the split can hold out

    @property
    def held_out(self) -> bool:
        return self.name in HELD_OUT_TEMPLATES


TEMPLATES: tuple[Template, ...] = tuple(Template(f.__name__, f, w, e) for f, w, e in [
    (weather_now, 2.5, True), (weather_fahrenheit, 1, True), (weather_umbrella, 1, True), (weather_compare, 1, True),
    (arithmetic, 3, False), (tip_split, 1, False), (unit_convert, 2, True), (currency_convert, 2, True),
    (currency_split, 1, True), (stock_quote, 1.5, True), (stock_value, 1, True), (fact_search, 2.5, True),
    (years_since, 1, True), (create_event, 1.5, False), (list_events, 1, False), (cancel_event, 1, False),
    (schedule_and_check, 1, False), (translate, 1.5, True), (order_status, 1.5, False), (sql_headcount, 1, True),
    (sql_average_salary, 1, True), (sql_recent_hires, 1, True), (send_email, 1, False), (cheapest_flight, 1.5, True),
    (nonstop_flights, 1, True), (flight_to_calendar, 1, True), (define_word, 1, True), (local_time, 1, True),
    (bmi, 1, False), (loan, 1, False), (route, 1, False), (days_until, 1, False), (date_after, 1, False),
    (country_info, 1.5, True), (capital_weather, 1, True), (country_currency, 1, True),
])
TEMPLATES_BY_NAME = {t.name: t for t in TEMPLATES}
assert HELD_OUT_TEMPLATES <= set(TEMPLATES_BY_NAME)


def _offered_tools(rng: random.Random, calls: Sequence[GoldCall]) -> tuple[Tool, ...]:
    """The needed tools plus 0-2 others, shuffled, so choosing the tool is part of the task."""
    needed = list(dict.fromkeys(TOOLS_BY_NAME[c.name] for c in calls))
    others = [t for t in TOOLS if t not in needed]
    tools = needed + rng.sample(others, rng.choice([0, 1, 1, 2]))
    rng.shuffle(tools)
    return tuple(tools)


def build_task(template: Template, rng: random.Random, split: str, task_id: str, novelty: str | None) -> Task:
    """One task of ``template``; ``novelty == "entity"`` takes its main entity from the held-out pool."""
    world = World(rng.randrange(2**31))
    draw = Draw(rng, world, held_entity=novelty == "entity")
    built = template.build(draw)
    if novelty == "entity" and not draw.used_held:
        raise AssertionError(f"{template.name} drew no held-out entity")
    return Task(task_id, template.name, split, built.query, _offered_tools(rng, draw.calls), tuple(draw.calls),
                built.answer, built.keys, built.final_thought, tuple(dict.fromkeys(draw.entities)), world.seed, novelty)


def generate_tasks(split: str, n: int, seed: int = 0) -> Iterator[Task]:
    """``n`` tasks of ``split`` ("train" or "heldout"); task i depends only on (split, seed, i)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    train = [t for t in TEMPLATES if not t.held_out]
    by_entity = [t for t in train if t.has_entity]
    by_template = [t for t in TEMPLATES if t.held_out]
    for i in range(n):
        rng = random.Random(f"tasks|{split}|{seed}|{i}")
        if split == "train":
            novelty, choices = None, train
        else:
            novelty = "template" if rng.random() < 0.5 else "entity"
            choices = by_template if novelty == "template" else by_entity
        template = rng.choices(choices, [t.weight for t in choices])[0]
        yield build_task(template, rng, split, f"{split}-{seed}-{i:05d}-{template.name}", novelty)
