# Transaction-log integrity: several connections that negotiated no block size pipeline
# random reads, writes (512-byte units, so sub-block on a 4096-byte volume) and flushes;
# every write and its submit/complete times go into a log, and every read is checked against
# what the log allows there: per 512-byte unit, a write submitted before the read completed
# and not overwritten by a later write completed before the read was submitted (or the
# initial zeros while no write completed). Run by tests/nbd_defaults.rs.
#
# Environment: TESSEL_URI, SEED, LOG (file keeping the log between the phases), PHASE
# ("run": the workload, then a final flush, then a full check, log saved; "check": the full
# check again, after the daemon was killed and restarted).
import nbd
import os
import pickle
import random
import struct
import threading

URI = os.environ["TESSEL_URI"]
SEED = int(os.environ["SEED"])
UNIT = 512
UNITS = 4096  # a 2 MiB region: writes overlap often
CONNECTIONS = 4
OPS = 700  # per connection
DEPTH = 8
INF = float("inf")

lock = threading.Lock()
clock = [0]
# Per unit: (submit, complete, write id) of every write covering it; id 0 = initial zeros.
log = [[] for _ in range(UNITS)]
next_id = [1]


def tick():
    with lock:
        clock[0] += 1
        return clock[0]


def unit_bytes(w, u):
    if w == 0:
        return bytes(UNIT)
    return struct.pack("<QQ", w, u) + bytes([(w * 7 + u) % 251 + 1]) * (UNIT - 16)


def check_read(data, first, start, done, what):
    for i in range(len(data) // UNIT):
        u = first + i
        got = data[i * UNIT:(i + 1) * UNIT]
        w, unit = struct.unpack_from("<QQ", got)
        if got != unit_bytes(w, u):
            raise AssertionError("%s: unit %d holds bytes no write put there (id %d, unit %d)"
                                 % (what, u, w, unit))
        with lock:
            entries = list(log[u])
        # The latest submit among writes completed before the read was submitted: anything
        # that completed before it is overwritten.
        floor = max((s for s, c, _ in entries if c < start), default=-1)
        allowed = {x for s, c, x in entries if s < done and c >= floor}
        if floor < 0:
            allowed.add(0)
        if w not in allowed:
            raise AssertionError("%s: unit %d reads write %d; the log allows %s"
                                 % (what, u, w, sorted(allowed)))


def worker(index, errors):
    try:
        rng = random.Random(SEED * 100 + index)
        h = nbd.NBD()
        h.set_strict_mode(0)
        h.set_request_block_size(False)
        h.connect_uri(URI)
        in_flight = {}
        issued = 0
        while issued < OPS or in_flight:
            while issued < OPS and len(in_flight) < DEPTH:
                issued += 1
                kind = rng.random()
                n = rng.randint(1, 32)
                first = rng.randrange(UNITS - n + 1)
                start = tick()
                if kind < 0.45:
                    with lock:
                        w = next_id[0]
                        next_id[0] += 1
                    data = b"".join(unit_bytes(w, first + i) for i in range(n))
                    entries = [(first + i, [start, INF, w]) for i in range(n)]
                    with lock:
                        for u, e in entries:
                            log[u].append(e)
                    # Kept in in_flight: libnbd reads it until the command completes.
                    buf = nbd.Buffer.from_bytearray(bytearray(data))
                    cookie = h.aio_pwrite(buf, first * UNIT)
                    in_flight[cookie] = ("write", entries, buf, first, start)
                elif kind < 0.9:
                    buf = nbd.Buffer(n * UNIT)
                    cookie = h.aio_pread(buf, first * UNIT)
                    in_flight[cookie] = ("read", None, buf, first, start)
                else:
                    cookie = h.aio_flush()
                    in_flight[cookie] = ("flush", None, None, 0, start)
            h.poll(-1)
            for cookie in [c for c in in_flight if h.aio_command_completed(c)]:
                kind, entries, buf, first, start = in_flight.pop(cookie)
                done = tick()
                if kind == "write":
                    with lock:
                        for _, e in entries:
                            e[1] = done
                elif kind == "read":
                    check_read(buf.to_bytearray(), first, start, done, "read")
        h.shutdown()
    except Exception as e:  # reported by the main thread
        errors.append(e)


def full_check(what):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_request_block_size(False)
    h.connect_uri(URI)
    start = tick()
    data = h.pread(UNITS * UNIT, 0)
    check_read(data, 0, start, tick(), what)
    h.shutdown()


if os.environ["PHASE"] == "run":
    errors = []
    threads = [threading.Thread(target=worker, args=(i, errors)) for i in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    h = nbd.NBD()
    h.connect_uri(URI)
    h.flush()
    h.shutdown()
    full_check("after the workload")
    with open(os.environ["LOG"], "wb") as f:
        pickle.dump((clock[0], [[tuple(e) for e in entries] for entries in log]), f)
    writes = next_id[0] - 1
    print("%d writes logged" % writes)
else:
    with open(os.environ["LOG"], "rb") as f:
        clock[0], saved = pickle.load(f)
    log = [list(entries) for entries in saved]
    full_check("after the restart")
print("ok")
