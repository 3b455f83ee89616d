// The meshd dashboard (docs/dashboard.md). Every value shown comes from the JSON API and is
// put on the page with textContent: message bodies and memory values are untrusted text
// written by agents, never HTML. The token comes from the address's #token=... fragment
// (never sent to the server, removed from the address bar), kept for this tab only.
"use strict";

const state = { token: null, memoryLatest: undefined, threadOf: null };

function takeToken() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem("meshd_token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  state.token = sessionStorage.getItem("meshd_token");
  if (state.token) {
    // For the event stream (EventSource sends no headers): same-site requests only.
    document.cookie = "meshd_token=" + state.token + "; path=/api; SameSite=Strict";
  }
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v == null ? "" : String(v);
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c == null) continue;
    node.append(typeof c === "string" ? document.createTextNode(c) : c);
  }
  return node;
}

function badge(value) {
  return el("span", { class: "badge " + String(value || "").replace(/[^a-z_]/g, ""), text: value });
}

function ago(iso) {
  if (!iso) return "";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (!isFinite(s)) return String(iso);
  if (s < 60) return Math.max(0, Math.round(s)) + "s ago";
  if (s < 3600) return Math.round(s / 60) + "m ago";
  if (s < 86400) return Math.round(s / 3600) + "h ago";
  return Math.round(s / 86400) + "d ago";
}

function short(id) { return id && id.length > 12 ? id.slice(0, 12) + "…" : (id || ""); }

async function api(path, options) {
  const headers = Object.assign({ "Authorization": "Bearer " + (state.token || "") },
                                (options && options.headers) || {});
  const r = await fetch(path, Object.assign({}, options, { headers, credentials: "same-origin" }));
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.message || ("HTTP " + r.status));
  return body;
}

function notice(text) {
  const n = document.getElementById("notice");
  n.hidden = !text;
  n.textContent = text || "";
}

function renderInfo(info) {
  document.getElementById("node").textContent =
    "node " + info.node_id + " · v" + info.version + " · peers on " + (info.peer_address || "(no mesh)");
}

function renderHosts(hosts) {
  const box = document.getElementById("hosts");
  box.replaceChildren(...hosts.map(h => el("div", { class: "card", "data-node": h.node_id },
    el("div", {}, badge(h.state), " ", el("span", { class: "id", text: h.node_id }),
       h.self ? el("span", { class: "muted", text: " (this daemon)" }) : null),
    el("div", { class: "muted", text: (h.address || "address unknown") }),
    el("div", { text: h.sessions + " session" + (h.sessions === 1 ? "" : "s") +
      (h.self || h.last_contact == null ? "" : " · heard " + h.last_contact + "s ago") +
      (h.behind ? " · " + h.behind + " behind" : "") }))));
}

function renderSessions(page, hosts) {
  const byHost = new Map();
  for (const s of page.items) {
    if (!byHost.has(s.host)) byHost.set(s.host, []);
    byHost.get(s.host).push(s);
  }
  const blocks = [];
  for (const [host, list] of byHost) {
    const h = hosts.find(x => x.node_id === host);
    const rows = list.map(s => el("tr", { "data-session": s.session_id },
      el("td", {}, el("div", { class: "mono", text: s.session_id }),
         el("div", { class: "muted", text: s.agent_name + " · " + s.agent_type +
           (s.human_user ? " · " + s.human_user : "") })),
      el("td", {}, badge(s.status)),
      el("td", { text: s.current_task || "" }),
      el("td", { text: (s.capabilities || []).join(", ") }),
      el("td", { title: s.last_ping || "", text: ago(s.last_ping) })));
    blocks.push(el("div", { class: "host-block" },
      el("h3", {}, "on ", el("span", { class: "mono", text: short(host) }), " ",
         h ? badge(h.state) : null),
      el("table", {}, el("thead", {}, el("tr", {}, ...["session", "status", "task",
        "capabilities", "last ping"].map(t => el("th", { text: t })))),
        el("tbody", {}, ...rows))));
  }
  document.getElementById("sessions").replaceChildren(...blocks);
  document.getElementById("sessions-count").textContent =
    "(" + page.total + (page.more ? ", first " + page.items.length + " shown" : "") + ")";
  const to = document.getElementById("send-to");
  const chosen = to.value;
  to.replaceChildren(el("option", { value: "", text: "everyone (broadcast)" }),
    ...page.items.filter(s => s.status !== "offline").map(s =>
      el("option", { value: s.session_id, text: s.session_id + " (" + s.agent_name + ")" })));
  to.value = chosen;
}

