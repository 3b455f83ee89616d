"""The lease history checker (support/lease_checker.py) on small synthetic histories: a clean
one passes, and each kind of violation (an overlap, a use outside the lease, a token going
backwards or given twice, a missing or late loss report, a late grant after a holder's host
died) is caught and names the events involved."""

from __future__ import annotations

import json

import pytest

from support import lease_checker as lc

S = lc.NS            # one second in ns
VOTERS = (0, 1, 2)


def ev(t: float, name: str, client: str = "", resource: str = "r", **kw) -> dict:
    """An event at t seconds; the client's host is the digit in its name (c3 -> 3)."""
    e = {"t": int(t * S), "ev": name, "resource": resource, **kw}
    if client:
        e["client"] = client
        e.setdefault("host", int(client[1:]))
        e.setdefault("session", f"s-{client}")
    return e


def grant(client: str, t0: float, t1: float, token: int, resource: str = "r",
          ttl: float = 3.0, release: bool = True, uses: tuple[float, ...] = ()) -> list[dict]:
    """acquire at t0 (ok 10 ms later), use at `uses`, release at t1 (ok 10 ms later)."""
    out = [ev(t0, "acq.invoke", client, resource),
           ev(t0 + 0.01, "acq.ok", client, resource, token=token, ttl=ttl, valid_for=ttl)]
    out += [ev(u, "use", client, resource, token=token) for u in uses]
    if release:
        out += [ev(t1, "release.invoke", client, resource, token=token),
                ev(t1 + 0.01, "release.ok", client, resource, token=token)]
    return out


def run(events: list[dict], **cfg) -> lc.Report:
    cfg.setdefault("voters", VOTERS)
    return lc.check(events, lc.Config(**cfg))


def checks(report: lc.Report) -> list[str]:
    return sorted({v.check for v in report.violations})


def clean_history() -> list[dict]:
    """Two resources handed around by three clients, one lease renewed, one lost."""
    h = []
    h += grant("c0", 0.0, 1.0, 1, uses=(0.1, 0.5, 0.9))
    h += grant("c1", 1.1, 2.0, 2, uses=(1.2, 1.9))
    h += grant("c3", 0.0, 2.5, 1, resource="q", uses=(0.2,))
    # c4: acquired q after c3 released it, renewed it past its first deadline, used it late,
    # then lost it (its deadline passed) and said so.
    h += [ev(2.6, "acq.invoke", "c4", "q"),
          ev(2.61, "acq.ok", "c4", "q", token=5, ttl=3.0, valid_for=3.0),
          ev(4.0, "renew.ok", "c4", "q", token=5, sent=int(3.9 * S), valid_for=3.0),
          ev(6.0, "use", "c4", "q", token=5),
          ev(6.9, "lost", "c4", "q", token=5, reason="deadline")]
    h += [ev(7.0, "acq.invoke", "c0", "q"), ev(7.01, "acq.fail", "c0", "q", reason="busy"),
          ev(7.1, "acq.invoke", "c1", "q"), ev(7.2, "acq.info", "c1", "q")]
    h += grant("c2", 8.0, 9.0, 9, resource="q", uses=(8.5,))
    return h


def test_a_clean_history_passes_and_is_summarized():
    report = run(clean_history())
    assert report.ok, report.format()
    assert len(report.grants) == 5
    text = report.summary()
    assert "5 grants, 1 losses" in text and "tokens [1, 5, 9]" in text
    assert "0 violations" in text


def test_files_are_merged_by_time_and_a_torn_last_line_is_skipped(tmp_path):
    h = clean_history()
    by_client: dict[str, list[dict]] = {}
    for e in h:
        by_client.setdefault(e["client"], []).append(e)
    for client, es in by_client.items():
        with open(tmp_path / f"{client}.jsonl", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in es)
    with open(tmp_path / "c0.jsonl", "a") as f:
        f.write('{"t": 99, "ev": "acq.ok", "resou')
    report = lc.check_files(sorted(tmp_path.glob("*.jsonl")), lc.Config(voters=VOTERS))
    assert report.ok, report.format()
    assert report.events == len(h)
    assert lc.main([str(p) for p in sorted(tmp_path.glob("*.jsonl"))]) == 0


def test_two_holders_at_once_are_caught():
    h = grant("c0", 0.0, 2.0, 1) + grant("c1", 1.0, 3.0, 2)
    report = run(h)
    assert checks(report) == ["exclusion"]
    [v] = report.violations
    assert "two holders at once" in v.message and "c0" in v.message and "c1" in v.message
    assert [e["ev"] for e in v.events] == ["acq.ok", "release.invoke", "acq.ok",
                                           "release.invoke"]


def test_an_overlap_within_the_stamp_jitter_is_not_one():
    h = grant("c0", 0.0, 1.0, 1) + grant("c1", 0.9995 - 0.01, 2.0, 2)
    assert run(h).ok
    assert checks(run(h, eps=0.0)) == ["exclusion"]


