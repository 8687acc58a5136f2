//! Snapshot commands without a guest: what is refused, and how it is said.

use crate::harness::Env;

#[test]
fn snapshot_commands_refuse_what_cannot_be_done() {
    let env = Env::new();
    let empty = env.banger(&["snapshot", "list", "--json"]).ok().json();
    assert_eq!(empty["snapshots"], serde_json::json!([]));
    assert!(env.banger(&["snapshot", "ls"]).ok().stdout.contains("FORKS"));
    env.banger(&["snapshot", "delete", "nosuch"]).fails(1, "no snapshot 'nosuch'; see `banger snapshot list`");
    env.banger(&["snapshot", "show", "nosuch"]).fails(1, "no snapshot 'nosuch'");
    env.banger(&["vm", "fork", "nosuch", "--name", "f"]).fails(1, "no snapshot 'nosuch'");
    env.banger(&["vm", "create", "--from-snapshot", "nosuch", "f"]).fails(1, "no snapshot 'nosuch'");

    env.banger(&["vm", "create", "idle"]).ok();
    env.banger(&["vm", "pause", "idle"]).fails(1, "vm 'idle' is not running; start it with `banger vm start idle`");
    env.banger(&["vm", "resume", "idle"]).fails(1, "is not running");
    env.banger(&["vm", "snapshot", "idle"]).fails(1, "is not running");
    env.banger(&["vm", "snapshot", "idle", "--name", "Bad_Name"]).fails(1, "invalid snapshot name");
    let list = env.banger(&["vm", "list", "--json"]).ok().json();
    assert!(list["vms"][0].get("origin_snapshot").is_none(), "no origin for a plain vm: {list}");
    assert_eq!(env.banger(&["snapshot", "list", "--json"]).ok().json()["snapshots"], serde_json::json!([]));
}
