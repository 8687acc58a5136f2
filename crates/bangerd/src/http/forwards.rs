//! Port forward routes: list, add and remove a VM's forwards.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use banger_proto::{ApiError, ForwardList, ForwardView, PortForward};

use super::{body, path, query, ApiFailure, ApiResult, CallerOf, PathParams, QueryParams, Shared};

/// A VM's port forwards and whether each listens now.
#[utoipa::path(get, path = "/v1/vms/{vm}/forwards", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = ForwardList), (status = 404, body = ApiError), (status = 400, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn list_forwards(State(d): Shared, vm: PathParams<String>) -> ApiResult<ForwardList> {
    Ok(Json(d.forwards.list(&path(vm)?)?))
}

/// Adds a port forward to a VM. It is recorded and listens whenever the VM runs; when the VM
/// runs now it listens at once, and a host address that cannot be bound refuses it (409 when
/// the address is in use, 400 otherwise) without recording it.
#[utoipa::path(post, path = "/v1/vms/{vm}/forwards", params(("vm" = String, Path, description = "name, id or id prefix")),
    request_body = PortForward,
    responses((status = 201, body = ForwardView), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn add_forward(
    State(d): Shared,
    CallerOf(caller): CallerOf,
    vm: PathParams<String>,
    req: Result<Json<PortForward>, JsonRejection>,
) -> Result<impl IntoResponse, ApiFailure> {
    let vm = path(vm)?;
    let forward = body(req, "PortForward")?;
    caller.check_port(forward.host_port)?;
    let view = d.forwards.add(&vm, forward.into()).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Query of `DELETE /v1/vms/{vm}/forwards/{host_port}`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct RemoveForwardQuery {
    /// The forward's host address; needed only when the VM forwards that port on several.
    host_addr: Option<String>,
}

/// Removes a VM's port forward (and stops its listener).
#[utoipa::path(delete, path = "/v1/vms/{vm}/forwards/{host_port}",
    params(("vm" = String, Path, description = "name, id or id prefix"), ("host_port" = u16, Path, description = "host port"),
        RemoveForwardQuery),
    responses((status = 200, body = ForwardView), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn remove_forward(
    State(d): Shared,
    params: PathParams<(String, String)>,
    q: QueryParams<RemoveForwardQuery>,
) -> ApiResult<ForwardView> {
    let ((vm, host_port), q) = (path(params)?, query(q)?);
    let host_port: u16 = host_port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiFailure::invalid(format!("host port '{host_port}' is not a number from 1 to 65535")))?;
    let host_addr = q
        .host_addr
        .map(|a| {
            let bare = a.trim_start_matches('[').trim_end_matches(']');
            bare.parse().map_err(|_| ApiFailure::invalid(format!("host_addr '{a}' is not an IP address")))
        })
        .transpose()?;
    Ok(Json(d.forwards.remove(&vm, host_port, host_addr).await?))
}
