"""Triton kernels for packed-sequence training, imported as ``agentflan.kernels``."""
