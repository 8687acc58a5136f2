// banger's web UI: fills the page the daemon rendered (body[data-page]) from the API (/api/v1,
// run as the logged-in user) and the live streams (/events, /ws). No framework; xterm.js
// (Terminal) and uPlot come from the bundle loaded before this file.
"use strict";

const csrf = document.querySelector('meta[name="csrf"]').content;
const page = document.body.dataset.page;
const vmName = document.body.dataset.vm;
const main = document.getElementById("main");

// ---- helpers --------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function toast(text, bad) {
  const t = document.getElementById("toast");
  t.textContent = text;
  t.className = bad ? "show bad" : "show";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.className = ""), bad ? 8000 : 3000);
}

// Calls the API; resolves with the parsed JSON (or null), rejects with the API's message.
async function api(method, path, body) {
  const init = { method, headers: { "x-banger-csrf": csrf } };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch("/api/v1" + path, init);
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = text;
  }
  if (!res.ok) throw new Error((data && data.message) || `${res.status} ${res.statusText}`);
  return data;
}

// Follows an operation with the API's long poll, calling `onChange` with each new state.
async function follow(op, onChange) {
  onChange(op);
  while (op.state === "running") {
    op = await api("GET", `/operations/${op.id}?wait_ms=5000&stages=${op.stages.length}`);
    onChange(op);
  }
  return op;
}

function stagesList(op) {
  return h(
    "ol",
    { id: "op-stages", class: "stages", dataset: { state: op.state } },
    op.stages.map((s) =>
      h("li", { class: s.state, dataset: { stage: s.name } }, `${s.name} `, h("span", { class: "muted" }, `${s.state} · ${ms(s.elapsed_ms)}`)),
    ),
    op.state !== "running" ? h("li", { class: `end ${op.state}` }, op.state, op.error ? `: ${op.error}` : "") : null,
  );
}

function ms(n) {
  return n < 1000 ? `${n} ms` : `${(n / 1000).toFixed(1)} s`;
}

