#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""A Unix-socket NBD "server" for the NBD backing tests: the first
client is passed through to the real server at TARGET; every later one
is accepted and then never answered (a server that advertises multi-conn
but leaves extra clients hanging).

usage: nbd-stall.py LISTEN_SOCKET TARGET_SOCKET
"""

import socket
import sys
import threading


def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def main():
    listen_path, target = sys.argv[1], sys.argv[2]
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(listen_path)
    srv.listen(16)
    held = []
    first = True
    while True:
        c, _ = srv.accept()
        if first:
            first = False
            t = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            t.connect(target)
            for a, b in ((c, t), (t, c)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()
        else:
            held.append(c)


main()
