"""A line-based pub/sub server whose subscribers keep their subscriptions across a reload.

    upgraderd run -c config/examples/pubsub.yaml     # app: "pubsub:make" (a module:factory app)
    python3 -c 'import socket; s = socket.create_connection(("127.0.0.1", 8006)); ...'
    # or, as a command: worker, `workers.command: [python3, config/examples/pubsub.py]`

One command per line; answers are lines too:
  SUB <topic>          -> OK sub <topic>
  UNSUB <topic>        -> OK unsub <topic>
  PUB <topic> <text>   -> OK pub <n>, and MSG <topic> <text> to the n subscribers of <topic>
  TOPICS               -> TOPICS <topic> <topic> ...
  WHO                  -> WHO generation=<g> pid=<p>

It is written on `upgraderd.worker` alone (docs/workers.md, docs/prefork.md):

- `make()` is the factory: upgraderd calls it in each worker after the fork,
  and `serve()` does what the contract asks, in order: `worker.listeners()`,
  `worker.on_drain()`, the hand-off channel (a `Taker`), then `worker.ready()`.
- At a reload's drain it stops reading each client and offers it to the new
  generation (a `Giver`) with its state: its topics (the opaque state blob),
  the part of a line it sent but did not finish (the unhandled bytes), and
  the answers not yet written (the unsent bytes). The client stays on the
  same TCP connection and never notices. A client no one takes stays here
  until it leaves.
- While clients are still arriving from the old generation
  (`Taker.arriving`), it reads no client: a PUB handled then would reach the
  subscribers already here and miss those still on their way (more than 64
  clients move in several batches). It delivers once the hand-off is over.
- At the master's stop (`Drain.reason == "stop"`) nobody will take the
  clients: it closes them at once instead of serving on until drain.timeout.

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
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


def say(text: str) -> None:
    """Write one line to the master's log (the stderr it gave us)."""
    print(f"pubsub generation {os.environ.get('UPGRADERD_GENERATION', '?')} pid {os.getpid()}: {text}",
          file=sys.stderr, flush=True)


class Client:
    """One client: its socket, its topics, its half-read line and unsent output."""

    def __init__(self, sock: socket.socket, listener: str) -> None:
        self.sock, self.listener = sock, listener
        self.topics: set[str] = set()
        self.inbuf = bytearray()
        self.out = bytearray()
        self.watched = 0  # the events it is registered for (0: not registered)

    @classmethod
    def moved(cls, moved: handoff.Handed) -> Client:
        """Return a client that another worker handed to us, with everything that came with it."""
        client = cls(moved.sock, moved.listener)
        lines = moved.state.decode("utf-8", "replace").split("\n")   # checked like any input
        client.topics = {t for t in lines[:MAX_TOPICS] if t and len(t) <= 200 and " " not in t}
        client.inbuf += moved.unhandled
        client.out += moved.unsent
        return client

    def handed(self) -> handoff.Handed:
        """Return what moves with this client: its topics (one per line), unread input, unsent output."""
        state = "\n".join(sorted(self.topics)).encode()
        return handoff.Handed(self.sock, self.listener, state, bytes(self.inbuf), bytes(self.out))


