//! Egress routes: a VM's policy (read, change) and its denial log.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Json;
use banger_proto::{ApiError, EgressLog, EgressView, SetEgressRequest};

use super::{body, path, query, ApiResult, PathParams, QueryParams, Shared};

/// A VM's egress policy, whether it is in force, and the addresses DNS answers opened.
#[utoipa::path(get, path = "/v1/vms/{vm}/network", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = EgressView), (status = 404, body = ApiError), (status = 400, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn show_network(State(d): Shared, vm: PathParams<String>) -> ApiResult<EgressView> {
    let vm = d.fleet.store.find_vm(&path(vm)?)?;
    Ok(Json(d.net.egress_view(&vm)?))
}

/// Changes a VM's egress policy; on a running VM it is in force when this answers.
#[utoipa::path(put, path = "/v1/vms/{vm}/network", params(("vm" = String, Path, description = "name, id or id prefix")),
    request_body = SetEgressRequest,
    responses((status = 200, body = EgressView), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn set_network(
    State(d): Shared,
    vm: PathParams<String>,
    req: Result<Json<SetEgressRequest>, JsonRejection>,
) -> ApiResult<EgressView> {
    let vm = d.fleet.store.find_vm(&path(vm)?)?;
    Ok(Json(d.net.set_egress(&vm, body(req, "SetEgressRequest")?).await?))
}

/// Query of `GET /v1/vms/{vm}/network/log`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct LogQuery {
    /// Only denials with a larger `seq` (the previous answer's `next`).
    #[serde(default)]
    after: u64,
    /// Wait up to this many milliseconds (at most 10,000) for a denial when there is none.
    #[serde(default)]
    wait_ms: u64,
}

/// A running VM's recent egress denials (a bounded ring; empty once it stops).
#[utoipa::path(get, path = "/v1/vms/{vm}/network/log",
    params(("vm" = String, Path, description = "name, id or id prefix"), LogQuery),
    responses((status = 200, body = EgressLog), (status = 404, body = ApiError), (status = 400, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn network_log(
    State(d): Shared,
    vm: PathParams<String>,
    q: QueryParams<LogQuery>,
) -> ApiResult<EgressLog> {
    let (vm, q) = (d.fleet.store.find_vm(&path(vm)?)?, query(q)?);
    let wait = std::time::Duration::from_millis(q.wait_ms.min(10_000));
    Ok(Json(d.net.egress_log(&vm, q.after, wait).await))
}
