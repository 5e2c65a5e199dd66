"""A WebSocket notification client on Python's `websockets` (a stack nobody here wrote),
driven by tests/it/websocket.rs.

    ws_client.py URL KEY (bearer|apirdkey|subprotocol|none) [MAX_SIZE]

MAX_SIZE: the largest message the client takes, in bytes (websockets' default: 1 MiB);
a larger one closes the connection with 1009.

Prints one JSON object per line on stdout, flushed:
  {"open": true, "subprotocol": ...}   the handshake succeeded
  {"refused": STATUS, "body": ...}     the handshake was answered with another status
  {"frame": {...}}                     a text frame (a notification message)
  {"closed": CODE, "reason": ...}      the connection ended (1006: without a close frame)
A line "close" on stdin closes the socket normally (1000).
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main():
    url, key, how = sys.argv[1], sys.argv[2], sys.argv[3]
    limit = {"max_size": int(sys.argv[4])} if len(sys.argv) > 4 else {}
    headers = {}
    subprotocols = None
    if how == "bearer":
        headers["Authorization"] = "Bearer " + key
    elif how == "apirdkey":
        headers["ApiRdKey"] = key
    elif how == "subprotocol":
        subprotocols = ["wss", "pelion_ak_" + key]
    try:
        ws = await connect(
            url,
            additional_headers=headers,
            subprotocols=subprotocols,
            open_timeout=10,
            ping_interval=None,
            **limit,
        )
    except InvalidStatus as e:
        say({"refused": e.response.status_code, "body": e.response.body.decode("utf-8", "replace")})
        return
    say({"open": True, "subprotocol": ws.subprotocol})

    async def stdin_close():
        loop = asyncio.get_running_loop()
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() == "close":
            await ws.close(1000, "done")

    closer = asyncio.ensure_future(stdin_close())
    try:
        async for message in ws:
            say({"frame": json.loads(message)})
    except ConnectionClosed:
        pass
    rcvd = ws.protocol.close_rcvd
    if rcvd is None:
        say({"closed": 1006, "reason": ""})
    else:
        say({"closed": rcvd.code, "reason": rcvd.reason})
    closer.cancel()


asyncio.run(main())
