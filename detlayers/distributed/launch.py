"""Start N local JAX processes that join one ``jax.distributed`` runtime, and fail fast.

``python -m detlayers.distributed.launch -n 2 [--devices-per-process K] -- python -m detlayers.demo --steps 50``

Each child gets the coordinator address of a free loopback port and its process index through
the environment (``DETLAYERS_COORDINATOR``, ``DETLAYERS_NUM_PROCESSES``, ``DETLAYERS_PROCESS_ID``),
which :func:`detlayers.distributed.initialize` reads; with ``--devices-per-process`` the children
also get ``--xla_force_host_platform_device_count`` so each process owns that many CPU devices.
Output lines are forwarded with a ``[i]`` prefix. When one child exits with an error, every other
child is terminated (then killed after a grace period), so nobody is left waiting forever in a
collective; the launcher exits with the first failing child's code.  This is a convenience for one
host: on a cluster, start one process per host with your scheduler and JAX's own detection.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

GRACE_SECONDS = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def child_environment(
    base: dict[str, str],
    coordinator: str,
    num_processes: int,
    process_id: int,
    devices_per_process: int | None,
) -> dict[str, str]:
    env = dict(base)
    env["DETLAYERS_COORDINATOR"] = coordinator
    env["DETLAYERS_NUM_PROCESSES"] = str(num_processes)
    env["DETLAYERS_PROCESS_ID"] = str(process_id)
    env["PYTHONUNBUFFERED"] = "1"
    if devices_per_process is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def _forward(stream, prefix: str, sink, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        with lock:
            sink.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            sink.flush()
    stream.close()


def _stop_all(procs: Sequence[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + GRACE_SECONDS
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def launch(
    command: Sequence[str],
    num_processes: int,
    *,
    devices_per_process: int | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout: float | None = None,
    sink=None,
) -> int:
    """Run ``command`` as ``num_processes`` cooperating processes; returns the exit code.

    0 when every child exits 0.  Otherwise the code of the first child that failed (128 + the
    signal number if a signal ended it; the others are then stopped), or 124 when ``timeout``
    seconds pass first (all children are stopped).
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not command:
        raise ValueError("command is empty: put it after '--'")
    sink = sink or sys.stdout
    coordinator = f"{host}:{port or free_port(host)}"
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []
    try:
        for i in range(num_processes):
            env = child_environment(os.environ, coordinator, num_processes, i, devices_per_process)
            # own process group: stopping a child also stops whatever it started
            proc = subprocess.Popen(
                list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
            procs.append(proc)
            thread = threading.Thread(target=_forward, args=(proc.stdout, f"[{i}] ", sink, lock),
                                      daemon=True)
            thread.start()
            threads.append(thread)
        start = time.monotonic()
        code = 0
        while True:
            codes = [proc.poll() for proc in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                index, code = failed[0]
                how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
                with lock:
                    sink.write(f"[launch] process {index} {how}; stopping the others\n")
                code = 128 - code if code < 0 else code  # the shell's convention for signals
                break
            if all(c == 0 for c in codes):
                break
            if timeout is not None and time.monotonic() - start > timeout:
                code = 124
                with lock:
                    sink.write(f"[launch] timed out after {timeout:.0f} s; stopping all processes\n")
                break
            time.sleep(0.05)
    finally:
        _stop_all(procs)
        for thread in threads:
            thread.join(timeout=GRACE_SECONDS)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own, command = argv[:split], argv[split + 1:]
    else:
        own, command = argv, []
    parser = argparse.ArgumentParser(prog="python -m detlayers.distributed.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=None,
                        help="forced CPU devices per process (sets XLA_FLAGS for the children)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before all are stopped")
    args = parser.parse_args(own)
    if not command:
        parser.error("give the command after '--'")

    def _on_signal(signum, frame):  # stop children through the finally in launch()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_signal)
    try:
        return launch(command, args.num_processes, devices_per_process=args.devices_per_process,
                      port=args.port, timeout=args.timeout)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
