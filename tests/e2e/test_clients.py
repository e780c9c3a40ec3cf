"""The real Azure Dynamic Sessions clients from PyPI, unchanged, against a Sandpiper over HTTPS.

One server for this module (its own, not conftest's): self-signed TLS for localhost/127.0.0.1,
pools `python` (PythonLTS), `shell` (Shell) and `node` (NodeLTS). Each client is configured the
way docs/azure-api.md §13 F says and must produce real results (computed numbers, bytes that
round-trip, a PNG that decodes):

  - LlamaIndex  `llama-index-tools-azure-code-interpreter` AzureCodeInterpreterToolSpec (requests)
  - Semantic Kernel  `semantic-kernel` SessionsPythonTool (httpx.AsyncClient, https only)
  - AutoGen  `autogen-ext[azure]` ACADynamicSessionsCodeExecutor (aiohttp)
  - LangChain  `langchain-azure-dynamic-sessions` SessionsBashTool (requests, modern API, Shell)
  - raw httpx: asynchronous `executions` + Operation-Location polling; Node via `code/execute`

How each client trusts the self-signed certificate, without changing the client:
  - requests (LlamaIndex, LangChain): REQUESTS_CA_BUNDLE, set per test with monkeypatch;
  - Semantic Kernel: its own `http_client=httpx.AsyncClient(verify=<SSLContext trusting it>)`;
  - AutoGen: aiohttp builds its default verifying SSLContext once, at import time, so neither
    SSL_CERT_FILE nor REQUESTS_CA_BUNDLE reaches it; the fixture swaps that module-level context
    (`aiohttp.connector._SSL_CONTEXT_VERIFIED`) for one that trusts the certificate.

The client packages are pinned in tests/requirements.txt; a client that is not installed
skips its tests. Session budget on `python` (max 20): one identifier per client, four in all.

Client quirks met here (the clients', not the server's): LangChain's bash sanitizer strips a
leading "sh"/"bash" even inside a word ("sha256sum ..." is sent as "a256sum ..."); AutoGen's
get_available_packages() on a fresh executor fails (no token yet) until a first execution; AutoGen
0.7.5 checks only `!pip install` lines against its package probe, not imports.
"""

import asyncio
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import ssl
import struct
import subprocess
import tempfile
import time
import uuid
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urljoin

import httpx
import pytest
from e2e_helpers import mounts_under, sandpiper_binary, wait_for_port


def require_module(name):
    """The client's module; a missing client skips, unless SANDPIPER_REQUIRE_CLIENTS=1 (make test)."""
    import importlib
    import os as _os

    if _os.environ.get("SANDPIPER_REQUIRE_CLIENTS") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name)

REPO = Path(__file__).resolve().parents[2]
# Other servers on this machine use 230000 (make run), 237000 (conftest) and 238000 (bench);
# two servers must never share sandbox uids.
UID_BASE = 236000
POOLS = [
    {"name": "python", "type": "PythonLTS", "readySessionInstances": 2, "maxConcurrentSessions": 20},
    {"name": "shell", "type": "Shell", "readySessionInstances": 1},
    {"name": "node", "type": "NodeLTS", "readySessionInstances": 1},
]
MODERN = "2025-02-02-preview"

PLOT = (
    "import matplotlib.pyplot as plt\n"
    "fig = plt.figure(figsize=(3, 2), dpi=100)\n"
    "plt.plot([0, 1, 2], [2, 0, 1])\n"
    "plt.show()\n"
)


# --------------------------------------------------------------------------------------------
# helpers


