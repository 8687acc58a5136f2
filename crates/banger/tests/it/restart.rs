//! A daemon killed with SIGKILL loses nothing: the next CLI call starts a new one over the same
//! store, and every record is intact.

use crate::harness::{pid_alive, wait_until, Env};

#[test]
fn kill_9_then_the_next_call_restarts_with_every_record() {
    let env = Env::new();
    for name in ["one", "two", "three"] {
        env.banger(&["vm", "create", name, "--cpus", "2"]).ok();
    }
    env.banger(&["vm", "set", "two", "--memory", "2G"]).ok();
    let before = env.banger(&["vm", "list", "--json"]).ok().json();
    let ops_before = env.banger(&["op", "list", "--json"]).ok().json();
    let pid = env.daemon_pid().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    wait_until("daemon death", std::time::Duration::from_secs(10), || !pid_alive(pid));
    assert!(env.socket.exists(), "a killed daemon leaves its socket behind");

    let run = env.banger(&["vm", "list", "--json"]).ok();
    assert!(run.stderr.contains("started bangerd"), "{}", run.stderr);
    let new_pid = env.daemon_pid().expect("new daemon");
    assert_ne!(new_pid, pid);
    assert_eq!(run.json(), before, "every vm record intact");
    let ops_after = env.banger(&["op", "list", "--json"]).ok().json();
    assert_eq!(ops_after["operations"].as_array().map(Vec::len), ops_before["operations"].as_array().map(Vec::len));
    let two = env.banger(&["vm", "show", "two", "--json"]).ok().json();
    assert_eq!(two["memory_mib"], 2048);
}

/// A state dir made by hand under a 0755 umask (or by an older banger) is made private at the
/// next start: the directory, the database and the log are no longer readable by other users.
#[test]
fn an_open_state_dir_is_made_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let env = Env::new();
    env.banger(&["vm", "list"]).ok();
    let pid = env.daemon_pid().expect("pid");
    env.banger(&["daemon", "stop"]).ok();
    wait_until("daemon exit", std::time::Duration::from_secs(10), || !pid_alive(pid));
    let open = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    open(&env.state, 0o755);
    open(&env.state.join("banger.db"), 0o644);
    open(&env.state.join("bangerd.log"), 0o644);
    env.banger(&["vm", "list"]).ok();
    let mode = |p: std::path::PathBuf| std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(env.state.clone()), 0o700);
    assert_eq!(mode(env.state.join("banger.db")), 0o600);
    assert_eq!(mode(env.state.join("bangerd.log")), 0o600);
    let log = std::fs::read_to_string(env.state.join("bangerd.log")).expect("log");
    assert!(log.contains("tightened permissions"), "the daemon says what it changed");
}
