"""Many registrations at once by aiocoap's own resource-directory client.

aiocoap's `Registerer` (aiocoap.resourcedirectory.client.register) is a CoAP stack and an
RD client nobody here wrote. On a 5.03 Service Unavailable carrying Max-Age it waits
max(Max-Age, 2^n) seconds and sends the registration again as a new request, at most 7
times (then it gives up: the registerer's state becomes "failed"). This script starts
COUNT of them at once, one endpoint each, from one aiocoap context, and reports:

    {"registered": N, "failed": N, "waiting": N, "retried": N}

where "retried" counts the times a registerer was told to retry later (aiocoap logs "RD
asked to retry the operation later" for each 5.03 with Max-Age). The registrations are
left in place (the registerers are cancelled, not shut down, so no de-registration).

Usage: aiocoap_rd_storm.py HOST PORT COUNT PREFIX TIMEOUT_S
"""

import asyncio
import json
import logging
import sys

from aiocoap import Context, resource
from aiocoap.resourcedirectory.client.register import Registerer


class Retries(logging.Handler):
    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        if "retry the operation later" in record.getMessage():
            self.count += 1


class Value(resource.Resource):
    async def render_get(self, request):
        from aiocoap import Message

        return Message(payload=b"21.5")


async def main(host, port, count, prefix, timeout):
    retries = Retries()
    log = logging.getLogger("coap-rd-registerer")
    log.setLevel(logging.INFO)
    log.addHandler(retries)
    log.propagate = False

    site = resource.Site()
    site.add_resource(["3", "0"], Value())
    site.add_resource(["3303", "0", "5700"], Value())
    ctx = await Context.create_server_context(site, bind=("127.0.0.1", 0))
    regs = [
        Registerer(
            ctx,
            rd=f"coap://{host}:{port}/rd",
            lt=300,
            registration_parameters={"ep": f"{prefix}{i}"},
        )
        for i in range(count)
    ]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if all(r.state in ("registered", "failed") for r in regs):
            break
        await asyncio.sleep(0.1)
    states = [r.state for r in regs]
    print(
        json.dumps(
            {
                "registered": states.count("registered"),
                "failed": states.count("failed"),
                "waiting": len(states)
                - states.count("registered")
                - states.count("failed"),
                "retried": retries.count,
            }
        ),
        flush=True,
    )
    for r in regs:
        r._task.cancel()
    return 0


if __name__ == "__main__":
    host, port, count, prefix, timeout = sys.argv[1:6]
    sys.exit(asyncio.run(main(host, int(port), int(count), prefix, float(timeout))))
