"""
The services and routes of a gateway kept in etcd (C{--etcd-config-key}): two real instances apply a
document put in a real etcd, refuse a broken one (the last good one keeps serving), go back
to their file's when the key is deleted, and say they are not ready until they have read etcd once.
"""

from __future__ import annotations

import functools
import os

from twisted.trial import unittest

from rproxy.cluster.follow import LONGEST_RETRY
from rproxy.test.stores import EtcdServer, startEtcd
from rproxy.test.support import ScriptedUpstream
from rproxy.test.test_admin import request, tokenFile
from rproxy.test.test_cluster_registry import PATIENCE, STORE_TIMEOUT, Instance, waitFor
from rproxy.test.test_config import answerWith
from rproxy.test.test_drain import waitUntilListening

KEY = "/gw/config"

#: A document of the gateway: everything under /api goes to the service api.
DOCUMENT = """
[services.api]
upstreams = ["{url}"]

[[routes]]
path-prefix = "/api/"
service = "api"

[[routes]]
service = "default"

[services.default]
upstreams = ["{fallback}"]
"""


class SharedConfigTests(unittest.TestCase):
    async def startGateway(self, count: int = 2, etcdRunning: bool = True) -> list[Instance]:
        self.etcd: EtcdServer = await startEtcd(self)
        if not etcdRunning:
            await self.etcd.stop()
        self.fromFile = ScriptedUpstream(self, answerWith(b"file"))
        self.api = ScriptedUpstream(self, answerWith(b"api"))
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = self.config = os.path.join(directory, "rproxy.toml")
        with open(config, "w") as f:
            f.write(f'[services.default]\nupstreams = ["{self.fromFile.url}"]\n')
        arguments = [
            f"--config={config}",
            f"--admin-token-file={tokenFile(self)}",
            f"--etcd={self.etcd.url}",
            "--etcd-prefix=/gw/",
            "--etcd-config-key=config",
            "--ready-route=/ready",
            "--access-log=off",
            f"--store-timeout={STORE_TIMEOUT:g}",
        ]
        instances = [Instance(self, name, arguments) for name in "AB"[:count]]
        for instance in instances:
            await waitUntilListening(self, instance.process, instance.port)
        return instances

    def document(self) -> bytes:
        return DOCUMENT.format(url=self.api.url, fallback=self.fromFile.url).encode()

    async def answers(self, instance: Instance, target: bytes, body: bytes) -> bool:
        return (await request(instance.port, target))[1] == body

    async def test_applied(self) -> None:
        """A document put in etcd is in force on every instance; deleted, the file's is back."""
        a, b = await self.startGateway()
        for each in (a, b):
            await waitFor(self, "ready", functools.partial(self.answers, each, b"/ready", b"ready\n"), 5)
            self.assertEqual((await request(each.port, b"/api/x"))[1], b"file")
        await self.etcd.put(KEY, self.document())
        for each in (a, b):
            applied = functools.partial(self.answers, each, b"/api/x", b"api")
            await waitFor(self, f"{each.name} applies it", applied, PATIENCE, each)
            self.assertEqual((await request(each.port, b"/other"))[1], b"file")
            self.assertIn(f"configuration reloaded (etcd {KEY} changed): services added: api", each.process.log)
            [services] = [[s["name"] for s in (await each.state())["services"]]]
            self.assertEqual(sorted(services), ["api", "default"])

        await self.etcd.delete(KEY)
        for each in (a, b):
            await waitFor(
                self, "the file's again", functools.partial(self.answers, each, b"/api/x", b"file"), PATIENCE, each
            )
            self.assertIn("was deleted: the config file's services and routes serve again", each.process.log)

    async def test_refused(self) -> None:
        """A broken document changes nothing: each instance logs why, and the last good one keeps serving."""
        a, b = await self.startGateway()
        await self.etcd.put(KEY, self.document())
        for each in (a, b):
            await waitFor(self, "applied", functools.partial(self.answers, each, b"/api/x", b"api"), PATIENCE)
        broken = {
            b'[[routes]]\nservice = "nowhere"\n': "routes[0]",
            b"[services.api\n": "invalid TOML",
            b'listen = ["tcp:1"]\n': "'listen': only [services.*], [[routes]], [filters.*] and default-filters",
            b"\xff\xfe": "not UTF-8",
        }
        for document, reason in broken.items():
            await self.etcd.put(KEY, document)
            for each in (a, b):
                seen = functools.partial(self.logged, each, reason)
                await waitFor(self, f"{each.name} refuses {document!r}", seen, PATIENCE)
                self.assertEqual((await request(each.port, b"/api/x"))[1], b"api")
        self.assertIn("the previous configuration keeps serving", a.process.log)
        # A SIGHUP applies the file with the last good document, not the broken one last seen.
        with open(self.config, "a") as f:
            f.write("retries = 3\n")
        a.process.transport.signalProcess("HUP")
        reloaded = functools.partial(self.logged, a, "configuration reloaded (SIGHUP): ")
        await waitFor(self, "A reloads on SIGHUP", reloaded, 5, a)
        self.assertEqual((await request(a.port, b"/api/x"))[1], b"api")
        await self.etcd.put(KEY, self.document().replace(b'path-prefix = "/api/"', b'path-prefix = "/v2/"'))
        for each in (a, b):
            await waitFor(
                self, "the next good one", functools.partial(self.answers, each, b"/v2/x", b"api"), PATIENCE, each
            )

    async def logged(self, instance: Instance, text: str) -> bool:
        return text in instance.process.log

    async def test_notReadyUntilRead(self) -> None:
        """Started while etcd is down: the file's routes serve, not ready; etcd up: the document, ready."""
        [a] = await self.startGateway(1, etcdRunning=False)
        head, body = await request(a.port, b"/ready")
        self.assertEqual(
            body.decode(),
            f"not ready: the registrations in etcd are not read yet; the configuration at etcd {KEY} is not read yet\n",
        )
        self.assertEqual((await request(a.port, b"/api/x"))[1], b"file")
        await self.etcd.start()
        await self.etcd.put(KEY, self.document())
        ready = functools.partial(self.answers, a, b"/ready", b"ready\n")
        await waitFor(self, "ready", ready, PATIENCE + LONGEST_RETRY, a)  # it tries etcd again within 5 s
        await waitFor(self, "applied", functools.partial(self.answers, a, b"/api/x", b"api"), PATIENCE, a)
