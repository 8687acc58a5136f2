//! The HTTP/JSON API under `/v1`, served on the daemon's unix socket: the only module that knows
//! HTTP. Handlers are thin, one file per resource: they parse, call a service and map its
//! answer; [`error`] turns every service's typed error into a status and `{code, message}`.
//! The OpenAPI document at `GET /v1/openapi.json` is generated from the handlers' annotations
//! and the wire types (`banger_proto`).

mod artifacts;
mod attach;
mod daemon;
mod error;
mod exec;
mod files;
mod forwards;
mod network;
mod operations;
mod sessions;
mod snapshots;
mod ssh;
mod vms;
pub mod web;
mod workspace;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path as UrlPath, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use banger_host::paths::ensure_dir;
use banger_proto::{
    ApiError, BuildImageRequest, ConfigView, CreateSnapshotRequest, CreateVmRequest, DaemonStatus, DockerfileBuild,
    ForwardList, ForwardProtocol, ForwardState, ForwardView, GitIdentity, GuestPort, ImageList, ImageRecipe,
    ImageRecord, KernelList, KernelRecord, OperationList, OperationRecord, PortForward, PromoteRequest,
    PullImageRequest, PullKernelRequest, RecipeFile, RegisterImageRequest, SessionList, SessionRecord, SessionStatus,
    SessionView, SnapshotList, SnapshotRecord, SnapshotView, SshConfig, SshHost, SshInfo, StartSessionRequest,
    StartVmRequest, StdinMode, UpdateVmRequest, VmList, VmLogs, VmPorts, VmStats, VmView,
};
use tokio::net::UnixListener;
use utoipa::OpenApi;

pub use self::error::{ApiFailure, Kind, Status};
use crate::daemon::Daemon;
use crate::services::caller::Caller;

type Shared = State<Arc<Daemon>>;

/// The connection's peer, read once when it is accepted (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy)]
struct Peer(Caller);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(cred) => Self(Caller { uid: cred.uid(), gid: cred.gid() }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the caller's credentials; treating it as untrusted");
                Self(Caller::UNKNOWN)
            }
        }
    }
}

/// The user behind a request; [`Caller::UNKNOWN`] when the connection carried no credentials
/// (a router driven in-process).
struct CallerOf(Caller);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for CallerOf {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<axum::extract::ConnectInfo<Peer>>().map(|c| c.0 .0);
        Ok(Self(peer.unwrap_or(Caller::UNKNOWN)))
    }
}
type ApiResult<T> = Result<Json<T>, ApiFailure>;
/// A route's path parameters as extracted: checked by [`path`], so that a bad one is answered
/// with our own 400 `{code, message}` rather than axum's plain-text refusal.
type PathParams<T> = Result<UrlPath<T>, PathRejection>;
/// A route's query string as extracted: checked by [`query`] (see [`PathParams`]).
type QueryParams<T> = Result<Query<T>, QueryRejection>;

