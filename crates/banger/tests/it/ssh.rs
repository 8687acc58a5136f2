//! SSH without guests: the installation key, the pinned host keys in known_hosts, `ssh-config`,
//! `vm ssh`'s refusal of a VM without an address, and the git identity's checks.

use std::os::unix::fs::PermissionsExt as _;

use insta::assert_json_snapshot;

use crate::harness::Env;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn ssh_config_lists_every_vm_and_known_hosts_pins_their_host_keys() {
    let env = Env::new();
    let web = env.banger(&["vm", "create", "web", "--json"]).ok().json();
    env.banger(&["vm", "create", "db", "--no-network"]).ok();
    let ssh = env.state.join("ssh");
    let host_key = |vm: &serde_json::Value| {
        let dir = std::path::PathBuf::from(vm["vm_dir"].as_str().expect("vm_dir"));
        assert_eq!(mode(&dir.join("ssh_host_ed25519_key")), 0o600);
        let line = std::fs::read_to_string(dir.join("ssh_host_ed25519_key.pub")).expect("host key made at create");
        line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
    };
    let db = env.banger(&["vm", "show", "db", "--json"]).ok().json();
    let known = std::fs::read_to_string(ssh.join("known_hosts")).expect("known_hosts");
    assert_eq!(known, format!("db.vm {}\nweb.vm {}\n", host_key(&db), host_key(&web)));

    let text = env.banger(&["ssh-config"]).ok().stdout;
    let key = ssh.join("id_ed25519");
    assert_eq!((mode(&ssh), mode(&key)), (0o700, 0o600), "installation key made on first need, private");
    let block = |name: &str, address: &str| {
        format!(
            "Host {name}.vm\n    {address}\n    User root\n    Port 22\n    \
             IdentityFile {}\n    IdentitiesOnly yes\n    UserKnownHostsFile {}\n    StrictHostKeyChecking yes\n    \
             HostKeyAlias {name}.vm\n",
            key.display(),
            ssh.join("known_hosts").display()
        )
    };
    let web_ip = web["guest_ip"].as_str().expect("web has an address");
    assert!(text.contains(&block("web", &format!("HostName {web_ip}"))), "{text}");
    let no_address = "# no network address (--no-network): reach it with `banger vm exec`";
    assert!(text.contains(&block("db", no_address)), "{text}");
    assert!(text.starts_with("# banger VMs"), "{text}");
    let json = env.banger(&["ssh-config", "--json"]).ok().json();
    assert_json_snapshot!("ssh_config", json, { ".identity_file" => "[path]", ".known_hosts_file" => "[path]" });
    let again = env.banger(&["ssh-config"]).ok().stdout;
    assert_eq!(again, text, "the key is made once");

    env.banger(&["vm", "delete", "db"]).ok();
    let known = std::fs::read_to_string(ssh.join("known_hosts")).expect("known_hosts");
    assert_eq!(known, format!("web.vm {}\n", host_key(&web)), "a deleted vm leaves known_hosts");
}

#[test]
fn vm_ssh_without_an_address_says_to_use_exec() {
    let env = Env::new();
    env.banger(&["vm", "create", "web", "--no-network"]).ok();
    env.banger(&["vm", "ssh", "web"]).fails(1, "vm 'web' has no network address; use `banger vm exec web`");
    env.banger(&["vm", "ssh", "web", "--", "uname", "-a"]).fails(1, "has no network address");
    env.banger(&["vm", "ssh", "nope"]).fails(1, "no vm 'nope'");
    let (code, body) = env.request("GET", "/v1/vms/web/ssh", "");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("\"code\":\"conflict\""), "{body}");
}

#[test]
fn git_identities_and_start_bodies_are_checked_before_anything_runs() {
    let env = Env::new();
    env.banger(&["vm", "create", "web"]).ok();
    let ops = || env.banger(&["op", "list", "--json"]).ok().json()["operations"].as_array().map_or(0, Vec::len);
    let before = ops();
    for body in [
        r#"{"git_identity":{"name":"a\nb"}}"#,
        r#"{"git_identity":{"email":"x"},"extra":1}"#,
        r#"{"git_identity":{"nick":"x"}}"#,
        "not json",
    ] {
        let (code, answer) = env.request("POST", "/v1/vms/web/start", body);
        assert_eq!(code, 400, "{body}: {answer}");
        assert!(answer.contains("invalid"), "{answer}");
    }
    let create = r#"{"name":"other","start":true,"git_identity":{"name":"x\u0000"}}"#;
    let (code, answer) = env.request("POST", "/v1/vms", create);
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("control character"), "{answer}");
    assert_eq!(ops(), before, "refused requests start no operation");
}
