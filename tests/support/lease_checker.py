"""A checker of lease (claims) safety over recorded histories (issue 16, "Proof").

Every client writes one JSON event per line; `t` is CLOCK_MONOTONIC in ns of the test host,
which every network namespace shares (namespaces do not virtualize clocks), so stamps from
different hosts are on one timeline and only stamp jitter (`eps`) separates them. Events
(../shared/coordination-notes.md §4):

  common fields  t, ev, client (who wrote it), host (lab host index), resource, session
  acq.invoke     an acquire was sent (stamped BEFORE the request)
  acq.ok         token, ttl, valid_for (s) or deadline (ns): granted; stamped before any use
  acq.fail       busy or refused: no lease      acq.info  outcome unknown: no belief interval
  renew.ok       token, sent (ns), deadline or valid_for: a renewal sent before the
                 deadline passed moves it
  renew.fail     token
  use            token: one write to the fenced resource stand-in
  release.invoke token: the holder stops acting (ends its belief)
  release.ok     token (terminal)              release.fail token (terminal: it stopped anyway)
  lost           token, reason (terminal): the SDK told the holder the lease is lost
  nemesis        op (cut/heal, kill/restart, stop/cont), host: written by the harness

The local deadline of a grant is `deadline` when the event carries it, else `sent` (or, for
acq.ok, the matching acq.invoke's stamp) + valid_for. A renewal moves it only when it was
sent before it passed and the holder had not stopped believing (a lost lease stays lost).

Checks (each violation names the events involved):
1. exclusion: per resource, the belief intervals [acq.ok, min(lost, release.invoke, local
   deadline)) of different grants never overlap by more than eps, and every `use` lies
   inside its own grant's interval (and the used tokens of a resource never go down, as a
   fenced resource would require);
2. tokens: per resource, in grant order (by the start of non-empty intervals), tokens
   strictly increase; no token is ever granted to two holders (a holder that lost its
   lease and got it back while the voters still had it may get the same token again: one
   holder, no one in between; the summary counts these);
3. loss reporting: every acq.ok has exactly one terminal event (release.ok, release.fail or
   lost); the belief ends (lost or release.invoke) no later than the deadline + `slack`;
   a release.invoke is followed by its release.ok/release.fail;
4. liveness: after a nemesis took down the host of a resource's holder (kill, cut or stop)
   and kept it down past the lease's TTL, someone asked for the resource from a healthy host,
   and the voters kept a healthy majority, a grant of that resource follows within
   TTL + `grace` of the fault.

Run as a program: `python lease_checker.py HISTORY.jsonl ...` prints the report and exits 1
on a violation.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

NS = 1_000_000_000
TERMINAL = ("release.ok", "release.fail", "lost")
DOWN_UP = {"cut": "heal", "kill": "restart", "stop": "cont"}


@dataclass
class Config:
    eps: float = 0.001            # s: stamp jitter allowed between processes on one clock
    slack: float = 1.0            # s: how late after the deadline a loss may be reported
    grace: float = 4.0            # s: a grant is due within TTL + grace after a holder's fault
    recovery: float = 2.0         # s: a host counts as down this long after it came back
    recovery_restart: float = 7.0  # s: ... after a voter's restart (it sits out its
                                   # quarantine first)
    voters: tuple[int, ...] = ()  # host indexes of the voters (for the majority in check 4)
    default_ttl: float | None = None  # s: when a grant does not say its ttl


@dataclass
class Violation:
    check: str                    # exclusion, tokens, loss, liveness
    message: str
    events: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"[{self.check}] {self.message}"]
        lines += [f"    {_show(e)}" for e in self.events]
        return "\n".join(lines)


@dataclass
class Grant:
    """One acq.ok and what followed it for the same (client, resource, token)."""

    ok: dict[str, Any]
    invoke: dict[str, Any] | None
    deadline: int                 # ns, the final local deadline
    end: int                      # ns, end of the belief interval
    end_event: dict[str, Any] | None = None
    terminals: list[dict[str, Any]] = field(default_factory=list)
    release_invoke: dict[str, Any] | None = None
    uses: list[dict[str, Any]] = field(default_factory=list)

    @property
    def start(self) -> int:
        return int(self.ok["t"])

    @property
    def resource(self) -> str:
        return str(self.ok["resource"])

    @property
    def token(self) -> Any:
        return self.ok.get("token")

    @property
    def holder(self) -> tuple[Any, Any]:
        return (self.ok.get("client"), self.ok.get("session"))

    @property
    def ttl(self) -> float | None:
        for key in ("ttl", "valid_for"):
            if self.ok.get(key) is not None:
                return float(self.ok[key])
        return None


@dataclass
class Report:
    violations: list[Violation]
    grants: list[Grant]
    events: int
    liveness_checked: int = 0
    liveness_skipped: int = 0
    liveness_notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        per: dict[str, list[Grant]] = defaultdict(list)
        for g in self.grants:
            per[g.resource].append(g)
        lines = [f"{self.events} events, {len(self.grants)} grants, "
                 f"{sum(1 for g in self.grants if any(e['ev'] == 'lost' for e in g.terminals))}"
                 f" losses, {sum(len(g.uses) for g in self.grants)} uses; liveness: "
                 f"{self.liveness_checked} faults checked, {self.liveness_skipped} not applicable"]
        for res in sorted(per):
            gs = sorted(per[res], key=lambda g: g.start)
            lost = sum(1 for g in gs if any(e["ev"] == "lost" for e in g.terminals))
            toks = [g.token for g in gs]
            shown = toks if len(toks) <= 12 else [*toks[:6], "...", *toks[-5:]]
            lines.append(f"  {res}: {len(gs)} grants, {lost} lost, holders "
                         f"{len({g.holder for g in gs})}, tokens {shown}")
        again = [g for g in self.grants if any(
            o is not g and o.holder == g.holder and o.token == g.token and o.start < g.start
            for o in per[g.resource])]
        if again:
            lines.append(f"  {len(again)} grants gave a holder its earlier token again (the "
                         "voters still had its lease: allowed, one holder)")
        lines.append(f"{len(self.violations)} violations")
        return "\n".join(lines)

    def format(self, limit: int = 20) -> str:
        out = [self.summary(), *(f"liveness {n}" for n in self.liveness_notes)]
        out += [str(v) for v in self.violations[:limit]]
        if len(self.violations) > limit:
            out.append(f"... and {len(self.violations) - limit} more")
        return "\n".join(out)


def _show(e: dict[str, Any]) -> str:
    keys = ("t", "ev", "client", "resource", "token", "reason", "op", "host")
    head = " ".join(f"{k}={e[k]}" for k in keys if k in e)
    rest = {k: v for k, v in e.items() if k not in keys and k != "line"}
    return f"{head} {json.dumps(rest, sort_keys=True, default=str)}" if rest else head


# --- loading ----------------------------------------------------------------------------------

def load(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every event of every JSONL file, in time order (a torn last line is skipped)."""
    events: list[dict[str, Any]] = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    e = json.loads(line)
                except ValueError:
                    continue            # a line cut off by a killed writer
                if isinstance(e, dict) and "t" in e and "ev" in e:
                    e.setdefault("client", Path(path).stem)
                    e["line"] = f"{Path(path).name}:{n}"
                    events.append(e)
    return order(events)


