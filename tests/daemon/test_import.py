"""`sessions.importer.import_seed`: the seed tool's `.sessions/` files (written here as the
seed wrote them: its dataclasses' to_dict(), naive local `datetime.now().isoformat()`
times, json.dump) brought into a real daemon and into directory mode, checked through the
SDK; a second import changes nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from sessions import (
    CollaborationHub,
    InvalidArgument,
    MemoryType,
    MessageType,
    SessionRegistry,
    SessionStatus,
    SharedMemory,
)
from sessions.importer import (
    MEMORY_FILE,
    MESSAGES_FILE,
    SESSIONS_FILE,
    ImportReport,
    _remaining_ttl,
    import_seed,
)

def ago(seconds: float) -> str:
    """A time as the seed stamped it: naive local time."""
    return (datetime.now() - timedelta(seconds=seconds)).isoformat()


def session(sid: str, name: str, kind: str, status: str, started: float, pinged: float,
            **extra: Any) -> dict[str, Any]:
    return {"session_id": sid, "agent_name": name, "agent_type": kind, "status": status,
            "started_at": ago(started), "last_ping": ago(pinged), "human_user": "Alexa",
            "location": "alexa-laptop", "capabilities": [], "current_task": None,
            "metadata": {}, **extra}


def message(mid: str, type: str, frm: str, to: str | None, subject: str, body: str,
            at: float, data: dict[str, Any] | None = None,
            in_reply_to: str | None = None) -> dict[str, Any]:
    return {"message_id": mid, "type": type, "from_session": frm, "to_session": to,
            "subject": subject, "body": body, "data": data or {}, "timestamp": ago(at),
            "in_reply_to": in_reply_to}


def entry(eid: str, type: str, key: str, value: Any, sid: str, at: float,
          ttl: float | None = None, tags: list[str] | None = None) -> dict[str, Any]:
    return {"entry_id": eid, "type": type, "key": key, "value": value, "session_id": sid,
            "timestamp": ago(at), "ttl": ttl, "tags": tags or [], "metadata": {}}


# The seed document's own example data. Ids are uuid4 strings, as the seed made them.
REQ, REP, BCAST = ("5f0c7e1a-3b2d-4c6e-9f10-2a3b4c5d6e7f", "8a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
                   "c3d4e5f6-a7b8-4c9d-8e0f-1a2b3c4d5e6f")
WAITS, BADTYPE = "d4e5f6a7-b8c9-4d0e-9f1a-2b3c4d5e6f70", "e5f6a7b8-c9d0-4e1f-8a2b-3c4d5e6f7081"
TASK_OLD, TASK_NEW = "0b1c2d3e-4f5a-4b6c-8d7e-8f9a0b1c2d3e", "1c2d3e4f-5a6b-4c7d-9e8f-9a0b1c2d3e4f"
API, DEPLOY, SCRATCH = ("2d3e4f5a-6b7c-4d8e-8f9a-0b1c2d3e4f5a",
                        "3e4f5a6b-7c8d-4e9f-9a0b-1c2d3e4f5a6b",
                        "4f5a6b7c-8d9e-4f0a-8b1c-2d3e4f5a6b7c")
MEMORY_KEYS = ("current_task", "api_endpoints", "deploy_state", "scratch")


@dataclass
class Seed:
    """The seed's three files' contents, stamped relative to when they are made (a ttl
    counts from the entry's time, so a test writes them just before it imports)."""

    sessions: dict[str, Any]
    messages: list[dict[str, Any]]
    memory: dict[str, list[dict[str, Any]]]


def make_seed() -> Seed:
    sessions = {
        "cece-001": session("cece-001", "Cece", "Claude", "active", 3600, 20,
                            capabilities=["python", "review", "planning"]),
        "agent-002": session("agent-002", "Agent-2", "GPT-4", "working", 1800, 10,
                             current_task="Code review", metadata={"model": "gpt-4"}),
        # silent for a day: imported as the seed had it, and stale (OFFLINE) per the contract
        "old-003": session("old-003", "Old", "Claude", "idle", 2 * 86400, 86400),
        "broken-004": {**session("broken-004", "Broken", "Claude", "active", 60, 5),
                       "started_at": "last tuesday"},
    }
    # Not in time order on purpose: the import must not depend on the file's order.
    messages = [
        message(BCAST, "broadcast", "cece-001", None, "Deployment starting",
                "Starting production deployment in 5 minutes", 120),
        message(REP, "response", "agent-002", "cece-001", "Re: Need code review",
                "Sure, I can help!", 300, in_reply_to=REQ),
        message(REQ, "request", "cece-001", "agent-002", "Need code review",
                "Can you review my Python changes?", 600, {"task_id": "123", "priority": "high"}),
        message(WAITS, "request", "cece-001", "reviewer-002", "Code review needed",
                "Please review PR #123", 60, {"pr": 123, "files": ["main.py", "test.py"]}),
        message(BADTYPE, "chat", "agent-002", "cece-001", "hi", "an old build's type", 30),
    ]
    memory = {
        "current_task": [
            entry(TASK_NEW, "state", "current_task",
                  {"name": "Build collaboration", "status": "in_progress"}, "cece-001", 100,
                  tags=["task", "active"]),
            entry(TASK_OLD, "state", "current_task", "Building collaboration system",
                  "cece-001", 3000, tags=["task", "active"]),
        ],
        "api_endpoints": [entry(API, "fact", "api_endpoints",
                                ["GET /users", "POST /users", "DELETE /users/:id"], "session-1",
                                2000, tags=["api", "documentation"])],
        "deploy_state": [entry(DEPLOY, "task", "deploy_state", {"stage": "testing"},
                               "agent-002", 600, ttl=3600, tags=["deploy"])],
        "scratch": [entry(SCRATCH, "note", "scratch", "temporary", "agent-002", 3600, ttl=60)],
    }
    return Seed(sessions, messages, memory)


def write_seed(root: Path, sessions: Any, messages: Any, memory: Any) -> Path:
    """A `.sessions/` directory under `root` as the seed tool left it (None: no file)."""
    base = root / ".sessions"
    for name, data in ((SESSIONS_FILE, sessions), (MESSAGES_FILE, messages),
                       (MEMORY_FILE, memory)):
        if data is not None:
            (base / name).parent.mkdir(parents=True, exist_ok=True)
            (base / name).write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return base


@dataclass
class Api:
    registry: Any
    hub: Any
    memory: Any


def directory_api(path: Path) -> Api:
    registry = SessionRegistry(str(path))
    return Api(registry, CollaborationHub(registry), SharedMemory(str(path)))


@pytest.fixture(params=["daemon", "directory"])
def api(request: pytest.FixtureRequest, short_tmp: Path) -> Api:
    if request.param == "daemon":
        d = request.getfixturevalue("daemon")
        return Api(d.registry(), d.hub(), d.memory())
    return directory_api(short_tmp / "store")


def run(path: Path, api: Api) -> ImportReport:
    return import_seed(path, api.registry, api.hub, api.memory)


def counts(report: ImportReport) -> dict[str, tuple[int, int, int]]:
    return {n: (k.imported, k.already, len(k.skipped)) for n, k in report.kinds.items()}


def skips(report: ImportReport) -> dict[Any, str]:
    return {(s.file, s.item): s.reason for s in report.skipped}


def epoch(t: str) -> float:
    return datetime.fromisoformat(t).timestamp()


def snapshot(api: Api) -> dict[str, Any]:
    """Everything a second import could change, read through the SDK."""
    return {
        "registry": api.registry.get_stats(), "hub": api.hub.get_stats(),
        "memory": api.memory.get_stats(),
        "sessions": [s.to_dict() for s in api.registry.list_sessions(include_offline=True)],
        "inboxes": {sid: [m.message_id for m in api.hub.get_messages(sid)]
                    for sid in ("cece-001", "agent-002", "old-003", "reviewer-002")},
        "entries": {k: [e.to_dict() for e in api.memory.get_all(k)] for k in MEMORY_KEYS},
    }


def check_sessions(api: Api, seed: Seed) -> None:
    live = api.registry.list_sessions()
    assert [s.session_id for s in live] == ["cece-001", "agent-002"]      # started_at order
    everyone = api.registry.list_sessions(include_offline=True)
    assert [s.session_id for s in everyone] == ["old-003", "cece-001", "agent-002"]
    cece, agent = api.registry.get("cece-001"), api.registry.get("agent-002")
    assert cece.status is SessionStatus.ACTIVE and agent.status is SessionStatus.WORKING
    assert api.registry.get("old-003").status is SessionStatus.OFFLINE    # a day without ping
    assert api.registry.get("broken-004") is None
    for s in (cece, agent):
        was = seed.sessions[s.session_id]
        assert abs(epoch(s.started_at) - epoch(was["started_at"])) < 0.01
        assert abs(epoch(s.last_ping) - epoch(was["last_ping"])) < 0.01
        assert (s.agent_name, s.agent_type, s.human_user, s.location) == (
            was["agent_name"], was["agent_type"], "Alexa", "alexa-laptop")
    assert cece.capabilities == ["python", "review", "planning"]
    assert agent.current_task == "Code review" and agent.metadata == {"model": "gpt-4"}
    assert [s.session_id for s in api.registry.find_sessions(capability="review")] == ["cece-001"]


def check_messages(api: Api, seed: Seed) -> None:
    inbox = api.hub.get_messages("agent-002")
    assert [m.message_id for m in inbox] == [REQ, BCAST]                  # oldest first
    req = inbox[0]
    assert (req.type, req.from_session, req.to_session, req.subject, req.data) == (
        MessageType.REQUEST, "cece-001", "agent-002", "Need code review",
        {"task_id": "123", "priority": "high"})
    was = {m["message_id"]: m for m in seed.messages}
    assert [m.timestamp for m in inbox] == [was[REQ]["timestamp"], was[BCAST]["timestamp"]]
    assert [m.message_id for m in api.hub.get_messages("cece-001")] == [REP]
    thread = api.hub.get_conversation(REP)
    assert [m.message_id for m in thread] == [REQ, REP]
    assert thread[1].in_reply_to == REQ and thread[1].type is MessageType.RESPONSE
    assert api.hub.get_conversation(BADTYPE) == []
    assert api.hub.get_message_status(WAITS)["state"] == "waiting"        # nobody is reviewer-002
    assert inbox[1].format_signal() == "📡 cece-001 → ALL : [COLLABORATION] Deployment starting"
    by_type = api.hub.get_stats()["by_type"]
    assert (by_type["request"], by_type["response"], by_type["broadcast"]) == (2, 1, 1)


def check_memory(api: Api, seed: Seed) -> None:
    assert api.memory.get("current_task") == {"name": "Build collaboration",
                                              "status": "in_progress"}
    assert [e.entry_id for e in api.memory.get_all("current_task")] == [TASK_NEW, TASK_OLD]
    api_entry = api.memory.get_entry("api_endpoints")
    assert api_entry.type is MemoryType.FACT and api_entry.session_id == "session-1"
    assert api_entry.value == ["GET /users", "POST /users", "DELETE /users/:id"]
    assert api_entry.timestamp == seed.memory["api_endpoints"][0]["timestamp"]
    assert [e.entry_id for e in api.memory.get_by_tags(["documentation"])] == [API]
    assert {e.entry_id for e in api.memory.get_by_tags(["task", "active"], match_all=True)} == {
        TASK_NEW, TASK_OLD}
    deploy = api.memory.get_entry("deploy_state")
    assert deploy.type is MemoryType.TASK and deploy.value == {"stage": "testing"}
    # What was left of its hour (written 10 min ago), counted from the import; the slack
    # is for a slow machine between writing the files and importing them.
    assert 2940 <= deploy.ttl <= 3000
    assert api.memory.get("scratch") is None and api.memory.get_all("scratch") == []
    stats = api.memory.get_stats()
    assert stats["total_entries"] == 4 and stats["unique_keys"] == 3


def write_full_seed(root: Path) -> Seed:
    seed = make_seed()
    write_seed(root, seed.sessions, seed.messages, seed.memory)
    return seed


def test_import_seed_files_then_again(api: Api, short_tmp: Path) -> None:
    seed = write_full_seed(short_tmp / "project")
    report = run(short_tmp / "project", api)          # the directory holding .sessions/

    assert report.source == str(short_tmp / "project" / ".sessions")
    assert counts(report) == {"sessions": (3, 0, 1), "messages": (4, 0, 1), "memory": (4, 0, 1)}
    assert {k.status for k in report.kinds.values()} == {"read"}
    reasons = skips(report)
    assert set(reasons) == {(SESSIONS_FILE, "broken-004"), (MESSAGES_FILE, BADTYPE),
                            (MEMORY_FILE, SCRATCH)}
    assert "started_at" in reasons[SESSIONS_FILE, "broken-004"]
    assert "type must be one of" in reasons[MESSAGES_FILE, BADTYPE]
    assert "'chat'" in reasons[MESSAGES_FILE, BADTYPE]
    assert reasons[MEMORY_FILE, SCRATCH].startswith("expired")
    check_sessions(api, seed)
    check_messages(api, seed)
    check_memory(api, seed)

    before = snapshot(api)
    again = run(short_tmp / "project" / ".sessions", api)    # the directory itself
    assert counts(again) == {"sessions": (0, 3, 1), "messages": (0, 4, 1), "memory": (0, 4, 1)}
    assert skips(again) == reasons
    assert snapshot(api) == before

    out = json.loads(json.dumps(again.to_dict()))
    assert out["source"] == again.source
    assert out["memory"] == {"file": MEMORY_FILE, "status": "read", "imported": 0,
                             "already": 4, "skipped": 1,
                             "skips": [{"file": MEMORY_FILE, "item": SCRATCH,
                                        "reason": reasons[MEMORY_FILE, SCRATCH]}]}


def test_import_reaches_sessions_of_a_hub_kept_apart(short_tmp: Path) -> None:
    """The seed's CollaborationHub(registry, messages_path): messages imported into their
    own directory still reach the sessions imported into the registry's."""
    write_full_seed(short_tmp)
    registry = SessionRegistry(str(short_tmp / "reg"))
    hub = CollaborationHub(registry, messages_path=str(short_tmp / "msgs"))
    report = import_seed(short_tmp, registry, hub, SharedMemory(str(short_tmp / "mem")))
    assert counts(report)["messages"] == (4, 0, 1)
    assert [m.message_id for m in hub.get_messages("agent-002")] == [REQ, BCAST]
    assert hub.get_message_status(REQ)["state"] == "stored"


SESSION_SHAPES = {
    "map by id": lambda ss: {s["session_id"]: s for s in ss},
    "list": lambda ss: ss,
    "wrapped list": lambda ss: {"sessions": ss},
    "wrapped map": lambda ss: {"sessions": {s["session_id"]: s for s in ss}},
    "map by id, ids left out": lambda ss: {s["session_id"]: {k: v for k, v in s.items()
                                                             if k != "session_id"} for s in ss},
}
MEMORY_SHAPES = {
    "key to entries": lambda es: {e["key"]: [e] for e in es},
    "key to entry": lambda es: {e["key"]: e for e in es},
    "list": lambda es: es,
    "wrapped list": lambda es: {"entries": es},
    "wrapped map": lambda es: {"entries": {e["key"]: [e] for e in es}},
}


@pytest.mark.parametrize("memory_shape", list(MEMORY_SHAPES))
@pytest.mark.parametrize("session_shape", list(SESSION_SHAPES))
def test_container_shapes(short_tmp: Path, session_shape: str, memory_shape: str) -> None:
    seed = make_seed()
    ss = [seed.sessions["cece-001"], seed.sessions["agent-002"]]
    es = [seed.memory["api_endpoints"][0], seed.memory["deploy_state"][0]]
    base = write_seed(short_tmp, SESSION_SHAPES[session_shape](ss),
                      {"messages": [m for m in seed.messages if m["message_id"] in (REQ, REP)]},
                      MEMORY_SHAPES[memory_shape](es))
    api = directory_api(short_tmp / "store")
    report = run(base, api)
    assert counts(report) == {"sessions": (2, 0, 0), "messages": (2, 0, 0), "memory": (2, 0, 0)}
    assert [s.session_id for s in api.registry.list_sessions()] == ["cece-001", "agent-002"]
    assert [m.message_id for m in api.hub.get_conversation(REQ)] == [REQ, REP]
    assert api.memory.get_entry("api_endpoints").tags == ["api", "documentation"]
    assert api.memory.get_entry("deploy_state").entry_id == DEPLOY
    assert counts(run(base, api)) == {n: (0, 2, 0) for n in ("sessions", "messages", "memory")}


def test_missing_and_broken_files_do_not_stop_the_rest(short_tmp: Path) -> None:
    cece = make_seed().sessions["cece-001"]
    base = write_seed(short_tmp, sessions=[cece, 42, "agent-002"],
                      messages='[{"message_id": "5f0c7e1a", "type": "request", ', memory=None)
    api = directory_api(short_tmp / "store")
    report = run(base, api)
    assert (report.sessions.status, report.messages.status, report.memory.status) == (
        "read", "unreadable", "not found")
    assert counts(report) == {"sessions": (1, 0, 2), "messages": (0, 0, 1), "memory": (0, 0, 0)}
    reasons = skips(report)
    assert set(reasons) == {(SESSIONS_FILE, 1), (SESSIONS_FILE, 2), (MESSAGES_FILE, None)}
    assert "not a session record" in reasons[SESSIONS_FILE, 1]
    assert reasons[MESSAGES_FILE, None].startswith("not valid JSON")
    assert [s.session_id for s in api.registry.list_sessions()] == ["cece-001"]
    assert report.to_dict()["memory"]["status"] == "not found"

    (base / SESSIONS_FILE).write_text('"not a registry"')
    assert skips(run(base, api)) == {
        (SESSIONS_FILE, None): "expected a list or a map of sessions, not str",
        (MESSAGES_FILE, None): reasons[MESSAGES_FILE, None]}

    with pytest.raises(InvalidArgument):
        run(short_tmp / "nowhere", api)
    empty = short_tmp / "empty"
    empty.mkdir()
    assert {k.status for k in run(empty, api).kinds.values()} == {"not found"}


def test_bad_records_are_skipped_one_by_one(short_tmp: Path) -> None:
    """Records the SDK refuses are skipped one by one, the good ones beside them imported;
    a time with a zone counts in that zone, one without as local time."""
    in_tokyo = (datetime.now(timezone(timedelta(hours=9))) - timedelta(seconds=100)).isoformat()
    entries = [
        {**entry("a1", "note", "tz", "from tokyo", "cece-001", 0, ttl=300), "timestamp": in_tokyo},
        entry("a2", "note", "local", "naive", "cece-001", 100, ttl=300),
        entry("a3", "mood", "odd", "unknown type", "cece-001", 10),
        entry("a4", "note", "odd", "bad ttl", "cece-001", 10, ttl="60"),
        {**entry("a5", "note", "odd", "bad time", "cece-001", 10), "timestamp": "yesterday"},
        entry("a6", "note", "", "empty key", "cece-001", 10),
        {k: v for k, v in entry("a7", "note", "odd", "no session", "cece-001", 10).items()
         if k != "session_id"},
    ]
    ok = message(REQ, "request", "cece-001", "agent-002", "Need code review", "?", 60)
    no_to = {k: v for k, v in message(REP, "response", "agent-002", "cece-001", "Re: Need code "
                                      "review", "ok", 30).items() if k != "to_session"}
    bad_time = {**message(BCAST, "broadcast", "cece-001", None, "Deploy", "now", 10),
                "timestamp": 1700000000}
    api = directory_api(short_tmp / "store")
    report = run(write_seed(short_tmp, None, [ok, no_to, bad_time, None], entries), api)
    assert counts(report) == {"sessions": (0, 0, 0), "messages": (1, 0, 3), "memory": (2, 0, 5)}
    assert report.sessions.status == "not found"
    assert {s.item: s.reason for s in report.messages.skipped} == {
        REP: "to_session is missing (null for a broadcast)",
        BCAST: "timestamp must be a string, not int",
        3: "not a message record (a map) but NoneType"}
    assert api.hub.get_message_status(REQ)["state"] == "waiting"
    assert api.hub.get_message_status(REP) is None
    assert 170 <= api.memory.get_entry("tz").ttl <= 200
    assert 170 <= api.memory.get_entry("local").ttl <= 200
    reasons = {s.item: s.reason for s in report.memory.skipped}
    assert set(reasons) == {"a3", "a4", "a5", "a6", "a7"}
    assert "'mood'" in reasons["a3"] and "ttl" in reasons["a4"]
    assert "ISO 8601" in reasons["a5"] and "key" in reasons["a6"]
    assert "session_id" in reasons["a7"]
    assert api.memory.get_all("odd") == []


@pytest.mark.parametrize("ttl, age, left", [(300, 299.5, 1), (300, 0.2, 300), (300, 100.5, 200),
                                            (60, 60, 0), (60, 3600, -3540), (None, 99, None)])
def test_remaining_ttl_is_whole_seconds_rounded_up(ttl: float | None, age: float,
                                                   left: int | None) -> None:
    """meshd counts a ttl from when it stores the entry: the import gives it what is left,
    never a fraction (so never 0 while something is left); <= 0 means expired."""
    assert _remaining_ttl({"ttl": ttl}, born=1_000_000.0, now=1_000_000.0 + age) == left


def test_zoneless_times_mean_the_importers_zone(make_daemon: Any, short_tmp: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed stamped sessions in the user's local time; a daemon running in another
    zone (a system service) must not shift them by the difference."""
    monkeypatch.setenv("TZ", "XYZ-14")          # the daemon's zone, +14:00 (ours is unchanged)
    d = make_daemon()
    monkeypatch.undo()
    seed = make_seed()
    base = write_seed(short_tmp, seed.sessions, None, None)
    report = import_seed(base, d.registry(), d.hub(), d.memory())
    assert counts(report)["sessions"] == (3, 0, 1)
    cece = d.registry().get("cece-001")
    assert abs(epoch(cece.last_ping) - epoch(seed.sessions["cece-001"]["last_ping"])) < 0.01
    assert cece.status is SessionStatus.ACTIVE


def test_cli_import_reports_and_is_idempotent(daemon: Any, short_tmp: Path) -> None:
    """`sessions import PATH` as a user runs it: a summary, the skips, exit 0; again: 0."""
    from support.daemons import run_cli
    write_full_seed(short_tmp / "project")
    env = daemon.env()
    r = run_cli(["import", str(short_tmp / "project")], env)
    assert r.returncode == 0, r.stderr
    assert "📥 Imported from" in r.stdout and "skipped" in r.stdout, r.stdout
    first = r.stdout
    r = run_cli(["import", str(short_tmp / "project"), "--json"], env)
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert all(again[k]["imported"] == 0 for k in ("sessions", "messages", "memory")), again
    assert "sessions" in first and "messages" in first and "memory" in first
    r = run_cli(["import", str(short_tmp / "nowhere")], env)
    assert r.returncode == 2, r.stderr                    # not a directory: usage error
