//! The lifecycle driven directly, with a recording fake VMM (whose guests are fake agents on
//! the real agent socket) and recording fake provisioning: no HTTP, no QEMU, no guest.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use banger_core::{DesiredState, ObservedState, OpState, VmRecord};
use banger_vmm::Vmm as _;

use super::LifecycleError;
use crate::daemon::Daemon;
use crate::services::testing::{daemon_with, FakeProvision, FakeVmm, ProvisionCall, VmmCall};

struct Setup {
    d: Arc<Daemon>,
    vmm: Arc<FakeVmm>,
    provision: Arc<FakeProvision>,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let (vmm, provision) = (Arc::new(FakeVmm::default()), Arc::new(FakeProvision::default()));
    let d = daemon_with(dir.path(), vmm.clone(), provision.clone(), |c| {
        c.network = false;
        c.boot_timeout_secs = 2;
    });
    Setup { d, vmm, provision, _dir: dir }
}

/// A recorded, stopped VM named `name` (what `vm create` leaves).
fn recorded(s: &Setup, name: &str) -> VmRecord {
    let vm = VmRecord {
        id: banger_core::new_id(),
        name: name.into(),
        spec: banger_core::VmSpec {
            image: "minimal".into(),
            kernel: "k".into(),
            vcpus: 1,
            memory_mib: 256,
            disk_mib: 1024,
            vmm: banger_core::config::VmmKind::Qemu,
            network: false,
            allow_vm_traffic: false,
        },
        desired_state: DesiredState::Stopped,
        state: ObservedState::Created,
        guest_ip: None,
        vm_dir: String::new(),
        created_at: banger_core::time::now_rfc3339(),
        updated_at: banger_core::time::now_rfc3339(),
        last_error: None,
    };
    let vm = VmRecord { vm_dir: s.d.fleet.layout.vm_dir(&vm.id).display().to_string(), ..vm };
    std::fs::create_dir_all(&vm.vm_dir).expect("vm dir");
    s.d.fleet.store.insert_vm(&vm).expect("insert");
    vm
}

async fn start(s: &Setup, vm: &VmRecord) -> Result<VmRecord, LifecycleError> {
    let op = s.d.fleet.ops.begin("vm.start", &vm.name);
    let id = op.id().to_owned();
    let started = s.d.lifecycle.start_vm(&op, &vm.id, None).await;
    match &started {
        Ok(vm) => op.succeed(Some(vm.id.clone())),
        Err(e) => op.fail(e.to_string()),
    }
    let record = s.d.fleet.ops.get(&id).expect("op");
    let stages: Vec<&str> = record.stages.iter().map(|st| st.name.as_str()).collect();
    if started.is_ok() {
        assert_eq!(stages, ["provision", "boot", "agent"], "the stages of a cold start");
        assert_eq!(record.state, OpState::Succeeded);
    }
    started
}

#[tokio::test]
async fn a_start_provisions_launches_and_waits_for_the_agent() {
    let s = setup();
    let vm = recorded(&s, "web");
    let running = start(&s, &vm).await.expect("start");
    assert_eq!((running.state, running.desired_state), (ObservedState::Running, DesiredState::Running));
    assert_eq!(s.provision.calls(), [ProvisionCall { vm: "web".into(), restoring: false }]);
    assert_eq!(s.vmm.calls(), [VmmCall::Launch("web".into())]);
    assert!(s.d.fleet.alive(&running), "the fleet sees the vmm");
    let handles = s.d.fleet.handles.get(&running).expect("handles published");
    assert!(std::path::Path::new(&running.paths().handles).is_file(), "and mirrored to handles.json");
    assert_eq!(handles.marker, format!("{}/", vm.vm_dir));
    let again = start(&s, &vm).await.expect_err("already running");
    assert!(matches!(again, LifecycleError::AlreadyRunning(_)), "{again}");
}

#[tokio::test]
async fn a_stop_asks_the_guest_then_releases_everything() {
    let s = setup();
    let vm = recorded(&s, "web");
    start(&s, &vm).await.expect("start");
    let stopped = s.d.lifecycle.stop_vm("web", false).await.expect("stop");
    assert_eq!((stopped.state, stopped.desired_state), (ObservedState::Stopped, DesiredState::Stopped));
    assert_eq!(s.vmm.running(), 0, "the guest powered off");
    assert_eq!(s.vmm.calls(), [VmmCall::Launch("web".into())], "no quit or kill was needed");
    assert!(s.d.fleet.handles.get(&stopped).is_none(), "handles released");
    assert!(!std::path::Path::new(&stopped.paths().handles).exists(), "handles.json removed");
    assert!(!s.d.fleet.alive(&stopped));
    let twice = s.d.lifecycle.stop_vm("web", false).await.expect("stopping a stopped vm is a no-op");
    assert_eq!(twice.state, ObservedState::Stopped);
}

#[tokio::test]
async fn a_forced_stop_ends_the_vmm_without_asking_the_guest() {
    let s = setup();
    let vm = recorded(&s, "web");
    start(&s, &vm).await.expect("start");
    s.d.lifecycle.stop_vm("web", true).await.expect("stop");
    let calls = s.vmm.calls();
    assert!(matches!(calls.as_slice(), [VmmCall::Launch(_), VmmCall::Quit(_)]), "{calls:?}");
    assert_eq!(s.vmm.running(), 0);
}

