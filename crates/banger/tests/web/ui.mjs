// The web UI in a real browser: Playwright (npm playwright-core, from web/node_modules)
// driving Debian's chromium against a real bangerd and a real guest. Run by
// crates/banger/tests/guest/web.rs inside the test's network namespace; prints a JSON report
// on stdout for the Rust side to check, and logs on stderr.
//
// Environment: LOGIN_URL (a `banger web` link), VM (the name to create), IMAGE, RELEASE (the
// guest kernel's release, to see in the terminal), SHOTS (a directory for the screenshots),
// WEB_DIR (the repo's web/, for playwright-core), CHROMIUM (default /usr/bin/chromium).
import { createRequire } from "node:module";
import path from "node:path";

const env = (k, d) => process.env[k] ?? d ?? (() => { throw new Error(`${k} is not set`); })();
const require = createRequire(path.join(env("WEB_DIR"), "package.json"));
const { chromium } = require("playwright-core");

const vm = env("VM");
const release = env("RELEASE");
const shots = env("SHOTS");
const log = (...a) => console.error("[ui]", ...a);
const report = { stages: [], saw_release: false, dashboard_states: [], reloaded: null };

// Every wait below is a condition with a deadline (a guest boot under TCG is slow).
const BOOT = 300_000, STEP = 60_000;

