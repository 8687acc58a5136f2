//! Tests of the workspace relay and its lock split, against a fake agent on the VM's socket.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use banger_core::VmRecord;
use banger_host::VmHandles;
use banger_proto::agent::{ack_payload, ExitStatus};
use tokio::io::DuplexStream;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use super::*;

/// What the fake agent saw.
#[derive(Default)]
struct Seen {
    /// Unpack channels open right now, and the most at once.
    open_unpacks: AtomicUsize,
    most_unpacks: AtomicUsize,
    /// Import bytes received.
    received: AtomicUsize,
    /// Whether a `Close` arrived.
    closed: AtomicBool,
    /// Whether a `Signal` arrived.
    signalled: AtomicBool,
}

/// A fake agent. `unpack`: acknowledges and answers `Unpacked` at the end, or with `stall`
/// never acknowledges (the import stops at one window). `exec`: a bundle script prints
/// "BUNDLE" twice; a directory named `/root/none` fails like a missing repository.
async fn fake_agent(listener: UnixListener, seen: Arc<Seen>, stall: bool) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        let seen = seen.clone();
        tokio::spawn(async move {
            let (mut rd, mut wr) = stream.into_split();
            let (out, mut outgoing) = mpsc::unbounded_channel::<Frame>();
            tokio::spawn(async move {
                while let Some(f) = outgoing.recv().await {
                    if wr.write_all(&f.encode()).await.is_err() {
                        return;
                    }
                }
            });
            let mut unpacking: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
            let mut d = Decoder::default();
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    return;
                }
                d.push(&buf[..n]);
                while let Ok(Some(f)) = d.next_frame() {
                    let ch = f.channel;
                    match (f.kind, f.parse::<AgentRequest>("request")) {
                        (FrameKind::Request, Ok(AgentRequest::Unpack { .. })) => {
                            let now = seen.open_unpacks.fetch_add(1, Ordering::SeqCst) + 1;
                            seen.most_unpacks.fetch_max(now, Ordering::SeqCst);
                            unpacking.insert(ch, 0);
                        }
                        // As the real agent powers off: the connection drops.
                        (FrameKind::Request, Ok(AgentRequest::Shutdown)) => return,
                        (FrameKind::Request, Ok(AgentRequest::Exec(e))) => {
                            let dir = e.argv.get(4).cloned().unwrap_or_default();
                            let _ = out.send(Frame::json(ch, FrameKind::Response, &AgentResponse::Started { pid: 7 }));
                            let code = if dir == "/root/none" {
                                let _ = out.send(Frame::new(
                                    ch,
                                    FrameKind::Stderr,
                                    b"no git repository at /root/none\n".to_vec(),
                                ));
                                3
                            } else {
                                assert!(e.argv[2].contains("git bundle create"), "a bundle script");
                                for _ in 0..2 {
                                    let _ = out.send(Frame::new(ch, FrameKind::Stdout, b"BUNDLE".to_vec()));
                                }
                                0
                            };
                            let _ = out.send(Frame::json(ch, FrameKind::Exit, &ExitStatus { code, signal: None }));
                        }
                        (FrameKind::Data, _) if unpacking.contains_key(&ch) => {
                            if f.payload.is_empty() {
                                let total = unpacking.remove(&ch).unwrap_or(0);
                                seen.open_unpacks.fetch_sub(1, Ordering::SeqCst);
                                let done = AgentResponse::Unpacked { entries: 1, bytes: total as u64 };
                                // Let a concurrent import show itself if the lock failed to stop it.
                                let out = out.clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    let _ = out.send(Frame::json(ch, FrameKind::Response, &done));
                                });
                                continue;
                            }
                            seen.received.fetch_add(f.payload.len(), Ordering::SeqCst);
                            if let Some(total) = unpacking.get_mut(&ch) {
                                *total += f.payload.len();
                            }
                            if !stall {
                                let _ = out.send(Frame::new(ch, FrameKind::Ack, ack_payload(f.payload.len())));
                            }
                        }
                        (FrameKind::Signal, _) => seen.signalled.store(true, Ordering::SeqCst),
                        (FrameKind::Close, _) => {
                            seen.closed.store(true, Ordering::SeqCst);
                            if unpacking.remove(&ch).is_some() {
                                seen.open_unpacks.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                        _ => {}
                    }
                }
            }
        });
    }
}

async fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Setup {
    d: Arc<Workspace>,
    vm: VmRecord,
    seen: Arc<Seen>,
    _dir: tempfile::TempDir,
}