def test_a_holder_that_keeps_believing_past_its_deadline_overlaps_the_next():
    # c0 never renews (deadline 3.0 s after its invoke) and releases at 5 s; c1 got the
    # lease at 3.5 s: no overlap, since c0's belief ended at its deadline; but c0's use at
    # 4 s is outside its lease, and its release came after the deadline.
    h = grant("c0", 0.0, 5.0, 1, uses=(1.0, 4.0)) + grant("c1", 3.5, 4.5, 2)
    report = run(h)
    assert checks(report) == ["exclusion", "loss"]
    [use] = [v for v in report.violations if v.check == "exclusion"]
    assert "after its belief ended" in use.message
    assert use.events[-1]["t"] == 4 * S
    [late] = [v for v in report.violations if v.check == "loss"]
    assert "after the local deadline" in late.message


def test_a_renewal_that_came_after_the_deadline_does_not_extend_it():
    h = grant("c0", 0.0, 6.0, 1, release=False)
    h += [ev(3.5, "renew.ok", "c0", token=1, sent=int(3.4 * S), valid_for=3.0),
          ev(4.0, "use", "c0", token=1),
          ev(4.1, "lost", "c0", token=1, reason="renew failed")]
    report = run(h)
    assert "exclusion" in checks(report)


def test_a_token_going_backwards_is_caught():
    h = grant("c0", 0.0, 1.0, 7) + grant("c1", 2.0, 3.0, 6)
    report = run(h)
    assert checks(report) == ["tokens"]
    [v] = report.violations
    assert "token 6 granted after 7" in v.message
    assert [e["token"] for e in v.events] == [7, 6]


def test_a_token_given_to_two_holders_is_caught():
    h = grant("c0", 0.0, 1.0, 3) + grant("c1", 2.0, 3.0, 3)
    report = run(h)
    assert "tokens" in checks(report)
    assert any("granted to two holders" in v.message for v in report.violations)


def test_the_fenced_resource_never_sees_a_lower_token_again():
    # Intervals as recorded are disjoint, but a use of token 1 is stamped after a use of 2:
    # the use is outside c0's interval too.
    h = grant("c0", 0.0, 1.0, 1, uses=(0.5,)) + grant("c1", 1.1, 2.0, 2, uses=(1.5,))
    h.append(ev(1.6, "use", "c0", token=1))
    report = run(h)
    assert checks(report) == ["exclusion"]
    msgs = " | ".join(v.message for v in report.violations)
    assert "saw token 1 after 2" in msgs and "after its belief ended" in msgs


def test_an_indeterminate_acquire_makes_no_interval_and_a_use_under_it_is_caught():
    h = [ev(0.0, "acq.invoke", "c0"), ev(1.0, "acq.info", "c0", reason="timeout"),
         ev(1.5, "use", "c0", token=4)]
    report = run(h)
    assert checks(report) == ["exclusion"]
    assert "never granted" in report.violations[0].message


def test_a_missing_loss_report_is_caught():
    # c1's daemon went away; its deadline passed and nothing was ever reported.
    h = grant("c1", 0.0, 0.0, 1, release=False, uses=(0.5,)) + grant("c2", 5.0, 6.0, 2)
    report = run(h)
    assert checks(report) == ["loss"]
    [v] = report.violations
    assert "never released nor reported lost" in v.message and v.events[0]["ev"] == "acq.ok"


def test_a_late_loss_report_is_caught():
    h = grant("c1", 0.0, 0.0, 1, release=False)
    h.append(ev(4.5, "lost", "c1", token=1, reason="deadline"))    # deadline 3.0, slack 1
    report = run(h)
    assert checks(report) == ["loss"]
    assert "1.500s after the local deadline" in report.violations[0].message
    assert run(h, slack=2.0).ok


def test_a_grant_that_arrived_after_its_deadline_may_be_reported_lost_when_it_arrives():
    # The acquire's reply came 6 s late (its daemon was paused): the lease was void on
    # arrival, the holder never used it, and it said so at once.
    h = [ev(0.0, "acq.invoke", "c0"),
         ev(6.0, "acq.ok", "c0", token=1, ttl=3.0, deadline=int(2.9 * S)),
         ev(6.01, "lost", "c0", token=1, reason="not renewed before its deadline")]
    report = run(h)
    assert report.ok, report.format()
    h[-1] = ev(7.5, "lost", "c0", token=1, reason="late")
    assert "1.500s after its (already expired) grant" in run(h).violations[0].message


def test_two_terminal_events_and_a_release_never_answered_are_caught():
    h = grant("c0", 0.0, 1.0, 1)
    h.append(ev(1.5, "lost", "c0", token=1, reason="late"))
    h += [ev(2.0, "acq.invoke", "c1"), ev(2.01, "acq.ok", "c1", token=2, valid_for=3.0),
          ev(2.5, "release.invoke", "c1", token=2)]
    report = run(h)
    assert checks(report) == ["loss"]
    msgs = [v.message for v in report.violations]
    assert any("2 terminal events" in m for m in msgs)
    assert any("never released nor reported lost" in m for m in msgs)


