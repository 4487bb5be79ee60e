"""convserve.testing: harnesses for running convserve for real in tests, benchmarks and scripts."""

from convserve.testing.server_process import (
    ServerProcess,
    ServerStartError,
    child_env,
    loopback_command,
    read_port_file,
    start_server_process,
    wait_serving,
)

__all__ = [
    "ServerProcess",
    "ServerStartError",
    "child_env",
    "loopback_command",
    "read_port_file",
    "start_server_process",
    "wait_serving",
]
