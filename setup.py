"""Packaging for rproxy, a streaming HTTP reverse proxy on Twisted."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "rproxy" / "_version.py").read_text(), re.M
).group(1)  # type: ignore[union-attr]

# The s3 extra: the upload filter's S3-compatible storage (rproxy/upload/storage.py), boto3 in threads of its own.
S3 = ["boto3>=1.35.0"]

# The redis extra: rate limits whose buckets several instances share in Redis (rproxy/cluster/redis.py), through
# txredisapi, the non-blocking Redis client for Twisted, which parses replies with hiredis (Redis's C parser)
# when it is installed.  A proxy without --redis imports neither.
REDIS = ["txredisapi>=1.6.0", "hiredis>=3.0.0"]

# The otel extra: rproxy/observe/otel.py's spans, the SDK's sampling and batching, and its OTLP/HTTP exporter
# (protobuf over requests, in the SDK's thread).  A proxy that does not trace never imports them.
OTEL = [
    "opentelemetry-api>=1.27.0",
    "opentelemetry-sdk>=1.27.0",
    "opentelemetry-exporter-otlp-proto-http>=1.27.0",
]

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
    # py.typed: type checkers of plugin authors read rproxy's hints (PEP 561).
    package_data={"twisted": ["plugins/rproxy_plugin.py"], "rproxy": ["py.typed"]},
    # The tac for `twistd -n -y`, at a path that holds for any installation: PREFIX/share/rproxy/rproxy.tac
    # (PREFIX: the virtualenv, or /usr/local); docs/operations.md and docs/systemd use it.
    data_files=[("share/rproxy", ["rproxy.tac"])],
    install_requires=[
        # Every lower bound here is in requirements/oldest.txt, which `make test` runs the suite on; the
        # newest releases are the other run.  rproxy uses no private name of Twisted or h2 outside
        # rproxy/app/reactor.py (rproxy/test/test_twisted_contract.py checks the ones it uses there).
        "Twisted[tls,http2]>=25.5.0,<27",
        "treq>=26.7.0",
        "pyOpenSSL>=25.1.0",
        "service-identity>=24.1.0",
        # rproxy/downstream/tls.py reads certificates itself.
        "cryptography>=45.0.7",
        # rproxy's HTTP/2 on both sides is on h2's public API, with hpack's never-indexed fields, hyperframe's
        # GOAWAY frame and priority's tree (for clients that send RFC 7540 priorities) used directly: priority
        # 1.2.2 bounds the tree and takes a dependency on a stream not in it (1.1 raised KeyError).
        "h2>=4.2,<5",
        "hpack>=4.1,<5",
        "hyperframe>=6.1,<7",
        "priority>=1.2.2,<2",
        "zope.interface>=7.0",
        # rproxy/tunnel/messages.py parses WebSocket frames on message-aware routes.
        "wsproto>=1.2",
        # The edge filters (rproxy/filters/): JWT verification and JWKS (PyJWT on cryptography), htpasswd
        # files (libpass, the maintained passlib, with bcrypt for $2y$ hashes), brotli and zstd compression.
        "PyJWT[crypto]>=2.10",
        "libpass>=1.9",
        "bcrypt>=4.2",
        "brotli>=1.1",
        "zstandard>=0.23",
        # rproxy/observe/metrics.py: Prometheus metrics through prometheus_client's custom collector API, served
        # in the exposition format a scrape asks for (its encoders and their content types).
        "prometheus-client>=0.20",
        # rproxy/upload/multipart.py parses the forms of offloaded uploads as they stream, with its
        # PushMultipartParser (treq depends on it already; python-multipart would take over its import name).
        "multipart>=1.2.1",
    ],
    extras_require={
        # setuptools: test_plugins builds the example plugin offline (--no-build-isolation).
        # PyHamcrest: Twisted's own reactor tests, which rproxy/test/test_reactor.py runs against rproxy's reactor.
        # grpcio: rproxy/test/test_grpc.py runs a real gRPC client and server through the proxy.
        # websockets: rproxy/test/test_upgrade.py and test_websocket.py run real WebSocket clients and servers.
        # pydoctor: `make docs` builds the API reference, and rproxy/test/test_docs.py checks that it builds.
        # httpx: the filter tests' HTTP client library, which decodes gzip, br and zstd bodies.
        # hypothesis: rproxy/test/test_properties.py's property-based tests of the parsers and filters.
        # atheris: the coverage-guided fuzzer of fuzz/ (rproxy/test/test_fuzz.py runs it briefly, `make fuzz` longer).
        # The redis extra: rproxy/test/test_cluster_ratelimit.py shares buckets in a real Redis server.
        # The s3 extra and moto's server: rproxy/test/test_filter_upload.py stores uploads in a real S3 API server.
        # The otel extra and opentelemetry-proto: rproxy/test/test_observe_tracing.py traces through a proxy, and
        # decodes what the exporter sends to a collector.
        "otel": OTEL,
        "s3": S3,
        "redis": REDIS,
        "test": [
            *REDIS,
            *OTEL,
            *S3,
            "moto[server]>=5.0.20",
            "opentelemetry-proto>=1.27.0",
            "setuptools>=70.1",
            "pydoctor>=25.10",
            "PyHamcrest>=2.0",
            "grpcio>=1.60",
            "websockets>=13",
            "httpx>=0.27",
            "hypothesis>=6.100",
            "atheris>=3.0.0",
        ],
        "dev": ["mypy>=1.13", "mypy-zope>=1.0.9", "ruff>=0.8"],
        "bench": ["aiohttp>=3.10", "py-spy>=0.4", "uvloop>=0.21", "httptools>=0.6"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3.11",
        "Topic :: Internet :: Proxy Servers",
        "Topic :: Internet :: WWW/HTTP :: HTTP Servers",
    ],
)
