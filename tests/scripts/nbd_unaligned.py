# A client that negotiated no block size (libnbd: set_request_block_size(False), strict mode
# off): reads, writes, write-zeroes and trims at random offsets and lengths (1 byte to
# 64 MiB) checked against a model of the volume, while aligned writers on other connections
# rewrite the blocks between the ones this client writes inside (same grains: a lost update
# at a block edge shows). Run by tests/nbd_defaults.rs.
#
# Environment: TESSEL_URI, BLOCK (the volume's block size), MODEL (file keeping the model
# between the phases), PHASE ("write": do the above, flush, save the model; "check": compare
# the whole region with the saved model, after the daemon was killed and restarted), SEED.
import nbd
import os
import random
import threading

URI = os.environ["TESSEL_URI"]
BLOCK = int(os.environ["BLOCK"])
MODEL = os.environ["MODEL"]
SEED = int(os.environ["SEED"])
MIB = 1 << 20
RANDOM = 80 * MIB  # region of the random requests: [0, RANDOM)
EDGE_BLOCKS = 512  # then this many blocks: even ones written inside, odd ones whole
EDGE = RANDOM
END = EDGE + EDGE_BLOCKS * BLOCK


def connect(negotiate):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_request_block_size(negotiate)
    h.connect_uri(URI)
    return h


def check_range(h, model, offset, length, what):
    got = h.pread(length, offset)
    if got != model[offset:offset + length]:
        first = next(i for i in range(length) if got[i] != model[offset + i])
        raise AssertionError("%s: %d+%d differs from the model first at byte %d"
                             % (what, offset, length, offset + first))


def check_all(h, model):
    # Unaligned pieces, so the final check goes through the widened read path too.
    pos = 0
    while pos < END:
        n = min(END - pos, 24 * MIB + 777)
        check_range(h, model, pos, n, "full check")
        pos += n


def aligned_writer(first, rounds, last, errors):
    # Rewrites odd blocks first, first + 4, ... whole, round after round, on a connection
    # that asked for block sizes.
    try:
        h = connect(True)
        for r in range(1, rounds + 1):
            for b in range(first, EDGE_BLOCKS, 4):
                h.pwrite(bytes([r]) * BLOCK, EDGE + b * BLOCK)
                last[b] = r
        h.shutdown()
    except Exception as e:  # reported by the main thread
        errors.append(e)


def write_phase():
    rng = random.Random(SEED)
    h = connect(False)
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1, "told the protocol's default minimum"
    model = bytearray(END)
    last = {}
    errors = []
    writers = [threading.Thread(target=aligned_writer, args=(first, 12, last, errors))
               for first in (1, 3)]
    for t in writers:
        t.start()
    big_left = 4  # requests of 32-64 MiB
    for step in range(700):
        # Inside an even block of the edge region, racing the aligned writers.
        b = 2 * rng.randrange(EDGE_BLOCKS // 2)
        start = rng.randrange(BLOCK)
        n = rng.randint(1, BLOCK - start)
        at = EDGE + b * BLOCK + start
        data = rng.randbytes(n)
        h.pwrite(data, at)
        model[at:at + n] = data
        if step % 3:
            continue
        # A random request in the random region.
        if big_left and rng.random() < 0.03:
            big_left -= 1
            n = rng.randint(32 * MIB, 64 * MIB)
        elif rng.random() < 0.7:
            n = rng.randint(1, 3 * BLOCK)
        else:
            n = rng.randint(1, 2 * MIB)
        at = rng.randrange(RANDOM - n + 1)
        kind = rng.random()
        if kind < 0.45:
            data = rng.randbytes(n)
            h.pwrite(data, at, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
            model[at:at + n] = data
        elif kind < 0.55:
            h.zero(n, at)
            model[at:at + n] = bytes(n)
        elif kind < 0.6:
            # Trim leaves partial grains as they were: write over it to keep the model exact.
            h.trim(n, at)
            data = rng.randbytes(n)
            h.pwrite(data, at)
            model[at:at + n] = data
        else:
            check_range(h, model, at, n, "read")
    for t in writers:
        t.join()
    if errors:
        raise errors[0]
    for b, r in last.items():
        at = EDGE + b * BLOCK
        model[at:at + BLOCK] = bytes([r]) * BLOCK
    assert len(last) == EDGE_BLOCKS // 2
    check_all(h, model)
    h.flush()
    h.shutdown()
    with open(MODEL, "wb") as f:
        f.write(model)


def check_phase():
    with open(MODEL, "rb") as f:
        model = f.read()
    h = connect(False)
    check_all(h, model)
    h.shutdown()


if os.environ["PHASE"] == "write":
    write_phase()
else:
    check_phase()
print("ok")
