//! `POST /v1/vms/{vm}/workspace/import` and `.../export`: upgraded streams (see
//! `banger_proto::workspace`) relayed by the workspace service. Not in the OpenAPI document,
//! since they leave HTTP after the upgrade.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use banger_proto::workspace::{
    valid_commit_id, valid_guest_dir, WorkspaceExportQuery, WorkspaceImportQuery, WORKSPACE_PROTOCOL,
};
use hyper_util::rt::TokioIo;

use super::ApiFailure;
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

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiFailure> {
    q.map(|Query(q)| q).map_err(|r| ApiFailure::invalid(format!("invalid query: {}", r.body_text())))
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

/// `POST /v1/vms/{vm}/workspace/import` (see `banger_proto::workspace`; not in the OpenAPI
/// document, since it leaves HTTP after the upgrade).
pub async fn import(
    State(d): State<Arc<Daemon>>,
    Path(vm): Path<String>,
    q: Result<Query<WorkspaceImportQuery>, QueryRejection>,
    mut req: Request,
) -> Response {
    let upgrade = check_upgrade(&req);
    let checked = async {
        upgrade?;
        let q = query(q)?;
        check_dir(&q.dir)?;
        Ok::<_, ApiFailure>((q, d.workspace.target(&vm).await?))
    };
    let (q, target) = match checked.await {
        Ok(ok) => ok,
        Err(e) => return e.into_response(),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => d.workspace.import_into(&mut TokioIo::new(upgraded), &target, &q.dir).await,
            Err(e) => tracing::warn!(error = %e, "workspace import upgrade failed"),
        }
    });
    switching_protocols()
}

/// `POST /v1/vms/{vm}/workspace/export` (see `banger_proto::workspace`).
pub async fn export(
    State(d): State<Arc<Daemon>>,
    Path(vm): Path<String>,
    q: Result<Query<WorkspaceExportQuery>, QueryRejection>,
    mut req: Request,
) -> Response {
    let upgrade = check_upgrade(&req);
    let checked = async {
        upgrade?;
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
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => d.workspace.export_from(&mut TokioIo::new(upgraded), &target, &q).await,
            Err(e) => tracing::warn!(error = %e, "workspace export upgrade failed"),
        }
    });
    switching_protocols()
}