def decode_png(data):
    """Decodes a PNG far enough to prove it is one: signature, chunk CRCs, IHDR, and the
    inflated IDAT stream having exactly height * (1 + rowbytes) bytes. Returns (width, height)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, "bad CRC in chunk %r" % kind
        chunks.append((kind, body))
        pos += 12 + length
        if kind == b"IEND":
            break
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert interlace == 0
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + (width * channels * depth + 7) // 8)
    return width, height



# --------------------------------------------------------------------------------------------
# the server


@pytest.fixture(scope="module")
def srv():
    binary = sandpiper_binary()

    tmp = tempfile.mkdtemp(prefix="sandpiper-clients-")
    os.chmod(tmp, 0o711)  # the sandbox uids traverse it to their bind-mounted data
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )
    data_dir = os.path.join(tmp, "data")
    config = os.path.join(tmp, "config.json")
    with open(config, "w") as f:
        json.dump({"server": {"sandboxUidBase": UID_BASE}, "pools": POOLS}, f)
    port_file = os.path.join(tmp, "port")
    log_path = os.path.join(tmp, "server.log")
    api_key = "clients-" + secrets.token_hex(16)
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [binary, "serve", "--data-dir", data_dir, "--port", "0", "--port-file", port_file, "--config", config,
         "--tls-cert", cert, "--tls-key", key, "--log-level", "debug"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, SANDPIPER_API_KEY=api_key),
    )
    try:
        port = wait_for_port(port_file, proc, log_path, timeout=120)
        base = "https://127.0.0.1:%d" % port
        assert ("https://127.0.0.1:%d" % port) in Path(log_path).read_text(errors="replace")
        # Optional: let the initial fill (4 sandboxes) finish, so the first tests do not pay it.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and Path(log_path).read_text(errors="replace").count("sandbox ready") < 4:
            time.sleep(0.2)
        yield SimpleNamespace(
            base=base,
            key=api_key,
            cert=cert,
            ssl_context=lambda: ssl.create_default_context(cafile=cert),
            tmp=tmp,
            log=lambda: Path(log_path).read_text(errors="replace"),
            pool_url=lambda pool="python": "%s/pools/%s" % (base, pool),
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        log.close()
        text = Path(log_path).read_text(errors="replace")
        leftover = mounts_under(data_dir)
        if not leftover:
            shutil.rmtree(tmp, ignore_errors=True)
        assert rc == 0, "sandpiper exited with %s after SIGTERM:\n%s" % (rc, text[-5000:])
        assert not leftover, "mounts left under %s: %s" % (data_dir, leftover)


@pytest.fixture
def ca_env(srv, monkeypatch):
    """`requests` (LlamaIndex, LangChain) reads REQUESTS_CA_BUNDLE on every call."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", srv.cert)
    monkeypatch.setenv("SSL_CERT_FILE", srv.cert)


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(verify=srv.ssl_context(), timeout=120, headers={"Authorization": "Bearer " + srv.key}) as client:
        yield client


def test_https_and_auth(srv, http):
    """The server really speaks TLS with the given certificate, and checks the key."""
    assert http.get(srv.base + "/healthz").status_code == 200
    with pytest.raises(httpx.ConnectError):  # not trusted without the certificate
        httpx.get(srv.base + "/healthz", timeout=10)
    r = httpx.get(srv.pool_url() + "/files?identifier=nokey-0000", verify=srv.ssl_context(), timeout=10)
    assert r.status_code == 401


# --------------------------------------------------------------------------------------------
# LlamaIndex


@pytest.fixture(scope="module")
def li_save_dir(srv):
    path = os.path.join(srv.tmp, "li-images")
    os.makedirs(path)
    return path


@pytest.fixture(scope="module")
def li(srv, li_save_dir):
    mod = require_module("llama_index.tools.azure_code_interpreter")
    spec = mod.AzureCodeInterpreterToolSpec(
        pool_management_endpoint=srv.pool_url("python"),
        session_id="e2e-li-" + str(uuid.uuid4()),
        local_save_path=li_save_dir,
    )
    spec.access_token_provider = lambda: srv.key  # no token-provider parameter
    return spec


def test_llamaindex_code_interpreter_keeps_state(li, ca_env):
    first = li.code_interpreter("```python\nli_base = 6\nprint('li ready')\n```")
    assert first["properties"]["status"] == "Success", first
    assert first["properties"]["stdout"] == "li ready\n"
    second = li.code_interpreter("li_base * 7")
    props = second["properties"]
    assert props["status"] == "Success" and props["result"] == 42 and props["stderr"] == "", second
    third = li.code_interpreter("import numpy as np\nfloat(np.arange(li_base).sum())")
    assert third["properties"]["result"] == 15.0
    failed = li.code_interpreter("1 / 0")
    assert failed["properties"]["status"] == "Failure" and "ZeroDivisionError" in failed["properties"]["stderr"]
    # As a LlamaIndex tool, the way an agent calls it.
    tools = {t.metadata.name: t for t in li.to_tool_list()}
    assert set(tools) == {"code_interpreter", "list_files"}
    out = tools["code_interpreter"].call(python_code="li_base ** 3")
    assert out.raw_output["properties"]["result"] == 216


