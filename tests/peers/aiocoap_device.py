"""An LwM2M device registration driven by aiocoap, a CoAP stack nobody here wrote.

Usage: aiocoap_device.py HOST PORT ACTION [ARG]
  register EP       POST /rd?ep=EP&...; prints "<code> <location-path>"
  update LOCATION   POST /LOCATION?lt=600; prints "<code>"
  deregister LOCATION  DELETE /LOCATION; prints "<code>"
Exits 0 when the exchange completed (whatever the code), 1 on a transport failure.
"""

import asyncio
import sys

from aiocoap import DELETE, POST, Context, Message
from aiocoap.numbers.contentformat import ContentFormat

LINKS = b'</>;rt="oma.lwm2m",</3/0>;obs,</3303/0/5700>;obs;rt="temperature";ct=0'


async def main(host, port, action, arg):
    ctx = await Context.create_client_context()
    base = f"coap://{host}:{port}"
    try:
        if action == "register":
            msg = Message(
                code=POST,
                uri=f"{base}/rd?ep={arg}&lt=300&lwm2m=1.0&b=U&et=aiocoap-sensor",
                payload=LINKS,
            )
            msg.opt.content_format = ContentFormat.LINKFORMAT
            resp = await asyncio.wait_for(ctx.request(msg).response, 20)
            print(resp.code.dotted, "/".join(resp.opt.location_path))
        elif action == "update":
            msg = Message(code=POST, uri=f"{base}/{arg}?lt=600")
            resp = await asyncio.wait_for(ctx.request(msg).response, 20)
            print(resp.code.dotted)
        elif action == "deregister":
            msg = Message(code=DELETE, uri=f"{base}/{arg}")
            resp = await asyncio.wait_for(ctx.request(msg).response, 20)
            print(resp.code.dotted)
        else:
            print(f"unknown action {action}", file=sys.stderr)
            return 2
    finally:
        await ctx.shutdown()
    return 0


if __name__ == "__main__":
    host, port, action = sys.argv[1], sys.argv[2], sys.argv[3]
    arg = sys.argv[4] if len(sys.argv) > 4 else ""
    sys.exit(asyncio.run(main(host, port, action, arg)))
