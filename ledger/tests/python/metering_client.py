#!/usr/bin/env python3
"""A metering client of the wattd ledger's Query API, written against the .proto alone.

The test (ledger/tests/it/python.rs) generates the Python stubs from proto/wattd/ledger/v1/
query.proto with grpcio-tools into a temporary directory (STUBS), then runs this script as a
separate process, the way a metering pipeline nobody here wrote the wire code for would call
the ledger:

  metering_client.py totals  ADDR CA CERT KEY [--account ID] [--run ID]
      prints {"totals": [...]} (one JSON line), or {"error": CODE, "reason": ..., "message": ...}
  metering_client.py changes ADDR CA CERT KEY --cursor-file F --out F [--max-messages N]
                     [--crash-before-saving-cursor] [--follow-seconds S]
      appends every change to --out (one JSON line each) and saves the cursor after each
      message; with --crash-before-saving-cursor it exits abruptly (os._exit) after writing the
      Nth message's changes but before saving its cursor, as a consumer that crashes between
      applying and committing would: the next run receives that message again.
  metering_client.py intervals ADDR CA CERT KEY --run ID
      prints {"batches": N, "allocations_uj": total} or the error.

Exit status 0, or 3 when the ledger answered with an error status (printed as JSON).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.environ["STUBS"])

import grpc  # noqa: E402
from wattd.ledger.v1 import query_pb2, query_pb2_grpc  # noqa: E402


def channel(args):
    def read(p):
        with open(p, "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca),
        private_key=read(args.key),
        certificate_chain=read(args.cert),
    )
    return grpc.secure_channel(
        args.addr, creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )


def fail(e):
    reason = ""
    for k, v in e.trailing_metadata() or ():
        if k == "wattd-reason":
            reason = v
    print(json.dumps({"error": e.code().name, "reason": reason, "message": e.details()}))
    sys.exit(3)


def totals(args):
    stub = query_pb2_grpc.QueryStub(channel(args))
    try:
        r = stub.RunTotals(
            query_pb2.RunTotalsRequest(run_id=args.run or "", account=args.account or ""),
            timeout=30,
        )
    except grpc.RpcError as e:
        fail(e)
    out = [
        {
            "node_id": t.node_id,
            "run_id": t.run_id,
            "account": t.account,
            "domain": t.domain,
            "energy_uj": t.energy_uj,
            "energy_wh": t.energy_wh,
        }
        for t in r.totals
    ]
    print(json.dumps({"totals": out}))


def changes(args):
    cursor = ""
    if os.path.exists(args.cursor_file):
        with open(args.cursor_file) as f:
            cursor = f.read().strip()
    stub = query_pb2_grpc.QueryStub(channel(args))
    follow = args.follow_seconds > 0
    req = query_pb2.ChangesRequest(cursor=cursor, follow=follow, keepalive_s=1)
    messages = 0
    try:
        stream = stub.Changes(req, timeout=args.follow_seconds if follow else 60)
        with open(args.out, "a") as out:
            for msg in stream:
                for c in msg.changes:
                    out.write(
                        json.dumps(
                            {
                                "id": c.id,
                                "node_id": c.node_id,
                                "seq": c.seq,
                                "run_id": c.run_id,
                                "account": c.account,
                                "domain": c.domain,
                                "energy_uj": c.energy_uj,
                                "energy_wh": c.energy_wh,
                                "window_end_unix_ns": c.window_end_unix_ns,
                                "batch_hash": c.batch_hash.hex(),
                            }
                        )
                        + "\n"
                    )
                out.flush()
                os.fsync(out.fileno())
                messages += 1
                if args.crash_before_saving_cursor and messages == args.max_messages:
                    os._exit(9)
                tmp = args.cursor_file + ".tmp"
                with open(tmp, "w") as f:
                    f.write(msg.cursor)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, args.cursor_file)
                if args.max_messages and messages >= args.max_messages:
                    break
    except grpc.RpcError as e:
        if follow and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            pass
        else:
            fail(e)
    print(json.dumps({"messages": messages}))


def intervals(args):
    stub = query_pb2_grpc.QueryStub(channel(args))
    try:
        r = stub.RunIntervals(query_pb2.RunIntervalsRequest(run_id=args.run), timeout=30)
    except grpc.RpcError as e:
        fail(e)
    total = sum(a.energy_uj for b in r.batches for a in b.allocations)
    print(json.dumps({"batches": len(r.batches), "allocations_uj": total, "more": r.more}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["totals", "changes", "intervals"])
    p.add_argument("addr")
    p.add_argument("ca")
    p.add_argument("cert")
    p.add_argument("key")
    p.add_argument("--account")
    p.add_argument("--run")
    p.add_argument("--cursor-file")
    p.add_argument("--out")
    p.add_argument("--max-messages", type=int, default=0)
    p.add_argument("--crash-before-saving-cursor", action="store_true")
    p.add_argument("--follow-seconds", type=float, default=0)
    args = p.parse_args()
    {"totals": totals, "changes": changes, "intervals": intervals}[args.command](args)


if __name__ == "__main__":
    main()
