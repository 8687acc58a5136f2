//! Kill-9 rounds: random VM operations on real guests, each interrupted by `kill -9 bangerd` at a
//! random moment, each followed by the convergence checks (no record lost or duplicated, every
//! VM's state matches its VMM, no orphan VMM, TAP, directory, scratch, loop device or mount).
//!
//! `BANGER_ROUNDS` sets the number of rounds (default 30); `BANGER_ROUNDS_SEED` replays a run
//! (its seed is printed first, and named by every failure).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::{pid_alive, Env};
use crate::template::{env_from, template};

/// The VMs the rounds play with: (name, networked).
const NAMES: &[(&str, bool)] = &[("r0", true), ("r1", false), ("r2", true)];
/// Scratch that only a running step uses (`services::recovery`'s list).
const SCRATCH: &[&str] = &[".staging-", ".deleting-", ".seed-", ".skel-", ".read-", ".write-", ".disk-", ".work-"];
/// The config's default `tap_pool_size`.
const TAP_POOL: usize = 4;
/// How long a converged state may take to show once the daemon is back.
const SETTLE: Duration = Duration::from_secs(60);
/// How long an interrupted CLI may take to give up (or finish on a daemon it restarted).
const CLI_DEADLINE: Duration = Duration::from_secs(300);

/// xorshift64*: reproducible from its seed, no crate needed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Yes,
    No,
    /// An interrupted create, run or delete: it may or may not have happened.
    Either,
}

/// A VM as `vm list --json` shows it.
#[derive(Debug, Clone)]
struct Vm {
    name: String,
    state: String,
    dir: String,
    handles: PathBuf,
}

/// Where a failure happened, and how to replay it.
struct Ctx<'a> {
    env: &'a Env,
    seed: u64,
    round: usize,
    rounds: usize,
    op: String,
    history: Vec<String>,
}

impl Ctx<'_> {
    fn fail(&self, what: &str) -> ! {
        let log = std::fs::read_to_string(self.env.state.join("bangerd.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "round {}/{} (`{}`), seed {} (replay: BANGER_ROUNDS_SEED={}): {what}\n--- rounds so far:\n{}\n--- bangerd.log tail:\n{}",
            self.round,
            self.rounds,
            self.op,
            self.seed,
            self.seed,
            self.history.join("\n"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

fn list(env: &Env) -> Result<Vec<Vm>, String> {
    let run = env.banger(&["vm", "list", "--json"]);
    if run.code != 0 {
        return Err(format!("vm list --json failed ({}): {}", run.code, run.stderr.trim()));
    }
    let json = run.json();
    let vms = json["vms"].as_array().ok_or_else(|| format!("vm list has no vms: {json}"))?;
    Ok(vms
        .iter()
        .map(|v| Vm {
            name: v["name"].as_str().unwrap_or_default().to_owned(),
            state: v["state"].as_str().unwrap_or_default().to_owned(),
            dir: v["vm_dir"].as_str().unwrap_or_default().to_owned(),
            handles: PathBuf::from(v["paths"]["handles"].as_str().unwrap_or_default()),
        })
        .collect())
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Live QEMU processes whose command line names this env's state dir.
fn qemus(state: &Path) -> BTreeSet<u32> {
    let state = state.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else { return BTreeSet::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let cmd = cmdline(pid);
            cmd.split(' ').next().is_some_and(|argv0| argv0.contains("qemu-system")) && cmd.contains(&state)
        })
        .filter(|&pid| pid_alive(pid))
        .collect()
}

/// What a VM's `handles.json` says: its VMM pid if that process lives and is this VM's, its TAP.
type Handles = (Option<u32>, Option<String>);

/// A VM's handles, if the file exists.
fn handles_pid(vm: &Vm) -> Result<Option<Handles>, String> {
    let text = match std::fs::read_to_string(&vm.handles) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", vm.handles.display())),
    };
    let h: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", vm.handles.display()))?;
    let pid = h["pid"].as_u64().and_then(|p| u32::try_from(p).ok());
    let live = pid.filter(|&p| pid_alive(p) && cmdline(p).contains(&format!("{}/", vm.dir)));
    Ok(Some((live, h["tap"].as_str().map(str::to_owned))))
}

/// Banger's TAP devices in the env's namespace: name → the bridge it is attached to.
fn taps(env: &Env) -> BTreeMap<String, Option<String>> {
    let ns = env.netns.as_deref().unwrap_or_default();
    let out = std::process::Command::new("ip").args(["-n", ns, "-o", "link", "show"]).output().expect("ip link");
    let mut found = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut fields = line.split_whitespace();
        let Some(name) = fields.nth(1).map(|n| n.trim_end_matches(':').split('@').next().unwrap_or(n).to_owned())
        else {
            continue;
        };
        if name.starts_with("bgpool") || name.starts_with("bgtap") {
            let words: Vec<&str> = line.split_whitespace().collect();
            let master = words.windows(2).find(|w| w[0] == "master").map(|w| w[1].to_owned());
            found.insert(name, master);
        }
    }
    found
}

/// Paths under `root` (at most `depth` levels down) whose name starts with a scratch prefix.
fn scratch(root: &Path, depth: usize, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if SCRATCH.iter().any(|p| name.starts_with(p)) {
            found.push(e.path());
        } else if depth > 0 && e.file_type().is_ok_and(|t| t.is_dir()) {
            scratch(&e.path(), depth - 1, found);
        }
    }
}

/// Loop devices backed by a file under the state dir, and mounts under it (seen from the test
/// and from the daemon, whose `ip netns exec` gave it a mount namespace of its own).
fn loops_and_mounts(env: &Env) -> Vec<String> {
    let state = env.state.display().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
        if backing.trim().starts_with(&state) {
            found.push(format!("loop device {} backed by {}", e.file_name().to_string_lossy(), backing.trim()));
        }
    }
    let daemon = env.daemon_pid().map(|p| format!("/proc/{p}/mountinfo"));
    for info in ["/proc/self/mountinfo".to_owned()].into_iter().chain(daemon) {
        let text = std::fs::read_to_string(&info).unwrap_or_default();
        for point in text.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| p.starts_with(&state)) {
            found.push(format!("mount {point} (in {info})"));
        }
    }
    found
}