/// The generated OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "bangerd", description = "banger's daemon API, served on a unix socket"),
    paths(
        daemon::health,
        daemon::shutdown,
        daemon::config,
        daemon::doctor,
        vms::list_vms,
        vms::create_vm,
        vms::show_vm,
        vms::update_vm,
        vms::delete_vm,
        vms::start_vm,
        vms::stop_vm,
        snapshots::pause_vm,
        snapshots::resume_vm,
        snapshots::snapshot_vm,
        snapshots::list_snapshots,
        snapshots::show_snapshot,
        snapshots::delete_snapshot,
        vms::vm_logs,
        vms::vm_stats,
        vms::vm_ports,
        network::show_network,
        network::set_network,
        network::network_log,
        ssh::vm_ssh,
        ssh::ssh_config,
        forwards::list_forwards,
        forwards::add_forward,
        forwards::remove_forward,
        artifacts::list_kernels,
        artifacts::pull_kernel,
        artifacts::delete_kernel,
        artifacts::list_images,
        artifacts::build_image,
        artifacts::delete_image,
        artifacts::show_image,
        artifacts::pull_image,
        artifacts::register_image,
        artifacts::promote_vm,
        exec::exec,
        workspace::import,
        workspace::export,
        workspace::detach_disk,
        operations::list_ops,
        operations::show_op,
        operations::cancel_op,
        daemon::openapi,
        sessions::list_sessions,
        sessions::start_session,
        sessions::show_session,
        sessions::stop_session,
        sessions::kill_session,
        attach::logs,
        attach::attach,
        files::stat_file,
        files::list_files,
        files::make_dir,
        files::remove_file,
        files::read_file,
        files::write_file,
        files::get_archive,
        files::put_archive,
        web::login_link
    ),
    components(schemas(
        ApiError,
        DaemonStatus,
        ConfigView,
        banger_proto::DoctorReport,
        banger_proto::DoctorCheck,
        banger_proto::DoctorStatus,
        CreateVmRequest,
        UpdateVmRequest,
        VmView,
        VmList,
        VmLogs,
        VmStats,
        OperationRecord,
        OperationList,
        KernelRecord,
        KernelList,
        PullKernelRequest,
        ImageRecord,
        ImageList,
        BuildImageRequest,
        DockerfileBuild,
        ImageRecipe,
        RecipeFile,
        PullImageRequest,
        RegisterImageRequest,
        PromoteRequest,
        VmPorts,
        GuestPort,
        StartVmRequest,
        GitIdentity,
        SshInfo,
        SshConfig,
        SshHost,
        PortForward,
        ForwardProtocol,
        ForwardView,
        ForwardList,
        ForwardState,
        CreateSnapshotRequest,
        SnapshotView,
        SnapshotList,
        SnapshotRecord,
        StartSessionRequest,
        SessionView,
        SessionList,
        SessionRecord,
        SessionStatus,
        StdinMode,
        banger_proto::workspace::ExportKind,
        banger_proto::fs::FileStat,
        banger_proto::fs::FileKind,
        banger_proto::fs::FileList,
        banger_proto::fs::MkdirRequest,
        banger_proto::fs::ArchiveExtracted,
        banger_proto::EgressMode,
        banger_proto::EgressPolicy,
        banger_proto::SetEgressRequest,
        banger_proto::EgressView,
        banger_proto::LearnedAddress,
        banger_proto::EgressDenial,
        banger_proto::EgressLog,
        banger_proto::WebLogin
    ))
)]
struct ApiDoc;

/// The whole OpenAPI document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The router, with the daemon as state.
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/health", get(daemon::health))
        .route("/v1/daemon/shutdown", post(daemon::shutdown))
        .route("/v1/openapi.json", get(daemon::openapi))
        .route("/v1/config", get(daemon::config))
        .route("/v1/doctor", get(daemon::doctor))
        .route("/v1/vms", get(vms::list_vms).post(vms::create_vm))
        .route("/v1/vms/{vm}", get(vms::show_vm).patch(vms::update_vm).delete(vms::delete_vm))
        .route("/v1/vms/{vm}/exec", post(exec::exec))
        .route("/v1/vms/{vm}/workspace/import", post(workspace::import))
        .route("/v1/vms/{vm}/workspace/export", post(workspace::export))
        .route("/v1/vms/{vm}/workspace/disk", axum::routing::delete(workspace::detach_disk))
        .route("/v1/vms/{vm}/start", post(vms::start_vm))
        .route("/v1/vms/{vm}/stop", post(vms::stop_vm))
        .route("/v1/vms/{vm}/pause", post(snapshots::pause_vm))
        .route("/v1/vms/{vm}/resume", post(snapshots::resume_vm))
        .route("/v1/vms/{vm}/snapshot", post(snapshots::snapshot_vm))
        .route("/v1/snapshots", get(snapshots::list_snapshots))
        .route("/v1/snapshots/{snapshot}", get(snapshots::show_snapshot).delete(snapshots::delete_snapshot))
        .route("/v1/vms/{vm}/logs", get(vms::vm_logs))
        .route("/v1/vms/{vm}/stats", get(vms::vm_stats))
        .route("/v1/vms/{vm}/ports", get(vms::vm_ports))
        .route("/v1/vms/{vm}/network", get(network::show_network).put(network::set_network))
        .route("/v1/vms/{vm}/network/log", get(network::network_log))
        .route("/v1/vms/{vm}/ssh", get(ssh::vm_ssh))
        .route("/v1/ssh/config", get(ssh::ssh_config))
        .route("/v1/vms/{vm}/forwards", get(forwards::list_forwards).post(forwards::add_forward))
        .route("/v1/vms/{vm}/forwards/{host_port}", axum::routing::delete(forwards::remove_forward))
        .route("/v1/kernels", get(artifacts::list_kernels).post(artifacts::pull_kernel))
        .route("/v1/kernels/{name}", axum::routing::delete(artifacts::delete_kernel))
        .route("/v1/images", get(artifacts::list_images).post(artifacts::build_image))
        .route("/v1/images/{name}", get(artifacts::show_image).delete(artifacts::delete_image))
        .route("/v1/images/pull", post(artifacts::pull_image))
        .route("/v1/images/register", post(artifacts::register_image))
        .route("/v1/vms/{vm}/promote", post(artifacts::promote_vm))
        .route("/v1/operations", get(operations::list_ops))
        .route("/v1/operations/{op}", get(operations::show_op))
        .route("/v1/operations/{op}/cancel", post(operations::cancel_op))
        .route("/v1/web/login", post(web::login_link))
        .merge(sessions::routes())
        .merge(files_routes())
        .fallback(|| async { ApiFailure::not_found("no such endpoint; see GET /v1/openapi.json") })
        .with_state(daemon)
}