function messageItem(m) {
  const deliveries = (m.deliveries || []).map(d =>
    el("span", { class: "delivery" }, badge(d.state),
       " ", el("span", { class: "muted", text: (d.session_id || short(d.node) || "") + " " })));
  const li = el("li", { "data-message": m.message_id },
    el("div", { class: "meta" }, badge(m.state), " ", m.type + " · ",
       el("span", { class: "mono", text: m.from_session }), " → ",
       el("span", { class: "mono", text: m.to_session || "everyone" }),
       " · " + ago(m.timestamp), m.priority === "high" ? " · high priority" : ""),
    el("div", { class: "subject", text: m.subject }),
    el("div", { class: "body", text: m.body + (m.truncated ? " …" : "") }),
    el("div", { class: "meta" }, ...deliveries));
  const b = el("button", { type: "button", text: m.in_reply_to ? "thread" : "replies" });
  b.addEventListener("click", () => showThread(m.message_id));
  li.querySelector(".meta").append(" ", b);
  return li;
}

function renderMessages(page) {
  document.getElementById("messages").replaceChildren(...page.items.map(messageItem));
  if (state.threadOf) showThread(state.threadOf);
}

async function showThread(id) {
  state.threadOf = id;
  try {
    const t = await api("/api/threads/" + encodeURIComponent(id) + "?limit=200");
    document.getElementById("thread-items").replaceChildren(...t.items.map(messageItem));
    document.getElementById("thread").hidden = false;
  } catch (e) { notice("thread: " + e.message); }
}

function renderOutboxes(o) {
  document.getElementById("outboxes").replaceChildren(...o.items.map(d => el("tr", {},
    el("td", { class: "mono", text: d.dest }), el("td", {}, badge(d.state)),
    el("td", { text: d.depth }), el("td", { text: d.oldest_age + "s" }),
    el("td", { text: d.lanes.map(l => l.lane + ": " + l.depth).join(", ") }))));
  if (!o.items.length) {
    document.getElementById("outboxes").append(el("tr", {}, el("td", { colspan: "5",
      class: "muted", text: "nothing queued for other hosts" })));
  }
  document.getElementById("waiting").textContent = o.waiting.messages
    ? o.waiting.messages + " message(s) wait for a recipient no daemon knows yet (oldest " +
      o.waiting.oldest_age + "s)" : "";
}

async function searchMemory() {
  const q = document.getElementById("memory-q").value;
  try {
    const r = await api("/api/memory?limit=100&q=" + encodeURIComponent(q));
    document.getElementById("memory").replaceChildren(...r.items.map(e => el("tr", {},
      el("td", { class: "mono", text: e.key }),
      el("td", { text: e.value + (e.truncated ? " …" : "") }),
      el("td", { text: e.type }), el("td", { class: "mono", text: e.session_id }),
      el("td", { text: (e.tags || []).join(", ") }),
      el("td", { title: e.timestamp || "", text: ago(e.timestamp) }))));
    document.getElementById("memory-count").textContent =
      "(" + r.total + " entries" + (r.more ? ", more match" : "") + ")";
  } catch (e) { notice("memory: " + e.message); }
}

function render(o) {
  renderInfo(o.info);
  renderHosts(o.hosts);
  renderSessions(o.sessions, o.hosts);
  renderMessages(o.messages);
  renderOutboxes(o.outboxes);
  if (o.memory.latest !== state.memoryLatest) {
    state.memoryLatest = o.memory.latest;
    searchMemory();
  }
}

function connect() {
  const live = document.getElementById("live");
  const es = new EventSource("/api/events");
  es.addEventListener("overview", ev => {
    live.textContent = "live"; live.className = "badge on";
    notice("");
    render(JSON.parse(ev.data));
  });
  es.onerror = () => {
    live.textContent = "reconnecting"; live.className = "badge off";
    if (!state.token) notice("No token: open the address the daemon logged (…/#token=…).");
  };
}

async function send(ev) {
  ev.preventDefault();
  const out = document.getElementById("send-result");
  out.textContent = "sending…";
  const payload = {
    from: document.getElementById("send-from").value.trim(),
    to: document.getElementById("send-to").value || null,
    subject: document.getElementById("send-subject").value,
    body: document.getElementById("send-body").value,
  };
  try {
    const r = await api("/api/send", { method: "POST", body: JSON.stringify(payload),
                                       headers: { "Content-Type": "application/json" } });
    out.textContent = "sent " + r.message_id;
    document.getElementById("send-body").value = "";
  } catch (e) { out.textContent = "not sent: " + e.message; }
}

document.addEventListener("DOMContentLoaded", () => {
  takeToken();
  document.getElementById("memory-form").addEventListener("submit", e => { e.preventDefault(); searchMemory(); });
  document.getElementById("send-form").addEventListener("submit", send);
  document.getElementById("thread-close").addEventListener("click", () => {
    state.threadOf = null; document.getElementById("thread").hidden = true;
  });
  connect();
});
