"""
Several rproxy instances as one gateway: what they share, and through which store.

  - The admin API's registrations live in etcd v3 (C{--etcd}), each under a lease that is its TTL; every
    instance watches them and serves what any instance registered (L{rproxy.cluster.registrations}).
  - Optionally the services, routes and filters live in etcd too, one TOML document under a key that every
    instance watches and applies as a reload (C{rproxy.cluster.document}).
  - Rate limits may keep their buckets in Redis (C{--redis}), checked by one atomic script per request
    (C{rproxy.cluster.redis}).

Each store is reached with non-blocking clients (treq on etcd's HTTP/JSON gateway; txredisapi), and
L{rproxy.cluster.health.StoreHealth} tells when one is out of reach: the instances keep serving what they
last knew, and say so in the log, the metrics and the status page.  docs/cluster.md is the operators' guide.
"""
