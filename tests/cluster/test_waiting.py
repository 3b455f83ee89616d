"""Messages to a session id nobody has registered yet: accepted, kept where they were sent
("waiting"), delivered exactly once when the id registers on any host, or expired.

The seed document relies on it: its Ping snippet and Use Cases 2 and 3 message ids that no
block registers, and the seed's own store accepted such messages.
"""

from __future__ import annotations

import pytest

from support.daemons import eventually, run_cli


def subjects(hub, sid: str) -> list[str]:
    return [m.subject for m in hub.get_messages(sid)]


@pytest.fixture(params=["daemon", "directory"])
def api(request, make_daemon, short_tmp):
    from sessions import CollaborationHub, SessionRegistry
    if request.param == "daemon":
        d = make_daemon()
        return d.registry(), d.hub()
    reg = SessionRegistry(str(short_tmp / "dir"))
    return reg, CollaborationHub(reg)


def test_a_message_to_an_unknown_id_waits_and_is_delivered_once_on_register(api):
    reg, hub = api
    reg.register("cece-001", "Cece", "Claude")
    m = hub.send("cece-001", "later-1", "request", "first", "are you there?")
    m2 = hub.ping_session("cece-001", "later-1")
    st = hub.get_message_status(m.message_id)
    assert st["state"] == "waiting"
    assert st["deliveries"] == [{"node": None, "session_id": "later-1", "state": "waiting",
                                 "at_ms": st["deliveries"][0]["at_ms"]}]
    # While it waits it reads as the seed's store showed it.
    assert subjects(hub, "later-1") == ["first", "Ping"]
    r = hub.reply("later-1", m, "a reply from an id not registered either")
    assert [x.message_id for x in hub.get_conversation(m.message_id)] == [m.message_id,
                                                                          r.message_id]
    reg.register("later-1", "Later", "GPT-4")
    assert subjects(hub, "later-1") == ["first", "Ping"]          # once, in order
    assert hub.get_message_status(m.message_id)["state"] == "stored"
    assert hub.get_message_status(m2.message_id)["state"] == "stored"
    reg.register("later-1", "Later", "GPT-4")                      # again: nothing twice
    assert subjects(hub, "later-1") == ["first", "Ping"]
    assert hub.mark_read("later-1") == 2
    assert hub.get_message_status(m.message_id)["state"] == "read"


def test_the_cli_says_a_send_waits(daemon):
    env = daemon.env()
    r = run_cli(["send", "cece-001", "agent-002", "Need code review", "Can you review?",
                 "--type", "request"], env)
    assert r.returncode == 0, r.stderr
    assert "agent-002" in r.stdout and "waits" in r.stdout, r.stdout
    r = run_cli(["messages", "cece-001", "--sent"], env)
    assert r.returncode == 0 and "waiting" in r.stdout, r.stdout + r.stderr


def test_a_waiting_message_goes_to_the_host_where_the_id_registers(make_cluster):
    a, b = make_cluster(2)
    reg_a, hub_a, reg_b, hub_b = a.registry(), a.hub(), b.registry(), b.hub()
    reg_a.register("sender", "S", "Claude")
    sent = [hub_a.send("sender", "roamer", "request", f"m{i}", "body") for i in range(5)]
    assert all(hub_a.get_message_status(m.message_id)["state"] == "waiting" for m in sent)
    reg_b.register("roamer", "R", "GPT-4")
    eventually(lambda: subjects(hub_b, "roamer") == [f"m{i}" for i in range(5)], timeout=15,
               message="the waiting messages at the host where roamer registered")
    eventually(lambda: all(hub_a.get_message_status(m.message_id)["state"] == "stored"
                           for m in sent), timeout=15, message="receipts at the sender")
    assert subjects(hub_a, "roamer") == []           # they left the sender's inbox copy
    reg_b.register("roamer", "R", "GPT-4")           # re-registering delivers nothing twice
    hub_b.mark_read("roamer")
    eventually(lambda: hub_a.get_message_status(sent[0].message_id)["state"] == "read",
               timeout=15, message="the read receipt")
    assert subjects(hub_b, "roamer") == [f"m{i}" for i in range(5)]


def test_a_waiting_message_expires_and_is_not_delivered_after(make_daemon):
    d = make_daemon(args=["--outbox-max-age", "0.5"])
    reg, hub = d.registry(), d.hub()
    m = hub.send("someone", "never-yet", "notification", "too late", "body")
    eventually(lambda: hub.get_message_status(m.message_id)["state"] == "expired", timeout=15,
               message="expiry of the waiting message")
    assert subjects(hub, "never-yet") == []
    reg.register("never-yet", "N", "T")
    assert subjects(hub, "never-yet") == []
    assert d.registry().node_info()["mesh"]["routing"]["counters"]["expired_waiting"] == 1
