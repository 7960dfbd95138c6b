"""
C{--workers N}: one supervisor process and N worker processes on the same listening sockets.

The supervisor binds every listener once (C{--listen}, C{--tls-listen}, C{--admin-listen}; or adopts the
sockets systemd passed), and passes the listening sockets to its workers as inherited descriptors; each
worker is C{twist rproxy} with the same arguments, and runs the whole proxy, its listeners accepting from
the inherited sockets (L{sockets.SharedPort}, one connection per turn of its loop, so that a burst of
connections spreads over the workers) instead of bound.  Inherited sockets, not C{SO_REUSEPORT}: with one socket
there is one accept queue, which outlives any worker, so a worker that exits (a restart, a crash, an
upgrade) leaves no accepted-but-unserved connection behind to be reset, as a C{SO_REUSEPORT} socket's own
queue is when it closes; and they work for UNIX sockets and systemd's socket activation alike.

The supervisor serves nothing itself but C{--metrics-listen}, whose C{/metrics} asks each worker for its
metrics over its control channel (a socketpair, JSON lines) and answers them all, each sample labelled
with its C{worker}; and gathers every worker's admin state and metrics for worker 0's admin listener (its
status page and C{GET /state}, L{combineStates}; its C{/metrics}, labelled likewise).
The admin listener is passed to worker 0 only; an upstream registered, renewed or
deregistered there is announced to the supervisor, which tells every other worker, and every worker it
starts later (L{rproxy.app.admin.Registrations.follow}).  Active health checks run in worker 0 alone, whose
verdicts go the same way (L{rproxy.health.shared}); passive health (ejections) stays per worker.

Signals to the supervisor:
  - SIGHUP: every worker reloads (its configuration, certificates, access log);
  - SIGUSR1: every worker reopens its access log;
  - SIGTERM, SIGINT: every worker drains (its grace period), then the supervisor exits;
  - SIGUSR2: a rolling restart that is also the binary upgrade: the supervisor executes itself again
    (the rproxy installed now), keeping its process id and its listening sockets, starts a new generation
    of workers, and once all of them listen, the previous generation drains and exits.

A worker that exits otherwise is replaced, after a pause that doubles while workers keep dying young (a
crash loop), up to L{MAX_BACKOFF}.  Under systemd (C{Type=notify}), the supervisor says C{READY=1} when
its first generation listens, C{RELOADING=1} on SIGHUP and C{STOPPING=1} on the way out (L{notifySystemd}).
docs/workers.md tells operators all this.

A module per concern: L{channel} (the control channel, and what both ends agree on), L{sockets} (the
listening sockets passed and accepted from), L{worker} (a worker's side), L{supervisor} (the supervisor's),
L{states} (every worker's admin state as one).
"""
