// hookci's dashboard script: only the live parts. Pages read fine without it.
"use strict";

// Step output with ANSI colour codes as HTML, as src/web/ansi.rs renders it; keeps its
// style and any cut-off escape sequence from one piece of output to the next.
class Ansi {
  constructor() { this.style = {}; this.held = ""; }

  static escape(s) {
    return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }

  static xterm(n) {
    if (n < 16) return { named: n };
    const hex = (v) => v.toString(16).padStart(2, "0");
    let r, g, b;
    if (n < 232) {
      const level = (v) => (v === 0 ? 0 : 55 + v * 40);
      const i = n - 16;
      [r, g, b] = [level(Math.floor(i / 36)), level(Math.floor(i / 6) % 6), level(i % 6)];
    } else {
      r = g = b = 8 + (n - 232) * 10;
    }
    return { rgb: "#" + hex(r) + hex(g) + hex(b) };
  }

  apply(params) {
    const s = this.style;
    if (params.length === 0) params = [0];
    for (let i = 0; i < params.length; i++) {
      const p = params[i];
      if (p === 0) { for (const k of Object.keys(s)) delete s[k]; }
      else if (p === 1) s.b = true;
      else if (p === 2) s.d = true;
      else if (p === 3) s.i = true;
      else if (p === 4) s.u = true;
      else if (p === 22) { delete s.b; delete s.d; }
      else if (p === 23) delete s.i;
      else if (p === 24) delete s.u;
      else if (p >= 30 && p <= 37) s.fg = { named: p - 30 };
      else if (p >= 90 && p <= 97) s.fg = { named: p - 82 };
      else if (p === 39) delete s.fg;
      else if (p >= 40 && p <= 47) s.bg = { named: p - 40 };
      else if (p >= 100 && p <= 107) s.bg = { named: p - 92 };
      else if (p === 49) delete s.bg;
      else if (p === 38 || p === 48) {
        const key = p === 38 ? "fg" : "bg";
        if (params[i + 1] === 5 && params[i + 2] !== undefined) {
          s[key] = Ansi.xterm(Math.min(params[i + 2], 255)); i += 2;
        } else if (params[i + 1] === 2 && params[i + 4] !== undefined) {
          const hex = (v) => Math.min(v, 255).toString(16).padStart(2, "0");
          s[key] = { rgb: "#" + hex(params[i + 2]) + hex(params[i + 3]) + hex(params[i + 4]) }; i += 4;
        } else if (params[i + 1] === 5) { i += 1; }
        else if (params[i + 1] === 2) { i = params.length; }
      }
    }
  }

  open() {
    const s = this.style, classes = [];
    let css = "";
    for (const [key, cls, prop] of [["fg", "f", "color"], ["bg", "g", "background"]]) {
      if (!s[key]) continue;
      if (s[key].named !== undefined) classes.push(cls + s[key].named);
      else css += prop + ":" + s[key].rgb + ";";
    }
    for (const k of ["b", "d", "i", "u"]) if (s[k]) classes.push(k);
    if (!classes.length && !css) return "";
    return "<span" + (classes.length ? ' class="' + classes.join(" ") + '"' : "") + (css ? ' style="' + css + '"' : "") + ">";
  }

  html(text) {
    text = this.held + text;
    this.held = "";
    let out = "", tag = this.open();
    const wrap = (t) => (t ? (tag ? tag + Ansi.escape(t) + "</span>" : Ansi.escape(t)) : "");
    let at;
    while ((at = text.indexOf("\x1b")) >= 0) {
      out += wrap(text.slice(0, at));
      const rest = text.slice(at);
      let m;
      if ((m = /^\x1b\[([0-9;:]*)([\x40-\x7e])/.exec(rest))) {
        if (m[2] === "m") {
          this.apply(m[1] === "" ? [] : m[1].split(/[;:]/).map((p) => parseInt(p, 10) || 0));
          tag = this.open();
        }
        text = rest.slice(m[0].length);
      } else if ((m = /^\x1b\][^\x07\x1b]*(\x07|\x1b\\)/.exec(rest))) {
        text = rest.slice(m[0].length);
      } else if (/^\x1b(\[[0-9;:]*|\][^\x07\x1b]*\x1b?)?$/.test(rest)) {
        this.held = rest; // cut off: the rest comes with the next piece
        text = "";
      } else if (/^\x1b[()*+]./.test(rest)) {
        text = rest.slice(3);
      } else {
        text = rest.slice(2);
      }
    }
    return out + wrap(text);
  }
}

function statusHtml(word) {
  const w = Ansi.escape(word);
  return '<span class="st st-' + w + '" data-status="' + w + '">' + w + "</span>";
}

