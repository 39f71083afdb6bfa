// A Node.js HTTP server under upgraderd, in plain Node (no packages).
//
//   node node_server.js FD PROBE_PORT
//
// FD is the listening socket upgraderd passes (node.yaml gives `{fd:web}`, i.e. 3):
// Node serves an inherited socket with listen({fd}). PROBE_PORT (`{probe_port}`) is a
// port on 127.0.0.1 reserved for this worker alone: once the main server listens, a
// tiny health server answers 200 there, and upgraderd's `ready.mode: http` probe
// marks the worker ready. (Node's core has no unix datagram socket, so it cannot
// send sd_notify's READY=1 without a package.)
//
// Drain: on SIGTERM the server stops accepting, finishes the requests in flight,
// closes idle keep-alive connections, and the process exits. SIGINT: exit at once.
'use strict';
const http = require('http');

const fd = Number(process.argv[2] || 3);
const probePort = Number(process.argv[3] || process.env.UPGRADERD_PROBE_PORT);
const generation = process.env.UPGRADERD_GENERATION || '?';
const slot = process.env.UPGRADERD_SLOT || '?';
const version = process.env.APP_VERSION || '1';

const server = http.createServer((req, res) => {
  const body = `generation=${generation} slot=${slot} pid=${process.pid} server=node version=${version}\n`;
  res.writeHead(200, {'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body)});
  res.end(body);
});

const health = http.createServer((req, res) => {
  res.writeHead(200, {'Content-Type': 'text/plain'});
  res.end('ok\n');
});

// Install the drain handler before saying ready: upgraderd may drain this worker as
// soon as a successor is ready, and SIGTERM's default action would kill it outright.
process.on('SIGTERM', () => {
  health.close();
  server.close(() => process.exit(0));  // Node >= 19 also closes idle keep-alive connections
});
process.on('SIGINT', () => process.exit(0));

server.listen({fd}, () => {
  health.listen(probePort, '127.0.0.1');
});
