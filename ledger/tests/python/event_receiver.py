#!/usr/bin/env python3
"""A metering backend's CloudEvents endpoint, for the test of `wattd-ledger events --post`
(ledger/tests/it/python.rs).

  event_receiver.py PORTFILE STATEFILE [--fail-first N] [--delay-ms N]

Listens on 127.0.0.1 (a free port, written to PORTFILE), accepts POSTs in structured mode
(application/cloudevents+json) and batch mode (application/cloudevents-batch+json), parses every
event with the CloudEvents Python SDK (`cloudevents` on PyPI) and checks the attributes the
SDK would otherwise fill in itself (id, source, type, specversion 1.0). It de-duplicates on
(source, id) as OpenMeter does and writes its state to STATEFILE (atomically) after every
request: {"requests", "events_received", "repeats", "unique": {id: event}}. The first N
requests are answered 503 (the exporter must retry); an invalid event is answered 400. Each
answer waits --delay-ms (a slow backend, so that the test can crash the exporter mid-way).
"""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat

state = {"requests": 0, "events_received": 0, "repeats": 0, "unique": {}}
fail_first = 0
delay_s = 0.0


def check(raw):
    """Parses one event with the SDK; returns an error string or None."""
    for attr in ("id", "source", "type", "specversion"):
        if not isinstance(raw.get(attr), str) or not raw[attr]:
            return f"attribute {attr} missing or empty"
    if raw["specversion"] != "1.0":
        return "specversion is not 1.0"
    try:
        ev = from_http(
            HTTPMessage(
                headers={"content-type": "application/cloudevents+json"},
                body=json.dumps(raw).encode(),
            ),
            JSONFormat(),
        )
    except Exception as e:  # the SDK's validation errors
        return f"the CloudEvents SDK refused it: {e}"
    if ev.get_id() != raw["id"] or ev.get_time() is None:
        return "id or time did not survive parsing"
    return None


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, code, text):
        body = text.encode()
        self.send_response(code)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(n)
        time.sleep(delay_s)
        state["requests"] += 1
        if state["requests"] <= fail_first:
            save()
            return self.answer(503, "try again")
        ctype = self.headers.get("content-type", "")
        try:
            doc = json.loads(body)
        except ValueError as e:
            return self.answer(400, f"not JSON: {e}")
        if ctype.startswith("application/cloudevents-batch+json"):
            if not isinstance(doc, list):
                return self.answer(400, "a batch is a JSON array")
            events = doc
        elif ctype.startswith("application/cloudevents+json"):
            events = [doc]
        else:
            return self.answer(415, f"content-type {ctype}")
        for raw in events:
            err = check(raw)
            if err:
                return self.answer(400, err)
        for raw in events:
            state["events_received"] += 1
            key = raw["source"] + " " + raw["id"]
            if key in state["unique"]:
                state["repeats"] += 1
            else:
                state["unique"][key] = raw
        save()
        self.answer(200, "ok")


def save():
    tmp = sys.argv[2] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, sys.argv[2])


def main():
    global fail_first, delay_s
    if "--fail-first" in sys.argv:
        fail_first = int(sys.argv[sys.argv.index("--fail-first") + 1])
    if "--delay-ms" in sys.argv:
        delay_s = int(sys.argv[sys.argv.index("--delay-ms") + 1]) / 1000
    server = HTTPServer(("127.0.0.1", 0), Handler)
    save()
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
