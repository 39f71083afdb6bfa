// A Node.js HTTP server under upgraderd, in plain Node (no packages).
//
//   node node_server.js FD PROBE_PORT [IDLE_GRACE_MS]
//
// FD is the listening socket upgraderd passes (node.yaml gives `{fd:web}`, i.e. 3):
// Node serves an inherited socket with listen({fd}). PROBE_PORT (`{probe_port}`) is a
// port on 127.0.0.1 reserved for this worker alone: once the main server listens, a
// tiny health server answers 200 there, and upgraderd's `ready.mode: http` probe
// marks the worker ready. (Node's core has no unix datagram socket, so it cannot
// send sd_notify's READY=1 without a package.)
//
// Drain (SIGTERM), without losing a request:
// - Stop accepting with net.Server's close(). http.Server's own close() also calls
//   closeIdleConnections() (Node >= 19), which closes keep-alive connections on
//   which a client may be sending its next request right now: each one is lost.
// - From then on every response says `Connection: close`, so each keep-alive client
//   is told to reconnect (to the next generation) with its next answer, and Node
//   closes the connection once that answer is sent.
// - A connection is closed by this file only when no request is in progress on it
//   and it has read nothing for IDLE_GRACE_MS (default 1000).
// - The process exits once every connection is closed. SIGINT: exit at once.
'use strict';
const http = require('http');
const net = require('net');

const fd = Number(process.argv[2] || 3);
const probePort = Number(process.argv[3] || process.env.UPGRADERD_PROBE_PORT);
const idleGraceMs = Number(process.argv[4] || 1000);
const generation = process.env.UPGRADERD_GENERATION || '?';
const slot = process.env.UPGRADERD_SLOT || '?';
const version = process.env.APP_VERSION || '1';

// Per connection: the responses in progress, and when it last read a byte.
const connections = new Map();
let drainingSince = null;

const server = http.createServer((req, res) => {
  const conn = connections.get(req.socket);
  if (conn) {
    conn.inProgress.add(res);
    res.on('close', () => conn.inProgress.delete(res));
  }
  if (drainingSince !== null) res.setHeader('Connection', 'close');
  const body = `generation=${generation} slot=${slot} pid=${process.pid} server=node version=${version} ` +
               `peer=${req.socket.remotePort} path=${req.url}\n`;
  res.writeHead(200, {'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body)});
  res.end(body);
});

server.on('connection', (socket) => {
  connections.set(socket, {inProgress: new Set(), bytesRead: 0, quietSince: Date.now()});
  socket.on('close', () => connections.delete(socket));
});

const health = http.createServer((req, res) => {
  res.writeHead(200, {'Content-Type': 'text/plain'});
  res.end('ok\n');
});

// Close the connections that are idle and have stayed silent for the grace period.
function closeQuietConnections() {
  const now = Date.now();
  for (const [socket, conn] of connections) {
    if (socket.bytesRead !== conn.bytesRead) {
      conn.bytesRead = socket.bytesRead;  // a request may be arriving: start the grace again
      conn.quietSince = now;
    } else if (conn.inProgress.size === 0 && now - Math.max(conn.quietSince, drainingSince) >= idleGraceMs) {
      socket.destroy();
    }
  }
}

function drain() {
  if (drainingSince !== null) return;
  drainingSince = Date.now();
  for (const conn of connections.values()) {
    for (const res of conn.inProgress) {
      if (!res.headersSent) res.setHeader('Connection', 'close');
    }
  }
  health.close();
  // net.Server's close: stop accepting, call back once every connection is closed.
  net.Server.prototype.close.call(server, () => process.exit(0));
  setInterval(closeQuietConnections, 50);
}

// Install the drain handler before saying ready: upgraderd may drain this worker as
// soon as a successor is ready, and SIGTERM's default action would kill it outright.
process.on('SIGTERM', drain);
process.on('SIGINT', () => process.exit(0));

server.listen({fd}, () => {
  health.listen(probePort, '127.0.0.1');
});
