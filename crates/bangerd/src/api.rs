//! The HTTP/JSON API under `/v1`, served on the daemon's unix socket. Handlers are thin: they
//! parse, call a daemon method and map its answer. The OpenAPI document at
//! `GET /v1/openapi.json` is generated from these handlers' annotations and the wire types.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use banger_core::{ForwardProtocol, ImageRecord, KernelRecord, OperationRecord, PortForward};
use banger_proto::{
    ApiError, BuildImageRequest, ConfigView, CreateSnapshotRequest, CreateVmRequest, DaemonStatus, ForwardList,
    ForwardState, ForwardView, GitIdentity, GuestPort, ImageList, ImageRecipe, KernelList, OperationList,
    PromoteRequest, PullImageRequest, PullKernelRequest, RecipeFile, RegisterImageRequest, SnapshotList, SnapshotView,
    SshConfig, SshHost, SshInfo, StartVmRequest, UpdateVmRequest, VmList, VmLogs, VmPorts, VmStats, VmView,
};
use utoipa::OpenApi;

use crate::daemon::Daemon;
use crate::error::ApiFailure;

type Shared = State<Arc<Daemon>>;
type ApiResult<T> = Result<Json<T>, ApiFailure>;

/// The generated OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "bangerd", description = "banger's daemon API, served on a unix socket"),
    paths(
        health,
        shutdown,
        config,
        doctor,
        list_vms,
        create_vm,
        show_vm,
        update_vm,
        delete_vm,
        start_vm,
        stop_vm,
        pause_vm,
        resume_vm,
        snapshot_vm,
        list_snapshots,
        show_snapshot,
        delete_snapshot,
        vm_logs,
        vm_stats,
        vm_ports,
        vm_ssh,
        ssh_config,
        list_forwards,
        add_forward,
        remove_forward,
        list_kernels,
        pull_kernel,
        delete_kernel,
        list_images,
        build_image,
        delete_image,
        list_ops,
        show_op,
        cancel_op,
        openapi
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
        banger_core::SnapshotRecord
    ))
)]
pub struct ApiDoc;

/// The router, with the daemon as state.
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/daemon/shutdown", post(shutdown))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/config", get(config))
        .route("/v1/doctor", get(doctor))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{vm}", get(show_vm).patch(update_vm).delete(delete_vm))
        .route("/v1/vms/{vm}/exec", post(crate::exec::exec))
        .route("/v1/vms/{vm}/workspace/import", post(crate::workspace::import))
        .route("/v1/vms/{vm}/workspace/export", post(crate::workspace::export))
        .route("/v1/vms/{vm}/start", post(start_vm))
        .route("/v1/vms/{vm}/stop", post(stop_vm))
        .route("/v1/vms/{vm}/pause", post(pause_vm))
        .route("/v1/vms/{vm}/resume", post(resume_vm))
        .route("/v1/vms/{vm}/snapshot", post(snapshot_vm))
        .route("/v1/snapshots", get(list_snapshots))
        .route("/v1/snapshots/{snapshot}", get(show_snapshot).delete(delete_snapshot))
        .route("/v1/vms/{vm}/logs", get(vm_logs))
        .route("/v1/vms/{vm}/stats", get(vm_stats))
        .route("/v1/vms/{vm}/ports", get(vm_ports))
        .route("/v1/vms/{vm}/ssh", get(vm_ssh))
        .route("/v1/ssh/config", get(ssh_config))
        .route("/v1/vms/{vm}/forwards", get(list_forwards).post(add_forward))
        .route("/v1/vms/{vm}/forwards/{host_port}", axum::routing::delete(remove_forward))
        .route("/v1/kernels", get(list_kernels).post(pull_kernel))
        .route("/v1/kernels/{name}", axum::routing::delete(delete_kernel))
        .route("/v1/images", get(list_images).post(build_image))
        .route("/v1/images/{name}", get(show_image).delete(delete_image))
        .route("/v1/images/pull", post(pull_image))
        .route("/v1/images/register", post(register_image))
        .route("/v1/vms/{vm}/promote", post(promote_vm))
        .route("/v1/operations", get(list_ops))
        .route("/v1/operations/{op}", get(show_op))
        .route("/v1/operations/{op}/cancel", post(cancel_op))
        .merge(crate::sessions::routes())
        .fallback(|| async { ApiFailure::not_found("no such endpoint; see GET /v1/openapi.json") })
        .with_state(daemon)
}

