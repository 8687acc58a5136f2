//! `vm cp` and the file routes without a guest: what is refused before any guest I/O (a bad
//! path, a VM that does not exist or does not run, two host sides) gets a clear one-line error.

use crate::harness::Env;

#[test]
fn copies_and_file_routes_refuse_what_cannot_be_served() {
    let env = Env::new();
    env.banger(&["vm", "create", "idle"]).ok();
    let dir = env.dir.path().join("f.txt");
    std::fs::write(&dir, "x").expect("write");
    let host = dir.to_str().expect("utf-8");
    env.banger(&["vm", "cp", host, "idle:/root/"]).fails(1, "vm 'idle' is not running");
    env.banger(&["vm", "cp", "ghost:/etc/hosts", host]).fails(1, "no vm 'ghost'");
    env.banger(&["vm", "cp", host, "idle:root"]).fails(1, "the guest path must be absolute");
    env.banger(&["vm", "cp", host, host]).fails(1, "neither side is in a VM");
    env.banger(&["vm", "cp", "a:/x", "b:/y"]).fails(1, "both sides are in a VM");
    let (code, body) = env.request("GET", "/v1/vms/idle/files/stat?path=/etc/hosts", "");
    assert_eq!(code, 409, "{body}");
    let (code, body) = env.request("GET", "/v1/vms/idle/files/stat?path=etc/hosts", "");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("must be absolute"), "{body}");
    let (code, body) = env.request("DELETE", "/v1/vms/ghost/files?path=/x", "");
    assert_eq!(code, 404, "{body}");
    let (code, body) = env.request("POST", "/v1/vms/idle/files/mkdir", "{\"parents\":true}");
    assert_eq!(code, 400, "a mkdir without a path: {body}");
}
