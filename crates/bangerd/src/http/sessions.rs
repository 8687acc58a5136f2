//! Session routes: start, list, show, stop and kill (the streams, logs and attach, are in
//! `attach.rs`).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use banger_proto::{ApiError, SessionList, SessionView, StartSessionRequest};

use super::{body, path, query, ApiFailure, PathParams, QueryParams, Shared};
use crate::daemon::Daemon;

/// The session routes.
pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/v1/vms/{vm}/sessions", get(list_sessions).post(start_session))
        .route("/v1/vms/{vm}/sessions/{session}", get(show_session))
        .route("/v1/vms/{vm}/sessions/{session}/stop", post(stop_session))
        .route("/v1/vms/{vm}/sessions/{session}/kill", post(kill_session))
        .route("/v1/vms/{vm}/sessions/{session}/logs", get(super::attach::logs))
        .route("/v1/vms/{vm}/sessions/{session}/attach", post(super::attach::attach))
}

/// A running VM's sessions.
#[utoipa::path(get, path = "/v1/vms/{vm}/sessions", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = SessionList), (status = 404, body = ApiError), (status = 400, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn list_sessions(State(d): Shared, vm: PathParams<String>) -> Result<Json<SessionList>, ApiFailure> {
    Ok(Json(d.sessions.list(&path(vm)?).await?))
}

/// Starts a session in a running VM. A launch the guest refused (missing working directory or
/// command, ...) is recorded too and answered with status `failed` and its `launch_stage`.
#[utoipa::path(post, path = "/v1/vms/{vm}/sessions", params(("vm" = String, Path, description = "name, id or id prefix")),
    request_body = StartSessionRequest,
    responses((status = 201, body = SessionView), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn start_session(
    State(d): Shared,
    vm: PathParams<String>,
    req: Result<Json<StartSessionRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiFailure> {
    let vm = path(vm)?;
    let req = body(req, "StartSessionRequest")?;
    Ok((StatusCode::CREATED, Json(d.sessions.start(&vm, req).await?)))
}

/// One session, by name, id or id prefix.
#[utoipa::path(get, path = "/v1/vms/{vm}/sessions/{session}",
    params(("vm" = String, Path, description = "name, id or id prefix"), ("session" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = SessionView), (status = 404, body = ApiError), (status = 400, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn show_session(
    State(d): Shared,
    params: PathParams<(String, String)>,
) -> Result<Json<SessionView>, ApiFailure> {
    let (vm, session) = path(params)?;
    Ok(Json(d.sessions.show(&vm, &session).await?))
}

/// Query of the stop and kill routes.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct SignalQuery {
    /// Wait up to this many seconds for the session to end [default: 0, at most 120].
    #[serde(default)]
    wait_secs: u64,
}

/// Sends SIGTERM to a session's process group (a session that has ended is answered as it is).
#[utoipa::path(post, path = "/v1/vms/{vm}/sessions/{session}/stop",
    params(("vm" = String, Path, description = "name, id or id prefix"), ("session" = String, Path, description = "name, id or id prefix"), SignalQuery),
    responses((status = 200, body = SessionView), (status = 404, body = ApiError), (status = 400, body = ApiError),
        (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn stop_session(
    State(d): Shared,
    params: PathParams<(String, String)>,
    q: QueryParams<SignalQuery>,
) -> Result<Json<SessionView>, ApiFailure> {
    let ((vm, session), q) = (path(params)?, query(q)?);
    Ok(Json(d.sessions.signal(&vm, &session, libc_signal::TERM, q.wait_secs).await?))
}

/// Sends SIGKILL to a session's process group.
#[utoipa::path(post, path = "/v1/vms/{vm}/sessions/{session}/kill",
    params(("vm" = String, Path, description = "name, id or id prefix"), ("session" = String, Path, description = "name, id or id prefix"), SignalQuery),
    responses((status = 200, body = SessionView), (status = 404, body = ApiError), (status = 400, body = ApiError),
        (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn kill_session(
    State(d): Shared,
    params: PathParams<(String, String)>,
    q: QueryParams<SignalQuery>,
) -> Result<Json<SessionView>, ApiFailure> {
    let ((vm, session), q) = (path(params)?, query(q)?);
    Ok(Json(d.sessions.signal(&vm, &session, libc_signal::KILL, q.wait_secs).await?))
}

/// The two signals sessions are sent.
mod libc_signal {
    pub const TERM: i32 = 15;
    pub const KILL: i32 = 9;
}
