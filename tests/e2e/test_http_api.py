"""The legacy (2024-02-02-preview) data plane over real HTTP, against real sandboxes.

python-pool identifier budget (max 8 live; these tests never delete a session): shared_id (1),
the timeout test (1), the isolation test (1), the concurrency test (1, plus shared_id), the
identifier encoding test (1), the shared-first-call/crash test (1); test_langchain.py takes 1
more: 7 in all. Keep it at most 8 when adding tests.
"""

import base64
import hashlib
import http.client
import json
import os
import threading
import time
import uuid
from datetime import datetime
from urllib.parse import quote, urlsplit

import pytest

from e2e_helpers import API_VERSION, TINY_COOLDOWN, TINY_UPLOAD_LIMIT, error_code, new_id, png_size

LEGACY_KEYS = {"$id", "status", "stdout", "stderr", "result", "executionResult", "executionTimeInMilliseconds"}


def tag():
    return uuid.uuid4().hex[:10]


def raw_request(server, method, target, body=None, headers=None, auth=True):
    """A request whose target goes out byte for byte (requests would re-quote or normalize it)."""
    parts = urlsplit(server.base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        hdrs = dict(headers or {})
        if auth:
            hdrs["Authorization"] = "Bearer " + server.key
        conn.request(method, target, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), resp.read()
    finally:
        conn.close()


def parse_time(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- execute ------------------------------------------------------------------------------------


def test_execute_legacy_shape(api, shared_id):
    r = api.execute_raw(shared_id, "print('hello world')\n6*7")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"$id", "properties"}
    assert body["$id"] == "1"
    props = body["properties"]
    assert set(props) == LEGACY_KEYS
    assert props["$id"] == "2"
    assert props["status"] == "Success"
    assert props["stdout"] == "hello world\n"
    assert props["stderr"] == ""
    assert props["result"] == 42 and isinstance(props["result"], int)
    assert props["executionResult"] == 42
    ms = props["executionTimeInMilliseconds"]
    assert isinstance(ms, int) and 0 <= ms < 10_000


def test_execute_result_typing(api, shared_id):
    # No trailing expression: result "".
    props = api.execute(shared_id, "_e2e_unused = 5")
    assert props["status"] == "Success" and props["result"] == "" and props["executionResult"] == ""
    # Non-primitive: the IPython text/plain repr as a string (AG parses it).
    props = api.execute(shared_id, "[str(i) * 30 for i in range(4)]")
    assert isinstance(props["result"], str)
    assert props["result"].startswith("['000") and ",\n '111" in props["result"]
    props = api.execute(shared_id, "0.5 + 0.25")
    assert props["result"] == 0.75
    props = api.execute(shared_id, "True")
    assert props["result"] is True
    props = api.execute(shared_id, "'plain ' + 'string'")
    assert props["result"] == "plain string"  # the string itself, not its repr
    props = api.execute(shared_id, "2 ** 64")
    assert props["result"] == "18446744073709551616"  # beyond 2^53: a decimal string
    # docs/agent-protocol.md: isinstance-based, so np.float64 (a float) is a number while
    # np.int64 (not an int) is IPython's repr.
    props = api.execute(shared_id, "import numpy as np\nnp.float64(1.5) * 2")
    assert props["result"] == 3.0
    props = api.execute(shared_id, "np.int64(7) * 6")
    assert props["result"] == "np.int64(42)"
    props = api.execute(shared_id, "x_semicolon = 5\nx_semicolon;")
    assert props["result"] == ""


def test_execution_time_is_measured(api, shared_id):
    props = api.execute(shared_id, "import time\ntime.sleep(0.5)\n'slept'")
    assert props["result"] == "slept"
    assert 480 <= props["executionTimeInMilliseconds"] <= 3000, props


def test_nan_result_is_null(api, shared_id):
    # docs/agent-protocol.md: float nan and +-inf give JSON null (Azure's modern API: nan -> null).
    r = api.execute_raw(shared_id, "float('nan')")
    assert r.status_code == 200
    assert "NaN" not in r.text  # never invalid JSON
    assert r.json()["properties"]["result"] is None, r.text
    assert api.execute(shared_id, "float('-inf')")["result"] is None


def test_execute_flat_body(api, shared_id):
    props = api.execute(shared_id, "print(3 * 'ab')\n2 ** 10", flat=True)
    assert props["status"] == "Success"
    assert props["stdout"] == "ababab\n"
    assert props["result"] == 1024


def test_execute_enum_case_and_unknown_fields(api, shared_id):
    body = {
        "properties": {
            "codeInputType": "Inline",
            "executionType": "Synchronous",
            "code": "'%s' * 2" % "ok",
            "timeoutInSeconds": "30",
            "identifier": "ignored-by-the-server",
            "someFutureField": {"x": 1},
        }
    }
    r = api.http.post(api.url("code/execute", shared_id), json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["properties"]["result"] == "okok"


def test_state_across_calls(api, shared_id):
    name = "v_" + tag()
    api.execute(shared_id, "%s = [1, 2, 3]\nimport math" % name)
    props = api.execute(shared_id, "%s.append(4)\nsum(%s) * math.prod(%s)" % (name, name, name))
    assert props["result"] == 10 * 24
    props = api.execute(shared_id, "len(%s)" % name)
    assert props["result"] == 4


def test_exception_is_failure_with_name_in_stderr(api, shared_id):
    props = api.execute(shared_id, "print('before')\nraise ValueError('boom-%s')" % "e2e")
    assert props["status"] == "Failure"
    assert "ValueError" in props["stderr"]
    assert "boom-e2e" in props["stderr"]
    assert props["stdout"] == "before\n"
    assert props["result"] == ""
    props = api.execute(shared_id, "1/0")
    assert props["status"] == "Failure" and "ZeroDivisionError" in props["stderr"]
    props = api.execute(shared_id, "import sys\nsys.exit(3)")
    assert props["status"] == "Failure" and "SystemExit" in props["stderr"], props
    # The session survives all of these.
    assert api.execute(shared_id, "shared_marker * 2")["result"] == 2468


def test_matplotlib_plot_is_png_image(api, shared_id):
    code = (
        "import matplotlib.pyplot as plt\n"
        "fig = plt.figure(figsize=(4, 3), dpi=100)\n"
        "plt.plot([1, 2, 3], [1, 4, 9])\n"
        "plt.show()\n"
    )
    props = api.execute(shared_id, code)
    assert props["status"] == "Success", props
    result = props["result"]
    assert isinstance(result, dict), result
    assert result["type"] == "image" and result["format"] == "png"
    assert props["executionResult"] == result
    png = base64.b64decode(result["base64_data"], validate=True)
    width, height = png_size(png)
    # 4x3 inches at 100 dpi, give or take a tight bounding box.
    assert 300 <= width <= 400 and 230 <= height <= 300, (width, height)
    assert abs(width / height - 4 / 3) < 0.25, (width, height)


def test_timeout_fails_and_session_keeps_state(api):
    identifier = new_id("timeout")
    api.execute(identifier, "keep_me = 'still-here-%d' % 99")
    start = time.monotonic()
    props = api.execute(identifier, "import time\ntime.sleep(30)\n'never'", timeout=2)
    elapsed = time.monotonic() - start
    assert props["status"] == "Failure", props
    assert props["result"] != "never"
    assert "TimeoutError" in props["stderr"] or "timed out" in props["stderr"].lower(), props["stderr"]
    assert elapsed < 10, elapsed
    assert props["executionTimeInMilliseconds"] < 10_000
    after = api.execute(identifier, "keep_me")
    assert after["status"] == "Success"
    assert after["result"] == "still-here-99"


def test_python_execute_alias(api, shared_id):
    props = api.execute(shared_id, "shared_marker - 34", op="python/execute")
    assert props["result"] == 1200


def test_arm_prefix_reaches_same_session(api, server, shared_id):
    r = api.http.post(
        "%s/code/execute?api-version=%s&identifier=%s" % (server.arm_url("python"), API_VERSION, shared_id),
        json={"properties": {"codeInputType": "inline", "executionType": "synchronous", "code": "shared_marker + 766"}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["properties"]["result"] == 2000


def test_identifier_raw_and_encoded_reach_same_session(server):
    identifier = "a+b|c{}[x]$@:;" + tag()
    raw_target = "/pools/python/code/execute?identifier=%s&api-version=%s" % (identifier, API_VERSION)
    status, _, body = raw_request(
        server,
        "POST",
        raw_target,
        body=b'{"properties":{"codeInputType":"inline","executionType":"synchronous","code":"who = 31337"}}',
        headers={"Content-Type": "application/json"},
    )
    assert status == 200, body
    encoded_target = "/pools/python/code/execute?api-version=%s&identifier=%s" % (API_VERSION, quote(identifier, safe=""))
    assert "%2B" in encoded_target and "%7C" in encoded_target
    status, _, body = raw_request(
        server,
        "POST",
        encoded_target,
        body=b'{"properties":{"code":"who + 1"}}',
        headers={"Content-Type": "application/json"},
    )
    assert status == 200, body
    assert json.loads(body)["properties"]["result"] == 31338


@pytest.mark.parametrize(
    "identifier",
    ["abc", "x" * 129, "ab%20cd", "abc%C3%A9", "tab%09tab", "back%5Cslash", ""],
    ids=["3-chars", "129-chars", "space", "non-ascii", "control", "backslash", "empty"],
)
def test_bad_identifier_is_400(server, identifier):
    target = "/pools/python/code/execute?api-version=%s&identifier=%s" % (API_VERSION, identifier)
    status, headers, body = raw_request(
        server, "POST", target, body=b'{"properties":{"code":"1"}}', headers={"Content-Type": "application/json"}
    )
    assert status == 400, body
    assert headers["content-type"].startswith("application/json")
    err = json.loads(body)["error"]
    assert err["code"] == headers["x-ms-error-code"] == "InvalidSessionIdentifier"


@pytest.mark.parametrize("identifier", ["abcd", "y" * 128, "%7C%7B%7D%5B%5D"], ids=["4-chars", "128-chars", "4-encoded"])
def test_boundary_identifiers_are_accepted(server, identifier):
    # A valid identifier with a body that lacks `code`: the identifier passes validation and the
    # body is refused before any session is allocated (the python pool's budget stays intact).
    target = "/pools/python/code/execute?api-version=%s&identifier=%s" % (API_VERSION, identifier)
    status, headers, body = raw_request(
        server, "POST", target, body=b'{"properties":{}}', headers={"Content-Type": "application/json"}
    )
    assert status == 400, body
    assert headers["x-ms-error-code"] != "InvalidSessionIdentifier", body


def test_missing_identifier_is_400(api):
    r = api.http.post(api.url("code/execute"), json={"properties": {"code": "1"}}, timeout=30)
    assert r.status_code == 400
    assert error_code(r) == "InvalidSessionIdentifier"


# -- auth, routing, bodies ----------------------------------------------------------------------


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key-0123456789", "Basic Zm9vOmJhcg==", "Bearer ", "Bearer"])
def test_auth_required(server, api, auth):
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = auth
    target = "/pools/python/code/execute?api-version=%s&identifier=%s" % (API_VERSION, new_id("auth"))
    status, hdrs, body = raw_request(server, "POST", target, body=b'{"properties":{"code":"1"}}', headers=headers, auth=False)
    assert status == 401, body
    assert hdrs["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == hdrs["x-ms-error-code"]
    assert "bearer" in hdrs.get("www-authenticate", "").lower()


def test_auth_checked_before_routing(server):
    status, hdrs, body = raw_request(server, "GET", "/no/such/route", auth=False)
    assert status == 401 and hdrs["content-type"].startswith("application/json"), body


@pytest.mark.parametrize(
    "method,path,expected_code",
    [
        ("GET", "/no/such/route", "RouteNotFound"),
        ("POST", "/pools/python/code/nope", "RouteNotFound"),
        ("GET", "/pools/python/code/execute", "RouteNotFound"),
        ("POST", "/pools/no-such-pool/code/execute", "SessionPoolNotFound"),
    ],
)
def test_unknown_route_is_404_json(api, method, path, expected_code):
    url = api.server.base + path + "?api-version=%s&identifier=%s" % (API_VERSION, new_id("route"))
    r = api.http.request(method, url, json={"properties": {"code": "1"}}, timeout=30)
    assert r.status_code == 404, r.text
    assert error_code(r) == expected_code


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2, 3]", b'"code"', b'{"properties": {}}', b'{"properties": {"code": 5}}', b""],
    ids=["malformed", "array", "string", "missing-code", "code-not-string", "empty"],
)
def test_bad_execute_body_is_400(api, shared_id, body):
    r = api.http.post(
        api.url("code/execute", shared_id), data=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert r.status_code == 400, r.text
    assert error_code(r)


# -- files --------------------------------------------------------------------------------------


def test_upload_list_download_round_trip(api, shared_id):
    t = tag()
    data = ("hello from %s\n" % t).encode()
    r = api.upload(shared_id, "/mnt/data/x_%s.txt" % t, data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["$id"] == "1"
    entry = body["value"][0]
    assert entry["$id"] == "2" and entry["properties"]["$id"] == "3"
    assert entry["properties"]["filename"] == "x_%s.txt" % t  # the /mnt/data/ prefix stripped
    assert entry["properties"]["size"] == len(data)
    parse_time(entry["properties"]["lastModifiedTime"])

    listing = api.list_files(shared_id)
    props = listing["x_%s.txt" % t]
    assert props["size"] == len(data)
    modified = parse_time(props["lastModifiedTime"])
    assert abs(modified.timestamp() - time.time()) < 300

    r = api.download(shared_id, "x_%s.txt" % t)
    assert r.status_code == 200 and r.content == data
    # The kernel sees the same file in its cwd, /mnt/data.
    props = api.execute(shared_id, "import os\n(os.getcwd(), open('x_%s.txt').read())" % t)
    assert props["result"] == repr(("/mnt/data", data.decode())), props


def test_upload_5mb_binary(api, shared_id):
    t = tag()
    data = os.urandom(5 * 1024 * 1024 + 17)
    r = api.upload(shared_id, "big_%s.bin" % t, data)
    assert r.status_code == 200, r.text
    assert r.json()["value"][0]["properties"]["size"] == len(data)
    assert api.list_files(shared_id)["big_%s.bin" % t]["size"] == len(data)
    r = api.download(shared_id, "big_%s.bin" % t)
    assert r.status_code == 200
    assert len(r.content) == len(data) and r.content == data
    props = api.execute(shared_id, "import hashlib\nhashlib.sha256(open('big_%s.bin','rb').read()).hexdigest()" % t)
    assert props["result"] == hashlib.sha256(data).hexdigest()


def test_upload_name_with_spaces_and_unicode(api, shared_id):
    name = "résumé data ✓ %s (1).txt" % tag()
    data = "ünïcödé ✓\n".encode()
    r = api.upload(shared_id, name, data)
    assert r.status_code == 200, r.text
    assert r.json()["value"][0]["properties"]["filename"] == name
    assert api.list_files(shared_id)[name]["size"] == len(data)
    r = api.download(shared_id, name)
    assert r.status_code == 200 and r.content == data


def test_upload_into_subdirectory(api, shared_id):
    t = tag()
    name = "sub_%s/inner/data.txt" % t
    data = b"nested " + t.encode()
    r = api.upload(shared_id, "/mnt/data/" + name, data)
    assert r.status_code == 200, r.text
    assert r.json()["value"][0]["properties"]["filename"] == name
    listing = api.list_files(shared_id)
    assert listing[name]["size"] == len(data)
    assert "sub_%s" % t not in listing and "sub_%s/inner" % t not in listing  # directories are not listed
    r = api.download(shared_id, name)  # '/' kept, as LangChain's quote() does
    assert r.status_code == 200 and r.content == data
    encoded = api.http.get(api.url("files/content/" + quote(name, safe=""), shared_id), timeout=30)
    assert encoded.status_code == 200 and encoded.content == data
    assert api.execute(shared_id, "open('%s').read()" % name)["result"] == data.decode()


def test_multipart_with_json_content_type_semantic_kernel_quirk(api, shared_id):
    t = tag()
    boundary = uuid.uuid4().hex
    data = b"sk-quirk " + t.encode() + b"\r\n--not-a-boundary\r\n"
    body = (
        ("--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/mnt/data/sk_%s.txt\"\r\n"
         "Content-Type: application/octet-stream\r\n\r\n" % (boundary, t)).encode()
        + data
        + ("\r\n--%s--\r\n" % boundary).encode()
    )
    r = api.http.post(
        api.url("files/upload", shared_id), data=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert r.status_code == 200, r.text
    assert r.json()["value"][0]["properties"]["filename"] == "sk_%s.txt" % t
    assert r.json()["value"][0]["properties"]["size"] == len(data)
    assert api.download(shared_id, "sk_%s.txt" % t).content == data


def test_python_file_aliases(api, shared_id):
    t = tag()
    data = b"alias " + t.encode()
    r = api.upload(shared_id, "alias_%s.txt" % t, data, op="python/uploadFile")
    assert r.status_code == 200, r.text
    assert r.json()["value"][0]["properties"]["size"] == len(data)
    r = api.http.get(api.url("python/files", shared_id), timeout=30)
    assert r.status_code == 200
    names = {v["properties"]["filename"]: v["properties"]["size"] for v in r.json()["value"]}
    assert names["alias_%s.txt" % t] == len(data)
    r = api.http.get(api.url("python/downloadFile", shared_id, extra="&filename=alias_%s.txt" % t), timeout=30)
    assert r.status_code == 200 and r.content == data


def test_file_written_by_code_is_listed_and_downloadable(api, shared_id):
    t = tag()
    code = "with open('out_%s.csv', 'w') as f:\n    f.write('a,b\\n1,2\\n3,4\\n')\n" % t
    assert api.execute(shared_id, code)["status"] == "Success"
    listing = api.list_files(shared_id)
    assert listing["out_%s.csv" % t]["size"] == len(b"a,b\n1,2\n3,4\n")
    r = api.download(shared_id, "out_%s.csv" % t)
    assert r.status_code == 200 and r.content == b"a,b\n1,2\n3,4\n"
    assert r.headers["Content-Type"].startswith("text/csv")


def test_file_metadata_and_delete(api, shared_id):
    t = tag()
    name = "del_%s.txt" % t
    assert api.upload(shared_id, name, b"12345").status_code == 200
    r = api.http.get(api.url("files/" + name, shared_id), timeout=30)
    assert r.status_code == 200 and r.json()["properties"]["size"] == 5
    r = api.http.delete(api.url("files/" + name, shared_id), timeout=30)
    assert r.status_code in (200, 204), r.text
    assert name not in api.list_files(shared_id)
    r = api.download(shared_id, name)
    assert r.status_code == 404 and error_code(r)
    assert api.execute(shared_id, "import os\nos.path.exists('%s')" % name)["result"] is False


@pytest.mark.parametrize(
    "name,extra",
    [("../evil_%s.txt", ""), ("/etc/evil_%s.txt", ""), ("a/../../evil_%s.txt", ""), ("evil_%s.txt", "&path=.."),
     ("evil_%s.txt", "&path=/tmp")],
    ids=["dotdot", "absolute", "nested-dotdot", "path-dotdot", "path-absolute"],
)
def test_upload_outside_mnt_data_refused(api, shared_id, name, extra):
    t = tag()
    r = api.http.post(
        api.url("files/upload", shared_id, extra=extra), files={"file": (name % t, b"evil")}, timeout=30
    )
    assert r.status_code == 400, r.text
    assert error_code(r) == "InvalidFilePath"
    assert not any(t in n for n in api.list_files(shared_id))
    for host_path in ("/evil_%s.txt" % t, "/etc/evil_%s.txt" % t, "/tmp/evil_%s.txt" % t):
        assert not os.path.exists(host_path)


def test_upload_without_file_part_is_400(api, shared_id):
    r = api.http.post(api.url("files/upload", shared_id), files={"other": ("a.txt", b"b")}, timeout=30)
    assert r.status_code == 400 and error_code(r)
    r = api.http.post(api.url("files/upload", shared_id), data=b"just bytes", timeout=30)
    assert r.status_code == 400 and error_code(r)


TRAVERSALS = [
    "files/content/..%2F..%2F..%2Fetc%2Fpasswd",
    "files/content/../../../etc/passwd",
    "files/content/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
    "files/content/%2Fetc%2Fpasswd",
    "files/content//etc/passwd",
    "files/content/sub/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "python/downloadFile?filename=/etc/passwd",
    "python/downloadFile?filename=..%2F..%2F..%2Fetc%2Fpasswd",
    "python/downloadFile?filename=../../../etc/passwd",
    "files/..%2F..%2F..%2Fetc%2Fpasswd",
]


@pytest.mark.parametrize("op", TRAVERSALS)
def test_path_traversal_download_refused(server, shared_id, op):
    sep = "&" if "?" in op else "?"
    target = "/pools/python/%s%sapi-version=%s&identifier=%s" % (op, sep, API_VERSION, shared_id)
    status, headers, body = raw_request(server, "GET", target)
    assert status in (400, 404), (status, body[:200])
    assert b"root:" not in body
    assert headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("op", ["files/..%2F..%2F..%2Fetc%2Fpasswd", "files/%2Fetc%2Fpasswd", "files/../../../etc/passwd"])
def test_path_traversal_delete_refused(server, shared_id, op):
    target = "/pools/python/%s?api-version=%s&identifier=%s" % (op, API_VERSION, shared_id)
    status, _, body = raw_request(server, "DELETE", target)
    assert status in (400, 404), (status, body[:200])
    with open("/etc/passwd", "rb") as f:
        assert f.read(5) == b"root:"


def test_symlink_to_host_file_not_listed_nor_served(api, shared_id):
    t = tag()
    code = (
        "import os\n"
        "os.symlink('/etc/passwd', 'link_%s')\n"
        "os.symlink('/etc', 'dirlink_%s')\n"
        "os.path.islink('link_%s')" % (t, t, t)
    )
    assert api.execute(shared_id, code)["result"] is True
    listing = api.list_files(shared_id)
    assert not any(t in name and "link" in name for name in listing), sorted(listing)
    for name in ("link_%s" % t, "dirlink_%s/passwd" % t):
        r = api.download(shared_id, name)
        assert 400 <= r.status_code < 500, (r.status_code, r.content[:100])
        assert b"root:" not in r.content
        r = api.http.get(api.url("files/" + name, shared_id), timeout=30)
        assert 400 <= r.status_code < 500 and b"root:" not in r.content


def test_symlinked_directory_does_not_escape(api, shared_id):
    """A symlink the sandbox points at a host directory must not redirect the server (which runs
    as root on the host) when it writes or lists: /tmp and /etc here are the host's."""
    t = tag()
    code = "import os\nos.symlink('/tmp', 'hosttmp_%s')\nos.symlink('/etc', 'hostetc_%s')\nos.symlink('/tmp/e2e_%s', 'hostfile_%s')" % (t, t, t, t)
    assert api.execute(shared_id, code)["status"] == "Success"
    r = api.upload(shared_id, "hosttmp_%s/e2e_%s.txt" % (t, t), b"escaped")
    assert r.status_code == 400 and error_code(r) == "InvalidFilePath", r.text
    assert not os.path.exists("/tmp/e2e_%s.txt" % t)
    r = api.http.get(api.url("files", shared_id, extra="&path=hostetc_%s" % t), timeout=30)
    assert r.status_code == 400 and b"passwd" not in r.content
    # Uploading onto a file symlink replaces the link; it never writes through it.
    r = api.upload(shared_id, "hostfile_%s" % t, b"replaced")
    assert r.status_code == 200, r.text
    assert not os.path.exists("/tmp/e2e_%s" % t)
    props = api.execute(shared_id, "import os\n(os.path.islink('hostfile_%s'), open('hostfile_%s').read())" % (t, t))
    assert props["result"] == "(False, 'replaced')"


def test_sessions_are_isolated(api, shared_id):
    t = tag()
    assert api.upload(shared_id, "secret_%s.txt" % t, b"A only").status_code == 200
    api.execute(shared_id, "secret_%s = 'A only'" % t)
    other = new_id("isolated")
    props = api.execute(other, "import os\n('secret_%s' in globals(), os.path.exists('secret_%s.txt'), 'shared_marker' in globals())" % (t, t))
    assert props["result"] == "(False, False, False)", props
    assert "secret_%s.txt" % t not in api.list_files(other)
    r = api.download(other, "secret_%s.txt" % t)
    assert r.status_code == 404 and b"A only" not in r.content
    # B writing a same-named file does not touch A's.
    assert api.upload(other, "secret_%s.txt" % t, b"B's own").status_code == 200
    assert api.download(shared_id, "secret_%s.txt" % t).content == b"A only"


def test_concurrent_sessions_run_in_parallel(api, shared_id):
    other = new_id("parallel")
    api.execute(other, "import time")  # allocate before timing
    api.execute(shared_id, "import time")
    results = {}

    def run(identifier):
        results[identifier] = api.execute(identifier, "import time\nt0 = time.time()\ntime.sleep(2)\nround(time.time() - t0, 1)")

    threads = [threading.Thread(target=run, args=(i,)) for i in (shared_id, other)]
    start = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    elapsed = time.monotonic() - start
    assert all(results[i]["status"] == "Success" and results[i]["result"] >= 2.0 for i in (shared_id, other)), results
    assert elapsed < 3.5, elapsed


def test_same_identifier_first_calls_share_one_session_and_crash_recovers(api):
    identifier = new_id("shared-first")
    results = []

    def run():
        results.append(api.execute(identifier, "import os, time\ntime.sleep(0.5)\nos.getpid()"))

    threads = [threading.Thread(target=run) for _ in range(4)]
    start = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    elapsed = time.monotonic() - start
    assert len(results) == 4 and all(p["status"] == "Success" for p in results), results
    assert len({p["result"] for p in results}) == 1, results  # one kernel
    assert elapsed >= 2.0, elapsed  # one kernel runs one cell at a time

    # The kernel process dies: the call fails cleanly and the identifier gets a fresh session.
    api.execute(identifier, "before_crash = 1")
    r = api.execute_raw(identifier, "import os\nos._exit(3)")
    assert r.status_code >= 500 and error_code(r), r.text
    props = api.execute(identifier, "'before_crash' in globals()")
    assert props["status"] == "Success" and props["result"] is False


# -- the tiny pool: upload limit, session cap, cooldown reaping ----------------------------------


def test_tiny_pool_limit_cap_and_reap(api):
    first, second = new_id("tiny1"), new_id("tiny2")
    assert api.execute(first, "x = 41\nx + 1", pool="tiny")["result"] == 42

    # Upload limit (1 MiB on this pool): over it is 413 JSON, under it works.
    r = api.upload(first, "too_big.bin", os.urandom(TINY_UPLOAD_LIMIT + 4096), pool="tiny")
    assert r.status_code == 413, r.text[:300]
    assert error_code(r)
    assert "too_big.bin" not in api.list_files(first, pool="tiny")
    exact = os.urandom(TINY_UPLOAD_LIMIT)
    r = api.upload(first, "ok.bin", exact, pool="tiny")
    assert r.status_code == 200, r.text[:300]
    assert r.json()["value"][0]["properties"]["size"] == len(exact)
    r = api.upload(first, "one_more.bin", exact + b"!", pool="tiny")
    assert r.status_code == 413 and error_code(r)

    # Chunked (no Content-Length): the limit is enforced while streaming, the partial file dropped.
    def chunks():
        yield b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="chunked.bin"\r\n\r\n'
        for _ in range(24):
            yield b"a" * 65536
        yield b"\r\n--zzz--\r\n"

    r = api.http.post(api.url("files/upload", first, "tiny"), data=chunks(),
                      headers={"Content-Type": "multipart/form-data; boundary=zzz"}, timeout=60)
    assert r.status_code == 413 and error_code(r), r.text[:300]
    assert sorted(api.list_files(first, pool="tiny")) == ["ok.bin"]
    assert api.download(first, "ok.bin", pool="tiny").content == exact

    # maxConcurrentSessions 1: a second identifier is refused while the first lives.
    r = api.execute_raw(second, "1", pool="tiny")
    assert r.status_code == 404, r.text
    assert error_code(r) == "SessionPoolMaxSessionsReached"

    # Once `first` has been idle for the cooldown it is reaped and `second` gets in.
    time.sleep(TINY_COOLDOWN)
    deadline = time.monotonic() + 15
    while True:
        r = api.execute_raw(second, "'x' in globals(), __import__('os').listdir('.')", pool="tiny")
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        assert r.status_code == 404 and error_code(r) == "SessionPoolMaxSessionsReached", r.text
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    assert r.json()["properties"]["result"] == "(False, [])"  # a fresh sandbox, not first's

    # And after `second` idles out, `first` comes back as a brand-new session: x is gone.
    time.sleep(TINY_COOLDOWN)
    deadline = time.monotonic() + 15
    while True:
        r = api.execute_raw(first, "x", pool="tiny")
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    props = r.json()["properties"]
    assert props["status"] == "Failure" and "NameError" in props["stderr"], props
    assert "ok.bin" not in api.list_files(first, pool="tiny")