def order(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """By time; for equal stamps, in the order given (a writer's own order)."""
    return [e for _, _, e in sorted((int(e["t"]), i, e) for i, e in enumerate(events))]


# --- building grants --------------------------------------------------------------------------

def _deadline_of(e: dict[str, Any], sent: int | None) -> int | None:
    if e.get("deadline") is not None:
        return int(e["deadline"])
    if e.get("valid_for") is None:
        return None
    base = e.get("sent", sent)
    base = int(base) if base is not None else int(e["t"])
    return base + int(float(e["valid_for"]) * NS)


def build_grants(events: list[dict[str, Any]], cfg: Config,
                 violations: list[Violation]) -> list[Grant]:
    grants: list[Grant] = []
    open_by_key: dict[tuple[Any, Any, Any], Grant] = {}
    all_by_key: dict[tuple[Any, Any, Any], list[Grant]] = defaultdict(list)
    pending_invoke: dict[tuple[Any, Any], dict[str, Any]] = {}
    for e in events:
        ev = e["ev"]
        client, res = e.get("client"), e.get("resource")
        if ev == "acq.invoke":
            pending_invoke[(client, res)] = e
            continue
        if ev in ("acq.fail", "acq.info"):
            pending_invoke.pop((client, res), None)
            continue
        if ev == "acq.ok":
            inv = pending_invoke.pop((client, res), None)
            sent = int(inv["t"]) if inv else None
            dl = _deadline_of(e, sent)
            if dl is None:
                ttl = cfg.default_ttl
                if ttl is None:
                    violations.append(Violation("loss", "acq.ok without valid_for or deadline:"
                                                " its holder cannot know when to stop", [e]))
                    ttl = 0.0
                dl = (sent if sent is not None else int(e["t"])) + int(ttl * NS)
            g = Grant(ok=e, invoke=inv, deadline=dl, end=dl)
            key = (client, res, e.get("token"))
            if key in open_by_key:
                violations.append(Violation("loss", "a second acq.ok of the same token by the "
                                            "same client before the first one ended",
                                            [open_by_key[key].ok, e]))
            open_by_key[key] = g
            all_by_key[key].append(g)
            grants.append(g)
            continue
        if ev not in ("renew.ok", "renew.fail", "use", "release.invoke", *TERMINAL):
            continue
        key = (client, res, e.get("token"))
        g = open_by_key.get(key)
        if g is None:
            previous = all_by_key.get(key)
            if previous:
                if ev in TERMINAL:
                    previous[-1].terminals.append(e)  # a second terminal: check 3 reports it
                elif ev == "use":
                    previous[-1].uses.append(e)       # after its end: check 1 reports it
                continue                              # renew/release after the end: moot
            if ev == "use":
                violations.append(Violation("exclusion", "use of a token its client was never "
                                            "granted (or after its lease ended)", [e]))
            elif ev in TERMINAL or ev == "release.invoke":
                violations.append(Violation("loss", f"{ev} of a token its client was never "
                                            "granted", [e]))
            continue
        if ev == "use":
            g.uses.append(e)
        elif ev == "renew.ok":
            # A renewal counts when it was sent before the deadline passed (the deadline is
            # counted from before the last successful request) and the holder had not
            # stopped believing meanwhile (a lost lease stays lost).
            sent = int(e.get("sent", e["t"]))
            dl = _deadline_of(e, sent)
            if dl is not None and g.end_event is None and sent <= g.deadline + cfg.eps * NS:
                g.deadline = max(g.deadline, dl)
        elif ev == "release.invoke":
            if g.release_invoke is None:
                g.release_invoke = e
            if g.end_event is None:
                g.end_event = e
        elif ev in TERMINAL:
            g.terminals.append(e)
            if g.end_event is None:
                g.end_event = e
            del open_by_key[key]
    for g in grants:
        g.end = g.deadline if g.end_event is None else min(g.deadline, int(g.end_event["t"]))
    return grants


# --- the checks -------------------------------------------------------------------------------

def check_exclusion(grants: list[Grant], cfg: Config) -> list[Violation]:
    out: list[Violation] = []
    eps = int(cfg.eps * NS)
    per: dict[str, list[Grant]] = defaultdict(list)
    for g in grants:
        if g.end > g.start:
            per[g.resource].append(g)
    for res, gs in per.items():
        gs.sort(key=lambda g: g.start)
        active: list[Grant] = []
        for g in gs:
            active = [a for a in active if a.end > g.start + eps]
            for a in active:
                if a.holder != g.holder or a.token != g.token:
                    overlap = (min(a.end, g.end) - g.start) / NS
                    out.append(Violation(
                        "exclusion", f"{res}: two holders at once for {overlap:.3f}s: "
                        f"{a.holder[0]} (token {a.token}, until {a.end}) and {g.holder[0]} "
                        f"(token {g.token}, from {g.start})",
                        [e for e in (a.ok, a.end_event, g.ok, g.end_event) if e]))
            active.append(g)
    for g in grants:
        for u in g.uses:
            t = int(u["t"])
            if not (g.start - eps <= t < g.end + eps):
                why = ("before its grant" if t < g.start else
                       f"{(t - g.end) / NS:.3f}s after its belief ended")
                out.append(Violation("exclusion", f"{g.resource}: use of token {g.token} by "
                                     f"{g.holder[0]} {why}",
                                     [e for e in (g.ok, g.end_event, u) if e]))
    uses_per: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for g in grants:
        uses_per[g.resource] += g.uses
    for res, us in uses_per.items():
        us.sort(key=lambda u: int(u["t"]))
        top: dict[str, Any] | None = None
        seen: set[tuple[Any, Any]] = set()      # one report per (stale, newer) token pair
        for u in us:
            if top is not None and _lt(u.get("token"), top.get("token")) \
                    and int(u["t"]) > int(top["t"]) + eps \
                    and (u.get("token"), top.get("token")) not in seen:
                seen.add((u.get("token"), top.get("token")))
                out.append(Violation("exclusion", f"{res}: the fenced resource saw token "
                                     f"{u.get('token')} after {top.get('token')}", [top, u]))
            if top is None or not _lt(u.get("token"), top.get("token")):
                top = u
    return out


def _lt(a: Any, b: Any) -> bool:
    try:
        return a < b
    except TypeError:
        return str(a) < str(b)


def check_tokens(grants: list[Grant], cfg: Config) -> list[Violation]:
    out: list[Violation] = []
    per: dict[str, list[Grant]] = defaultdict(list)
    for g in grants:
        per[g.resource].append(g)
    for res, gs in per.items():
        owners: dict[Any, Grant] = {}
        for g in gs:
            first = owners.setdefault(g.token, g)
            if first.holder != g.holder:
                out.append(Violation("tokens", f"{res}: token {g.token} granted to two "
                                     f"holders, {first.holder} and {g.holder}", [first.ok, g.ok]))
        live = sorted((g for g in gs if g.end > g.start), key=lambda g: g.start)
        prev: Grant | None = None
        for g in live:
            if prev is not None and not (prev.holder == g.holder and prev.token == g.token):
                if not _lt(prev.token, g.token):
                    out.append(Violation("tokens", f"{res}: token {g.token} granted after "
                                         f"{prev.token}: tokens must strictly increase",
                                         [prev.ok, g.ok]))
            prev = g
    return out


def check_loss(grants: list[Grant], cfg: Config, end_of_run: int | None) -> list[Violation]:
    out: list[Violation] = []
    slack = int(cfg.slack * NS)
    for g in grants:
        terms = g.terminals
        if not terms:
            out.append(Violation("loss", f"{g.resource}: token {g.token} of {g.holder[0]} was "
                                 "never released nor reported lost" +
                                 (" (still held at the end of the run)"
                                  if end_of_run is not None and g.deadline > end_of_run else ""),
                                 [e for e in (g.ok, g.release_invoke) if e]))
            continue
        if len(terms) > 1:
            out.append(Violation("loss", f"{g.resource}: token {g.token} of {g.holder[0]} has "
                                 f"{len(terms)} terminal events (exactly one expected)",
                                 [g.ok, *terms]))
        end = g.end_event
        assert end is not None
        # Told no later than the deadline + slack; a grant that arrived after its deadline
        # (its reply was that late) cannot be reported lost before it arrived.
        due = max(g.deadline, g.start)
        if int(end["t"]) > due + slack:
            late = "the local deadline" if due == g.deadline else "its (already expired) grant"
            out.append(Violation("loss", f"{g.resource}: token {g.token} of {g.holder[0]}: "
                                 f"{end['ev']} came {(int(end['t']) - due) / NS:.3f}s "
                                 f"after {late} (slack {cfg.slack}s)", [g.ok, end]))
        if g.release_invoke is not None and g.end_event is g.release_invoke and not any(
                e["ev"] in ("release.ok", "release.fail") for e in terms):
            out.append(Violation("loss", f"{g.resource}: token {g.token}: release.invoke "
                                 "without release.ok or release.fail",
                                 [g.ok, g.release_invoke, *terms]))
    return out


Spans = dict[Any, list[tuple[int, int, int, dict[str, Any]]]]


def _down_intervals(events: list[dict[str, Any]], end: int, cfg: Config) -> Spans:
    """host -> [(down_from, up_at, up_at + its recovery, nemesis event)] from the harness's
    nemesis events (a fault still on at the end lasts to the end)."""
    out: dict[Any, list[tuple[int, int, dict]]] = defaultdict(list)
    open_: dict[tuple[Any, str], dict[str, Any]] = {}
    for e in events:
        if e["ev"] != "nemesis":
            continue
        op = e.get("op")
        hosts = e.get("hosts", [e.get("host")])
        for h in hosts:
            if op in DOWN_UP:
                open_.setdefault((h, op), e)
            else:
                for down, up in DOWN_UP.items():
                    if up == op and (h, down) in open_:
                        start = open_.pop((h, down))
                        rec = (cfg.recovery_restart if op == "restart" and h in cfg.voters
                               else cfg.recovery)
                        up_at = int(e["t"])
                        out[h].append((int(start["t"]), up_at, up_at + int(rec * NS), start))
    for (h, _), start in open_.items():
        out[h].append((int(start["t"]), end, end, start))
    return out


def check_liveness(events: list[dict[str, Any]], grants: list[Grant], cfg: Config,
                   end_of_run: int, report: Report) -> list[Violation]:
    out: list[Violation] = []
    down = _down_intervals(events, end_of_run, cfg)
    grace = int(cfg.grace * NS)
    majority = len(cfg.voters) // 2 + 1

    def affected(h: Any, lo: int, hi: int) -> bool:
        return any(a < hi and b > lo for a, _, b, _ in down.get(h, []))

    invokes: dict[str, list[tuple[dict[str, Any], int]]] = defaultdict(list)
    outcome: dict[tuple[Any, Any], dict[str, Any]] = {}
    for e in reversed(events):                 # each acq.invoke with when its outcome came
        key = (e.get("client"), e.get("resource"))
        if e["ev"] in ("acq.ok", "acq.fail", "acq.info"):
            outcome[key] = e
        elif e["ev"] == "acq.invoke":
            done = outcome.pop(key, None)
            invokes[str(e.get("resource"))].append((e, int(done["t"]) if done else end_of_run))
    by_res: dict[str, list[Grant]] = defaultdict(list)
    for g in grants:
        by_res[g.resource].append(g)
    for victim, spans in down.items():
        for k, up, _, fault in spans:
            for res, gs in by_res.items():
                before = [g for g in gs if g.start <= k]
                if not before:
                    continue
                last = max(before, key=lambda g: g.start)
                if last.ok.get("host") != victim or any(
                        e["ev"] == "release.ok" and int(e["t"]) <= k for e in last.terminals):
                    continue
                ttl = last.ttl if last.ttl is not None else cfg.default_ttl
                if ttl is None:
                    continue
                lapse = k + int(ttl * NS)
                due = lapse + grace
                what = f"{fault.get('op')} of host {victim} at {k}, holding {res}"

                def skip(why: str) -> None:
                    report.liveness_skipped += 1
                    report.liveness_notes.append(f"not judged: {what}: {why}")
                if up < lapse:
                    skip("back before the lease lapsed")
                    continue
                if due > end_of_run:
                    skip("the run ended first")
                    continue
                others = [h for h in down if h != victim and affected(h, k, due)]
                voters_ok = sum(1 for v in cfg.voters if v != victim and v not in others)
                if cfg.voters and voters_ok < majority:
                    skip(f"no healthy majority of voters (others down: {others})")
                    continue
                asks = [(e, done) for e, done in invokes.get(res, [])
                        if e.get("host") != victim and e.get("host") not in others
                        and int(e["t"]) <= due - NS and max(int(e["t"]), done) >= lapse]
                if not asks:
                    skip("nobody on a healthy host asked")
                    continue
                report.liveness_checked += 1
                granted = [g for g in gs if k < g.start <= due and g.token != last.token]
                if granted:
                    report.liveness_notes.append(
                        f"ok: {what}: granted to {granted[0].holder[0]} "
                        f"{(granted[0].start - k) / NS:.2f}s after")
                else:
                    out.append(Violation(
                        "liveness", f"{res}: host {victim} (holding token {last.token}, ttl "
                        f"{ttl}s) went down ({fault.get('op')}) and nobody was granted {res} "
                        f"within ttl + {cfg.grace}s although {len(asks)} requests asked",
                        [last.ok, fault, asks[0][0]]))
    return out


def check(events: list[dict[str, Any]], cfg: Config | None = None,
          end_of_run: int | None = None) -> Report:
    """Run the four checks over a merged history (see `load`)."""
    cfg = cfg or Config()
    events = order(events)
    if end_of_run is None:
        end_of_run = int(events[-1]["t"]) if events else 0
    violations: list[Violation] = []
    grants = build_grants(events, cfg, violations)
    report = Report(violations=violations, grants=grants, events=len(events))
    violations += check_exclusion(grants, cfg)
    violations += check_tokens(grants, cfg)
    violations += check_loss(grants, cfg, end_of_run)
    violations += check_liveness(events, grants, cfg, end_of_run, report)
    return report


def check_files(paths: Iterable[str | Path], cfg: Config | None = None) -> Report:
    return check(load(paths), cfg)


def main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--eps", type=float, default=Config.eps)
    p.add_argument("--slack", type=float, default=Config.slack)
    p.add_argument("--grace", type=float, default=Config.grace)
    p.add_argument("--voters", default="", help="host indexes, comma-separated")
    a = p.parse_args(argv)
    voters = tuple(int(v) for v in a.voters.split(",") if v)
    report = check_files(a.files, Config(eps=a.eps, slack=a.slack, grace=a.grace, voters=voters))
    print(report.format(limit=50))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
