//! SSH routes: how to reach one VM, and every VM as an ssh_config host.

use axum::extract::State;
use axum::Json;
use banger_proto::{ApiError, SshConfig, SshInfo};

use super::{path, ApiResult, PathParams, Shared};

/// How to reach a running VM with `ssh`: address, user, the installation key and the pinned
/// host key. 409 when the VM has no network address or is not running.
#[utoipa::path(get, path = "/v1/vms/{vm}/ssh", params(("vm" = String, Path, description = "name, id or id prefix")),
    responses((status = 200, body = SshInfo), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 400, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn vm_ssh(State(d): Shared, vm: PathParams<String>) -> ApiResult<SshInfo> {
    Ok(Json(d.ssh.ssh_info(&path(vm)?)?))
}

/// Every VM as an ssh_config host (for `banger ssh-config`).
#[utoipa::path(get, path = "/v1/ssh/config", responses((status = 200, body = SshConfig), (status = 500, body = ApiError)))]
pub(super) async fn ssh_config(State(d): Shared) -> ApiResult<SshConfig> {
    Ok(Json(d.ssh.ssh_config()?))
}