def test_llamaindex_plot_saved_as_png(li, li_save_dir, ca_env):
    before = set(os.listdir(li_save_dir))
    response = li.code_interpreter(PLOT)
    result = response["properties"]["result"]
    assert result["type"] == "image" and result["format"] == "png", response
    assert result["saved_to_local_path"] is True and "base64_data" not in result
    new = sorted(set(os.listdir(li_save_dir)) - before)
    assert len(new) == 1 and new[0].startswith(li.session_id + "_") and new[0].endswith(".png"), new
    width, height = decode_png(Path(li_save_dir, new[0]).read_bytes())
    assert 200 <= width <= 300 and 120 <= height <= 200, (width, height)  # 3x2 in at 100 dpi, tight bbox


def test_llamaindex_files_round_trip(li, srv, ca_env):
    payload = bytes(range(256)) * 64 + "€ naïve\n".encode()
    local = Path(srv.tmp, "li-data.bin")
    local.write_bytes(payload)
    uploaded = li.upload_file(local_file_path=str(local))  # sends filename "/mnt/data/li-data.bin"
    assert [(m.filename, m.size_in_bytes, m.file_full_path) for m in uploaded] == [
        ("li-data.bin", len(payload), "/mnt/data/li-data.bin")
    ]
    seen = li.code_interpreter(
        "import hashlib\nhashlib.sha256(open('/mnt/data/li-data.bin', 'rb').read()).hexdigest()"
    )
    assert seen["properties"]["result"] == hashlib.sha256(payload).hexdigest()
    # A file the code makes, in a subdirectory.
    made = li.code_interpreter(
        "import os, pandas as pd\nos.makedirs('/mnt/data/li-out', exist_ok=True)\n"
        "pd.DataFrame({'n': range(5), 'sq': [i * i for i in range(5)]}).to_csv('/mnt/data/li-out/sq.csv', index=False)\n"
        "os.path.getsize('/mnt/data/li-out/sq.csv')"
    )
    csv_size = made["properties"]["result"]
    listed = {m.filename: m for m in li.list_files()}
    assert listed["li-data.bin"].size_in_bytes == len(payload)
    assert listed["li-data.bin"].file_full_path == "/mnt/data/li-data.bin"
    assert any(name.endswith("sq.csv") and m.size_in_bytes == csv_size for name, m in listed.items()), listed
    # download_file_to_local strips /mnt/data/ and sends the rest raw.
    copy = Path(srv.tmp, "li-copy.bin")
    assert li.download_file_to_local("/mnt/data/li-data.bin", str(copy)) is None
    assert copy.read_bytes() == payload
    csv = li.download_file_to_local("li-out/sq.csv").read().decode()
    assert csv.splitlines() == ["n,sq", "0,0", "1,1", "2,4", "3,9", "4,16"]


# --------------------------------------------------------------------------------------------
# Semantic Kernel


@pytest.fixture(scope="module")
def sk_env(srv):
    require_module("semantic_kernel.core_plugins.sessions_python_tool")
    work = os.path.join(srv.tmp, "sk")
    os.makedirs(work)
    return SimpleNamespace(session_id="e2e-sk-" + str(uuid.uuid4()), work=work)


def make_sk_tool(srv, sk_env, sent):
    """A SessionsPythonTool on its own AsyncClient (httpx clients are bound to one event loop)."""
    from semantic_kernel.core_plugins.sessions_python_tool import SessionsPythonTool
    from semantic_kernel.core_plugins.sessions_python_tool.sessions_python_settings import SessionsPythonSettings

    async def record(request):
        sent.append((request.method, request.url.path, request.headers.get("content-type", "")))

    return SessionsPythonTool(
        auth_callback=lambda: srv.key,
        pool_management_endpoint=srv.pool_url("python"),
        settings=SessionsPythonSettings(session_id=sk_env.session_id),
        http_client=httpx.AsyncClient(verify=srv.ssl_context(), timeout=240, event_hooks={"request": [record]}),
        enable_dangerous_file_uploads=True,
        allowed_upload_directories=[sk_env.work],
        allowed_download_directories=[sk_env.work],
    )