function duration(secs) {
  if (secs === null || secs === undefined) return "";
  const d = Math.floor(secs / 86400), hh = Math.floor((secs % 86400) / 3600), m = Math.floor((secs % 3600) / 60), s = secs % 60;
  return d ? `${d}d ${hh}h` : hh ? `${hh}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

function mib(kib) {
  return kib === null || kib === undefined ? "" : `${(kib / 1024).toFixed(0)} MiB`;
}

function bytes(n) {
  return n > 1 << 30 ? `${(n / (1 << 30)).toFixed(1)} GiB` : `${(n / (1 << 20)).toFixed(0)} MiB`;
}

// The state a person cares about: what the VM does, or the error that stopped it.
function stateOf(vm) {
  return vm.state;
}

// CPU use in percent of one core, from two readings of a VM's cumulative CPU time.
const cpuSeen = new Map();
function cpuPercent(id, stats) {
  if (!stats || stats.cpu_time_ms === null || stats.cpu_time_ms === undefined) return null;
  const now = performance.now();
  const last = cpuSeen.get(id);
  cpuSeen.set(id, { t: now, cpu: stats.cpu_time_ms });
  if (!last || now - last.t < 200) return last ? last.pct : null;
  const pct = Math.max(0, (100 * (stats.cpu_time_ms - last.cpu)) / (now - last.t));
  cpuSeen.get(id).pct = pct;
  return pct;
}

function events(path, handlers) {
  const es = new EventSource(path);
  for (const [name, fn] of Object.entries(handlers)) es.addEventListener(name, (e) => fn(JSON.parse(e.data)));
  es.addEventListener("problem", (e) => toast(JSON.parse(e.data).error, true));
  es.onerror = () => document.body.classList.add("offline");
  es.onopen = () => document.body.classList.remove("offline");
  return es;
}

function table(headers, rows, attrs) {
  return h("table", attrs || {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))), h("tbody", {}, rows));
}

function title(text) {
  return h("h1", {}, text);
}

// Runs `action` after the user confirms `question`; shows its error.
async function confirmed(question, action) {
  if (!window.confirm(question)) return;
  try {
    await action();
  } catch (e) {
    toast(e.message, true);
  }
}

document.getElementById("logout").addEventListener("click", async () => {
  await fetch("/logout", { method: "POST", headers: { "x-banger-csrf": csrf } });
  location.href = "/";
});

// ---- dashboard ------------------------------------------------------------------------------

function dashboard() {
  const body = h("tbody", { id: "vm-rows" });
  const ops = h("div", { id: "running-ops" });
  const count = h("span", { id: "vm-count", class: "muted" });
  main.replaceChildren(
    h("div", { class: "bar" }, title("VMs"), count, h("a", { class: "button", href: "/create" }, "Create a VM")),
    h("table", { id: "vms" },
      h("thead", {}, h("tr", {}, ["Name", "State", "Address", "Image", "CPUs", "Uptime", "CPU", "Memory"].map((x) => h("th", {}, x)))),
      body),
    h("h2", {}, "Running operations"),
    ops,
  );
  events("/events", {
    fleet(f) {
      count.textContent = `${f.vms.length} VM${f.vms.length === 1 ? "" : "s"}`;
      body.replaceChildren(
        ...f.vms.map((v) => {
          const r = v, s = v.stats;
          const pct = cpuPercent(r.id, s);
          return h("tr", { dataset: { vm: r.name, state: stateOf(v) } },
            h("td", {}, h("a", { href: `/vms/${encodeURIComponent(r.name)}` }, r.name)),
            h("td", { class: `state ${stateOf(v)}` }, stateOf(v)),
            h("td", {}, r.guest_ip || ""),
            h("td", {}, r.image),
            h("td", {}, r.vcpus),
            h("td", {}, s ? duration(s.uptime_secs) : ""),
            h("td", {}, pct === null ? "" : `${pct.toFixed(0)} %`),
            h("td", {}, s ? mib(s.rss_kib) : `${r.memory_mib} MiB`));
        }),
      );
      if (!f.vms.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No VMs yet.")));
      ops.replaceChildren(
        f.operations.length
          ? table(["Operation", "Target", "Stage", "Elapsed"], f.operations.map((o) =>
              h("tr", { dataset: { op: o.id } }, h("td", {}, o.kind), h("td", {}, o.target),
                h("td", {}, o.stages.length ? o.stages[o.stages.length - 1].name : ""), h("td", {}, ms(o.elapsed_ms)))))
          : h("p", { class: "muted" }, "None."),
      );
      document.body.dataset.rendered = "dashboard";
    },
  });
}

// ---- create ---------------------------------------------------------------------------------

async function create() {
  const [images, kernels, config] = await Promise.all([api("GET", "/images"), api("GET", "/kernels"), api("GET", "/config")]);
  const c = config.config;
  const opt = (names, def) => names.map((n) => h("option", { value: n, selected: n === def }, n));
  const imageNames = [...new Set([...images.images.map((i) => i.name), ...images.catalog])];
  const kernelNames = [...new Set([...kernels.kernels.map((k) => k.name), ...kernels.catalog])];
  const progress = h("div", { id: "create-progress" });
  const field = (label, input) => h("label", {}, h("span", {}, label), input);
  const form = h("form", { id: "create-form", class: "form" },
    field("Name", h("input", { name: "name", required: true, pattern: "[a-z0-9]([a-z0-9-]*[a-z0-9])?", placeholder: "e.g. dev" })),
    field("Image", h("select", { name: "image" }, opt(imageNames, c.default_image))),
    field("Kernel", h("select", { name: "kernel" }, opt(kernelNames, c.default_kernel))),
    field("CPUs", h("input", { name: "vcpus", type: "number", min: 1, max: 32, value: c.default_vcpus })),
    field("Memory (MiB)", h("input", { name: "memory_mib", type: "number", min: 128, value: c.default_memory_mib })),
    field("Disk (MiB)", h("input", { name: "disk_mib", type: "number", min: 256, value: c.default_disk_mib })),
    field("Network", h("input", { name: "network", type: "checkbox", checked: c.network })),
    field("Ports", h("input", { name: "ports", placeholder: "HOST:GUEST, e.g. 8080:80 (comma-separated)" })),
    field("Start it", h("input", { name: "start", type: "checkbox", checked: true })),
    h("button", { type: "submit" }, "Create"),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = new FormData(form);
    const publish = (f.get("ports") || "").split(",").map((p) => p.trim()).filter(Boolean).map((p) => {
      const [host, guest] = p.split(":").map(Number);
      return { host_port: host, guest_port: guest || host };
    });
    const req = {
      name: f.get("name"), image: f.get("image"), kernel: f.get("kernel"),
      vcpus: Number(f.get("vcpus")), memory_mib: Number(f.get("memory_mib")), disk_mib: Number(f.get("disk_mib")),
      network: f.get("network") === "on", start: f.get("start") === "on", publish,
    };
    form.querySelector("button").disabled = true;
    try {
      const op = await api("POST", "/vms", req);
      const done = await follow(op, (o) => progress.replaceChildren(h("h2", {}, `Creating ${req.name}`), stagesList(o)));
      if (done.state === "succeeded") progress.append(h("p", {}, h("a", { id: "open-vm", href: `/vms/${encodeURIComponent(req.name)}` }, `Open ${req.name}`)));
    } catch (err) {
      toast(err.message, true);
    } finally {
      form.querySelector("button").disabled = false;
    }
  });
  main.replaceChildren(title("Create a VM"), form, progress);
}

// ---- one VM ---------------------------------------------------------------------------------

function vmPage() {
  const enc = encodeURIComponent(vmName);
  const facts = h("dl", { id: "vm-facts", class: "facts" });
  const console_ = h("pre", { id: "console", class: "console" });
  const ops = h("div", { id: "vm-ops" });
  const extra = h("div", { id: "vm-extra" });
  const chartBox = h("div", { id: "chart" });
  const act = (name, label, run, question) =>
    h("button", { type: "button", dataset: { action: name }, onclick: () => confirmed(question || `${label} ${vmName}?`, run) }, label);
  const opAction = (path, body) => async () => {
    const op = await api("POST", `/vms/${enc}/${path}`, body);
    if (op && op.stages) follow(op, (o) => ops.replaceChildren(stagesList(o)));
  };
  const actions = h("div", { class: "actions" },
    act("start", "Start", opAction("start")),
    act("stop", "Stop", () => api("POST", `/vms/${enc}/stop`)),
    act("restart", "Restart", async () => {
      await api("POST", `/vms/${enc}/stop`);
      await opAction("start")();
    }),
    act("pause", "Pause", () => api("POST", `/vms/${enc}/pause`)),
    act("resume", "Resume", () => api("POST", `/vms/${enc}/resume`)),
    act("snapshot", "Snapshot", async () => {
      const s = await api("POST", `/vms/${enc}/snapshot`, {});
      toast(`snapshot ${s.name} taken`);
      loadExtra();
    }),
    act("fork", "Fork", async () => {
      const name = window.prompt("Name of the fork:", `${vmName}-fork`);
      if (!name) return;
      const s = await api("POST", `/vms/${enc}/snapshot`, {});
      const op = await api("POST", "/vms", { name, from_snapshot: s.id, start: true });
      await follow(op, (o) => ops.replaceChildren(stagesList(o)));
    }),
    act("delete", "Delete", async () => {
      await api("DELETE", `/vms/${enc}`);
      location.href = "/";
    }, `Delete ${vmName} and its disks? This cannot be undone.`),
    h("a", { class: "button", id: "open-terminal", href: `/vms/${enc}/terminal` }, "Terminal"),
  );
  main.replaceChildren(title(vmName), actions, facts, ops,
    h("h2", {}, "CPU and memory"), chartBox, h("h2", {}, "Console"), console_, extra);

  // The chart: CPU % of one core and memory MiB over the last 5 minutes.
  const data = [[], [], []];
  const chart = new uPlot({
    width: Math.min(900, main.clientWidth || 900), height: 220,
    scales: { "%": { range: (u, lo, hi) => [0, Math.max(10, hi * 1.2)] }, mb: { range: (u, lo, hi) => [0, Math.max(64, hi * 1.2)] } },
    series: [{}, { label: "CPU %", stroke: "#2a7ae2", scale: "%" }, { label: "Memory MiB", stroke: "#d9822b", scale: "mb" }],
    axes: [{}, { scale: "%", label: "CPU %" }, { scale: "mb", side: 1, label: "MiB", grid: { show: false } }],
  }, data, chartBox);

  async function loadExtra() {
    const parts = [];
    const [sessions, forwards, snaps] = await Promise.all([
      api("GET", `/vms/${enc}/sessions`).catch(() => ({ sessions: [] })),
      api("GET", `/vms/${enc}/forwards`).catch(() => ({ forwards: [] })),
      api("GET", "/snapshots").catch(() => ({ snapshots: [] })),
    ]);
    const ports = await api("GET", `/vms/${enc}/ports`).catch(() => null);
    const logBox = h("pre", { id: "session-log", class: "console", hidden: true });
    parts.push(h("h2", {}, "Sessions"), sessions.sessions.length
      ? table(["Name", "Command", "Status", ""], sessions.sessions.map((s) => h("tr", {},
          h("td", {}, s.name), h("td", {}, [s.command, ...s.args].join(" ")), h("td", {}, s.status),
          h("td", {}, h("button", { type: "button", onclick: async () => {
            const res = await fetch(`/api/v1/vms/${enc}/sessions/${encodeURIComponent(s.id)}/logs`);
            logBox.textContent = (await res.text()).slice(-65536);
            logBox.hidden = false;
          } }, "Log")))))
      : h("p", { class: "muted" }, "None."), logBox);
    parts.push(h("h2", {}, "Forwards"), forwards.forwards.length
      ? table(["Host port", "Guest port", "State"], forwards.forwards.map((f) =>
          h("tr", { dataset: { forward: f.host_port } }, h("td", {}, f.host_port), h("td", {}, f.guest_port), h("td", {}, f.state))))
      : h("p", { class: "muted" }, "None."));
    parts.push(h("h2", {}, "Listening ports"), ports && ports.ports.length
      ? table(["Proto", "Address", "Port"], ports.ports.map((p) => h("tr", {}, h("td", {}, p.proto), h("td", {}, p.address), h("td", {}, p.port))))
      : h("p", { class: "muted" }, ports ? "None." : "Only while it runs."));
    const mine = snaps.snapshots.filter((s) => s.source_vm_name === vmName);
    parts.push(h("h2", {}, "Snapshots"), mine.length
      ? table(["Name", "Size", "Taken", ""], mine.map((s) => h("tr", { dataset: { snapshot: s.name } },
          h("td", {}, s.name), h("td", {}, bytes(s.size_bytes)), h("td", {}, s.created_at),
          h("td", {}, h("button", { type: "button", onclick: () => confirmed(`Delete snapshot ${s.name}?`, async () => {
            await api("DELETE", `/snapshots/${encodeURIComponent(s.id)}`);
            loadExtra();
          }) }, "Delete")))))
      : h("p", { class: "muted" }, "None."));
    extra.replaceChildren(...parts);
  }
  loadExtra();

  let wasAlive = null;
  events(`/events/vms/${enc}`, {
    vm(e) {
      const v = e.vm, r = e.vm, s = e.vm.stats;
      const state = r.state;
      facts.replaceChildren(
        ...[["State", h("span", { id: "vm-state", class: `state ${state}` }, state)], ["Address", r.guest_ip || ""],
          ["Image", r.image], ["Kernel", r.kernel], ["CPUs", r.vcpus], ["Memory", `${r.memory_mib} MiB`],
          ["Disk", `${r.disk_mib} MiB`], ["VMM", r.vmm], ["Uptime", s ? duration(s.uptime_secs) : ""],
          ["Error", r.last_error || ""]].flatMap(([k, val]) => [h("dt", {}, k), h("dd", {}, val)]));
      const atBottom = console_.scrollTop + console_.clientHeight >= console_.scrollHeight - 4;
      console_.textContent = e.console;
      if (atBottom) console_.scrollTop = console_.scrollHeight;
      if (e.operations.length) ops.replaceChildren(...e.operations.map(stagesList));
      const pct = cpuPercent(r.id, s);
      if (s && pct !== null) {
        data[0].push(Date.now() / 1000);
        data[1].push(pct);
        data[2].push((s.rss_kib || 0) / 1024);
        while (data[0].length > 300) data.forEach((d) => d.shift());
        chart.setData(data);
        chartBox.dataset.points = data[0].length;
      }
      if (wasAlive !== v.alive) loadExtra();
      wasAlive = v.alive;
      document.body.dataset.rendered = "vm";
    },
    gone() {
      facts.replaceChildren(h("p", { id: "vm-gone" }, `${vmName} no longer exists.`));
    },
  });
}

// ---- terminal -------------------------------------------------------------------------------

function terminal() {
  const box = h("div", { id: "terminal" });
  const status = h("p", { id: "terminal-status", class: "muted" }, "Connecting…");
  main.replaceChildren(h("div", { class: "bar" }, title(`${vmName}: terminal`), h("a", { href: `/vms/${encodeURIComponent(vmName)}` }, "Back")), box, status);
  const term = new Terminal({ cursorBlink: true, convertEol: false, fontSize: 14, scrollback: 5000 });
  term.open(box);
  // Fit the terminal to its box: cell size from the rendered grid.
  const fit = () => {
    const core = term._core;
    const cell = core && core._renderService && core._renderService.dimensions.css.cell;
    if (!cell || !cell.width) return;
    const cols = Math.max(20, Math.floor(box.clientWidth / cell.width) - 1);
    const rows = Math.max(5, Math.floor(box.clientHeight / cell.height));
    if (cols !== term.cols || rows !== term.rows) term.resize(cols, rows);
  };
  fit();
  const url = `ws://${location.host}/ws/vms/${encodeURIComponent(vmName)}/terminal?rows=${term.rows}&cols=${term.cols}&csrf=${csrf}`;
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const enc = new TextEncoder();
  ws.onopen = () => {
    status.textContent = "Connected.";
    term.focus();
  };
  ws.onmessage = (m) => {
    if (typeof m.data === "string") {
      const end = JSON.parse(m.data);
      status.textContent = end.exit !== undefined ? `The shell exited (${end.exit}).` : `Error: ${end.error}`;
      return;
    }
    term.write(new Uint8Array(m.data));
  };
  ws.onclose = () => {
    if (status.textContent === "Connected.") status.textContent = "Disconnected.";
  };
  term.onData((d) => ws.readyState === 1 && ws.send(enc.encode(d)));
  term.onResize(({ rows, cols }) => ws.readyState === 1 && ws.send(JSON.stringify({ rows, cols })));
  window.addEventListener("resize", fit);
  window.bangerTerminal = term;
  document.body.dataset.rendered = "terminal";
}