/// One look at everything; `Err` names the first divergence.
fn converged(env: &Env, expect: &BTreeMap<&str, Presence>) -> Result<Vec<Vm>, String> {
    let vms = list(env)?;
    for vm in &vms {
        if vms.iter().filter(|v| v.name == vm.name).count() > 1 {
            return Err(format!("vm {} is listed twice", vm.name));
        }
        match expect.get(vm.name.as_str()) {
            None => return Err(format!("vm {} appeared from nowhere", vm.name)),
            Some(Presence::No) => return Err(format!("vm {} still exists after its delete succeeded", vm.name)),
            _ => {}
        }
        if matches!(vm.state.as_str(), "starting" | "stopping") {
            return Err(format!("vm {} is still {}", vm.name, vm.state));
        }
    }
    for (name, presence) in expect {
        if *presence == Presence::Yes && !vms.iter().any(|v| v.name == *name) {
            return Err(format!("vm {name} vanished without a successful delete"));
        }
    }
    let mut running_pids = BTreeSet::new();
    let mut held_taps = BTreeMap::new();
    for vm in &vms {
        let handles = handles_pid(vm)?;
        let running = vm.state == "running";
        match (&handles, running) {
            (Some((Some(pid), tap)), true) => {
                running_pids.insert(*pid);
                if let Some(tap) = tap {
                    if let Some(other) = held_taps.insert(tap.clone(), vm.name.clone()) {
                        return Err(format!("tap {tap} is held by both {other} and {}", vm.name));
                    }
                }
            }
            (_, true) => {
                return Err(format!("vm {} is running but its handles name no live vmm: {handles:?}", vm.name))
            }
            (Some(h), false) => return Err(format!("vm {} is {} but has handles.json {h:?}", vm.name, vm.state)),
            (None, false) => {}
        }
    }
    let vmms = qemus(&env.state);
    if vmms != running_pids {
        return Err(format!("qemu processes of this env {vmms:?} are not those of the running vms {running_pids:?}"));
    }
    let dirs: BTreeSet<&str> = vms.iter().map(|v| v.dir.as_str()).collect();
    for e in std::fs::read_dir(env.state.join("vms")).into_iter().flatten().flatten() {
        let path = e.path().display().to_string();
        if !dirs.contains(path.as_str()) {
            return Err(format!("{path} belongs to no listed vm"));
        }
    }
    let mut leftovers = Vec::new();
    scratch(&env.state, 3, &mut leftovers);
    if !leftovers.is_empty() {
        return Err(format!("scratch left under the state dir: {leftovers:?}"));
    }
    let devices = taps(env);
    for (tap, vm) in &held_taps {
        if devices.get(tap).and_then(Option::as_deref) != Some("banger0") {
            return Err(format!("running vm {vm}'s tap {tap} is not on banger0: {devices:?}"));
        }
    }
    let free = devices.keys().filter(|t| !held_taps.contains_key(*t)).count();
    // The pool, plus at most one device per VM whose start or stop was cut short (the next
    // daemon to bring the network up adopts those as idle). More is a leak that grows.
    if free > TAP_POOL + NAMES.len() {
        return Err(format!("{free} taps held by no running vm (pool {TAP_POOL}): {devices:?}, held {held_taps:?}"));
    }
    let stuck = loops_and_mounts(env);
    if !stuck.is_empty() {
        return Err(format!("left behind: {stuck:?}"));
    }
    Ok(vms)
}