def test_a_holder_still_holding_at_the_end_must_have_released():
    h = grant("c0", 0.0, 0.0, 1, release=False, ttl=30.0)
    report = lc.check(h, lc.Config(voters=VOTERS), end_of_run=2 * S)
    assert checks(report) == ["loss"]
    assert "still held at the end of the run" in report.violations[0].message


def dead_holder(granted_at: float | None, down_until: float = 20.0,
                op: tuple[str, str] = ("kill", "restart")) -> list[dict]:
    """Host 3 holds r (ttl 3) and is killed at 2 s; host 4's client asks from 2.5 s on (every
    0.5 s, refused while busy); the grant to host 4 comes at `granted_at` (None: never)."""
    h = grant("c3", 1.0, 0.0, 1, release=False)
    h += [ev(2.0, "nemesis", op=op[0], host=3), ev(down_until, "nemesis", op=op[1], host=3)]
    h.append(ev(2.0 + 3.0 - 1.0 + 0.2, "lost", "c3", token=1, reason="renew failed"))
    t = 2.5
    while t < 14.0 and (granted_at is None or t < granted_at):
        h += [ev(t, "acq.invoke", "c4"), ev(t + 0.05, "acq.fail", "c4", reason="busy")]
        t += 0.5
    if granted_at is not None:
        h += grant("c4", granted_at - 0.01, granted_at + 1.0, 2)
    return h


def test_a_grant_soon_after_the_holders_host_died_passes():
    report = run(dead_holder(granted_at=6.0), grace=4.0)
    assert report.ok, report.format()
    assert report.liveness_checked == 1


def test_a_late_grant_after_the_holders_host_died_is_caught():
    report = run(dead_holder(granted_at=11.0), grace=4.0)
    assert checks(report) == ["liveness"]
    [v] = report.violations
    assert "host 3" in v.message and "went down (kill)" in v.message
    assert [e["ev"] for e in v.events] == ["acq.ok", "nemesis", "acq.invoke"]
    assert checks(run(dead_holder(granted_at=None), grace=4.0)) == ["liveness"]


@pytest.mark.parametrize("case", ["back-before-lapse", "nobody-asked", "no-majority"])
def test_liveness_is_not_judged_when_it_could_not_hold(case):
    if case == "back-before-lapse":             # the holder's host came back and renewed
        h = dead_holder(granted_at=None, down_until=3.0, op=("stop", "cont"))
    elif case == "nobody-asked":
        h = [e for e in dead_holder(granted_at=None) if e.get("client") != "c4"]
    else:                                       # two of the three voters were cut meanwhile
        h = dead_holder(granted_at=None) + [ev(2.5, "nemesis", op="cut", hosts=[0, 1]),
                                            ev(15.0, "nemesis", op="heal", hosts=[0, 1])]
    report = run(h, grace=4.0)
    assert report.ok, report.format()
    assert report.liveness_checked == 0 and report.liveness_skipped >= 1


def test_a_holder_given_its_own_token_again_after_a_loss_is_no_violation_but_counted():
    # c0 lost its lease at its deadline, asked again while the voters still had it, and got
    # the same token: one holder, nobody in between. Another holder with it would be one.
    h = grant("c0", 0.0, 0.0, 5, release=False)
    h += [ev(3.05, "lost", "c0", token=5, reason="deadline")]
    h += grant("c0", 3.5, 5.0, 5)
    report = run(h)
    assert report.ok, report.format()
    assert "1 grants gave a holder its earlier token again" in report.summary()
    h += grant("c1", 6.0, 7.0, 5)
    assert "granted to two holders" in run(h).violations[0].message


def test_a_restarted_voter_counts_as_down_through_its_quarantine():
    # Voter 1 restarted 1 s before host 3 (the holder) died: during the liveness window it
    # sits out its quarantine, so with voter 0 cut meanwhile no majority is left to grant.
    h = dead_holder(granted_at=None)
    h += [ev(0.5, "nemesis", op="kill", host=1), ev(1.0, "nemesis", op="restart", host=1),
          ev(1.5, "nemesis", op="cut", host=0), ev(3.0, "nemesis", op="heal", host=0)]
    report = run(h, grace=4.0, recovery=0.1, recovery_restart=10.0)
    assert report.ok and report.liveness_skipped == 1, report.format()
    assert "no healthy majority" in report.liveness_notes[0]
    # With a short quarantine, voters 1 and 2 are a majority: the missing grant counts.
    report = run(h, grace=4.0, recovery=0.1, recovery_restart=0.5)
    assert checks(report) == ["liveness"]
