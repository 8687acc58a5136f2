//! Crash safety: every failpoint of create, start, stop, delete, snapshot, fork, pull and build
//! is made to fail, and to stop for good (a `kill -9`: the daemon's runtime is dropped with the
//! step half-done, the fake VMMs live on). A new daemon over the same state dir then sweeps,
//! reconciles and adopts, and the state must have converged: no complete record lost, no
//! orphan VMM, no directory without a row nor row without its directory, no scratch, and
//! every VM's state matching its VMM.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use banger_core::VmRecord;
use banger_image::kernel::pull::{KernelSource, PulledKernel};
use banger_image::rootfs::{BuiltImage, ImageManifest, ImageSource};
use banger_store::Table;

use super::{sweep_with, HostMounts, SweepReport};
use crate::daemon::Daemon;
use crate::failpoint::Action;
use crate::services::testing::{daemon_with, FakeProvision, FakeVmm};
use crate::services::vms::Origin;

/// No mounts and no loop devices.
struct NoMounts;

impl HostMounts for NoMounts {
    fn mount_points(&self) -> std::io::Result<Vec<PathBuf>> {
        Ok(Vec::new())
    }
    fn unmount(&self, _: &Path) -> Result<(), String> {
        Ok(())
    }
    fn loop_devices(&self) -> std::io::Result<Vec<(PathBuf, PathBuf)>> {
        Ok(Vec::new())
    }
    fn detach(&self, _: &Path) -> Result<(), String> {
        Ok(())
    }
}

type KernelMade = Result<PulledKernel, banger_image::kernel::pull::PullKernelError>;
type ImageMade = Result<BuiltImage, crate::services::artifacts::ArtifactsError>;
type Step = fn(Arc<Daemon>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// An operation, what it needs first, and its failpoints.
struct Scenario {
    setup: Step,
    run: Step,
    points: &'static [&'static str],
}

fn world() -> (tempfile::TempDir, Arc<FakeVmm>) {
    (tempfile::tempdir().expect("tempdir"), Arc::new(FakeVmm::default()))
}

fn daemon(dir: &Path, vmm: &Arc<FakeVmm>) -> Arc<Daemon> {
    daemon_with(dir, vmm.clone(), Arc::new(FakeProvision::default()), |c| {
        c.network = false;
        c.boot_timeout_secs = 5;
    })
}

async fn create(d: &Arc<Daemon>, name: &str, origin: Origin) -> Option<VmRecord> {
    let req = banger_proto::CreateVmRequest { name: name.into(), ..Default::default() };
    let spec = match &origin {
        Origin::Fork(s) => crate::services::snapshots::fork_spec(s, &req, false).expect("spec"),
        _ => banger_core::VmSpec {
            image: "img".into(),
            kernel: "k".into(),
            vcpus: 1,
            memory_mib: 256,
            disk_mib: 1024,
            vmm: banger_core::config::VmmKind::Qemu,
            network: false,
            allow_vm_traffic: false,
        },
    };
    let op = d.fleet.ops.begin("vm.create", name);
    d.vms.clone().run_create(op, name.into(), spec, None, (Vec::new(), Default::default()), origin, None).await.ok()
}

async fn start(d: &Arc<Daemon>, name: &str) {
    let id = d.fleet.store.find_vm(name).expect("vm").id;
    let op = d.fleet.ops.begin("vm.start", name);
    let _ = d.lifecycle.start_vm(&op, &id, None).await;
}

/// A kernel `make` that publishes a small directory the way the real pull does.
fn fake_kernel(name: &str) -> impl FnOnce(&Path, &mut dyn FnMut(&str)) -> KernelMade + Send + 'static {
    let name = name.to_owned();
    move |dir, _| {
        let staging = dir.join(format!(".staging-{name}"));
        std::fs::create_dir_all(&staging).expect("staging");
        std::fs::write(staging.join("vmlinuz"), b"kernel").expect("write");
        std::fs::rename(&staging, dir.join(&name)).expect("publish");
        let d = dir.join(&name);
        Ok(PulledKernel {
            name: name.clone(),
            package: None,
            version: Some("1".into()),
            release: "6.1.0-fake".into(),
            source: KernelSource::File { path: "/fake.deb".into() },
            vmlinuz: d.join("vmlinuz"),
            vmlinux: d.join("vmlinux"),
            config: None,
            modules_dir: d.join("modules"),
            modules: Vec::new(),
            builtin: Vec::new(),
            dir: d,
        })
    }
}

