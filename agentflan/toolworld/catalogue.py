"""The tools of the tool world and their executors.

Each executor takes the ``World`` and the checked arguments and returns the observation (a
JSON object) or raises ``ToolError`` with what was wrong, as a real API would: an unknown
city is ``not_found``, a malformed date ``invalid_value``; missing parameters and wrong
types are caught by ``Tool.check`` before the executor runs.
"""

from __future__ import annotations

import ast
import datetime as dt
import operator
import re
import sqlite3
from fractions import Fraction
from typing import Callable

from agentflan.toolworld.tables import (
    AIRLINES,
    CITIES,
    COMPANIES,
    CONDITIONS,
    COUNTRIES,
    CURRENCIES,
    DISTRACTOR_RESULTS,
    EXAMPLES,
    FACTS,
    LANGUAGES,
    PHRASES,
    TIMEZONES,
    UNITS,
    WEEKDAYS,
    WORDS,
)
from agentflan.toolworld.tools import JSON, Tool, ToolError, integer, number, string
from agentflan.toolworld.world import World, json_value

# --------------------------------------------------------------------------- arithmetic

_BINARY: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv,
}
MAX_EXPONENT = 64
MAX_DIGITS = 400  # refuse results whose numerator or denominator grows past this many digits


def evaluate_expression(expression: str) -> Fraction:
    """The exact value of an arithmetic expression (+ - * / // % ** and parentheses).

    Raises ToolError(invalid_value) for anything else (names, calls, ``1,000``), division by
    zero, a non-integral or too large exponent, or a result too large to print.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError("invalid_value", f"calculator: cannot parse expression '{expression}'") from None

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = ev(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            base, exponent = ev(node.left), ev(node.right)
            if exponent.denominator != 1 or abs(exponent) > MAX_EXPONENT:
                raise ToolError("invalid_value", f"calculator: exponents must be integers up to {MAX_EXPONENT}")
            if base == 0 and exponent < 0:
                raise ToolError("invalid_value", "calculator: division by zero")
            return base ** int(exponent)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if right == 0 and isinstance(node.op, (ast.Div, ast.Mod, ast.FloorDiv)):
                raise ToolError("invalid_value", "calculator: division by zero")
            value = _BINARY[type(node.op)](left, right)
            return Fraction(value)
        raise ToolError("invalid_value", f"calculator: unsupported syntax in '{expression}' "
                                         "(numbers, + - * / // % ** and parentheses only)")

    value = ev(tree.body)
    if len(str(value.numerator)) > MAX_DIGITS or len(str(value.denominator)) > MAX_DIGITS:
        raise ToolError("invalid_value", "calculator: result too large")
    return value


def number_value(value: Fraction | float, places: int = 6) -> int | float:
    """A JSON number: an int when integral, else rounded to ``places`` decimals."""
    if isinstance(value, Fraction):
        value = round(value, places)  # exact, then the nearest double
        return value.numerator if value.denominator == 1 else float(value)
    return json_value(round(float(value), places))


def _calculator(world: World, expression: str) -> JSON:
    return {"expression": expression, "result": number_value(evaluate_expression(expression))}


# --------------------------------------------------------------------------- conversions


def _unit(tool: str, symbol: str) -> tuple[str, float, str]:
    if symbol not in UNITS:
        raise ToolError("invalid_value", f"{tool}: unknown unit '{symbol}' (known: {', '.join(UNITS)})")
    return UNITS[symbol]


def convert_quantity(value: float, from_unit: str, to_unit: str) -> float:
    """``value`` in ``from_unit`` expressed in ``to_unit`` (symbols of ``UNITS``); exact factors."""
    dim_a, factor_a, _ = _unit("convert_units", from_unit)
    dim_b, factor_b, _ = _unit("convert_units", to_unit)
    if dim_a != dim_b:
        raise ToolError("invalid_value", f"convert_units: cannot convert {dim_a} ({from_unit}) to {dim_b} ({to_unit})")
    if dim_a != "temperature":
        return value * factor_a / factor_b
    kelvin = {"C": value + 273.15, "F": (value - 32) * 5 / 9 + 273.15, "K": value}[from_unit]
    if kelvin < 0:
        raise ToolError("invalid_value", f"convert_units: {value} {from_unit} is below absolute zero")
    return {"C": kelvin - 273.15, "F": (kelvin - 273.15) * 9 / 5 + 32, "K": kelvin}[to_unit]


def _convert_units(world: World, value: float, from_unit: str, to_unit: str) -> JSON:
    result = convert_quantity(value, from_unit, to_unit)
    # Six significant digits, so small results (mm to km) keep their precision.
    return {"value": value, "from_unit": from_unit, "to_unit": to_unit, "result": json_value(float(f"{result:.6g}"))}


def exchange_rate(from_currency: str, to_currency: str) -> float:
    """Units of ``to_currency`` per unit of ``from_currency`` from the fixed table, quoted to six
    significant digits."""
    for code in (from_currency, to_currency):
        if code not in CURRENCIES:
            raise ToolError("invalid_value", f"convert_currency: unsupported currency '{code}' "
                                             f"(ISO codes: {', '.join(CURRENCIES)})")
    rate = CURRENCIES[to_currency][0] / CURRENCIES[from_currency][0]
    return float(f"{rate:.6g}")


def _convert_currency(world: World, amount: float, from_currency: str, to_currency: str) -> JSON:
    if amount < 0:
        raise ToolError("invalid_value", "convert_currency: amount must not be negative")
    rate = exchange_rate(from_currency, to_currency)
    return {"amount": amount, "from": from_currency, "to": to_currency, "rate": json_value(rate),
            "converted": json_value(round(amount * rate, 2))}


# --------------------------------------------------------------------------- live data

_CITY_NAMES = {c.lower(): c for c in CITIES}


def _city(tool: str, name: str, what: str = "weather station") -> str:
    city = _CITY_NAMES.get(name.strip().lower())
    if city is None:
        raise ToolError("not_found", f"{tool}: no {what} for '{name}'")
    return city


def weather_in(world: World, city: str) -> JSON:
    """The current weather in ``city`` (a name from ``CITIES``), temperature in Celsius."""
    rng = world.rng("weather", city)
    celsius = rng.randint(-8, 36)
    condition = rng.choice([c for c in CONDITIONS if c != "snow" or celsius <= 2])
    return {"city": city, "temperature": celsius, "unit": "celsius", "condition": condition,
            "humidity": rng.randint(25, 98), "wind_kph": rng.randint(0, 45)}


def _get_weather(world: World, city: str, unit: str = "celsius") -> JSON:
    obs = weather_in(world, _city("get_weather", city))
    if unit == "fahrenheit":
        obs |= {"temperature": round(obs["temperature"] * 9 / 5 + 32), "unit": "fahrenheit"}
    return obs


_SYMBOLS = {sym: (name, price) for name, sym, price in COMPANIES}


def _get_stock_quote(world: World, symbol: str) -> JSON:
    if symbol.upper() not in _SYMBOLS:
        raise ToolError("not_found", f"get_stock_quote: unknown ticker symbol '{symbol}'")
    symbol = symbol.upper()
    rng = world.rng("quote", symbol)
    price = round(_SYMBOLS[symbol][1] * rng.uniform(0.9, 1.1), 2)
    return {"symbol": symbol, "price": price, "currency": "USD", "change_percent": round(rng.uniform(-4.5, 4.5), 2)}


# --------------------------------------------------------------------------- search

_STOPWORDS = frozenset("a an and the of in on at to for by is was were who what when which how did does do year "
                       "many much".split())


def _words(text: str) -> set[str]:
    """Search terms: lower-case words less stopwords, a plural "s" dropped (continents -> continent)."""
    words = (w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOPWORDS)
    return {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words}


SEARCH_INDEX = [(f.title, f.snippet) for f in FACTS] + list(DISTRACTOR_RESULTS)
MAX_RESULTS = 3


def _web_search(world: World, query: str) -> JSON:
    terms = _words(query)
    if not terms:
        raise ToolError("invalid_value", "web_search: the query has no search terms")
    scored = []
    for i, (title, snippet) in enumerate(SEARCH_INDEX):
        # Ranked by the query terms a result holds, then by those in its title.
        title_terms = terms & _words(title)
        matched = len(title_terms | (terms & _words(snippet)))
        if matched:
            scored.append((-matched, -len(title_terms), i, title, snippet))
    return {"results": [{"title": t, "snippet": s} for *_, t, s in sorted(scored)[:MAX_RESULTS]]}


# --------------------------------------------------------------------------- calendar


def parse_date(tool: str, text: str, name: str = "date") -> dt.date:
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ToolError("invalid_value", f"{tool}: '{name}' must be a date as YYYY-MM-DD, got '{text}'") from None


def _parse_time(tool: str, text: str) -> int:
    m = re.fullmatch(r"(\d{2}):(\d{2})", text)
    if not m or int(m[1]) > 23 or int(m[2]) > 59:
        raise ToolError("invalid_value", f"{tool}: 'start_time' must be HH:MM (24 h), got '{text}'")
    return int(m[1]) * 60 + int(m[2])


def _create_event(world: World, title: str, date: str, start_time: str, duration_minutes: int = 60) -> JSON:
    day = parse_date("create_event", date)
    start = _parse_time("create_event", start_time)
    if not title.strip():
        raise ToolError("invalid_value", "create_event: 'title' must not be empty")
    if not 5 <= duration_minutes <= 720:
        raise ToolError("invalid_value", "create_event: 'duration_minutes' must be between 5 and 720")
    end = min(start + duration_minutes, 23 * 60 + 59)
    event_id = f"evt_{101 + len(world.created_events)}"
    event = {"event_id": event_id, "title": title, "date": day.isoformat(), "start_time": start_time,
             "end_time": f"{end // 60:02d}:{end % 60:02d}"}
    world.created_events[event_id] = event
    return {"status": "confirmed", **event}


def _list_events(world: World, date: str) -> JSON:
    day = parse_date("list_events", date)
    return {"date": day.isoformat(), "events": world.events_on(day)}


def _delete_event(world: World, event_id: str) -> JSON:
    if not world.event_exists(event_id):
        raise ToolError("not_found", f"delete_event: no event with id '{event_id}'")
    world.deleted_events.add(event_id)
    return {"status": "deleted", "event_id": event_id}


def _days_between(world: World, start_date: str, end_date: str) -> JSON:
    a = parse_date("days_between", start_date, "start_date")
    b = parse_date("days_between", end_date, "end_date")
    return {"start_date": start_date, "end_date": end_date, "days": (b - a).days}


def _add_days(world: World, date: str, days: int) -> JSON:
    day = parse_date("add_days", date)
    try:
        out = day + dt.timedelta(days=days)
    except OverflowError:
        raise ToolError("invalid_value", "add_days: the result is outside years 1-9999") from None
    return {"date": out.isoformat(), "weekday": WEEKDAYS[out.weekday()]}


# --------------------------------------------------------------------------- lookups

_PHRASES = {p.lower().rstrip(".?! "): p for p in PHRASES}


def _translate_text(world: World, text: str, target_language: str) -> JSON:
    lang = target_language.strip().capitalize()
    if lang not in LANGUAGES:
        raise ToolError("invalid_value", f"translate_text: unsupported target language '{target_language}' "
                                         f"(supported: {', '.join(LANGUAGES)})")
    phrase = _PHRASES.get(text.strip().lower().rstrip(".?! "))
    if phrase is None:
        raise ToolError("not_found", "translate_text: the phrasebook has no entry for this text")
    return {"text": phrase, "translation": PHRASES[phrase][lang], "source_language": "English",
            "target_language": lang}


def _lookup_order(world: World, order_id: str) -> JSON:
    if not re.fullmatch(r"A\d{5}", order_id):
        raise ToolError("invalid_value", f"lookup_order: order ids look like A12345, got '{order_id}'")
    if order_id not in world.orders:
        raise ToolError("not_found", f"lookup_order: no order with id '{order_id}'")
    return dict(world.orders[order_id])


MAX_ROWS = 20


def _query_database(world: World, sql: str) -> JSON:
    if not re.match(r"\s*(SELECT|WITH)\b", sql, re.I):
        raise ToolError("invalid_value", "query_database: only read-only SELECT statements are allowed")
    try:
        cursor = world.database().execute(sql)
        rows = cursor.fetchmany(MAX_ROWS + 1)
    except (sqlite3.Error, sqlite3.Warning) as err:
        raise ToolError("invalid_value", f"query_database: SQL error: {err}") from None
    columns = [c[0] for c in cursor.description]
    out: JSON = {"rows": [dict(zip(columns, (json_value(v) for v in row))) for row in rows[:MAX_ROWS]]}
    if len(rows) > MAX_ROWS:
        out["truncated"] = True
    return out


_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


def _send_email(world: World, to: str, subject: str, body: str) -> JSON:
    if not _EMAIL.fullmatch(to):
        raise ToolError("invalid_value", f"send_email: '{to}' is not a valid email address")
    message_id = f"msg_{1001 + len(world.outbox)}"
    world.outbox.append({"message_id": message_id, "to": to, "subject": subject, "body": body})
    return {"status": "sent", "message_id": message_id}


def flights_between(world: World, origin: str, destination: str, day: dt.date) -> list[JSON]:
    """The flights of one route and day, by departure time (2 to 4, seeded)."""
    rng = world.rng("flights", origin, destination, day.isoformat())
    out = []
    for price in rng.sample(range(79, 900), rng.randint(2, 4)):
        dep = rng.randint(6 * 60, 20 * 60) // 5 * 5
        stops = rng.choice([0, 0, 1, 1, 2])
        arr = min(dep + rng.randint(60, 180) + 90 * stops, 23 * 60 + 59)
        out.append({"flight": f"{rng.choice(AIRLINES)} {rng.randint(100, 9999)}",
                    "depart": f"{dep // 60:02d}:{dep % 60:02d}", "arrive": f"{arr // 60:02d}:{arr % 60:02d}",
                    "stops": stops, "price_usd": price})
    return sorted(out, key=lambda f: (f["depart"], f["flight"]))


def _search_flights(world: World, origin: str, destination: str, date: str) -> JSON:
    a = _city("search_flights", origin, "airport")
    b = _city("search_flights", destination, "airport")
    if a == b:
        raise ToolError("invalid_value", "search_flights: origin and destination are the same city")
    day = parse_date("search_flights", date)
    return {"origin": a, "destination": b, "date": day.isoformat(), "flights": flights_between(world, a, b, day)}


_WORDS = {w: (pos, definition) for w, pos, definition in WORDS}


def _define_word(world: World, word: str) -> JSON:
    key = word.strip().lower()
    if key not in _WORDS:
        raise ToolError("not_found", f"define_word: no dictionary entry for '{word}'")
    pos, definition = _WORDS[key]
    return {"word": key, "part_of_speech": pos, "definition": definition, "example": EXAMPLES[key]}


_ZONES = {tz: offset for _, tz, offset in TIMEZONES}


def local_time(world: World, timezone: str) -> dt.datetime:
    return world.now + dt.timedelta(minutes=_ZONES[timezone])


def _get_current_time(world: World, timezone: str) -> JSON:
    if timezone not in _ZONES:
        raise ToolError("invalid_value", f"get_current_time: unknown time zone '{timezone}' (IANA names, e.g. "
                                         "Europe/Paris)")
    when = local_time(world, timezone)
    offset = _ZONES[timezone]
    sign = "+" if offset >= 0 else "-"
    return {"timezone": timezone, "local_time": when.strftime("%Y-%m-%d %H:%M"), "weekday": WEEKDAYS[when.weekday()],
            "utc_offset": f"{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"}


_COUNTRIES = {c.lower(): (c, capital, continent, currency) for c, capital, continent, currency in COUNTRIES}


def _get_country_info(world: World, country: str) -> JSON:
    entry = _COUNTRIES.get(country.strip().lower())
    if entry is None:
        raise ToolError("not_found", f"get_country_info: unknown country '{country}'")
    name, capital, continent, currency = entry
    return {"country": name, "capital": capital, "continent": continent, "currency": currency}


# --------------------------------------------------------------------------- formulas


def bmi_category(bmi: float) -> str:
    """WHO adult categories."""
    return "underweight" if bmi < 18.5 else "normal weight" if bmi < 25 else "overweight" if bmi < 30 else "obese"


def _calculate_bmi(world: World, weight_kg: float, height_cm: float) -> JSON:
    if not 2 <= weight_kg <= 400:
        raise ToolError("invalid_value", "calculate_bmi: 'weight_kg' must be between 2 and 400")
    if not 40 <= height_cm <= 260:
        raise ToolError("invalid_value", "calculate_bmi: 'height_cm' must be between 40 and 260")
    bmi = round(weight_kg / (height_cm / 100) ** 2, 1)
    return {"bmi": bmi, "category": bmi_category(bmi)}


def monthly_payment(principal: float, annual_rate_percent: float, years: int) -> float:
    """Annuity payment: P r / (1 - (1 + r)^-n), r the monthly rate, n the months."""
    r, n = annual_rate_percent / 1200, years * 12
    return principal / n if r == 0 else principal * r / (1 - (1 + r) ** -n)


def _loan_payment(world: World, principal: float, annual_rate_percent: float, years: int) -> JSON:
    if principal <= 0:
        raise ToolError("invalid_value", "loan_payment: 'principal' must be positive")
    if not 0 <= annual_rate_percent <= 100:
        raise ToolError("invalid_value", "loan_payment: 'annual_rate_percent' must be between 0 and 100")
    if not 1 <= years <= 50:
        raise ToolError("invalid_value", "loan_payment: 'years' must be between 1 and 50")
    payment = round(monthly_payment(principal, annual_rate_percent, years), 2)
    return {"monthly_payment": json_value(payment),
            "total_interest": json_value(round(payment * years * 12 - principal, 2))}


SPEED_KPH = {"driving": 38, "walking": 5, "cycling": 16, "transit": 24}


def _get_route(world: World, origin: str, destination: str, mode: str = "driving") -> JSON:
    a, b = origin.strip(), destination.strip()
    if not a or not b:
        raise ToolError("invalid_value", "get_route: 'origin' and 'destination' must not be empty")
    if a.lower() == b.lower():
        raise ToolError("invalid_value", "get_route: origin and destination are the same place")
    km = round(world.rng("route", *sorted([a.lower(), b.lower()])).uniform(0.8, 24.0), 1)
    return {"origin": a, "destination": b, "mode": mode, "distance_km": json_value(km),
            "duration_minutes": max(3, round(km / SPEED_KPH[mode] * 60))}


# --------------------------------------------------------------------------- the catalogue

TOOLS: tuple[Tool, ...] = (
    Tool("get_weather", "Current weather for a city.",
         (string("city"), string("unit", enum=("celsius", "fahrenheit"), required=False)), _get_weather),
    Tool("calculator", "Evaluate an arithmetic expression exactly (+, -, *, /, //, %, **, parentheses).",
         (string("expression", "e.g. (3 + 4) * 2"),), _calculator),
    Tool("convert_units", "Convert a quantity between units of length, mass, volume or temperature.",
         (number("value"), string("from_unit", "unit symbol, e.g. km, lb, floz, C"), string("to_unit", "unit symbol")),
         _convert_units),
    Tool("convert_currency", "Convert money between currencies at the reference exchange rate.",
         (number("amount"), string("from_currency", "ISO code, e.g. USD"), string("to_currency", "ISO code")),
         _convert_currency),
    Tool("get_stock_quote", "Latest stock price and daily change.", (string("symbol", "ticker, e.g. AAPL"),),
         _get_stock_quote),
    Tool("web_search", "Search the web and return the top results.", (string("query"),), _web_search),
    Tool("create_event", "Add an event to the user's calendar.",
         (string("title"), string("date", "YYYY-MM-DD"), string("start_time", "HH:MM, 24 h"),
          integer("duration_minutes", required=False)), _create_event),
    Tool("list_events", "List the user's calendar events on a day.", (string("date", "YYYY-MM-DD"),), _list_events),
    Tool("delete_event", "Delete an event from the user's calendar.", (string("event_id"),), _delete_event),
    Tool("days_between", "Number of days from one date to another.",
         (string("start_date", "YYYY-MM-DD"), string("end_date", "YYYY-MM-DD")), _days_between),
    Tool("add_days", "The date a number of days after (or, if negative, before) a date.",
         (string("date", "YYYY-MM-DD"), integer("days")), _add_days),
    Tool("translate_text", "Translate a common English phrase (phrasebook).",
         (string("text"), string("target_language", "e.g. French")), _translate_text),
    Tool("lookup_order", "Look up a shop order by its id.", (string("order_id", "e.g. A10234"),), _lookup_order),
    Tool("query_database", "Run a read-only SQL query on the company database "
                           "(table employees: name, department, salary, hire_date).",
         (string("sql", "SELECT statement"),), _query_database),
    Tool("send_email", "Send an email on the user's behalf.", (string("to"), string("subject"), string("body")),
         _send_email),
    Tool("search_flights", "Search flights between two cities on a date.",
         (string("origin"), string("destination"), string("date", "YYYY-MM-DD")), _search_flights),
    Tool("define_word", "Dictionary definition of an English word.", (string("word"),), _define_word),
    Tool("get_current_time", "Current local date and time in a time zone.",
         (string("timezone", "IANA name, e.g. Europe/Paris"),), _get_current_time),
    Tool("get_country_info", "Capital, continent and currency of a country.", (string("country"),),
         _get_country_info),
    Tool("calculate_bmi", "Body-mass index from weight and height.", (number("weight_kg"), number("height_cm")),
         _calculate_bmi),
    Tool("loan_payment", "Monthly payment of a fixed-rate loan.",
         (number("principal"), number("annual_rate_percent"), integer("years")), _loan_payment),
    Tool("get_route", "Distance and travel time between two addresses.",
         (string("origin"), string("destination"),
          string("mode", enum=("driving", "walking", "cycling", "transit"), required=False)), _get_route),
)
TOOLS_BY_NAME: dict[str, Tool] = {t.name: t for t in TOOLS}


def tool(name: str) -> Tool:
    """The catalogue tool called ``name``; KeyError names the known tools."""
    try:
        return TOOLS_BY_NAME[name]
    except KeyError:
        raise KeyError(f"no tool named {name!r} (known: {', '.join(TOOLS_BY_NAME)})") from None
