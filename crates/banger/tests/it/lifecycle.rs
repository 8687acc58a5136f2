//! Auto-start, VM records from create to delete, operations, config, doctor and the JSON shapes.

use insta::assert_json_snapshot;

use crate::harness::{pid_alive, wait_until, Env};

#[test]
fn first_call_starts_the_daemon_and_says_where_its_log_is() {
    let env = Env::new();
    assert!(env.daemon_pid().is_none());
    env.banger(&["daemon", "status"]).fails_plain(1);
    let run = env.banger(&["vm", "list"]).ok();
    assert!(run.stderr.contains("started bangerd (pid"), "{}", run.stderr);
    assert!(run.stderr.contains(&env.state.join("bangerd.log").display().to_string()), "{}", run.stderr);
    assert_eq!(run.stdout.lines().next().map(|l| l.split_whitespace().next()), Some(Some("NAME")));
    let pid = env.daemon_pid().expect("daemon running");
    let again = env.banger(&["vm", "list"]).ok();
    assert!(!again.stderr.contains("started bangerd"), "second call reuses the daemon");
    let status = env.banger(&["daemon", "status", "--json"]).ok().json();
    assert_eq!(status["running"], true);
    assert_eq!(status["pid"], pid);
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&env.socket).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");
    env.banger(&["daemon", "stop"]).ok();
    assert!(!pid_alive(pid));
    assert!(!env.socket.exists(), "socket removed on clean shutdown");
}

#[test]
fn create_list_show_set_delete() {
    let env = Env::new();
    let created =
        env.banger(&["vm", "create", "web", "--cpus", "2", "--memory", "1G", "--disk", "4G", "--json"]).ok().json();
    assert_eq!(created["name"], "web");
    assert_eq!(created["state"], "created");
    assert_eq!(created["vcpus"], 2);
    assert_eq!(created["memory_mib"], 1024);
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(id.len(), 16);
    assert!(std::path::Path::new(created["vm_dir"].as_str().expect("dir")).is_dir());

    env.banger(&["vm", "create", "db"]).ok();
    let list = env.banger(&["vm", "list", "--json"]).ok().json();
    let names: Vec<&str> = list["vms"].as_array().expect("vms").iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, ["web", "db"]);
    let table = env.banger(&["vm", "ls"]).ok().stdout;
    assert!(table.contains("web") && table.contains("db") && table.contains("STATE"), "{table}");

    let by_prefix = env.banger(&["vm", "show", &id[..6], "--json"]).ok().json();
    assert_eq!(by_prefix["name"], "web");
    let human = env.banger(&["vm", "show", "web"]).ok().stdout;
    assert!(human.contains("memory:") && human.contains("1G"), "{human}");

    let set = env.banger(&["vm", "set", "web", "--cpus", "4", "--disk", "8G", "--json"]).ok().json();
    assert_eq!(set["vcpus"], 4);
    assert_eq!(set["disk_mib"], 8192);
    env.banger(&["vm", "set", "web", "--disk", "1G"]).fails(1, "can only grow");

    let deleted = env.banger(&["vm", "delete", "--force", "web", "db"]).ok();
    assert_eq!(deleted.stdout.lines().collect::<Vec<_>>(), ["web", "db"], "--force on stopped vms only deletes");
    assert!(!std::path::Path::new(created["vm_dir"].as_str().expect("dir")).exists());
    let list = env.banger(&["vm", "list", "--json"]).ok().json();
    assert_eq!(list["vms"].as_array().map(Vec::len), Some(0));
}

#[test]
fn operations_are_listed_shown_and_refuse_late_cancels() {
    let env = Env::new();
    env.banger(&["vm", "create", "web"]).ok();
    let ops = env.banger(&["op", "list", "--json"]).ok().json();
    let op = &ops["operations"][0];
    assert_eq!(op["kind"], "vm.create");
    assert_eq!(op["target"], "web");
    assert_eq!(op["state"], "succeeded");
    let stages: Vec<&str> =
        op["stages"].as_array().expect("stages").iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(stages, ["validate", "reserve", "prepare"]);
    let id = op["id"].as_str().expect("id");
    let shown = env.banger(&["op", "show", &id[..8]]).ok().stdout;
    assert!(shown.contains("STAGE") && shown.contains("reserve"), "{shown}");
    env.banger(&["op", "cancel", id]).fails(1, "already succeeded");
    env.banger(&["op", "show", "ffffffffffffffff"]).fails(1, "banger op list");
}

#[test]
fn json_shapes() {
    let env = Env::new();
    let vm = env.banger(&["vm", "create", "shape", "--json"]).ok().json();
    // The VM's directory holds a temp path and its id: replace it wherever it appears.
    let dir = vm["vm_dir"].as_str().expect("vm_dir").to_owned();
    let redact_vm = |v: &serde_json::Value| -> serde_json::Value {
        let text = serde_json::to_string(v).expect("json").replace(&dir, "[vm_dir]");
        serde_json::from_str(&text).expect("still json")
    };
    assert_json_snapshot!("vm_show", redact_vm(&vm), { ".id" => "[id]", ".created_at" => "[time]", ".updated_at" => "[time]" });
    let list = env.banger(&["vm", "list", "--json"]).ok().json();
    assert_json_snapshot!("vm_list", redact_vm(&list), {
        ".vms[].id" => "[id]", ".vms[].created_at" => "[time]", ".vms[].updated_at" => "[time]"
    });
    let ops = env.banger(&["op", "list", "--json"]).ok().json();
    assert_json_snapshot!("op_list", ops, {
        ".operations[].id" => "[id]", ".operations[].result_id" => "[id]", ".operations[].created_at" => "[time]",
        ".operations[].finished_at" => "[time]", ".operations[].elapsed_ms" => "[ms]",
        ".operations[].stages[].started_at" => "[time]", ".operations[].stages[].elapsed_ms" => "[ms]"
    });
    let config = env.banger(&["config", "show", "--json"]).ok().json();
    assert_json_snapshot!("config_show", config);
    let status = env.banger(&["daemon", "status", "--json"]).ok().json();
    assert_json_snapshot!("daemon_status", status, {
        ".pid" => "[pid]", ".state_dir" => "[path]", ".socket" => "[path]", ".log_file" => "[path]",
        ".started_at" => "[time]", ".uptime_secs" => "[secs]", ".rss_kib" => "[kib]", ".version" => "[version]"
    });
}

