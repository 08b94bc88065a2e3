"""Agent evaluation in the tool world: T-Eval-style facet scores, task success and
Agent-H-style hallucination.

* ``agent``: the Agent interface (a callable from conversations to replies) and
  ``GeneratorAgent``, a model as an agent; ``folder``: ``load_agent`` and ``trained_form``.
* ``reading``: replies read strictly (format) and leniently (content).
* ``matching``: argument equality and final-answer matching.
* ``facets``: teacher-forced step scores (instruct, retrieve, understand, reason).
* ``episodes``: tasks run end to end in their worlds (success).
* ``hallucination``: H_ReAct, H_General, HScore on negatives.
* ``run``: ``evaluate(agent, EvalSettings(...))`` and ``format_table``.
"""

from agentflan.evaluate.agent import Agent, GenerationStats, GeneratorAgent
from agentflan.evaluate.folder import load_agent, trained_form
from agentflan.evaluate.hallucination import GENERAL_PATTERNS, general_evidence, hscore, react_evidence
from agentflan.evaluate.matching import answer_is_right, arguments_equal
from agentflan.evaluate.run import SCORES, EvalSettings, evaluate, format_table

__all__ = [
    "Agent", "EvalSettings", "GENERAL_PATTERNS", "GenerationStats", "GeneratorAgent", "SCORES", "answer_is_right",
    "arguments_equal", "evaluate", "format_table", "general_evidence", "hscore", "load_agent", "react_evidence",
    "trained_form",
]
