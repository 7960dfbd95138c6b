"""
The built-in filters, registered as plugins so they are found like anyone else's.

Each L{rproxy.filters.factory.FilterFactory} imported here is one C{type = NAME} of a C{[filters.X]} table;
docs/filters.md lists them with their options.
"""

from __future__ import annotations

from rproxy.filters.basicauth import basicAuth as basicAuth
from rproxy.filters.bearer import jwtAuth as jwtAuth
from rproxy.filters.buffer import buffer as buffer
from rproxy.filters.compress import compress as compress
from rproxy.filters.cors import cors as cors
from rproxy.filters.forwardauth import forwardAuth as forwardAuth
from rproxy.filters.headers import headerRules as headerRules
from rproxy.filters.iprules import ipRules as ipRules
from rproxy.filters.ratelimit import concurrencyLimit as concurrencyLimit
from rproxy.filters.ratelimit import rateLimit as rateLimit
from rproxy.filters.sendfile import sendfile as sendfile
from rproxy.filters.upload import upload as upload