/// An image `make` that publishes a small directory the way the real build does.
fn fake_image(name: &str) -> impl FnOnce(&Path, &mut dyn FnMut(&str)) -> ImageMade + Send + 'static {
    let name = name.to_owned();
    move |dir, _| {
        let staging = dir.join(format!(".staging-{name}"));
        std::fs::create_dir_all(&staging).expect("staging");
        std::fs::write(staging.join("rootfs.ext4"), b"rootfs").expect("write");
        std::fs::rename(&staging, dir.join(&name)).expect("publish");
        let d = dir.join(&name);
        Ok(BuiltImage {
            path: d.join("rootfs.ext4"),
            manifest: ImageManifest {
                name: name.clone(),
                source: ImageSource::Catalog { entry: name.clone() },
                recipe: None,
                meta: Default::default(),
                init: banger_core::InitMode::Fast,
                file: "rootfs.ext4".into(),
                format: "ext4".into(),
                label: "rootfs".into(),
                sha256: "00".into(),
                size_bytes: 6,
                content_bytes: 6,
                created: banger_core::time::now_rfc3339(),
            },
            dir: d,
        })
    }
}

async fn make_kernel(d: &Arc<Daemon>, name: &str) {
    let op = d.fleet.ops.begin("kernel.pull", name);
    let _ = d.artifacts.make_kernel_with(&op.sink(), name, fake_kernel(name)).await;
}

async fn make_image(d: &Arc<Daemon>, name: &str) {
    let op = d.fleet.ops.begin("image.build", name);
    let _ = d.artifacts.publish_image_with(name, false, &op.sink(), fake_image(name)).await;
}

async fn snapshot(d: &Arc<Daemon>, vm: &str, name: &str) {
    let id = d.fleet.store.find_vm(vm).expect("vm").id;
    let _ = d.snapshots.take_snapshot(&id, name, None).await;
}

fn nothing(_: Arc<Daemon>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async {})
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            setup: nothing,
            run: |d| {
                Box::pin(async move {
                    create(&d, "a", Origin::Boot).await;
                })
            },
            points: &["vm.create.reserve", "vm.create.prepare", "vm.create.complete"],
        },
        Scenario {
            setup: |d| {
                Box::pin(async move {
                    create(&d, "a", Origin::Boot).await.expect("create");
                })
            },
            run: |d| Box::pin(async move { start(&d, "a").await }),
            points: &["vm.start.provision", "vm.start.launched", "vm.start.ready"],
        },
        Scenario {
            setup: |d| {
                Box::pin(async move {
                    create(&d, "a", Origin::Boot).await.expect("create");
                    start(&d, "a").await;
                })
            },
            run: |d| {
                Box::pin(async move {
                    let _ = d.lifecycle.stop_vm("a", false).await;
                })
            },
            points: &["vm.stop.stopping", "vm.stop.ended"],
        },
        Scenario {
            setup: |d| {
                Box::pin(async move {
                    create(&d, "a", Origin::Boot).await.expect("create");
                })
            },
            run: |d| {
                Box::pin(async move {
                    let _ = d.vms.delete_vm("a").await;
                })
            },
            points: &["vm.delete.marked", "vm.delete.files"],
        },
        Scenario {
            setup: |d| {
                Box::pin(async move {
                    create(&d, "a", Origin::Boot).await.expect("create");
                    start(&d, "a").await;
                })
            },
            run: |d| Box::pin(async move { snapshot(&d, "a", "s").await }),
            points: &["snapshot.intent", "snapshot.state", "snapshot.files"],
        },
        Scenario {
            setup: |d| {
                Box::pin(async move {
                    create(&d, "a", Origin::Boot).await.expect("create");
                    start(&d, "a").await;
                    snapshot(&d, "a", "s").await;
                })
            },
            run: |d| {
                Box::pin(async move {
                    let _ = d.snapshots.delete_snapshot("s").await;
                })
            },
            points: &["snapshot.delete.marked", "snapshot.delete.files"],
        },
        Scenario {
            setup: |d| {
                Box::pin(async move {
                    create(&d, "a", Origin::Boot).await.expect("create");
                    start(&d, "a").await;
                    snapshot(&d, "a", "s").await;
                })
            },
            run: |d| {
                Box::pin(async move {
                    let s = d.snapshots.find("s").expect("snapshot");
                    create(&d, "fork", Origin::Fork(Box::new(s))).await;
                })
            },
            points: &["vm.fork.copy", "vm.fork.copied", "vm.create.complete"],
        },
        Scenario {
            setup: nothing,
            run: |d| Box::pin(async move { make_kernel(&d, "k").await }),
            points: &["kernel.pull.intent", "kernel.pull.files"],
        },
        Scenario {
            setup: |d| Box::pin(async move { make_kernel(&d, "k").await }),
            run: |d| {
                Box::pin(async move {
                    let _ = d.artifacts.delete_kernel("k");
                })
            },
            points: &["kernel.delete.marked", "kernel.delete.files"],
        },
        Scenario {
            setup: nothing,
            run: |d| Box::pin(async move { make_image(&d, "img").await }),
            points: &["image.make.intent", "image.make.files"],
        },
        Scenario {
            setup: |d| Box::pin(async move { make_image(&d, "img").await }),
            run: |d| {
                Box::pin(async move {
                    let _ = d.artifacts.delete_image("img");
                })
            },
            points: &["image.delete.marked", "image.delete.files"],
        },
    ]
}