def test_semantic_kernel_execute_code(srv, sk_env):
    sent = []

    async def run():
        tool = make_sk_tool(srv, sk_env, sent)
        async with tool.http_client:
            first = await tool.execute_code("```python\nsk_values = [3, 4, 5]\nprint('sk ready')\n```")
            second = await tool.execute_code("sum(v * v for v in sk_values)")
            failed = await tool.execute_code("raise RuntimeError('sk-boom')")
            return first, second, failed

    first, second, failed = asyncio.run(run())
    assert first == "Status:\nSuccess\nResult:\n\nStdout:\nsk ready\n\nStderr:\n", first
    assert second == "Status:\nSuccess\nResult:\n50\nStdout:\n\nStderr:\n", second
    assert failed.startswith("Status:\nFailure\n") and "RuntimeError" in failed and "sk-boom" in failed
    assert all(url.endswith("/pools/python/code/execute") for _, url, _ in sent), sent


def test_semantic_kernel_files(srv, sk_env):
    payload = os.urandom(5000) + b"\r\n--not-a-boundary\r\n" + os.urandom(100)
    local = Path(sk_env.work, "sk-in.bin")
    local.write_bytes(payload)
    target = Path(sk_env.work, "sk-out.txt")
    sent = []

    async def run():
        tool = make_sk_tool(srv, sk_env, sent)
        async with tool.http_client:
            # An execution first: it sets Content-Type: application/json on the shared client,
            # so the upload below goes out as a multipart body under that header (SK's quirk).
            await tool.execute_code("import os\nos.makedirs('/mnt/data/sk dir', exist_ok=True)\n"
                                    "open('/mnt/data/sk dir/out #1.txt', 'w').write('x' * 7 + '\\n')")
            meta = await tool.upload_file(local_file_path=str(local))
            listed = await tool.list_files()
            check = await tool.execute_code(
                "import hashlib\nhashlib.sha256(open('/mnt/data/sk-in.bin', 'rb').read()).hexdigest()")
            data = await tool.download_file(remote_file_name="sk-in.bin")
            await tool.download_file(remote_file_name="sk dir/out #1.txt", local_file_path=str(target))
            return meta, listed, check, data

    meta, listed, check, data = asyncio.run(run())
    upload = [s for s in sent if s[1].endswith("/files/upload")]
    assert upload and upload[0][2] == "application/json", sent  # the quirk really happened
    assert meta.filename == "sk-in.bin" and meta.full_path == "/mnt/data/sk-in.bin"
    assert meta.size_in_bytes == len(payload)
    names = {m.filename: m.size_in_bytes for m in listed}
    assert names["sk-in.bin"] == len(payload)
    assert "Result:\n%s\n" % hashlib.sha256(payload).hexdigest() in check
    assert data.read() == payload
    assert target.read_text() == "xxxxxxx\n"


# --------------------------------------------------------------------------------------------
# AutoGen


class StaticToken:
    """What ACADynamicSessionsCodeExecutor wants: get_token(*scopes) -> object with .token."""

    def __init__(self, key):
        self.key = key
        self.scopes = []

    def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        return AccessToken(self.key, int(time.time()) + 3600)


@pytest.fixture(scope="module")
def ag(srv):
    mod = require_module("autogen_ext.code_executors.azure")
    import aiohttp.connector

    context = ssl.create_default_context(cafile=srv.cert)
    context.set_alpn_protocols(("http/1.1",))
    work = os.path.join(srv.tmp, "autogen")
    os.makedirs(work)
    credential = StaticToken(srv.key)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aiohttp.connector, "_SSL_CONTEXT_VERIFIED", context)
        executor = mod.ACADynamicSessionsCodeExecutor(
            pool_management_endpoint=srv.pool_url("python"),
            credential=credential,
            timeout=120,
            work_dir=work,
            session_id="e2e-ag-" + str(uuid.uuid4()),
        )
        yield SimpleNamespace(executor=executor, work=work, credential=credential)


def ag_run(ag, *blocks):
    from autogen_core import CancellationToken
    from autogen_core.code_executor import CodeBlock

    code_blocks = [CodeBlock(code=code, language=lang) for lang, code in blocks]
    return asyncio.run(ag.executor.execute_code_blocks(code_blocks, CancellationToken()))


