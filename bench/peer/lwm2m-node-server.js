#!/usr/bin/env node
// A peer LwM2M server for `connectord-bench --peer`: lwm2m-node-lib's server with its
// in-memory registry, on 127.0.0.1 only.
//
//   node lwm2m-node-server.js [--port N] [--host 127.0.0.1]
//
// stdout carries only JSON lines for the bench:
//   {"ready":true,"address":"127.0.0.1","port":N,"version":"1.4.0"}   once listening
//   {"stats":{...}}                                                     for each "stats" line on stdin
// lwm2m-node-lib's own log (logops) goes to stderr. The process exits when stdin closes,
// so it never outlives the bench.

'use strict';

const path = require('path');

function arg(name, dflt) {
    const i = process.argv.indexOf(name);
    return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}

const host = arg('--host', '127.0.0.1');
const port = Number(arg('--port', '0'));
if (!/^127\./.test(host)) {
    console.error('refusing to listen on ' + host + ': loopback (127.x.y.z) only');
    process.exit(2);
}

const libDir = path.dirname(require.resolve('lwm2m-node-lib/package.json'));
const version = require('lwm2m-node-lib/package.json').version;

// lwm2m-node-lib's CoAP router calls server.listen(port) without an address, i.e. on every
// interface. Patch the coap module it uses (the same instance: resolved from its own
// directory) so that every server it creates binds to `host`.
const coap = require(require.resolve('coap', { paths: [libDir] }));
const createServer = coap.createServer;
coap.createServer = function () {
    const server = createServer.apply(this, arguments);
    const listen = server.listen;
    server.listen = function (p, address, done) {
        if (typeof address === 'function') {
            done = address;
        }
        return listen.call(this, p, host, done);
    };
    return server;
};

const logger = require('logops');
logger.setStream(process.stderr);

const lwm2m = require('lwm2m-node-lib');
const server = lwm2m.server;

const stats = {
    datagrams: 0, // every datagram received (first transmissions, retransmissions, ACKs)
    registrations: 0, // registration handler calls (the library stored the device first)
    updates: 0,
    unregistrations: 0,
};

// The handlers are optional (the library's default handler just calls back), but a
// server application sets them; these accept everything and count.
function lastCallback(args) {
    for (let i = args.length - 1; i >= 0; i--) {
        if (typeof args[i] === 'function') {
            return args[i];
        }
    }
    return function () {};
}

const config = {
    port: port,
    // The library's default is setInterval(check, undefined), i.e. every ~1 ms over the
    // whole registry; its example config uses 1000 ms.
    lifetimeCheckInterval: 1000,
    udpWindow: 100,
    defaultType: 'Device', // without it every registration on /rd is refused (TypeNotFound)
    types: [],
    logLevel: 'ERROR',
    ipProtocol: 'udp4',
    serverProtocol: 'udp4',
    deviceRegistry: { type: 'memory' },
    formats: [
        { name: 'application-vnd-oma-lwm2m/text', value: 1541 },
        { name: 'application-vnd-oma-lwm2m/tlv', value: 1542 },
        { name: 'application-vnd-oma-lwm2m/json', value: 1543 },
        { name: 'application-vnd-oma-lwm2m/opaque', value: 1544 },
    ],
    writeFormat: 'application-vnd-oma-lwm2m/text',
    defaultAcceptFormat: 'text/plain',
};

server.start(config, function (error, serverInfo) {
    if (error) {
        console.error('lwm2m-node-lib server did not start: ' + error);
        process.exit(1);
    }
    server.setHandler(serverInfo, 'registration', function () {
        stats.registrations++;
        lastCallback(arguments)();
    });
    server.setHandler(serverInfo, 'updateRegistration', function () {
        stats.updates++;
        lastCallback(arguments)();
    });
    const onUnregistration = function () {
        stats.unregistrations++;
        lastCallback(arguments)();
    };
    server.setHandler(serverInfo, 'unregistration', onUnregistration);
    // setHandler('unregistration') restarts the lifetime check with
    // `commonConfig.lifetimeCheckInterval`, a property that does not exist (undefined):
    // setInterval(check, undefined) scans the whole registry every ~1 ms. Restart it with
    // the configured interval.
    server.getRegistry().checkLifetime(config.lifetimeCheckInterval, onUnregistration);
    const sock = serverInfo.server._sock;
    sock.on('message', function () {
        stats.datagrams++;
    });
    const a = sock.address();
    process.stdout.write(
        JSON.stringify({ ready: true, address: a.address, port: a.port, version: version }) + '\n'
    );

    let buf = '';
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', function (chunk) {
        buf += chunk;
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
            const line = buf.slice(0, nl).trim();
            buf = buf.slice(nl + 1);
            if (line === 'stats') {
                server.getRegistry().list(function (err, devices) {
                    const out = Object.assign({}, stats, {
                        devices: err ? null : devices.length,
                    });
                    process.stdout.write(JSON.stringify({ stats: out }) + '\n');
                });
            }
        }
    });
    process.stdin.on('end', function () {
        process.exit(0);
    });
});
