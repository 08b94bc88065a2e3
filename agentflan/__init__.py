"""agentflan: train Llama-2 models into agents with the Agent-FLAN recipe."""

__version__ = "0.1.0"