fn body<T>(parsed: Result<Json<T>, JsonRejection>, what: &str) -> Result<T, ApiFailure> {
    parsed.map(|Json(v)| v).map_err(|rejection| {
        ApiFailure::invalid(format!(
            "invalid request body: {}; send a JSON {what} object (see GET /v1/openapi.json)",
            rejection.body_text()
        ))
    })
}

/// The daemon's status.
#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = DaemonStatus)))]
async fn health(State(d): Shared) -> ApiResult<DaemonStatus> {
    let pid = std::process::id();
    Ok(Json(DaemonStatus {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid,
        state_dir: d.layout.state_dir.display().to_string(),
        socket: d.layout.socket.display().to_string(),
        log_file: d.layout.log_file().display().to_string(),
        started_at: banger_core::time::format_rfc3339(d.started_at),
        uptime_secs: d.started_at.elapsed().map(|e| e.as_secs()).unwrap_or(0),
        vms: d.store.list_vms()?.len(),
        rss_kib: banger_host::process::rss_kib(pid),
    }))
}

/// Asks the daemon to shut down cleanly.
#[utoipa::path(post, path = "/v1/daemon/shutdown", responses((status = 202, description = "shutting down")))]
async fn shutdown(State(d): Shared) -> impl IntoResponse {
    tracing::info!("shutdown requested over the api");
    d.shutdown.notify_one();
    StatusCode::ACCEPTED
}

/// The configuration in force.
#[utoipa::path(get, path = "/v1/config", responses((status = 200, body = ConfigView)))]
async fn config(State(d): Shared) -> ApiResult<ConfigView> {
    Ok(Json(ConfigView {
        source: crate::config::describe_source(d.config_source.as_deref()),
        config: d.config.clone(),
    }))
}

/// The daemon's checks of this host, with the fix for anything missing.
#[utoipa::path(get, path = "/v1/doctor", responses((status = 200, body = banger_proto::DoctorReport)))]
async fn doctor(State(d): Shared) -> ApiResult<banger_proto::DoctorReport> {
    Ok(Json(crate::doctor::report(&d.layout, &d.config)))
}

/// Every VM.
#[utoipa::path(get, path = "/v1/vms", responses((status = 200, body = VmList)))]
async fn list_vms(State(d): Shared) -> ApiResult<VmList> {
    let vms = d.store.list_vms()?.into_iter().map(|vm| d.vm_view(vm)).collect();
    Ok(Json(VmList { vms }))
}

/// Starts creating a VM; answers with the operation to follow.
#[utoipa::path(post, path = "/v1/vms", request_body = CreateVmRequest, responses(
    (status = 202, body = OperationRecord), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