/// The file routes (`http/files.rs`).
fn files_routes() -> Router<Arc<Daemon>> {
    use axum::routing::delete;
    Router::new()
        .route("/v1/vms/{vm}/files", delete(files::remove_file))
        .route("/v1/vms/{vm}/files/stat", get(files::stat_file))
        .route("/v1/vms/{vm}/files/list", get(files::list_files))
        .route("/v1/vms/{vm}/files/mkdir", post(files::make_dir))
        .route("/v1/vms/{vm}/files/content", get(files::read_file).put(files::write_file))
        .route("/v1/vms/{vm}/files/archive", get(files::get_archive).put(files::put_archive))
}

/// `202 Accepted` with the operation to follow.
fn accepted(op: banger_core::OperationRecord) -> (axum::http::StatusCode, Json<OperationRecord>) {
    (axum::http::StatusCode::ACCEPTED, Json(op.into()))
}

/// A JSON body, or the refusal that names the type to send.
fn body<T>(parsed: Result<Json<T>, JsonRejection>, what: &str) -> Result<T, ApiFailure> {
    parsed.map(|Json(v)| v).map_err(|rejection| {
        ApiFailure::invalid(format!(
            "invalid request body: {}; send a JSON {what} object (see GET /v1/openapi.json)",
            rejection.body_text()
        ))
    })
}

/// Path parameters, or the refusal that names the bad one.
fn path<T>(parsed: PathParams<T>) -> Result<T, ApiFailure> {
    parsed.map(|UrlPath(v)| v).map_err(|rejection| {
        let message = format!("invalid path parameter: {}; see the route in GET /v1/openapi.json", cause(&rejection));
        refusal(rejection.status(), message)
    })
}

/// A query string, or the refusal that names the bad parameter.
fn query<T>(parsed: QueryParams<T>) -> Result<T, ApiFailure> {
    parsed.map(|Query(v)| v).map_err(|rejection| {
        let message =
            format!("invalid query string: {}; see the route's parameters in GET /v1/openapi.json", cause(&rejection));
        refusal(rejection.status(), message)
    })
}

/// What an extractor's rejection says was wrong: its cause, without axum's preamble.
fn cause(rejection: &dyn std::error::Error) -> String {
    rejection.source().map_or_else(|| rejection.to_string(), ToString::to_string)
}

/// A rejection as our failure: axum answers 500 only for a route that does not declare the
/// parameters its handler extracts (our bug), 400 for what the client sent.
fn refusal(status: axum::http::StatusCode, message: String) -> ApiFailure {
    if status.is_server_error() {
        ApiFailure::internal(message)
    } else {
        ApiFailure::invalid(message)
    }
}

/// An optional JSON body (nothing, or only whitespace, is the type's default).
fn optional_body<T: Default + serde::de::DeserializeOwned>(raw: &[u8], what: &str) -> Result<T, ApiFailure> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(raw).map_err(|e| {
        ApiFailure::invalid(format!(
            "invalid request body: {e}; send a JSON {what} object or nothing (see GET /v1/openapi.json)"
        ))
    })
}

/// Why the API could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket's directory could not be made.
    #[error("cannot create socket directory {}", path.display())]
    SocketDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file that is not a socket is in the way.
    #[error("{} exists and is not a socket; remove it or pass another --socket", .0.display())]
    NotASocket(std::path::PathBuf),
    /// A socket operation failed.
    #[error("cannot {what} {}", path.display())]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The socket.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `socket_group` could not be looked up.
    #[error("cannot look up socket_group '{0}'")]
    GroupLookup(String, #[source] nix::errno::Errno),
    /// `socket_group` does not exist.
    #[error("socket_group '{0}' does not exist; create it or clear socket_group in config.toml")]
    NoGroup(String),
    /// The socket could not be given to the group.
    #[error("cannot give {} to group {group}", path.display())]
    Chown {
        /// The socket.
        path: std::path::PathBuf,
        /// The group.
        group: String,
        /// Why.
        #[source]
        source: nix::errno::Errno,
    },
}