#[tokio::test]
async fn a_guest_that_never_answers_fails_the_start_and_is_ended() {
    let s = setup();
    s.vmm.silent_guest.store(true, Ordering::SeqCst);
    let vm = recorded(&s, "mute");
    let e = start(&s, &vm).await.expect_err("not ready");
    assert!(matches!(e, LifecycleError::NotReady { .. }), "{e}");
    assert!(e.to_string().contains("did not become ready"), "{e}");
    assert_eq!(s.vmm.running(), 0, "what was launched is ended");
    let after = s.d.fleet.store.find_vm("mute").expect("vm");
    assert_eq!((after.state, after.desired_state), (ObservedState::Failed, DesiredState::Stopped));
    assert!(s.d.fleet.handles.get(&after).is_none(), "handles released");
    assert!(after.last_error.is_some_and(|m| m.contains("did not become ready")));
}

#[tokio::test]
async fn a_failed_launch_leaves_a_failed_vm_and_no_vmm() {
    let s = setup();
    s.vmm.fail_launch.store(true, Ordering::SeqCst);
    let vm = recorded(&s, "broken");
    let e = start(&s, &vm).await.expect_err("launch fails");
    assert!(matches!(e, LifecycleError::Launch(_)), "{e}");
    let after = s.d.fleet.store.find_vm("broken").expect("vm");
    assert_eq!(after.state, ObservedState::Failed);
    assert_eq!(s.vmm.running(), 0);
    // A failed VM starts again once the cause is gone.
    s.vmm.fail_launch.store(false, Ordering::SeqCst);
    assert_eq!(start(&s, &vm).await.expect("second start").state, ObservedState::Running);
}

#[tokio::test]
async fn a_vmm_that_exits_on_its_own_is_noticed_and_cleaned_up() {
    let s = setup();
    let vm = recorded(&s, "crashy");
    let running = start(&s, &vm).await.expect("start");
    let pid = s.d.fleet.handles.get(&running).and_then(|h| h.pid).expect("pid");
    assert!(s.vmm.kill(pid, std::path::Path::new(&vm.vm_dir)).expect("kill"));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let after = loop {
        let now = s.d.fleet.store.find_vm("crashy").expect("vm");
        if now.state != ObservedState::Running || tokio::time::Instant::now() > deadline {
            break now;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(after.state, ObservedState::Stopped, "the monitor published the exit");
    assert!(s.d.fleet.handles.get(&after).is_none());
    assert!(after.last_error.is_some_and(|m| m.contains("exited unexpectedly")));
}

#[tokio::test]
async fn a_stop_during_a_start_cancels_it_and_leaves_no_vmm() {
    let s = setup();
    // The guest never answers, so the start waits in its `agent` stage until the stop.
    s.vmm.silent_guest.store(true, Ordering::SeqCst);
    let vm = recorded(&s, "web");
    let op = s.d.fleet.ops.begin("vm.start", "web");
    let op_id = op.id().to_owned();
    let d = s.d.clone();
    let id = vm.id.clone();
    let start = tokio::spawn(async move {
        let r = d.lifecycle.start_vm(&op, &id, None).await;
        match &r {
            Err(LifecycleError::Cancelled) => op.cancelled(),
            Err(e) => op.fail(e.to_string()),
            Ok(_) => op.succeed(None),
        }
        r
    });
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.vmm.running() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the vmm never launched");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let stopped = s.d.lifecycle.stop_vm("web", false).await.expect("stop");
    assert_eq!((stopped.state, stopped.desired_state), (ObservedState::Stopped, DesiredState::Stopped));
    assert_eq!(stopped.last_error, None, "a stop is not a failure");
    assert_eq!(s.vmm.running(), 0, "what the start launched is ended before the stop answers");
    let started = start.await.expect("join");
    assert!(matches!(started, Err(LifecycleError::Cancelled)), "{started:?}");
    assert_eq!(s.d.fleet.ops.get(&op_id).expect("op").state, OpState::Cancelled);
    s.d.vms.delete_vm("web").await.expect("a stopped vm deletes");
}

#[tokio::test]
async fn a_stop_before_the_launch_keeps_the_vmm_from_starting() {
    let s = setup();
    let vm = recorded(&s, "web");
    let op = s.d.fleet.ops.begin("vm.start", "web");
    // Cancelled before the first stage, as a stop that came in at once would do.
    s.d.fleet.ops.cancel(op.id()).expect("cancel");
    let e = s.d.lifecycle.start_vm(&op, &vm.id, None).await.expect_err("cancelled");
    assert!(matches!(e, LifecycleError::Cancelled), "{e}");
    assert!(s.vmm.calls().is_empty(), "nothing was launched");
    assert_eq!(s.d.fleet.store.find_vm("web").expect("vm").state, ObservedState::Stopped);
}

#[tokio::test]
async fn an_orphan_vmm_named_only_by_its_pidfile_is_killed_at_reconcile() {
    let s = setup();
    let vm = recorded(&s, "orphaned");
    // A "VMM" whose command line names the VM dir, as QEMU's does, and which wrote its pidfile;
    // the daemon died before publishing handles.json.
    let marker = std::path::Path::new(&vm.vm_dir).join("disk.img");
    std::fs::write(&marker, b"").expect("marker");
    let mut child = std::process::Command::new("tail")
        .arg("-f")
        .arg(&marker)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let paths = banger_vmm::VmPaths::new(std::path::Path::new(&vm.vm_dir));
    std::fs::write(&paths.pidfile, format!("{pid}\n")).expect("pidfile");
    let report = s.d.lifecycle.reconcile().expect("reconcile");
    assert_eq!(report.orphans, ["orphaned"]);
    let status = child.wait().expect("reaped by the test");
    assert!(!status.success(), "killed: {status:?}");
    assert!(!paths.pidfile.exists(), "runtime files removed");
    // A pidfile naming nothing alive is only cleaned up.
    std::fs::write(&paths.pidfile, format!("{pid}\n")).expect("stale pidfile");
    assert!(s.d.lifecycle.reconcile().expect("reconcile").orphans.is_empty());
    assert!(!paths.pidfile.exists());
}
