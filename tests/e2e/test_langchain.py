"""The real LangChain client (`langchain-azure-dynamic-sessions` 1.0.4) against the server.

All tests share one tool, so one identifier on the python pool (see test_http_api.py's budget).
"""

import base64
import io
import json
import os
import threading
import uuid

import warnings

import pytest
import requests
from langchain_core.messages import ToolMessage

with warnings.catch_warnings():  # the package warns that it is deprecated, on import
    warnings.simplefilter("ignore", DeprecationWarning)
    from langchain_azure_dynamic_sessions import SessionsPythonREPLTool

from e2e_helpers import png_size

PLOT = (
    "import matplotlib.pyplot as plt\n"
    "fig = plt.figure(figsize=(3, 2), dpi=100)\n"
    "plt.bar(['a', 'b'], [3, 5])\n"
    "plt.show()\n"
)


@pytest.fixture(scope="module")
def tool(server):
    return SessionsPythonREPLTool(
        pool_management_endpoint=server.pool_url("python"),
        access_token_provider=lambda: server.key,
        session_id="e2e-langchain-" + str(uuid.uuid4()),
    )


def test_execute_keeps_state(tool):
    first = tool.execute("lc_value = 6\nprint('set')")
    assert first["status"] == "Success" and first["stdout"] == "set\n" and first["result"] == ""
    second = tool.execute("lc_value * 7")
    assert second["status"] == "Success"
    assert second["result"] == 42 and second["executionResult"] == 42


def test_invoke_and_run(tool):
    content = tool.invoke("print('hello from langchain')\n6 * 7")
    assert json.loads(content) == {"result": 42, "stdout": "hello from langchain\n", "stderr": ""}
    # The tool strips markdown fences and a leading "python" before sending.
    content = tool.run("```python\nprint(sum(range(10)))\nlc_value + 1\n```")
    assert json.loads(content) == {"result": 7, "stdout": "45\n", "stderr": ""}
    # As a tool call: a ToolMessage whose artifact is the raw `properties`.
    message = tool.invoke({"args": {"python_code": "2 ** 16"}, "id": "call-1", "name": tool.name, "type": "tool_call"})
    assert isinstance(message, ToolMessage)
    assert json.loads(message.content)["result"] == 65536
    assert message.artifact["status"] == "Success" and message.artifact["result"] == 65536


def test_exception_reaches_stderr(tool):
    content = json.loads(tool.run("raise KeyError('lc-missing')"))
    assert content["result"] == ""
    assert "KeyError" in content["stderr"] and "lc-missing" in content["stderr"]


def test_plot_drops_base64_in_content(tool):
    content, artifact = tool._run(PLOT)
    parsed = json.loads(content)
    assert parsed["result"] == {"type": "image", "format": "png"}  # base64_data removed
    assert parsed["stderr"] == ""
    image = artifact["result"]
    assert image["type"] == "image" and image["format"] == "png"
    width, height = png_size(base64.b64decode(image["base64_data"]))
    assert 200 <= width <= 300 and 120 <= height <= 200, (width, height)
    # remove_image_base64=False keeps it in the content.
    content, _ = tool._run(PLOT, remove_image_base64=False)
    data = base64.b64decode(json.loads(content)["result"]["base64_data"])
    assert png_size(data)[0] >= 200


def test_upload_list_download(tool):
    tag = uuid.uuid4().hex[:8]
    text = ("langchain upload %s\n" % tag).encode()
    meta = tool.upload_file(data=io.BytesIO(text), remote_file_path="lc_%s.txt" % tag)
    assert meta.filename == "lc_%s.txt" % tag
    assert meta.size_in_bytes == len(text)
    assert meta.full_path == "/mnt/data/lc_%s.txt" % tag

    blob = os.urandom(300_000)
    meta = tool.upload_file(data=io.BytesIO(blob), remote_file_path="dir %s/blob.bin" % tag)
    assert meta.filename == "dir %s/blob.bin" % tag and meta.size_in_bytes == len(blob)

    files = {f.filename: f for f in tool.list_files()}
    assert files["lc_%s.txt" % tag].size_in_bytes == len(text)
    assert files["dir %s/blob.bin" % tag].size_in_bytes == len(blob)
    assert files["dir %s/blob.bin" % tag].full_path == "/mnt/data/dir %s/blob.bin" % tag

    assert tool.download_file(remote_file_path="lc_%s.txt" % tag).read() == text
    assert tool.download_file(remote_file_path="dir %s/blob.bin" % tag).read() == blob
    # The kernel sees the upload too.
    assert tool.execute("len(open('dir %s/blob.bin', 'rb').read())" % tag)["result"] == len(blob)


def test_download_missing_file_raises_http_error(tool):
    with pytest.raises(requests.HTTPError) as info:
        tool.download_file(remote_file_path="no-such-file-%s.txt" % uuid.uuid4().hex)
    assert info.value.response.status_code == 404


def test_arm_style_endpoint_with_trailing_slash(server, tool):
    arm = SessionsPythonREPLTool(
        pool_management_endpoint=server.arm_url("python") + "/",
        access_token_provider=lambda: server.key,
        session_id=tool.session_id,
    )
    assert arm.execute("lc_value * 100")["result"] == 600


def test_delete_session(server, tool, monkeypatch):
    """LangChain's delete_session()/close() fire `DELETE session` (api-version 2025-10-02-preview)
    on a daemon thread and rotate the session id; a failed delete only logs a warning."""
    statuses = []
    done = threading.Event()
    real_delete = requests.delete

    def recording_delete(url, **kwargs):
        try:
            response = real_delete(url, **kwargs)
            statuses.append((url, response.status_code, response.text))
            return response
        finally:
            done.set()

    monkeypatch.setattr(requests, "delete", recording_delete)
    old_id = tool.session_id
    tool.execute("doomed = 1")
    tool.close()
    assert tool.session_id != old_id
    assert done.wait(30), "the delete request never finished"
    (url, status, text) = statuses[0]
    assert "/session?identifier=" in url and "api-version=2025-10-02-preview" in url
    tool.session_id = old_id  # look at the old session again
    if status == 404:
        # Not implemented yet: the server must at least answer JSON and keep the session.
        assert json.loads(text)["error"]["code"]
        assert tool.execute("doomed + 1")["result"] == 2
        pytest.xfail("DELETE session is not implemented: 404 %s" % text[:200])
    assert status in (200, 204), (status, text)
    after = tool.execute("doomed")
    assert after["status"] == "Failure" and "NameError" in after["stderr"]
