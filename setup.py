"""Packaging for rproxy, a streaming HTTP reverse proxy on Twisted."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "rproxy" / "_version.py").read_text(), re.M
).group(1)  # type: ignore[union-attr]

setup(
    name="rproxy",
    version=VERSION,
    description="A streaming HTTP reverse proxy and edge gateway built on Twisted",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # twisted.plugins is a namespace-like dropin directory: it must never get an __init__.py.
    packages=find_packages(exclude=["benchmarks", "benchmarks.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/rproxy_plugin.py"]},
    install_requires=[
        # rproxy relies on private attributes of twisted.web.http (see rproxy/test/test_twisted_contract.py),
        # so the range is pinned to the versions the contract test has run against.
        "Twisted[tls,http2]>=26.10.0,<26.11",
        "treq>=26.7.0",
        "pyOpenSSL>=26.0.0",
        "service-identity>=24.1.0",
        # rproxy/downstream/tls.py reads certificates itself (42: not_valid_after_utc).
        "cryptography>=42",
        "zope.interface>=7.0",
        # rproxy/tunnel/messages.py parses WebSocket frames on message-aware routes.
        "wsproto>=1.2",
    ],
    extras_require={
        # setuptools: test_plugins builds the example plugin offline (--no-build-isolation).
        # PyHamcrest: Twisted's own reactor tests, which rproxy/test/test_reactor.py runs against rproxy's reactor.
        # grpcio: rproxy/test/test_grpc.py runs a real gRPC client and server through the proxy.
        # websockets: rproxy/test/test_upgrade.py and test_websocket.py run real WebSocket clients and servers.
        "test": ["h2>=4.1,<5", "setuptools>=70.1", "PyHamcrest>=2.0", "grpcio>=1.60", "websockets>=13"],
        "dev": ["mypy>=1.13", "mypy-zope>=1.0.9", "ruff>=0.8"],
        "bench": ["aiohttp>=3.10", "py-spy>=0.4"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3.11",
        "Topic :: Internet :: Proxy Servers",
        "Topic :: Internet :: WWW/HTTP :: HTTP Servers",
    ],
)
