"""An executable tool world for agent training and evaluation.

* ``tools`` / ``catalogue`` / ``world``: tools with real deterministic executors and the
  errors a real API returns (``World(seed).call(name, arguments)``).
* ``tasks`` / ``negatives``: tasks (query, tools, gold calls, gold answer) and negative
  samples, with a fixed train / held-out split by template and by entity
  (``generate_tasks``, ``generate_negatives``).
* ``trajectory`` / ``recovery`` / ``raw``: trajectories, mistakes with recoveries, and raw
  AgentInstruct / ToolBench records (``generate_raw``).
* ``protocol``: the agent protocol (ReAct, Agent-FLAN's aligned chat, strict JSON):
  system prompts, rendering, reply parsers, ``Episode`` and ``teacher_forcing``.
"""

from agentflan.toolworld.catalogue import TOOLS, TOOLS_BY_NAME, tool
from agentflan.toolworld.negatives import IRRELEVANT_TOOLS, NO_TOOLS, Negative, generate_negatives
from agentflan.toolworld.protocol import (
    CHAT,
    FACETS,
    FORMS,
    REACT,
    STRICT_JSON,
    Episode,
    Reply,
    parse_arguments,
    parse_json_reply,
    parse_react,
    parse_tool_choice,
    render,
    system_prompt,
    teacher_forcing,
)
from agentflan.toolworld.raw import AGENTINSTRUCT, TOOLBENCH, generate_raw
from agentflan.toolworld.tasks import HELD_OUT_TEMPLATES, GoldCall, Task, generate_tasks
from agentflan.toolworld.tools import Tool, ToolError
from agentflan.toolworld.trajectory import Final, Step, Trajectory
from agentflan.toolworld.world import World, is_error

__all__ = [
    "AGENTINSTRUCT", "CHAT", "FACETS", "FORMS", "HELD_OUT_TEMPLATES", "IRRELEVANT_TOOLS", "NO_TOOLS", "REACT",
    "STRICT_JSON", "TOOLBENCH", "TOOLS", "TOOLS_BY_NAME", "Episode", "Final", "GoldCall", "Negative", "Reply", "Step",
    "Task", "Tool", "ToolError", "Trajectory", "World", "generate_negatives", "generate_raw", "generate_tasks",
    "is_error", "parse_arguments", "parse_json_reply", "parse_react", "parse_tool_choice", "render", "system_prompt",
    "teacher_forcing", "tool",
]
