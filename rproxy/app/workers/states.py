"""
Every worker's admin state as one document (L{combineStates}), for worker 0's status page and C{GET /state}.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rproxy.observe.status import StateDocument, UpstreamState


def combineStates(states: list[StateDocument]) -> StateDocument:
    """
    The admin state documents of several workers as one: the first's (worker 0's), with the others' counts
    added (each upstream's exchanges in flight, connections and ejections; the tunnels); an upstream whose
    health is not the same in every worker says so in its C{reason}.  The services, upstreams and routes are
    the same in every worker (the same configuration, the registrations followed).
    """
    combined = copy.deepcopy(states[0])
    seen: dict[tuple[str, str], Counter[str]] = {}
    upstreams: dict[tuple[str, str], UpstreamState] = {}
    for kept in combined["services"]:
        for upstream in kept["upstreams"]:
            upstreams[(kept["name"], upstream["key"])] = upstream
            seen[(kept["name"], upstream["key"])] = Counter([upstream["state"]])
    for other in states[1:]:
        combined["shuttingDown"] = combined["shuttingDown"] or other["shuttingDown"]
        for name, value in other["tunnels"].items():
            combined["tunnels"][name] = combined["tunnels"].get(name, 0) + value
        for theirs in other["services"]:
            for upstream in theirs["upstreams"]:
                key = (theirs["name"], upstream["key"])
                mine = upstreams.get(key)
                if mine is None:
                    continue
                mine["inFlight"] += upstream["inFlight"]
                mine["ejections"] += upstream["ejections"]
                mine["pool"]["open"] += upstream["pool"]["open"]
                mine["pool"]["idle"] += upstream["pool"]["idle"]
                seen[key][upstream["state"]] += 1
    for key, counted in seen.items():
        if len(counted) > 1:
            upstreams[key]["reason"] = ", ".join(
                f"{state} in {n} of {len(states)} workers" for state, n in counted.items()
            )
    return combined
