"""The model catalog: providers, models, regions, base URLs and prices."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, field_validator

WireFormat = Literal["openai", "anthropic", "gemini", "bfl"]
Category = Literal["chat", "embedding", "image", "video", "audio"]

LANES = ("interactive", "batch")

# Micro-dollars in one dollar: catalog prices in dollars become integers.
MICRO_USD_PER_USD = 1_000_000


def to_micro_usd(dollars: str | Decimal) -> int:
    """Convert a decimal dollar amount to integer micro-dollars, rejecting sub-micro parts."""
    value = Decimal(str(dollars)) * MICRO_USD_PER_USD
    if value != value.to_integral_value():
        raise ValueError(f"price {dollars} has more precision than one micro-dollar")
    return int(value)


class Pricing(BaseModel):
    """Prices of one model, in micro-dollars (per million tokens, or per unit)."""

    input_per_mtok: int = 0
    output_per_mtok: int = 0
    cached_input_per_mtok: int | None = None
    per_image: int | None = None
    per_second: int | None = None
    per_request: int | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _dollars_to_micro(cls, value: object) -> object:
        if value is None or isinstance(value, int):
            return value
        return to_micro_usd(str(value))


class Provider(BaseModel):
    """An upstream provider and the base URL it is called at from each region."""

    id: str
    name: str
    wire_format: WireFormat
    regions: dict[str, str]


class Model(BaseModel):
    """A public model name and how to reach it."""

    id: str
    provider: str
    upstream_model: str
    category: Category
    wire_format: WireFormat
    regions: list[str] = Field(min_length=1)
    context_window: int | None = None
    max_output_tokens: int | None = None
    pricing: Pricing

    @property
    def default_region(self) -> str:
        return self.regions[0]


class Catalog:
    """Lookup over the loaded catalog, with base URLs resolved against overrides."""

    def __init__(
        self,
        providers: dict[str, Provider],
        models: dict[str, Model],
        base_url_overrides: dict[str, str] | None = None,
    ) -> None:
        self.providers = providers
        self.models = models
        self._overrides = dict(base_url_overrides or {})

    @property
    def regions(self) -> list[str]:
        """Every region named by any provider, in first-seen order."""
        seen: dict[str, None] = {}
        for provider in self.providers.values():
            for region in provider.regions:
                seen.setdefault(region, None)
        return list(seen)

    def get(self, model_id: str) -> Model | None:
        return self.models.get(model_id)

    def base_url(self, provider_id: str, region: str) -> str:
        """Return the upstream base URL for a provider in a region, overrides first."""
        for key in (f"{provider_id}.{region}", provider_id, f"*.{region}"):
            if key in self._overrides:
                return self._overrides[key].rstrip("/")
        return self.providers[provider_id].regions[region].rstrip("/")

    def queues_for_region(self, region: str, lanes: tuple[str, ...] = LANES) -> list[str]:
        """Return the Celery queue names a worker pinned to ``region`` consumes."""
        return [
            queue_name(provider.id, region, lane)
            for provider in self.providers.values()
            if region in provider.regions
            for lane in lanes
        ]


def queue_name(provider_id: str, region: str, lane: str) -> str:
    """Return the queue for one provider, region and lane: ``<provider>.<region>.<lane>``."""
    return f"{provider_id}.{region}.{lane}"


class CatalogError(ValueError):
    """The catalog file is missing or inconsistent."""


def load_catalog(path: Path, base_url_overrides: dict[str, str] | None = None) -> Catalog:
    """Read and check the catalog file at ``path``."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"cannot read the model catalog at {path}: {exc.strerror}") from exc

    providers = {
        provider_id: Provider(id=provider_id, **fields)
        for provider_id, fields in raw["providers"].items()
    }
    models: dict[str, Model] = {}
    for entry in raw["models"]:
        provider = providers.get(entry["provider"])
        if provider is None:
            raise CatalogError(f"model {entry['id']} names unknown provider {entry['provider']}")
        entry.setdefault("wire_format", provider.wire_format)
        model = Model(**entry)
        unknown = set(model.regions) - set(provider.regions)
        if unknown:
            raise CatalogError(
                f"model {model.id} lists regions {sorted(unknown)} "
                f"that provider {provider.id} does not serve"
            )
        if model.id in models:
            raise CatalogError(f"model {model.id} appears twice in {path}")
        models[model.id] = model
    return Catalog(providers, models, base_url_overrides)