fn settle(ctx: &Ctx, expect: &BTreeMap<&str, Presence>) -> Vec<Vm> {
    let deadline = Instant::now() + SETTLE;
    loop {
        match converged(ctx.env, expect) {
            Ok(vms) => return vms,
            Err(why) if Instant::now() >= deadline => ctx.fail(&format!("no convergence within {SETTLE:?}: {why}")),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// The next operation, chosen among those that make sense for the VM's current state.
fn pick(rng: &mut Rng, vms: &[Vm]) -> (&'static str, bool, &'static str) {
    let (name, networked) = NAMES[usize::try_from(rng.below(NAMES.len() as u64)).unwrap_or(0)];
    let roll = rng.below(100);
    let op = match vms.iter().find(|v| v.name == name).map(|v| v.state.as_str()) {
        None if roll < 65 => "create",
        None => "run",
        Some("running") if roll < 60 => "stop",
        Some("running") => "delete",
        Some(_) if roll < 65 => "start",
        Some(_) => "delete",
    };
    (name, networked, op)
}

fn args(name: &str, networked: bool, op: &str) -> Vec<String> {
    let mut args: Vec<String> = match op {
        "create" => vec!["vm".into(), "create".into(), name.into(), "--image".into(), "minimal".into()],
        "run" => ["vm", "run", "--rm", "--name", name, "--image", "minimal"].map(String::from).to_vec(),
        "delete" => ["vm", "delete", "--force", name].map(String::from).to_vec(),
        _ => vec!["vm".into(), op.into(), name.into()],
    };
    if matches!(op, "create" | "run") && !networked {
        args.push("--no-network".into());
    }
    if op == "run" {
        args.extend(["--", "true"].map(String::from));
    }
    args
}

/// What the restarted daemon did: its sweep (when not empty) and its reconciliation, from its log.
fn recovered(env: &Env) -> String {
    let log = std::fs::read_to_string(env.state.join("bangerd.log")).unwrap_or_default();
    let last = |what: &str, from: &str| {
        let line = log.lines().rfind(|l| l.contains(what))?;
        line.find(from).map(|i| line[i..].to_owned())
    };
    let swept = last("swept what the last run", "swept=").filter(|s| s.contains(": [\""));
    let reconciled = last("reconciled vms with the host", "adopted=").unwrap_or_default();
    swept.into_iter().chain([reconciled]).collect::<Vec<_>>().join("; ")
}

fn kill9(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}

#[test]
fn thirty_kill_nine_rounds_converge() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let rounds: usize = std::env::var("BANGER_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(30);
    let seed = std::env::var("BANGER_ROUNDS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos());
        u64::try_from(nanos % u128::from(u64::MAX)).unwrap_or(1) | 1
    });
    eprintln!("kill-9 rounds: {rounds} rounds, seed {seed} (replay: BANGER_ROUNDS_SEED={seed})");
    let mut rng = Rng(seed);
    let mut ctx = Ctx { env: &env, seed, round: 0, rounds, op: "start-up".into(), history: Vec::new() };
    let mut expect: BTreeMap<&str, Presence> = NAMES.iter().map(|(n, _)| (*n, Presence::No)).collect();
    env.banger(&["daemon", "start"]).ok();
    let mut vms = settle(&ctx, &expect);
    let mut killed = Vec::new();
    let started = Instant::now();
    for round in 1..=rounds {
        let round_started = Instant::now();
        let (name, networked, op) = pick(&mut rng, &vms);
        // Creates and deletes end within ~200 ms and a start leaves its provisioning stages
        // early: half the kills land in the first 400 ms, so those windows are hit too.
        let window = if rng.below(2) == 0 { 400 } else { 2500 };
        let delay = Duration::from_millis(rng.below(window));
        let argv = args(name, networked, op);
        ctx.round = round;
        ctx.op = format!("banger {}", argv.join(" "));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let child = env
            .cmd(&argv)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the cli");
        let cli = child.id();
        // Reaped on a thread of its own, which drains its pipes meanwhile.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(child.wait_with_output()));
        // The random moment: the one sleep that is the point of the test, not a wait.
        std::thread::sleep(delay);
        let Some(daemon) = env.daemon_pid() else { ctx.fail("no daemon to kill") };
        kill9(daemon);
        killed.push(daemon);
        let out = match rx.recv_timeout(CLI_DEADLINE) {
            Ok(out) => crate::harness::Run::from(out.expect("reap the cli")),
            Err(_) => {
                kill9(cli);
                ctx.fail(&format!("the cli did not end within {CLI_DEADLINE:?} of the daemon's kill"))
            }
        };
        let said = out.stderr.lines().rfind(|l| l.starts_with("banger:")).unwrap_or("").to_owned();
        let presence = match (op, out.code) {
            ("create", 0) => Presence::Yes,
            ("run" | "delete", 0) => Presence::No,
            ("create" | "run" | "delete", _) => Presence::Either,
            _ => Presence::Yes,
        };
        expect.insert(name, presence);
        // The crash is over once the killed daemon is gone: under load its exit (which frees
        // the state dir's lock) can lag the signal, and a start meanwhile is rightly refused
        // ("another bangerd (pid N) already serves"; failed once in five stress runs).
        crate::harness::wait_until("the killed daemon to be gone", CLI_DEADLINE, || !crate::harness::pid_alive(daemon));
        // The next call restarts the daemon (unless the cli already did, when the kill came
        // before it connected).
        let restarted = env.banger(&["vm", "list", "--json"]);
        let now = env.daemon_pid();
        if restarted.code != 0 || now.is_none() || now == Some(daemon) {
            ctx.fail(&format!("the daemon did not come back (killed {daemon}, now {now:?}): {}", restarted.stderr));
        }
        ctx.history.push(format!(
            "round {round}: `{}` killed bangerd {daemon} after {} ms; cli exit {} {said}\n  ↻ {}",
            ctx.op,
            delay.as_millis(),
            out.code,
            recovered(&env)
        ));
        vms = settle(&ctx, &expect);
        expect = NAMES
            .iter()
            .map(|(n, _)| (*n, if vms.iter().any(|v| v.name == *n) { Presence::Yes } else { Presence::No }))
            .collect();
        // Every third round: a stopped VM must start (its TAP, address and files are free).
        let mut functional = String::new();
        if round % 3 == 0 {
            let stopped = vms
                .iter()
                .filter(|v| v.state != "running")
                .min_by_key(|v| !NAMES.iter().any(|(n, net)| *net && *n == v.name));
            if let Some(vm) = stopped {
                let start = env.banger(&["vm", "start", &vm.name]);
                if start.code != 0 {
                    ctx.fail(&format!("vm start {} after the round failed: {}", vm.name, start.stderr.trim()));
                }
                functional = format!("; vm start {} ok", vm.name);
                vms = settle(&ctx, &expect);
            }
        }
        let states: Vec<String> = vms.iter().map(|v| format!("{} {}", v.name, v.state)).collect();
        let devices: Vec<String> = taps(&env).into_keys().collect();
        let line = format!(
            "  → converged [{}], taps [{}]{functional} in {:.1} s",
            states.join(", "),
            devices.join(" "),
            round_started.elapsed().as_secs_f64()
        );
        eprintln!("{}\n{line}", ctx.history.last().map_or("", String::as_str));
        ctx.history.push(line);
    }
    eprintln!("{rounds} rounds in {:.1} s", started.elapsed().as_secs_f64());
    // After every kill, a new networked VM still boots and runs. (It also brings the network
    // up in this daemon, so the stop below tears it down: a daemon that never does leaves a
    // killed predecessor's bridge, pool and nft table behind — a known gap, see the issue.)
    ctx.op = "final networked run".into();
    let run = env.banger(&["vm", "run", "--rm", "--name", "final-check", "--image", "minimal", "--", "true"]);
    if run.code != 0 {
        ctx.fail(&format!("vm run after the rounds: {}", run.stderr.trim()));
    }
    ctx.op = "final clean-up".into();
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    if !names.is_empty() {
        let deleted = env.banger(&[["vm", "delete", "--force"].as_slice(), &names].concat());
        if deleted.code != 0 {
            ctx.fail(&format!("vm delete --force {names:?}: {}", deleted.stderr.trim()));
        }
    }
    let last = env.daemon_pid();
    env.banger(&["daemon", "stop"]).ok();
    crate::harness::wait_until("the daemon ends", Duration::from_secs(30), || last.is_none_or(|p| !pid_alive(p)));
    let alive: Vec<u32> = killed.iter().copied().filter(|&p| pid_alive(p)).collect();
    let vmms = qemus(&env.state);
    let dirs: Vec<PathBuf> =
        std::fs::read_dir(env.state.join("vms")).into_iter().flatten().flatten().map(|e| e.path()).collect();
    let devices = taps(&env);
    if !alive.is_empty() || !vmms.is_empty() || !dirs.is_empty() || !devices.is_empty() {
        ctx.fail(&format!(
            "left after delete and daemon stop: killed daemons alive {alive:?}, qemu {vmms:?}, vm dirs {dirs:?}, \
             taps {devices:?} (taps alone: a killed daemon's bridge, pool and nft table outlive a next daemon \
             that never brings the network up; `Net::shutdown` tears down only a network it brought up)"
        ));
    }
}
