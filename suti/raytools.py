"""Starting or joining a Ray cluster with one clear error when that fails.

Every command that uses Ray (``suti mine --ray``, ``suti generate``, ``suti serve
--ray-address``, ``suti demo``) connects through :func:`init_ray`. A local cluster that does not
come up (``ray.init`` times out under load: the raylet or GCS did not start in time) or an
address that cannot be reached becomes one :class:`RayStartError` line with a hint - retry, or
pass ``--ray-address`` - instead of Ray's 30-line traceback.
"""

from __future__ import annotations

import logging
import os

from suti.errors import SutiError

log = logging.getLogger(__name__)

#: Driver environment variables a job's Ray workers need (:func:`worker_env`).
WORKER_ENV_PREFIXES = ("SUTI_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "AWS_", "GOOGLE_", "TOKENIZERS_", "OMP_NUM_THREADS")


class RayStartError(SutiError):
    """Ray could not be started or joined (the CLI prints one line, exit code 2)."""


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: Seconds :func:`check_ray_address` waits for a cluster's port to accept a connection.
PROBE_SECONDS = 5.0


def check_ray_address(address: str | None, option: str = "--ray-address", timeout: float = PROBE_SECONDS) -> None:
    """Refuse, in one line and within ``timeout`` seconds, a cluster address nothing listens at
    (``ray.init`` itself retries such an address for minutes, printing a warning every few
    seconds). ``host:port`` (the GCS, default port 6379) and ``ray://host:port`` (Ray Client) are
    probed with a TCP connection; ``None``, ``""``, ``"local"`` and ``"auto"`` are not (Ray
    resolves them itself).

    Raises:
        RayStartError: naming ``option``, the address and the connection's error.
    """
    import socket

    if address in (None, "", "local", "auto"):
        return
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host:
        host, port = rest.rstrip("/"), "10001" if address.startswith("ray://") else "6379"
    try:
        number = int(port)
    except ValueError:
        raise RayStartError(f"{option} {address!r}: not a host:port address (e.g. 10.0.0.1:6379, ray://head:10001 or auto)") from None
    try:
        socket.create_connection((host.strip("[]"), number), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RayStartError(f"{option} {address!r}: no Ray cluster answers at {host}:{number} ({reason}); start one there with "
                            f"`ray start --head`, or leave out {option} to start a local one") from None


def init_ray(address: str | None = None, *, option: str = "--ray-address", **kwargs) -> bool:
    """``ray.init(address=address, **kwargs)`` unless Ray is initialised already.

    Args:
        address: a cluster address (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``), or
            ``None``/``"local"``/``""``: the cluster in ``RAY_ADDRESS`` when that is set (as
            ``ray job submit`` sets it for its entrypoint), else a private local cluster, started
            with ``ray.init(address="local")`` even when a ``ray start`` cluster runs on this
            machine (a plain ``ray.init()`` would join that one and refuse ``num_cpus``).
        option: the command-line option that sets ``address``, named in the hint.
        kwargs: passed to ``ray.init`` (``num_cpus``, ``runtime_env``, ``log_to_driver`` ...).

    Returns:
        True when this call connected (the caller may ``ray.shutdown()`` later), False when Ray
        was initialised already (e.g. inside a Ray Serve replica).

    Raises:
        RayStartError: the local cluster did not start, or ``address`` could not be joined.
    """
    import ray

    if ray.is_initialized():
        return False
    if address in (None, "") and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    local = address in (None, "", "local")
    kwargs.setdefault("log_to_driver", False)
    if local:
        kwargs.setdefault("include_dashboard", False)
    if not local:
        check_ray_address(address, option)  # seconds, not minutes of Ray's retries
    try:
        if not local:  # resources belong to the cluster, not to this driver
            for key in ("num_cpus", "num_gpus"):
                kwargs.pop(key, None)
        ray.init(address="local" if local else address, **kwargs)
    except Exception as exc:  # Ray raises ConnectionError, TimeoutError, RuntimeError, ValueError ...
        try:
            ray.shutdown()  # whatever half-started
        except Exception:  # noqa: BLE001 - nothing more to clean up
            pass
        if local:
            raise RayStartError(f"could not start a local Ray cluster ({_first_line(exc)}); retry (a busy "
                                f"machine can make start-up time out), or pass {option} to join a running "
                                f"cluster") from None
        raise RayStartError(f"could not join the Ray cluster at {address!r} ({_first_line(exc)}); check that "
                            f"it is running and reachable and retry, or leave out {option} to start a "
                            f"local one") from None
    return True


def worker_env() -> dict[str, str]:
    """The driver's environment the workers need (``runtime_env["env_vars"]``): model caches and
    hub settings (``SUTI_*``, ``HF_*``), object-store credentials (``AWS_*``, ``GOOGLE_*``), and
    ``PYTHONPATH`` with absolute entries."""
    env = {k: v for k, v in os.environ.items() if k.startswith(WORKER_ENV_PREFIXES)}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p)
    return env
