"""
How long a registration made through one instance of a gateway takes to reach the others, through etcd.

    .venv/bin/python benchmarks/cluster.py [--instances 3] [--runs 50]

An etcd of its own (pinned to CPU 1) and C{--instances} C{twist rproxy --etcd} processes (all pinned to CPU 0,
default configuration otherwise) in front of the demo upstream.  Each run registers a second upstream through the
first instance's admin API, then polls every other instance's C{/state} until it shows the registration, and
deregisters it through the first, polling until every other has dropped it.  The time counts from the admin
API's answer (etcd has the change) to the first poll that sees it; a poll takes about a millisecond, which bounds
the resolution.  The medians, 90th percentiles and the worst of each are printed, against the one second
docs/cluster.md promises.  The suite checks that registrations propagate (rproxy/test/test_cluster_registry.py);
how fast is measured here.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from harness import HOST, REPO, VENV_BIN, BenchError, Server, free_port, pinned

TOKEN = "the-benchmark-admin-token"

#: The longest a change may take to reach every instance: what docs/cluster.md promises.
PROMISE_MS = 1000.0

#: The longest a run waits for one instance before the benchmark fails.
PATIENCE = 10.0


class Admin:
    """One instance's admin API, over one kept-alive connection."""

    def __init__(self, port: int) -> None:
        self._connection = http.client.HTTPConnection(HOST, port, timeout=PATIENCE)

    def call(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        """The status and JSON body (C{None} if empty) of C{method path}."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        self._connection.request(method, path, payload, headers)
        response = self._connection.getresponse()
        content = response.read()
        return response.status, (json.loads(content) if content else None)

    def registered(self) -> set[str]:
        """The ids of the registrations this instance serves."""
        status, state = self.call("GET", "/state")
        if status != 200:
            raise BenchError(f"/state answered {status}")
        assert isinstance(state, dict)
        return {
            upstream["registration"]["id"]
            for service in state["services"]
            for upstream in service["upstreams"]
            if upstream.get("registration")
        }


def _propagation(others: list[Admin], id: str, present: bool) -> float:
    """Milliseconds until every one of C{others} serves (C{present}) or dropped registration C{id}."""
    started = time.perf_counter()
    for other in others:
        while (id in other.registered()) != present:
            if time.perf_counter() - started > PATIENCE:
                raise BenchError(f"not within {PATIENCE:g}s: {id} {'served' if present else 'dropped'} everywhere")
    return (time.perf_counter() - started) * 1000


def _summary(name: str, milliseconds: list[float]) -> str:
    ordered = sorted(milliseconds)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    verdict = "MET" if ordered[-1] <= PROMISE_MS else "NOT MET"
    return (
        f"{name:<14} median {statistics.median(ordered):6.1f} ms   p90 {p90:6.1f} ms   worst {ordered[-1]:6.1f} ms"
        f"   (promise: {PROMISE_MS:g} ms, {verdict})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=3, help="instances of the gateway (default 3)")
    parser.add_argument("--runs", type=int, default=50, help="registrations made and removed (default 50)")
    arguments = parser.parse_args()
    etcd = shutil.which("etcd")
    if etcd is None:
        raise BenchError("etcd is not installed (make test installs it)")
    os.environ["PYTHONPATH"] = str(REPO)  # the instances run this checkout's rproxy
    work = Path(tempfile.mkdtemp(prefix="rproxy-cluster-bench-"))
    servers: list[Server] = []
    try:
        client, peer = free_port(), free_port()
        etcdURL = f"http://{HOST}:{client}"
        store = Server(
            "etcd",
            pinned(
                1,
                [
                    etcd,
                    "--name=bench",
                    f"--data-dir={work / 'etcd'}",
                    f"--listen-client-urls={etcdURL}",
                    f"--advertise-client-urls={etcdURL}",
                    f"--listen-peer-urls=http://{HOST}:{peer}",
                    f"--initial-advertise-peer-urls=http://{HOST}:{peer}",
                    f"--initial-cluster=bench=http://{HOST}:{peer}",
                    "--log-level=warn",
                ],
            ),
            work / "etcd.log",
        )
        servers.append(store)
        store.wait_listening(client)
        token = work / "token"
        token.write_text(TOKEN + "\n")
        origin = free_port()  # the first instance also serves the demo upstream there
        admins = []
        for index in range(arguments.instances):
            port, adminPort = free_port(), free_port()
            argv = [
                str(VENV_BIN / "twist"),
                "rproxy",
                f"--listen=tcp:{port}:interface={HOST}",
                f"--admin-listen=tcp:{adminPort}:interface={HOST}",
                f"--admin-token-file={token}",
                f"--upstream=http://{HOST}:{origin}",
                f"--etcd={etcdURL}",
                *([f"--demo-upstream=tcp:{origin}:interface={HOST}"] if index == 0 else []),
            ]
            instance = Server(f"instance {index}", pinned(0, argv), work / f"instance{index}.log")
            servers.append(instance)
            instance.wait_listening(adminPort)
            admins.append(Admin(adminPort))
        first, others = admins[0], admins[1:]
        added: list[float] = []
        removed: list[float] = []
        for run in range(arguments.runs):
            url = f"http://{HOST}:{origin}/run{run}"
            status, answer = first.call("POST", "/services/default/upstreams", {"url": url, "ttl": 60})
            if status != 201 or not isinstance(answer, dict):
                raise BenchError(f"registering answered {status}: {answer}")
            id = answer["id"]
            added.append(_propagation(others, id, present=True))
            status, answer = first.call("DELETE", f"/services/default/upstreams/{id}")
            if status != 204:
                raise BenchError(f"deregistering answered {status}: {answer}")
            removed.append(_propagation(others, id, present=False))
        print(f"{arguments.instances} instances, one etcd, {arguments.runs} runs; until every other instance:")
        print(_summary("registered", added))
        print(_summary("deregistered", removed))
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