def test_autogen_execute(ag):
    result = ag_run(ag, ("python", "ag_n = 10\nprint(sum(i * i for i in range(ag_n)))"), ("py", "ag_n * 7"))
    assert result.exit_code == 0, result
    assert result.output == "285\n70", result.output  # stderr + stdout + str(result), per block
    assert ag.credential.scopes == [("https://dynamicsessions.io/.default",)]
    # The executor ran os.chdir('/mnt/data') before the first block.
    result = ag_run(ag, ("python", "import os\nos.getcwd()"))
    assert result.exit_code == 0 and result.output == "/mnt/data", result


def test_autogen_package_probe(ag):
    """AutoGen lists the packages once per session with pkg_resources and parses the
    pretty-printed list repr (`.strip("[]").split(",\\n")`)."""
    from autogen_core import CancellationToken

    ag_run(ag, ("python", "None"))  # the first execution runs the probe (and fetches the token)
    packages = asyncio.run(ag.executor.get_available_packages(CancellationToken()))  # its cached set
    assert {"numpy", "pandas", "matplotlib", "scipy", "scikit-learn", "sympy"} <= packages, sorted(packages)[:20]
    assert len(packages) > 30
    # 0.7.5 checks `!pip install` lines (not imports) against that set. The line sits in a string
    # so that the kernel does not run pip.
    code = (
        'ag_note = """\n!pip install numpy, pandas\n"""\n'
        "import numpy as np, pandas as pd\n"
        "frame = pd.DataFrame({'x': np.arange(1, 5)})\n"
        "print(frame['x'].pow(2).sum())\n"
        "int(frame['x'].prod())"
    )
    result = ag_run(ag, ("python", code))
    assert result.exit_code == 0, result
    assert result.output == "30\n24", result.output
    missing = ag_run(ag, ("python", 'ag_note = """\n!pip install surely-not-installed-pkg\n"""\n1'))
    assert missing.exit_code == 1 and "unavailable" in missing.output and "surely-not-installed-pkg" in missing.output


def test_autogen_package_probe_output_is_clean(ag):
    """Every name AutoGen parsed from the probe must be a plain package name. (The raw view of the
    same bug: the probe's first run in a session must answer stderr "".)"""
    from autogen_core import CancellationToken

    ag_run(ag, ("python", "None"))
    packages = asyncio.run(ag.executor.get_available_packages(CancellationToken()))  # the cached set
    assert {"numpy", "pandas"} <= packages
    dirty = [p for p in packages if not p or any(c in p for c in "[]'\n :")]
    assert not dirty, dirty


def test_autogen_failure_exit_code(ag):
    result = ag_run(ag, ("python", "print('before')\nraise ValueError('ag-boom')"))
    assert result.exit_code == 1, result
    assert "before\n" in result.output and "ValueError" in result.output and "ag-boom" in result.output
    # An unsupported language never reaches the server.
    result = ag_run(ag, ("bash", "echo hi"))
    assert result.exit_code == 1 and "unknown language bash" in result.output


def test_autogen_files(ag):
    from autogen_core import CancellationToken

    payload = "\n".join("%d,%d" % (i, i * 3) for i in range(100)).encode() + b"\n"
    Path(ag.work, "ag-in.csv").write_bytes(payload)
    asyncio.run(ag.executor.upload_files(["ag-in.csv"], CancellationToken()))
    result = ag_run(ag, (
        "python",
        "import pandas as pd\n"
        "df = pd.read_csv('ag-in.csv', header=None, names=['a', 'b'])\n"  # relative: cwd is /mnt/data
        "open('ag-out.txt', 'w').write(str(int(df['b'].sum())))\n"
        "len(df)",
    ))
    assert result.exit_code == 0 and result.output == "100", result
    files = asyncio.run(ag.executor.get_file_list(CancellationToken()))
    assert {"ag-in.csv", "ag-out.txt"} <= set(files), files
    os.remove(os.path.join(ag.work, "ag-in.csv"))
    paths = asyncio.run(ag.executor.download_files(["ag-out.txt", "ag-in.csv"], CancellationToken()))
    assert paths == [os.path.join(ag.work, "ag-out.txt"), os.path.join(ag.work, "ag-in.csv")]
    assert Path(paths[0]).read_text() == str(3 * sum(range(100)))
    assert Path(paths[1]).read_bytes() == payload


