//! Guest sessions in a real VM: surviving `kill -9` of the daemon, stop and kill with their exit
//! codes, launch failures with their stage, a stopped VM failing its sessions, and attach /
//! detach / reattach with a stdin pipe driven through pipes (no terminal).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::{pid_alive, wait_until, Env};
use crate::template::{env_from, template};

fn kill9(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
}

fn show(env: &Env, vm: &str, session: &str) -> serde_json::Value {
    env.banger(&["session", "show", vm, session, "--json"]).ok().json()
}

/// Boots a `minimal` VM named `name`.
fn running_vm(env: &Env, name: &str) {
    env.banger(&["vm", "create", name, "--image", "minimal"]).ok();
    env.banger(&["vm", "start", name]).ok();
}

#[test]
fn a_session_outlives_a_killed_daemon_and_ends_with_term_or_kill() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    running_vm(&env, "sess");
    let ticker = "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done";
    let started = env
        .banger(&[
            "session",
            "start",
            "sess",
            "--name",
            "ticker",
            "--env",
            "GREETING=hi",
            "--tag",
            "team=web",
            "--json",
            "--",
            "sh",
            "-c",
            ticker,
        ])
        .ok()
        .json();
    assert_eq!(started["status"], "running", "{started}");
    assert_eq!(started["tags"]["team"], "web");
    assert_eq!(
        started["stdout_path"],
        format!("/var/lib/banger/sessions/{}/stdout", started["id"].as_str().expect("id"))
    );
    let pid = started["pid"].as_u64().expect("pid");

    let daemon = env.daemon_pid().expect("daemon");
    kill9(daemon);
    wait_until("daemon death", Duration::from_secs(10), || !pid_alive(daemon));
    let logs = env.banger(&["session", "logs", "sess", "ticker"]).ok();
    assert!(logs.stderr.contains("started bangerd"), "a new daemon answers: {}", logs.stderr);
    let shown = show(&env, "sess", "ticker");
    assert_eq!((shown["status"].as_str(), shown["pid"].as_u64()), (Some("running"), Some(pid)), "{shown}");
    // Still writing: the log grows after the daemon's death (each tick forks `sleep`, slow under TCG).
    let before = logs.stdout.lines().count();
    let mut log = String::new();
    wait_until("more ticks", Duration::from_secs(60), || {
        log = env.banger(&["session", "logs", "sess", "ticker"]).ok().stdout;
        log.lines().count() > before + 2
    });
    assert!(log.starts_with("tick 0\ntick 1\ntick 2\n"), "{log}");

    let stopped = env.banger(&["session", "stop", "sess", "ticker", "--json"]).ok().json();
    assert_eq!(stopped["status"], "exited", "{stopped}");
    assert_eq!((stopped["exit_code"].as_i64(), stopped["exit_signal"].as_i64()), (Some(143), Some(15)));
    assert!(stopped["ended_at"].is_string());
    env.banger(&["session", "start", "sess", "--name", "sleeper", "--", "sleep", "600"]).ok();
    let killed = env.banger(&["session", "kill", "sess", "sleeper", "--json"]).ok().json();
    assert_eq!((killed["exit_code"].as_i64(), killed["exit_signal"].as_i64()), (Some(137), Some(9)), "{killed}");
    let again = env.banger(&["session", "stop", "sess", "sleeper"]).ok();
    assert!(
        again.stderr.contains("exited 137 (SIGKILL)"),
        "stopping an ended session changes nothing: {}",
        again.stderr
    );

    // Launch failures are recorded with their stage, and the CLI says so.
    env.banger(&["session", "start", "sess", "--name", "nocmd", "--", "no-such-command-here"])
        .fails(1, "failed to start at stage 'command': no-such-command-here: command not found");
    let nocmd = show(&env, "sess", "nocmd");
    assert_eq!((nocmd["status"].as_str(), nocmd["launch_stage"].as_str()), (Some("failed"), Some("command")));
    env.banger(&["session", "start", "sess", "--name", "nocwd", "--cwd", "/no/such/dir", "--", "true"])
        .fails(1, "failed to start at stage 'cwd'");
    let nocwd = show(&env, "sess", "nocwd");
    assert_eq!(nocwd["launch_stage"], "cwd");
    assert!(nocwd["launch_message"].as_str().is_some_and(|m| m.contains("/no/such/dir does not exist")), "{nocwd}");
    env.banger(&["session", "start", "sess", "--name", "ticker", "--", "true"])
        .fails(1, "vm 'sess' already has a session named 'ticker'");

    // Stopping the VM fails what still runs.
    env.banger(&["session", "start", "sess", "--name", "last", "--", "sleep", "600"]).ok();
    env.banger(&["vm", "stop", "sess"]).ok();
    let last = show(&env, "sess", "last");
    assert_eq!((last["status"].as_str(), last["error"].as_str()), (Some("failed"), Some("vm is not running")));
    let list = env.banger(&["session", "list", "sess", "--json"]).ok().json();
    let statuses: Vec<(&str, &str)> = list["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| (s["name"].as_str().unwrap_or("?"), s["status"].as_str().unwrap_or("?")))
        .collect();
    assert_eq!(
        statuses,
        [("ticker", "exited"), ("sleeper", "exited"), ("nocmd", "failed"), ("nocwd", "failed"), ("last", "failed")]
    );
    env.banger(&["session", "logs", "sess", "ticker"]).fails(1, "vm 'sess' is not running");
    env.banger(&["vm", "delete", "sess"]).ok();
}

