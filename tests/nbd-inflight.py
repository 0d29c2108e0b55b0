#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Read a whole export with every request in flight at once, wait for
every reply (errors included), then disconnect cleanly.

nbdcopy hangs up at the first error while other replies are queued,
which makes nbdkit 1.32.4 and 1.32.5 abort (an assertion in
raw_send_socket, fixed upstream by commit 9d82aa4f).  That is not what
the tests that kill a backing server mid-flight are about, so they use
this client instead.

usage: nbd-inflight.py URI [REQUEST_SIZE]
Prints "OK FAILED"; exits 2 if the replies do not all come within 60 s.
"""

import sys
import time

import nbd


def main():
    uri = sys.argv[1]
    bs = int(sys.argv[2]) if len(sys.argv) > 2 else 65536
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    pending = []
    for off in range(0, size, bs):
        buf = nbd.Buffer(min(bs, size - off))
        pending.append((h.aio_pread(buf, off), buf))
    ok = failed = 0
    deadline = time.monotonic() + 60
    while pending:
        if time.monotonic() > deadline:
            print(f"{len(pending)} replies missing after 60 s", flush=True)
            sys.exit(2)
        h.poll(1000)
        still = []
        for cookie, buf in pending:
            try:
                if h.aio_command_completed(cookie):
                    ok += 1
                else:
                    still.append((cookie, buf))
            except nbd.Error:
                failed += 1
        pending = still
    h.shutdown()
    print(f"{ok} {failed}", flush=True)


if __name__ == "__main__":
    main()
