"""Control routes under /_sim for tests and benchmarks."""

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from simulator.pipeline import json_response
from simulator.state import SimulatorState


def routes(state: SimulatorState) -> list[Route]:
    async def health(request: Request) -> Response:
        return json_response(state, {"status": "ok", "region": state.config.region})

    async def stats(request: Request) -> Response:
        return json_response(state, state.stats.snapshot())

    async def config(request: Request) -> Response:
        """Return the config, after applying the JSON object of changes in a POST body."""
        if request.method == "POST":
            try:
                changes = await request.json()
            except ValueError as error:
                return json_response(state, {"error": f"invalid JSON body: {error}"}, 400)
            if not isinstance(changes, dict):
                return json_response(
                    state, {"error": "the body must be a JSON object of config fields"}, 400
                )
            try:
                state.update_config(changes)
            except ValidationError as error:
                details = error.errors(include_url=False, include_context=False)
                return json_response(state, {"error": "invalid config", "details": details}, 400)
        return json_response(state, state.config.model_dump())

    async def reset(request: Request) -> Response:
        state.reset()
        return json_response(state, state.stats.snapshot())

    return [
        Route("/_sim/health", health, methods=["GET"]),
        Route("/_sim/stats", stats, methods=["GET"]),
        Route("/_sim/config", config, methods=["GET", "POST"]),
        Route("/_sim/reset", reset, methods=["POST"]),
    ]
