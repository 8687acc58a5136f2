//! The driver's calls and error paths, against the contract server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use banger_vmm::firecracker::jailer::{FakeJailFs, JailCall, JailerOptions};
use banger_vmm::firecracker::{FirecrackerOptions, SnapshotFiles};
use banger_vmm::{AgentEndpoint, DiskSpec, FirecrackerDriver, LaunchError, LaunchSpec, NetSpec, Vmm};

use crate::server::{ContractServer, FakeBinary, Script, FAULT_LINE};

/// A VM directory with the files a boot needs, a contract server and a fake binary.
struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    spec: LaunchSpec,
    server: ContractServer,
    binary: FakeBinary,
}

impl Setup {
    fn new(script: Script) -> Self {
        Self::with_failing_binary(script, None)
    }

    fn with_failing_binary(script: Script, fail: Option<&str>) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        let vm_dir = dir.join("vms/0123abcd");
        std::fs::create_dir_all(&vm_dir).expect("vm dir");
        for file in ["vmlinux", "vmlinuz", "initrd.img", "base.ext4"] {
            std::fs::write(dir.join(file), file).expect("input file");
        }
        for file in ["overlay.ext4", "work.ext4"] {
            std::fs::write(vm_dir.join(file), file).expect("disk");
        }
        let mut spec = LaunchSpec::new("0123abcd", "web", &vm_dir, dir.join("vmlinuz"), dir.join("initrd.img"));
        spec.kernel_elf = Some(dir.join("vmlinux"));
        spec.vcpus = 2;
        spec.memory_mib = 256;
        spec.disks = vec![
            DiskSpec::read_only(dir.join("base.ext4")),
            DiskSpec::writable(vm_dir.join("overlay.ext4")),
            DiskSpec::writable(vm_dir.join("work.ext4")),
        ];
        spec.kernel_args = vec!["banger.root=/dev/vda".into(), "banger.hostname=web".into()];
        // `lo` exists on every host: the driver checks the TAP is there before using it.
        spec.net = Some(NetSpec { tap: "lo".into(), mac: "02:aa:bb:cc:dd:ee".into() });
        spec.balloon = true;
        let socket = dir.join("contract.sock");
        let binary = FakeBinary::write(&dir, "firecracker", &socket, &vm_dir, fail);
        let server = ContractServer::start(socket, script, binary.pidfile.clone());
        Self { _tmp: tmp, dir, spec, server, binary }
    }

    fn driver(&self) -> FirecrackerDriver {
        FirecrackerDriver::default().with_binary(&self.binary.path).with_ready_timeout(Duration::from_secs(10))
    }

    fn assert_no_violations(&self) {
        assert_eq!(self.server.violations(), Vec::<String>::new(), "requests that break the spec");
    }

    /// Asserts the fake VMM is gone (killed or exited, and reaped).
    async fn assert_vmm_gone(&self, driver: &FirecrackerDriver) {
        let Some(pid) = self.binary.pid() else { return };
        assert!(
            driver.wait_exit(pid, &self.spec.vm_dir, Duration::from_secs(5)).await,
            "the vmm {pid} was left running"
        );
    }
}

const BOOT_CALLS: &[&str] = &[
    "PUT /logger",
    "PUT /metrics",
    "PUT /serial",
    "PUT /machine-config",
    "PUT /boot-source",
    "PUT /drives/drive0",
    "PUT /drives/drive1",
    "PUT /drives/drive2",
    "PUT /network-interfaces/eth0",
    "PUT /vsock",
    "PUT /balloon",
];