/// What was complete before the step: it must all still be there after recovery.
#[derive(Debug, Default)]
struct Records {
    vms: Vec<String>,
    snapshots: Vec<String>,
    kernels: Vec<String>,
    images: Vec<String>,
}

fn records(d: &Daemon) -> Records {
    let store = &d.fleet.store;
    Records {
        vms: store.list_vms().expect("vms").into_iter().map(|v| v.id).collect(),
        snapshots: store.list_snapshots().expect("snapshots").into_iter().map(|s| s.id).collect(),
        kernels: store.list_kernels().expect("kernels").into_iter().map(|k| k.name).collect(),
        images: store.list_images().expect("images").into_iter().map(|i| i.name).collect(),
    }
}

/// Whether `before` was the target of the step that was interrupted (a delete may finish).
fn kept(before: &[String], now: &[String], deleted: &[&str]) -> bool {
    before.iter().filter(|b| !deleted.contains(&b.as_str())).all(|b| now.contains(b))
}

fn assert_converged(d: &Daemon, vmm: &FakeVmm, before: &Records, deleting: &[&str], why: &str) {
    let store = &d.fleet.store;
    let now = records(d);
    let deleted_vms: Vec<&str> =
        if deleting.contains(&"a") { before.vms.iter().map(String::as_str).collect() } else { Vec::new() };
    assert!(kept(&before.vms, &now.vms, &deleted_vms), "{why}: a vm record was lost");
    let deleted_snapshots: Vec<&str> =
        if deleting.contains(&"s") { before.snapshots.iter().map(String::as_str).collect() } else { Vec::new() };
    assert!(kept(&before.snapshots, &now.snapshots, &deleted_snapshots), "{why}: a snapshot record was lost");
    assert!(kept(&before.kernels, &now.kernels, deleting), "{why}: a kernel record was lost");
    assert!(kept(&before.images, &now.images, deleting), "{why}: an image record was lost");
    for table in [Table::Vms, Table::Snapshots, Table::Kernels, Table::Images] {
        let pending: Vec<_> = store.rows_of(table).expect("rows").into_iter().filter(|r| r.pending.is_some()).collect();
        assert!(pending.is_empty(), "{why}: unfinished rows remain: {pending:?}");
    }
    // VMMs and records agree.
    let vms = store.list_vms().expect("vms");
    let mut expected = HashSet::new();
    for vm in &vms {
        let alive = d.fleet.alive(vm);
        assert_eq!(
            alive,
            vm.state.is_active(),
            "{why}: vm {} is {} but its vmm alive={alive}",
            vm.name,
            vm.state.as_str()
        );
        if let Some(pid) = d.fleet.handles.get(vm).and_then(|h| h.pid).filter(|_| alive) {
            expected.insert(pid);
        }
    }
    assert_eq!(vmm.live(), expected, "{why}: orphan vmm");
    // Files and rows agree.
    let state = &d.fleet.layout.state_dir;
    let vm_dirs: HashSet<PathBuf> = vms.iter().map(|v| PathBuf::from(&v.vm_dir)).collect();
    assert_eq!(dirs(&d.fleet.layout.vms_dir()), vm_dirs, "{why}: vm dirs and rows");
    let snapshots = store.list_snapshots().expect("snapshots");
    let snapshot_dirs: HashSet<PathBuf> = snapshots.iter().map(|s| PathBuf::from(&s.dir)).collect();
    assert_eq!(dirs(&state.join("snapshots")), snapshot_dirs, "{why}: snapshot dirs and rows");
    for s in &snapshots {
        assert!(Path::new(&s.paths().state).is_file(), "{why}: snapshot {} has no state", s.name);
    }
    let kernels: HashSet<PathBuf> =
        store.list_kernels().expect("k").into_iter().map(|k| state.join("kernels").join(k.name)).collect();
    assert_eq!(dirs(&state.join("kernels")), kernels, "{why}: kernel dirs and rows");
    let images: HashSet<PathBuf> =
        store.list_images().expect("i").into_iter().map(|i| state.join("images").join(i.name)).collect();
    assert_eq!(dirs(&state.join("images")), images, "{why}: image dirs and rows");
    for dir in [state.join("kernels"), state.join("images"), state.join("snapshots"), d.fleet.layout.vms_dir()] {
        let scratch: Vec<_> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(scratch.is_empty(), "{why}: scratch left in {}: {scratch:?}", dir.display());
    }
    // A fork whose copy did not finish does not survive as an ordinary VM.
    if let Ok(fork) = store.find_vm("fork") {
        assert!(Path::new(&fork.paths().work_disk).is_file(), "{why}: a fork without its disks");
    }
}

