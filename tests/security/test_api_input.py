"""Hostile HTTP input: oversized and malformed bodies, bad identifiers, bad file names, broken
multipart, oversized request heads.

Each must get a 4xx JSON error (`error.code` and the `x-ms-error-code` header), never a 5xx and
never a crash or a hang. Requests rejected before any session exists are followed by the
containment check with the canary as the "next call works" witness.
"""

import json
import os
import socket
import uuid

import pytest
import requests

from e2e_helpers import error_code


def execute_url(api, identifier="sec-api-" + "0" * 8, pool="python"):
    return api.url("code/execute", identifier, pool)


def test_a_20_mib_json_body_is_413(lab):
    """A 20 MiB execute body (over the 16 MiB cap) gets 413 RequestBodyTooLarge, quickly."""
    body = json.dumps({"properties": {"code": "x" * (20 << 20)}})
    r = lab.api.http.post(execute_url(lab.api), data=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and error_code(r) == "RequestBodyTooLarge", (r.status_code, r.text[:300])
    lab.contained(response=r)


def test_a_20_mib_chunked_body_is_413(lab):
    """The same without Content-Length (chunked transfer) is cut off at the cap: 413."""
    def chunks():
        yield b'{"properties":{"code":"'
        for _ in range(20):
            yield b"y" * (1 << 20)
        yield b'"}}'
    r = lab.api.http.post(execute_url(lab.api), data=chunks(), headers={"Content-Type": "application/json"},
                          timeout=60)
    assert r.status_code == 413 and error_code(r) == "RequestBodyTooLarge", (r.status_code, r.text[:300])
    lab.contained(response=r)


MALFORMED = {
    "truncated": b'{"properties": {"code": "1+1"',
    "not json": b"print('hi')",
    "array": b"[]",
    "null": b"null",
    "empty": b"",
    "invalid utf-8": b'{"properties": {"code": "\xff\xfe"}}',
    "lone surrogate": b'{"properties": {"code": "\\ud800"}}',
    "deep arrays": b"[" * 200000 + b"]" * 200000,
    "deep objects": b'{"a":' * 100000 + b"1" + b"}" * 100000,
    "huge number": b'{"properties": {"code": "1", "timeoutInSeconds": 1' + b"0" * 5000 + b"}}",
    "code not a string": b'{"properties": {"code": {"$ne": 1}}}',
    "negative timeout": b'{"properties": {"code": "1", "timeoutInSeconds": -5}}',
    "NaN": b'{"properties": {"code": "1", "timeoutInSeconds": NaN}}',
    "bad base64": b'{"properties": {"codeInputType": "inlineBase64", "code": "!!!"}}',
    "duplicate keys": b'{"properties": {"code": 1, "code": 2}}',
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_json_is_400(lab, name):
    """Malformed, mistyped or pathological JSON (deep nesting, huge numbers, bad UTF-8) gets a 400
    JSON error, never a 5xx or a crash of the parser."""
    r = lab.api.http.post(execute_url(lab.api), data=MALFORMED[name], headers={"Content-Type": "application/json"},
                          timeout=60)
    assert r.status_code == 400, (name, r.status_code, r.text[:300])
    assert error_code(r) in ("InvalidRequestBody", "SessionPropertiesMissing"), r.text[:300]
    lab.contained(response=r)


BAD_IDENTIFIERS = {
    "129 chars": "a" * 129,
    "3 chars": "abc",
    "unicode": "sess-\u00e9\u00fc-\U0001F600",
    "NUL first": "%00abcd",
    "NUL inside": "ab%00cd",
    "NUL last": "abcd%00",
    "space": "ab%20cd",
    "backslash": "ab%5Ccd",
    "CRLF": "abcd%0D%0AX-Injected:%201",
    "tab": "ab%09cd",
    "RTL override": "%E2%80%AEabcd",
    "DEL": "ab%7Fcd",
    "empty": "",
}


@pytest.mark.parametrize("name", sorted(BAD_IDENTIFIERS))
def test_invalid_identifiers_are_400(lab, name):
    """Identifiers that are too long, too short, non-ASCII, NUL/control-bearing or contain spaces
    or backslashes get 400 InvalidSessionIdentifier on execute, upload and download alike."""
    raw = BAD_IDENTIFIERS[name]
    base = lab.server.pool_url("python")
    query = "?api-version=2024-02-02-preview&identifier=" + raw
    responses = [
        lab.api.http.post(base + "/code/execute" + query, json={"properties": {"code": "1"}}, timeout=30),
        lab.api.http.post(base + "/files/upload" + query, files={"file": ("a.txt", b"a")}, timeout=30),
        lab.api.http.get(base + "/files/content/a.txt" + query, timeout=30),
        lab.api.http.delete(base + "/session" + query, timeout=30),
    ]
    for r in responses:
        assert r.status_code == 400 and error_code(r) == "InvalidSessionIdentifier", (name, r.status_code, r.text[:300])
        assert "X-Injected" not in r.headers
    lab.contained(response=responses)


def test_path_like_identifiers_are_only_names(lab, server):
    """Path-like identifiers (`../x`, `a/b`, `../../../../tmp/x`, `/etc/x`) are either refused
    with 400 or are plain names: each is its own isolated session (`a/b/../c` is not `a/c`), and
    nothing is created at the paths they spell, on the host or in the data directory."""
    tag = uuid.uuid4().hex[:8]
    idents = ["../" + tag, "a/b/" + tag, "../../../../tmp/" + tag, "/etc/" + tag, "a/b/../c" + tag, "a/c" + tag]
    live, responses = [], []
    for ident in idents:
        sess = lab.session()
        sess.id = ident
        r = sess.run("mine = %r\nopen('/mnt/data/who', 'w').write(mine)\nmine" % ident)
        responses.append(r)
        if r.status_code == 400:
            assert error_code(r) == "InvalidSessionIdentifier"
            continue
        assert r.status_code == 200 and r.json()["properties"]["result"] == ident, (ident, r.status_code, r.text[:300])
        live.append(sess)
    for sess in live:
        assert sess.ok("mine + '|' + open('/mnt/data/who').read()")["result"] == sess.id + "|" + sess.id, \
            "identifier %r shares a session with another path-like identifier" % sess.id
    for path in ["/tmp/" + tag, "/etc/" + tag, os.path.join(server.data_dir, tag), "/" + tag,
                 os.path.join(os.path.dirname(server.data_dir), tag), os.path.join(server.data_dir, "sessions", tag)]:
        assert not os.path.exists(path), "a path-like identifier created %s" % path
    lab.contained(response=responses)
    for sess in live:
        lab.contained(sess)


BAD_FILE_NAMES = {
    "300-byte segment": "x" * 300,
    "1100-byte path": "a/" * 550 + "b",
    "NUL": "a%00b.txt",
    "NUL before extension": "canary.txt%00.png",
    "newline": "a%0Ab",
    "escape char": "a%1Bb",
    "dotdot": "..",
    "dotdot encoded": "%2E%2E%2Fcanary.txt",
    "dot": ".",
    "absolute encoded": "%2Fetc%2Fpasswd",
    "empty segment": "a%2F%2Fb",
}


@pytest.mark.parametrize("name", sorted(BAD_FILE_NAMES))
def test_invalid_file_names_are_400(lab, canary, name):
    """Over-long, NUL/control-bearing and `.`/`..`/absolute file names get 400 InvalidFilePath on
    download, info and delete, even on a live session (the canary's)."""
    raw = BAD_FILE_NAMES[name]
    base = lab.server.pool_url("python")
    query = "?api-version=2024-02-02-preview&identifier=" + canary.sess.id
    responses = []
    for method, op in [("GET", "/files/content/"), ("GET", "/files/"), ("DELETE", "/files/")]:
        url = base + op + raw + query
        req = requests.Request(method, url, headers=lab.api.http.headers).prepare()
        req.url = url
        responses.append(lab.api.http.send(req, timeout=30))
    responses.append(lab.api.http.get(base + "/python/downloadFile" + query + "&filename=" + raw, timeout=30))
    for r in responses:
        assert r.status_code == 400 and error_code(r) == "InvalidFilePath", (name, r.status_code, r.text[:300])
    lab.contained(response=responses)


# (A Content-Type without a boundary is not here: the server reads the boundary off the body on
# purpose, for Semantic Kernel.)
MULTIPART = {
    "wrong boundary": ("multipart/form-data; boundary=yyy", b"--x\r\nContent-Disposition: form-data; name=\"file\"; "
                       b"filename=\"a\"\r\n\r\nabc\r\n--x--\r\n"),
    "truncated part": ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; name=\"file\"; "
                       b"filename=\"a.txt\"\r\n\r\nabc"),
    "no file part": ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\n"
                     b"abc\r\n--x--\r\n"),
    "empty body": ("multipart/form-data; boundary=x", b""),
    "not multipart": ("application/octet-stream", b"\0" * 1000),
    "huge part header": ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; name=\"file\"; "
                         b"filename=\"a.txt\"\r\nX-Junk: " + b"j" * (200 << 10) + b"\r\n\r\nabc\r\n--x--\r\n"),
    "endless header line": ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: " + b"k" * (2 << 20)),
    "huge boundary": ("multipart/form-data; boundary=" + "b" * 5000, b"--" + b"b" * 5000 + b"\r\n"),
    "garbage": ("multipart/form-data; boundary=x", os.urandom(256 << 10)),
}


