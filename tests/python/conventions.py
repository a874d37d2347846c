#!/usr/bin/env python3
"""Checks the secretfs server against what a third-party gRPC client expects.

The client is Python grpcio with stubs generated at run time from
proto/secretfs.proto: nothing of ours on the client side, so what passes here
passes for any stock gRPC client. Run by tests/tests/integration/grpc_conventions.rs,
which starts the server and adds the data; scripts/test.sh installs grpcio.

Usage:
  conventions.py --addr 127.0.0.1:PORT --ca ca.pem \\
      --admin-cert admin.pem --admin-key admin.key \\
      --cert app.pem --key app.key --workload app \\
      --proto-dir proto --expect-dir DIR [--health-addr 127.0.0.1:PORT] CHECK...

DIR holds one file per secret the workload may read: the file's name is the
secret's name, its bytes the secret's content (flat names only). The view
must be exactly these secrets.

Prints one line per check ("ok", "FAIL" or "info") and stops at the first
failure: exit 0 when every check passed, 1 when one failed, 2 when the
setup is wrong (grpcio missing, bad arguments, stubs not generated).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

try:
    import grpc
    import grpc_tools
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2
except ImportError as err:
    print(
        f"FAIL setup: {err}: this test needs Python grpcio, grpcio-tools, "
        "grpcio-health-checking and grpcio-reflection; scripts/test.sh installs "
        "them into target/python-deps",
        flush=True,
    )
    sys.exit(2)

MIB = 1 << 20
# gRPC's default receive limit, which these checks never raise: a stock
# client has it, so the server has to fit under it.
DEFAULT_RECEIVE_LIMIT = 4 * MIB
TIMEOUT = 60
SERVING = health_pb2.HealthCheckResponse.SERVING
# grpc_compression_algorithm values, as the "compression" tracer prints them.
ALG_GZIP = 2
# The probe the gzip check runs in a child process, so that grpc's tracer is
# on for it alone.
GZIP_REPLY_PROBE = "gzip-reply-probe"


class Failure(Exception):
    """A check's expectation not met; the message says what was seen."""


def expect(cond, message):
    if not cond:
        raise Failure(message)


def describe(err):
    """An RpcError as "CODE: details"."""
    return f"{err.code().name}: {err.details()}"


class Ctx:
    """Connection settings, generated stubs and the expected view."""

    def __init__(self, args, pb2, pb2_grpc):
        self.args = args
        self.pb2 = pb2
        self.pb2_grpc = pb2_grpc
        self.ca = read(args.ca)
        self.admin = (read(args.admin_cert), read(args.admin_key))
        self.workload = (read(args.cert), read(args.key))
        self.expected = {}
        for name in sorted(os.listdir(args.expect_dir)):
            self.expected[name] = read(os.path.join(args.expect_dir, name))

    def channel(self, who, compression=None):
        """A mutual-TLS channel as `who` with grpcio's default limits."""
        cert, key = self.admin if who == "admin" else self.workload
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=key, certificate_chain=cert
        )
        options = []
        if self.args.server_name:
            options.append(("grpc.ssl_target_name_override", self.args.server_name))
        return grpc.secure_channel(
            self.args.addr, creds, options=options, compression=compression
        )

    def secrets(self, channel):
        return self.pb2_grpc.SecretsStub(channel)

    def admin_stub(self, channel):
        return self.pb2_grpc.AdminStub(channel)

    def check_view(self, got, what):
        """`got` (name -> bytes) is exactly the expected view."""
        missing = sorted(set(self.expected) - set(got))
        extra = sorted(set(got) - set(self.expected))
        expect(not missing, f"{what}: missing {missing}")
        expect(not extra, f"{what}: unexpected {extra}")
        for name, content in got.items():
            want = self.expected[name]
            expect(
                content == want,
                f"{what}: {name} has {len(content)} bytes that differ from the "
                f"{len(want)} bytes added",
            )


def read(path):
    with open(path, "rb") as f:
        return f.read()


