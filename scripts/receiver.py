#!/usr/bin/env python3
"""A webhook receiver for the demo: prints one line per notification it gets."""
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            bundle = json.loads(body)
            status = bundle["entry"][0]["resource"]
            events = status.get("notificationEvent", [])
            what = ", ".join(
                f"#{e['eventNumber']} {e.get('focus', {}).get('reference', '')}" for e in events)
            methods = [e.get("request", {}).get("method") for e in bundle["entry"][1:]]
            print(f"receiver: {status['type']:<18} {what} {' '.join(m for m in methods if m)}", flush=True)
        except Exception as ex:  # a demo receiver: say what it could not read
            print(f"receiver: unreadable notification ({ex})", flush=True)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    HTTPServer(("127.0.0.1", int(sys.argv[1])), Hook).serve_forever()