/// Binds the daemon's socket and serves the API until `shutdown` resolves; then removes the
/// socket.
pub async fn serve(
    daemon: Arc<Daemon>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let socket = daemon.fleet.layout.socket.clone();
    let listener = bind_socket(&socket, &daemon.fleet.config.socket_group)?;
    tracing::info!(socket = %socket.display(), "serving the api");
    let web = web::spawn(daemon.clone()).await;
    let served = axum::serve(listener, router(daemon).into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown)
        .await;
    if let Some(web) = web {
        web.abort();
    }
    // Only the socket we bound is ours to remove.
    let _ = std::fs::remove_file(&socket);
    served.map_err(|source| ServeError::Socket { what: "serve on", path: socket, source })
}

/// Binds the API socket. We hold the state dir's lock, so a socket file already there was left
/// by a daemon that died: remove it.
fn bind_socket(socket: &Path, group: &str) -> Result<UnixListener, ServeError> {
    if let Some(parent) = socket.parent() {
        ensure_dir(parent, 0o755).map_err(|source| ServeError::SocketDir { path: parent.to_owned(), source })?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            tracing::warn!(socket = %socket.display(), "removing stale socket left by a previous daemon");
            std::fs::remove_file(socket).map_err(|source| ServeError::Socket {
                what: "remove stale socket",
                path: socket.to_owned(),
                source,
            })?;
        }
        Ok(_) => return Err(ServeError::NotASocket(socket.to_owned())),
        Err(_) => {}
    }
    // Bind with a tight umask so the socket is never briefly open to others.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|source| ServeError::Socket { what: "bind", path: socket.to_owned(), source })?;
    let mode = if group.is_empty() {
        0o600
    } else {
        let gid = nix::unistd::Group::from_name(group)
            .map_err(|e| ServeError::GroupLookup(group.to_owned(), e))?
            .ok_or_else(|| ServeError::NoGroup(group.to_owned()))?
            .gid;
        nix::unistd::chown(socket, None, Some(gid)).map_err(|source| ServeError::Chown {
            path: socket.to_owned(),
            group: group.to_owned(),
            source,
        })?;
        0o660
    };
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode)).map_err(|source| ServeError::Socket {
        what: "set mode on",
        path: socket.to_owned(),
        source,
    })?;
    Ok(listener)
}

#[cfg(test)]
mod caller_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_lists_every_route() {
        let doc = document();
        let paths: Vec<&String> = doc.paths.paths.keys().collect();
        for p in [
            "/v1/health",
            "/v1/vms",
            "/v1/vms/{vm}",
            "/v1/vms/{vm}/ssh",
            "/v1/ssh/config",
            "/v1/vms/{vm}/forwards",
            "/v1/vms/{vm}/forwards/{host_port}",
            "/v1/vms/{vm}/pause",
            "/v1/vms/{vm}/resume",
            "/v1/vms/{vm}/snapshot",
            "/v1/snapshots",
            "/v1/snapshots/{snapshot}",
            "/v1/operations/{op}/cancel",
            "/v1/vms/{vm}/sessions/{session}/stop",
            "/v1/vms/{vm}/sessions/{session}/logs",
            "/v1/vms/{vm}/sessions/{session}/attach",
            "/v1/vms/{vm}/exec",
            "/v1/vms/{vm}/workspace/import",
            "/v1/vms/{vm}/workspace/export",
            "/v1/vms/{vm}/workspace/disk",
            "/v1/vms/{vm}/promote",
            "/v1/images/pull",
            "/v1/images/register",
            "/v1/images/{name}",
            "/v1/openapi.json",
            "/v1/vms/{vm}/files",
            "/v1/vms/{vm}/files/stat",
            "/v1/vms/{vm}/files/list",
            "/v1/vms/{vm}/files/mkdir",
            "/v1/vms/{vm}/files/content",
            "/v1/vms/{vm}/files/archive",
            "/v1/web/login",
        ] {
            assert!(paths.iter().any(|k| *k == p), "{p} missing from {paths:?}");
        }
        let json = serde_json::to_string(&doc).expect("serialise");
        assert!(json.contains("CreateVmRequest") && json.contains("OperationRecord"));
    }

    /// The served document, whole: any change to a route, parameter, status or wire type shows
    /// up here in review (`cargo insta review` after an intended change).
    #[test]
    fn the_openapi_document_is_as_reviewed() {
        insta::assert_json_snapshot!("openapi", document());
    }
}
