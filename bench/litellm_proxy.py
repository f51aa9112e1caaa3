"""The LiteLLM proxy as a reference: its own virtualenv, a generated config, two workers.

The proxy runs without a database, in front of the same simulator as the broker, so its
figures show what a stateless proxy costs on this machine. It checks a random master
key on every request, as the broker checks its API keys (LiteLLM 1.108 refuses to
start without one). Its virtualenv (bench/.litellm-venv) is created on first use from
bench/litellm-requirements.txt.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from broker.processes import ProcessGroup, free_port

BENCH_DIR = Path(__file__).resolve().parent
VENV_DIR = BENCH_DIR / ".litellm-venv"
REQUIREMENTS = BENCH_DIR / "litellm-requirements.txt"
# Interpreter for the virtualenv; LiteLLM needs 3.9 or later.
VENV_PYTHON = "python3.11"
# uvicorn processes of the proxy.
PROXY_WORKERS = 2
# Seconds to wait for the proxy to answer its liveness probe: importing LiteLLM alone
# takes several seconds per worker on the two-core benchmark machine.
STARTUP_TIMEOUT_S = 180.0
# LiteLLM fetches its model price map and other files from GitHub at start-up unless
# these variables select the copies it ships (LiteLLM 1.108). The benchmark reaches
# only 127.0.0.1, so every such fetch is turned off, and so is telemetry.
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_TELEMETRY_DISABLED": "true",
    "LITELLM_LOG": "ERROR",
}


class LiteLLMUnavailable(RuntimeError):
    """LiteLLM could not be installed or started; the message gives the reason."""


def ensure_venv() -> Path:
    """Create bench/.litellm-venv with the pinned LiteLLM unless it exists; return the binary."""
    binary = VENV_DIR / "bin" / "litellm"
    if binary.exists():
        return binary
    steps = (
        [VENV_PYTHON, "-m", "venv", str(VENV_DIR)],
        [str(VENV_DIR / "bin" / "pip"), "install", "--quiet", "-r", str(REQUIREMENTS)],
    )
    for argv in steps:
        try:
            completed = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LiteLLMUnavailable(f"`{' '.join(argv)}` failed: {exc}") from exc
        if completed.returncode != 0:
            tail = "\n".join(completed.stderr.splitlines()[-10:])
            raise LiteLLMUnavailable(
                f"`{' '.join(argv)}` exited with code {completed.returncode}:\n{tail}"
            )
    return binary


def installed_version() -> str:
    completed = subprocess.run(
        [
            str(VENV_DIR / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
        check=False,
        env=OFFLINE_ENV,
    )
    return completed.stdout.strip() or "unknown"


@dataclass(frozen=True)
class RunningProxy:
    url: str
    master_key: str


def write_config(
    path: Path, model: str, upstream_model: str, simulator_url: str, master_key: str
) -> None:
    """Write a proxy config with one OpenAI-compatible model served by the simulator."""
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{upstream_model}",
                    "api_base": f"{simulator_url}/openai/v1",
                    "api_key": "simulator-key",
                },
            }
        ],
        "litellm_settings": {"drop_params": True, "telemetry": False},
        "general_settings": {"master_key": master_key},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@contextmanager
def running_proxy(
    workdir: Path, model: str, upstream_model: str, simulator_url: str
) -> Iterator[RunningProxy]:
    """Start the proxy with two workers; yield its URL and key, and stop it on exit.

    Raises LiteLLMUnavailable when it cannot be installed or does not become ready.
    """
    binary = ensure_venv()
    config_path = workdir / "litellm-config.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    master_key = f"sk-{secrets.token_hex(32)}"
    write_config(config_path, model, upstream_model, simulator_url, master_key)
    port = free_port()
    group = ProcessGroup(log_dir=workdir / "logs", env=dict(OFFLINE_ENV))
    argv = [str(binary), "--config", str(config_path), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--num_workers", str(PROXY_WORKERS)]
    try:
        group.start("litellm", argv)
        url = f"http://127.0.0.1:{port}"
        try:
            group.wait_http("litellm", f"{url}/health/liveliness", STARTUP_TIMEOUT_S)
        except RuntimeError as exc:
            raise LiteLLMUnavailable(f"the LiteLLM proxy did not start: {exc}") from exc
        yield RunningProxy(url, master_key)
    finally:
        group.stop_all()


def proxy_command(config_path: str = "<config.yaml>") -> str:
    """Return the proxy's command line as the results page shows it."""
    return (
        f"bench/.litellm-venv/bin/litellm --config {config_path} --host 127.0.0.1 "
        f"--port <free port> --num_workers {PROXY_WORKERS}"
    )
