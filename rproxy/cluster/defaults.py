"""The defaults of the cluster options, in a module of their own: the settings and the clients both use them."""

from __future__ import annotations

#: Seconds a store may take to answer before it counts as out of reach, by default (C{--store-timeout}).
DEFAULT_STORE_TIMEOUT = 0.5

#: Where a gateway's keys are in etcd, by default (C{--etcd-prefix}).
DEFAULT_ETCD_PREFIX = "/rproxy/"

#: What a gateway's keys in Redis start with, by default (C{--redis-prefix}).
DEFAULT_REDIS_PREFIX = "rproxy:"