def generate_stubs(proto_dir, out_dir):
    """secretfs_pb2 and secretfs_pb2_grpc from proto_dir, imported from out_dir."""
    deps = os.path.dirname(os.path.dirname(os.path.abspath(grpc_tools.__file__)))
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [deps, env.get("PYTHONPATH", "")] if p
    )
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        os.path.join(proto_dir, "secretfs.proto"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(
            f"FAIL setup: grpc_tools.protoc could not compile secretfs.proto:\n"
            f"{done.stderr}",
            flush=True,
        )
        sys.exit(2)
    sys.path.insert(0, out_dir)
    import secretfs_pb2
    import secretfs_pb2_grpc

    return secretfs_pb2, secretfs_pb2_grpc


# ---------------------------------------------------------------- checks


def check_whoami(ctx):
    """TLS as the workload and as the admin; the server sees the right names."""
    with ctx.channel("workload") as ch:
        me = ctx.secrets(ch).WhoAmI(ctx.pb2.Empty(), timeout=TIMEOUT)
    expect(
        me.client == ctx.args.workload and not me.admin,
        f"the workload's certificate was seen as {me.client!r} (admin={me.admin})",
    )
    with ctx.channel("admin") as ch:
        me = ctx.secrets(ch).WhoAmI(ctx.pb2.Empty(), timeout=TIMEOUT)
    expect(me.admin, f"the admin's certificate was seen as {me.client!r}, not an admin")
    return f"workload {ctx.args.workload!r}, admin {me.client!r}"


def health_check(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
    except grpc.RpcError as err:
        raise Failure(f"Health.Check({service!r}) failed: {describe(err)}") from None
    expect(
        reply.status == SERVING,
        f"Health.Check({service!r}) = "
        f"{health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}, not SERVING",
    )


def check_health(ctx):
    """grpc.health.v1.Health on the TLS port: the server and both services."""
    services = ["", "secretfs.v1.Secrets", "secretfs.v1.Admin"]
    with ctx.channel("workload") as ch:
        for service in services:
            health_check(ch, service)
    return "SERVING for " + ", ".join(repr(s) for s in services)


def reflect(channel, version, request):
    """One request on ServerReflectionInfo of grpc.reflection.<version>.

    grpcio-reflection ships only the v1alpha messages; v1's are the same
    messages under another package, so the same bytes go to either path.
    """
    path = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    call = channel.stream_stream(
        path,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    try:
        replies = list(call(iter([request]), timeout=TIMEOUT))
    except grpc.RpcError as err:
        raise Failure(f"{path} failed: {describe(err)}") from None
    expect(len(replies) == 1, f"{path}: {len(replies)} replies to one request")
    reply = replies[0]
    if reply.HasField("error_response"):
        e = reply.error_response
        raise Failure(f"{path}: error {e.error_code}: {e.error_message}")
    return reply


def check_reflection(ctx):
    """Server reflection, v1 and v1alpha: services listed, descriptors served."""
    want = {"secretfs.v1.Admin", "secretfs.v1.Secrets", "grpc.health.v1.Health"}
    seen = []
    with ctx.channel("workload") as ch:
        for version in ["v1", "v1alpha"]:
            listed = reflect(
                ch, version, reflection_pb2.ServerReflectionRequest(list_services="")
            )
            names = {s.name for s in listed.list_services_response.service}
            expect(
                want <= names,
                f"{version} list_services lacks {sorted(want - names)} (has {sorted(names)})",
            )
            found = reflect(
                ch,
                version,
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="secretfs.v1.Secrets"
                ),
            )
            files = found.file_descriptor_response.file_descriptor_proto
            expect(files, f"{version} file_containing_symbol returned no descriptor")
            methods = set()
            for raw in files:
                fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                if fd.package != "secretfs.v1":
                    continue
                for service in fd.service:
                    if service.name == "Secrets":
                        methods = {m.name for m in service.method}
            expect(
                {"ReadSecrets", "Watch", "WhoAmI"} <= methods,
                f"{version} file_containing_symbol(secretfs.v1.Secrets): no descriptor "
                f"of the Secrets service with its methods (found {sorted(methods)})",
            )
            seen.append(f"{version}: {len(names)} services, Secrets descriptor")
    return "; ".join(seen)


def check_health_plaintext(ctx):
    """The plaintext probe port: Health answers, nothing else is served."""
    expect(ctx.args.health_addr, "no --health-addr given")
    with grpc.insecure_channel(ctx.args.health_addr) as ch:
        health_check(ch, "")
        # Secrets must never be served without TLS.
        try:
            ctx.secrets(ch).WhoAmI(ctx.pb2.Empty(), timeout=TIMEOUT)
        except grpc.RpcError as err:
            refused = err.code().name
        else:
            raise Failure("the plaintext health port answers secretfs.v1.Secrets/WhoAmI")
    return f"SERVING over plaintext; Secrets/WhoAmI there -> {refused}"


def gzip_content(ctx):
    """The expected secret the gzip checks read: the largest one."""
    expect(ctx.expected, "the gzip check needs a secret in --expect-dir")
    return max(ctx.expected.items(), key=lambda kv: len(kv[1]))


def read_one(ctx, stub, name, **kw):
    try:
        reply = stub.ReadSecrets(
            ctx.pb2.ReadSecretsRequest(names=[name]), timeout=TIMEOUT, **kw
        )
    except grpc.RpcError as err:
        raise Failure(f"ReadSecrets([{name!r}]) failed: {describe(err)}") from None
    got = {s.meta.name: s.content for s in reply.secrets}
    expect(list(got) == [name], f"ReadSecrets([{name!r}]) returned {sorted(got)}")
    expect(
        got[name] == ctx.expected[name],
        f"ReadSecrets([{name!r}]) returned {len(got[name])} bytes that differ from the "
        f"{len(ctx.expected[name])} added",
    )


def check_gzip(ctx):
    """gzip both ways: compressed requests accepted, replies compressed on request."""
    name, content = gzip_content(ctx)
    # A call marked gzip (grpc-encoding: gzip); too small to be compressed.
    with ctx.channel("workload") as ch:
        read_one(ctx, ctx.secrets(ch), name, compression=grpc.Compression.Gzip)
    # A request that really is compressed on the wire: grpc sends a message
    # compressed only when that makes it smaller.
    upload = b"secretfs gzip upload\n" * (256 * 1024 // 21)
    upload_name = f"gzip-upload-{os.getpid()}"
    with ctx.channel("admin") as ch:
        admin = ctx.admin_stub(ch)
        try:
            meta = admin.CreateSecret(
                ctx.pb2.CreateSecretRequest(name=upload_name, content=upload),
                timeout=TIMEOUT,
                compression=grpc.Compression.Gzip,
            )
        except grpc.RpcError as err:
            raise Failure(f"a gzip-compressed CreateSecret failed: {describe(err)}") from None
        expect(
            meta.size == len(upload),
            f"a gzip-compressed CreateSecret stored {meta.size} bytes, not {len(upload)}",
        )
        admin.DeleteSecret(ctx.pb2.SecretRef(name=upload_name), timeout=TIMEOUT)
    # The channel's default compression: requests gzip, and the client accepts
    # gzip replies; the reply must come back compressed. grpcio does not show
    # a reply's encoding, but its "compression" tracer logs every message it
    # decompresses: run the read in a child with the tracer on.
    probe = subprocess.run(
        [sys.executable, os.path.abspath(__file__)] + ctx.args.passthrough + [GZIP_REPLY_PROBE],
        env=dict(os.environ, GRPC_TRACE="compression", GRPC_VERBOSITY="debug"),
        capture_output=True,
        text=True,
        timeout=2 * TIMEOUT,
    )
    expect(
        probe.returncode == 0,
        f"the read over a gzip channel failed:\n{probe.stdout}{probe.stderr[-3000:]}",
    )
    received = [
        (int(length), int(alg))
        for length, alg in re.findall(
            r"DecompressMessage: len=(\d+) max=\d+ alg=(\d+)", probe.stderr
        )
    ]
    expect(
        received,
        "grpc's compression tracer logged no received message (has the log format of "
        f"GRPC_TRACE=compression changed?):\n{probe.stderr[-3000:]}",
    )
    compressed = [length for length, alg in received if alg == ALG_GZIP and length < len(content)]
    expect(
        compressed,
        f"the reply to a client that accepts gzip came back uncompressed "
        f"(received messages (length, algorithm): {received}; {len(content)} bytes of "
        f"content, gzip = algorithm {ALG_GZIP})",
    )
    return (
        f"gzip requests accepted; the reply carrying {len(content)} bytes came "
        f"back gzip-compressed ({max(compressed)} bytes on the wire)"
    )


def gzip_reply_probe(ctx):
    """Run in the child of check_gzip: one read over a gzip channel."""
    name, _ = gzip_content(ctx)
    with ctx.channel("workload", compression=grpc.Compression.Gzip) as ch:
        read_one(ctx, ctx.secrets(ch), name)
    return f"read {name!r} over a gzip channel"


def check_read_paging(ctx):
    """ReadSecrets of everything fits gRPC's default 4 MiB limit, page by page."""
    got = {}
    sizes = []
    token = ""
    with ctx.channel("workload") as ch:
        stub = ctx.secrets(ch)
        for _ in range(100):
            try:
                reply = stub.ReadSecrets(
                    ctx.pb2.ReadSecretsRequest(page_token=token), timeout=TIMEOUT
                )
            except grpc.RpcError as err:
                raise Failure(
                    f"ReadSecrets (all, page {len(sizes) + 1}, page_token={token!r}) failed: "
                    f"{describe(err)}"
                ) from None
            size = reply.ByteSize()
            sizes.append(size)
            expect(
                size <= DEFAULT_RECEIVE_LIMIT,
                f"page {len(sizes)} is {size} bytes, over the 4 MiB default limit",
            )
            for secret in reply.secrets:
                expect(
                    secret.meta.name not in got,
                    f"{secret.meta.name} came on two pages",
                )
                got[secret.meta.name] = secret.content
            token = reply.next_page_token
            if not token:
                break
        else:
            raise Failure(f"still a next_page_token after {len(sizes)} pages")
    ctx.check_view(got, "ReadSecrets (all pages)")
    total = sum(len(c) for c in got.values())
    return f"{len(got)} secrets, {total} bytes, {len(sizes)} pages of {sizes} bytes"


def check_watch_split(ctx):
    """Watch's first event, split into parts that each fit 4 MiB, is whole."""
    parts = []
    with ctx.channel("workload") as ch:
        call = ctx.secrets(ch).Watch(ctx.pb2.WatchRequest(), timeout=TIMEOUT)
        try:
            for event in call:
                parts.append(event)
                if not event.continued:
                    break
        except grpc.RpcError as err:
            raise Failure(
                f"Watch failed after {len(parts)} message(s): {describe(err)}"
            ) from None
        finally:
            call.cancel()
    expect(parts, "Watch ended without an event")
    expect(
        not parts[-1].continued,
        f"Watch ended after {len(parts)} part(s), the last with continued = true",
    )
    first = parts[0]
    expect(first.initial, "the first message of the stream is not initial")
    got = {}
    for i, part in enumerate(parts):
        size = part.ByteSize()
        expect(
            size <= DEFAULT_RECEIVE_LIMIT,
            f"part {i + 1} is {size} bytes, over the 4 MiB default limit",
        )
        expect(
            part.revision == first.revision,
            f"part {i + 1} has revision {part.revision}, the first {first.revision}",
        )
        expect(i == 0 or not part.initial, f"part {i + 1} is marked initial")
        expect(not part.removals, f"part {i + 1} removes {list(part.removals)} (known was empty)")
        for upsert in part.upserts:
            expect(upsert.meta.name not in got, f"{upsert.meta.name} came in two parts")
            got[upsert.meta.name] = upsert.content
    ctx.check_view(got, "Watch's first event")
    sizes = [p.ByteSize() for p in parts]
    return f"{len(got)} secrets in {len(parts)} part(s) of {sizes} bytes, revision {first.revision}"


def check_dedup(ctx):
    """ReadSecrets naming one secret 1,000 times returns it once."""
    expect(ctx.expected, "the dedup check needs a secret in --expect-dir")
    name = sorted(ctx.expected)[0]
    with ctx.channel("workload") as ch:
        try:
            reply = ctx.secrets(ch).ReadSecrets(
                ctx.pb2.ReadSecretsRequest(names=[name] * 1000), timeout=TIMEOUT
            )
        except grpc.RpcError as err:
            raise Failure(f"ReadSecrets([{name!r}] * 1000) failed: {describe(err)}") from None
    names = [s.meta.name for s in reply.secrets]
    expect(names == [name], f"ReadSecrets([{name!r}] * 1000) returned {len(names)} secrets")
    expect(reply.secrets[0].content == ctx.expected[name], f"{name} has the wrong content")
    return f"{name!r} named 1000 times, returned once"


def check_too_large(ctx):
    """A request over the server's limit is RESOURCE_EXHAUSTED."""
    with ctx.channel("admin") as ch:
        admin = ctx.admin_stub(ch)
        codes = {}
        for mib in [9, 2]:
            try:
                admin.CreateSecret(
                    ctx.pb2.CreateSecretRequest(
                        name=f"too-large-{mib}", content=b"\0" * (mib * MIB)
                    ),
                    timeout=TIMEOUT,
                )
            except grpc.RpcError as err:
                codes[mib] = err
            else:
                codes[mib] = None
    err = codes[9]
    expect(err is not None, "CreateSecret with 9 MiB of content succeeded")
    expect(
        err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"CreateSecret with 9 MiB of content: {describe(err)} (want RESOURCE_EXHAUSTED)",
    )
    over_secret = describe(codes[2]) if codes[2] is not None else "OK (!)"
    print(
        f"info too-large: 2 MiB (over --max-secret-size, under the message limit) -> "
        f"{over_secret}",
        flush=True,
    )
    return f"9 MiB -> {describe(err)}"


def check_garbage(ctx):
    """Bytes that do not decode as the request are INVALID_ARGUMENT."""
    with ctx.channel("workload") as ch:
        raw = ch.unary_unary(
            "/secretfs.v1.Secrets/ReadSecrets",
            request_serializer=None,
            response_deserializer=None,
        )
        try:
            raw(b"\xff\xff\xff\xff", timeout=TIMEOUT)
        except grpc.RpcError as err:
            expect(
                err.code() == grpc.StatusCode.INVALID_ARGUMENT,
                f"undecodable ReadSecrets request: {describe(err)} (want INVALID_ARGUMENT)",
            )
            return f"-> {describe(err)}"
    raise Failure("an undecodable ReadSecrets request succeeded")


def check_big_metadata(ctx):
    """64 KiB of request metadata gets a status; the connection survives."""
    states = []
    lock = threading.Lock()

    def on_state(state):
        with lock:
            states.append(state)

    with ctx.channel("workload") as ch:
        ch.subscribe(on_state, try_to_connect=True)
        stub = ctx.secrets(ch)
        stub.WhoAmI(ctx.pb2.Empty(), timeout=TIMEOUT)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with lock:
                if grpc.ChannelConnectivity.READY in states:
                    break
            time.sleep(0.01)
        with lock:
            expect(
                grpc.ChannelConnectivity.READY in states,
                f"the channel never reported READY ({states})",
            )
            ready_at = states.index(grpc.ChannelConnectivity.READY)
        try:
            stub.WhoAmI(
                ctx.pb2.Empty(),
                metadata=[("x-secretfs-big", "a" * (64 * 1024))],
                timeout=TIMEOUT,
            )
        except grpc.RpcError as err:
            big = err
        else:
            raise Failure("a call with a 64 KiB metadata value succeeded")
        expect(
            big.code() != grpc.StatusCode.OK and big.details(),
            f"64 KiB of metadata: status {big.code().name} without a message",
        )
        try:
            stub.WhoAmI(ctx.pb2.Empty(), timeout=TIMEOUT)
        except grpc.RpcError as err:
            raise Failure(
                f"the call after the 64 KiB metadata failed: {describe(err)}"
            ) from None
        # Any state after READY means the connection went away (a GOAWAY
        # or a reset): the second call above would have reconnected silently.
        time.sleep(0.5)
        ch.unsubscribe(on_state)
        with lock:
            after = [s.name for s in states[ready_at + 1 :]]
    expect(
        not after,
        f"the connection was dropped after the 64 KiB metadata (channel states {after}); "
        f"that call got {describe(big)}",
    )
    return f"-> {describe(big)}; the same connection served the next call"


CHECKS = {
    "whoami": check_whoami,
    "health": check_health,
    "reflection": check_reflection,
    "health-plaintext": check_health_plaintext,
    "gzip": check_gzip,
    "read-paging": check_read_paging,
    "watch-split": check_watch_split,
    "dedup": check_dedup,
    "too-large": check_too_large,
    "garbage": check_garbage,
    "big-metadata": check_big_metadata,
    GZIP_REPLY_PROBE: gzip_reply_probe,
}


# Connection settings: (flag, required, help).
OPTIONS = [
    ("--addr", True, "the TLS address, HOST:PORT"),
    ("--ca", True, "the server's CA (ca.pem of its state directory)"),
    ("--admin-cert", True, "the admin's certificate"),
    ("--admin-key", True, "the admin's key"),
    ("--cert", True, "the workload's certificate"),
    ("--key", True, "the workload's key"),
    ("--workload", True, "the workload's client name"),
    ("--proto-dir", True, "the directory of secretfs.proto"),
    ("--expect-dir", True, "the workload's expected view, one file per secret"),
    ("--health-addr", False, "the plaintext health address, HOST:PORT"),
    ("--server-name", False, "the name to check the server's certificate for"),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, required, text in OPTIONS:
        p.add_argument(flag, required=required, help=text)
    p.add_argument("checks", nargs="+", choices=sorted(CHECKS))
    args = p.parse_args()
    # The same settings, for the child that check_gzip runs.
    args.passthrough = []
    for flag, _, _ in OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            args.passthrough += [flag, value]
    return args


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="secretfs-stubs-") as out_dir:
        pb2, pb2_grpc = generate_stubs(args.proto_dir, out_dir)
        ctx = Ctx(args, pb2, pb2_grpc)
        for name in args.checks:
            try:
                detail = CHECKS[name](ctx)
            except Failure as failure:
                print(f"FAIL {name}: {failure}", flush=True)
                return 1
            except grpc.RpcError as err:
                print(f"FAIL {name}: unexpected {describe(err)}", flush=True)
                return 1
            print(f"ok   {name}: {detail}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
