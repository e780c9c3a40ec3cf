"""Fixtures for the guest agent tests (helpers live in agent_support.py)."""

import pytest

from agent_support import AgentProcess


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    proc = AgentProcess(tmp_path_factory.mktemp("agent-cwd"))
    yield proc
    proc.close()


@pytest.fixture
def fresh_agent(tmp_path):
    procs = []

    def start(**kwargs):
        p = AgentProcess(tmp_path, **kwargs)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()