/// The directories directly in `dir`.
fn dirs(dir: &Path) -> HashSet<PathBuf> {
    std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// A new daemon over the same state dir and VMMs: sweep, reconcile, adopt.
fn recover(dir: &Path, vmm: &Arc<FakeVmm>, rt: &tokio::runtime::Runtime) -> (Arc<Daemon>, SweepReport) {
    let d = daemon(dir, vmm);
    let report = sweep_with(&d.fleet, &NoMounts).expect("sweep");
    let reconciled = d.lifecycle.reconcile().expect("reconcile");
    rt.block_on(d.lifecycle.adopt(reconciled.adopted));
    (d, report)
}

fn deleting_of(point: &str) -> &'static [&'static str] {
    match point.split('.').next() {
        Some("kernel") if point.contains("delete") => &["k"],
        Some("image") if point.contains("delete") => &["img"],
        Some("vm") if point.contains("delete") => &["a"],
        Some("snapshot") if point.contains("delete") => &["s"],
        _ => &[],
    }
}

fn check(scenario: &Scenario, point: &'static str, action: Action) {
    let (dir, vmm) = world();
    let why = format!("{point} {action:?}");
    let rt = runtime();
    let first = daemon(dir.path(), &vmm);
    rt.block_on((scenario.setup)(first.clone()));
    let before = records(&first);
    first.fleet.failpoints.arm(point, action);
    match action {
        Action::Fail => rt.block_on((scenario.run)(first.clone())),
        Action::Hang => {
            rt.spawn((scenario.run)(first.clone()));
            assert!(first.fleet.failpoints.wait_hit(point, Duration::from_secs(20)), "{why}: never reached");
        }
    }
    assert!(first.fleet.failpoints.was_hit(point), "{why}: never reached");
    // kill -9: every task of the first daemon stops where it is; its VMMs live on.
    rt.shutdown_background();
    drop(first);
    let rt = runtime();
    let (second, _report) = recover(dir.path(), &vmm, &rt);
    assert_converged(&second, &vmm, &before, deleting_of(point), &why);
    // And the recovered daemon can do the step again.
    rt.block_on((scenario.run)(second.clone()));
    rt.shutdown_background();
}

#[test]
fn every_failpoint_failing_converges() {
    for scenario in scenarios() {
        for &point in scenario.points {
            check(&scenario, point, Action::Fail);
        }
    }
}