def test_malformed_multipart_is_400(lab):
    """Broken multipart uploads (wrong boundary, truncated, no file part, 200 KiB part
    headers, a 2 MiB header line, random bytes) get 400/413 JSON errors; the session still works
    and holds no half-written file."""
    sess = lab.session()
    sess.ok("1")
    responses, wrong = [], {}
    for name, (ctype, body) in MULTIPART.items():
        r = lab.api.http.post(lab.api.url("files/upload", sess.id), data=body, headers={"Content-Type": ctype},
                              timeout=60)
        responses.append(r)
        if r.status_code not in (400, 413) or r.headers.get("x-ms-error-code") not in (
                "InvalidMultipartBody", "InvalidFilePath", "FileTooLarge", "RequestBodyTooLarge"):
            wrong[name] = (r.status_code, r.text[:200])
    assert not wrong, "malformed uploads not refused with a 400/413 JSON error: %r" % wrong
    assert lab.api.list_files(sess.id) == {}
    lab.contained(sess, responses)


def raw_http(server, request_bytes):
    """Sends raw bytes to the server; returns (status, headers+body text) or (None, "")."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(request_bytes)
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if b"\r\n\r\n" in data:
                    head, _, rest = data.partition(b"\r\n\r\n")
                    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")]
                    if length and len(rest) >= length[0]:
                        break
        except socket.timeout:
            pass
    if not data.startswith(b"HTTP/1."):
        return None, data.decode(errors="replace")
    return int(data.split()[1]), data.decode(errors="replace")


# The identifier "abc" is invalid: whatever the server accepts, no session is ever allocated.
OVERSIZED_HEADS = {
    "100 KB identifier": lambda key: ("POST /pools/python/code/execute?identifier=%s HTTP/1.1\r\nHost: x\r\n"
                                      "Authorization: Bearer %s\r\nContent-Length: 2\r\n\r\n{}" % ("i" * 100000, key)),
    "100 KB header": lambda key: ("GET /pools/python/files?identifier=abc HTTP/1.1\r\nHost: x\r\n"
                                  "Authorization: Bearer %s\r\nX-Big: %s\r\nContent-Length: 0\r\n\r\n"
                                  % (key, "y" * 100000)),
    "5000 headers": lambda key: ("GET /pools/python/files?identifier=abc HTTP/1.1\r\nHost: x\r\n"
                                 "Authorization: Bearer %s\r\n%s\r\n"
                                 % (key, "".join("X-H%d: v\r\n" % i for i in range(5000)))),
}


@pytest.mark.parametrize("name", sorted(OVERSIZED_HEADS))
def test_oversized_request_heads_are_refused_without_harm(lab, server, name):
    """A 100 KB request line, a 100 KB header or 5000 headers get a 4xx (400/414/431, or the
    API's own 400 for the invalid identifier) and the server keeps serving."""
    status, text = raw_http(server, OVERSIZED_HEADS[name](server.key).encode())
    assert status is not None and 400 <= status < 500, (status, text[:300])
    lab.contained()


@pytest.mark.parametrize("name", sorted(OVERSIZED_HEADS))
def test_oversized_request_heads_get_a_json_error(lab, server, name):
    """Those refusals are JSON errors with x-ms-error-code, like every other error of the API
    (docs/security.md: "every error is JSON")."""
    status, text = raw_http(server, OVERSIZED_HEADS[name](server.key).encode())
    head, _, body = text.partition("\r\n\r\n")
    assert status is not None and 400 <= status < 500, (status, text[:300])
    assert "x-ms-error-code" in head.lower() and body.startswith("{"), \
        "a %d without a JSON error body: %r" % (status, text[:300])
    lab.contained()
