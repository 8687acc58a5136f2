//! Pause, resume and snapshot routes, and the snapshots themselves.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use banger_proto::{ApiError, CreateSnapshotRequest, SnapshotList, SnapshotView, VmView};

use super::{optional_body, path, ApiFailure, ApiResult, PathParams, Shared};

/// Pauses a running VM's vCPUs.
#[utoipa::path(post, path = "/v1/vms/{vm}/pause", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = VmView), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn pause_vm(State(d): Shared, vm: PathParams<String>) -> ApiResult<VmView> {
    let paused = d.snapshots.pause_vm(&path(vm)?).await?;
    Ok(Json(d.vms.vm_view(paused)))
}

/// Resumes a paused VM and sets its clock.
#[utoipa::path(post, path = "/v1/vms/{vm}/resume", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = VmView), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn resume_vm(State(d): Shared, vm: PathParams<String>) -> ApiResult<VmView> {
    let resumed = d.snapshots.resume_vm(&path(vm)?).await?;
    Ok(Json(d.vms.vm_view(resumed)))
}

/// Takes a memory snapshot of a running or paused VM (memory, device state and disks); the
/// guest is paused meanwhile and resumed after, unless it was paused before. The body is optional.
#[utoipa::path(post, path = "/v1/vms/{vm}/snapshot", params(("vm" = String, Path, description = "name, id or id prefix")),
    request_body(content = CreateSnapshotRequest, description = "optional: no body is the same as `{}`"),
    responses((status = 201, body = SnapshotView), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn snapshot_vm(
    State(d): Shared,
    vm: PathParams<String>,
    raw: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiFailure> {
    let vm = path(vm)?;
    let req: CreateSnapshotRequest = optional_body(&raw, "CreateSnapshotRequest")?;
    Ok((StatusCode::CREATED, Json(d.snapshots.snapshot_vm(&vm, req.name).await?)))
}

/// Every memory snapshot.
#[utoipa::path(get, path = "/v1/snapshots", responses((status = 200, body = SnapshotList), (status = 500, body = ApiError)))]
pub(super) async fn list_snapshots(State(d): Shared) -> ApiResult<SnapshotList> {
    Ok(Json(SnapshotList { snapshots: d.snapshots.list_snapshots()? }))
}

/// One snapshot, by name, id or id prefix.
#[utoipa::path(get, path = "/v1/snapshots/{snapshot}", params(("snapshot" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = SnapshotView), (status = 404, body = ApiError), (status = 400, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn show_snapshot(State(d): Shared, snapshot: PathParams<String>) -> ApiResult<SnapshotView> {
    let record = d.snapshots.find(&path(snapshot)?)?;
    Ok(Json(d.snapshots.snapshot_view(record)?))
}

/// Deletes a snapshot and its files; refused (409) while VMs started from it exist.
#[utoipa::path(delete, path = "/v1/snapshots/{snapshot}", params(("snapshot" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = SnapshotView), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 400, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn delete_snapshot(State(d): Shared, snapshot: PathParams<String>) -> ApiResult<SnapshotView> {
    Ok(Json(d.snapshots.delete_snapshot(&path(snapshot)?).await?))
}