# --------------------------------------------------------------------------------------------
# LangChain SessionsBashTool (modern API on the Shell pool)


@pytest.fixture(scope="module")
def bash_tool(srv):
    mod = require_module("langchain_azure_dynamic_sessions")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mod.SessionsBashTool(
            pool_management_endpoint=srv.pool_url("shell"),
            access_token_provider=lambda: srv.key,
            session_id="e2e-bash-" + str(uuid.uuid4()),
        )


def test_langchain_bash_runs_commands(bash_tool, ca_env):
    content = bash_tool.invoke("```bash\necho hello; echo $((6 * 7)); pwd\n```")
    assert json.loads(content) == {"stdout": "hello\n42\n/mnt/data\n", "stderr": "", "exitCode": 0}
    # Files persist in the session between commands.
    content = json.loads(bash_tool.invoke("seq 1 100 > nums.txt && awk '{s += $1} END {print s}' /mnt/data/nums.txt"))
    assert content == {"stdout": "5050\n", "stderr": "", "exitCode": 0}
    raw = bash_tool.execute("printf abc | sha256sum | cut -c1-16")
    assert raw["status"] == "0" and raw["identifier"] == bash_tool.session_id, raw
    assert raw["result"]["stdout"] == hashlib.sha256(b"abc").hexdigest()[:16] + "\n"


def test_langchain_bash_exit_codes(bash_tool, ca_env):
    content = json.loads(bash_tool.invoke("echo out; echo oops >&2; exit 3"))
    assert content["stdout"] == "out\n" and content["exitCode"] == 3, content
    # Sandpiper keeps one bash per session; after `exit` it starts a new one and says so on stderr.
    assert content["stderr"].startswith("oops\n"), content
    content = json.loads(bash_tool.invoke("ls /definitely/missing"))
    assert content["exitCode"] == 2 and "No such file" in content["stderr"] and content["stdout"] == ""
    content = json.loads(bash_tool.invoke("definitely-not-a-command"))
    assert content["exitCode"] == 127 and "not found" in content["stderr"]
    # As a tool call: a ToolMessage whose artifact is the raw response.
    message = bash_tool.invoke({"args": {"bash_command": "false"}, "id": "call-1", "name": bash_tool.name, "type": "tool_call"})
    assert json.loads(message.content)["exitCode"] == 1 and message.artifact["status"] == "1"


def test_langchain_bash_files(bash_tool, srv, ca_env):
    payload = os.urandom(3000) + b"\x00\xff tail\n"
    meta = bash_tool.upload_file(data=io.BytesIO(payload), remote_file_path="bash-in.bin")
    assert (meta.filename, meta.size_in_bytes) == ("bash-in.bin", len(payload))
    local = Path(srv.tmp, "bash-local.txt")
    local.write_text("from a local file\n")
    meta = bash_tool.upload_file(local_file_path=str(local))
    assert (meta.filename, meta.size_in_bytes) == ("bash-local.txt", 18)
    # (Not starting with "sha256sum": the tool's sanitizer strips a leading "sh" even mid-word.)
    content = json.loads(bash_tool.invoke("cat bash-local.txt; sha256sum bash-in.bin | cut -d' ' -f1"))
    assert content["stdout"] == "from a local file\n" + hashlib.sha256(payload).hexdigest() + "\n", content
    bash_tool.invoke("mkdir -p out && tr a-z A-Z < bash-local.txt > out/upper.txt")
    listed = {m.filename: m.size_in_bytes for m in bash_tool.list_files()}
    assert listed["bash-in.bin"] == len(payload) and listed["bash-local.txt"] == 18, listed
    assert bash_tool.download_file(remote_file_path="bash-in.bin").read() == payload
    target = Path(srv.tmp, "bash-upper.txt")
    data = bash_tool.download_file(remote_file_path="out/upper.txt", local_file_path=str(target))
    assert data.read() == b"FROM A LOCAL FILE\n" and target.read_bytes() == b"FROM A LOCAL FILE\n"


