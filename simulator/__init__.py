"""Local upstream that speaks the OpenAI, Anthropic and Gemini wire formats.

It is the default upstream of the broker's demo, tests and benchmarks. Replies are
deterministic, and latency, faults and outages can be configured at start and changed
at run time through ``POST /_sim/config``. Start it with
``python -m simulator --region us --port 9101``.
"""

from simulator.config import SimulatorConfig
from simulator.urls import base_urls

__all__ = ["SimulatorConfig", "base_urls"]
