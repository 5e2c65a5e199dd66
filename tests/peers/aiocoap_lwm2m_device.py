#!/usr/bin/env python3
"""A simulated LwM2M device on aiocoap 0.4.17 (a CoAP stack nobody here wrote).

The Rust end-to-end tests use it to check that connectord's CoAP *client* side (requests
the daemon sends to devices) interoperates with a foreign stack.

Usage:
  aiocoap_lwm2m_device.py --server HOST:PORT --ep NAME [--lifetime 300]
      [--binding U|UQ] [--domain D] [--notify-interval 0.2] [--slow-delay 3]
      [--lwm2m VERSION] [--bind 127.0.0.1] [--tls CA,CERT,KEY] [--verbose]

One aiocoap server context (UDP only) is bound to BIND on an ephemeral port; the
registration, updates and the de-registration are sent from that same socket, so the
daemon's requests (sent to the registration's source address) reach the site below.

--tls CA,CERT,KEY: CoAP over TLS instead (RFC 8323, `coaps+tcp://HOST:PORT`), through
aiocoap's TLS client transport only: the device's client certificate and key, and the CA
that must have signed the server's certificate. The daemon's requests come back over the
device's own connection, to the same site. aiocoap 0.4.17's credentials map can name a
CA for `coaps+tcp` (`tlscert`: a `cafile`) but no client certificate, so the script
replaces the map's `ssl_client_context` with an ssl context of its own (CA and client
certificate loaded). "port" in the "registered" line is then null.

Two modes:

Default (no --lwm2m): an mbed Client style device. It registers with lwm2m=1.0 and
  </>;rt="oma.lwm2m",</1/0>,</3/0>,</3303/0/5700>;obs;ct=0,</5/0>,</9/0>
and answers in text/plain (ct 0) whatever the Accept option says:
  GET     /3/0/0          2.05 "connectord-test"
  GET     /3/0/1          2.05 "sim-1"
  GET     /3/0            2.05 "connectord-test;sim-1"
  GET|PUT /1/0/1          lifetime: GET -> text; PUT integer text -> 2.04, else 4.00
  POST    /3/0/4          reboot (execute) -> 2.04
  GET     /3303/0/5700    observable, "21.5" ct 0 Max-Age 30; while observed, +0.5 every
                          --notify-interval seconds, each change notified
  GET     /5/0/1          3000 bytes (b"0123456789" * 300), ct 42; Block2 by aiocoap
  GET     /5/0/2          observable, 3000 bytes (b"%04d-" % round + b"x" * 2995), ct 42;
                          stdin "notify-big" counts round up and notifies (in blocks)
  PUT     /5/0/0          large write; Block1 is reassembled by aiocoap -> 2.04
  GET     /9/0/slow       "slow-ok" after --slow-delay s (empty ACK, separate response)
  DELETE  /9/0            2.02
  anything else           aiocoap's 4.04 (or 4.05 for a known path, other method)

--lwm2m VERSION (e.g. 1.1): a real LwM2M client. It registers with lwm2m=VERSION and
links without any obs:
  </>;rt="oma.lwm2m";ct="11542 110",</1/0>,</3/0>,</3303/0>
and answers reads in the format the request's Accept option asks for: LwM2M TLV (ct
11542, OMA-TS-LightweightM2M-V1_0 6.4.3, encoded here by hand) without Accept, as real
clients do even for a single resource; SenML JSON (110) on request; text/plain (0) on
request for a single resource only; any other Accept -> 4.06 (so text/plain for an
instance is 4.06). An instance's TLV is its resources' TLVs (no instance wrapper).
  /1/0            0 short server id 1 (integer), 1 lifetime (integer)
  GET|PUT /1/0/1  lifetime; PUT integer text -> 2.04, else 4.00
  /3/0            0 "connectord-test", 1 "sim-1" (strings), 13 current time (integer,
                  always 1700000000 so that reads are reproducible)
  POST    /3/0/4  reboot (execute) -> 2.04
  /3303/0         5700 temperature (float, 21.5 at start; 4-byte TLV float when exact),
                  5701 "Cel"
  Every /o/i and /o/i/r above answers GET. /3303/0 and /3303/0/5700 are observable
  (notifications in the format of the observe request; the timer of the default mode
  changes the temperature while either is observed); an observe with an Accept the
  resource cannot do is answered 4.06 without Observe. Everything else answers an
  observe request without the Observe option (aiocoap's plain Resource), i.e. refuses
  to be observed: /3/0/13 is the one the tests use. Objects 5 and 9 are absent.

Stdout: one JSON object per line, flushed at once:
  {"event": "registered", "location": "rd/<id>", "port": <local UDP port>}
  {"event": "request", "method": "PUT", "path": "/1/0/1", "payload_len": 2,
   "payload": "60", "ct": 0}
      "payload" only when <= 200 bytes and valid UTF-8; "sha256" (hex) only when the
      payload is > 200 bytes; "ct" is null without Content-Format; "query" (list of
      strings) only when the request has Uri-Query; "observe" (int) only when it has
      Observe; "accept" (int) only when it has Accept. One line per request as
      rendered: a Block1 upload is one line (the reassembled payload), a Block2
      download is one line (later blocks come from aiocoap's cache), an unknown path is
      reported too (then answered 4.04). Notifications are not requests: no line.
  {"event": "observers", "path": "/3303/0/5700", "count": N}   (count changed; in the
      LwM2M mode also for "/3303/0")
  {"event": "notified", "path": "/3303/0/5700", "value": "22.0", "observers": N}
      (only for the stdin command "notify"; timer ticks print nothing; N counts the
      observers of /3303/0/5700 only)
  {"event": "updated", "code": "2.04"}          (the code the server answered)
  {"event": "deregistered", "code": "2.02"}
  {"event": "error", "message": "..."}

Stdin commands, one per line: update | update-lt N | notify | notify-big | deregister |
quit.
EOF on stdin = deregister and exit. Exit 0 after deregister/quit; exit 1 when the
registration fails (unreachable, refused, or no answer within 20 s) or the
de-registration cannot be sent.
"""