/// Every call of a VM's life, each checked against the spec: launch, metrics, pause, resume,
/// snapshot, Ctrl-Alt-Del, and a restore into a fresh process.
#[tokio::test]
async fn every_call_fits_the_spec() {
    let setup = Setup::new(Script::default());
    let driver = setup.driver();
    let launched = driver.launch(&setup.spec).await.expect("launch");
    let mut expected: Vec<&str> = BOOT_CALLS.to_vec();
    expected.push("PUT /actions");
    assert_eq!(setup.server.calls(), expected);
    setup.assert_no_violations();

    let spec = &setup.spec;
    let vm_dir = &spec.vm_dir;
    assert_eq!(launched.pid, setup.binary.pid().expect("pid"));
    assert_eq!(launched.control_socket, spec.control_socket);
    assert!(driver.is_alive(launched.pid, vm_dir), "the command line names the vm dir");
    assert_eq!(std::fs::read_to_string(&spec.pidfile).expect("pidfile").trim(), launched.pid.to_string());
    assert_eq!(
        setup.binary.recorded_args(),
        ["--api-sock", &spec.control_socket.display().to_string(), "--id", "0123abcd"]
    );

    let text = |p: &Path| p.display().to_string();
    let server = &setup.server;
    assert_eq!(server.body("/machine-config"), serde_json::json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false}));
    assert_eq!(
        server.body("/balloon"),
        serde_json::json!({"amount_mib": 0, "deflate_on_oom": true, "free_page_reporting": true})
    );
    let boot = server.body("/boot-source");
    assert_eq!(boot["kernel_image_path"], text(&setup.dir.join("vmlinux")), "the ELF kernel, not the bzImage");
    assert_eq!(boot["initrd_path"], text(&setup.dir.join("initrd.img")));
    let args = boot["boot_args"].as_str().unwrap_or_default();
    assert!(
        args.starts_with("console=ttyS0 reboot=k panic=1")
            && args.ends_with("banger.root=/dev/vda banger.hostname=web")
    );
    assert!(args.contains("banger.poweroff=reboot"), "{args}");
    assert_eq!(
        server.body("/drives/drive0"),
        serde_json::json!({"drive_id": "drive0", "path_on_host": text(&setup.dir.join("base.ext4")),
            "is_root_device": false, "is_read_only": true, "cache_type": "Writeback"})
    );
    assert_eq!(server.body("/drives/drive1")["is_read_only"], false);
    // The VM's own disks are named relative to the VM dir (Firecracker's working directory),
    // so a snapshot of this VM restores onto another VM dir's copies.
    assert_eq!(server.body("/drives/drive1")["path_on_host"], "overlay.ext4");
    assert_eq!(server.body("/drives/drive2")["path_on_host"], "work.ext4");
    assert_eq!(
        server.body("/network-interfaces/eth0"),
        serde_json::json!({"iface_id": "eth0", "host_dev_name": "lo", "guest_mac": "02:aa:bb:cc:dd:ee"})
    );
    assert_eq!(server.body("/vsock"), serde_json::json!({"guest_cid": 3, "uds_path": text(&spec.agent_socket)}));
    assert_eq!(server.body("/serial"), serde_json::json!({"serial_out_path": text(&spec.console_log)}));
    assert_eq!(server.body("/logger")["log_path"], text(&vm_dir.join("firecracker.log")));
    assert_eq!(server.body("/metrics")["metrics_path"], text(&vm_dir.join("firecracker.metrics")));
    assert_eq!(server.body("/actions"), serde_json::json!({"action_type": "InstanceStart"}));
    assert_eq!(
        driver.agent_endpoint(vm_dir),
        AgentEndpoint::HybridVsock { path: spec.agent_socket.clone(), port: 1024 }
    );

    // `vm stats`: FlushMetrics, then the totals of the metrics file.
    let metrics = driver.metrics(vm_dir, &launched.control_socket).await.expect("metrics");
    assert_eq!(metrics["block_read_bytes"], 4096);
    assert_eq!(metrics["net_tx_bytes"], 50);
    assert_eq!(metrics["vsock_tx_bytes"], 20);
    assert_eq!(metrics["flushes"], 1);
    assert_eq!(server.body("/actions"), serde_json::json!({"action_type": "FlushMetrics"}));

    driver.pause(&launched.control_socket).await.expect("pause");
    assert_eq!(server.body("/vm"), serde_json::json!({"state": "Paused"}));
    driver.resume(&launched.control_socket).await.expect("resume");
    assert_eq!(server.body("/vm"), serde_json::json!({"state": "Resumed"}));
    let snapshot_dir = setup.dir.join("snap");
    let files = driver.snapshot_to_dir(&launched.control_socket, &snapshot_dir).await.expect("snapshot");
    assert_eq!(files, SnapshotFiles::in_dir(&snapshot_dir));
    assert_eq!(
        server.body("/snapshot/create"),
        serde_json::json!({"snapshot_type": "Full", "snapshot_path": text(&files.state),
            "mem_file_path": text(&files.memory)})
    );

    // Graceful stop without the agent: Ctrl-Alt-Del.
    driver.quit(&launched.control_socket).await.expect("ctrl-alt-del");
    assert_eq!(server.body("/actions"), serde_json::json!({"action_type": "SendCtrlAltDel"}));
    assert!(driver.kill(launched.pid, vm_dir).expect("kill"));
    assert!(driver.wait_exit(launched.pid, vm_dir, Duration::from_secs(5)).await);

    // Restore: a fresh process, logger and metrics, then the snapshot load.
    assert!(files.state.is_file() && files.memory.is_file(), "firecracker wrote both files");
    let before = server.seen().len();
    let restored = driver.restore_from(spec, &files, true).await.expect("restore");
    let calls: Vec<String> = server.seen()[before..].iter().filter(|s| s.call() != "GET /").map(|s| s.call()).collect();
    assert_eq!(calls, ["PUT /logger", "PUT /metrics", "PUT /snapshot/load"]);
    assert_eq!(
        server.body("/snapshot/load"),
        serde_json::json!({
            "snapshot_path": text(&files.state),
            "mem_backend": {"backend_type": "File", "backend_path": text(&files.memory)},
            "resume_vm": true,
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": "lo"}],
            "vsock_override": {"uds_path": text(&spec.agent_socket)}
        })
    );
    setup.assert_no_violations();
    assert!(driver.kill(restored.pid, vm_dir).expect("kill"));
    assert!(driver.wait_exit(restored.pid, vm_dir, Duration::from_secs(5)).await);
}

