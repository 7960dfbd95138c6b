"""The cluster options (C{--etcd}, C{--redis} and theirs) as L{Options} reads them, and L{StoreHealth}."""

from __future__ import annotations

import os

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent
from twisted.python.usage import UsageError
from twisted.trial import unittest

from rproxy.app.tap import Options
from rproxy.cluster.health import StoreHealth
from rproxy.cluster.settings import ClusterSettings
from rproxy.test.certs import CertificateAuthority
from rproxy.test.support import LogCapture


def cluster(*arguments: str) -> ClusterSettings:
    options = Options()
    options.parseOptions(["--upstream", "http://127.0.0.1:9", *arguments])
    return options.cluster


class ClusterOptionsTests(unittest.TestCase):
    def test_default(self) -> None:
        """Without the options, nothing is shared."""
        settings = cluster()
        self.assertEqual(settings, ClusterSettings())
        self.assertFalse(settings.shared)

    def test_given(self) -> None:
        """Every option, from the command line; the password from its file."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(" s3cret \n")
        settings = cluster(
            "--etcd=http://127.0.0.1:2379/",
            "--etcd=http://127.0.0.2:2379",
            "--etcd-prefix=/gw-a/",
            "--etcd-config-key=config",
            "--redis=redis://127.0.0.1:6379/2",
            f"--redis-password-file={path}",
            "--store-timeout=2",
            "--redis-prefix=gw-a:",
            "--etcd-user=gateway",
            f"--etcd-password-file={path}",
        )
        self.assertEqual(settings.etcdCredentials, ("gateway", "s3cret"))
        self.assertEqual(settings.redisPrefix, "gw-a:")
        self.assertEqual(settings.etcd, ("http://127.0.0.1:2379", "http://127.0.0.2:2379"))
        self.assertEqual((settings.prefix, settings.configKey), ("/gw-a/", "config"))
        self.assertEqual(
            (settings.redis, settings.redisPassword, settings.timeout), ("redis://127.0.0.1:6379/2", "s3cret", 2.0)
        )
        self.assertNotIn("s3cret", repr(settings))

    def test_fromFile(self) -> None:
        """The options are top-level keys of the config file; C{etcd} takes a list."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                'etcd = ["http://127.0.0.1:2379"]\nredis = "redis://127.0.0.1:6379/0"\nupstream = "http://127.0.0.1:9"\n'
            )
        options = Options()
        options.parseOptions(["--config", path])
        self.assertEqual(options.cluster.etcd, ("http://127.0.0.1:2379",))
        self.assertEqual(options.cluster.redis, "redis://127.0.0.1:6379/0")

    def test_errors(self) -> None:
        """Each mistake is one line naming its option, and a password never shows in it."""
        empty, secret = self.mktemp(), self.mktemp()
        files = CertificateAuthority().writeFiles(self.directory())  # a client certificate with another's key
        open(empty, "w").close()
        with open(secret, "w") as f:
            f.write("hunter2\n")
        cases = {
            ("--etcd=127.0.0.1:2379",): "--etcd: expected an etcd client URL such as http://127.0.0.1:2379",
            ("--etcd=http://h:2379/v3",): "--etcd: expected an etcd client URL",
            ("--etcd=http://h:1", "--etcd-prefix=rproxy"): "--etcd-prefix: expected a key prefix such as /rproxy/",
            ("--etcd-config-key=config",): "--etcd-config-key: has no use without --etcd",
            ("--etcd=http://h:1", "--etcd-config-key=/abs"): "--etcd-config-key: expected a key name under",
            ("--redis=http://h:6379",): "--redis: expected a URL such as redis://127.0.0.1:6379/0",
            ("--redis=redis://:hunter2@h:6379",): "--redis: put the password in --redis-password-file, not in the URL",
            ("--redis=redis://h:6379/db",): "--redis: the path is the database number",
            ("--redis-password-file=/nonexistent/pw",): "--redis-password-file: cannot read /nonexistent/pw",
            ("--redis=redis://h:1", f"--redis-password-file={empty}"): f"--redis-password-file: {empty} is empty",
            (f"--redis-password-file={empty}",): "--redis-password-file: ",
            ("--etcd=http://h:1", "--etcd-user=gw"): "--etcd-user: needs --etcd-password-file too",
            (f"--etcd-password-file={secret}",): "--etcd-password-file: needs --etcd-user too",
            ("--etcd-user=gw", f"--etcd-password-file={secret}"): "--etcd-user: has no use without --etcd",
            ("--store-timeout=0",): "--store-timeout: expected seconds above 0, at most 60",
            ("--store-timeout=nan",): "--store-timeout: expected seconds above 0",
            ("--redis-prefix=gw",): "--redis-prefix: has no use without --redis",
            ("--redis=redis://h:1", "--redis-prefix=a b"): "--redis-prefix: expected 1 to 64 printable ASCII",
            ("--redis=redis://h:1", "--redis-prefix="): "--redis-prefix: expected 1 to 64 printable ASCII",
            ("--etcd=http://h:1", f"--etcd-ca={empty}"): "--etcd-ca: has no use without a https:// --etcd URL",
            (f"--redis-client-cert={empty}",): "--redis-client-cert: has no use without a rediss:// --redis URL",
            ("--etcd=https://h:1", "--etcd-ca=/nonexistent/ca.pem"): "--etcd-ca: cannot read the CA file",
            ("--etcd=https://h:1", f"--etcd-ca={empty}"): f"--etcd-ca: the CA file {empty!r} holds no PEM certificate",
            ("--redis=rediss://h:1", "--redis-client-cert=/nonexistent/c.pem"): "--redis-client-cert: cannot read",
            ("--redis=rediss://h:1", f"--redis-client-cert={empty}"): "--redis-client-cert: the client certificate",
            ("--etcd=https://h:1", f"--etcd-client-cert={files.clientCertificate}:{files.serverKey}"): (
                "--etcd-client-cert: the client certificate"
            ),
        }
        for arguments, expected in cases.items():
            with self.subTest(arguments=arguments):
                with self.assertRaises(UsageError) as raised:
                    cluster(*arguments)
                self.assertIn(expected, str(raised.exception))
                self.assertNotIn("hunter2", str(raised.exception))
        self.assertTrue(os.path.exists(empty))

    def test_tls(self) -> None:
        """
        C{--etcd-ca}, C{--etcd-client-cert}, C{--redis-ca} and C{--redis-client-cert} are read at once (the key
        beside the certificate or in its file); a file's content never shows in the settings.
        """
        files = CertificateAuthority().writeFiles(self.directory())
        settings = cluster(
            "--etcd=https://127.0.0.1:2379",
            f"--etcd-ca={files.ca}",
            f"--etcd-client-cert={files.clientCertificate}:{files.clientKey}",
            "--redis=rediss://localhost:6379/0",
            f"--redis-ca={files.ca}",
        )
        etcd, redis = settings.etcdTLS, settings.redisTLS
        self.assertEqual(
            (etcd.caFile, etcd.clientCertificate, etcd.clientKey), (files.ca, files.clientCertificate, files.clientKey)
        )
        self.assertIsNotNone(etcd.trust)
        assert etcd.client is not None
        self.assertEqual(etcd.client.getSubject().commonName, b"rproxy client")
        self.assertEqual((redis.caFile, redis.client), (files.ca, None))
        self.assertNotIn("PRIVATE KEY", repr(settings))
        self.assertEqual(cluster().etcdTLS, ClusterSettings().etcdTLS)

    def directory(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path


class StoreHealthTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.log = LogCapture(self)
        self.health = StoreHealth("etcd", "http://127.0.0.1:2379", "serving the last registrations known", self.clock)

    def lines(self) -> list[tuple[object, str]]:
        return [
            (e["log_level"], formatEvent(e)) for e in self.log.events if e["log_namespace"] == "rproxy.cluster.health"
        ]

    def test_changesOnly(self) -> None:
        """Only going out of reach and coming back are logged, and observers hear of each."""
        seen: list[bool] = []
        self.health.observe(lambda health: seen.append(health.up))
        self.health.answered()
        self.clock.advance(5)
        self.health.unreachable("connection refused")
        self.health.unreachable("timed out after 0.5s")
        self.assertEqual((self.health.up, self.health.error, self.health.since), (False, "timed out after 0.5s", 5))
        self.clock.advance(12.5)
        self.health.answered()
        self.health.answered()
        self.assertEqual(seen, [False, True])
        self.assertEqual(self.health.failures, 1)
        self.assertEqual(
            self.lines(),
            [
                (
                    LogLevel.warn,
                    "etcd at http://127.0.0.1:2379 is out of reach (connection refused): "
                    "serving the last registrations known",
                ),
                (LogLevel.info, "etcd at http://127.0.0.1:2379 answers again, after 12.5s out of reach"),
            ],
        )
        self.assertEqual(
            self.health.describe(),
            {
                "store": "etcd",
                "url": "http://127.0.0.1:2379",
                "up": True,
                "since": 17.5,
                "error": "",
                "fallback": "serving the last registrations known",
            },
        )
