"""An SMTP server for tests: stores each accepted mail as DIR/<n>.eml.

  smtp-sink.py --port P --dir DIR [--cert C --key K]

With --cert/--key it offers STARTTLS and refuses mail before it (require_starttls).
Prints "ready" once listening; stops on SIGTERM.
"""
import argparse
import itertools
import os
import signal
import ssl
import threading

from aiosmtpd.controller import Controller


class Store:
    def __init__(self, directory):
        self.dir = directory
        self.n = itertools.count(1)

    async def handle_DATA(self, server, session, envelope):
        n = next(self.n)
        path = os.path.join(self.dir, f"{n:05d}.eml")
        with open(path + ".tmp", "wb") as f:
            f.write(envelope.original_content)
        os.rename(path + ".tmp", path)
        return "250 OK"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    a = ap.parse_args()
    kw = {}
    if a.cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(a.cert, a.key)
        kw = {"tls_context": ctx, "require_starttls": True}
    c = Controller(Store(a.dir), hostname="127.0.0.1", port=a.port, **kw)
    c.start()
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    c.stop()


if __name__ == "__main__":
    main()
