"""Corpus construction: raw agent trajectories (AgentInstruct, ToolBench) become Agent-FLAN
data (``build``: format alignment, capability decomposition, negatives, the general mix)."""
