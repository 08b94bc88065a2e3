"""A world the tools act on: seeded live values (weather, quotes, flights, orders, an
employees table, a calendar) plus the state calls change (events created or deleted,
emails sent).

Every live value is drawn from a random generator keyed by the world's seed and the
thing asked about (``World.rng("weather", "Lisbon")``), never from a shared stream, so an
answer does not depend on which calls came before it: the world a task was generated in
and a fresh ``World(seed)`` an agent is evaluated in answer every read alike, and only
the calendar and outbox change with calls.
"""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Sequence

from agentflan.toolworld.tables import DEPARTMENTS, EVENT_TITLES, FIRST_NAMES, LAST_NAMES
from agentflan.toolworld.tools import JSON, Tool, ToolError

ORDER_STATUSES = ("processing", "shipped", "shipped", "delivered", "cancelled")
CARRIERS = ("DHL", "UPS", "FedEx", "DPD", "USPS")
N_ORDERS = 60
N_EMPLOYEES = 96


@dataclass(frozen=True)
class CallRecord:
    name: str
    arguments: object  # as the caller gave them
    observation: JSON


def is_error(observation: JSON) -> bool:
    """Whether an observation is a tool error (``{"error": {"type", "message"}}``)."""
    return isinstance(observation.get("error"), dict)


@dataclass
class World:
    """One world, a pure function of ``seed`` until calls change its calendar or outbox."""

    seed: int
    created_events: dict[str, JSON] = field(default_factory=dict)  # event_id -> event
    deleted_events: set[str] = field(default_factory=set)
    outbox: list[JSON] = field(default_factory=list)
    log: list[CallRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._orders: dict[str, JSON] | None = None
        self._employees: list[tuple[str, str, int, str]] | None = None
        self._db: sqlite3.Connection | None = None
        minutes = self.rng("now").randrange(730 * 24 * 60)
        self.now = dt.datetime(2024, 1, 1) + dt.timedelta(minutes=minutes)  # UTC

    def rng(self, *key: object) -> random.Random:
        """A generator for one thing in this world (seeding by a string is stable across runs)."""
        return random.Random("|".join([str(self.seed), *map(str, key)]))

    # -- calls -----------------------------------------------------------------------

    def call(self, name: str, arguments: object, tools: Sequence[Tool] | None = None) -> JSON:
        """Runs tool ``name`` with ``arguments`` (a dict, or JSON text) and returns the observation.

        A bad call is not an exception: it returns ``{"error": {"type", "message"}}`` as an API
        would. ``tools`` limits the callable set (a task's offered tools); default: the whole
        catalogue. Every call is appended to ``log``.
        """
        from agentflan.toolworld.catalogue import TOOLS_BY_NAME

        offered = {t.name: t for t in tools} if tools is not None else TOOLS_BY_NAME
        tool = offered.get(name)
        try:
            if tool is None:
                raise ToolError("unknown_tool", f"no tool named '{name}' (available: {', '.join(offered)})")
            observation = tool.run(self, **tool.check(arguments))
        except ToolError as err:
            observation = err.observation()
        self.log.append(CallRecord(name, arguments, observation))
        return observation

    # -- calendar ----------------------------------------------------------------------

    def events_on(self, day: dt.date) -> list[JSON]:
        """The events on ``day``: the seeded ones not deleted plus those created, by start time."""
        rng = self.rng("calendar", day.isoformat())
        base = []
        for i, hour in enumerate(sorted(rng.sample(range(8, 19), rng.choice([0, 1, 1, 2, 2, 3])))):
            title = rng.choice(EVENT_TITLES).format(name=rng.choice(FIRST_NAMES))
            minute = rng.choice([0, 0, 30])
            length = rng.choice([30, 45, 60, 90])
            base.append({"event_id": f"evt_{day:%Y%m%d}_{i}", "title": title,
                         "start_time": f"{hour:02d}:{minute:02d}", "end_time": _clock(hour * 60 + minute + length)})
        events = [e for e in base if e["event_id"] not in self.deleted_events]
        events += [{k: v for k, v in e.items() if k != "date"} for e in self.created_events.values()
                   if e["date"] == day.isoformat() and e["event_id"] not in self.deleted_events]
        return sorted(events, key=lambda e: (e["start_time"], e["event_id"]))

    def event_exists(self, event_id: str) -> bool:
        if event_id in self.deleted_events:
            return False
        if event_id in self.created_events:
            return True
        parts = event_id.split("_")
        if len(parts) != 3 or parts[0] != "evt":
            return False
        try:
            day = dt.datetime.strptime(parts[1], "%Y%m%d").date()
        except ValueError:
            return False
        return any(e["event_id"] == event_id for e in self.events_on(day))

    # -- tables ------------------------------------------------------------------------

    @property
    def orders(self) -> dict[str, JSON]:
        if self._orders is None:
            rng = self.rng("orders")
            ids = sorted(rng.sample(range(10000, 100000), N_ORDERS))
            self._orders = {}
            for n in ids:
                oid = f"A{n}"
                status = rng.choice(ORDER_STATUSES)
                order: JSON = {"order_id": oid, "status": status, "items": rng.randint(1, 6)}
                day = (self.now + dt.timedelta(days=rng.randint(-6, 6))).date().isoformat()
                if status == "shipped":
                    order |= {"carrier": rng.choice(CARRIERS), "estimated_delivery": day}
                elif status == "delivered":
                    order |= {"delivered_on": day}
                self._orders[oid] = order
        return self._orders

    @property
    def employees(self) -> list[tuple[str, str, int, str]]:
        """(name, department, salary, hire_date) rows of the ``employees`` table."""
        if self._employees is None:
            rng = self.rng("employees")
            names = rng.sample([f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES], N_EMPLOYEES)
            self._employees = []
            for i, name in enumerate(names):
                dept = DEPARTMENTS[i % len(DEPARTMENTS)] if i < 2 * len(DEPARTMENTS) else rng.choice(DEPARTMENTS)
                hired = dt.date(2015, 1, 1) + dt.timedelta(days=rng.randrange(11 * 365))
                self._employees.append((name, dept, rng.randrange(420, 1500) * 100, hired.isoformat()))
        return self._employees

    def database(self) -> sqlite3.Connection:
        """A read-only SQLite database holding the ``employees`` table."""
        if self._db is None:
            db = sqlite3.connect(":memory:")
            db.execute("CREATE TABLE employees (name TEXT, department TEXT, salary INTEGER, hire_date TEXT)")
            db.executemany("INSERT INTO employees VALUES (?, ?, ?, ?)", self.employees)
            db.commit()
            db.execute("PRAGMA query_only = ON")
            self._db = db
        return self._db


def _clock(minutes: int) -> str:
    minutes = min(minutes, 23 * 60 + 59)
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def json_value(value: Any) -> Any:
    """Plain JSON numbers: integral floats as ints (an API writes 12, not 12.0)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