import argparse
import asyncio
import hashlib
import json
import logging
import ssl
import struct
import sys
import threading

from aiocoap import Context, Message
from aiocoap import resource
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat

REQUEST_TIMEOUT = 20.0
LINKS = b'</>;rt="oma.lwm2m",</1/0>,</3/0>,</3303/0/5700>;obs;ct=0,</5/0>,</9/0>'
LWM2M_LINKS = b'</>;rt="oma.lwm2m";ct="11542 110",</1/0>,</3/0>,</3303/0>'
BIG = b"0123456789" * 300
TEXT = ContentFormat.TEXT
OCTETS = ContentFormat.OCTETSTREAM
TLV = 11542
SENML_JSON = 110
CURRENT_TIME = 1700000000


def emit(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def report(request, path):
    payload = request.payload
    ct = request.opt.content_format
    ev = {
        "event": "request",
        "method": str(request.code),
        "path": path,
        "payload_len": len(payload),
    }
    if len(payload) <= 200:
        try:
            ev["payload"] = payload.decode("utf-8")
        except UnicodeDecodeError:
            pass
    else:
        ev["sha256"] = hashlib.sha256(payload).hexdigest()
    ev["ct"] = None if ct is None else int(ct)
    if request.opt.uri_query:
        ev["query"] = list(request.opt.uri_query)
    if request.opt.observe is not None:
        ev["observe"] = request.opt.observe
    if request.opt.accept is not None:
        ev["accept"] = int(request.opt.accept)
    emit(**ev)


def text(value, code=None, **kw):
    return Message(code=code, payload=value.encode(), content_format=TEXT, **kw)


class Reported:
    """Mixin: report every rendered request (the Site strips the path, so keep ours)."""

    path = "?"

    async def render(self, request):
        report(request, self.path)
        return await super().render(request)


class Fixed(Reported, resource.Resource):
    def __init__(self, value):
        super().__init__()
        self.value = value

    async def render_get(self, request):
        return text(self.value)


class Lifetime(Reported, resource.Resource):
    def __init__(self, lifetime):
        super().__init__()
        self.lifetime = lifetime

    async def render_get(self, request):
        return text(str(self.lifetime))

    async def render_put(self, request):
        try:
            self.lifetime = int(request.payload.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return text(
                "lifetime must be an integer, got %r"
                % request.payload[:50].decode("utf-8", "replace"),
                code=Code.BAD_REQUEST,
            )
        return Message(code=Code.CHANGED)


class Execute(Reported, resource.Resource):
    async def render_post(self, request):
        return Message(code=Code.CHANGED)


class Ticker:
    """Calls `change` every `interval` seconds while something observes."""

    def __init__(self, interval, change):
        self.interval = interval
        self._change = change
        self._task = None

    def run_while(self, observed):
        if observed and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._tick())
        elif not observed and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _tick(self):
        while True:
            await asyncio.sleep(self.interval)
            self._change()


class Temperature(Reported, resource.ObservableResource):
    def __init__(self, interval):
        super().__init__()
        self.value = 21.5
        self.ticker = Ticker(interval, self.change)

    def current(self):
        # The code must be set: a response given to trigger() skips Resource.render().
        return text("%.1f" % self.value, code=Code.CONTENT, max_age=30)

    async def render_get(self, request):
        return self.current()

    def change(self):
        """Change the value and notify every observer (without a re-render, so
        notifications are not reported as requests)."""
        self.value += 0.5
        for obs in list(self._observations):
            obs.trigger(self.current())

    def observers(self):
        return len(self._observations)

    def update_observation_count(self, count):
        emit(event="observers", path=self.path, count=count)
        self.ticker.run_while(count)


class BigRead(Reported, resource.Resource):
    async def render_get(self, request):
        return Message(payload=BIG, content_format=OCTETS)


class BigObserved(Reported, resource.ObservableResource):
    """3000 bytes that change on the stdin command "notify-big": the observe's answer and
    every notification are its first block of 1024 bytes (Block2, more to follow), and
    aiocoap serves the rest to the client's GETs."""

    def __init__(self):
        super().__init__()
        self.round = 0

    def current(self):
        body = (b"%04d-" % self.round) + b"x" * 2995
        return Message(code=Code.CONTENT, payload=body, content_format=OCTETS)

    def first_block(self):
        # aiocoap 0.4.17 sends an observe's answer and its notifications whole (one
        # 3000-byte datagram); a constrained device sends the first block (RFC 7959
        # §2.6), which this does with aiocoap's own block slicing.
        return self.current()._extract_block(0, 6, 1024)

    async def render_get(self, request):
        # A plain GET (the client's fetch of the rest, with Block2) is sliced by aiocoap.
        if request.opt.observe is not None:
            return self.first_block()
        return self.current()

    def change(self):
        self.round += 1
        for obs in list(self._observations):
            obs.trigger(self.first_block())


class BigWrite(Reported, resource.Resource):
    # Resource.needs_blockwise_assembly() is True: aiocoap answers 2.31 Continue to
    # each non-final Block1 and renders once with the reassembled payload.
    async def render_put(self, request):
        return Message(code=Code.CHANGED)


class Slow(Reported, resource.Resource):
    def __init__(self, delay):
        super().__init__()
        self.delay = delay

    async def render_get(self, request):
        await asyncio.sleep(self.delay)
        return text("slow-ok")


class Deletable(Reported, resource.Resource):
    async def render_delete(self, request):
        return Message(code=Code.DELETED)


# --- LwM2M mode -----------------------------------------------------------------------


def tlv(ident, value):
    """One TLV entry of type "resource with value" (OMA-TS-LightweightM2M-V1_0 6.4.3):
    type byte bits 7-6 = 11, bit 5 = 16-bit identifier, bits 4-3 = size of the length
    field (0 = the length is in bits 2-0), then identifier, length, value."""
    head = 0b11 << 6
    if ident > 0xFF:
        head |= 0x20
        idb = ident.to_bytes(2, "big")
    else:
        idb = ident.to_bytes(1, "big")
    n = len(value)
    if n < 8:
        head |= n
        lenb = b""
    elif n <= 0xFF:
        head |= 0x08
        lenb = n.to_bytes(1, "big")
    elif n <= 0xFFFF:
        head |= 0x10
        lenb = n.to_bytes(2, "big")
    else:
        head |= 0x18
        lenb = n.to_bytes(3, "big")
    return bytes([head]) + idb + lenb + value


def tlv_value(v):
    """A value's TLV bytes: integers in the fewest of 1, 2, 4, 8 bytes (two's
    complement), floats in 4 bytes when exact else 8, strings UTF-8."""
    if isinstance(v, bool):
        return b"\x01" if v else b"\x00"
    if isinstance(v, int):
        for size in (1, 2, 4, 8):
            if -(1 << (8 * size - 1)) <= v < (1 << (8 * size - 1)):
                return v.to_bytes(size, "big", signed=True)
        raise ValueError("integer too large: %d" % v)
    if isinstance(v, float):
        single = struct.pack(">f", v)
        return single if struct.unpack(">f", single)[0] == v else struct.pack(">d", v)
    return str(v).encode("utf-8")


def text_value(v):
    if isinstance(v, bool):
        return "1" if v else "0"
    return repr(v) if isinstance(v, float) else str(v)


def senml_record(v):
    if isinstance(v, bool):
        return {"vb": v}
    if isinstance(v, (int, float)):
        return {"v": v}
    return {"vs": str(v)}


class Lwm2mModel:
    """The LwM2M mode's object instances: resource values by instance path and id."""

    def __init__(self, lifetime):
        self.temperature = 21.5
        self.lifetime = lifetime
        self.instances = {
            "/1/0": {0: lambda: 1, 1: lambda: self.lifetime},
            "/3/0": {
                0: lambda: "connectord-test",
                1: lambda: "sim-1",
                13: lambda: CURRENT_TIME,
            },
            "/3303/0": {5700: lambda: self.temperature, 5701: lambda: "Cel"},
        }

    def paths(self):
        """Every instance and resource path served."""
        for inst, resources in self.instances.items():
            yield inst
            for rid in resources:
                yield "%s/%d" % (inst, rid)

    def render(self, path, accept):
        """The 2.05 answer to a read of `path` (an instance or a resource) in the format
        `accept` asks for (TLV when None), or 4.06 for a format it cannot do."""
        parts = path.strip("/").split("/")
        single = len(parts) == 3
        inst = "/" + "/".join(parts[:2])
        resources = self.instances[inst]
        values = (
            [(int(parts[2]), resources[int(parts[2])]())]
            if single
            else [(rid, get()) for rid, get in resources.items()]
        )
        fmt = TLV if accept is None else int(accept)
        if fmt == TLV:
            payload = b"".join(tlv(rid, tlv_value(v)) for rid, v in values)
        elif fmt == SENML_JSON:
            if single:
                records = [dict(bn=path, **senml_record(values[0][1]))]
            else:
                records = [dict(n=str(rid), **senml_record(v)) for rid, v in values]
                records[0] = dict(bn=inst + "/", **records[0])
            payload = json.dumps(records, separators=(",", ":")).encode()
        elif fmt == int(TEXT) and single:
            payload = text_value(values[0][1]).encode()
        else:
            return Message(code=Code.NOT_ACCEPTABLE)
        return Message(code=Code.CONTENT, payload=payload, content_format=fmt)


class Lwm2mRead:
    """Mixin: GET answers from the model in the format the Accept option asks for."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    async def render_get(self, request):
        return self.model.render(self.path, request.opt.accept)


class Lwm2mNode(Lwm2mRead, Reported, resource.Resource):
    """An instance or resource that is not observable: aiocoap answers an observe
    request without the Observe option."""


class Lwm2mLifetime(Lwm2mNode):
    async def render_put(self, request):
        try:
            self.model.lifetime = int(request.payload.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return text("lifetime must be an integer", code=Code.BAD_REQUEST)
        return Message(code=Code.CHANGED)


class Lwm2mObservable(Lwm2mRead, Reported, resource.ObservableResource):
    """An observable instance or resource: each observation is notified in the format
    its observe request asked for."""

    def __init__(self, model, on_count):
        super().__init__(model)
        self.formats = {}
        self.on_count = on_count

    async def add_observation(self, request, serverobservation):
        # A format it cannot do: not accepted, so the 4.06 goes out without Observe.
        if self.model.render(self.path, request.opt.accept).code.is_successful():
            self.formats[serverobservation] = request.opt.accept
            await super().add_observation(request, serverobservation)

    def notify(self):
        for obs in list(self._observations):
            obs.trigger(self.model.render(self.path, self.formats.get(obs)))

    def update_observation_count(self, count):
        live = self._observations
        self.formats = {o: f for o, f in self.formats.items() if o in live}
        emit(event="observers", path=self.path, count=count)
        self.on_count()


class Lwm2mSensor:
    """The LwM2M mode's temperature: changed by the timer while /3303/0/5700 or
    /3303/0 is observed, or by the stdin command; each change notified to both."""

    path = "/3303/0/5700"

    def __init__(self, model, interval):
        self.model = model
        self.nodes = []
        self.ticker = Ticker(interval, self.change)

    @property
    def value(self):
        return self.model.temperature

    def observers(self):
        return sum(len(n._observations) for n in self.nodes if n.path == self.path)

    def change(self):
        self.model.temperature += 0.5
        for node in self.nodes:
            node.notify()

    def count_changed(self):
        self.ticker.run_while(sum(len(n._observations) for n in self.nodes))


def build_lwm2m_site(args, lifetime):
    site = DeviceSite()
    model = Lwm2mModel(lifetime)
    sensor = Lwm2mSensor(model, args.notify_interval)
    resources = {}
    for path in model.paths():
        if path in ("/3303/0/5700", "/3303/0"):
            node = Lwm2mObservable(model, sensor.count_changed)
            sensor.nodes.append(node)
        elif path == "/1/0/1":
            node = Lwm2mLifetime(model)
        else:
            node = Lwm2mNode(model)
        resources[path] = node
    resources["/3/0/4"] = Execute()
    for path, res in resources.items():
        res.path = path
        site.add_resource(path.strip("/").split("/"), res)
    return site, sensor


# --- both modes ----------------------------------------------------------------------


class DeviceSite(resource.Site):
    """A Site that also reports requests to paths it does not serve (then 4.04)."""

    async def render_to_pipe(self, pipe):
        req = pipe.request
        try:
            self._find_child_and_pathstripped_message(req)
        except KeyError:
            report(req, "/" + "/".join(req.opt.uri_path))
        return await super().render_to_pipe(pipe)


def build_site(args, lifetime):
    site = DeviceSite()
    temperature = Temperature(args.notify_interval)
    big_observed = BigObserved()
    resources = {
        "/3/0/0": Fixed("connectord-test"),
        "/3/0/1": Fixed("sim-1"),
        "/3/0": Fixed("connectord-test;sim-1"),
        "/1/0/1": Lifetime(lifetime),
        "/3/0/4": Execute(),
        "/3303/0/5700": temperature,
        "/5/0/1": BigRead(),
        "/5/0/2": big_observed,
        "/5/0/0": BigWrite(),
        "/9/0/slow": Slow(args.slow_delay),
        "/9/0": Deletable(),
    }
    for path, res in resources.items():
        res.path = path
        site.add_resource(path.strip("/").split("/"), res)
    site.big_observed = big_observed
    return site, temperature


def local_port(ctx):
    for ri in ctx.request_interfaces:
        mi = getattr(getattr(ri, "token_interface", None), "message_interface", None)
        transport = getattr(mi, "transport", None)
        if transport is not None:
            return transport.get_extra_info("socket").getsockname()[1]
    raise RuntimeError("no UDP transport in the context")


def split_hostport(s):
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % s)
    host = host.strip("[]")
    return ("[%s]" % host if ":" in host else host), int(port)


class Device:
    def __init__(self, ctx, args):
        self.ctx = ctx
        self.base = ("coaps+tcp://%s:%d" if args.tls else "coap://%s:%d") % args.server
        self.args = args
        self.location = None

    async def request(self, code, path, query=(), payload=b"", ct=None):
        msg = Message(code=code, uri=self.base + "/" + "/".join(path), payload=payload)
        if query:
            msg.opt.uri_query = tuple(query)
        if ct is not None:
            msg.opt.content_format = ct
        return await asyncio.wait_for(self.ctx.request(msg).response, REQUEST_TIMEOUT)

    async def register(self):
        a = self.args
        version = a.lwm2m or "1.0"
        query = ["ep=" + a.ep, "lt=%d" % a.lifetime, "lwm2m=" + version]
        query.append("b=" + a.binding)
        if a.domain is not None:
            query.append("d=" + a.domain)
        links = LWM2M_LINKS if a.lwm2m else LINKS
        resp = await self.request(
            Code.POST, ["rd"], query, links, ContentFormat.LINKFORMAT
        )
        if resp.code != Code.CREATED or not resp.opt.location_path:
            raise RuntimeError(
                "registration refused: %s %r" % (resp.code.dotted, resp.payload[:200])
            )
        self.location = list(resp.opt.location_path)
        return "/".join(self.location)

    async def update(self, lifetime=None):
        query = [] if lifetime is None else ["lt=%d" % lifetime]
        resp = await self.request(Code.POST, self.location, query)
        emit(event="updated", code=resp.code.dotted)

    async def deregister(self):
        resp = await self.request(Code.DELETE, self.location)
        emit(event="deregistered", code=resp.code.dotted)


def stdin_lines(loop):
    """Lines of stdin in a queue (None = EOF), read by a daemon thread so that any kind
    of stdin (pipe, file, /dev/null, tty) works and exit never waits for it."""
    queue = asyncio.Queue()

    def reader():
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=reader, name="stdin", daemon=True).start()
    return queue


def describe(exc):
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer within %d s" % REQUEST_TIMEOUT
    msg = "%s: %s" % (type(exc).__name__, exc) if str(exc) else type(exc).__name__
    if exc.__cause__ is not None:
        msg += " (%s)" % describe(exc.__cause__)
    return msg


async def run(args):
    build = build_lwm2m_site if args.lwm2m else build_site
    site, temperature = build(args, args.lifetime)
    try:
        ctx = await Context.create_server_context(
            site,
            bind=(args.bind, 0),
            transports=["tlsclient"] if args.tls else ["udp6"],
        )
    except Exception as e:
        emit(event="error", message="cannot bind %s: %s" % (args.bind, describe(e)))
        return 1
    if args.tls:
        ca, cert, key = args.tls.split(",")
        tls = ssl.create_default_context(cafile=ca)
        tls.load_cert_chain(cert, key)
        ctx.client_credentials.ssl_client_context = lambda scheme, hostinfo: tls
    device = Device(ctx, args)
    try:
        try:
            location = await device.register()
        except Exception as e:
            emit(event="error", message="registration failed: " + describe(e))
            return 1
        port = None if args.tls else local_port(ctx)
        emit(event="registered", location=location, port=port)

        lines = stdin_lines(asyncio.get_running_loop())
        while True:
            line = await lines.get()
            words = ["deregister"] if line is None else line.split()
            if not words:
                continue
            cmd, rest = words[0], words[1:]
            try:
                if cmd == "update" and not rest:
                    await device.update()
                elif cmd == "update-lt" and len(rest) == 1 and rest[0].isdigit():
                    await device.update(int(rest[0]))
                elif cmd == "notify" and not rest:
                    temperature.change()
                    emit(
                        event="notified",
                        path=temperature.path,
                        value="%.1f" % temperature.value,
                        observers=temperature.observers(),
                    )
                elif cmd == "notify-big" and not rest:
                    site.big_observed.change()
                    emit(event="notified", path="/5/0/2", round=site.big_observed.round)
                elif cmd == "deregister" and not rest:
                    try:
                        await device.deregister()
                    except Exception as e:
                        emit(event="error", message="deregister failed: " + describe(e))
                        return 1
                    return 0
                elif cmd == "quit" and not rest:
                    return 0
                else:
                    emit(event="error", message="unknown command: %r" % line.strip())
            except Exception as e:
                emit(event="error", message="%s failed: %s" % (cmd, describe(e)))
    finally:
        await ctx.shutdown()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, type=split_hostport, help="HOST:PORT")
    p.add_argument("--ep", required=True, help="endpoint name")
    p.add_argument("--lifetime", type=int, default=300)
    p.add_argument("--binding", default="U", choices=["U", "UQ"])
    p.add_argument("--domain", default=None)
    p.add_argument("--notify-interval", type=float, default=0.2)
    p.add_argument("--slow-delay", type=float, default=3.0)
    p.add_argument(
        "--lwm2m",
        default=None,
        metavar="VERSION",
        help="behave as an LwM2M client of this version (no obs, TLV/SenML, Accept)",
    )
    p.add_argument("--bind", default="127.0.0.1", help="local address (port is ephemeral)")
    p.add_argument(
        "--tls",
        default=None,
        metavar="CA,CERT,KEY",
        help="CoAP over TLS (coaps+tcp) with this CA and client certificate and key",
    )
    p.add_argument("--verbose", action="store_true", help="aiocoap debug log on stderr")
    args = p.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        code = asyncio.run(run(args))
    except Exception as e:
        emit(event="error", message="unexpected failure: " + describe(e))
        raise SystemExit(1) from e
    sys.exit(code)


if __name__ == "__main__":
    main()