/// A 400 at InstanceStart (here: the bzImage-for-vmlinux mistake) is a banger error quoting
/// Firecracker's fault message; the VMM is killed.
#[tokio::test]
async fn a_refused_start_quotes_the_fault() {
    let fault = "Cannot load kernel due to invalid memory configuration or invalid kernel image: Kernel Loader: \
                 failed to load ELF kernel image: Invalid Elf magic number";
    let setup =
        Setup::new(Script { refuse: Some(("PUT /actions:InstanceStart".into(), fault.into())), ..Script::default() });
    let driver = setup.driver();
    let error = driver.launch(&setup.spec).await.expect_err("refused");
    let message = error.to_string();
    assert!(
        message.starts_with(&format!(
            "firecracker refused to start the vm: {fault}; check that the kernel is an ELF vmlinux"
        )),
        "{message}"
    );
    setup.assert_no_violations();
    setup.assert_vmm_gone(&driver).await;
}

/// A 400 at any configuration call ends the launch there, naming the call and the fault.
#[tokio::test]
async fn a_refusal_at_any_call_names_it() {
    for (index, call) in BOOT_CALLS.iter().enumerate() {
        let fault = format!("bad input for {call}");
        let setup = Setup::new(Script { refuse: Some(((*call).to_owned(), fault.clone())), ..Script::default() });
        let driver = setup.driver();
        let error = driver.launch(&setup.spec).await.expect_err("refused");
        let message = error.to_string();
        assert!(message.starts_with(&format!("firecracker refused {call}: {fault}; its log ends with:")), "{message}");
        assert_eq!(setup.server.calls(), BOOT_CALLS[..=index].to_vec(), "nothing is sent after a refusal");
        setup.assert_no_violations();
        setup.assert_vmm_gone(&driver).await;
    }
}