async fn create_vm(
    State(d): Shared,
    req: Result<Json<CreateVmRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiFailure> {
    let op = d.begin_create_vm(body(req, "CreateVmRequest")?)?;
    Ok((StatusCode::ACCEPTED, Json(op)))
}

/// One VM, by name, id or id prefix.
#[utoipa::path(get, path = "/v1/vms/{vm}", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = VmView), (status = 404, body = ApiError)))]
async fn show_vm(State(d): Shared, Path(vm): Path<String>) -> ApiResult<VmView> {
    Ok(Json(d.vm_view(d.store.find_vm(&vm)?)))
}

/// Changes a stopped VM.
#[utoipa::path(patch, path = "/v1/vms/{vm}", params(("vm" = String, Path, description = "name, id or id prefix")),
    request_body = UpdateVmRequest,
    responses((status = 200, body = VmView), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn update_vm(
    State(d): Shared,
    Path(vm): Path<String>,
    req: Result<Json<UpdateVmRequest>, JsonRejection>,
) -> ApiResult<VmView> {
    let updated = d.update_vm(&vm, body(req, "UpdateVmRequest")?).await?;
    Ok(Json(d.vm_view(updated)))
}

/// Deletes a stopped VM and its files.
#[utoipa::path(delete, path = "/v1/vms/{vm}", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = VmView), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn delete_vm(State(d): Shared, Path(vm): Path<String>) -> ApiResult<VmView> {
    let deleted = d.delete_vm(&vm).await?;
    Ok(Json(d.vm_view(deleted)))
}

/// Boots a VM; answers with the operation to follow. The body is optional.
#[utoipa::path(post, path = "/v1/vms/{vm}/start", params(("vm" = String, Path, description = "name, id or id prefix")),
    request_body(content = StartVmRequest, description = "optional: no body is the same as `{}`"),
    responses((status = 202, body = OperationRecord), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn start_vm(
    State(d): Shared,
    Path(vm): Path<String>,
    raw: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiFailure> {
    let req: StartVmRequest = if raw.iter().all(u8::is_ascii_whitespace) {
        StartVmRequest::default()
    } else {
        serde_json::from_slice(&raw).map_err(|e| {
            ApiFailure::invalid(format!(
                "invalid request body: {e}; send a JSON StartVmRequest object or nothing (see GET /v1/openapi.json)"
            ))
        })?
    };
    let git = crate::ssh::check_git_identity(req.git_identity)?;
    Ok((StatusCode::ACCEPTED, Json(d.begin_start_vm(&vm, git)?)))
}

/// Query of `POST /v1/vms/{vm}/stop`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
struct StopQuery {
    /// Do not ask the guest: quit the VMM at once (its disks may be left unclean).
    #[serde(default)]
    force: bool,
}

/// Stops a VM: agent power-off, then VMM quit, then kill. Answers once it is stopped.
#[utoipa::path(post, path = "/v1/vms/{vm}/stop", params(("vm" = String, Path, description = "name, id or id prefix"), StopQuery),
    responses((status = 200, body = VmView), (status = 404, body = ApiError)))]
async fn stop_vm(State(d): Shared, Path(vm): Path<String>, Query(q): Query<StopQuery>) -> ApiResult<VmView> {
    let stopped = d.stop_vm(&vm, q.force).await?;
    Ok(Json(d.vm_view(stopped)))
}

/// Pauses a running VM's vCPUs.
#[utoipa::path(post, path = "/v1/vms/{vm}/pause", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = VmView), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn pause_vm(State(d): Shared, Path(vm): Path<String>) -> ApiResult<VmView> {
    let paused = d.pause_vm(&vm).await?;
    Ok(Json(d.vm_view(paused)))
}

/// Resumes a paused VM and sets its clock.
#[utoipa::path(post, path = "/v1/vms/{vm}/resume", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = VmView), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn resume_vm(State(d): Shared, Path(vm): Path<String>) -> ApiResult<VmView> {
    let resumed = d.resume_vm(&vm).await?;
    Ok(Json(d.vm_view(resumed)))
}

/// Takes a memory snapshot of a running or paused VM (memory, device state and disks); the
/// guest is paused meanwhile and resumed after, unless it was paused before. The body is optional.
#[utoipa::path(post, path = "/v1/vms/{vm}/snapshot", params(("vm" = String, Path, description = "name, id or id prefix")),
    request_body(content = CreateSnapshotRequest, description = "optional: no body is the same as `{}`"),
    responses((status = 201, body = SnapshotView), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn snapshot_vm(
    State(d): Shared,
    Path(vm): Path<String>,
    raw: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiFailure> {
    let req: CreateSnapshotRequest = if raw.iter().all(u8::is_ascii_whitespace) {
        CreateSnapshotRequest::default()
    } else {
        serde_json::from_slice(&raw).map_err(|e| {
            ApiFailure::invalid(format!(
                "invalid request body: {e}; send a JSON CreateSnapshotRequest object or nothing (see GET /v1/openapi.json)"
            ))
        })?
    };
    Ok((StatusCode::CREATED, Json(d.snapshot_vm(&vm, req.name).await?)))
}

/// Every memory snapshot.
#[utoipa::path(get, path = "/v1/snapshots", responses((status = 200, body = SnapshotList)))]
async fn list_snapshots(State(d): Shared) -> ApiResult<SnapshotList> {
    Ok(Json(SnapshotList { snapshots: d.list_snapshots()? }))
}

fn snapshot_not_found(e: banger_store::StoreError, reference: &str) -> ApiFailure {
    match e {
        banger_store::StoreError::NotFound { .. } => {
            ApiFailure::not_found(format!("no snapshot '{reference}'; see `banger snapshot list`"))
        }
        e => e.into(),
    }
}

/// One snapshot, by name, id or id prefix.
#[utoipa::path(get, path = "/v1/snapshots/{snapshot}", params(("snapshot" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = SnapshotView), (status = 404, body = ApiError)))]
async fn show_snapshot(State(d): Shared, Path(snapshot): Path<String>) -> ApiResult<SnapshotView> {
    let record = d.store.find_snapshot(&snapshot).map_err(|e| snapshot_not_found(e, &snapshot))?;
    Ok(Json(d.snapshot_view(record)?))
}

/// Deletes a snapshot and its files; refused (409) while VMs started from it exist.
#[utoipa::path(delete, path = "/v1/snapshots/{snapshot}", params(("snapshot" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = SnapshotView), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn delete_snapshot(State(d): Shared, Path(snapshot): Path<String>) -> ApiResult<SnapshotView> {
    if let Err(e) = d.store.find_snapshot(&snapshot) {
        return Err(snapshot_not_found(e, &snapshot));
    }
    Ok(Json(d.delete_snapshot(&snapshot).await?))
}

/// Query of `GET /v1/vms/{vm}/logs`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
struct LogsQuery {
    /// Only the last N lines.
    tail: Option<usize>,
}

/// A VM's serial console log.
#[utoipa::path(get, path = "/v1/vms/{vm}/logs", params(("vm" = String, Path, description = "name, id or id prefix"), LogsQuery),
    responses((status = 200, body = VmLogs), (status = 404, body = ApiError)))]
