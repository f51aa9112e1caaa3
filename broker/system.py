"""The whole system as local processes: simulator regions, API, workers, Flower."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass

from broker.catalog import load_catalog
from broker.processes import ProcessGroup, broker_command
from broker.settings import Settings
from simulator.urls import base_urls

# Key the simulator accepts for every provider; real keys never reach the simulator.
SIMULATOR_PROVIDER_KEY = "simulator-key"


@dataclass(frozen=True)
class SystemPorts:
    api: int
    simulator_us: int
    simulator_hk: int
    flower: int | None = None


def simulator_environment(settings: Settings, ports: SystemPorts) -> dict[str, str]:
    """Settings that point every provider of the catalog at the local simulator."""
    catalog = load_catalog(settings.catalog_path)
    region_ports = {"us": ports.simulator_us, "hk": ports.simulator_hk}
    overrides = {
        f"{provider.id}.{region}": base_urls(
            "127.0.0.1", region_ports[region], provider.id, provider.wire_format
        )
        for provider in catalog.providers.values()
        for region in provider.regions
        if region in region_ports
    }
    keys = {provider_id: SIMULATOR_PROVIDER_KEY for provider_id in catalog.providers}
    return {
        "BROKER_DATABASE_URL": settings.database_url,
        "BROKER_REDIS_URL": settings.redis_url,
        "BROKER_BASE_URL_OVERRIDES": json.dumps(overrides),
        "BROKER_PROVIDER_KEYS": json.dumps(keys),
        # Demo and test webhook receivers listen on loopback.
        "BROKER_WEBHOOK_ALLOW_PRIVATE": "true",
    }


def start_system(
    group: ProcessGroup,
    settings: Settings,
    ports: SystemPorts,
    simulator_args: tuple[str, ...] = (),
    lane_pools: bool = False,
) -> None:
    """Start every process and wait until each is ready. The schema must be migrated.

    With ``lane_pools`` each region gets one worker process per lane (``worker-us`` for
    interactive calls, ``worker-us-batch`` for batch jobs) instead of one for both, so
    a running batch cannot take the CPU that interactive calls need.
    """
    group.env.update(simulator_environment(settings, ports))
    for region, port in (("us", ports.simulator_us), ("hk", ports.simulator_hk)):
        group.start(
            f"simulator-{region}",
            broker_command("simulator", "--region", region, "--port", str(port), *simulator_args),
        )
    group.start("api", broker_command("api", "--port", str(ports.api)))
    for region in ("us", "hk"):
        if lane_pools:
            group.start(
                f"worker-{region}",
                broker_command("worker", "--region", region, "--lanes", "interactive"),
            )
            group.start(
                f"worker-{region}-batch",
                broker_command(
                    "worker", "--region", region, "--lanes", "batch", "--name", f"{region}-batch@%h"
                ),
            )
        else:
            group.start(f"worker-{region}", broker_command("worker", "--region", region))
    group.start("billing", broker_command("billing-worker"))
    if ports.flower is not None:
        group.start("flower", broker_command("flower", "--port", str(ports.flower)))

    for region, port in (("us", ports.simulator_us), ("hk", ports.simulator_hk)):
        group.wait_http(f"simulator-{region}", f"http://127.0.0.1:{port}/_sim/health")
    group.wait_http("api", f"http://127.0.0.1:{ports.api}/healthz")
    per_region = 2 if lane_pools else 1
    for pool, name, count in (
        ("us", "worker-us", per_region),
        ("hk", "worker-hk", per_region),
        ("billing", "billing", 1),
    ):
        group.wait_worker(name, settings.redis_url, pool, count)
    if ports.flower is not None:
        group.wait_until("flower", lambda: _port_open(ports.flower))


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
