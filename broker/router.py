"""Route plans: which provider and region run a request."""

from __future__ import annotations

from dataclasses import dataclass

from broker.catalog import Catalog, Model, queue_name
from broker.errors import InvalidRequest, NotFound

# Wire formats that have a worker adapter.
SUPPORTED_WIRE_FORMATS = frozenset({"openai"})


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
    if model.wire_format not in SUPPORTED_WIRE_FORMATS:
        # TODO: adapters for the anthropic, gemini and bfl wire formats.
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


def check_output_limit(model: Model, body: dict[str, int | object]) -> None:
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
