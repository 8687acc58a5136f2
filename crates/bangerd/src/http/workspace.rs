//! `POST /v1/vms/{vm}/workspace/import` and `.../export`: upgraded streams (see
//! `banger_proto::workspace`) relayed by the workspace service. The OpenAPI document describes
//! them up to the `101 Switching Protocols`; what follows is outside HTTP.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use banger_proto::workspace::{
    valid_commit_id, valid_guest_dir, ExportKind, WorkspaceExportQuery, WorkspaceImportQuery, WORKSPACE_PROTOCOL,
};
use banger_proto::ApiError;
use hyper_util::rt::TokioIo;

use super::{path, query, ApiFailure, PathParams, QueryParams};
use crate::daemon::Daemon;

/// `Connection: upgrade` + `Upgrade: banger-workspace`, or the refusal.
fn check_upgrade(req: &Request) -> Result<(), ApiFailure> {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(WORKSPACE_PROTOCOL));
    if wants {
        Ok(())
    } else {
        Err(ApiFailure::invalid(format!(
            "workspace streams need `Connection: upgrade` and `Upgrade: {WORKSPACE_PROTOCOL}`"
        )))
    }
}

fn check_dir(dir: &str) -> Result<(), ApiFailure> {
    if valid_guest_dir(dir) {
        Ok(())
    } else {
        Err(ApiFailure::invalid(format!(
            "guest directory '{dir}' must be an absolute path without '.' or '..' components (e.g. /root/myrepo)"
        )))
    }
}

fn switching_protocols() -> Response {
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, WORKSPACE_PROTOCOL)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The `Upgrade` value of the workspace streams.
#[derive(Debug, utoipa::ToSchema)]
#[expect(dead_code, reason = "a schema only: the one value the header may carry")]
pub(super) enum WorkspaceUpgrade {
    /// The workspace protocol.
    #[schema(rename = "banger-workspace")]
    BangerWorkspace,
}

/// Unpacks a stream of files into a directory of a running VM, over an HTTP upgrade.
///
/// The client sends `Connection: upgrade` and `Upgrade: banger-workspace`. After `101
/// Switching Protocols` the connection leaves HTTP (the stream is described in
/// `banger_proto::workspace`, not in this document). A refusal before the upgrade is an
/// ordinary `{code, message}` answer.
#[utoipa::path(post, path = "/v1/vms/{vm}/workspace/import",
    params(("vm" = String, Path, description = "name, id or id prefix"),
        ("dir" = String, Query, description = "absolute guest directory to unpack into, e.g. `/root/myrepo` (made when missing)"),
        ("disk_bytes" = Option<u64>, Query, description = "the stream is an ext4 image of this many bytes (a multiple of 1 MiB), attached to the VM as a disk in a free slot and mounted at `dir`; 409 when the VM has no free slot"),
        ("Connection" = String, Header, description = "`upgrade`"),
        ("Upgrade" = inline(WorkspaceUpgrade), Header, description = "the protocol to switch to: `banger-workspace`")),
    responses(
        (status = 101, description = "switched to `banger-workspace`: the stream carries the files from here on, outside HTTP",
            headers(("Connection" = String, description = "`upgrade`"), ("Upgrade" = String, description = "`banger-workspace`"))),
        (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 500, body = ApiError)))]
pub async fn import(
    State(d): State<Arc<Daemon>>,
    vm: PathParams<String>,
    q: QueryParams<WorkspaceImportQuery>,
    mut req: Request,
) -> Response {
    let upgrade = check_upgrade(&req);
    let checked = async {
        upgrade?;
        let vm = path(vm)?;
        let q = query(q)?;
        check_dir(&q.dir)?;
        let target = d.workspace.target(&vm).await?;
        if let Some(size) = q.disk_bytes {
            use crate::services::workspace::attach::{free_slot, valid_disk_size, AttachError};
            if !valid_disk_size(size) {
                return Err(ApiFailure::invalid(AttachError::BadSize { size }.to_string()));
            }
            if free_slot(&target.vm_dir).is_none() {
                return Err(ApiFailure::conflict(AttachError::NoFreeSlot { vm: target.name.clone() }.to_string()));
            }
        }
        Ok::<_, ApiFailure>((q, target))
    };
    let (q, target) = match checked.await {
        Ok(ok) => ok,
        Err(e) => return e.into_response(),
    };
    upgrade_then(&mut req, "import", move |mut io| async move {
        match q.disk_bytes {
            Some(size) => d.workspace.attach_into(&mut io, &target, &q.dir, size).await,
            None => d.workspace.import_into(&mut io, &target, &q.dir).await,
        }
    })
}