async fn vm_logs(State(d): Shared, Path(vm): Path<String>, Query(q): Query<LogsQuery>) -> ApiResult<VmLogs> {
    let vm = d.store.find_vm(&vm)?;
    let path = vm.paths().console_log;
    let text = match q.tail {
        Some(n) => crate::lifecycle::tail_lines(std::path::Path::new(&path), n) + "\n",
        None => std::fs::read(&path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default(),
    };
    Ok(Json(VmLogs { path, text }))
}

/// A VM's resource use.
#[utoipa::path(get, path = "/v1/vms/{vm}/stats", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = VmStats), (status = 404, body = ApiError)))]
async fn vm_stats(State(d): Shared, Path(vm): Path<String>) -> ApiResult<VmStats> {
    let vm = d.store.find_vm(&vm)?;
    let running = d.handles.alive(&vm);
    let pid = d.handles.get(&vm).and_then(|h| h.pid).filter(|_| running);
    let driver = d.driver(vm.spec.vmm);
    let stats = pid.and_then(|p| driver.stats(p).ok());
    let control = d.handles.get(&vm).and_then(|h| h.control_socket).filter(|_| running);
    let vmm_metrics = match control {
        Some(socket) => driver.metrics(std::path::Path::new(&vm.vm_dir), std::path::Path::new(&socket)).await,
        None => None,
    };
    let uptime_secs = pid
        .and_then(|p| std::fs::metadata(format!("/proc/{p}")).ok())
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.elapsed().ok())
        .map(|e| e.as_secs());
    Ok(Json(VmStats {
        name: vm.name,
        running,
        pid,
        cpu_time_ms: stats.map(|s| s.cpu_time_ms),
        rss_kib: stats.map(|s| s.rss_kib),
        uptime_secs,
        vmm_metrics,
    }))
}

/// Sockets listening in a running VM.
#[utoipa::path(get, path = "/v1/vms/{vm}/ports", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = VmPorts), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn vm_ports(State(d): Shared, Path(vm): Path<String>) -> ApiResult<VmPorts> {
    let name = d.store.find_vm(&vm)?.name;
    let agent = d.running_agent(&vm)?;
    let answer = agent
        .call(&banger_proto::agent::AgentRequest::Ports, std::time::Duration::from_secs(10))
        .await
        .map_err(|e| ApiFailure::internal(format!("cannot list ports of vm '{name}': {}", crate::error::chain(&e))))?;
    let banger_proto::agent::AgentResponse::Ports { ports } = answer else {
        return Err(ApiFailure::internal(format!("unexpected answer from the agent of vm '{name}': {answer:?}")));
    };
    let ports = ports.into_iter().map(|p| GuestPort { proto: p.proto, address: p.address, port: p.port }).collect();
    Ok(Json(VmPorts { name, ports }))
}

/// How to reach a running VM with `ssh`: address, user, the installation key and the pinned
/// host key. 409 when the VM has no network address or is not running.
#[utoipa::path(get, path = "/v1/vms/{vm}/ssh", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = SshInfo), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn vm_ssh(State(d): Shared, Path(vm): Path<String>) -> ApiResult<SshInfo> {
    Ok(Json(d.ssh_info(&vm)?))
}

/// Every VM as an ssh_config host (for `banger ssh-config`).
#[utoipa::path(get, path = "/v1/ssh/config", responses((status = 200, body = SshConfig)))]
async fn ssh_config(State(d): Shared) -> ApiResult<SshConfig> {
    Ok(Json(d.ssh_config()?))
}