/// A daemon with one running VM ("web", alive as this test process) served by the fake agent.
async fn setup(stall: bool) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let vmm = Arc::new(crate::services::testing::FakeVmm::default());
    let d = Arc::new(Workspace::new(crate::services::testing::fleet_with(dir.path(), vmm.clone())));
    let vm_dir = dir.path().join("vms/web");
    std::fs::create_dir_all(&vm_dir).expect("vm dir");
    let vm = VmRecord {
        id: "0123456789abcdef".into(),
        name: "web".into(),
        spec: banger_core::VmSpec {
            image: "i".into(),
            kernel: "k".into(),
            vcpus: 1,
            memory_mib: 256,
            disk_mib: 256,
            vmm: banger_core::config::VmmKind::Qemu,
            network: false,
            allow_vm_traffic: false,
        },
        desired_state: banger_core::DesiredState::Running,
        state: ObservedState::Running,
        guest_ip: None,
        vm_dir: vm_dir.display().to_string(),
        created_at: String::new(),
        updated_at: String::new(),
        last_error: None,
    };
    d.fleet.store.insert_vm(&vm).expect("insert");
    // A fake VMM stands in: alive until its handles are released.
    let handles = VmHandles { pid: Some(vmm.adopt()), ..Default::default() };
    d.fleet.handles.publish(&vm, handles).expect("publish");
    let listener = UnixListener::bind(vm_dir.join("agent.sock")).expect("bind");
    let seen = Arc::new(Seen::default());
    tokio::spawn(fake_agent(listener, seen.clone(), stall));
    Setup { d, vm, seen, _dir: dir }
}

/// A client that sends `size` bytes of import then the end marker, and returns the final frame.
async fn client_import(mut io: DuplexStream, size: usize) -> Frame {
    let chunk = vec![1u8; 512 * 1024];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len());
        if io.write_all(&Frame::new(1, FrameKind::Data, chunk[..n].to_vec()).encode()).await.is_err() {
            break;
        }
        left -= n;
    }
    let _ = io.write_all(&Frame::new(1, FrameKind::Data, Vec::new()).encode()).await;
    final_frame(&mut io).await
}