const browser = await chromium.launch({
  executablePath: env("CHROMIUM", "/usr/bin/chromium"),
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
});
try {
  const origin = new URL(env("LOGIN_URL")).origin;
  const context = await browser.newContext({ baseURL: origin, viewport: { width: 1280, height: 860 }, colorScheme: "light" });
  context.setDefaultTimeout(STEP);
  const page = await context.newPage();
  page.on("dialog", (d) => d.accept());
  page.on("pageerror", (e) => log("page error:", e.message));

  // Log in: the one-time link sets the cookie and lands on the dashboard.
  await page.goto(env("LOGIN_URL"));
  await page.waitForURL((u) => u.pathname === "/");
  await page.waitForSelector('body[data-rendered="dashboard"]');
  log("logged in");

  // A second tab keeps the dashboard open for the whole run: it must follow the VM's states
  // live, without a reload (a marker set now would be lost by one).
  const dash = await context.newPage();
  await dash.goto("/");
  await dash.waitForSelector('body[data-rendered="dashboard"]');
  await dash.evaluate(() => { window.__noReload = true; });
  await dash.exposeFunction("__sawState", (s) => {
    if (report.dashboard_states.at(-1) !== s) report.dashboard_states.push(s);
  });
  await dash.evaluate((name) => {
    const seen = () => {
      const row = document.querySelector(`tr[data-vm="${name}"]`);
      window.__sawState(row ? row.dataset.state : "absent");
    };
    new MutationObserver(seen).observe(document.getElementById("vm-rows"), { childList: true, subtree: true });
    seen();
  }, vm);

  // Create from the form, watching the operation's stages arrive.
  await page.click('nav a[href="/create"]');
  await page.waitForSelector("#create-form");
  await page.fill('input[name="name"]', vm);
  await page.selectOption('select[name="image"]', env("IMAGE"));
  await page.fill('input[name="ports"]', "18080:8080");
  await page.click('#create-form button[type="submit"]');
  await page.waitForSelector("#op-stages li", { timeout: STEP });
  const stagesSeen = new Set();
  const deadline = Date.now() + BOOT;
  for (;;) {
    const { state, names } = await page.evaluate(() => {
      const ol = document.getElementById("op-stages");
      return { state: ol && ol.dataset.state, names: [...document.querySelectorAll("#op-stages li[data-stage]")].map((li) => li.dataset.stage) };
    });
    names.forEach((n) => stagesSeen.add(n));
    if (state && state !== "running") {
      report.create_state = state;
      break;
    }
    if (Date.now() > deadline) throw new Error(`the create did not finish in ${BOOT} ms; stages: ${[...stagesSeen]}`);
    await page.waitForTimeout(100); // a poll interval, bounded by the deadline above
  }
  report.stages = [...stagesSeen];
  report.create_error = await page.evaluate(() => document.querySelector("#op-stages .end")?.textContent ?? null);
  log("created:", report.create_state, report.stages.join(" → "));
  if (report.create_state !== "succeeded") throw new Error(`create ${report.create_state}: ${report.create_error}`);

  // The dashboard shows it running.
  await dash.waitForSelector(`tr[data-vm="${vm}"][data-state="running"]`, { timeout: STEP });

  // The VM page: state, console tail, chart; then its screenshot.
  await page.click("#open-vm");
  await page.waitForSelector('body[data-rendered="vm"]');
  await page.waitForSelector("#vm-state.running");
  await page.waitForFunction(() => document.getElementById("console").textContent.length > 0);
  await page.waitForSelector('#vm-extra tr[data-forward="18080"]');
  // The chart plots a reading a second (CPU % needs two); wait for a few.
  await page.waitForFunction(() => Number(document.getElementById("chart").dataset.points || 0) >= 6);
  await page.screenshot({ path: path.join(shots, "web-vm.png"), fullPage: false });

  // The terminal: a login shell on a guest pty; `uname -r` prints the guest kernel's release.
  await page.click("#open-terminal");
  await page.waitForFunction(() => document.getElementById("terminal-status")?.textContent === "Connected.");
  await page.click("#terminal");
  const screen = () => page.evaluate(() => {
    const b = window.bangerTerminal.buffer.active;
    const lines = [];
    for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));
    return lines.join("\n");
  });
  // Type once the shell has prompted (it printed something), so no keystroke races its start.
  await page.waitForFunction(() => {
    const b = window.bangerTerminal.buffer.active;
    for (let i = 0; i < b.length; i++) if (b.getLine(i).translateToString(true).trim()) return true;
    return false;
  });
  await page.keyboard.type("uname -r; echo web-$((6*7))\n");
  await page.waitForFunction(() => {
    const b = window.bangerTerminal.buffer.active;
    for (let i = 0; i < b.length; i++) if (b.getLine(i).translateToString(true).trim() === "web-42") return true;
    return false;
  });
  const text = await screen();
  report.saw_release = text.split("\n").some((l) => l.trim() === release);
  report.terminal = text.trim().split("\n").slice(-6).join("\n");
  log("terminal:\n" + report.terminal);

  // The dashboard, with the VM running, for the README.
  await dash.bringToFront();
  await dash.waitForFunction((name) => {
    const row = document.querySelector(`tr[data-vm="${name}"]`);
    return row && row.children[6].textContent !== "";
  }, vm);
  await dash.screenshot({ path: path.join(shots, "web-dashboard.png"), fullPage: false });

  // Pause and resume, then a snapshot, from the VM page (each confirmed).
  await page.goto(`/vms/${vm}`);
  await page.waitForSelector("#vm-state.running");
  await page.click('button[data-action="pause"]');
  await page.waitForSelector("#vm-state.paused");
  await dash.waitForSelector(`tr[data-vm="${vm}"][data-state="paused"]`);
  await page.click('button[data-action="resume"]');
  await page.waitForSelector("#vm-state.running");
  await page.click('button[data-action="snapshot"]');
  await page.waitForSelector("#vm-extra tr[data-snapshot]");
  report.snapshot = await page.getAttribute("#vm-extra tr[data-snapshot]", "data-snapshot");
  log("paused, resumed, snapshot", report.snapshot);

  // Stop from the VM page; the dashboard tab follows, live.
  await page.click('button[data-action="stop"]');
  await dash.waitForSelector(`tr[data-vm="${vm}"][data-state="stopped"]`, { timeout: STEP });
  await page.waitForSelector("#vm-state.stopped");
  log("stopped");

  // Delete (confirmed) lands on the dashboard; the other tab sees the row go.
  await page.click('button[data-action="delete"]');
  await page.waitForURL((u) => u.pathname === "/");
  await dash.waitForFunction((name) => !document.querySelector(`tr[data-vm="${name}"]`), vm, { timeout: STEP });
  report.reloaded = !(await dash.evaluate(() => window.__noReload === true));
  log("deleted");

  // The lists: images and kernels from the template, the snapshot (deleted from its list), doctor.
  await page.goto("/images");
  await page.waitForSelector(`tr[data-image="${env("IMAGE")}"]`);
  await page.goto("/kernels");
  await page.waitForSelector("tr[data-kernel]");
  await page.goto("/snapshots");
  await page.click(`tr[data-snapshot="${report.snapshot}"] button:has-text("Delete")`);
  await page.waitForFunction((name) => document.querySelector("h1")?.textContent === "Snapshots"
    && !document.querySelector(`tr[data-snapshot="${name}"]`), report.snapshot);
  await page.goto("/doctor");
  await page.waitForSelector("td.status");
  report.doctor_web = await page.evaluate(() => [...document.querySelectorAll("tbody tr")]
    .map((tr) => [...tr.children].map((td) => td.textContent)).find((r) => r[0] === "web")?.[2] ?? null);
  report.lists = true;
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(report) + "\n");