#[test]
fn every_failpoint_killed_converges() {
    for scenario in scenarios() {
        for &point in scenario.points {
            check(&scenario, point, Action::Hang);
        }
    }
}

#[test]
fn a_legacy_snapshot_row_without_files_and_orphans_are_swept() {
    let (dir, vmm) = world();
    let rt = runtime();
    let d = daemon(dir.path(), &vmm);
    let snapshot = banger_core::SnapshotRecord {
        id: banger_core::new_id(),
        name: "warm-x".into(),
        source_vm_id: "v".into(),
        source_vm_name: "v".into(),
        image: "img".into(),
        kernel: "k".into(),
        vcpus: 1,
        memory_mib: 256,
        disk_mib: 1024,
        vmm: banger_core::config::VmmKind::Qemu,
        network: false,
        dir: String::new(),
        size_bytes: 0,
        warm_key: Some("x".into()),
        created_at: banger_core::time::now_rfc3339(),
    };
    let snapshot = banger_core::SnapshotRecord {
        dir: dir.path().join("snapshots").join(&snapshot.id).display().to_string(),
        ..snapshot
    };
    // An older daemon's order: the row, complete, before any file.
    d.fleet.store.insert_snapshot(&snapshot).expect("row");
    std::fs::create_dir_all(&snapshot.dir).expect("dir");
    for orphan in ["vms/0123456789abcdef", "images/lost", "kernels/lost", "images/.staging-x/rootfs", "vms/.read-1"] {
        std::fs::create_dir_all(dir.path().join(orphan)).expect("orphan");
    }
    let report = sweep_with(&d.fleet, &NoMounts).expect("sweep");
    assert_eq!(report.rolled_back, [format!("snapshot {}", snapshot.id)]);
    assert!(d.fleet.store.find_warm_snapshot("x").expect("find").is_none(), "never chosen again");
    assert_eq!(report.removed.len(), 5, "{report:?}");
    assert_converged(&d, &vmm, &Records::default(), &[], "legacy");
    assert!(sweep_with(&d.fleet, &NoMounts).expect("again").is_empty(), "a second sweep has nothing to do");
    rt.shutdown_background();
}

#[test]
fn left_over_mounts_are_undone_deepest_first_and_loops_detached() {
    use std::cell::RefCell;
    struct Recorded {
        state: PathBuf,
        calls: RefCell<Vec<String>>,
    }
    impl HostMounts for Recorded {
        fn mount_points(&self) -> std::io::Result<Vec<PathBuf>> {
            let m = self.state.join("images/.staging-abc");
            Ok(vec!["/".into(), m.join("base"), m.join("merged"), m.join("merged/deeper")])
        }
        fn unmount(&self, target: &Path) -> Result<(), String> {
            self.calls.borrow_mut().push(format!("umount {}", target.display()));
            Ok(())
        }
        fn loop_devices(&self) -> std::io::Result<Vec<(PathBuf, PathBuf)>> {
            Ok(vec![
                ("/dev/loop0".into(), self.state.join("images/minimal/rootfs.ext4")),
                ("/dev/loop1".into(), "/elsewhere.img".into()),
            ])
        }
        fn detach(&self, device: &Path) -> Result<(), String> {
            self.calls.borrow_mut().push(format!("detach {}", device.display()));
            Ok(())
        }
    }
    let (dir, vmm) = world();
    let d = daemon(dir.path(), &vmm);
    let mounts = Recorded { state: d.fleet.layout.state_dir.clone(), calls: RefCell::default() };
    let report = sweep_with(&d.fleet, &mounts).expect("sweep");
    let s = dir.path().join("images/.staging-abc");
    assert_eq!(
        mounts.calls.into_inner(),
        [
            format!("umount {}", s.join("merged/deeper").display()),
            format!("umount {}", s.join("base").display()),
            format!("umount {}", s.join("merged").display()),
            "detach /dev/loop0".to_owned(),
        ]
    );
    assert_eq!((report.unmounted.len(), report.detached.len()), (3, 1));
}

#[test]
fn mountinfo_escapes_are_read() {
    assert_eq!(super::unescape_mountinfo("/a\\040b/c"), PathBuf::from("/a b/c"));
    assert_eq!(super::unescape_mountinfo("/plain"), PathBuf::from("/plain"));
}
