"""Every call of the API contract (shared/api-contract.md), through a real daemon and in
directory mode (no daemon), with the same assertions."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest

from support.daemons import eventually
from sessions import (
    CollaborationHub,
    InvalidArgument,
    MemoryEntry,
    MemoryType,
    Message,
    MessageType,
    Session,
    SessionRegistry,
    SessionStatus,
    SharedMemory,
)


@dataclass
class Api:
    registry: Any
    hub: Any
    memory: Any
    mode: str


@pytest.fixture(params=["daemon", "directory"])
def api(request, make_daemon, short_tmp) -> Api:
    if request.param == "daemon":
        d = make_daemon()
        return Api(d.registry(), d.hub(), d.memory(), "daemon")
    path = short_tmp / "dir"
    registry = SessionRegistry(str(path))
    return Api(registry, CollaborationHub(registry=registry), SharedMemory(str(path)), "directory")


def test_imports_from_package_and_submodules():
    import sessions
    import sessions.collaboration as c
    import sessions.memory as m
    import sessions.registry as r
    for name in ["SessionRegistry", "SessionStatus", "Session", "CollaborationHub", "MessageType",
                 "Message", "SharedMemory", "MemoryType", "MemoryEntry"]:
        assert hasattr(sessions, name), name
    assert r.SessionRegistry is SessionRegistry and r.SessionStatus is SessionStatus
    assert r.Session is Session
    assert c.CollaborationHub is CollaborationHub and c.Message is Message
    assert c.MessageType is MessageType
    assert m.SharedMemory is SharedMemory and m.MemoryEntry is MemoryEntry
    assert m.MemoryType is MemoryType


def test_enum_values():
    assert [s.value for s in SessionStatus] == ["active", "idle", "working", "waiting", "offline"]
    assert [t.value for t in MessageType] == ["ping", "request", "response", "broadcast",
                                              "notification", "task_offer", "task_accept",
                                              "sync", "handoff"]
    assert [t.value for t in MemoryType] == ["state", "fact", "decision", "task", "context",
                                             "note", "config"]


def test_records_round_trip_through_dicts():
    s = Session("s1", "A", "Claude", capabilities=["x"])
    d = s.to_dict()
    assert d["status"] == "active" and Session.from_dict(d) == s
    msg = Message("id1", MessageType.REQUEST, "a", "b", "subj", "body")
    assert msg.to_dict()["type"] == "request" and Message.from_dict(msg.to_dict()) == msg
    e = MemoryEntry("e1", MemoryType.FACT, "k", {"v": 1}, "s1", ttl=5.0, tags=["t"])
    assert e.to_dict()["type"] == "fact" and MemoryEntry.from_dict(e.to_dict()) == e


@pytest.mark.parametrize("mtype,emoji", [
    (MessageType.PING, "🔔"), (MessageType.REQUEST, "❓"), (MessageType.RESPONSE, "✅"),
    (MessageType.BROADCAST, "📡"), (MessageType.NOTIFICATION, "📢"),
    (MessageType.TASK_OFFER, "🤝"), (MessageType.TASK_ACCEPT, "👍"), (MessageType.SYNC, "🔄"),
    (MessageType.HANDOFF, "🎯")])
def test_format_signal(mtype, emoji):
    m = Message("i", mtype, "a", "b", "Subj", "body")
    assert m.format_signal() == f"{emoji} a → b : [COLLABORATION] Subj"
    m.to_session = None
    assert m.format_signal() == f"{emoji} a → ALL : [COLLABORATION] Subj"


# --- registry ----------------------------------------------------------------------------------

def test_register_get_and_replace(api):
    s = api.registry.register("cece-001", "Cece", "Claude", human_user="Alexa",
                              capabilities=["python", "review"], metadata={"k": 1})
    assert isinstance(s, Session)
    assert (s.session_id, s.agent_name, s.agent_type, s.human_user) == ("cece-001", "Cece",
                                                                        "Claude", "Alexa")
    assert s.status is SessionStatus.ACTIVE and s.capabilities == ["python", "review"]
    assert s.metadata == {"k": 1} and s.current_task is None and s.location
    assert s.started_at.endswith("+00:00") and s.last_ping.endswith("+00:00")
    assert api.registry.get("cece-001") == s
    again = api.registry.register("cece-001", "Cece2", "GPT-4")
    assert api.registry.get("cece-001").agent_name == "Cece2" == again.agent_name
    assert len(api.registry.list_sessions()) == 1
    assert api.registry.get("nobody") is None


def test_unregister_ping_update_status(api):
    r = api.registry
    r.register("a", "A", "Claude")
    before = r.get("a").last_ping
    time.sleep(0.01)  # last_ping has microsecond resolution; make "later" observable
    assert r.ping("a") is True and r.get("a").last_ping > before
    assert r.ping("nobody") is False
    assert r.update_status("a", SessionStatus.WORKING, current_task="Code review") is True
    assert (r.get("a").status, r.get("a").current_task) == (SessionStatus.WORKING, "Code review")
    assert r.update_status("a", "waiting") is True          # the string value works too
    assert r.get("a").current_task == "Code review"          # unchanged when not given
    assert r.update_status("nobody", SessionStatus.IDLE) is False
    with pytest.raises(InvalidArgument):
        r.update_status("a", "bogus")
    assert r.unregister("a") is True and r.get("a").status is SessionStatus.OFFLINE
    assert r.unregister("nobody") is False
    assert r.list_sessions() == [] and len(r.list_sessions(include_offline=True)) == 1


def test_find_sessions_and_stats(api):
    r = api.registry
    r.register("a", "A", "Claude", human_user="Alexa", capabilities=["python", "review"])
    r.register("b", "B", "GPT-4", human_user="Alexa", capabilities=["go"])
    r.register("c", "C", "Claude", human_user="Bob", capabilities=["python"])
    r.update_status("b", SessionStatus.WORKING)
    r.register("d", "D", "Claude", capabilities=["python"])
    r.unregister("d")
    ids = lambda ss: sorted(s.session_id for s in ss)  # noqa: E731
    assert ids(r.find_sessions(capability="python")) == ["a", "c"]
    assert ids(r.find_sessions(status=SessionStatus.ACTIVE)) == ["a", "c"]
    assert ids(r.find_sessions(status=SessionStatus.OFFLINE)) == ["d"]
    assert ids(r.find_sessions(agent_type="Claude", human_user="Alexa")) == ["a"]
    assert ids(r.find_sessions(agent_type="Claude", capability="go")) == []
    stats = r.get_stats()
    assert stats["total_sessions"] == 4 and stats["active_sessions"] == 3
    assert stats["by_status"] == {"active": 2, "working": 1, "offline": 1}
    assert stats["by_agent_type"] == {"Claude": 3, "GPT-4": 1}
    assert stats["by_user"] == {"Alexa": 2, "Bob": 1}
    assert r.clear_offline() == 1
    assert r.get("d") is None and r.get_stats()["total_sessions"] == 3


def test_bad_registry_input_is_rejected(api):
    with pytest.raises(InvalidArgument):
        api.registry.register("", "A", "Claude")
    with pytest.raises(InvalidArgument):
        api.registry.register("x", "A", "Claude", capabilities="python")
    with pytest.raises(InvalidArgument):
        api.registry.register("x", "A", "Claude", metadata={"k": object()})
    assert api.registry.list_sessions(include_offline=True) == []


# --- collaboration -----------------------------------------------------------------------------

def _two(api: Api) -> None:
    api.registry.register("cece-001", "Cece", "Claude")
    api.registry.register("agent-002", "Agent-2", "GPT-4")


def test_send_reply_conversation(api):
    _two(api)
    hub = api.hub
    msg = hub.send(from_session="cece-001", to_session="agent-002", type=MessageType.REQUEST,
                   subject="Need help", body="Can you assist?", data={"task_id": "123"})
    assert isinstance(msg, Message) and len(msg.message_id) == 36
    assert (msg.type, msg.to_session, msg.data, msg.in_reply_to) == (
        MessageType.REQUEST, "agent-002", {"task_id": "123"}, None)
    rep = hub.reply(from_session="agent-002", to_message=msg, body="Sure!")
    assert (rep.type, rep.to_session, rep.subject, rep.in_reply_to) == (
        MessageType.RESPONSE, "cece-001", "Re: Need help", msg.message_id)
    rep2 = hub.reply("cece-001", rep, "Thanks", data={"ok": True})
    other = hub.send("cece-001", "agent-002", "notification", "Other", "unrelated")
    thread = [m.message_id for m in hub.get_conversation(rep2.message_id)]
    assert thread == [msg.message_id, rep.message_id, rep2.message_id]
    assert [m.message_id for m in hub.get_conversation(msg.message_id)] == thread
    assert hub.get_conversation("no-such-id") == []
    assert [m.message_id for m in hub.get_conversation(other.message_id)] == [other.message_id]
    inbox = hub.get_messages("agent-002")
    assert [m.message_id for m in inbox] == [msg.message_id, rep2.message_id, other.message_id]
    assert [m.message_id for m in hub.get_messages("agent-002", message_type="notification")] == [
        other.message_id]


def test_broadcast_ping_and_filters(api):
    _two(api)
    api.registry.register("third", "T", "Claude")
    hub = api.hub
    b = hub.broadcast("cece-001", "Deploying", "new version", data={"v": 2})
    assert (b.type, b.to_session) == (MessageType.BROADCAST, None)
    p = hub.ping_session("cece-001", "agent-002")
    assert (p.type, p.subject, p.body) == (MessageType.PING, "Ping", "Are you there?")
    assert p.format_signal() == "🔔 cece-001 → agent-002 : [COLLABORATION] Ping"
    assert [m.message_id for m in hub.get_messages("agent-002")] == [b.message_id, p.message_id]
    assert [m.message_id for m in hub.get_messages("agent-002", include_broadcasts=False)] == [
        p.message_id]
    assert [m.message_id for m in hub.get_messages("third")] == [b.message_id]
    assert hub.get_messages("cece-001") == []       # the sender does not get its broadcast
    stats = hub.get_stats()
    assert stats["total_messages"] == 2 and stats["active_sessions"] == 3
    assert set(stats["by_type"]) == {t.value for t in MessageType}
    assert stats["by_type"]["broadcast"] == 1 and stats["by_type"]["ping"] == 1
    assert stats["by_type"]["handoff"] == 0


def test_unread_and_mark_read(api):
    _two(api)
    hub = api.hub
    m1 = hub.send("cece-001", "agent-002", MessageType.REQUEST, "one", "1")
    m2 = hub.send("cece-001", "agent-002", MessageType.REQUEST, "two", "2")
    assert [m.message_id for m in hub.get_messages("agent-002", unread_only=True)] == [
        m1.message_id, m2.message_id]
    assert hub.mark_read("agent-002", [m1.message_id]) == 1
    assert [m.message_id for m in hub.get_messages("agent-002", unread_only=True)] == [
        m2.message_id]
    assert hub.mark_read("agent-002") == 1
    assert hub.get_messages("agent-002", unread_only=True) == []
    assert len(hub.get_messages("agent-002")) == 2


def test_send_errors(api):
    _two(api)
    with pytest.raises(InvalidArgument):
        api.hub.send("cece-001", "agent-002", "not-a-type", "s", "b")
    with pytest.raises(InvalidArgument):
        api.hub.send("cece-001", "agent-002", MessageType.REQUEST, "s", "b", data={"x": {1, 2}})
    with pytest.raises(InvalidArgument):
        api.hub.send("", "agent-002", MessageType.REQUEST, "s", "b")
    assert api.hub.get_stats()["total_messages"] == 0


def test_register_handler_delivers_live_messages(api):
    _two(api)
    got: list[Message] = []
    api.hub.register_handler(MessageType.REQUEST, got.append)
    try:
        api.hub.send("cece-001", "agent-002", MessageType.NOTIFICATION, "skip", "not a request")
        sent = api.hub.send("cece-001", "agent-002", MessageType.REQUEST, "Help", "please")
        eventually(lambda: got, message="handler call")
        assert [m.message_id for m in got] == [sent.message_id]
        assert got[0].subject == "Help" and got[0].type is MessageType.REQUEST
    finally:
        api.hub.close()


# --- shared memory -----------------------------------------------------------------------------

def test_set_get_history(api):
    mem = api.memory
    e1 = mem.set(session_id="cece-001", key="current_task",
                 value={"name": "Build", "status": "in_progress"}, type=MemoryType.STATE,
                 tags=["task", "active"])
    assert isinstance(e1, MemoryEntry) and e1.type is MemoryType.STATE and e1.ttl is None
    e2 = mem.set("agent-002", "current_task", "second", type="fact")
    assert mem.get("current_task") == "second"
    assert mem.get_entry("current_task").entry_id == e2.entry_id
    assert [e.entry_id for e in mem.get_all("current_task")] == [e2.entry_id, e1.entry_id]
    assert mem.get_all("current_task")[1].value == {"name": "Build", "status": "in_progress"}
    assert mem.get("missing") is None and mem.get("missing", default=42) == 42
    assert mem.get_entry("missing") is None and mem.get_all("missing") == []


def test_values_of_every_kind_round_trip(api):
    for i, v in enumerate([None, True, 0, -2**63, 2**64 - 1, 1.5, "", "ünïcode ✓", b"\x00bin",
                           [1, [2, [3]]], {"a": {"b": [None, 1.0]}}, ["GET /users", "POST"]]):
        api.memory.set("s", f"k{i}", v)
        assert api.memory.get(f"k{i}") == v
    api.memory.set("s", "tuple", (1, 2))
    assert api.memory.get("tuple") == [1, 2]


def test_search_tags_session(api):
    mem = api.memory
    a = mem.set("s1", "task_a", 1, tags=["task", "active"])
    b = mem.set("s2", "task_b", 2, tags=["task"])
    c = mem.set("s1", "note", 3, type=MemoryType.NOTE, tags=["active"])
    mem.set("s1", "taskx", 4)
    ids = lambda es: [e.entry_id for e in es]  # noqa: E731
    assert ids(mem.search("task_*")) == [b.entry_id, a.entry_id]
    assert ids(mem.search("task_?")) == [b.entry_id, a.entry_id]
    assert ids(mem.search("task_[!a]")) == [b.entry_id]
    assert ids(mem.search("nothing*")) == []
    assert set(ids(mem.get_by_tags(["active", "task"]))) == {a.entry_id, b.entry_id, c.entry_id}
    assert ids(mem.get_by_tags(["active", "task"])) == [c.entry_id, b.entry_id, a.entry_id]
    assert ids(mem.get_by_tags(["active", "task"], match_all=True)) == [a.entry_id]
    assert mem.get_by_tags([]) == []
    assert ids(mem.get_by_session("s2")) == [b.entry_id]
    assert len(mem.get_by_session("s1")) == 3


def test_delete_clear_and_stats(api):
    mem = api.memory
    mem.set("s1", "k", 1, tags=["t1"])
    mem.set("s2", "k", 2, tags=["t2"])
    mem.set("s1", "other", 3, type=MemoryType.FACT)
    stats = mem.get_stats()
    assert stats["total_entries"] == 3 and stats["unique_keys"] == 2
    assert stats["unique_sessions"] == 2 and stats["unique_tags"] == 2
    assert set(stats["by_type"]) == {t.value for t in MemoryType}
    assert stats["by_type"]["state"] == 2 and stats["by_type"]["fact"] == 1
    assert mem.delete("k", session_id="s1") == 1 and mem.get("k") == 2
    assert mem.delete("k") == 1 and mem.get("k") is None
    assert mem.delete("k") == 0
    mem.set("s1", "k", "back")                       # a later set is not hidden by the delete
    assert mem.get("k") == "back"
    assert mem.clear(session_id="s2") == 0
    assert mem.clear() == 2
    assert mem.get_stats()["total_entries"] == 0 and mem.get_by_tags(["t1"]) == []


def test_ttl_expiry(api):
    mem = api.memory
    e = mem.set("s", "short", "soon gone", ttl=0.5, tags=["tmp"])
    mem.set("s", "long", "stays", ttl=3600)
    assert e.ttl == 0.5 and mem.get("short") == "soon gone"
    eventually(lambda: mem.get("short") is None, timeout=5, message="ttl expiry")
    assert mem.get_all("short") == [] and mem.search("sh*") == []
    assert mem.get_by_tags(["tmp"]) == [] and mem.get_stats()["total_entries"] == 1
    assert mem.get("long") == "stays"
    with pytest.raises(InvalidArgument):
        mem.set("s", "bad", 1, ttl=-1)


def test_bad_memory_input_is_rejected(api):
    with pytest.raises(InvalidArgument):
        api.memory.set("s", "k", object())
    with pytest.raises(InvalidArgument):
        api.memory.set("s", "", 1)
    with pytest.raises(InvalidArgument):
        api.memory.set("s", "k", 1, type="bogus")
    with pytest.raises(InvalidArgument):
        api.memory.set("s", "k", {1: "int key"})
    with pytest.raises(InvalidArgument):
        api.memory.set("s", "k", 1, tags="notalist")
    assert api.memory.get_stats()["total_entries"] == 0


def test_directories_share_state_only_when_equal(short_tmp):
    a1, a2 = SharedMemory(str(short_tmp / "a")), SharedMemory(str(short_tmp / "a"))
    b = SharedMemory(str(short_tmp / "b"))
    a1.set("s", "k", "v")
    assert a2.get("k") == "v" and b.get("k") is None