function took(ms) {
  if (ms === null || ms === undefined) return "";
  const s = Math.floor(ms / 1000);
  if (s === 0) return ms + " ms";
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

// The run page: follows the run's event stream until the run ends, without a reload.
function followRun(root) {
  const id = root.dataset.run;
  const logs = document.getElementById("logs");
  const steps = document.getElementById("steps");
  const ansi = {};
  let follow = true;
  const atEnd = () => window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 48;
  window.addEventListener("scroll", () => { follow = atEnd(); }, { passive: true });

  function row(step) {
    let tr = document.getElementById("step-" + step.number);
    if (!tr) {
      tr = document.createElement("tr");
      tr.id = "step-" + step.number;
      tr.innerHTML = '<td></td><td><a></a></td><td class="status"></td><td class="end"></td><td class="took"></td><td class="why"></td>';
      tr.cells[0].textContent = step.number;
      tr.querySelector("a").href = "#log-" + step.number;
      tr.querySelector("a").textContent = step.name;
      steps.appendChild(tr);
      const none = document.getElementById("no-steps");
      if (none) none.hidden = true;
    }
    tr.querySelector(".status").innerHTML = statusHtml(step.status);
    tr.querySelector(".end").textContent =
      step.signal != null ? "signal " + step.signal : step.exit_code != null ? "exit " + step.exit_code : "";
    tr.querySelector(".took").textContent = took(step.duration_ms);
    tr.querySelector(".why").textContent = step.reason || "";
  }

  function pre(number, name) {
    let section = document.getElementById("log-" + number);
    if (!section) {
      section = document.createElement("section");
      section.className = "log";
      section.id = "log-" + number;
      section.innerHTML = "<h3></h3><pre></pre>";
      section.querySelector("h3").textContent = number + ". " + name;
      logs.appendChild(section);
    }
    return section.querySelector("pre");
  }

  function scroll() { if (follow) window.scrollTo(0, document.documentElement.scrollHeight); }

  function finished(run) {
    document.getElementById("run-status").innerHTML = statusHtml(run.status);
    document.getElementById("run-duration").textContent = took(run.duration_ms);
    const reason = document.getElementById("run-reason");
    reason.textContent = run.reason || "";
    reason.hidden = !run.reason;
    const cancel = document.getElementById("cancel"), rerun = document.getElementById("rerun");
    if (cancel) cancel.hidden = true;
    if (rerun) rerun.hidden = false;
    delete root.dataset.live;
  }

  // A running step's log on the page may end inside a colour: its output goes on in it.
  for (const section of logs.querySelectorAll("section.log[data-sgr]")) {
    const a = new Ansi();
    a.apply(section.dataset.sgr === "" ? [0] : section.dataset.sgr.split(";").map((p) => parseInt(p, 10) || 0));
    ansi[section.id.slice("log-".length)] = a;
  }

  // The page came with each started step's log so far; the stream sends only what
  // follows (its `from`), and a reconnect goes on from the last event's id.
  const events = new EventSource(root.dataset.events || "/api/runs/" + encodeURIComponent(id) + "/events");
  events.addEventListener("step_started", (e) => {
    const step = JSON.parse(e.data);
    row(step);
    pre(step.number, step.name);
    ansi[step.number] = new Ansi();
    document.getElementById("run-status").innerHTML = statusHtml("running");
  });
  events.addEventListener("log", (e) => {
    const { step, text } = JSON.parse(e.data);
    const a = ansi[step] || (ansi[step] = new Ansi());
    pre(step, String(step)).insertAdjacentHTML("beforeend", a.html(text));
    scroll();
  });
  events.addEventListener("step_finished", (e) => { row(JSON.parse(e.data)); });
  events.addEventListener("run_finished", (e) => {
    finished(JSON.parse(e.data));
    events.close();
    scroll();
  });
  events.addEventListener("stopping", () => {
    document.getElementById("stopping").hidden = false;
    events.close();
  });
  // A network error leaves the stream reconnecting; an answer other than a stream
  // (503 when too many follow) closes it for good, and the page says so.
  events.addEventListener("error", () => {
    if (events.readyState === EventSource.CLOSED && root.dataset.live !== undefined) {
      document.getElementById("refused").hidden = false;
    }
  });
}

// Runs tables (on first pages): fetched again and swapped in when a run is queued,
// starts or ends, as the runs event stream says; nothing is fetched while nothing
// changes.
function refreshTables() {
  if (!document.querySelector("[data-refresh]")) return;
  let pending = null;
  const swap = async () => {
    pending = null;
    try {
      const r = await fetch(location.href, { credentials: "same-origin", cache: "no-store" });
      if (r.ok) {
        const fresh = new DOMParser().parseFromString(await r.text(), "text/html").querySelectorAll("[data-refresh]");
        document.querySelectorAll("[data-refresh]").forEach((el, i) => { if (fresh[i]) el.innerHTML = fresh[i].innerHTML; });
      }
    } catch (_) { /* the next change tries again */ }
  };
  // Changes come in bursts (a push queues several runs): one fetch for a burst.
  const soon = () => { if (!pending) pending = setTimeout(swap, 250); };
  const events = new EventSource("/api/events");
  // Each (re)connection may have missed changes since the page or the last stream.
  events.addEventListener("open", soon);
  events.addEventListener("run", soon);
  events.addEventListener("lagged", soon);
  events.addEventListener("stopping", () => events.close());
  // Refused (503 when too many follow): a slow look now and then instead.
  events.addEventListener("error", () => {
    if (events.readyState === EventSource.CLOSED) {
      setInterval(() => { if (!document.hidden) swap(); }, 30000);
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const run = document.querySelector(".run[data-live]");
  if (run) followRun(run);
  refreshTables();
});