/// What `DELETE .../workspace/disk` takes.
#[derive(Debug, serde::Deserialize)]
pub struct DetachQuery {
    /// The guest directory the disk is mounted at.
    dir: String,
}

/// Detaches a disk that an import with `disk_bytes` attached: unmounts it in the guest and
/// empties its slot (the containerd shim frees a pod container's root this way).
#[utoipa::path(delete, path = "/v1/vms/{vm}/workspace/disk",
    params(("vm" = String, Path, description = "name, id or id prefix"),
        ("dir" = String, Query, description = "the guest directory the disk was attached at")),
    responses((status = 204, description = "detached: the slot is free again"), (status = 400, body = ApiError),
        (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub async fn detach_disk(
    State(d): State<Arc<Daemon>>,
    vm: PathParams<String>,
    q: QueryParams<DetachQuery>,
) -> Result<StatusCode, ApiFailure> {
    let (vm, q) = (path(vm)?, query(q)?);
    check_dir(&q.dir)?;
    let target = d.workspace.target(&vm).await?;
    d.workspace.detach_dir(&target, &q.dir).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sends a git bundle or patch of a repository in a running VM, over an HTTP upgrade.
///
/// The client sends `Connection: upgrade` and `Upgrade: banger-workspace`. After `101
/// Switching Protocols` the connection leaves HTTP (the stream is described in
/// `banger_proto::workspace`, not in this document). A refusal before the upgrade is an
/// ordinary `{code, message}` answer.
#[utoipa::path(post, path = "/v1/vms/{vm}/workspace/export",
    params(("vm" = String, Path, description = "name, id or id prefix"),
        ("dir" = String, Query, description = "absolute guest directory of the repository"),
        ("kind" = ExportKind, Query, description = "bundle or patch"),
        ("basis" = Option<String>, Query, description = "for a bundle: a full commit id the host has; commits reachable from it are left out when the guest has it too"),
        ("max_bytes" = Option<u64>, Query, description = "the most bytes the guest may send (default 1 GiB); a larger export ends with an error frame"),
        ("Connection" = String, Header, description = "`upgrade`"),
        ("Upgrade" = inline(WorkspaceUpgrade), Header, description = "the protocol to switch to: `banger-workspace`")),
    responses(
        (status = 101, description = "switched to `banger-workspace`: the stream carries the export from here on, outside HTTP",
            headers(("Connection" = String, description = "`upgrade`"), ("Upgrade" = String, description = "`banger-workspace`"))),
        (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 500, body = ApiError)))]
pub async fn export(
    State(d): State<Arc<Daemon>>,
    vm: PathParams<String>,
    q: QueryParams<WorkspaceExportQuery>,
    mut req: Request,
) -> Response {
    let upgrade = check_upgrade(&req);
    let checked = async {
        upgrade?;
        let vm = path(vm)?;
        let q = query(q)?;
        check_dir(&q.dir)?;
        if let Some(basis) = q.basis.as_deref().filter(|b| !valid_commit_id(b)) {
            return Err(ApiFailure::invalid(format!("basis '{basis}' is not a full commit id")));
        }
        Ok((q, d.workspace.target(&vm).await?))
    };
    let (q, target) = match checked.await {
        Ok(ok) => ok,
        Err(e) => return e.into_response(),
    };
    upgrade_then(&mut req, "export", move |mut io| async move {
        d.workspace.export_from(&mut io, &target, &q).await;
    })
}

/// Answers `101 Switching Protocols` and, once the connection has switched, runs `relay` on it.
fn upgrade_then<F, Fut>(req: &mut Request, what: &'static str, relay: F) -> Response
where
    F: FnOnce(TokioIo<hyper::upgrade::Upgraded>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => relay(TokioIo::new(upgraded)).await,
            Err(e) => tracing::warn!(error = %e, "workspace {what} upgrade failed"),
        }
    });
    switching_protocols()
}
