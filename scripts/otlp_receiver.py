#!/usr/bin/env python3
"""A small, real OTLP/gRPC trace receiver for the CI tests.

It serves the tracing end-to-end test of issue 7: one submitted job must yield
one connected trace across the CLI, the coordinator and the worker. The test
starts this receiver, points the three processes' OTLP exporters at it, and then
reads the spans it wrote to check that they all share one trace id and link up
through their parent span ids.

The receiver implements the standard OTLP collector services with the generated
code of PyPI `opentelemetry-proto` on top of `grpcio`:

  opentelemetry.proto.collector.trace.v1.TraceService/Export
      every span received becomes one JSON line in --out (flushed after each
      Export), with the keys trace_id (hex), span_id (hex), parent_span_id (hex,
      "" for a root span), name, service_name (the resource attribute
      service.name, "" when missing), kind (int), attributes (key -> value as a
      string), start_unix_nano and end_unix_nano.
  opentelemetry.proto.collector.logs.v1.LogsService/Export
  opentelemetry.proto.collector.metrics.v1.MetricsService/Export
      acknowledged and dropped, so that an exporter set up for every signal
      sees no errors.

gzip-compressed requests (grpc-encoding: gzip) are decompressed by grpcio.

Usage:
  python3 scripts/otlp_receiver.py --port 0 --out spans.jsonl
      Listens on 127.0.0.1 (port 0 picks a free port), prints exactly one line
      `listening on 127.0.0.1:PORT` to stdout once ready, and serves until
      SIGTERM or SIGINT, then exits 0. --out is opened for appending.
  python3 scripts/otlp_receiver.py --self-test
      Starts a receiver as a child process, sends it one gzip-compressed trace
      Export (a parent and a child span of service "self-test") plus a logs and
      a metrics Export, checks the spans it wrote, stops it with SIGTERM, and
      prints `self-test ok` (exit status non-zero on any failure).

Needs: python3 -m pip install opentelemetry-proto grpcio
"""

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

HOST = "127.0.0.1"
# OTLP exporters batch spans; allow requests well beyond grpc's 4 MiB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def any_value_to_str(value):
    """An OTLP AnyValue as a string: strings as they are, bools as true/false,
    numbers in decimal, bytes in hex, arrays and key-value lists as JSON."""
    kind = value.WhichOneof("value")
    if kind is None:
        return ""
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "int_value":
        return str(value.int_value)
    if kind == "double_value":
        return repr(value.double_value)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    if kind == "array_value":
        return json.dumps([any_value_to_str(v) for v in value.array_value.values])
    if kind == "kvlist_value":
        return json.dumps({kv.key: any_value_to_str(kv.value) for kv in value.kvlist_value.values})
    return str(value)


def attributes_to_dict(key_values):
    return {kv.key: any_value_to_str(kv.value) for kv in key_values}


def span_records(request):
    """One dict per span of an ExportTraceServiceRequest."""
    for resource_spans in request.resource_spans:
        resource_attributes = attributes_to_dict(resource_spans.resource.attributes)
        service_name = resource_attributes.get("service.name", "")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield {
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "name": span.name,
                    "service_name": service_name,
                    "kind": int(span.kind),
                    "attributes": attributes_to_dict(span.attributes),
                    "start_unix_nano": span.start_time_unix_nano,
                    "end_unix_nano": span.end_time_unix_nano,
                }


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self._out = out
        self._lock = threading.Lock()

    def Export(self, request, context):
        lines = [json.dumps(record) + "\n" for record in span_records(request)]
        with self._lock:
            self._out.writelines(lines)
            self._out.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


class LogsService(logs_service_pb2_grpc.LogsServiceServicer):
    def Export(self, request, context):
        return logs_service_pb2.ExportLogsServiceResponse()


class MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def Export(self, request, context):
        return metrics_service_pb2.ExportMetricsServiceResponse()