def test_langchain_bash_close_deletes_session(srv, http, ca_env):
    mod = require_module("langchain_azure_dynamic_sessions")
    tool = mod.SessionsBashTool(
        pool_management_endpoint=srv.pool_url("shell"),
        access_token_provider=lambda: srv.key,
        session_id="e2e-bash-close-" + str(uuid.uuid4()),
    )
    with tool:
        old = tool.session_id
        assert json.loads(tool.invoke("echo marker > m.txt; cat m.txt"))["stdout"] == "marker\n"
        session = http.get(srv.pool_url("shell") + "/session", params={"identifier": old, "api-version": MODERN})
        assert session.status_code == 200 and session.json()["identifier"] == old
    assert tool.session_id != old  # close() rotated it, and deletes the old one on a thread
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        listed = http.get(srv.pool_url("shell") + "/listSessions", params={"api-version": MODERN}).json()
        if old not in {s["identifier"] for s in listed["sessions"]}:
            break
        time.sleep(0.2)
    else:
        pytest.fail("session %s still listed after close(): %s" % (old, listed))
    # The identifier comes back as a fresh session: the old file is gone.
    r = http.post(srv.pool_url("shell") + "/executions", params={"identifier": old, "api-version": MODERN},
                  json={"shellCommand": "ls"})
    assert r.status_code == 200 and r.json()["status"] == "0" and r.json()["result"]["stdout"] == "", r.text


# --------------------------------------------------------------------------------------------
# Raw HTTP: asynchronous executions, and the Node pool


def test_async_execution_polled_to_completion(srv, http):
    identifier = "e2e-raw-async-" + str(uuid.uuid4())
    body = {
        "codeInputType": "Inline",
        "executionType": "Asynchronous",
        "code": "import time\ntime.sleep(1.5)\nprint('async done')\nsum(i * i for i in range(101))",
    }
    r = http.post(srv.pool_url("python") + "/executions", params={"identifier": identifier, "api-version": MODERN}, json=body)
    assert r.status_code in (200, 201, 202), r.text
    started = r.json()
    assert started["status"] in ("NotStarted", "Running"), started
    assert started["identifier"] == identifier and started["executionType"] == "Asynchronous"
    assert r.headers["operation-id"] == started["id"]
    location = r.headers["Operation-Location"]
    assert started["id"] in location and "identifier=" in location
    url = urljoin(srv.pool_url("python") + "/", location)
    polls, deadline = 0, time.monotonic() + 60
    while True:
        p = http.get(url)
        assert p.status_code == 200, p.text
        state = p.json()
        polls += 1
        if state["status"] not in ("NotStarted", "Running"):
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert polls >= 2  # it was really running in the background
    assert state["id"] == started["id"] and state["status"] == "Succeeded", state
    assert state["result"]["stdout"] == "async done\n" and state["result"]["stderr"] == ""
    assert state["result"]["executionResult"] == 338350
    # The session is an ordinary one: its state is there for the next (synchronous) call.
    r = http.post(srv.pool_url("python") + "/executions", params={"identifier": identifier, "api-version": MODERN},
                  json={"code": "time.time() > 0", "executionType": "Synchronous"})
    assert r.status_code == 200 and r.json()["status"] == "Succeeded" and r.json()["result"]["executionResult"] is True


def test_node_pool_legacy_execute(srv, http):
    identifier = "e2e-raw-node-" + str(uuid.uuid4())
    params = {"identifier": identifier, "api-version": "2024-02-02-preview"}

    def execute(code):
        body = {"properties": {"codeInputType": "inline", "executionType": "synchronous", "code": code}}
        r = http.post(srv.pool_url("node") + "/code/execute", params=params, json=body)
        assert r.status_code == 200, r.text
        return r.json()["properties"]

    first = execute("const xs = [1, 2, 3, 4];\nconsole.log('node', process.version.startsWith('v'));\n"
                    "xs.reduce((a, b) => a + b * b, 0)")
    assert first["status"] == "Success", first
    assert first["stdout"] == "node true\n"
    assert first["result"] == 30 and first["executionResult"] == 30, first
    second = execute("xs.map(x => x * 10).join('-')")  # state across calls
    assert second["result"] == "10-20-30-40" and second["executionResult"] == "10-20-30-40", second
    failed = execute("null.boom")
    assert failed["status"] == "Failure" and "TypeError" in failed["stderr"], failed
    assert "result" in failed and "executionResult" in failed
