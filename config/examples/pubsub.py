"""A line-based pub/sub server whose subscribers keep their subscriptions across a reload.

    upgraderd run -c config/examples/pubsub.yaml
    nc 127.0.0.1 8006        # then type: SUB news / PUB news hello / TOPICS / WHO

One command per line; answers are lines too:
  SUB <topic>          -> OK sub <topic>
  UNSUB <topic>        -> OK unsub <topic>
  PUB <topic> <text>   -> OK pub <n>, and MSG <topic> <text> to the n subscribers of <topic>
  TOPICS               -> TOPICS <topic> <topic> ...
  WHO                  -> WHO generation=<g> pid=<p>

It shows `upgraderd.worker.handoff` in a server of your own. With
`drain.handoff: auto`, this worker opens its hand-off channel (a `Taker`)
before it says READY=1. When it is asked to drain, it stops reading each
client and offers it to the new generation (a `Giver`) with its state: the
topics it subscribed to (the opaque state blob), the part of a line it sent
but did not finish (the unhandled bytes), and the answers not yet written
(the unsent bytes). The client stays connected on the same TCP connection
and never notices. A client no one takes stays here until it leaves.

Messages reach the subscribers of the same worker, so run one worker
(`workers.count: 1`); a real service would share them through a broker.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys

from upgraderd import worker
from upgraderd.worker import handoff

MAX_LINE = 64 * 1024
MAX_TOPICS = 1000


class Client:
    """One subscriber: its socket, its topics, its half-read line and unsent output."""

    def __init__(self, sock: socket.socket, listener: str) -> None:
        self.sock, self.listener = sock, listener
        self.topics: set[str] = set()
        self.inbuf = bytearray()
        self.out = bytearray()

    def state(self) -> bytes:
        """Return the state blob that moves with this client: its topics, one per line."""
        return "\n".join(sorted(self.topics)).encode()

    def restore(self, blob: bytes) -> None:
        """Take over the topics of a client that moved here (checked like any input)."""
        lines = blob.decode("utf-8", "replace").split("\n")
        self.topics = {t for t in lines[:MAX_TOPICS] if t and len(t) <= 200 and " " not in t}


class PubSub:
    """A selectors loop over the listeners, the clients and the hand-off channel."""

    def __init__(self, listeners: dict[str, socket.socket]) -> None:
        self.listeners = listeners
        self.sel = selectors.DefaultSelector()
        self.clients: dict[int, Client] = {}
        self.taker: handoff.Taker | None = None
        self.generation = os.environ.get("UPGRADERD_GENERATION", "0")

    def start(self) -> None:
        """Register the listeners and, with hand-off on, the channel (before READY=1)."""
        for name, ls in self.listeners.items():
            ls.setblocking(False)
            self.sel.register(ls, selectors.EVENT_READ, name)
        if handoff.enabled():
            self.taker = handoff.Taker(self.listeners)
            self.sel.register(self.taker.fileno(), selectors.EVENT_READ, "taker")

    def run(self, drain: worker.Drain) -> None:
        """Serve until drained and no client is left."""
        draining = False
        while not (draining and not self.clients):
            if drain.requested and not draining:
                draining = True
                self.give_away()
            for key, _ in self.sel.select(timeout=0.2):
                if key.data == "taker":
                    continue  # polled below, also to expire stalled offers
                if isinstance(key.data, str):
                    self.accept(key.fileobj, key.data)  # type: ignore[arg-type]
                else:
                    self.service(key.data)
            if self.taker is not None and not draining:
                self.take()

    def accept(self, ls: socket.socket, name: str) -> None:
        try:
            sock, _ = ls.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        self.adopt(Client(sock, name))

    def adopt(self, client: Client) -> None:
        client.sock.setblocking(False)
        self.clients[client.sock.fileno()] = client
        self.sel.register(client.sock, self.events(client), client)

    def take(self) -> None:
        """Adopt the clients another worker committed to us."""
        assert self.taker is not None
        for moved in self.taker.poll():
            client = Client(moved.sock, moved.listener)
            client.restore(moved.state)
            client.out += moved.unsent
            self.adopt(client)
            self.received(client, moved.unhandled)

    def give_away(self) -> None:
        """Stop accepting and hand every client to the new generation."""
        for ls in self.listeners.values():
            self.sel.unregister(ls)
            ls.close()
        if self.taker is None:
            return
        self.sel.unregister(self.taker.fileno())
        for moved in self.taker.close():  # commits that were already on their way
            client = Client(moved.sock, moved.listener)
            client.restore(moved.state)
            client.out += moved.unsent
            self.adopt(client)
        giver = handoff.Giver()
        giver.find()
        clients = list(self.clients.values())
        for client in clients:
            self.sel.unregister(client.sock)  # stop reading before offering
        given = giver.give_many([handoff.Handed(c.sock, c.listener, c.state(), bytes(c.inbuf), bytes(c.out))
                                 for c in clients])
        for client, theirs in zip(clients, given):
            if theirs:  # theirs now: close our copy, never touch it again
                del self.clients[client.sock.fileno()]
                client.sock.close()
            else:  # nobody took it: serve it on until it leaves
                self.sel.register(client.sock, self.events(client), client)
        giver.close()

    def service(self, client: Client) -> None:
        try:
            if client.out:
                del client.out[:client.sock.send(client.out)]
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            data = b""
        if data == b"":
            self.close(client)
            return
        if data:
            self.received(client, data)
        self.sel.modify(client.sock, self.events(client), client)

    def received(self, client: Client, data: bytes) -> None:
        client.inbuf += data
        while (end := client.inbuf.find(b"\n")) >= 0:
            line = bytes(client.inbuf[:end]).decode("utf-8", "replace").strip()
            del client.inbuf[:end + 1]
            client.out += (self.command(client, line) + "\n").encode()
        if len(client.inbuf) > MAX_LINE:
            client.inbuf.clear()
            client.out += b"ERR line too long\n"

    def command(self, client: Client, line: str) -> str:
        verb, _, rest = line.partition(" ")
        topic, _, text = rest.partition(" ")
        if verb == "SUB" and topic and len(client.topics) < MAX_TOPICS:
            client.topics.add(topic)
            return f"OK sub {topic}"
        if verb == "UNSUB" and topic:
            client.topics.discard(topic)
            return f"OK unsub {topic}"
        if verb == "PUB" and topic:
            subs = [c for c in self.clients.values() if topic in c.topics]
            for c in subs:
                c.out += f"MSG {topic} {text}\n".encode()
                if c is not client:
                    self.sel.modify(c.sock, self.events(c), c)
            return f"OK pub {len(subs)}"
        if verb == "TOPICS":
            return " ".join(["TOPICS", *sorted(client.topics)])
        if verb == "WHO":
            return f"WHO generation={self.generation} pid={os.getpid()}"
        return "ERR unknown command"

    def events(self, client: Client) -> int:
        return selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)

    def close(self, client: Client) -> None:
        self.sel.unregister(client.sock)
        self.clients.pop(client.sock.fileno(), None)
        client.sock.close()


def main() -> int:
    """Serve pub/sub on every listener until drained."""
    socks = worker.listeners()
    if not socks:
        print("error: no listening sockets; run me under upgraderd", file=sys.stderr)
        return 2
    drain = worker.on_drain()  # the handler first, then READY=1
    server = PubSub(socks)
    server.start()
    worker.ready()
    server.run(drain)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