#[test]
fn config_file_sets_defaults_and_bad_config_is_refused() {
    let env = Env::new();
    std::fs::create_dir_all(&env.state).expect("mkdir");
    std::fs::write(env.state.join("config.toml"), "default_vcpus = 3\ndefault_memory_mib = 768\n").expect("write");
    let vm = env.banger(&["vm", "create", "cfg", "--json"]).ok().json();
    assert_eq!((vm["vcpus"].as_u64(), vm["memory_mib"].as_u64()), (Some(3), Some(768)));
    let shown = env.banger(&["config", "show"]).ok().stdout;
    assert!(shown.contains("default_vcpus = 3") && shown.contains("config.toml"), "{shown}");
    env.banger(&["daemon", "stop"]).ok();
    std::fs::write(env.state.join("config.toml"), "default_cpus = 3\n").expect("write");
    env.banger(&["vm", "list"]).fails(1, "unknown field `default_cpus`");
    // doctor too: its checks run in the daemon, which refuses the file rather than defaulting.
    env.banger(&["doctor"]).fails(1, "unknown field `default_cpus`");
    assert!(env.daemon_pid().is_none());
}

#[test]
fn openapi_document_is_served() {
    let env = Env::new();
    env.banger(&["daemon", "start"]).ok();
    let (code, body) = env.request("GET", "/v1/openapi.json", "");
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    for path in ["/v1/vms", "/v1/vms/{vm}", "/v1/operations/{op}/cancel", "/v1/health"] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    assert!(doc["components"]["schemas"]["CreateVmRequest"].is_object());
}

#[test]
fn doctor_reports_on_this_host() {
    let env = Env::new();
    let run = env.banger(&["doctor", "--json"]);
    assert!(run.code == 0 || run.code == 1, "{}", run.stderr);
    let doc = run.json();
    let checks = doc["checks"].as_array().expect("checks");
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    for n in ["kvm", "qemu", "firecracker", "vmm", "mkfs.ext4", "mmdebstrap", "nft", "disk space", "socket"] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    // The selection's own explanation of what `auto` picks.
    let vmm = checks.iter().find(|c| c["name"] == "vmm").expect("vmm");
    let detail = vmm["detail"].as_str().unwrap_or_default();
    assert!(detail.starts_with("auto picks "), "{detail}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(detail.starts_with("auto picks qemu (tcg): ") && detail.contains("kvm_pvm"), "{detail}");
    }
    let kvm = checks.iter().find(|c| c["name"] == "kvm").expect("kvm");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(kvm["status"], "warn");
        let detail = kvm["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("KVM only runs PVM guests here") && detail.contains("QEMU TCG will be used"),
            "{detail}"
        );
    }
    assert!(env.daemon_pid().is_some(), "doctor's checks run in the daemon, started on demand");
    let human = env.banger(&["doctor"]).stdout;
    assert!(human.lines().all(|l| ["ok ", "warn", "fail"].iter().any(|p| l.starts_with(p))), "{human}");
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let env = Env::new();
    env.banger(&["daemon", "start"]).ok();
    let pid = env.daemon_pid().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    wait_until("daemon exit", std::time::Duration::from_secs(10), || !pid_alive(pid));
    assert!(!env.socket.exists());
    let log = std::fs::read_to_string(env.state.join("bangerd.log")).expect("log");
    assert!(log.contains("SIGTERM") && log.contains("bangerd stopped"), "{log}");
}

#[test]
fn registering_one_name_twice_at_once_has_one_winner() {
    let env = Env::new();
    let file = env.dir.path().join("disk.ext4");
    let made =
        std::process::Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&file).arg("16M").status().expect("mkfs.ext4");
    assert!(made.success());
    env.banger(&["daemon", "start"]).ok();
    let file = file.display().to_string();
    let runs: Vec<_> = std::thread::scope(|s| {
        let a = s.spawn(|| env.banger(&["image", "register", &file, "--name", "twin"]));
        let b = s.spawn(|| env.banger(&["image", "register", &file, "--name", "twin"]));
        [a.join(), b.join()].into_iter().map(|r| r.expect("thread")).collect()
    });
    let wins = runs.iter().filter(|r| r.code == 0).count();
    assert_eq!(wins, 1, "{:?}", runs.iter().map(|r| &r.stderr).collect::<Vec<_>>());
    let loser = runs.iter().find(|r| r.code != 0).expect("a loser");
    assert!(loser.stderr.contains("already exists"), "{}", loser.stderr);
    let shown = env.banger(&["image", "show", "twin", "--json"]).ok().json();
    assert!(shown["source"].as_str().is_some_and(|s| s.starts_with("file:")), "{shown}");
    let images = env.banger(&["image", "list", "--json"]).ok().json();
    assert_eq!(images["images"].as_array().map(Vec::len), Some(1));
    let leftovers: Vec<_> =
        std::fs::read_dir(env.state.join("images")).expect("images").flatten().map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 1, "no staging dirs left: {leftovers:?}");
    env.banger(&["image", "register", "/etc/hostname", "--name", "bad"]).fails(1, "not an ext4 filesystem image");
}