/// A running `banger session attach` with its stdin and stdout as pipes; stdout lines arrive on
/// a channel.
struct Attached {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Attached {
    fn spawn(env: &Env, vm: &str, session: &str) -> Self {
        let mut child = env
            .cmd(&["session", "attach", vm, session])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn attach");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    fn send(&mut self, text: &str) {
        self.child.stdin.as_mut().expect("stdin").write_all(text.as_bytes()).expect("write to attach");
    }

    /// Waits for a stdout line equal to `want`.
    fn expect_line(&mut self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.seen.iter().any(|l| l == want) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no line {want:?} from the attach; saw {:?}", self.seen),
            }
        }
    }

    /// Closes stdin (which detaches) and returns the exit code and stderr.
    fn detach(mut self) -> (i32, String, Vec<String>) {
        drop(self.child.stdin.take());
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            pipe.read_to_string(&mut stderr).expect("read the attach's stderr");
        }
        let status = self.child.wait().expect("wait for attach");
        let mut seen = std::mem::take(&mut self.seen);
        // Its stdout is at EOF now: the reader thread ends once it has passed everything on.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            seen.push(line);
        }
        (status.code().unwrap_or(-1), stderr, seen)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn attach_detach_and_reattach_with_a_stdin_pipe() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    running_vm(&env, "att");
    // Each line is answered at once and again 4 s later, while nobody is attached.
    let script = "while read l; do echo got:$l; sleep 4; echo later:$l; done";
    env.banger(&["session", "start", "att", "--name", "repl", "--stdin", "pipe", "--", "sh", "-c", script]).ok();

    let mut first = Attached::spawn(&env, "att", "repl");
    first.send("one\n");
    first.expect_line("got:one");
    assert_eq!(show(&env, "att", "repl")["status"], "running");
    // A second attach while the first holds stdin is refused (its own stdin is /dev/null).
    env.banger(&["session", "attach", "att", "repl"]).fails(1, "stdin is already attached by another client");
    let (code, stderr, seen) = first.detach();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("detached from session repl; it keeps running"), "{stderr}");
    assert!(!seen.iter().any(|l| l == "later:one"), "detached before the late line: {seen:?}");

    // Output produced while detached arrives as the log's tail on reattach.
    wait_until("the late line in the log", Duration::from_secs(30), || {
        env.banger(&["session", "logs", "att", "repl"]).ok().stdout.contains("later:one")
    });
    let mut second = Attached::spawn(&env, "att", "repl");
    second.expect_line("later:one");
    second.send("two\n");
    second.expect_line("got:two");
    // Closing the client (kill -9, no goodbye) detaches too; the session runs on.
    kill9(second.child.id());
    drop(second);
    assert_eq!(show(&env, "att", "repl")["status"], "running");
    // The daemon notices the closed client at once; allow it a moment to pass the detach on.
    let mut third = None;
    wait_until("stdin is free again", Duration::from_secs(15), || {
        let mut attached = Attached::spawn(&env, "att", "repl");
        attached.send("three\n");
        let ok = attached.lines.recv_timeout(Duration::from_secs(20)).is_ok();
        if ok {
            third = Some(attached);
        }
        ok
    });
    let mut third = third.expect("attached");
    third.expect_line("got:three");
    let (code, _, _) = third.detach();
    assert_eq!(code, 0);
    let log = env.banger(&["session", "logs", "att", "repl"]).ok().stdout;
    assert!(log.starts_with("got:one\nlater:one\ngot:two\n"), "{log}");
    let killed = env.banger(&["session", "kill", "att", "repl", "--json"]).ok().json();
    assert_eq!(killed["exit_code"], 137);
    env.banger(&["vm", "stop", "att"]).ok();
    env.banger(&["vm", "delete", "att"]).ok();
}
