//! The daemon's own routes: health, shutdown, the configuration in force and this document.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use banger_proto::{ApiError, ConfigView, DaemonStatus, DoctorReport};

use super::{ApiResult, Shared};

/// The daemon's status.
#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = DaemonStatus), (status = 500, body = ApiError)))]
pub(super) async fn health(State(d): Shared) -> ApiResult<DaemonStatus> {
    let pid = std::process::id();
    let layout = &d.fleet.layout;
    Ok(Json(DaemonStatus {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid,
        state_dir: layout.state_dir.display().to_string(),
        socket: layout.socket.display().to_string(),
        log_file: layout.log_file().display().to_string(),
        started_at: banger_core::time::format_rfc3339(d.started_at),
        uptime_secs: d.started_at.elapsed().map(|e| e.as_secs()).unwrap_or(0),
        vms: d.fleet.store.list_vms()?.len(),
        rss_kib: banger_host::process::rss_kib(pid),
    }))
}

/// Asks the daemon to shut down cleanly.
#[utoipa::path(post, path = "/v1/daemon/shutdown", responses((status = 202, description = "shutting down")))]
pub(super) async fn shutdown(State(d): Shared) -> impl IntoResponse {
    tracing::info!("shutdown requested over the api");
    d.shutdown.notify_one();
    StatusCode::ACCEPTED
}

/// The configuration in force.
#[utoipa::path(get, path = "/v1/config", responses((status = 200, body = ConfigView)))]
pub(super) async fn config(State(d): Shared) -> ApiResult<ConfigView> {
    Ok(Json(ConfigView {
        source: crate::config::describe_source(d.config_source.as_deref()),
        config: d.fleet.config.clone().into(),
    }))
}

/// The daemon's checks of this host, with the fix for anything missing.
#[utoipa::path(get, path = "/v1/doctor", responses((status = 200, body = DoctorReport)))]
pub(super) async fn doctor(State(d): Shared) -> ApiResult<DoctorReport> {
    let mut report = crate::services::doctor::report(&d.fleet.layout, &d.fleet.config);
    report.checks.push(super::web::doctor_check(&d));
    let kernels = d.fleet.store.list_kernels().unwrap_or_default();
    report.checks.extend(crate::services::doctor::balloon_check(&d.fleet.config, &kernels));
    Ok(Json(report))
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "the OpenAPI document")))]
pub(super) async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(super::document())
}