class PubSub:
    """A selectors loop over the listeners, the clients and the hand-off channel."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.listeners: dict[str, socket.socket] = {}
        self.clients: dict[int, Client] = {}
        self.taker: handoff.Taker | None = None
        self.holding = False   # clients are still arriving: read none
        self.generation = os.environ.get("UPGRADERD_GENERATION", "0")

    def serve(self) -> int:
        """Serve until drained and no client is left (the factory contract's `serve()`)."""
        self.listeners = worker.listeners()
        if not self.listeners:
            say("no listening sockets; run me under upgraderd")
            return 2
        drain = worker.on_drain()  # the handler first, then READY=1
        for name, ls in self.listeners.items():
            ls.setblocking(False)
            self.sel.register(ls, READ, name)
        if handoff.enabled():
            self.taker = handoff.Taker(self.listeners)
            self.sel.register(self.taker.fileno(), READ, "taker")
        worker.ready()
        self.run(drain)
        return 0

    def run(self, drain: worker.Drain) -> None:
        draining = False
        while not (draining and not self.clients):
            if drain.requested and not draining:
                draining = True
                self.stop_taking()
                if drain.reason == "stop":
                    self.close_all()
                else:
                    self.give_away()
            elif draining and self.clients and drain.reason == "stop":
                self.close_all()  # still draining from a reload when the master began to stop
            for key, events in self.sel.select(timeout=0.2):
                if key.data == "taker":
                    continue  # polled below, also to expire stalled offers
                if isinstance(key.data, str):
                    self.accept(key.fileobj, key.data)  # type: ignore[arg-type]
                else:
                    self.service(key.data, events)
            if self.taker is not None and not draining:
                self.take()

    # -- arrivals --

    def accept(self, ls: socket.socket, name: str) -> None:
        try:
            sock, _ = ls.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        self.adopt(Client(sock, name))

    def adopt(self, client: Client) -> None:
        client.sock.setblocking(False)
        self.clients[client.sock.fileno()] = client
        self.watch(client)

    def take(self) -> None:
        """Adopt the clients another worker committed to us; handle their input once all arrived."""
        assert self.taker is not None
        arrived = [Client.moved(moved) for moved in self.taker.poll()]
        for client in arrived:
            self.adopt(client)
        holding = self.taker.arriving > 0
        if holding != self.holding:
            self.holding = holding
            self.rewatch(list(self.clients.values()))
        elif not holding:
            self.rewatch(arrived)

    def rewatch(self, clients: list[Client]) -> None:
        """Handle what waited in `clients` (unless holding) and register them for what they need now."""
        for client in clients:
            if not self.holding:
                self.received(client, b"")   # what came with it, and what waited meanwhile
            self.watch(client)

    # -- departures --

    def stop_taking(self) -> None:
        """Close the listeners and the channel; adopt the commits that were already on their way."""
        for ls in self.listeners.values():
            self.sel.unregister(ls)
            ls.close()
        if self.taker is not None:
            self.sel.unregister(self.taker.fileno())
            for moved in self.taker.close():
                self.adopt(Client.moved(moved))
        self.holding = False
        self.rewatch(list(self.clients.values()))

    def give_away(self) -> None:
        """Hand every client to the new generation; serve on the ones nobody took."""
        giver = handoff.Giver()
        giver.find()
        clients = list(self.clients.values())
        for client in clients:
            self.pause(client)  # stop reading before offering
        given = giver.give_many([c.handed() for c in clients])
        for client, theirs in zip(clients, given):
            if theirs:  # theirs now: close our copy, never touch it again
                del self.clients[client.sock.fileno()]
                client.sock.close()
            else:
                self.watch(client)
        giver.close()
        say(f"reload: handed {sum(given)} of {len(clients)} connection(s) to the new generation")

    def close_all(self) -> None:
        """The master stops: nobody will take the clients, so flush what we can and close them now."""
        say(f"stop: closing {len(self.clients)} connection(s), no hand-off")
        for client in list(self.clients.values()):
            try:
                client.sock.send(client.out)
            except OSError:
                pass
            self.close(client)

    # -- the clients --

    def service(self, client: Client, events: int) -> None:
        data: bytes | None = None
        try:
            if events & WRITE and client.out:
                del client.out[:client.sock.send(client.out)]
            if events & READ and not self.holding:
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
        self.watch(client)

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
                    self.watch(c)
            return f"OK pub {len(subs)}"
        if verb == "TOPICS":
            return " ".join(["TOPICS", *sorted(client.topics)])
        if verb == "WHO":
            return f"WHO generation={self.generation} pid={os.getpid()}"
        return "ERR unknown command"

    def watch(self, client: Client) -> None:
        """Register `client` for what it needs now: reading (unless holding), writing (if output waits)."""
        events = (0 if self.holding else READ) | (WRITE if client.out else 0)
        if events == client.watched:
            return
        if not events:
            self.sel.unregister(client.sock)
        elif not client.watched:
            self.sel.register(client.sock, events, client)
        else:
            self.sel.modify(client.sock, events, client)
        client.watched = events

    def pause(self, client: Client) -> None:
        if client.watched:
            self.sel.unregister(client.sock)
            client.watched = 0

    def close(self, client: Client) -> None:
        self.pause(client)
        self.clients.pop(client.sock.fileno(), None)
        client.sock.close()


def make() -> PubSub:
    """The factory (`app: "pubsub:make"`): one server per worker, made after the fork."""
    return PubSub()


def main() -> int:
    """Run as an exec'd worker (`workers.command`)."""
    return make().serve()


if __name__ == "__main__":
    raise SystemExit(main())
