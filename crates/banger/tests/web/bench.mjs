// Times the dashboard's first full render (every VM row drawn) in headless chromium, and lists
// the requests the page makes while it loads. Run by scripts/bench-web; prints JSON on stdout.
//
// Environment: LOGIN_URL (a `banger web` link), N (VMs expected), RUNS, WEB_DIR (the repo's
// web/, for playwright-core), CHROMIUM (default /usr/bin/chromium).
import { createRequire } from "node:module";
import path from "node:path";

const env = (k, d) => process.env[k] ?? d ?? (() => { throw new Error(`${k} is not set`); })();
const require = createRequire(path.join(env("WEB_DIR"), "package.json"));
const { chromium } = require("playwright-core");
const n = Number(env("N")), runs = Number(env("RUNS", "5"));

const browser = await chromium.launch({
  executablePath: env("CHROMIUM", "/usr/bin/chromium"),
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
});
const out = { n, runs: [], requests: null, first_event_bytes: null };
try {
  const context = await browser.newContext({ baseURL: new URL(env("LOGIN_URL")).origin });
  context.setDefaultTimeout(60_000);
  const login = await context.newPage();
  await login.goto(env("LOGIN_URL"));
  await login.waitForSelector('body[data-rendered="dashboard"]');
  await login.close();
  for (let i = 0; i < runs; i++) {
    const page = await context.newPage();
    const requests = [];
    page.on("request", (r) => requests.push(`${r.method()} ${new URL(r.url()).pathname}`));
    const t0 = performance.now();
    await page.goto("/", { waitUntil: "commit" });
    await page.waitForFunction((want) => document.querySelectorAll("#vm-rows tr[data-vm]").length === want, n, { polling: "raf" });
    out.runs.push(Math.round((performance.now() - t0) * 10) / 10);
    out.requests = requests;
    await page.close();
  }
  // The size of the one event that carries the fleet.
  const page = await context.newPage();
  await page.goto("/doctor");
  out.first_event_bytes = await page.evaluate(async () => {
    const res = await fetch("/events");
    const reader = res.body.getReader();
    let text = "";
    while (!text.includes("\n\n")) text += new TextDecoder().decode((await reader.read()).value);
    reader.cancel();
    return text.length;
  });
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(out) + "\n");
