"""Captures what pywebpush really sends, as seeds for the push_headers and
vapid fuzz targets. Not run by the build: the captured files are committed
under fuzz/corpus/. To redo: python3 -m venv v && v/bin/pip install pywebpush
&& v/bin/python fuzz/seeds/capture_pywebpush.py fuzz/corpus

A local HTTP server on 127.0.0.1 answers 201 and writes each request's
headers and body in the targets' format: `Name: value` lines, a blank line,
the raw body. VAPID tokens carry exp = NOW + 12 h and the audience the
targets check (src/targets.rs), so they pass verification there.
"""
import base64, http.server, os, sys, threading
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import serialization
from pywebpush import webpush

NOW = 1_750_000_000
AUD = "https://push.example.com"
out = sys.argv[1]
captured = []

class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        head = "".join(f"{k}: {v}\n" for k, v in self.headers.items())
        captured.append(head.encode() + b"\n" + body)
        self.send_response(201)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass

srv = http.server.HTTPServer(("127.0.0.1", 0), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()

def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

ua = ec.generate_private_key(ec.SECP256R1())
p256dh = b64(ua.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))
sub = {"endpoint": f"http://127.0.0.1:{srv.server_port}/wpush/v2/token",
       "keys": {"p256dh": p256dh, "auth": b64(os.urandom(16))}}
sender = ec.generate_private_key(ec.SECP256R1())
pem = "/tmp/capture-vapid.pem"
with open(pem, "wb") as f:
    f.write(sender.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
claims = lambda: {"sub": "mailto:ops@example.com", "aud": AUD, "exp": NOW + 12 * 3600}

webpush(sub, "hello from pywebpush", vapid_private_key=pem, vapid_claims=claims(), ttl=60)
webpush(sub, "x" * 3000, vapid_private_key=pem, vapid_claims=claims(), ttl=2419200,
        headers={"Urgency": "high", "Topic": "news-1"})
webpush(sub, "legacy", vapid_private_key=pem, vapid_claims=claims(), ttl=30, content_encoding="aesgcm")
webpush(sub, None, vapid_private_key=pem, vapid_claims=claims(), ttl=0)
webpush(sub, "no vapid", ttl=86400)
webpush(sub, "no vapid legacy", ttl=5, content_encoding="aesgcm", headers={"Urgency": "very-low"})

for target in ("push_headers", "vapid"):
    os.makedirs(os.path.join(out, target), exist_ok=True)
    for i, req in enumerate(captured):
        with open(os.path.join(out, target, f"pywebpush-{i}"), "wb") as f:
            f.write(req)
print(f"{len(captured)} requests captured")
