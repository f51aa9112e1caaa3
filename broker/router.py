"""Route plans: which provider and region run a request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.catalog import Catalog, Model, queue_name
from broker.errors import InvalidRequest, NotFound
from workers.adapters import adapter_for

# Body field that asks to drop parameters the provider cannot honour instead of a 400.
DROP_PARAMS_FIELD = "drop_params"


@dataclass(frozen=True)
class Target:
    """One place a job can run: a model's provider in one region."""

    model: Model
    region: str
    lane: str

    @property
    def queue(self) -> str:
        return queue_name(self.model.provider, self.region, self.lane)


def resolve_model(catalog: Catalog, model_id: str, category: str = "chat") -> Model:
    """Look up a model for an endpoint, raising the client-facing error if it cannot serve."""
    model = catalog.get(model_id)
    if model is None:
        raise NotFound(
            f"The model '{model_id}' does not exist. GET /v1/models lists the available models.",
            param="model",
            code="model_not_found",
        )
    if model.category != category:
        raise InvalidRequest(
            f"The model '{model_id}' is a {model.category} model and cannot "
            f"serve {category} requests.",
            param="model",
        )
    if adapter_for(model.wire_format) is None:
        # TODO: an adapter for the bfl image API.
        raise InvalidRequest(
            f"The model '{model_id}' uses the {model.wire_format} wire "
            "format, which this broker cannot call yet.",
            param="model",
            code="model_not_supported",
        )
    return model


def plan_route(model: Model, requested_region: str | None, lane: str = "interactive") -> Target:
    """Pick the target for a request: the requested region, else the model's default."""
    if requested_region is None:
        return Target(model, model.default_region, lane)
    if requested_region not in model.regions:
        raise InvalidRequest(
            f"The model '{model.id}' is not served in region "
            f"'{requested_region}'; its regions are {', '.join(model.regions)}.",
            param="region",
            code="region_not_available",
        )
    return Target(model, requested_region, lane)


def check_output_limit(model: Model, body: dict[str, Any]) -> None:
    """Reject a max_tokens above what the model can produce, as the providers do."""
    for param in ("max_completion_tokens", "max_tokens"):
        requested = body.get(param)
        if (
            isinstance(requested, int)
            and model.max_output_tokens is not None
            and requested > model.max_output_tokens
        ):
            raise InvalidRequest(
                f"'{param}' is {requested}, but the model '{model.id}' "
                f"produces at most {model.max_output_tokens} tokens.",
                param=param,
                code="invalid_value",
            )


def apply_parameter_policy(model: Model, body: dict[str, Any]) -> dict[str, Any]:
    """Reject parameters the model's provider cannot honour, or drop them if asked to.

    A request with ``"drop_params": true`` has such parameters removed; otherwise the
    first one is named in a 400, so no request silently runs with different settings.
    """
    adapter = adapter_for(model.wire_format)
    unsupported = adapter.unsupported_parameters(body) if adapter else []
    drop = bool(body.get(DROP_PARAMS_FIELD))
    if unsupported and not drop:
        raise InvalidRequest(
            f"The model '{model.id}' ({model.wire_format} wire format) does not "
            f"support '{unsupported[0]}'. Remove it, or send "
            f'"{DROP_PARAMS_FIELD}": true to have it dropped.',
            param=unsupported[0],
            code="unsupported_parameter",
        )
    if not unsupported and DROP_PARAMS_FIELD not in body:
        return body
    return {
        key: value
        for key, value in body.items()
        if key not in unsupported and key != DROP_PARAMS_FIELD
    }
