"""Command line: ``python -m simulator --region us --port 9101``."""

import argparse

from pydantic import ValidationError

from simulator.app import run
from simulator.config import SimulatorConfig

DEFAULT_REGION = "local"


def build_parser() -> argparse.ArgumentParser:
    """Build a parser with one option per SimulatorConfig field, plus --host and --port."""
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
        description="Serve a simulated LLM provider upstream on one port.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9101, help="TCP port to listen on")
    for name, field in SimulatorConfig.model_fields.items():
        option = "--" + name.replace("_", "-")
        default = DEFAULT_REGION if name == "region" else field.default
        if field.annotation is bool:
            parser.add_argument(
                option,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=field.description,
            )
        else:
            parser.add_argument(
                option, type=field.annotation, default=default, help=field.description
            )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    arguments = vars(parser.parse_args(argv))
    host = arguments.pop("host")
    port = arguments.pop("port")
    try:
        config = SimulatorConfig(**arguments)
    except ValidationError as error:
        parser.error(str(error))
    run(config, host=host, port=port)


if __name__ == "__main__":
    main()
