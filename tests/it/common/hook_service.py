#!/usr/bin/python3
"""An MTA hook service (Stalwart MTA Hooks JSON) for proxsmtpd's tests, written with aiohttp.

It answers every POST by the first rule that matches the request (rules file re-read at each
request, so a test may change it), logs every request as one JSON line, and can serve TLS,
require a client certificate (mutual TLS) and require a bearer token (file re-read at each
request).

Rules file: a JSON array of objects. Matchers, all optional, all given must hold:
  stage     context.stage equals (mail, rcpt, data)
  from      substring of envelope.from.address
  rcpt      substring of one of envelope.to[].address
  contents  substring of message.contents
  subject   substring of the Subject header's value
What to do: "sleep" seconds first, then "answer" (JSON, status 200), or "status" with
"body" (raw text), or "close": true (drop the connection without an answer).
No rule matching: {"action": "accept"}.
"""

import argparse
import asyncio
import json
import ssl
import sys

from aiohttp import web

ACCEPT = {"action": "accept"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="host:port")
    p.add_argument("--rules", required=True, help="JSON rules file")
    p.add_argument("--cert", help="server certificate (PEM); serves HTTPS")
    p.add_argument("--key", help="server key (PEM)")
    p.add_argument("--client-ca", help="require a client certificate signed by this CA")
    p.add_argument("--token-file", help="require Authorization: Bearer <file content>")
    p.add_argument("--log", help="append each request as one JSON line")
    return p.parse_args()


def subject_of(request):
    headers = (request.get("message") or {}).get("headers") or []
    for pair in headers:
        if isinstance(pair, list) and len(pair) == 2 and str(pair[0]).lower() == "subject":
            return str(pair[1])
    return ""


def matches(rule, request):
    context = request.get("context") or {}
    envelope = request.get("envelope") or {}
    if "stage" in rule and context.get("stage") != rule["stage"]:
        return False
    if "from" in rule:
        sender = ((envelope.get("from") or {}).get("address")) or ""
        if rule["from"] not in sender:
            return False
    if "rcpt" in rule:
        rcpts = [(r or {}).get("address") or "" for r in envelope.get("to") or []]
        if not any(rule["rcpt"] in r for r in rcpts):
            return False
    if "contents" in rule:
        contents = (request.get("message") or {}).get("contents") or ""
        if rule["contents"] not in contents:
            return False
    if "subject" in rule and rule["subject"] not in subject_of(request):
        return False
    return True


def client_cn(http_request):
    peercert = http_request.transport.get_extra_info("peercert") if http_request.transport else None
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def make_app(args):
    def authorized(http_request):
        if not args.token_file:
            return True
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError:
            return False
        return http_request.headers.get("Authorization") == "Bearer " + token

    def log(entry):
        if args.log:
            with open(args.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    async def handle(http_request):
        # aiohttp de-chunks a chunked body here.
        raw = await http_request.read()
        ok = authorized(http_request)
        log({
            "method": http_request.method,
            "path": http_request.path,
            "headers": [[k, v] for k, v in http_request.headers.items()],
            "body": raw.decode("utf-8", errors="replace"),
            "client_cn": client_cn(http_request),
            "authorized": ok,
        })
        if not ok:
            return web.Response(status=401, text="bad or missing token\n")
        try:
            request = json.loads(raw)
        except ValueError:
            request = {}
        if not isinstance(request, dict):
            request = {}
        with open(args.rules, encoding="utf-8") as f:
            rules = json.load(f)
        rule = next((r for r in rules if matches(r, request)), {"answer": ACCEPT})
        if rule.get("sleep"):
            await asyncio.sleep(float(rule["sleep"]))
        if rule.get("close"):
            http_request.transport.close()
            # The transport is gone; aiohttp drops whatever response follows.
            return web.Response(status=500)
        if "status" in rule:
            return web.Response(status=int(rule["status"]), text=str(rule.get("body", "")),
                                content_type="application/json")
        return web.json_response(rule.get("answer", ACCEPT))

    app = web.Application(client_max_size=1024 ** 3)
    app.router.add_route("POST", "/{tail:.*}", handle)
    return app


def main():
    args = parse_args()
    host, _, port = args.listen.rpartition(":")
    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
        if args.client_ca:
            context.load_verify_locations(args.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    elif args.client_ca:
        sys.exit("--client-ca needs --cert and --key")
    web.run_app(make_app(args), host=host, port=int(port), ssl_context=context,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
