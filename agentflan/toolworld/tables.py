"""The tool world's fixed reference tables and the train / held-out split of their entities.

Facts stated as facts are real (capitals, currencies, unit factors, dates, definitions,
translations). Exchange rates are a fixed table (units per US dollar at a reference level,
not live quotes), stock prices a fixed reference level that each world moves by a seeded
amount, and time zones use standard-time UTC offsets (no daylight saving), so every
executor is a pure function of its arguments and the world's seed.

Split by entity: ``HELD_OUT`` names the entities (cities, countries, currencies, companies,
units, facts, words, phrases, time zones, departments) that only held-out tasks use. An
entity is one name everywhere: Oslo is held out as a city, as Norway's capital and in a
time zone alike. Train tasks mention no held-out entity; every held-out task mentions at
least one (``agentflan.toolworld.tasks`` also holds out whole task templates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, TypeVar

SPLITS = ("train", "heldout")

T = TypeVar("T")

HELD_OUT = frozenset({
    # cities (with their countries and currencies where those are entities too)
    "Oslo", "Nairobi", "Reykjavik", "Hanoi", "Auckland", "Prague", "Lima", "Helsinki",
    "Norway", "Kenya", "Vietnam", "Peru", "New Zealand", "Sweden", "Switzerland", "Wellington", "Stockholm", "Bern",
    "SEK", "CHF", "NOK", "KES", "PEN", "VND", "NZD",
    # companies
    "Oracle", "Netflix", "Visa", "AMD",
    # units
    "yd", "floz", "K",
    # facts (by search-result title), words, phrases
    "Mona Lisa", "Titanic", "Burj Khalifa", "Nile",
    "serendipity", "pragmatic", "eloquent",
    "Where is the train station?", "See you tomorrow",
    # time zones, departments
    "Asia/Kathmandu", "Legal", "Design",
})


def is_held_out(name: str) -> bool:
    return name in HELD_OUT


def pool(table: Iterable[T], split: str, names: Callable[[T], Sequence[str]] = lambda x: (x,)) -> list[T]:
    """The entries of ``table`` a task of ``split`` may use as its held-out-defining entity.

    ``train``: entries none of whose ``names`` is held out. ``heldout``: entries with at least
    one held-out name. ``all``: every entry (for secondary entities of held-out tasks).
    """
    if split == "all":
        return list(table)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)}, all)")
    held = split == "heldout"
    return [x for x in table if any(is_held_out(n) for n in names(x)) == held]


CITIES = ["Lisbon", "Oslo", "Tokyo", "Nairobi", "Toronto", "Buenos Aires", "Cairo", "Sydney", "Berlin", "Madrid",
          "Seoul", "Mumbai", "Chicago", "Mexico City", "Reykjavik", "Bangkok", "Cape Town", "Dublin", "Vienna",
          "Singapore", "Lima", "Istanbul", "Warsaw", "Helsinki", "Denver", "Hanoi", "Athens", "Montreal",
          "Auckland", "Marrakesh", "Prague", "Seattle", "Zurich", "Santiago", "Manila", "Edinburgh"]
CONDITIONS = ["sunny", "clear", "partly cloudy", "cloudy", "overcast", "light rain", "heavy rain", "thunderstorms",
              "drizzle", "snow", "fog", "windy"]


@dataclass(frozen=True)
class Fact:
    questions: tuple[str, ...]
    search: str
    title: str
    snippet: str
    answer: str
    key: str  # what a right answer must contain
    year: int | None = None  # the year the fact is about, for "how many years ago" tasks
    event: str = ""  # noun phrase for that year

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)


FACTS = [
    Fact(("Who wrote Pride and Prejudice?", "Who is the author of Pride and Prejudice?"),
         "Pride and Prejudice author", "Pride and Prejudice - novel",
         "Pride and Prejudice is an 1813 novel by the English author Jane Austen.",
         "Pride and Prejudice was written by Jane Austen and published in 1813.", "Jane Austen", 1813,
         "the publication of Pride and Prejudice"),
    Fact(("When did the Berlin Wall fall?", "What year did the Berlin Wall come down?"),
         "fall of the Berlin Wall date", "Fall of the Berlin Wall",
         "The Berlin Wall fell on 9 November 1989, when East Germany opened its border crossings.",
         "The Berlin Wall fell on 9 November 1989.", "1989", 1989, "the fall of the Berlin Wall"),
    Fact(("How tall is Mount Everest?", "What is the height of Mount Everest?"),
         "Mount Everest height", "Mount Everest",
         "Mount Everest's elevation of 8,848.86 m was announced by China and Nepal in 2020.",
         "Mount Everest is 8,848.86 metres (about 29,032 feet) tall, according to the 2020 survey.", "8,848.86"),
    Fact(("Who painted the Mona Lisa?",), "Mona Lisa painter", "Mona Lisa",
         "The Mona Lisa is a portrait painted by the Italian artist Leonardo da Vinci.",
         "The Mona Lisa was painted by Leonardo da Vinci.", "Leonardo da Vinci"),
    Fact(("What is the largest planet in the solar system?", "Which planet is the biggest?"),
         "largest planet solar system", "Jupiter - planet",
         "Jupiter is the fifth planet from the Sun and the largest in the Solar System.",
         "Jupiter is the largest planet in the solar system.", "Jupiter"),
    Fact(("When was the Eiffel Tower completed?", "What year was the Eiffel Tower finished?"),
         "Eiffel Tower completion year", "Eiffel Tower",
         "The Eiffel Tower was completed in 1889 as the entrance arch of the World's Fair in Paris.",
         "The Eiffel Tower was completed in 1889.", "1889", 1889, "the completion of the Eiffel Tower"),
    Fact(("Who discovered penicillin?",), "discovery of penicillin", "Penicillin - history",
         "Alexander Fleming discovered penicillin in 1928 at St Mary's Hospital in London.",
         "Penicillin was discovered by Alexander Fleming in 1928.", "Alexander Fleming", 1928, "the discovery of penicillin"),
    Fact(("What is the speed of light?", "How fast does light travel?"),
         "speed of light in vacuum", "Speed of light",
         "The speed of light in vacuum is exactly 299,792,458 metres per second.",
         "Light travels at exactly 299,792,458 metres per second in a vacuum.", "299,792,458"),
    Fact(("What is the chemical symbol for gold?",), "gold chemical symbol", "Gold - chemical element",
         "Gold is a chemical element with the symbol Au and atomic number 79.",
         "The chemical symbol for gold is Au (atomic number 79).", "Au"),
    Fact(("How many bones are in the adult human body?",), "number of bones adult human",
         "Human skeleton", "The adult human skeleton usually has 206 bones.",
         "An adult human body typically has 206 bones.", "206"),
    Fact(("What is the longest river in Africa?",), "longest river in Africa", "Nile",
         "The Nile is the longest river in Africa, flowing north into the Mediterranean Sea.",
         "The Nile is the longest river in Africa.", "Nile"),
    Fact(("Who was the first person to walk on the Moon?",), "first person on the Moon",
         "Apollo 11", "Neil Armstrong became the first person to walk on the Moon in July 1969, during Apollo 11.",
         "Neil Armstrong was the first person to walk on the Moon, in July 1969 during Apollo 11.", "Neil Armstrong", 1969,
         "the first Moon landing"),
    Fact(("Who composed The Four Seasons?",), "The Four Seasons composer", "The Four Seasons (Vivaldi)",
         "The Four Seasons is a group of four violin concertos by the Italian composer Antonio Vivaldi.",
         "The Four Seasons was composed by Antonio Vivaldi.", "Vivaldi"),
    Fact(("What is the largest ocean on Earth?",), "largest ocean", "Pacific Ocean",
         "The Pacific Ocean is the largest and deepest of Earth's five oceanic divisions.",
         "The Pacific Ocean is the largest ocean on Earth.", "Pacific"),
    Fact(("When did World War II end?", "What year did the Second World War end?"),
         "end of World War II", "World War II",
         "World War II ended in 1945: Germany surrendered in May and Japan in September.",
         "World War II ended in 1945, with Germany surrendering in May and Japan in September.", "1945", 1945,
         "the end of World War II"),
    Fact(("Who wrote One Hundred Years of Solitude?",), "One Hundred Years of Solitude author",
         "One Hundred Years of Solitude", "One Hundred Years of Solitude is a 1967 novel by Gabriel García Márquez.",
         "One Hundred Years of Solitude was written by Gabriel García Márquez and published in 1967.", "García Márquez", 1967,
         "the publication of One Hundred Years of Solitude"),
    Fact(("What is the tallest building in the world?",), "tallest building in the world", "Burj Khalifa",
         "The Burj Khalifa in Dubai, 828 m tall, has been the world's tallest building since 2010.",
         "The Burj Khalifa in Dubai is the tallest building in the world at 828 metres.", "Burj Khalifa"),
    Fact(("Who invented the telephone?",), "inventor of the telephone", "Telephone - history",
         "Alexander Graham Bell received the first US patent for the telephone in 1876.",
         "Alexander Graham Bell is credited with inventing the telephone; he patented it in 1876.", "Alexander Graham Bell", 1876,
         "Alexander Graham Bell's telephone patent"),
    Fact(("What is the atomic number of carbon?",), "carbon atomic number", "Carbon",
         "Carbon is a chemical element with the symbol C and atomic number 6.",
         "Carbon has atomic number 6.", "6"),
    Fact(("How many continents are there?",), "number of continents", "Continent",
         "By the most common convention there are seven continents.",
         "By the most common convention there are seven continents.", "seven"),
    Fact(("Who developed the theory of general relativity?",), "general relativity developer",
         "General relativity", "Albert Einstein published the theory of general relativity in 1915.",
         "Albert Einstein developed general relativity, publishing it in 1915.", "Albert Einstein", 1915,
         "the publication of general relativity"),
    Fact(("When did the Titanic sink?",), "Titanic sinking date", "Titanic",
         "RMS Titanic sank in the North Atlantic on 15 April 1912 after striking an iceberg.",
         "The Titanic sank on 15 April 1912 after hitting an iceberg.", "1912", 1912, "the sinking of the Titanic"),
]
DISTRACTOR_RESULTS = [
    ("Top 10 travel destinations this year", "Our editors picked the places everyone is talking about."),
    ("Quiz: how well do you know history?", "Test yourself with 20 questions on famous events."),
    ("Forum: homework help", "Can anyone help me with this question? Thanks in advance."),
    ("Encyclopedia - main page", "Welcome to the free encyclopedia that anyone can edit."),
]


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

# company, ticker, reference share price in USD (a level near early-2024 prices; each world moves it)
COMPANIES = [("Apple", "AAPL", 180.0), ("Microsoft", "MSFT", 410.0), ("Alphabet", "GOOGL", 150.0),
             ("Amazon", "AMZN", 175.0), ("NVIDIA", "NVDA", 880.0), ("Tesla", "TSLA", 175.0), ("Meta", "META", 500.0),
             ("IBM", "IBM", 190.0), ("Intel", "INTC", 43.0), ("Oracle", "ORCL", 125.0), ("Netflix", "NFLX", 620.0),
             ("Adobe", "ADBE", 500.0), ("Salesforce", "CRM", 300.0), ("Coca-Cola", "KO", 60.0),
             ("Disney", "DIS", 112.0), ("Walmart", "WMT", 60.0), ("Visa", "V", 280.0), ("AMD", "AMD", 180.0)]

# ISO code -> (units per US dollar, a fixed reference table; plural name)
CURRENCIES = {
    "USD": (1.0, "US dollars"), "EUR": (0.92, "euros"), "GBP": (0.79, "British pounds"),
    "JPY": (151.0, "Japanese yen"), "CHF": (0.90, "Swiss francs"), "CAD": (1.36, "Canadian dollars"),
    "AUD": (1.52, "Australian dollars"), "INR": (83.3, "Indian rupees"), "CNY": (7.23, "Chinese yuan"),
    "MXN": (17.0, "Mexican pesos"), "SEK": (10.6, "Swedish kronor"), "BRL": (5.0, "Brazilian reais"),
    "KES": (130.0, "Kenyan shillings"), "EGP": (48.0, "Egyptian pounds"), "NOK": (10.8, "Norwegian kroner"),
    "PEN": (3.7, "Peruvian soles"), "TRY": (32.0, "Turkish lira"), "KRW": (1350.0, "South Korean won"),
    "THB": (36.5, "Thai baht"), "PLN": (4.0, "Polish zloty"), "VND": (25000.0, "Vietnamese dong"),
    "NZD": (1.65, "New Zealand dollars"), "MAD": (10.0, "Moroccan dirhams"), "CLP": (950.0, "Chilean pesos"),
    "ARS": (870.0, "Argentine pesos"),
}

# country, capital, continent, currency (real)
COUNTRIES = [
    ("France", "Paris", "Europe", "EUR"), ("Japan", "Tokyo", "Asia", "JPY"), ("Kenya", "Nairobi", "Africa", "KES"),
    ("Brazil", "Brasília", "South America", "BRL"), ("Canada", "Ottawa", "North America", "CAD"),
    ("Australia", "Canberra", "Oceania", "AUD"), ("Egypt", "Cairo", "Africa", "EGP"),
    ("Norway", "Oslo", "Europe", "NOK"), ("Argentina", "Buenos Aires", "South America", "ARS"),
    ("Peru", "Lima", "South America", "PEN"), ("Turkey", "Ankara", "Asia", "TRY"),
    ("South Korea", "Seoul", "Asia", "KRW"), ("Thailand", "Bangkok", "Asia", "THB"),
    ("Portugal", "Lisbon", "Europe", "EUR"), ("Poland", "Warsaw", "Europe", "PLN"),
    ("Vietnam", "Hanoi", "Asia", "VND"), ("New Zealand", "Wellington", "Oceania", "NZD"),
    ("Morocco", "Rabat", "Africa", "MAD"), ("Chile", "Santiago", "South America", "CLP"),
    ("Spain", "Madrid", "Europe", "EUR"), ("Italy", "Rome", "Europe", "EUR"), ("Germany", "Berlin", "Europe", "EUR"),
    ("India", "New Delhi", "Asia", "INR"), ("Mexico", "Mexico City", "North America", "MXN"),
    ("Greece", "Athens", "Europe", "EUR"), ("Sweden", "Stockholm", "Europe", "SEK"),
    ("Ireland", "Dublin", "Europe", "EUR"), ("Switzerland", "Bern", "Europe", "CHF"),
]

# Units: symbol -> (dimension, factor to the dimension's base unit, plural name). Temperatures
# are affine and converted through kelvin (see the convert_units executor). Factors are exact
# by definition (international yard and pound, US liquid gallon and fluid ounce).
UNITS = {
    "km": ("length", 1000.0, "kilometres"), "m": ("length", 1.0, "metres"), "cm": ("length", 0.01, "centimetres"),
    "mm": ("length", 0.001, "millimetres"), "mi": ("length", 1609.344, "miles"), "yd": ("length", 0.9144, "yards"),
    "ft": ("length", 0.3048, "feet"), "in": ("length", 0.0254, "inches"),
    "kg": ("mass", 1.0, "kilograms"), "g": ("mass", 0.001, "grams"), "lb": ("mass", 0.45359237, "pounds"),
    "oz": ("mass", 0.028349523125, "ounces"),
    "l": ("volume", 1.0, "litres"), "ml": ("volume", 0.001, "millilitres"), "gal": ("volume", 3.785411784, "US gallons"),
    "floz": ("volume", 0.0295735295625, "US fluid ounces"),
    "C": ("temperature", 1.0, "degrees Celsius"), "F": ("temperature", 5 / 9, "degrees Fahrenheit"),
    "K": ("temperature", 1.0, "kelvin"),
}
# Conversions tasks ask for (pairs a person would ask about).
UNIT_PAIRS = [("km", "mi"), ("mi", "km"), ("kg", "lb"), ("lb", "kg"), ("m", "ft"), ("ft", "m"), ("cm", "in"),
              ("in", "cm"), ("l", "gal"), ("gal", "l"), ("g", "oz"), ("oz", "g"), ("C", "F"), ("F", "C"),
              ("m", "yd"), ("yd", "m"), ("ml", "floz"), ("floz", "ml"), ("K", "C"), ("C", "K")]

# city, IANA time zone, standard-time UTC offset in minutes (no daylight saving)
TIMEZONES = [("Tokyo", "Asia/Tokyo", 540), ("London", "Europe/London", 0), ("New York", "America/New_York", -300),
             ("Sydney", "Australia/Sydney", 600), ("Paris", "Europe/Paris", 60), ("Dubai", "Asia/Dubai", 240),
             ("São Paulo", "America/Sao_Paulo", -180), ("Mumbai", "Asia/Kolkata", 330),
             ("Los Angeles", "America/Los_Angeles", -480), ("Singapore", "Asia/Singapore", 480),
             ("Berlin", "Europe/Berlin", 60), ("Mexico City", "America/Mexico_City", -360),
             ("Reykjavik", "Atlantic/Reykjavik", 0), ("Auckland", "Pacific/Auckland", 720),
             ("Kathmandu", "Asia/Kathmandu", 345), ("Cairo", "Africa/Cairo", 120)]

LANGUAGES = ("Spanish", "French", "German", "Italian", "Portuguese")

FIRST_NAMES = ["Alice", "Bruno", "Chen", "Dana", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
               "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yara"]
LAST_NAMES = ["Andersen", "Baker", "Costa", "Dubois", "Eriksson", "Fischer", "Garcia", "Hoffmann", "Ito", "Jensen",
              "Kowalski", "Larsen", "Moreau", "Nakamura", "Okafor", "Patel", "Rossi", "Silva", "Tanaka", "Weber"]
DEPARTMENTS = ["Sales", "Engineering", "Marketing", "Finance", "Support", "Legal", "Design", "Operations"]
EVENT_TITLES = ["Dentist appointment", "Team standup", "Project review", "Yoga class", "Call with the bank",
                "Parent-teacher meeting", "Lunch with {name}", "1:1 with {name}", "Haircut", "Budget planning",
                "Piano lesson", "Coffee with {name}", "Car service", "Book club", "Quarterly planning"]
AIRLINES = ["LH", "BA", "AF", "KL", "IB", "TP", "SK", "AY", "LX", "OS", "UA", "DL", "AC", "NH"]
STREETS = ["Oak Street", "Maple Avenue", "Harbour Road", "Station Square", "Mill Lane", "Park Drive", "King Street",
           "Elm Grove", "River Walk", "Hill Road"]
PLACES = ["the Central Library", "the city museum", "the main train station", "the airport", "the university campus",
          "the old town square", "the sports stadium", "the general hospital", "the botanical garden"]

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

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

