"""Route plans: which provider and region run a request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.catalog import Catalog, Model, queue_name
from broker.errors import InvalidRequest, NotFound
from workers.adapters import adapter_for

# Parts per million: the unit of price multipliers.
PPM = 1_000_000
# Body field that requests dropping parameters the provider cannot honour, instead of
# a 400.
DROP_PARAMS_FIELD = "drop_params"
# Body fields that steer routing and never reach a provider.
ROUTING_FIELDS = ("region", "region_pin", "models", "fallbacks")


@dataclass(frozen=True)
class Target:
    """One place a job can run: a model's provider in one region."""

    model: Model
    region: str
    lane: str
    # Multiplier on the catalog prices, in parts per million: the account's markup or
    # discount, times the batch discount on the batch lane.
    price_ppm: int = PPM

    def _price(self, catalog_price: int) -> int:
        return -(-catalog_price * self.price_ppm // PPM)

    @property
    def input_price(self) -> int:
        """Micro-dollars per million input tokens that this target's jobs are charged."""
        return self._price(self.model.pricing.input_per_mtok)

    @property
    def output_price(self) -> int:
        return self._price(self.model.pricing.output_per_mtok)

    @property
    def cached_input_price(self) -> int:
        cached = self.model.pricing.cached_input_per_mtok
        return self.input_price if cached is None else self._price(cached)

    @property
    def queue(self) -> str:
        return queue_name(self.model.provider, self.region, self.lane)

    @property
    def key(self) -> tuple[str, str]:
        return (self.model.provider, self.region)

    def to_spec(self) -> dict[str, Any]:
        """Return the fields a worker needs to call this target."""
        return {
            "model": self.model.id,
            "provider": self.model.provider,
            "region": self.region,
            "lane": self.lane,
            "upstream_model": self.model.upstream_model,
            "wire_format": self.model.wire_format,
            "input_price": self.input_price,
            "output_price": self.output_price,
            "cached_input_price": self.cached_input_price,
        }


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


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
            f"The model '{model_id}' is {_article(model.category)} {model.category} model "
            f"and cannot serve {category} requests.",
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


def _fallback_models(body: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (model id, parameter) for each fallback named by ``models`` or ``fallbacks``."""
    named = []
    for param in ("models", "fallbacks"):
        value = body.get(param)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise InvalidRequest(f"'{param}' must be a list of model ids.", param=param)
        named.extend((model_id, param) for model_id in value)
    return named


def plan_route(
    catalog: Catalog,
    model: Model,
    body: dict[str, Any],
    lane: str = "interactive",
    price_ppm: int = 1_000_000,
) -> list[Target]:
    """Return the targets to try in order: the model's regions, then the fallback models.

    ``region`` puts a region first; ``region_pin`` allows that region only, for data
    residency, so neither the model nor a fallback ever runs anywhere else.
    """
    pinned = body.get("region_pin")
    preferred = pinned or body.get("region")
    param = "region_pin" if pinned else "region"
    if preferred is not None and preferred not in model.regions:
        raise InvalidRequest(
            f"The model '{model.id}' is not served in region '{preferred}'; "
            f"its regions are {', '.join(model.regions)}.",
            param=param,
            code="region_not_available",
        )

    plan: list[Target] = []
    # Keyed by model id and region: comparing Target objects compares whole models.
    planned: set[tuple[str, str]] = set()
    candidates = [model] + [
        _fallback(catalog, model, model_id, p) for model_id, p in _fallback_models(body)
    ]
    for candidate in candidates:
        regions = list(candidate.regions)
        if preferred in regions:
            regions.remove(preferred)
            regions.insert(0, preferred)
        for region in regions:
            if (pinned and region != pinned) or (candidate.id, region) in planned:
                continue
            planned.add((candidate.id, region))
            plan.append(Target(candidate, region, lane, price_ppm))
    return plan


def _fallback(catalog: Catalog, primary: Model, model_id: str, param: str) -> Model:
    fallback = catalog.get(model_id)
    if fallback is None:
        raise NotFound(
            f"The fallback model '{model_id}' does not exist.", param=param, code="model_not_found"
        )
    if fallback.category != primary.category or adapter_for(fallback.wire_format) is None:
        raise InvalidRequest(
            f"The fallback model '{model_id}' cannot serve this request.", param=param
        )
    return fallback


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
