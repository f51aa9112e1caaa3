"""Base URLs that a client uses to reach a provider on the simulator."""

# Path suffix after /{provider} that each wire format's SDK expects in its base URL.
# NOTE: the simulator serves no Black Forest Labs (bfl) endpoints yet, so requests to
# that base URL get 404. It is listed so that a catalog with bfl providers still loads.
BASE_PATHS = {"openai": "/v1", "anthropic": "", "gemini": "/v1beta", "bfl": "/v1"}


def base_urls(host: str, port: int, provider: str, wire_format: str) -> str:
    """Return the base URL for ``provider`` speaking ``wire_format`` on this simulator.

    Raises ValueError for a wire format not in BASE_PATHS.
    """
    try:
        suffix = BASE_PATHS[wire_format]
    except KeyError:
        raise ValueError(
            f"unknown wire format {wire_format!r}: expected one of {', '.join(BASE_PATHS)}"
        ) from None
    return f"http://{host}:{port}/{provider}{suffix}"