// ---- images, kernels, snapshots, doctor ----------------------------------------------------

function opRunner(box) {
  return async (promise) => {
    try {
      const op = await promise;
      await follow(op, (o) => box.replaceChildren(h("h2", {}, `${o.kind} ${o.target}`), stagesList(o)));
    } catch (e) {
      toast(e.message, true);
    }
  };
}

async function images() {
  const list = await api("GET", "/images");
  const box = h("div", { id: "op" });
  const run = opRunner(box);
  const pull = h("form", { class: "inline" }, h("input", { name: "reference", placeholder: "OCI reference, e.g. 127.0.0.1:5000/app:1", required: true }),
    h("button", { type: "submit" }, "Pull"));
  pull.addEventListener("submit", (e) => {
    e.preventDefault();
    run(api("POST", "/images/pull", { reference: new FormData(pull).get("reference") })).then(images);
  });
  const build = h("form", { class: "inline" }, h("select", { name: "name" }, list.catalog.map((n) => h("option", { value: n }, n))),
    h("button", { type: "submit" }, "Build"));
  build.addEventListener("submit", (e) => {
    e.preventDefault();
    run(api("POST", "/images", { name: new FormData(build).get("name") })).then(images);
  });
  main.replaceChildren(title("Images"),
    table(["Name", "Source", "Init", "Size", "Created", ""], list.images.map((i) => h("tr", { dataset: { image: i.name } },
      h("td", {}, i.name), h("td", {}, i.source), h("td", {}, i.init_mode), h("td", {}, bytes(i.size_bytes)), h("td", {}, i.created_at),
      h("td", {}, h("button", { type: "button", onclick: () => confirmed(`Delete image ${i.name}?`, async () => {
        await api("DELETE", `/images/${encodeURIComponent(i.name)}`);
        images();
      }) }, "Delete"))))),
    h("h2", {}, "Build from the catalog"), build, h("h2", {}, "Pull from a registry"), pull, box);
}

