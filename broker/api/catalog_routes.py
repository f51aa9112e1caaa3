"""``GET /v1/models``: the catalog in OpenAI's list format, with prices."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from broker.api.services import Caller, services
from broker.catalog import Model
from broker.errors import NotFound
from broker.jsonresponse import ORJSONResponse

router = APIRouter()

# Unix time the catalog's models are reported as created; the catalog keeps no dates.
CATALOG_CREATED = 1_767_225_600


def _describe(model: Model) -> dict[str, Any]:
    pricing = model.pricing.model_dump(exclude_none=True)
    return {
        "id": model.id,
        "object": "model",
        "created": CATALOG_CREATED,
        "owned_by": model.provider,
        "category": model.category,
        "regions": model.regions,
        "context_window": model.context_window,
        "max_output_tokens": model.max_output_tokens,
        # Micro-dollars per million tokens, or per unit for image, video and audio models.
        "pricing_micro_usd": pricing,
    }


@router.get("/v1/models")
async def list_models(request: Request, _: Caller) -> ORJSONResponse:
    catalog = services(request).catalog
    return ORJSONResponse(
        {"object": "list", "data": [_describe(m) for m in catalog.models.values()]}
    )


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request, _: Caller) -> ORJSONResponse:
    model = services(request).catalog.get(model_id)
    if model is None:
        raise NotFound(
            f"The model '{model_id}' does not exist.", param="model", code="model_not_found"
        )
    return ORJSONResponse(_describe(model))