async fn final_frame(io: &mut DuplexStream) -> Frame {
    let mut d = Decoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(f) = d.next_frame().expect("frames") {
            if matches!(f.kind, FrameKind::Response | FrameKind::Error) {
                return f;
            }
            continue;
        }
        let n = io.read(&mut buf).await.expect("read");
        assert!(n > 0, "the stream ended without a final frame");
        d.push(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_streams_under_the_workspace_lock_only() {
    let s = setup(true).await;
    let target = s.d.target("web").await.expect("target");
    let (client, mut server) = tokio::io::duplex(64 * 1024);
    let d = s.d.clone();
    let relay = tokio::spawn(async move { d.import_into(&mut server, &target, "/root/repo").await });
    let sender = tokio::spawn(client_import(client, 3 * UNPACK_WINDOW));
    wait_until(|| s.seen.received.load(Ordering::SeqCst) >= UNPACK_WINDOW).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.seen.received.load(Ordering::SeqCst), UNPACK_WINDOW, "one window, then the relay waits for acks");
    // Stalled mid-import: the VM lock is free (stop, delete and restart do not wait) ...
    let vm_lock = tokio::time::timeout(Duration::from_millis(200), s.d.fleet.locks.lock(&s.vm.id)).await;
    assert!(vm_lock.is_ok(), "the vm lock is free while the import streams");
    drop(vm_lock);
    // ... while the workspace lock is held.
    let ws_lock = tokio::time::timeout(Duration::from_millis(200), s.d.locks.lock(&s.vm.id)).await;
    assert!(ws_lock.is_err(), "the workspace lock is held while the import streams");
    // A stop's shutdown request is not queued behind the import, and the connection dropping
    // (the guest powers off) ends the import with an error for the client.
    let asked = s.d.fleet.agent_for(&s.vm).call(&AgentRequest::Shutdown, Duration::from_secs(2)).await;
    assert!(asked.is_err(), "the fake drops the connection instead of answering");
    let last = tokio::time::timeout(Duration::from_secs(5), sender).await.expect("the client is told").expect("join");
    assert_eq!(last.kind, FrameKind::Error);
    let failure: AgentFailure = last.parse("error").expect("json");
    assert_eq!(
        failure.message,
        "importing into web:/root/repo failed: the agent connection was lost (did the vm stop?)"
    );
    relay.await.expect("the relay ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_into_one_vm_run_one_at_a_time() {
    let s = setup(false).await;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let target = s.d.target("web").await.expect("target");
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let d = s.d.clone();
        tokio::spawn(async move { d.import_into(&mut server, &target, "/root/repo").await });
        tasks.push(tokio::spawn(client_import(client, 2 * UNPACK_WINDOW + 5)));
    }
    for t in tasks {
        let f = t.await.expect("join");
        assert_eq!(f.kind, FrameKind::Response, "{}", String::from_utf8_lossy(&f.payload));
        let done: WorkspaceImported = f.parse("imported").expect("json");
        assert_eq!(
            (done.vm.as_str(), done.dir.as_str(), done.bytes),
            ("web", "/root/repo", 2 * UNPACK_WINDOW as u64 + 5)
        );
    }
    assert_eq!(s.seen.most_unpacks.load(Ordering::SeqCst), 1, "never two unpacks at once");
    assert_eq!(s.seen.received.load(Ordering::SeqCst), 3 * (2 * UNPACK_WINDOW + 5));
}

#[tokio::test]
async fn a_client_that_goes_away_abandons_the_unpack() {
    let s = setup(false).await;
    let target = s.d.target("web").await.expect("target");
    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    let d = s.d.clone();
    let relay = tokio::spawn(async move {
        d.import_into(&mut server, &target, "/root/repo").await;
    });
    client.write_all(&Frame::new(1, FrameKind::Data, vec![0u8; 1000]).encode()).await.expect("write");
    wait_until(|| s.seen.received.load(Ordering::SeqCst) == 1000).await;
    drop(client);
    relay.await.expect("the relay ends");
    wait_until(|| s.seen.closed.load(Ordering::SeqCst)).await;
}

/// What an export sent the client: its data, and its final frame.
async fn export_stream(client: &mut DuplexStream) -> (Vec<u8>, Frame) {
    let mut raw = Vec::new();
    client.read_to_end(&mut raw).await.expect("read");
    let mut d = Decoder::default();
    d.push(&raw);
    let mut data = Vec::new();
    loop {
        let f = d.next_frame().expect("frame").expect("a final frame");
        match f.kind {
            FrameKind::Data => data.extend_from_slice(&f.payload),
            _ => return (data, f),
        }
    }
}

#[tokio::test]
async fn exports_relay_the_guests_output_and_name_the_fix_when_there_is_no_repository() {
    let s = setup(false).await;
    let target = s.d.target("web").await.expect("target");
    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    let q = WorkspaceExportQuery { dir: "/root/repo".into(), kind: ExportKind::Bundle, basis: None, max_bytes: None };
    s.d.export_from(&mut server, &target, &q).await;
    drop(server);
    let (data, last) = export_stream(&mut client).await;
    assert_eq!(data, b"BUNDLEBUNDLE");
    let done: WorkspaceExported = last.parse("exported").expect("a response");
    assert_eq!(done.bytes, 12);

    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    let q = WorkspaceExportQuery { dir: "/root/none".into(), kind: ExportKind::Bundle, basis: None, max_bytes: None };
    s.d.export_from(&mut server, &target, &q).await;
    let f = final_frame(&mut client).await;
    assert_eq!(f.kind, FrameKind::Error);
    let failure: AgentFailure = f.parse("error").expect("json");
    assert_eq!(
        failure.message,
        "vm 'web': no git repository at /root/none; import one with `banger workspace prepare web`, or name the guest \
         directory with --path"
    );
}

#[tokio::test]
async fn an_export_over_its_cap_ends_before_the_cap_is_passed() {
    let s = setup(false).await;
    let target = s.d.target("web").await.expect("target");
    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    let q =
        WorkspaceExportQuery { dir: "/root/repo".into(), kind: ExportKind::Bundle, basis: None, max_bytes: Some(8) };
    s.d.export_from(&mut server, &target, &q).await;
    drop(server);
    let (data, last) = export_stream(&mut client).await;
    assert_eq!(data, b"BUNDLE", "the frame that passes the cap is not relayed");
    assert_eq!(last.kind, FrameKind::Error);
    let failure: AgentFailure = last.parse("error").expect("json");
    assert_eq!(
        failure.message,
        "the export from vm 'web' is larger than the cap of 8 bytes; nothing was written; raise the cap with \
         `banger workspace export --max-size SIZE` (e.g. 4G)"
    );
    wait_until(|| s.seen.signalled.load(Ordering::SeqCst)).await;
}

#[tokio::test]
async fn a_vm_that_does_not_run_is_refused_with_the_fix() {
    let s = setup(false).await;
    s.d.fleet.handles.release(&s.vm);
    let err = s.d.target("web").await.err().expect("refused");
    assert!(matches!(err, WorkspaceError::Fleet(FleetError::NotRunning { .. })), "{err}");
    assert_eq!(err.to_string(), "vm 'web' is not running; start it with `banger vm start web`");
    let err = s.d.target("nope").await.err().expect("refused");
    assert!(matches!(err, WorkspaceError::Store(banger_store::StoreError::NotFound { .. })), "{err}");
}

#[test]
fn export_failures_name_the_fix() {
    assert!(export_failure("web", 127, "sh: git: not found").contains("--image debian-bookworm"));
    assert_eq!(export_failure("web", 4, "fatal: x\nno new commits at /r\n"), "vm 'web': no new commits at /r");
    assert_eq!(export_failure("web", 128, "fatal: bad\n"), "git in vm 'web' failed (exit 128): fatal: bad");
}