def serve(port, out_path):
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    with open(out_path, "a", encoding="utf-8") as out:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(out), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(LogsService(), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(MetricsService(), server)
        bound = server.add_insecure_port(f"{HOST}:{port}")
        if not bound:
            print(f"otlp_receiver: cannot listen on {HOST}:{port}", file=sys.stderr)
            return 1
        server.start()
        print(f"listening on {HOST}:{bound}", flush=True)
        while not stop.wait(0.5):
            pass
        server.stop(grace=2).wait()
    return 0


def self_test():
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.logs.v1 import logs_pb2
    from opentelemetry.proto.metrics.v1 import metrics_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2

    def fail(message):
        print(f"self-test FAILED: {message}", file=sys.stderr)
        return 1

    trace_id = bytes(range(1, 17))
    parent_id = bytes.fromhex("a1a2a3a4a5a6a7a8")
    child_id = bytes.fromhex("b1b2b3b4b5b6b7b8")
    resource = resource_pb2.Resource(
        attributes=[
            common_pb2.KeyValue(
                key="service.name", value=common_pb2.AnyValue(string_value="self-test")
            )
        ]
    )
    parent = trace_pb2.Span(
        trace_id=trace_id,
        span_id=parent_id,
        name="parent",
        kind=trace_pb2.Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=1_000,
        end_time_unix_nano=4_000,
        attributes=[
            common_pb2.KeyValue(key="job.id", value=common_pb2.AnyValue(string_value="j-1")),
            common_pb2.KeyValue(key="attempt", value=common_pb2.AnyValue(int_value=2)),
            common_pb2.KeyValue(key="ok", value=common_pb2.AnyValue(bool_value=True)),
        ],
    )
    child = trace_pb2.Span(
        trace_id=trace_id,
        span_id=child_id,
        parent_span_id=parent_id,
        name="child",
        kind=trace_pb2.Span.SPAN_KIND_SERVER,
        start_time_unix_nano=2_000,
        end_time_unix_nano=3_000,
    )
    request = trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=resource,
                scope_spans=[trace_pb2.ScopeSpans(spans=[parent, child])],
            )
        ]
    )

    with tempfile.TemporaryDirectory(prefix="otlp-self-test-") as tmp:
        out_path = os.path.join(tmp, "spans.jsonl")
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--port", "0", "--out", out_path],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            if not ready:
                return fail("the receiver printed nothing within 30 s")
            line = proc.stdout.readline().strip()
            prefix = f"listening on {HOST}:"
            if not line.startswith(prefix):
                return fail(f"unexpected first line {line!r}")
            target = f"{HOST}:{int(line[len(prefix):])}"

            with grpc.insecure_channel(target) as channel:
                grpc.channel_ready_future(channel).result(timeout=10)
                response = trace_service_pb2_grpc.TraceServiceStub(channel).Export(
                    request, timeout=10, compression=grpc.Compression.Gzip
                )
                if not isinstance(response, trace_service_pb2.ExportTraceServiceResponse):
                    return fail(f"unexpected trace response {response!r}")
                logs_service_pb2_grpc.LogsServiceStub(channel).Export(
                    logs_service_pb2.ExportLogsServiceRequest(
                        resource_logs=[logs_pb2.ResourceLogs(resource=resource)]
                    ),
                    timeout=10,
                )
                metrics_service_pb2_grpc.MetricsServiceStub(channel).Export(
                    metrics_service_pb2.ExportMetricsServiceRequest(
                        resource_metrics=[metrics_pb2.ResourceMetrics(resource=resource)]
                    ),
                    timeout=10,
                )

            with open(out_path, encoding="utf-8") as f:
                records = [json.loads(l) for l in f if l.strip()]
            if len(records) != 2:
                return fail(f"expected 2 span lines, got {len(records)}: {records}")
            by_name = {r["name"]: r for r in records}
            p, c = by_name.get("parent"), by_name.get("child")
            if p is None or c is None:
                return fail(f"missing parent or child span: {records}")
            expected_parent = {
                "trace_id": trace_id.hex(),
                "span_id": parent_id.hex(),
                "parent_span_id": "",
                "name": "parent",
                "service_name": "self-test",
                "kind": trace_pb2.Span.SPAN_KIND_CLIENT,
                "attributes": {"job.id": "j-1", "attempt": "2", "ok": "true"},
                "start_unix_nano": 1_000,
                "end_unix_nano": 4_000,
            }
            if p != expected_parent:
                return fail(f"parent span {p} != {expected_parent}")
            if c["trace_id"] != p["trace_id"] or c["parent_span_id"] != p["span_id"]:
                return fail(f"child span is not linked to the parent: {c}")
            if c["service_name"] != "self-test" or c["span_id"] != child_id.hex():
                return fail(f"unexpected child span: {c}")

            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=15)
            if rc != 0:
                return fail(f"receiver exited {rc} on SIGTERM")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()

    print("self-test ok", flush=True)
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--out", help="JSON-lines file the received spans are appended to")
    parser.add_argument("--self-test", action="store_true", help="check the receiver end to end")
    args = parser.parse_args()
    if args.self_test:
        return self_test()
    if not args.out:
        parser.error("--out is required (unless --self-test)")
    return serve(args.port, args.out)


if __name__ == "__main__":
    sys.exit(main())
