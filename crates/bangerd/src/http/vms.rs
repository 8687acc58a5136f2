//! VM routes: list, create, show, set, delete, start and stop, and the reads of one VM (console
//! log, resource use, listening ports).

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use banger_proto::{
    ApiError, CreateVmRequest, OperationRecord, StartVmRequest, UpdateVmRequest, VmList, VmLogs, VmPorts, VmStats,
    VmView,
};

use super::{
    accepted, body, optional_body, path, query, ApiFailure, ApiResult, CallerOf, PathParams, QueryParams, Shared,
};
use crate::services::ssh::check_git_identity;

/// Every VM.
#[utoipa::path(get, path = "/v1/vms", responses((status = 200, body = VmList), (status = 500, body = ApiError)))]
pub(super) async fn list_vms(State(d): Shared) -> Result<axum::response::Response, ApiFailure> {
    let vms = d.vms.list_views()?;
    // Written into a buffer sized for the list up front: axum's `Json` starts at 128 bytes and
    // doubles, which with 1,000 VMs (~800 bytes each) copied the answer over a dozen times.
    let mut out = Vec::with_capacity(64 + vms.len() * VIEW_BYTES);
    serde_json::to_writer(&mut out, &VmList { vms })
        .map_err(|e| ApiFailure::internal(format!("cannot encode the VM list: {e}")))?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], out).into_response())
}

/// About what one VM takes in `GET /v1/vms`.
const VIEW_BYTES: usize = 1024;

/// Starts creating a VM; answers with the operation to follow.
#[utoipa::path(post, path = "/v1/vms", request_body = CreateVmRequest, responses(
    (status = 202, body = OperationRecord), (status = 400, body = ApiError), (status = 409, body = ApiError),
    (status = 404, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn create_vm(
    State(d): Shared,
    CallerOf(caller): CallerOf,
    req: Result<Json<CreateVmRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiFailure> {
    let req = body(req, "CreateVmRequest")?;
    req.publish.iter().try_for_each(|f| caller.check_port(f.host_port))?;
    let op = d.vms.begin_create_vm_as(req, caller)?;
    Ok(accepted(op))
}

/// One VM, by name, id or id prefix.
#[utoipa::path(get, path = "/v1/vms/{vm}", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = VmView), (status = 404, body = ApiError), (status = 400, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn show_vm(State(d): Shared, vm: PathParams<String>) -> ApiResult<VmView> {
    let record = d.fleet.store.find_vm(&path(vm)?)?;
    let egress = d.fleet.store.egress_policy(&record.id)?;
    Ok(Json(VmView { egress: Some(egress.into()), ..d.vms.vm_view(record) }))
}

/// Changes a stopped VM.
#[utoipa::path(patch, path = "/v1/vms/{vm}", params(("vm" = String, Path, description = "name, id or id prefix")),
    request_body = UpdateVmRequest,
    responses((status = 200, body = VmView), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn update_vm(
    State(d): Shared,
    vm: PathParams<String>,
    req: Result<Json<UpdateVmRequest>, JsonRejection>,
) -> ApiResult<VmView> {
    let vm = path(vm)?;
    let updated = d.vms.update_vm(&vm, body(req, "UpdateVmRequest")?).await?;
    Ok(Json(d.vms.vm_view(updated)))
}

/// Deletes a stopped VM and its files.
#[utoipa::path(delete, path = "/v1/vms/{vm}", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = VmView), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 400, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn delete_vm(State(d): Shared, vm: PathParams<String>) -> ApiResult<VmView> {
    let deleted = d.vms.delete_vm(&path(vm)?).await?;
    Ok(Json(d.vms.vm_view(deleted)))
}

/// Boots a VM; answers with the operation to follow. The body is optional.
#[utoipa::path(post, path = "/v1/vms/{vm}/start", params(("vm" = String, Path, description = "name, id or id prefix")),
    request_body(content = StartVmRequest, description = "optional: no body is the same as `{}`"),
    responses((status = 202, body = OperationRecord), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn start_vm(
    State(d): Shared,
    vm: PathParams<String>,
    raw: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiFailure> {
    let vm = path(vm)?;
    let req: StartVmRequest = optional_body(&raw, "StartVmRequest")?;
    let git = check_git_identity(req.git_identity)?;
    Ok(accepted(d.lifecycle.begin_start_vm(&vm, git)?))
}

/// Query of `POST /v1/vms/{vm}/stop`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct StopQuery {
    /// Do not ask the guest: quit the VMM at once (its disks may be left unclean).
    #[serde(default)]
    force: bool,
}

/// Stops a VM: agent power-off, then VMM quit, then kill. Answers once it is stopped.
#[utoipa::path(post, path = "/v1/vms/{vm}/stop", params(("vm" = String, Path, description = "name, id or id prefix"), StopQuery),
    responses((status = 200, body = VmView), (status = 404, body = ApiError), (status = 400, body = ApiError),
        (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn stop_vm(State(d): Shared, vm: PathParams<String>, q: QueryParams<StopQuery>) -> ApiResult<VmView> {
    let (vm, q) = (path(vm)?, query(q)?);
    let stopped = d.lifecycle.stop_vm(&vm, q.force).await?;
    Ok(Json(d.vms.vm_view(stopped)))
}

/// Query of `GET /v1/vms/{vm}/logs`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct LogsQuery {
    /// Only the last N lines.
    tail: Option<usize>,
}

/// A VM's serial console log.
#[utoipa::path(get, path = "/v1/vms/{vm}/logs", params(("vm" = String, Path, description = "name, id or id prefix"), LogsQuery),
    responses((status = 200, body = VmLogs), (status = 404, body = ApiError), (status = 400, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn vm_logs(State(d): Shared, vm: PathParams<String>, q: QueryParams<LogsQuery>) -> ApiResult<VmLogs> {
    let (vm, q) = (path(vm)?, query(q)?);
    Ok(Json(d.vms.logs(&vm, q.tail)?))
}

/// A VM's resource use.
#[utoipa::path(get, path = "/v1/vms/{vm}/stats", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = VmStats), (status = 404, body = ApiError), (status = 400, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn vm_stats(State(d): Shared, vm: PathParams<String>) -> ApiResult<VmStats> {
    Ok(Json(d.vms.stats(&path(vm)?).await?))
}

/// Sockets listening in a running VM.
#[utoipa::path(get, path = "/v1/vms/{vm}/ports", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = VmPorts), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 400, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn vm_ports(State(d): Shared, vm: PathParams<String>) -> ApiResult<VmPorts> {
    Ok(Json(d.vms.ports(&path(vm)?).await?))
}
