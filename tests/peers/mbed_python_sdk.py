#!/usr/bin/env python3
"""Drives connectord with the official mbed Device Connector Python SDK
(PyPI `mbed-connector-api` 1.0.4, `mbed_connector_api.connector`), a REST client
nobody here wrote.

The SDK is Python 2 code: its package imports its own modules by their bare names
(`from connectorError import ...`), so its folder is put on sys.path first. Only its
synchronous calls are used (its long-poll thread calls `Thread.isAlive`, gone since
Python 3.9, and hands bytes where it checks for str).

Usage: mbed_python_sdk.py BASE_URL ACCESS_KEY ENDPOINT
Prints one JSON object: what each call returned.
"""

import importlib.util
import json
import os
import sys

spec = importlib.util.find_spec("mbed_connector_api")
sys.path.insert(0, os.path.dirname(spec.origin))
from mbed_connector_api import connector  # noqa: E402


def outcome(result):
    return {
        "status": result.status_code,
        "error": bool(result.error),
        "done": bool(result.is_done),
    }


def main():
    base, key, ep = sys.argv[1:4]
    c = connector(key, webAddress=base)
    out = {}
    eps = c.getEndpoints()
    out["endpoints"] = {"status": eps.status_code, "error": bool(eps.error), "names": [e["name"] for e in (eps.result or [])]}
    res = c.getResources(ep)
    out["resources"] = {"status": res.status_code, "error": bool(res.error), "uris": [r["uri"] for r in (res.result or [])]}
    out["delete"] = outcome(c.deleteEndpoint(ep))
    out["delete_again"] = outcome(c.deleteEndpoint(ep))
    gone = c.getResources(ep)
    out["resources_after"] = {"status": gone.status_code, "error": bool(gone.error)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
