//! Terminals in a real VM, driven through a real pseudo-terminal: the test opens a pty pair,
//! runs banger on its slave (stdio and controlling terminal, as a shell would) and types into
//! and reads from its master. `vm run -it -- bash`: a prompt, `tty`, `stty size` after a
//! resize, the caller's `TERM`, Ctrl-C ending `sleep 100` and Ctrl-Z stopping it with banger
//! still attached, `exit 7`, and the terminal's mode as it was. Also SIGHUP restoring it,
//! `-it` without a terminal, `-i` and `-t` alone, and a `--tty` session attached, typed into,
//! resized and detached with Ctrl-].

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::termios::{tcgetattr, Termios};

use crate::harness::{wait_until, Env};
use crate::template::{env_from, template};

const DEADLINE: Duration = Duration::from_secs(120);

/// banger running on the slave of a pty this test holds.
struct Terminal {
    child: Child,
    master: File,
    /// The test keeps the slave open: its mode can be read after banger has gone.
    slave: OwnedFd,
    /// The slave's mode before banger started.
    initial: Termios,
    output: mpsc::Receiver<Vec<u8>>,
    seen: String,
}

impl Terminal {
    /// Runs `banger args` with a fresh 24x80 terminal as its stdio and controlling terminal.
    fn spawn(env: &Env, args: &[&str]) -> Self {
        let ws = nix::pty::Winsize { ws_row: 24, ws_col: 80, ws_xpixel: 0, ws_ypixel: 0 };
        let pty = nix::pty::openpty(Some(&ws), None).expect("openpty");
        let initial = tcgetattr(pty.slave.as_fd()).expect("the terminal's mode");
        let mut cmd = env.cmd(args);
        // The caller's TERM reaches the guest's programs.
        cmd.env("TERM", "vt100");
        let stdio = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup the slave"));
        cmd.stdin(stdio(&pty.slave)).stdout(stdio(&pty.slave)).stderr(stdio(&pty.slave));
        // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn banger on the pty");
        let master = File::from(pty.master);
        let mut reader = master.try_clone().expect("dup the master");
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once every slave holder is gone (never here: the test holds one).
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Self { child, master, slave: pty.slave, initial, output, seen: String::new() }
    }

    fn mode(&self) -> Termios {
        tcgetattr(self.slave.as_fd()).expect("the terminal's mode")
    }

    fn type_(&mut self, text: &str) {
        self.master.write_all(text.as_bytes()).expect("type into the terminal");
    }

