//! Operation routes: list, show (optionally a long poll) and cancel.

use axum::extract::State;
use axum::Json;
use banger_proto::{ApiError, OperationList, OperationRecord};

use super::{path, query, ApiResult, PathParams, QueryParams, Shared};

/// Every kept operation.
#[utoipa::path(get, path = "/v1/operations", responses((status = 200, body = OperationList), (status = 500, body = ApiError)))]
pub(super) async fn list_ops(State(d): Shared) -> ApiResult<OperationList> {
    Ok(Json(OperationList { operations: d.fleet.ops.list()?.into_iter().map(Into::into).collect() }))
}

/// Query of `GET /v1/operations/{op}`: a long poll when `wait_ms` is given.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ShowOpQuery {
    /// Answer once the operation differs from what the caller has seen (more stages or
    /// warnings, or it ended), or after this many milliseconds (at most 10,000).
    wait_ms: Option<u64>,
    /// How many stages the caller has seen.
    #[serde(default)]
    stages: usize,
    /// How many warnings and output lines the caller has seen.
    #[serde(default)]
    warnings: usize,
}

/// One operation, by id or id prefix.
#[utoipa::path(get, path = "/v1/operations/{op}", params(("op" = String, Path, description = "id or id prefix"), ShowOpQuery),
    responses((status = 200, body = OperationRecord), (status = 404, body = ApiError), (status = 400, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn show_op(
    State(d): Shared,
    op: PathParams<String>,
    q: QueryParams<ShowOpQuery>,
) -> ApiResult<OperationRecord> {
    let (op, q) = (path(op)?, query(q)?);
    match q.wait_ms {
        Some(ms) => {
            let wait = std::time::Duration::from_millis(ms.min(10_000));
            Ok(Json(d.fleet.ops.wait_change(&op, (q.stages, q.warnings), wait).await?.into()))
        }
        None => Ok(Json(d.fleet.ops.get(&op)?.into())),
    }
}

/// Requests cancellation of a running operation.
#[utoipa::path(post, path = "/v1/operations/{op}/cancel", params(("op" = String, Path, description = "id or id prefix")),
    responses((status = 200, body = OperationRecord), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 400, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn cancel_op(State(d): Shared, op: PathParams<String>) -> ApiResult<OperationRecord> {
    Ok(Json(d.fleet.ops.cancel(&path(op)?)?.into()))
}
