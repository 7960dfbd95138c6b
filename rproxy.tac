# twistd -n --pidfile= -y rproxy.tac
#
# Runs the same service as `twist rproxy`, configured from the environment (for systemd):
#   RPROXY_UPSTREAM="http://10.0.0.5:8080 http://10.0.0.6:8080"   (whitespace-separated)
#   RPROXY_LISTEN="systemd:domain=INET:index=0"
#   RPROXY_CONFIG=/etc/rproxy/rproxy.toml                          (see docs/configuration.md)
# and any other option as RPROXY_<NAME>, e.g. RPROXY_CONNECT_TIMEOUT=3. See docs/operations.md.
# SIGHUP (systemctl reload) reads RPROXY_CONFIG again and applies it (docs/configuration.md, "Live reload").
# Units for systemd, plain and socket-activated, are in docs/systemd/.
import os

from rproxy.app.reactor import installUnlessChosen

installUnlessChosen()  # before anything imports the reactor, unless twistd -r chose one (docs/operations.md)

from twisted.application import service

from rproxy.app.tap import makeService, optionsFromEnvironment

application = service.Application("rproxy")
makeService(optionsFromEnvironment(os.environ)).setServiceParent(application)
