"""Two nodes on one PostgreSQL queue (SPEC 2.8): they accept concurrently, and each message is delivered
once; operator changes made through one node are what the other sees."""

from __future__ import annotations

import asyncio

from smtpsvc.app import Service
from tests.cluster.conftest import Cluster, send_to, subjects
from tests.conftest import smtp_port, wait_until
from tests.peers import LoopbackPeer


async def test_two_nodes_accept_concurrently_and_deliver_each_message_exactly_once(cluster: Cluster) -> None:
    a, b = await cluster.node("node-a"), await cluster.node("node-b")
    wanted = [f"m{i:03}" for i in range(40)]

    async def submit(node: Service, names: list[str]) -> None:
        for name in names:
            assert (await send_to(smtp_port(node), name)).startswith("2.6.0")

    await asyncio.gather(*(submit(node, wanted[i::4]) for i, node in enumerate([a, b, a, b])))
    await wait_until(lambda: len(cluster.sink.messages) >= len(wanted), what="every message delivered")
    await wait_until(lambda: a.scheduler.inflight == b.scheduler.inflight == 0, what="both nodes idle")
    assert subjects(cluster.sink) == wanted  # each exactly once
    assert await a.store.count() == 0 and await b.store.count() == 0


def drop_files(node: Service) -> list[str]:
    return sorted(p.name for p in node.folders["drop"].iterdir() if p.suffix == ".eml")


async def test_pickup_is_per_node_and_drop_is_written_by_the_node_that_delivers(cluster: Cluster) -> None:
    a, b = await cluster.node("node-a"), await cluster.node("node-b")
    (b.folders["pickup"] / "hello.eml").write_bytes(
        b"X-Sender: app@local.test\r\nX-Receiver: user@local.test\r\n"
        b"From: app@local.test\r\nSubject: picked up\r\n\r\nhi\r\n"
    )
    await wait_until(lambda: drop_files(a) + drop_files(b), what="the local delivery")
    await wait_until(lambda: a.scheduler.inflight == b.scheduler.inflight == 0, what="both nodes idle")
    assert len(drop_files(a) + drop_files(b)) == 1  # one node delivered it, into its own drop/
    assert not list(b.folders["pickup"].glob("*.eml"))


class Counting(LoopbackPeer):
    """A next hop that counts mail transactions in progress at once (MAIL to the reply to the data),
    each held open for a moment, over every connection from every node."""

    def __init__(self) -> None:
        super().__init__()
        self.active = self.most = self.delivered = 0

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 counting.test ESMTP\r\n")
        in_transaction = False
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"MAIL":
                in_transaction = True
                self.active += 1
                self.most = max(self.most, self.active)
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                while await reader.readline() not in (b".\r\n", b""):
                    pass
                await asyncio.sleep(0.2)
                self.delivered += 1
            if verb in (b"DATA", b"RSET") and in_transaction:
                in_transaction = False
                self.active -= 1
            writer.write(b"221 bye\r\n" if verb == b"QUIT" else b"250 ok\r\n")
            await writer.drain()
            if verb == b"QUIT":
                break
        if in_transaction:
            self.active -= 1
        writer.close()


async def test_the_connection_limit_per_destination_holds_across_nodes(cluster: Cluster) -> None:
    peer = Counting()
    await peer.start()
    # One message at a time per node, so both nodes are delivering at once.
    delivery = {
        "smart_host": f"[127.0.0.1]:{peer.port}",
        "max_connections_per_domain": 1,
        "max_connections": 1,
    }
    a, b = await cluster.node("node-a", delivery=delivery), await cluster.node("node-b", delivery=delivery)
    await asyncio.gather(*(send_to(smtp_port(node), f"s{i}") for i, node in enumerate([a, b] * 3)))
    await wait_until(lambda: peer.delivered == 6, what="every message delivered")
    assert peer.most == 1  # one transaction at a time to that next hop, whichever node delivers
    await peer.stop()
