"""ASGI application of the simulator and the function that serves it with uvicorn."""

import logging

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from simulator import control
from simulator.config import SimulatorConfig
from simulator.formats import anthropic, gemini, openai
from simulator.state import SimulatorState


class ModelsEndpoint:
    """``GET /{provider}/v1/models``, a path that OpenAI and Anthropic share.

    A request with an ``anthropic-version`` header gets Anthropic's model list, any
    other request gets OpenAI's.
    """

    def __init__(self, state: SimulatorState) -> None:
        self.openai = openai.models_endpoint(state)
        self.anthropic = anthropic.models_endpoint(state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if any(name == b"anthropic-version" for name, _ in scope["headers"]):
            await self.anthropic(scope, receive, send)
        else:
            await self.openai(scope, receive, send)


def create_app(config: SimulatorConfig) -> Starlette:
    """Build the simulator app. ``app.state.simulator`` is its ``SimulatorState``."""
    state = SimulatorState(config)
    # Starlette tries routes in order, so the busiest come first.
    routes = [
        *openai.routes(state),
        *anthropic.routes(state),
        *gemini.routes(state),
        Route("/{provider}/v1/models", ModelsEndpoint(state), methods=["GET"]),
        *control.routes(state),
    ]
    app = Starlette(routes=routes)
    app.state.simulator = state
    return app


def run(config: SimulatorConfig, host: str = "127.0.0.1", port: int = 9101) -> None:
    """Serve the simulator until interrupted, with uvloop and httptools."""
    if not config.quiet:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=not config.quiet,
        log_level="info",
    )