async function kernels() {
  const list = await api("GET", "/kernels");
  const box = h("div", { id: "op" });
  const run = opRunner(box);
  const pull = h("form", { class: "inline" }, h("select", { name: "name" }, list.catalog.map((n) => h("option", { value: n }, n))),
    h("button", { type: "submit" }, "Pull"));
  pull.addEventListener("submit", (e) => {
    e.preventDefault();
    run(api("POST", "/kernels", { name: new FormData(pull).get("name") })).then(kernels);
  });
  main.replaceChildren(title("Kernels"),
    table(["Name", "Release", "Source", "Created", ""], list.kernels.map((k) => h("tr", { dataset: { kernel: k.name } },
      h("td", {}, k.name), h("td", {}, k.release), h("td", {}, k.source), h("td", {}, k.created_at),
      h("td", {}, h("button", { type: "button", onclick: () => confirmed(`Delete kernel ${k.name}?`, async () => {
        await api("DELETE", `/kernels/${encodeURIComponent(k.name)}`);
        kernels();
      }) }, "Delete"))))),
    h("h2", {}, "Pull from the catalog"), pull, box);
}

async function snapshots() {
  const list = await api("GET", "/snapshots");
  const box = h("div", { id: "op" });
  main.replaceChildren(title("Snapshots"),
    table(["Name", "Of", "Image", "Size", "Forks", "Taken", ""], list.snapshots.map((s) => h("tr", { dataset: { snapshot: s.name } },
      h("td", {}, s.name), h("td", {}, s.source_vm_name), h("td", {}, s.image), h("td", {}, bytes(s.size_bytes)),
      h("td", {}, s.forks.join(", ")), h("td", {}, s.created_at),
      h("td", {},
        h("button", { type: "button", onclick: async () => {
          const name = window.prompt("Name of the new VM:", `${s.source_vm_name}-fork`);
          if (!name) return;
          await opRunner(box)(api("POST", "/vms", { name, from_snapshot: s.id, start: true }));
        } }, "Fork"),
        h("button", { type: "button", onclick: () => confirmed(`Delete snapshot ${s.name}?`, async () => {
          await api("DELETE", `/snapshots/${encodeURIComponent(s.id)}`);
          snapshots();
        }) }, "Delete"))))),
    box);
}

async function doctor() {
  const report = await api("GET", "/doctor");
  main.replaceChildren(title("Doctor"), h("p", { class: report.ok ? "ok" : "bad" }, report.ok ? "All checks pass." : "Some checks fail."),
    table(["Check", "Status", "Detail", "Fix"], report.checks.map((c) => h("tr", { class: c.status },
      h("td", {}, c.name), h("td", { class: `status ${c.status}` }, c.status), h("td", {}, c.detail), h("td", {}, c.fix || "")))));
}

const pages = { dashboard, create, vm: vmPage, terminal, images, kernels, snapshots, doctor };
Promise.resolve()
  .then(() => pages[page]())
  .catch((e) => {
    main.replaceChildren(title("Error"), h("p", { class: "bad" }, e.message));
  });
