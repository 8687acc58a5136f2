//! The caller seen through the real socket: a user who is not the daemon's (a `socket_group`
//! member) cannot make the root daemon read a file it cannot read, nor forward a privileged port.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use super::*;
use crate::services::testing::daemon;

/// One HTTP/1.1 request over the socket from a thread that has become `uid` (raw syscalls: the
/// change is this thread's only, and it ends with it). Returns the status line and body.
fn request_as(uid: u32, socket: &Path, method: &str, url: &str, body: &str) -> String {
    let (socket, request) = (
        socket.to_owned(),
        format!(
            "{method} {url} HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    std::thread::spawn(move || {
        if uid != 0 {
            // SAFETY: plain ids; as raw syscalls they change only this short-lived thread.
            let rc = unsafe {
                libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>());
                libc::syscall(libc::SYS_setresgid, uid, uid, uid);
                libc::syscall(libc::SYS_setresuid, uid, uid, uid)
            };
            assert_eq!(rc, 0, "setresuid");
        }
        let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
        s.write_all(request.as_bytes()).expect("send");
        let mut back = String::new();
        s.read_to_string(&mut back).expect("read");
        back
    })
    .join()
    .expect("client thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_cannot_read_root_files_or_forward_privileged_ports() {
    if !nix::unistd::geteuid().is_root() {
        return; // only root can be two users at once
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let daemon = daemon(dir.path());
    let socket = dir.path().join("api.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod socket");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router(daemon).into_make_service_with_connect_info::<Peer>()).await;
    });
    let secret = dir.path().join("root-only.ext4");
    std::fs::write(&secret, vec![0u8; 4096]).expect("write");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    let register = format!(r#"{{"name":"stolen","file":"{}"}}"#, secret.display());
    let (sock, reg) = (socket.clone(), register.clone());
    let refused = tokio::task::spawn_blocking(move || request_as(65534, &sock, "POST", "/v1/images/register", &reg))
        .await
        .expect("join");
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    assert!(refused.contains("as uid 65534"), "{refused}");
    let sock = socket.clone();
    let as_root = tokio::task::spawn_blocking(move || request_as(0, &sock, "POST", "/v1/images/register", &register))
        .await
        .expect("join");
    assert!(!as_root.contains("as uid"), "root reads it: {as_root}");

    let forward = r#"{"host_port":80,"guest_port":80}"#;
    let sock = socket.clone();
    let refused =
        tokio::task::spawn_blocking(move || request_as(65534, &sock, "POST", "/v1/vms/web/forwards", forward))
            .await
            .expect("join");
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    assert!(refused.contains("only root may forward it"), "{refused}");
    let sock = socket.clone();
    let as_root = tokio::task::spawn_blocking(move || request_as(0, &sock, "POST", "/v1/vms/web/forwards", forward))
        .await
        .expect("join");
    assert!(as_root.starts_with("HTTP/1.1 404"), "root gets as far as the missing vm: {as_root}");

    // A Dockerfile's RUN steps run as root on the host: only trusted callers may build one.
    let build = r#"{"name":"df","dockerfile":{"path":"/nonexistent/Dockerfile"}}"#;
    let sock = socket.clone();
    let refused =
        tokio::task::spawn_blocking(move || request_as(65534, &sock, "POST", "/v1/images", build)).await.expect("join");
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    assert!(refused.contains("only root or the daemon's user"), "{refused}");
    server.abort();
}