/// A Firecracker that exits before its API answers: its exit status and stderr.
#[tokio::test]
async fn an_early_exit_quotes_stderr() {
    let setup = Setup::with_failing_binary(Script::default(), Some("Error: could not open /dev/kvm"));
    let driver = setup.driver();
    match driver.launch(&setup.spec).await.expect_err("exited") {
        LaunchError::Exited { status, stderr } => {
            assert_eq!(status, "exit status 1");
            assert_eq!(stderr, "Error: could not open /dev/kvm");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(setup.server.seen().is_empty());
}

/// A Firecracker that dies in the middle of the configuration: reported as an exit, not as a
/// socket error.
#[tokio::test]
async fn dying_mid_configuration_is_an_exit() {
    let setup = Setup::new(Script { die_on: Some("PUT /drives/drive1".into()), ..Script::default() });
    let driver = setup.driver();
    let error = driver.launch(&setup.spec).await.expect_err("died");
    assert!(matches!(error, LaunchError::Exited { ref status, .. } if status == "killed by SIGKILL"), "{error:?}");
    setup.assert_vmm_gone(&driver).await;
}

/// A guest fault in the log at start (Firecracker's exit status is not to be trusted): a clear
/// error that says to use QEMU.
#[tokio::test]
async fn a_guest_fault_at_start_is_found_in_the_log() {
    let setup = Setup::new(Script { fault_on_start: true, ..Script::default() });
    let driver = setup.driver();
    let message = driver.launch(&setup.spec).await.expect_err("fault").to_string();
    assert!(
        message.starts_with("the guest faulted (Failure during vcpu run: Received KVM_EXIT_INTERNAL_ERROR signal)"),
        "{message}"
    );
    assert!(message.contains("use --vmm qemu"), "{message}");
    setup.assert_vmm_gone(&driver).await;
}

/// A guest fault after a good start: the VMM is seen dead and the log says why.
#[tokio::test]
async fn a_later_guest_fault_is_the_exit_reason() {
    let setup = Setup::new(Script::default());
    let driver = setup.driver();
    let launched = driver.launch(&setup.spec).await.expect("launch");
    let vm_dir = &setup.spec.vm_dir;
    assert_eq!(driver.exit_reason(vm_dir), None);
    std::fs::write(vm_dir.join("firecracker.log"), format!("{FAULT_LINE}\nVmm is stopping.\n")).expect("log");
    assert!(driver.kill(launched.pid, vm_dir).expect("kill"));
    assert!(driver.wait_exit(launched.pid, vm_dir, Duration::from_secs(5)).await);
    let reason = driver.exit_reason(vm_dir).expect("a reason");
    assert!(reason.contains("KVM_EXIT_INTERNAL_ERROR") && reason.contains("use --vmm qemu"), "{reason}");
}

/// Stale API and vsock sockets (from a VMM that died) are removed before the start.
#[tokio::test]
async fn stale_sockets_are_removed() {
    let setup = Setup::new(Script::default());
    let spec = &setup.spec;
    let _stale_api = std::os::unix::net::UnixListener::bind(&spec.control_socket).expect("stale api socket");
    let _stale_vsock = std::os::unix::net::UnixListener::bind(&spec.agent_socket).expect("stale vsock socket");
    let driver = setup.driver();
    let launched = driver.launch(spec).await.expect("launch over stale sockets");
    assert!(!spec.agent_socket.exists(), "the stale vsock socket is gone (Firecracker makes its own)");
    assert!(driver.kill(launched.pid, &spec.vm_dir).expect("kill"));
    assert!(driver.wait_exit(launched.pid, &spec.vm_dir, Duration::from_secs(5)).await);
}

/// Jailer mode: the jailer's command line, the jail laid out (through the fake file system),
/// and Firecracker's paths inside it.
#[tokio::test]
async fn jailer_mode_runs_the_jailer_with_the_jail_paths() {
    let setup = Setup::new(Script::default());
    let jailer = FakeBinary::write(&setup.dir, "jailer", &setup.server.socket, &setup.spec.vm_dir, None);
    let chroot_base = setup.dir.join("jails");
    let options = FirecrackerOptions {
        binary: setup.binary.path.clone(),
        jailer: Some(JailerOptions {
            binary: jailer.path.clone(),
            uid: 900,
            gid: 901,
            chroot_base: chroot_base.clone(),
            cgroup_version: 2,
            cgroups: vec!["cpu.max=50000 100000".into()],
        }),
        ..FirecrackerOptions::default()
    };
    let fs = Arc::new(FakeJailFs::default());
    let driver = FirecrackerDriver::new(options).with_jail_fs(fs.clone());
    let spec = &setup.spec;
    let launched = driver.launch(spec).await.expect("jailed launch");
    setup.assert_no_violations();

    let fc = setup.binary.path.display().to_string();
    let api = spec.control_socket.display().to_string();
    assert_eq!(
        jailer.recorded_args(),
        [
            "--id",
            "0123abcd",
            "--exec-file",
            &fc,
            "--uid",
            "900",
            "--gid",
            "901",
            "--chroot-base-dir",
            &chroot_base.display().to_string(),
            "--cgroup-version",
            "2",
            "--cgroup",
            "cpu.max=50000 100000",
            "--",
            "--api-sock",
            &api,
            "--id",
            "0123abcd",
        ]
    );
    assert!(setup.binary.recorded_args().is_empty(), "firecracker itself is the jailer's to start");
    let jail = chroot_base.join("firecracker/0123abcd");
    let mirror = jail.join("root").join(spec.vm_dir.strip_prefix("/").expect("absolute"));
    let calls = fs.calls();
    assert!(calls.contains(&JailCall::HardLink(setup.dir.join("vmlinux"), mirror.join("vmlinux"))), "{calls:#?}");
    assert!(calls.contains(&JailCall::Chown(mirror.join("drive1"), 900, 901)), "{calls:#?}");
    assert!(!calls.contains(&JailCall::Chown(mirror.join("drive0"), 900, 901)), "the shared base is not chowned");
    assert!(calls.contains(&JailCall::Symlink(mirror.join("agent.sock"), spec.agent_socket.clone())), "{calls:#?}");
    assert!(calls.contains(&JailCall::Symlink(jail.clone(), spec.vm_dir.join("jail"))), "{calls:#?}");

    let in_jail = |name: &str| spec.vm_dir.join(name).display().to_string();
    let server = &setup.server;
    assert_eq!(server.body("/boot-source")["kernel_image_path"], in_jail("vmlinux"));
    assert_eq!(server.body("/boot-source")["initrd_path"], in_jail("initrd"));
    assert_eq!(server.body("/drives/drive2")["path_on_host"], in_jail("drive2"));
    assert_eq!(server.body("/logger")["log_path"], in_jail("firecracker.log"));
    assert_eq!(server.body("/vsock")["uds_path"], spec.agent_socket.display().to_string());

    let error = driver.snapshot_to_dir(&launched.control_socket, &setup.dir.join("snap")).await.expect_err("jailed");
    assert!(error.to_string().contains("firecracker_jailer = false"), "{error}");
    assert!(driver.kill(launched.pid, &spec.vm_dir).expect("kill"));
    assert!(driver.wait_exit(launched.pid, &spec.vm_dir, Duration::from_secs(5)).await);
}

/// The `Vmm` trait's snapshot calls, as the daemon makes them: pause, snapshot to a state file
/// (memory beside it), resume; then a restore into a fresh process that stays paused until
/// resumed. Firecracker's refusals (a snapshot of a running VM, a missing state file) are
/// clear errors.
#[tokio::test]
async fn snapshots_through_the_vmm_trait() {
    let setup = Setup::new(Script::default());
    let driver: Arc<dyn Vmm> = Arc::new(setup.driver());
    let spec = &setup.spec;
    let launched = driver.launch(spec).await.expect("launch");
    let control = &launched.control_socket;
    let state = setup.dir.join("snapshots/01/state.bin");
    std::fs::create_dir_all(state.parent().expect("parent")).expect("snapshot dir");

    let running = driver.snapshot(control, &state).await.expect_err("not paused");
    assert!(running.to_string().contains("not paused"), "{running}");
    driver.pause(control).await.expect("pause");
    driver.pause(control).await.expect("pausing a paused vm");
    driver.snapshot(control, &state).await.expect("snapshot");
    let memory = banger_vmm::snapshot_memory_file(&state);
    assert_eq!(memory, setup.dir.join("snapshots/01/state.mem"));
    assert_eq!(
        setup.server.body("/snapshot/create"),
        serde_json::json!({"snapshot_type": "Full", "snapshot_path": state.display().to_string(),
            "mem_file_path": memory.display().to_string()})
    );
    driver.resume(control).await.expect("resume");
    assert_eq!(setup.server.body("/vm"), serde_json::json!({"state": "Resumed"}));
    assert!(driver.kill(launched.pid, &spec.vm_dir).expect("kill"));
    assert!(driver.wait_exit(launched.pid, &spec.vm_dir, Duration::from_secs(5)).await);

    let restored = driver.restore(spec, &state).await.expect("restore");
    let load = setup.server.body("/snapshot/load");
    assert_eq!(load["resume_vm"], false, "left paused for the daemon to resume");
    assert_eq!(load["mem_backend"]["backend_path"], memory.display().to_string());
    driver.resume(&restored.control_socket).await.expect("resume the restored vm");
    setup.assert_no_violations();
    assert!(driver.kill(restored.pid, &spec.vm_dir).expect("kill"));
    assert!(driver.wait_exit(restored.pid, &spec.vm_dir, Duration::from_secs(5)).await);

    let missing = driver.restore(spec, &setup.dir.join("nowhere/state.bin")).await.expect_err("missing");
    assert!(missing.to_string().contains("nowhere/state.bin"), "{missing}");
}
