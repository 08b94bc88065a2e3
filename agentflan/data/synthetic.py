"""Generator of the bundled tool-use corpus, in the exact Agent-FLAN JSONL schema.

Every conversation is built from a *task*: a user query, the tool calls that answer it
(name, JSON arguments, the tool's observation) and a final answer computed from those
observations, so arithmetic is right, conversions use real factors, a comparison names
the right city and a "cheapest flight" is the cheapest one listed. Live values
(temperatures, prices, order states) are random; facts stated as facts are real.

A task is then written in one of the forms the Agent-FLAN corpus mixes:

* ``react``: ReAct text ("Thought: ... / Action: ... / Action Input: {...}") with
  "Observation: ..." user turns and a "Final Answer:" line;
* ``react_finish``: the ToolBench flavour of ReAct, observations as
  ``{"error": "", "response": ...}`` and a closing ``Finish`` call with ``give_answer``;
* ``chat``: the converted multi-turn chat form, where each call is a short elicit
  sentence naming the tool and a line with its JSON arguments;
* ``chat_cot``: the chat form with a reasoning sentence before every call;
* ``negative``: Agent-FLAN's two kinds of negative sample, (a) no tools given but a query
  that tempts a call, answered directly, and (b) tools given but an ordinary request,
  answered directly without a call.

Some conversations open with a worked in-context example whose assistant turns carry
``"loss": false``; some carry a follow-up task or a closing exchange; ``loss`` keys, extra
message keys (``type``) and observation styles vary between conversations the way they
vary between the released files. Output is a pure function of ``(n, seed)``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Iterator

DEFAULT_SEED = 2403_12881
DEFAULT_SIZE = 3000

JSON = dict[str, Any]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


# --------------------------------------------------------------------------- tools


@dataclass(frozen=True, eq=False)  # identity semantics: each tool is one module-level object
class Tool:
    name: str
    description: str
    properties: dict[str, JSON]
    required: tuple[str, ...]

    def signature(self) -> str:
        """Compact listing, e.g. ``get_weather(city: string, unit?: "celsius" | "fahrenheit"): Current weather...``."""
        params = []
        for name, prop in self.properties.items():
            kind = " | ".join(f'"{v}"' for v in prop["enum"]) if "enum" in prop else prop["type"]
            note = f" ({prop['description']})" if "description" in prop else ""
            params.append(f"{name}{'' if name in self.required else '?'}: {kind}{note}")
        return f"{self.name}({', '.join(params)}): {self.description}"

    def spec(self) -> JSON:
        return {
            "name": self.name,
            "description": self.description,
            "parameters": {"type": "object", "properties": self.properties, "required": list(self.required)},
        }


def _str(desc: str = "", enum: list[str] | None = None) -> JSON:
    return {"type": "string", **({"description": desc} if desc else {}), **({"enum": enum} if enum else {})}


def _num(desc: str = "") -> JSON:
    return {"type": "number", **({"description": desc} if desc else {})}


def _int(desc: str = "") -> JSON:
    return {"type": "integer", **({"description": desc} if desc else {})}


# Parameters carry a description only where the name alone leaves the expected format open.
WEATHER = Tool(
    "get_weather", "Current weather for a city.",
    {"city": _str(), "unit": _str(enum=["celsius", "fahrenheit"])}, ("city",))
CALCULATOR = Tool(
    "calculator", "Evaluate an arithmetic expression (+, -, *, /, **, parentheses).",
    {"expression": _str("e.g. (3 + 4) * 2")}, ("expression",))
CONVERT_UNITS = Tool(
    "convert_units", "Convert a quantity between units of length, mass, volume or temperature.",
    {"value": _num(), "from_unit": _str("e.g. km, lb, C"), "to_unit": _str()}, ("value", "from_unit", "to_unit"))
CURRENCY = Tool(
    "convert_currency", "Convert money between currencies at today's exchange rate.",
    {"amount": _num(), "from_currency": _str("ISO code, e.g. USD"), "to_currency": _str("ISO code")},
    ("amount", "from_currency", "to_currency"))
STOCK = Tool(
    "get_stock_quote", "Latest stock price and daily change.", {"symbol": _str("Ticker, e.g. AAPL")}, ("symbol",))
SEARCH = Tool("web_search", "Search the web and return the top results.", {"query": _str()}, ("query",))
CREATE_EVENT = Tool(
    "create_event", "Add an event to the user's calendar.",
    {"title": _str(), "date": _str("YYYY-MM-DD"), "start_time": _str("HH:MM, 24 h"), "duration_minutes": _int()},
    ("title", "date", "start_time"))
LIST_EVENTS = Tool(
    "list_events", "List the user's calendar events on a day.", {"date": _str("YYYY-MM-DD")}, ("date",))
TRANSLATE = Tool(
    "translate_text", "Translate text into another language.",
    {"text": _str(), "target_language": _str("e.g. French")}, ("text", "target_language"))
LOOKUP_ORDER = Tool(
    "lookup_order", "Look up a shop order by its id.", {"order_id": _str("e.g. A10234")}, ("order_id",))
SQL = Tool(
    "query_database", "Run a read-only SQL query on the company database "
    "(table employees: name, department, salary, hire_date).", {"sql": _str("SELECT statement")}, ("sql",))
EMAIL = Tool(
    "send_email", "Send an email on the user's behalf.", {"to": _str(), "subject": _str(), "body": _str()},
    ("to", "subject", "body"))
FLIGHTS = Tool(
    "search_flights", "Search flights between two cities on a date.",
    {"origin": _str(), "destination": _str(), "date": _str("YYYY-MM-DD")}, ("origin", "destination", "date"))
DEFINE = Tool("define_word", "Dictionary definition of an English word.", {"word": _str()}, ("word",))
CLOCK = Tool(
    "get_current_time", "Current local date and time in a time zone.",
    {"timezone": _str("IANA name, e.g. Europe/Paris")}, ("timezone",))
BMI = Tool(
    "calculate_bmi", "Body-mass index from weight and height.", {"weight_kg": _num(), "height_cm": _num()},
    ("weight_kg", "height_cm"))
LOAN = Tool(
    "loan_payment", "Monthly payment of a fixed-rate loan.",
    {"principal": _num(), "annual_rate_percent": _num(), "years": _int()}, ("principal", "annual_rate_percent", "years"))
ROUTE = Tool(
    "get_route", "Distance and travel time between two addresses.",
    {"origin": _str(), "destination": _str(), "mode": _str(enum=["driving", "walking", "cycling", "transit"])},
    ("origin", "destination"))

ALL_TOOLS = (WEATHER, CALCULATOR, CONVERT_UNITS, CURRENCY, STOCK, SEARCH, CREATE_EVENT, LIST_EVENTS, TRANSLATE,
             LOOKUP_ORDER, SQL, EMAIL, FLIGHTS, DEFINE, CLOCK, BMI, LOAN, ROUTE)


@dataclass
class Call:
    thought: str
    tool: Tool
    args: JSON
    result: JSON


@dataclass
class Task:
    query: str
    calls: list[Call]
    answer: str
    tools: list[Tool] = field(default_factory=list)

    def __post_init__(self) -> None:
        for call in self.calls:
            if call.tool not in self.tools:
                self.tools.append(call.tool)


# --------------------------------------------------------------------------- reference data

CITIES = ["Lisbon", "Oslo", "Tokyo", "Nairobi", "Toronto", "Buenos Aires", "Cairo", "Sydney", "Berlin", "Madrid",
          "Seoul", "Mumbai", "Chicago", "Mexico City", "Reykjavik", "Bangkok", "Cape Town", "Dublin", "Vienna",
          "Singapore", "Lima", "Istanbul", "Warsaw", "Helsinki", "Denver", "Hanoi", "Athens", "Montreal",
          "Auckland", "Marrakesh", "Prague", "Seattle", "Zurich", "Santiago", "Manila", "Edinburgh"]
CONDITIONS = ["sunny", "clear", "partly cloudy", "cloudy", "overcast", "light rain", "heavy rain", "thunderstorms",
              "drizzle", "snow", "fog", "windy"]

# country, capital (real)
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Brazil", "Brasília"),
            ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Egypt", "Cairo"), ("Norway", "Oslo"),
            ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Turkey", "Ankara"), ("South Korea", "Seoul"),
            ("Thailand", "Bangkok"), ("Portugal", "Lisbon"), ("Poland", "Warsaw"), ("Vietnam", "Hanoi"),
            ("New Zealand", "Wellington"), ("Morocco", "Rabat"), ("Chile", "Santiago"), ("Spain", "Madrid"),
            ("Italy", "Rome"), ("Germany", "Berlin"), ("India", "New Delhi"), ("Mexico", "Mexico City"),
            ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Ireland", "Dublin"), ("Switzerland", "Bern")]


@dataclass(frozen=True)
class Fact:
    questions: tuple[str, ...]
    search: str
    title: str
    snippet: str
    answer: str
    year: int | None = None  # the year the fact is about, for "how many years ago" tasks
    event: str = ""  # noun phrase for that year


FACTS = [
    Fact(("Who wrote Pride and Prejudice?", "Who is the author of Pride and Prejudice?"),
         "Pride and Prejudice author", "Pride and Prejudice - novel",
         "Pride and Prejudice is an 1813 novel by the English author Jane Austen.",
         "Pride and Prejudice was written by Jane Austen and published in 1813.", 1813,
         "the publication of Pride and Prejudice"),
    Fact(("When did the Berlin Wall fall?", "What year did the Berlin Wall come down?"),
         "fall of the Berlin Wall date", "Fall of the Berlin Wall",
         "The Berlin Wall fell on 9 November 1989, when East Germany opened its border crossings.",
         "The Berlin Wall fell on 9 November 1989.", 1989, "the fall of the Berlin Wall"),
    Fact(("How tall is Mount Everest?", "What is the height of Mount Everest?"),
         "Mount Everest height", "Mount Everest",
         "Mount Everest's elevation of 8,848.86 m was announced by China and Nepal in 2020.",
         "Mount Everest is 8,848.86 metres (about 29,032 feet) tall, according to the 2020 survey."),
    Fact(("Who painted the Mona Lisa?",), "Mona Lisa painter", "Mona Lisa",
         "The Mona Lisa is a portrait painted by the Italian artist Leonardo da Vinci.",
         "The Mona Lisa was painted by Leonardo da Vinci."),
    Fact(("What is the largest planet in the solar system?", "Which planet is the biggest?"),
         "largest planet solar system", "Jupiter - planet",
         "Jupiter is the fifth planet from the Sun and the largest in the Solar System.",
         "Jupiter is the largest planet in the solar system."),
    Fact(("When was the Eiffel Tower completed?", "What year was the Eiffel Tower finished?"),
         "Eiffel Tower completion year", "Eiffel Tower",
         "The Eiffel Tower was completed in 1889 as the entrance arch of the World's Fair in Paris.",
         "The Eiffel Tower was completed in 1889.", 1889, "the completion of the Eiffel Tower"),
    Fact(("Who discovered penicillin?",), "discovery of penicillin", "Penicillin - history",
         "Alexander Fleming discovered penicillin in 1928 at St Mary's Hospital in London.",
         "Penicillin was discovered by Alexander Fleming in 1928.", 1928, "the discovery of penicillin"),
    Fact(("What is the speed of light?", "How fast does light travel?"),
         "speed of light in vacuum", "Speed of light",
         "The speed of light in vacuum is exactly 299,792,458 metres per second.",
         "Light travels at exactly 299,792,458 metres per second in a vacuum."),
    Fact(("What is the chemical symbol for gold?",), "gold chemical symbol", "Gold - chemical element",
         "Gold is a chemical element with the symbol Au and atomic number 79.",
         "The chemical symbol for gold is Au (atomic number 79)."),
    Fact(("How many bones are in the adult human body?",), "number of bones adult human",
         "Human skeleton", "The adult human skeleton usually has 206 bones.",
         "An adult human body typically has 206 bones."),
    Fact(("What is the longest river in Africa?",), "longest river in Africa", "Nile",
         "The Nile is the longest river in Africa, flowing north into the Mediterranean Sea.",
         "The Nile is the longest river in Africa."),
    Fact(("Who was the first person to walk on the Moon?",), "first person on the Moon",
         "Apollo 11", "Neil Armstrong became the first person to walk on the Moon in July 1969, during Apollo 11.",
         "Neil Armstrong was the first person to walk on the Moon, in July 1969 during Apollo 11.", 1969,
         "the first Moon landing"),
    Fact(("Who composed The Four Seasons?",), "The Four Seasons composer", "The Four Seasons (Vivaldi)",
         "The Four Seasons is a group of four violin concertos by the Italian composer Antonio Vivaldi.",
         "The Four Seasons was composed by Antonio Vivaldi."),
    Fact(("What is the largest ocean on Earth?",), "largest ocean", "Pacific Ocean",
         "The Pacific Ocean is the largest and deepest of Earth's five oceanic divisions.",
         "The Pacific Ocean is the largest ocean on Earth."),
    Fact(("When did World War II end?", "What year did the Second World War end?"),
         "end of World War II", "World War II",
         "World War II ended in 1945: Germany surrendered in May and Japan in September.",
         "World War II ended in 1945, with Germany surrendering in May and Japan in September.", 1945,
         "the end of World War II"),
    Fact(("Who wrote One Hundred Years of Solitude?",), "One Hundred Years of Solitude author",
         "One Hundred Years of Solitude", "One Hundred Years of Solitude is a 1967 novel by Gabriel García Márquez.",
         "One Hundred Years of Solitude was written by Gabriel García Márquez and published in 1967.", 1967,
         "the publication of One Hundred Years of Solitude"),
    Fact(("What is the tallest building in the world?",), "tallest building in the world", "Burj Khalifa",
         "The Burj Khalifa in Dubai, 828 m tall, has been the world's tallest building since 2010.",
         "The Burj Khalifa in Dubai is the tallest building in the world at 828 metres."),
    Fact(("Who invented the telephone?",), "inventor of the telephone", "Telephone - history",
         "Alexander Graham Bell received the first US patent for the telephone in 1876.",
         "Alexander Graham Bell is credited with inventing the telephone; he patented it in 1876.", 1876,
         "Alexander Graham Bell's telephone patent"),
    Fact(("What is the atomic number of carbon?",), "carbon atomic number", "Carbon",
         "Carbon is a chemical element with the symbol C and atomic number 6.",
         "Carbon has atomic number 6."),
    Fact(("How many continents are there?",), "number of continents", "Continent",
         "By the most common convention there are seven continents.",
         "By the most common convention there are seven continents."),
    Fact(("Who developed the theory of general relativity?",), "general relativity developer",
         "General relativity", "Albert Einstein published the theory of general relativity in 1915.",
         "Albert Einstein developed general relativity, publishing it in 1915.", 1915,
         "the publication of general relativity"),
    Fact(("When did the Titanic sink?",), "Titanic sinking date", "Titanic",
         "RMS Titanic sank in the North Atlantic on 15 April 1912 after striking an iceberg.",
         "The Titanic sank on 15 April 1912 after hitting an iceberg.", 1912, "the sinking of the Titanic"),
]
DISTRACTOR_RESULTS = [
    ("Top 10 travel destinations this year", "Our editors picked the places everyone is talking about."),
    ("Quiz: how well do you know history?", "Test yourself with 20 questions on famous events."),
    ("Forum: homework help", "Can anyone help me with this question? Thanks in advance."),
    ("Encyclopedia - main page", "Welcome to the free encyclopedia that anyone can edit."),
]

# English phrase -> translations (real)
PHRASES = {
    "Good morning": {"Spanish": "Buenos días", "French": "Bonjour", "German": "Guten Morgen",
                     "Italian": "Buongiorno", "Portuguese": "Bom dia"},
    "Thank you very much": {"Spanish": "Muchas gracias", "French": "Merci beaucoup", "German": "Vielen Dank",
                            "Italian": "Grazie mille", "Portuguese": "Muito obrigado"},
    "Where is the train station?": {"Spanish": "¿Dónde está la estación de tren?", "French": "Où est la gare ?",
                                    "German": "Wo ist der Bahnhof?", "Italian": "Dov'è la stazione?",
                                    "Portuguese": "Onde fica a estação de comboios?"},
    "How much does this cost?": {"Spanish": "¿Cuánto cuesta esto?", "French": "Combien ça coûte ?",
                                 "German": "Wie viel kostet das?", "Italian": "Quanto costa questo?",
                                 "Portuguese": "Quanto custa isto?"},
    "I would like a coffee, please.": {"Spanish": "Quisiera un café, por favor.",
                                       "French": "Je voudrais un café, s'il vous plaît.",
                                       "German": "Ich hätte gern einen Kaffee, bitte.",
                                       "Italian": "Vorrei un caffè, per favore.",
                                       "Portuguese": "Queria um café, por favor."},
    "See you tomorrow": {"Spanish": "Hasta mañana", "French": "À demain", "German": "Bis morgen",
                         "Italian": "A domani", "Portuguese": "Até amanhã"},
    "Do you speak English?": {"Spanish": "¿Habla inglés?", "French": "Parlez-vous anglais ?",
                              "German": "Sprechen Sie Englisch?", "Italian": "Parla inglese?",
                              "Portuguese": "Fala inglês?"},
    "The bill, please.": {"Spanish": "La cuenta, por favor.", "French": "L'addition, s'il vous plaît.",
                          "German": "Die Rechnung, bitte.", "Italian": "Il conto, per favore.",
                          "Portuguese": "A conta, por favor."},
}

# word, part of speech, definition (real)
WORDS = [
    ("ephemeral", "adjective", "lasting for a very short time"),
    ("ubiquitous", "adjective", "present, appearing or found everywhere"),
    ("serendipity", "noun", "the occurrence of events by chance in a happy or beneficial way"),
    ("meticulous", "adjective", "showing great attention to detail; very careful and precise"),
    ("resilient", "adjective", "able to recover quickly from difficult conditions"),
    ("candid", "adjective", "truthful and straightforward; frank"),
    ("pragmatic", "adjective", "dealing with things sensibly and realistically"),
    ("benevolent", "adjective", "well meaning and kindly"),
    ("ambiguous", "adjective", "open to more than one interpretation"),
    ("gregarious", "adjective", "fond of company; sociable"),
    ("lethargic", "adjective", "sluggish and apathetic; lacking energy"),
    ("eloquent", "adjective", "fluent or persuasive in speaking or writing"),
    ("mitigate", "verb", "to make something less severe, serious or painful"),
    ("procrastinate", "verb", "to delay or postpone action; to put off doing something"),
    ("nostalgia", "noun", "a sentimental longing for a period in the past"),
]

COMPANIES = [("Apple", "AAPL"), ("Microsoft", "MSFT"), ("Alphabet", "GOOGL"), ("Amazon", "AMZN"),
             ("NVIDIA", "NVDA"), ("Tesla", "TSLA"), ("Meta", "META"), ("IBM", "IBM"), ("Intel", "INTC"),
             ("Oracle", "ORCL"), ("Netflix", "NFLX"), ("Adobe", "ADBE"), ("Salesforce", "CRM"),
             ("Coca-Cola", "KO"), ("Disney", "DIS"), ("Walmart", "WMT"), ("Visa", "V"), ("AMD", "AMD")]

# ISO code -> (units per US dollar, reference level only: observations jitter around it; name)
CURRENCIES = {"USD": (1.0, "US dollars"), "EUR": (0.92, "euros"), "GBP": (0.79, "British pounds"),
              "JPY": (151.0, "Japanese yen"), "CHF": (0.90, "Swiss francs"), "CAD": (1.36, "Canadian dollars"),
              "AUD": (1.52, "Australian dollars"), "INR": (83.3, "Indian rupees"), "CNY": (7.23, "Chinese yuan"),
              "MXN": (17.0, "Mexican pesos"), "SEK": (10.6, "Swedish kronor"), "BRL": (5.0, "Brazilian reais")}

# (from, to, human names, multiply-by factor or None for temperatures) (real factors)
UNIT_PAIRS = [
    ("km", "mi", "kilometres", "miles", 0.621371), ("mi", "km", "miles", "kilometres", 1.609344),
    ("kg", "lb", "kilograms", "pounds", 2.204623), ("lb", "kg", "pounds", "kilograms", 0.45359237),
    ("m", "ft", "metres", "feet", 3.280840), ("ft", "m", "feet", "metres", 0.3048),
    ("cm", "in", "centimetres", "inches", 0.393701), ("in", "cm", "inches", "centimetres", 2.54),
    ("l", "gal", "litres", "US gallons", 0.264172), ("gal", "l", "US gallons", "litres", 3.785412),
    ("g", "oz", "grams", "ounces", 0.035274), ("oz", "g", "ounces", "grams", 28.349523),
    ("C", "F", "degrees Celsius", "degrees Fahrenheit", None), ("F", "C", "degrees Fahrenheit", "degrees Celsius", None),
]

FIRST_NAMES = ["Alice", "Bruno", "Chen", "Dana", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
               "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yara"]
LAST_NAMES = ["Andersen", "Baker", "Costa", "Dubois", "Eriksson", "Fischer", "Garcia", "Hoffmann", "Ito", "Jensen",
              "Kowalski", "Larsen", "Moreau", "Nakamura", "Okafor", "Patel", "Rossi", "Silva", "Tanaka", "Weber"]
DEPARTMENTS = ["Sales", "Engineering", "Marketing", "Finance", "Support", "Legal", "Design", "Operations"]
EVENT_TITLES = ["Dentist appointment", "Team standup", "Project review", "Yoga class", "Call with the bank",
                "Parent-teacher meeting", "Lunch with {name}", "1:1 with {name}", "Haircut", "Budget planning",
                "Piano lesson", "Coffee with {name}", "Car service", "Book club", "Quarterly planning"]
TIMEZONES = [("Tokyo", "Asia/Tokyo"), ("London", "Europe/London"), ("New York", "America/New_York"),
             ("Sydney", "Australia/Sydney"), ("Paris", "Europe/Paris"), ("Dubai", "Asia/Dubai"),
             ("São Paulo", "America/Sao_Paulo"), ("Mumbai", "Asia/Kolkata"), ("Los Angeles", "America/Los_Angeles"),
             ("Singapore", "Asia/Singapore"), ("Berlin", "Europe/Berlin"), ("Mexico City", "America/Mexico_City")]
AIRLINES = ["LH", "BA", "AF", "KL", "IB", "TP", "SK", "AY", "LX", "OS", "UA", "DL", "AC", "NH"]
STREETS = ["Oak Street", "Maple Avenue", "Harbour Road", "Station Square", "Mill Lane", "Park Drive", "King Street",
           "Elm Grove", "River Walk", "Hill Road"]
PLACES = ["the Central Library", "the city museum", "the main train station", "the airport", "the university campus",
          "the old town square", "the sports stadium", "the general hospital", "the botanical garden"]

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _fmt(x: float | int | Fraction, places: int = 2) -> str:
    """Plain decimal text: integers without a fraction, others rounded to ``places``."""
    if isinstance(x, Fraction) and x.denominator == 1:
        return str(x.numerator)
    if isinstance(x, int):
        return str(x)
    r = round(float(x), places)
    return str(int(r)) if r == int(r) else f"{r:.{places}f}".rstrip("0")


def _jsonnum(x: float | int | Fraction, places: int = 2) -> int | float:
    text = _fmt(x, places)
    return int(text) if "." not in text else float(text)


def _human_date(d: dt.date, rng: random.Random) -> str:
    style = rng.randrange(3)
    if style == 0:
        return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"
    if style == 1:
        return f"{d.day} {MONTHS[d.month - 1]} {d.year}"
    return d.isoformat()


def _long_date(d: dt.date) -> str:
    return f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}"


def _random_date(rng: random.Random) -> dt.date:
    return dt.date(2024, 1, 1) + dt.timedelta(days=rng.randrange(730))


def _person(rng: random.Random) -> tuple[str, str]:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    return f"{first} {last}", f"{first.lower()}.{last.lower()}@example.com"


def _duration(minutes: int) -> str:
    h, m = divmod(minutes, 60)
    if not h:
        return f"{m} min"
    return f"{h} h {m} min" if m else f"{h} h"


# --------------------------------------------------------------------------- task builders
# Each builder draws one task; the answer is derived from the observations it invents.


def _weather_obs(rng: random.Random, city: str, unit: str) -> JSON:
    celsius = rng.randint(-8, 36)
    cond = rng.choice([c for c in CONDITIONS if c != "snow" or celsius <= 2])
    temp = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    return {"city": city, "temperature": temp, "unit": unit, "condition": cond,
            "humidity": rng.randint(25, 98), "wind_kph": rng.randint(0, 45)}


def task_weather(rng: random.Random) -> Task:
    city = rng.choice(CITIES)
    kind = rng.randrange(4)
    unit = "fahrenheit" if kind == 1 or rng.random() < 0.15 else "celsius"
    args: JSON = {"city": city} if unit == "celsius" and rng.random() < 0.5 else {"city": city, "unit": unit}
    obs = _weather_obs(rng, city, unit)
    t, cond, sym = obs["temperature"], obs["condition"], "°C" if unit == "celsius" else "°F"
    celsius = t if unit == "celsius" else (t - 32) * 5 / 9
    thought = rng.choice([f"I need the current weather in {city}.",
                          f"To answer this I should look up the current conditions in {city}.",
                          f"The user is asking about the weather in {city}, so I'll check it."])
    if kind == 0:
        query = rng.choice([f"What's the weather like in {city} right now?", f"How's the weather in {city}?",
                            f"Can you check the current weather in {city} for me?"])
        answer = (f"It's currently {t}{sym} and {cond} in {city}, with {obs['humidity']}% humidity "
                  f"and wind at {obs['wind_kph']} km/h.")
    elif kind == 1:
        query = rng.choice([f"How warm is it in {city} today? Fahrenheit, please.",
                            f"What's the temperature in {city} in Fahrenheit?"])
        answer = f"It's {t}{sym} in {city} right now, and the sky is {cond}."
    elif kind == 2:
        query = rng.choice([f"Is it raining in {city} at the moment?", f"Do I need an umbrella in {city} today?"])
        wet = any(w in cond for w in ("rain", "drizzle", "thunder"))
        answer = (f"Yes: there's {cond} in {city} right now ({t}{sym}), so take an umbrella." if wet else
                  f"No, it isn't raining in {city} right now; it's {cond} and {t}{sym}.")
    else:
        query = rng.choice([f"Should I bring a jacket in {city} today?", f"Is it cold in {city} right now?"])
        if celsius < 12:
            answer = f"Yes, bring a warm jacket: it's only {t}{sym} and {cond} in {city}."
        elif celsius < 19:
            answer = f"A light jacket is a good idea: it's {t}{sym} and {cond} in {city}."
        else:
            answer = f"You probably won't need one: it's a mild {t}{sym} and {cond} in {city}."
    return Task(query, [Call(thought, WEATHER, args, obs)], answer)


def task_weather_compare(rng: random.Random) -> Task:
    a, b = rng.sample(CITIES, 2)
    obs_a, obs_b = _weather_obs(rng, a, "celsius"), _weather_obs(rng, b, "celsius")
    ta, tb = obs_a["temperature"], obs_b["temperature"]
    query = rng.choice([f"Which is warmer right now, {a} or {b}?", f"Compare the current temperature in {a} and {b}."])
    calls = [Call(f"I need the current temperature in both cities, starting with {a}.", WEATHER, {"city": a}, obs_a),
             Call(f"{a} is at {ta}°C. Now I need {b}.", WEATHER, {"city": b}, obs_b)]
    if ta == tb:
        answer = f"They're the same right now: {ta}°C in both {a} ({obs_a['condition']}) and {b} ({obs_b['condition']})."
    else:
        warm, cold = (a, b) if ta > tb else (b, a)
        hi, lo = max(ta, tb), min(ta, tb)
        answer = (f"{warm} is warmer: it's {hi}°C there versus {lo}°C in {cold}, "
                  f"a difference of {hi - lo} degrees.")
    return Task(query, calls, answer)


def _arith(rng: random.Random) -> tuple[str, str, Fraction]:
    """(question, expression, exact value) for a random arithmetic question."""
    kind = rng.randrange(7)
    a, b, c = rng.randint(12, 999), rng.randint(2, 99), rng.randint(2, 30)
    if kind == 0:
        return rng.choice([f"What is {a} times {b}?", f"Multiply {a} by {b}."]), f"{a} * {b}", Fraction(a * b)
    if kind == 1:
        x, y = rng.randint(1000, 99999), rng.randint(1000, 99999)
        return rng.choice([f"What's {x} plus {y}?", f"Add {x} and {y}."]), f"{x} + {y}", Fraction(x + y)
    if kind == 2:
        x, y = rng.randint(1000, 99999), rng.randint(100, 9999)
        return f"What is {x} minus {y}?", f"{x} - {y}", Fraction(x - y)
    if kind == 3:
        x = a * b if rng.random() < 0.5 else a * b + rng.randint(1, b - 1)
        return rng.choice([f"Divide {x} by {b}.", f"What is {x} divided by {b}?"]), f"{x} / {b}", Fraction(x, b)
    if kind == 4:
        p = rng.choice([5, 10, 12, 15, 18, 20, 25, 30, 35, 40, 75])
        x = rng.randint(20, 5000)
        return f"What is {p}% of {x}?", f"{x} * {p} / 100", Fraction(x * p, 100)
    if kind == 5:
        return f"Compute ({a} + {b}) * {c}.", f"({a} + {b}) * {c}", Fraction((a + b) * c)
    return rng.choice([f"What is {a} squared?", f"What's {a} to the power of 2?"]), f"{a} ** 2", Fraction(a * a)


def task_calculator(rng: random.Random) -> Task:
    question, expr, value = _arith(rng)
    shown = _fmt(value, 4)
    approx = value.denominator != 1 and Fraction(shown) != value
    thought = rng.choice(["I'll use the calculator to get an exact result.", f"I should evaluate {expr}.",
                          "This is arithmetic; the calculator will be reliable."])
    answer = rng.choice([f"{expr} = {shown}" + (" (rounded)." if approx else "."),
                         f"The result is {shown}" + (", rounded to four decimals." if approx else ".")])
    return Task(question, [Call(thought, CALCULATOR, {"expression": expr}, {"result": _jsonnum(value, 4)})], answer)


def task_tip(rng: random.Random) -> Task:
    cents = rng.randint(1500, 25000)
    bill, bill_text = Fraction(cents, 100), f"{cents // 100}.{cents % 100:02d}"
    tip = rng.choice([10, 12, 15, 18, 20, 22])
    people = rng.randint(2, 8)
    expr = f"{bill_text} * (1 + {tip} / 100) / {people}"
    value = bill * (1 + Fraction(tip, 100)) / people
    query = f"Our bill is ${bill_text} and we want to leave a {tip}% tip. How much does each of the {people} of us pay?"
    thought = f"I need the bill plus a {tip}% tip, divided by {people}."
    answer = f"With a {tip}% tip the total is ${float(bill * (1 + Fraction(tip, 100))):.2f}, so each of you pays about ${float(value):.2f}."
    return Task(query, [Call(thought, CALCULATOR, {"expression": expr}, {"result": _jsonnum(value, 4)})], answer)


def task_units(rng: random.Random) -> Task:
    src, dst, src_name, dst_name, factor = rng.choice(UNIT_PAIRS)
    if factor is None:
        value = rng.randint(-20, 40) if src == "C" else rng.randint(-4, 104)
        result = value * 9 / 5 + 32 if src == "C" else (value - 32) * 5 / 9
    else:
        value = rng.choice([rng.randint(1, 500), _jsonnum(rng.uniform(0.5, 100), 1)])
        result = value * factor
    query = rng.choice([f"Convert {_fmt(value)} {src_name} to {dst_name}.", f"How many {dst_name} is {_fmt(value)} {src_name}?",
                        f"What's {_fmt(value)} {src_name} in {dst_name}?"])
    obs = {"value": value, "from_unit": src, "to_unit": dst, "result": _jsonnum(result)}
    thought = rng.choice([f"I'll convert {_fmt(value)} {src} to {dst}.", "A unit conversion; let me use the converter."])
    answer = f"{_fmt(value)} {src_name} is about {_fmt(result)} {dst_name}."
    return Task(query, [Call(thought, CONVERT_UNITS, {"value": value, "from_unit": src, "to_unit": dst}, obs)], answer)


def _fx(rng: random.Random, amount: float, src: str, dst: str) -> JSON:
    rate = CURRENCIES[dst][0] / CURRENCIES[src][0] * rng.uniform(0.97, 1.03)
    rate = round(rate, 4) if rate < 10 else round(rate, 2)
    return {"amount": amount, "from": src, "to": dst, "rate": rate, "converted": round(amount * rate, 2)}


def task_currency(rng: random.Random) -> Task:
    src, dst = rng.sample(list(CURRENCIES), 2)
    amount = rng.choice([rng.randint(5, 5000), rng.randint(1, 200) * 50])
    obs = _fx(rng, amount, src, dst)
    query = rng.choice([f"How much is {amount} {src} in {dst}?", f"Convert {amount} {CURRENCIES[src][1]} to {CURRENCIES[dst][1]}.",
                        f"I have {amount} {src}. What's that in {CURRENCIES[dst][1]}?"])
    thought = f"I need today's {src} to {dst} exchange rate to convert {amount} {src}."
    answer = f"{amount} {src} is about {obs['converted']:,.2f} {dst} at today's rate of {obs['rate']} {dst} per {src}."
    args = {"amount": amount, "from_currency": src, "to_currency": dst}
    return Task(query, [Call(thought, CURRENCY, args, obs)], answer)


def task_currency_split(rng: random.Random) -> Task:
    src, dst = rng.sample(list(CURRENCIES), 2)
    amount, people = rng.randint(2, 60) * 50, rng.randint(2, 6)
    obs = _fx(rng, amount, src, dst)
    expr = f"{obs['converted']} / {people}"
    share = Fraction(str(obs["converted"])) / people
    query = f"We're {people} friends sharing a rental that costs {amount} {src}. How much is each share in {dst}?"
    calls = [Call(f"First I convert {amount} {src} to {dst}.", CURRENCY,
                  {"amount": amount, "from_currency": src, "to_currency": dst}, obs),
             Call(f"The total is {obs['converted']} {dst}; now I divide it by {people}.", CALCULATOR,
                  {"expression": expr}, {"result": _jsonnum(share, 4)})]
    answer = (f"The rental comes to {obs['converted']:,.2f} {dst} (rate {obs['rate']}), so each of the {people} "
              f"shares is about {float(share):,.2f} {dst}.")
    return Task(query, calls, answer)


def _quote(rng: random.Random, symbol: str) -> JSON:
    return {"symbol": symbol, "price": round(rng.uniform(15, 950), 2), "currency": "USD",
            "change_percent": round(rng.uniform(-4.5, 4.5), 2)}


def task_stock(rng: random.Random) -> Task:
    company, sym = rng.choice(COMPANIES)
    obs = _quote(rng, sym)
    query = rng.choice([f"How is {company} stock doing today?", f"What's the current price of {sym}?",
                        f"Give me the latest quote for {company}."])
    change = obs["change_percent"]
    move = "unchanged" if change == 0 else f"{'up' if change > 0 else 'down'} {abs(change):.2f}% today"
    answer = f"{company} ({sym}) is trading at ${obs['price']:.2f}, {move}."
    thought = rng.choice([f"I need the latest quote for {sym}.", f"{company} trades as {sym}; let me get its quote."])
    return Task(query, [Call(thought, STOCK, {"symbol": sym}, obs)], answer)


def task_stock_value(rng: random.Random) -> Task:
    company, sym = rng.choice(COMPANIES)
    shares = rng.randint(2, 400)
    obs = _quote(rng, sym)
    value = Fraction(str(obs["price"])) * shares
    query = f"I own {shares} shares of {company}. What are they worth right now?"
    calls = [Call(f"I need the current price of {sym}.", STOCK, {"symbol": sym}, obs),
             Call(f"{sym} is at ${obs['price']:.2f}; I multiply by {shares} shares.", CALCULATOR,
                  {"expression": f"{shares} * {obs['price']}"}, {"result": _jsonnum(value)})]
    answer = f"At ${obs['price']:.2f} a share, your {shares} shares of {company} are worth ${float(value):,.2f}."
    return Task(query, calls, answer)


def _search_obs(rng: random.Random, fact: Fact) -> JSON:
    results = [{"title": fact.title, "snippet": fact.snippet}]
    for title, snippet in rng.sample(DISTRACTOR_RESULTS, rng.randint(0, 2)):
        results.insert(rng.randint(0, len(results)), {"title": title, "snippet": snippet})
    return {"results": results}


def task_search(rng: random.Random) -> Task:
    fact = rng.choice(FACTS)
    thought = rng.choice(["Let me search the web for this.", "I should look this up to be sure.",
                          f"I'll search for \"{fact.search}\"."])
    return Task(rng.choice(fact.questions), [Call(thought, SEARCH, {"query": fact.search}, _search_obs(rng, fact))],
                fact.answer)


def task_search_years(rng: random.Random) -> Task:
    fact = rng.choice([f for f in FACTS if f.year])
    now = rng.randint(2024, 2026)
    query = rng.choice([f"How many years have passed since {fact.event}? Count from {now}.",
                        f"As of {now}, how long ago was {fact.event}?"])
    calls = [Call("First I need the year.", SEARCH, {"query": fact.search}, _search_obs(rng, fact)),
             Call(f"It was {fact.year}; I subtract that from {now}.", CALCULATOR,
                  {"expression": f"{now} - {fact.year}"}, {"result": now - fact.year})]
    event = fact.event[0].upper() + fact.event[1:]
    return Task(query, calls, f"{event} was in {fact.year}, so {now - fact.year} years have passed as of {now}.")


def _event_title(rng: random.Random) -> str:
    return rng.choice(EVENT_TITLES).format(name=rng.choice(FIRST_NAMES))


def task_create_event(rng: random.Random) -> Task:
    day = _random_date(rng)
    title = _event_title(rng)
    hour, minute = rng.randint(7, 19), rng.choice([0, 15, 30, 45])
    start = f"{hour:02d}:{minute:02d}"
    spoken = f"{hour % 12 or 12}{f':{minute:02d}' if minute else ''} {'PM' if hour >= 12 else 'AM'}"
    duration = rng.choice([15, 30, 45, 60, 90, 120])
    query = rng.choice([f"Add \"{title}\" to my calendar on {_human_date(day, rng)} at {spoken} for {duration} minutes.",
                        f"Please schedule \"{title}\" on {_human_date(day, rng)}, {spoken}, {duration} minutes long."])
    args = {"title": title, "date": day.isoformat(), "start_time": start, "duration_minutes": duration}
    obs = {"status": "confirmed", "event_id": f"evt_{rng.randint(10000, 99999)}"}
    answer = f"Done: \"{title}\" is on your calendar for {_long_date(day)} at {start} ({_duration(duration)})."
    return Task(query, [Call("I'll create the calendar event with these details.", CREATE_EVENT, args, obs)], answer)


def task_list_events(rng: random.Random) -> Task:
    day = _random_date(rng)
    starts = sorted(rng.sample(range(8, 19), rng.choice([0, 1, 2, 2, 3, 4])))
    events = [{"title": _event_title(rng), "start_time": f"{h:02d}:00", "end_time": f"{h:02d}:{rng.choice([30, 45])}"}
              for h in starts]
    query = rng.choice([f"What's on my calendar on {_human_date(day, rng)}?", f"Do I have anything scheduled for {_human_date(day, rng)}?"])
    if events:
        items = "; ".join(f"{e['title']} from {e['start_time']} to {e['end_time']}" for e in events)
        answer = f"On {_long_date(day)} you have {len(events)} event{'s' if len(events) > 1 else ''}: {items}."
    else:
        answer = f"Your calendar is free on {_long_date(day)}: nothing is scheduled."
    return Task(query, [Call(f"I'll list the events for {day.isoformat()}.", LIST_EVENTS, {"date": day.isoformat()},
                             {"date": day.isoformat(), "events": events})], answer)


def task_translate(rng: random.Random) -> Task:
    phrase = rng.choice(list(PHRASES))
    lang = rng.choice(list(PHRASES[phrase]))
    out = PHRASES[phrase][lang]
    query = rng.choice([f"How do you say \"{phrase}\" in {lang}?", f"Translate \"{phrase}\" into {lang}.",
                        f"What's the {lang} for \"{phrase}\"?"])
    obs = {"translation": out, "source_language": "English", "target_language": lang}
    answer = f"In {lang}, \"{phrase}\" is \"{out}\"."
    return Task(query, [Call(f"I'll translate the phrase into {lang}.", TRANSLATE,
                             {"text": phrase, "target_language": lang}, obs)], answer)


def task_order(rng: random.Random) -> Task:
    order_id = f"A{rng.randint(10000, 99999)}"
    query = rng.choice([f"Where is my order {order_id}?", f"Can you check the status of order {order_id}?",
                        f"Has order {order_id} shipped yet?"])
    call = Call(f"I need to look up order {order_id}.", LOOKUP_ORDER, {"order_id": order_id}, {})
    if rng.random() < 0.12:
        call.result = {"error": f"order {order_id} not found"}
        answer = f"I couldn't find an order with the id {order_id}. Could you double-check the number on your confirmation email?"
        return Task(query, [call], answer)
    status = rng.choice(["processing", "shipped", "shipped", "delivered", "cancelled"])
    eta = _random_date(rng)
    call.result = {"order_id": order_id, "status": status, "items": rng.randint(1, 6)}
    if status == "shipped":
        carrier = rng.choice(["DHL", "UPS", "FedEx", "DPD", "USPS"])
        call.result |= {"carrier": carrier, "estimated_delivery": eta.isoformat()}
        answer = f"Order {order_id} has shipped with {carrier} and should arrive on {_long_date(eta)}."
    elif status == "delivered":
        call.result |= {"delivered_on": eta.isoformat()}
        answer = f"Order {order_id} was delivered on {_long_date(eta)}."
    elif status == "processing":
        answer = f"Order {order_id} is still being processed and hasn't shipped yet."
    else:
        answer = f"Order {order_id} was cancelled. If that's unexpected, please contact the shop's support team."
    return Task(query, [call], answer)


def task_sql(rng: random.Random) -> Task:
    dept = rng.choice(DEPARTMENTS)
    kind = rng.randrange(3)
    if kind == 0:
        n = rng.randint(0, 60)
        query = rng.choice([f"How many employees work in {dept}?", f"What's the headcount of the {dept} team?"])
        sql = f"SELECT COUNT(*) AS n FROM employees WHERE department = '{dept}'"
        rows: list[JSON] = [{"n": n}]
        answer = f"{n} employee{'s work' if n != 1 else ' works'} in {dept}."
    elif kind == 1:
        avg = round(rng.uniform(42000, 140000), 2)
        query = f"What's the average salary in the {dept} department?"
        sql = f"SELECT AVG(salary) AS avg_salary FROM employees WHERE department = '{dept}'"
        rows = [{"avg_salary": avg}]
        answer = f"The average salary in {dept} is ${avg:,.2f}."
    else:
        k = rng.randint(2, 4)
        query = f"Who are the {k} most recent hires in {dept}?"
        sql = f"SELECT name, hire_date FROM employees WHERE department = '{dept}' ORDER BY hire_date DESC LIMIT {k}"
        days = sorted(rng.sample(range(700), k))
        rows = [{"name": _person(rng)[0], "hire_date": (dt.date(2025, 12, 31) - dt.timedelta(days=d)).isoformat()}
                for d in days]
        answer = f"The {k} most recent hires in {dept} are " + ", ".join(
            f"{r['name']} ({r['hire_date']})" for r in rows) + "."
    return Task(query, [Call("I'll query the employees table.", SQL, {"sql": sql}, {"rows": rows})], answer)


EMAIL_TOPICS = [
    ("the meeting moves to {time}", "Meeting moved to {time}", "the meeting has moved to {time}"),
    ("I'll be about 15 minutes late", "Running late", "I'm running about 15 minutes late"),
    ("the report is ready for review", "Report ready for review", "the report is ready for your review"),
    ("thanks for yesterday's presentation", "Thank you", "thank you for yesterday's presentation"),
    ("the invoice was paid today", "Invoice paid", "the invoice was paid today"),
]


def task_email(rng: random.Random) -> Task:
    name, addr = _person(rng)
    ask, subject, body_line = rng.choice(EMAIL_TOPICS)
    time = f"{rng.randint(9, 17)}:{rng.choice(['00', '30'])}"
    ask, subject, body_line = ask.format(time=time), subject.format(time=time), body_line.format(time=time)
    first = name.split()[0]
    query = rng.choice([f"Email {name} at {addr} to say {ask}.", f"Please send {first} ({addr}) a note that {ask}."])
    body = f"Hi {first},\n\nJust a quick note: {body_line}.\n\nBest regards"
    args = {"to": addr, "subject": subject, "body": body}
    if rng.random() < 0.1:
        obs: JSON = {"status": "failed", "error": "mailbox unavailable"}
        answer = f"The email to {addr} could not be delivered (mailbox unavailable). Is there another address for {first}?"
    else:
        obs = {"status": "sent", "message_id": f"msg_{rng.randint(100000, 999999)}"}
        answer = f"Sent: {first} will get an email with the subject \"{subject}\"."
    return Task(query, [Call(f"I'll write a short email to {first}.", EMAIL, args, obs)], answer)


def _flights(rng: random.Random) -> list[JSON]:
    n = rng.randint(2, 4)
    prices = rng.sample(range(79, 900), n)
    out = []
    for price in prices:
        dep = rng.randint(6 * 60, 20 * 60)
        stops = rng.choice([0, 0, 1, 1, 2])
        arr = dep + rng.randint(60, 180) + 90 * stops
        out.append({"flight": f"{rng.choice(AIRLINES)} {rng.randint(100, 9999)}", "depart": f"{dep // 60:02d}:{dep % 60:02d}",
                    "arrive": f"{min(arr, 23 * 60 + 59) // 60:02d}:{min(arr, 23 * 60 + 59) % 60:02d}",
                    "stops": stops, "price_usd": price})
    return out


def task_flights(rng: random.Random) -> Task:
    a, b = rng.sample(CITIES, 2)
    day = _random_date(rng)
    flights = _flights(rng)
    args = {"origin": a, "destination": b, "date": day.isoformat()}
    if rng.random() < 0.6:
        query = f"Find me the cheapest flight from {a} to {b} on {_human_date(day, rng)}."
        best = min(flights, key=lambda f: f["price_usd"])
        answer = (f"The cheapest option is {best['flight']} at ${best['price_usd']}, departing {best['depart']} and "
                  f"arriving {best['arrive']} with {best['stops'] or 'no'} stop{'s' if best['stops'] != 1 else ''}.")
    else:
        query = f"Are there any nonstop flights from {a} to {b} on {_human_date(day, rng)}?"
        direct = [f for f in flights if f["stops"] == 0]
        if direct:
            answer = "Yes: " + "; ".join(f"{f['flight']} departs {f['depart']}, arrives {f['arrive']}, ${f['price_usd']}"
                                         for f in direct) + "."
        else:
            answer = f"No, every flight from {a} to {b} that day has at least one stop."
    return Task(query, [Call(f"I'll search flights from {a} to {b} on {day.isoformat()}.", FLIGHTS, args,
                             {"flights": flights})], answer)


def task_flight_and_event(rng: random.Random) -> Task:
    a, b = rng.sample(CITIES, 2)
    day = _random_date(rng)
    flights = _flights(rng)
    best = min(flights, key=lambda f: f["price_usd"])
    dh, dm = map(int, best["depart"].split(":"))
    ah, am = map(int, best["arrive"].split(":"))
    duration = ah * 60 + am - dh * 60 - dm
    title = f"Flight {best['flight']} to {b}"
    query = f"I'm planning a trip: find the cheapest flight from {a} to {b} on {day.isoformat()} and put it in my calendar."
    event = {"title": title, "date": day.isoformat(), "start_time": best["depart"], "duration_minutes": duration}
    calls = [Call(f"First I search flights from {a} to {b}.", FLIGHTS, {"origin": a, "destination": b, "date": day.isoformat()},
                  {"flights": flights}),
             Call(f"The cheapest is {best['flight']} at ${best['price_usd']}, {best['depart']}-{best['arrive']}; "
                  f"now I add it to the calendar.", CREATE_EVENT, event,
                  {"status": "confirmed", "event_id": f"evt_{rng.randint(10000, 99999)}"})]
    answer = (f"The cheapest flight is {best['flight']} (${best['price_usd']}), {best['depart']} to {best['arrive']}. "
              f"I've added \"{title}\" to your calendar on {_long_date(day)}.")
    return Task(query, calls, answer)


def task_define(rng: random.Random) -> Task:
    word, pos, definition = rng.choice(WORDS)
    query = rng.choice([f"What does \"{word}\" mean?", f"Define {word}.", f"What's the meaning of the word {word}?"])
    obs = {"word": word, "part_of_speech": pos, "definition": definition}
    return Task(query, [Call("Let me check the dictionary.", DEFINE, {"word": word}, obs)],
                f"\"{word.capitalize()}\" ({pos}) means {definition}.")


def task_clock(rng: random.Random) -> Task:
    city, tz = rng.choice(TIMEZONES)
    when = dt.datetime(2024, 1, 1) + dt.timedelta(minutes=rng.randrange(730 * 24 * 60))
    query = rng.choice([f"What time is it in {city} right now?", f"What's the local time in {city}?"])
    obs = {"timezone": tz, "local_time": when.strftime("%Y-%m-%d %H:%M"), "weekday": WEEKDAYS[when.weekday()]}
    answer = f"It's {when:%H:%M} on {WEEKDAYS[when.weekday()]}, {MONTHS[when.month - 1]} {when.day} in {city}."
    return Task(query, [Call(f"{city} is in the {tz} time zone.", CLOCK, {"timezone": tz}, obs)], answer)


def task_bmi(rng: random.Random) -> Task:
    w, h = rng.randint(45, 120), rng.randint(150, 200)
    bmi = round(w / (h / 100) ** 2, 1)
    cat = "underweight" if bmi < 18.5 else "normal weight" if bmi < 25 else "overweight" if bmi < 30 else "obese"
    query = rng.choice([f"I'm {h} cm tall and weigh {w} kg. What's my BMI?", f"Calculate the BMI for {w} kg and {h} cm."])
    obs = {"bmi": bmi, "category": cat}
    answer = f"A weight of {w} kg at {h} cm gives a BMI of {bmi}, which is in the {cat} range."
    return Task(query, [Call("I'll compute the BMI.", BMI, {"weight_kg": w, "height_cm": h}, obs)], answer)


def task_loan(rng: random.Random) -> Task:
    principal = rng.randint(20, 800) * 1000
    rate = rng.choice([2.5, 3.0, 3.5, 3.9, 4.25, 4.75, 5.0, 5.5, 6.0, 6.9, 7.5])
    years = rng.choice([5, 10, 15, 20, 25, 30])
    r, n = rate / 1200, years * 12
    payment = round(principal * r / (1 - (1 + r) ** -n), 2)
    interest = round(payment * n - principal, 2)
    query = f"What would the monthly payment be on a {years}-year loan of ${principal:,} at {_fmt(rate)}% interest?"
    obs = {"monthly_payment": payment, "total_interest": interest}
    answer = (f"The monthly payment would be ${payment:,.2f}; over {years} years you'd pay about "
              f"${interest:,.2f} in interest.")
    return Task(query, [Call("I'll compute the amortized monthly payment.", LOAN,
                             {"principal": principal, "annual_rate_percent": rate, "years": years}, obs)], answer)


def task_route(rng: random.Random) -> Task:
    origin = f"{rng.randint(1, 250)} {rng.choice(STREETS)}"
    dest = rng.choice(PLACES)
    mode = rng.choice(["driving", "walking", "cycling", "transit"])
    km = round(rng.uniform(0.8, 9.0) if mode in ("walking", "cycling") else rng.uniform(2, 60), 1)
    speed = {"driving": 38, "walking": 5, "cycling": 16, "transit": 24}[mode]
    minutes = max(3, round(km / speed * 60))
    how = {"driving": "by car", "walking": "on foot", "cycling": "by bike", "transit": "by public transport"}[mode]
    query = rng.choice([f"How long does it take to get from {origin} to {dest} {how}?",
                        f"How far is {dest} from {origin}? I'm going {how}."])
    args = {"origin": origin, "destination": dest, "mode": mode}
    obs = {"distance_km": km, "duration_minutes": minutes, "mode": mode}
    answer = f"It's {km} km from {origin} to {dest}: about {_duration(minutes)} {how}."
    return Task(query, [Call("I'll ask the router for this trip.", ROUTE, args, obs)], answer)


# builder, relative weight
TASKS: list[tuple[Callable[[random.Random], Task], float]] = [
    (task_weather, 3), (task_weather_compare, 1), (task_calculator, 3), (task_tip, 1), (task_units, 2),
    (task_currency, 2), (task_currency_split, 1), (task_stock, 1.5), (task_stock_value, 1), (task_search, 2.5),
    (task_search_years, 1), (task_create_event, 1.5), (task_list_events, 1), (task_translate, 1.5),
    (task_order, 1.5), (task_sql, 1.5), (task_email, 1), (task_flights, 1.5), (task_flight_and_event, 1),
    (task_define, 1), (task_clock, 1), (task_bmi, 1), (task_loan, 1), (task_route, 1),
]


def _draw_task(rng: random.Random) -> Task:
    builders, weights = zip(*TASKS)
    return rng.choices(builders, weights)[0](rng)


# --------------------------------------------------------------------------- direct answers (negatives)

TIPS = {
    "sleep better": ["keep a regular bedtime, even at weekends", "avoid screens for the last hour before bed",
                     "keep the bedroom cool, dark and quiet", "skip caffeine after early afternoon"],
    "stay focused while studying": ["work in 25-minute blocks with short breaks", "put your phone in another room",
                                    "decide what you'll finish before you start", "review notes at the end of the day"],
    "save money on groceries": ["plan meals for the week and shop with a list", "compare unit prices, not package prices",
                                "buy staples in bulk", "don't shop when you're hungry"],
    "start running": ["begin with walk-run intervals", "increase your weekly distance slowly",
                      "get shoes that fit well", "take rest days seriously"],
}


def _direct_chat(rng: random.Random) -> tuple[str, str, set[str]]:
    """(query, direct answer, names of tools that would make the query a tool task)."""
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice([("Hi there!", "Hello! How can I help you today?"),
                           ("Good morning! How are you?", "Good morning! I'm doing well, thanks for asking. What can I do for you?"),
                           ("Hey, what can you help me with?", "I can answer questions, explain things, help with writing "
                            "and planning, and use tools when a task needs live data. What would you like to do?")]) + (set(),)
    if kind == 1:
        topic = rng.choice(list(TIPS))
        tips = rng.sample(TIPS[topic], 3)
        return (f"Give me three tips to {topic}.",
                "Here are three tips:\n" + "\n".join(f"{i}. {t[0].upper()}{t[1:]}." for i, t in enumerate(tips, 1)), set())
    if kind == 2:
        word = rng.choice(["planet", "library", "keyboard", "sunflower", "harbour", "notebook", "elephant", "lantern"])
        return f"Spell \"{word}\" backwards.", f"\"{word}\" backwards is \"{word[::-1]}\".", set()
    if kind == 3:
        nums = rng.sample(range(1, 200), rng.randint(4, 7))
        return (f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}",
                ", ".join(map(str, sorted(nums))), {"calculator"})
    if kind == 4:
        n = rng.randint(11, 199)
        factor = next((d for d in range(2, int(n ** 0.5) + 1) if n % d == 0), None)
        answer = (f"Yes, {n} is a prime number: it has no divisors other than 1 and itself." if factor is None else
                  f"No, {n} is not prime: it is divisible by {factor} ({n} = {factor} × {n // factor}).")
        return f"Is {n} a prime number?", answer, {"calculator"}
    if kind == 5:
        country, capital = rng.choice(CAPITALS)
        return f"What is the capital of {country}?", f"The capital of {country} is {capital}.", {"web_search"}
    if kind == 6:
        name = rng.choice(FIRST_NAMES)
        return (f"Can you write a short birthday message for my friend {name}?",
                rng.choice([f"Happy birthday, {name}! Wishing you a year full of good friends, new adventures and plenty of cake.",
                            f"Happy birthday, {name}! I hope today is as wonderful as you are. Here's to a great year ahead!"]),
                set())
    if kind == 7:
        return rng.choice([("Thanks, that's all for now.", "You're welcome! Have a great day."),
                           ("What's a good name for a grey cat?", "A few ideas for a grey cat: Smokey, Ash, Pebble, Misty or Earl Grey.")]) + (set(),)
    word, pos, definition = rng.choice(WORDS)
    return f"Use the word \"{word}\" in a sentence.", _example_sentence(word, pos, definition), {"define_word"}


def _example_sentence(word: str, pos: str, definition: str) -> str:
    return f"\"{word.capitalize()}\" is a {pos} meaning {definition}. For example: {EXAMPLES[word]}"


EXAMPLES = {
    "ephemeral": "The beauty of the cherry blossoms is ephemeral.",
    "ubiquitous": "Smartphones have become ubiquitous.",
    "serendipity": "Meeting her old friend on the train was pure serendipity.",
    "meticulous": "She kept meticulous records of every experiment.",
    "resilient": "The town proved resilient after the flood.",
    "candid": "Thank you for your candid feedback.",
    "pragmatic": "We took a pragmatic approach and fixed the biggest problem first.",
    "benevolent": "A benevolent donor paid for the new playground.",
    "ambiguous": "The last sentence of the contract is ambiguous.",
    "gregarious": "He is gregarious and loves big parties.",
    "lethargic": "The heat made everyone feel lethargic.",
    "eloquent": "She gave an eloquent speech at the ceremony.",
    "mitigate": "Planting trees can help mitigate flooding.",
    "procrastinate": "I tend to procrastinate when a task feels too big.",
    "nostalgia": "Old songs fill me with nostalgia.",
}


def _direct_without_tools(rng: random.Random) -> tuple[str, str]:
    """A query that tempts a tool call, answered directly because no tools are available."""
    kind = rng.randrange(7)
    if kind == 0:
        city = rng.choice(CITIES)
        return (rng.choice([f"What's the weather like in {city} right now?", f"Is it raining in {city}?"]),
                f"I don't have access to live weather data, so I can't tell you the current conditions in {city}. "
                "A weather app or your national weather service will have an up-to-date forecast.")
    if kind == 1:
        company, sym = rng.choice(COMPANIES)
        return (f"What's {company}'s stock price right now?",
                f"I can't look up live market data, so I don't know {company}'s ({sym}) current price. "
                "A finance site or your brokerage app will show the latest quote.")
    if kind == 2:
        name, addr = _person(rng)
        return (f"Send an email to {addr} saying I'll be late.",
                f"I can't send emails myself, but here's a message you can send to {name.split()[0]}:\n\n"
                f"Hi {name.split()[0]}, I'm running a little late and will be there as soon as I can. Sorry for the wait!")
    if kind == 3:
        question, expr, value = _arith(rng)
        shown = _fmt(value, 4)
        approx = value.denominator != 1 and Fraction(shown) != value
        return question, f"{expr} = {shown}" + (" (rounded to four decimals)." if approx else ".")
    if kind == 4:
        fact = rng.choice(FACTS)
        return rng.choice(fact.questions), fact.answer
    if kind == 5:
        phrase = rng.choice(list(PHRASES))
        lang = rng.choice(list(PHRASES[phrase]))
        return f"How do you say \"{phrase}\" in {lang}?", f"In {lang}, \"{phrase}\" is \"{PHRASES[phrase][lang]}\"."
    word, pos, definition = rng.choice(WORDS)
    return f"What does \"{word}\" mean?", f"\"{word.capitalize()}\" ({pos}) means {definition}."


# --------------------------------------------------------------------------- rendering

PLAIN_SYSTEMS = ["You are a helpful assistant.", "You are a helpful assistant. Answer the user's questions directly.",
                 "You are a friendly and knowledgeable assistant."]


def _tools_for(rng: random.Random, needed: list[Tool], exclude: set[str] = frozenset()) -> list[Tool]:
    """The needed tools plus 0-2 irrelevant ones, shuffled, so choosing the tool is part of the task."""
    pool = [t for t in ALL_TOOLS if t not in needed and t.name not in exclude]
    tools = list(needed) + rng.sample(pool, rng.choice([0, 1, 1, 2]))
    rng.shuffle(tools)
    return tools


def _react_system(tools: list[Tool]) -> str:
    listing = "\n".join(f"{t.name}: {t.description} Parameters: {_dumps(t.spec()['parameters'])}" for t in tools)
    names = ", ".join(t.name for t in tools)
    return (
        f"Answer the user as well as you can. You have these tools:\n{listing}\n\n"
        "Use this format:\n"
        "Thought: what to do next\n"
        f"Action: one of [{names}]\n"
        "Action Input: the arguments as JSON\n"
        "Each result comes back as an Observation. Repeat as needed, then end with:\n"
        "Thought: I now know the final answer\n"
        "Final Answer: the answer for the user"
    )


FINISH_SPEC = {"name": "Finish", "description": "End the task.",
               "parameters": {"type": "object", "properties": {
                   "return_type": {"type": "string", "enum": ["give_answer", "give_up"]},
                   "final_answer": {"type": "string"}}, "required": ["return_type"]}}


def _react_finish_system(tools: list[Tool]) -> str:
    return (
        "Solve the task with function calls. Reply at each step with\n"
        "Thought: your reasoning\nAction: the function name\nAction Input: the arguments as JSON\n"
        "When done, call Finish with return_type \"give_answer\" and the final answer.\nFunctions:\n"
        + _dumps([t.spec() for t in tools] + [FINISH_SPEC])
    )


def _chat_system(rng: random.Random, tools: list[Tool]) -> str:
    intro = rng.choice([
        "You are a helpful assistant with access to the tools below. Use a tool only when it is needed; "
        "otherwise answer directly.",
        "You can call these tools to help the user. If a question can be answered without them, just answer.",
        "You are an assistant that can use tools. Call a tool when the task needs live data or an exact computation.",
    ])
    how = "To call a tool, name it in backticks and give its arguments as a JSON object on the next line."
    style = rng.choice([0, 1, 2, 2])
    if style == 0:
        listing = _dumps([t.spec() for t in tools])
    elif style == 1:
        listing = "\n".join(f"- {t.name}: {t.description} Parameters: {_dumps(t.spec()['parameters'])}" for t in tools)
    else:
        listing = "\n".join(f"- {t.signature()}" for t in tools)
    return f"{intro}\n{how}\n\nTools:\n{listing}"


@dataclass
class _Style:
    """Per-conversation surface choices that vary across the released files."""

    loss_keys: str  # "assistant": loss on assistant turns only; "none"; "all": on every turn
    typed: bool  # messages carry an extra "type" key
    observation: str  # how chat-form observations are written


def _message(style: _Style, role: str, content: str, kind: str, in_context: bool = False) -> JSON:
    msg: JSON = {"role": role, "content": content}
    if in_context and role == "assistant":
        msg["loss"] = False
    elif style.loss_keys == "all" or (style.loss_keys == "assistant" and role == "assistant"):
        msg["loss"] = role == "assistant"
    if style.typed:
        msg["type"] = kind
    return msg


CHAT_CALL_LEADS = ["I'll use `{tool}`.", "The right tool for this is `{tool}`.", "Let me call `{tool}`.",
                   "I will call `{tool}`."]
CHAT_ARG_LEADS = ["Arguments: ", "With arguments: ", ""]
FINAL_THOUGHTS = ["I now know the final answer.", "I have everything I need.", "That answers the question."]


def _render_task(rng: random.Random, form: str, task: Task, style: _Style, in_context: bool) -> list[JSON]:
    msgs = [_message(style, "user", task.query, "query")]
    lead = rng.choice(CHAT_CALL_LEADS)
    arg_lead = rng.choice(CHAT_ARG_LEADS)
    for call in task.calls:
        args, result = _dumps(call.args), _dumps(call.result)
        if form == "react":
            step = f"Thought: {call.thought}\nAction: {call.tool.name}\nAction Input: {args}"
            obs = f"Observation: {result}"
        elif form == "react_finish":
            step = f"Thought: {call.thought}\nAction: {call.tool.name}\nAction Input: {args}"
            obs = _dumps({"error": "", "response": call.result})
        else:
            step = f"{lead.format(tool=call.tool.name)}\n{arg_lead}{args}"
            if form == "chat_cot":
                step = f"{call.thought} {step}"
            obs = {"raw": result, "named": f"`{call.tool.name}` returned: {result}",
                   "tagged": f"Tool result:\n{result}"}[style.observation]
        msgs.append(_message(style, "assistant", step, "function_call", in_context))
        msgs.append(_message(style, "user", obs, "observation"))
    if form == "react":
        final = f"Thought: {rng.choice(FINAL_THOUGHTS)}\nFinal Answer: {task.answer}"
    elif form == "react_finish":
        finish = _dumps({"return_type": "give_answer", "final_answer": task.answer})
        final = f"Thought: {rng.choice(FINAL_THOUGHTS)}\nAction: Finish\nAction Input: {finish}"
    else:
        final = task.answer
    msgs.append(_message(style, "assistant", final, "answer", in_context))
    return msgs


FORMS = [("react", 0.10), ("react_finish", 0.10), ("chat", 0.33), ("chat_cot", 0.25), ("negative", 0.22)]


def _conversation(rng: random.Random, form: str) -> list[JSON]:
    style = _Style(loss_keys=rng.choice(["assistant", "assistant", "none", "all"]), typed=rng.random() < 0.12,
                   observation=rng.choice(["raw", "raw", "named", "tagged"]))
    if form == "negative":
        if rng.random() < 0.5:  # (a) no tools given, the query tempts a call
            query, answer = _direct_without_tools(rng)
            msgs = [] if rng.random() < 0.3 else [_message(style, "system", rng.choice(PLAIN_SYSTEMS), "instruction")]
        else:  # (b) tools given, an ordinary request
            query, answer, related = _direct_chat(rng)
            tools = _tools_for(rng, [], exclude=related) or [rng.choice([t for t in ALL_TOOLS if t.name not in related])]
            msgs = [_message(style, "system", _chat_system(rng, tools), "instruction")]
        return msgs + [_message(style, "user", query, "query"), _message(style, "assistant", answer, "answer")]

    task = _draw_task(rng)
    example = _draw_task(rng) if rng.random() < 0.1 else None
    follow_up = _draw_task(rng) if rng.random() < 0.08 else None
    needed = [t for part in (example, task, follow_up) if part for t in part.tools]
    tools = _tools_for(rng, list(dict.fromkeys(needed)))
    if form == "react":
        system = _react_system(tools)
    elif form == "react_finish":
        system = _react_finish_system(tools)
    else:
        system = _chat_system(rng, tools)
    msgs = [_message(style, "system", system, "instruction")]
    if example:
        msgs += _render_task(rng, form, example, style, in_context=True)
    msgs += _render_task(rng, form, task, style, in_context=False)
    if follow_up:
        msgs += _render_task(rng, form, follow_up, style, in_context=False)
    if rng.random() < 0.08:
        thanks, reply = rng.choice([("Thanks!", "You're welcome!"), ("Great, thank you.", "Glad I could help!"),
                                    ("Perfect, that's what I needed.", "Happy to help. Anything else?")])
        msgs += [_message(style, "user", thanks, "query"), _message(style, "assistant", reply, "answer")]
    return msgs


def generate_records(n: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> Iterator[JSON]:
    """``n`` Agent-FLAN records, a pure function of ``(n, seed)``."""
    rng = random.Random(seed)
    forms, weights = zip(*FORMS)
    counts: dict[str, int] = {}
    for _ in range(n):
        form = rng.choices(forms, weights)[0]
        counts[form] = counts.get(form, 0) + 1
        yield {"id": f"tooluse_{form}_{counts[form] - 1}", "conversation": _conversation(rng, form)}


def corpus_bytes(n: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> bytes:
    """The JSONL file contents: one record a line, UTF-8, LF line ends."""
    lines = (json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in generate_records(n, seed))
    return "".join(lines).encode("utf-8")


def write_corpus(path: str | os.PathLike, n: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> int:
    """Writes the corpus to ``path``; returns its size in bytes."""
    data = corpus_bytes(n, seed)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)