/// A VM's port forwards and whether each listens now.
#[utoipa::path(get, path = "/v1/vms/{vm}/forwards", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = ForwardList), (status = 404, body = ApiError)))]
async fn list_forwards(State(d): Shared, Path(vm): Path<String>) -> ApiResult<ForwardList> {
    Ok(Json(d.list_forwards(&vm)?))
}

/// Adds a port forward to a VM. It is recorded and listens whenever the VM runs; when the VM
/// runs now it listens at once, and a host address that cannot be bound refuses it (409 when
/// the address is in use, 400 otherwise) without recording it.
#[utoipa::path(post, path = "/v1/vms/{vm}/forwards", params(("vm" = String, Path, description = "name, id or id prefix")),
    request_body = PortForward,
    responses((status = 201, body = ForwardView), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = 409, body = ApiError)))]
async fn add_forward(
    State(d): Shared,
    Path(vm): Path<String>,
    req: Result<Json<PortForward>, JsonRejection>,
) -> Result<impl IntoResponse, ApiFailure> {
    let view = d.add_forward(&vm, body(req, "PortForward")?).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Query of `DELETE /v1/vms/{vm}/forwards/{host_port}`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
struct RemoveForwardQuery {
    /// The forward's host address; needed only when the VM forwards that port on several.
    host_addr: Option<String>,
}

/// Removes a VM's port forward (and stops its listener).
#[utoipa::path(delete, path = "/v1/vms/{vm}/forwards/{host_port}",
    params(("vm" = String, Path, description = "name, id or id prefix"), ("host_port" = u16, Path, description = "host port"),
        RemoveForwardQuery),
    responses((status = 200, body = ForwardView), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
async fn remove_forward(
    State(d): Shared,
    Path((vm, host_port)): Path<(String, String)>,
    Query(q): Query<RemoveForwardQuery>,
) -> ApiResult<ForwardView> {
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
    Ok(Json(d.remove_forward(&vm, host_port, host_addr).await?))
}

/// Pulled kernels and the catalog's names.
#[utoipa::path(get, path = "/v1/kernels", responses((status = 200, body = KernelList)))]
async fn list_kernels(State(d): Shared) -> ApiResult<KernelList> {
    let catalog = banger_image::catalog::KERNELS.iter().map(|k| k.name.to_owned()).collect();
    Ok(Json(KernelList { kernels: d.store.list_kernels()?, catalog }))
}

/// Pulls a kernel; answers with the operation to follow.
#[utoipa::path(post, path = "/v1/kernels", request_body = PullKernelRequest,
    responses((status = 202, body = OperationRecord), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
async fn pull_kernel(
    State(d): Shared,
    req: Result<Json<PullKernelRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiFailure> {
    Ok((StatusCode::ACCEPTED, Json(d.begin_pull_kernel(body(req, "PullKernelRequest")?)?)))
}

/// Deletes a kernel no VM uses.
#[utoipa::path(delete, path = "/v1/kernels/{name}", params(("name" = String, Path, description = "kernel name")),
    responses((status = 200, body = KernelRecord), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn delete_kernel(State(d): Shared, Path(name): Path<String>) -> ApiResult<KernelRecord> {
    Ok(Json(d.delete_kernel(&name)?))
}

/// Local images and the catalog's names.
#[utoipa::path(get, path = "/v1/images", responses((status = 200, body = ImageList)))]
async fn list_images(State(d): Shared) -> ApiResult<ImageList> {
    let catalog = banger_image::catalog::IMAGES.iter().map(|i| i.name.to_owned()).collect();
    Ok(Json(ImageList { images: d.store.list_images()?, catalog }))
}

/// Builds a catalog image; answers with the operation to follow.
#[utoipa::path(post, path = "/v1/images", request_body = BuildImageRequest,
    responses((status = 202, body = OperationRecord), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
async fn build_image(
    State(d): Shared,
    req: Result<Json<BuildImageRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiFailure> {
    Ok((StatusCode::ACCEPTED, Json(d.begin_build_image(body(req, "BuildImageRequest")?)?)))
}

/// Pulls an OCI image; answers with the operation to follow.
#[utoipa::path(post, path = "/v1/images/pull", request_body = PullImageRequest,
    responses((status = 202, body = OperationRecord), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
async fn pull_image(
    State(d): Shared,
    req: Result<Json<PullImageRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiFailure> {
    Ok((StatusCode::ACCEPTED, Json(d.begin_pull_image(body(req, "PullImageRequest")?)?)))
}

/// Registers an ext4 file as an image; answers with the operation to follow.
#[utoipa::path(post, path = "/v1/images/register", request_body = RegisterImageRequest,
    responses((status = 202, body = OperationRecord), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
async fn register_image(
    State(d): Shared,
    req: Result<Json<RegisterImageRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiFailure> {
    Ok((StatusCode::ACCEPTED, Json(d.begin_register_image(body(req, "RegisterImageRequest")?)?)))
}

/// Makes a stopped VM's root a new image; answers with the operation to follow.
#[utoipa::path(post, path = "/v1/vms/{vm}/promote", params(("vm" = String, Path, description = "name, id or id prefix")),
    request_body = PromoteRequest,
    responses((status = 202, body = OperationRecord), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn promote_vm(
    State(d): Shared,
    Path(vm): Path<String>,
    req: Result<Json<PromoteRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiFailure> {
    let req = body(req, "PromoteRequest")?;
    Ok((StatusCode::ACCEPTED, Json(d.begin_promote(&vm, &req.name).await?)))
}

/// One image.
#[utoipa::path(get, path = "/v1/images/{name}", params(("name" = String, Path, description = "image name")),
    responses((status = 200, body = ImageRecord), (status = 404, body = ApiError)))]
async fn show_image(State(d): Shared, Path(name): Path<String>) -> ApiResult<ImageRecord> {
    let image = d.store.get_image(&name)?;
    Ok(Json(image.ok_or_else(|| ApiFailure::not_found(format!("no image '{name}'; see `banger image list`")))?))
}

/// Deletes an image no VM uses.
#[utoipa::path(delete, path = "/v1/images/{name}", params(("name" = String, Path, description = "image name")),
    responses((status = 200, body = ImageRecord), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn delete_image(State(d): Shared, Path(name): Path<String>) -> ApiResult<ImageRecord> {
    Ok(Json(d.delete_image(&name)?))
}

/// Every kept operation.
#[utoipa::path(get, path = "/v1/operations", responses((status = 200, body = OperationList)))]
async fn list_ops(State(d): Shared) -> ApiResult<OperationList> {
    Ok(Json(OperationList { operations: d.ops.list()? }))
}

/// Query of `GET /v1/operations/{op}`: a long poll when `wait_ms` is given.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
struct ShowOpQuery {
    /// Answer once the operation differs from what the caller has seen (more stages or
    /// warnings, or it ended), or after this many milliseconds (at most 10,000).
    wait_ms: Option<u64>,
    /// How many stages the caller has seen.
    #[serde(default)]
    stages: usize,
    /// How many warnings the caller has seen.
    #[serde(default)]
    warnings: usize,
}

/// One operation, by id or id prefix.
#[utoipa::path(get, path = "/v1/operations/{op}", params(("op" = String, Path, description = "id or id prefix"), ShowOpQuery),
    responses((status = 200, body = OperationRecord), (status = 404, body = ApiError)))]
async fn show_op(State(d): Shared, Path(op): Path<String>, Query(q): Query<ShowOpQuery>) -> ApiResult<OperationRecord> {
    match q.wait_ms {
        Some(ms) => {
            let wait = std::time::Duration::from_millis(ms.min(10_000));
            Ok(Json(d.ops.wait_change(&op, (q.stages, q.warnings), wait).await?))
        }
        None => Ok(Json(d.ops.get(&op)?)),
    }
}

/// Requests cancellation of a running operation.
#[utoipa::path(post, path = "/v1/operations/{op}/cancel", params(("op" = String, Path, description = "id or id prefix")),
    responses((status = 200, body = OperationRecord), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn cancel_op(State(d): Shared, Path(op): Path<String>) -> ApiResult<OperationRecord> {
    Ok(Json(d.ops.cancel(&op)?))
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "the OpenAPI document")))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(document())
}

/// The whole OpenAPI document: these routes and the session routes.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(crate::sessions::SessionsApi::openapi());
    doc
}

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
            "/v1/openapi.json",
        ] {
            assert!(paths.iter().any(|k| *k == p), "{p} missing from {paths:?}");
        }
        let json = serde_json::to_string(&doc).expect("serialise");
        assert!(json.contains("CreateVmRequest") && json.contains("OperationRecord"));
    }
}