    /// Reads until `done` holds for what came after `from` (an offset into `seen`); returns
    /// that text.
    fn wait_for(&mut self, from: usize, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let text = self.seen.get(from..).unwrap_or_default().to_owned();
            if done(&text) {
                return text;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(bytes) => self.seen.push_str(&String::from_utf8_lossy(&bytes)),
                Err(_) => panic!("no {what} on the terminal; it shows {:?}", self.seen),
            }
        }
    }

    /// Reads until `want` appears after `from`.
    fn expect(&mut self, from: usize, want: &str) -> String {
        self.wait_for(from, want, |t| t.contains(want))
    }

    fn at(&self) -> usize {
        self.seen.len()
    }

    /// Waits for banger to exit; its exit code.
    fn exit_code(&mut self) -> i32 {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "banger did not exit; the terminal shows {:?}", self.seen);
            // Keep draining what it prints meanwhile.
            if let Ok(bytes) = self.output.recv_timeout(Duration::from_millis(50)) {
                self.seen.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }

    /// Sets the window size, as a terminal emulator does (the kernel sends banger SIGWINCH).
    fn resize(&self, rows: u16, cols: u16) {
        let ws = nix::libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which outlives the call.
        let ret = unsafe { nix::libc::ioctl(self.master.as_raw_fd(), nix::libc::TIOCSWINSZ, &ws) };
        assert_eq!(ret, 0, "resize the terminal");
    }

    /// Asks `stty size` until the guest reports `rows cols` (the resize travels apart from the
    /// typed command, so the first answer may predate it).
    fn expect_size(&mut self, rows: u16, cols: u16) {
        let want = format!("{rows} {cols}\r\n");
        let deadline = Instant::now() + DEADLINE;
        loop {
            let from = self.at();
            self.type_("stty size; echo size-$((40 + 2))\r");
            let text = self.expect(from, "size-42\r\n");
            if text.contains(&want) {
                return;
            }
            assert!(Instant::now() < deadline, "the guest never saw {want:?}: {:?}", self.seen);
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many `name` processes run in the guest (seen through a second, plain exec).
/// How many live (not zombie) processes named `name` run in `vm`.
fn running(env: &Env, vm: &str, name: &str) -> u32 {
    let script = format!(
        "n=0; for d in /proc/[0-9]*; do [ \"$(cat $d/comm 2>/dev/null)\" = {name} ] || continue; \
         case \"$(sed -n 's/^State:[[:space:]]*//p' $d/status 2>/dev/null)\" in Z*|'') ;; *) n=$((n+1)) ;; esac; \
         done; echo $n"
    );
    let r = env.banger(&["vm", "exec", vm, "-n", "--", "sh", "-c", &script]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.stdout.trim().parse().expect("a count")
}

fn sleeping(env: &Env, vm: &str) -> bool {
    running(env, vm, "sleep") > 0
}

#[test]
fn vm_run_it_bash_is_a_real_terminal_and_restores_the_host_one() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    let mut term =
        Terminal::spawn(&env, &["vm", "run", "--rm", "--name", "tty1", "--image", "minimal", "-it", "--", "bash"]);
    let before = term.initial.clone();
    // A prompt (root's ends with '#').
    term.wait_for(0, "a prompt", |t| t.trim_end().ends_with('#'));
    assert_ne!(term.mode(), before, "raw mode while attached");

    let from = term.at();
    term.type_("tty\r");
    let text = term.wait_for(from, "tty's answer", |t| t.find("/dev/pts/").is_some_and(|i| t[i..].contains("\r\n")));
    // After bash's escape sequences (bracketed paste off) on the same line.
    let at = text.find("/dev/pts/").map_or(0, |i| i + "/dev/pts/".len());
    let number: String = text[at..].chars().take_while(char::is_ascii_digit).collect();
    assert!(!number.is_empty() && text[at + number.len()..].starts_with("\r\n"), "{text:?}");

    let from = term.at();
    term.type_("echo term-$TERM\r");
    term.expect(from, "term-vt100\r\n");

    term.expect_size(24, 80);
    term.resize(41, 133);
    term.expect_size(41, 133);

    // Ctrl-C goes to the guest's foreground job, not to banger.
    term.type_("sleep 100\r");
    wait_until("sleep runs in the guest", DEADLINE, || sleeping(&env, "tty1"));
    term.type_("\x03");
    wait_until("sleep ended", DEADLINE, || !sleeping(&env, "tty1"));
    assert!(term.child.try_wait().expect("wait").is_none(), "banger stays attached");
    let from = term.at();
    term.type_("echo status-$? after-$((6 * 7))\r");
    term.expect(from, "status-130 after-42");
    // Ctrl-Z too: the guest's shell stops its job and says so.
    let from = term.at();
    term.type_("sleep 100\r");
    wait_until("sleep runs in the guest", DEADLINE, || sleeping(&env, "tty1"));
    term.type_("\x1a");
    // Type on only once the shell prompts again, as a person would (failed once in four runs
    // under load when typed right after the notice).
    term.wait_for(from, "a prompt after the job stopped", |t| {
        t.split_once("Stopped").is_some_and(|(_, rest)| rest.trim_end().ends_with('#'))
    });
    let from = term.at();
    // `wait` reaps the killed job before the next prompt: without it a loaded guest's shell
    // could still list the job as stopped when `exit` comes, and refuse to exit (it did once).
    term.type_("kill -9 %1; wait %1; echo reaped-$?\r");
    term.expect(from, "reaped-137");
    term.wait_for(from, "the prompt after the kill", |t| t.contains("reaped-137") && t.trim_end().ends_with('#'));
    let deadline = std::time::Instant::now() + DEADLINE;
    while sleeping(&env, "tty1") {
        if std::time::Instant::now() > deadline {
            let ps = env.banger(&["vm", "exec", "tty1", "-n", "--", "sh", "-c", "grep -s . /proc/[0-9]*/stat"]);
            panic!("the stopped sleep was not killed; terminal: {:?}; guest processes:\n{}", term.seen, ps.stdout);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(term.child.try_wait().expect("wait").is_none(), "banger stays attached");

    term.type_("exit 7\r");
    assert_eq!(term.exit_code(), 7, "the guest command's exit code: {:?}", term.seen);
    assert_eq!(term.mode(), before, "the terminal's mode is restored");
    assert_ne!(env.banger(&["vm", "show", "tty1"]).code, 0, "--rm deleted the vm");
}

#[test]
fn it_needs_a_terminal_and_says_so() {
    // No VM needed: the check comes first (and `vm run` makes no VM for nothing).
    let env = Env::new();
    for args in [&["vm", "exec", "-it", "novm", "--", "bash"][..], &["vm", "run", "-it", "--", "bash"]] {
        let out = env.cmd(args).stdin(Stdio::null()).output().expect("run banger");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("the input device is not a TTY"), "{stderr}");
        assert!(stderr.contains("drop -t"), "says how to fix it: {stderr}");
    }
}

#[test]
fn pipes_t_alone_and_a_tty_session_attached_and_detached() {
    let Some(t) = template() else { return };
    let env = env_from(t);
    env.banger(&["vm", "create", "tty2", "--image", "minimal"]).ok();
    env.banger(&["vm", "start", "tty2"]).ok();

    // -i without -t: stdin is piped as always.
    let mut cat = env.cmd(&["vm", "exec", "-i", "tty2", "--", "sh", "-c", "cat; echo done"]);
    let mut cat = cat.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("spawn");
    cat.stdin.take().expect("stdin").write_all(b"piped\n").expect("write");
    let out = cat.wait_with_output().expect("wait");
    assert_eq!((out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()), (Some(0), "piped\ndone\n"));

    // -t alone: a terminal without input, even with no terminal here (as Docker's -t).
    let out = env
        .cmd(&["vm", "exec", "-t", "tty2", "--", "sh", "-c", "tty; test -t 1 && echo out-is-a-tty; exit 3"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(stdout.starts_with("/dev/pts/") && stdout.contains("out-is-a-tty\r\n"), "{stdout:?}");

    // A signal from outside (the terminal closed): the mode is restored, banger exits 128+1,
    // and the guest's shell goes with the exec.
    let mut term = Terminal::spawn(&env, &["vm", "exec", "-it", "tty2", "--", "bash"]);
    term.wait_for(0, "a prompt", |t| t.trim_end().ends_with('#'));
    assert_ne!(term.mode(), term.initial, "raw mode while attached");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(term.child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    assert_eq!(term.exit_code(), 129, "{:?}", term.seen);
    assert_eq!(term.mode(), term.initial, "the terminal's mode is restored after SIGHUP");
    wait_until("the guest's bash ended", DEADLINE, || running(&env, "tty2", "bash") == 0);

    // A tty session: started, attached on a real terminal, typed into, resized, detached.
    let started =
        env.banger(&["session", "start", "tty2", "--name", "sh", "--tty", "--json", "--", "bash"]).ok().json();
    assert_eq!((started["status"].as_str(), started["stdin_mode"].as_str()), (Some("running"), Some("tty")));
    let mut term = Terminal::spawn(&env, &["session", "attach", "tty2", "sh"]);
    let before = term.initial.clone();
    term.expect(0, "Ctrl-] detaches");
    let from = term.at();
    term.type_("echo typed-$((2 + 3))\r");
    term.expect(from, "typed-5");
    term.resize(33, 99);
    term.expect_size(33, 99);
    term.type_("\x1d");
    assert_eq!(term.exit_code(), 0, "{:?}", term.seen);
    assert!(term.seen.contains("detached from session sh; it keeps running"), "{:?}", term.seen);
    assert_eq!(term.mode(), before, "the terminal's mode is restored");
    let shown = env.banger(&["session", "show", "tty2", "sh", "--json"]).ok().json();
    assert_eq!(shown["status"], "running", "{shown}");
    let logs = env.banger(&["session", "logs", "tty2", "sh"]).ok().stdout;
    // (Echoes of what is typed while a command runs may land amid its output, as on any terminal.)
    assert!(logs.contains("typed-5") && logs.contains("33 99\r\n"), "the log is the terminal's output: {logs:?}");
    env.banger(&["session", "kill", "tty2", "sh"]).ok();
    env.banger(&["vm", "delete", "--force", "tty2"]).ok();
}
