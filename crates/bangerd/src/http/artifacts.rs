//! Kernel and image routes: list, pull, build, register, promote, show and delete.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use banger_proto::{
    ApiError, BuildImageRequest, ImageList, ImageRecord, KernelList, KernelRecord, OperationRecord, PromoteRequest,
    PullImageRequest, PullKernelRequest, RegisterImageRequest,
};

use super::{accepted, body, path, ApiFailure, ApiResult, CallerOf, PathParams, Shared};

/// Pulled kernels and the catalog's names.
#[utoipa::path(get, path = "/v1/kernels", responses((status = 200, body = KernelList), (status = 500, body = ApiError)))]
pub(super) async fn list_kernels(State(d): Shared) -> ApiResult<KernelList> {
    let catalog = banger_image::catalog::KERNELS.iter().map(|k| k.name.to_owned()).collect();
    let kernels = d.fleet.store.list_kernels()?.into_iter().map(Into::into).collect();
    Ok(Json(KernelList { kernels, catalog }))
}

/// Pulls a kernel; answers with the operation to follow.
#[utoipa::path(post, path = "/v1/kernels", request_body = PullKernelRequest,
    responses((status = 202, body = OperationRecord), (status = 400, body = ApiError), (status = 409, body = ApiError),
        (status = 404, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn pull_kernel(
    State(d): Shared,
    req: Result<Json<PullKernelRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiFailure> {
    Ok(accepted(d.artifacts.begin_pull_kernel(body(req, "PullKernelRequest")?)?))
}

/// Deletes a kernel no VM uses.
#[utoipa::path(delete, path = "/v1/kernels/{name}", params(("name" = String, Path, description = "kernel name")),
    responses((status = 200, body = KernelRecord), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 400, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn delete_kernel(State(d): Shared, name: PathParams<String>) -> ApiResult<KernelRecord> {
    Ok(Json(d.artifacts.delete_kernel(&path(name)?)?.into()))
}

/// Local images and the catalog's names.
#[utoipa::path(get, path = "/v1/images", responses((status = 200, body = ImageList), (status = 500, body = ApiError)))]
pub(super) async fn list_images(State(d): Shared) -> ApiResult<ImageList> {
    let catalog = banger_image::catalog::image_names().into_iter().map(str::to_owned).collect();
    let images = d.fleet.store.list_images()?.into_iter().map(Into::into).collect();
    Ok(Json(ImageList { images, catalog }))
}

/// Builds an image (catalog recipe, the caller's recipe or a Dockerfile); answers with the
/// operation to follow.
#[utoipa::path(post, path = "/v1/images", request_body = BuildImageRequest,
    responses((status = 202, body = OperationRecord), (status = 400, body = ApiError), (status = 409, body = ApiError),
        (status = 404, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn build_image(
    State(d): Shared,
    CallerOf(caller): CallerOf,
    req: Result<Json<BuildImageRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiFailure> {
    let req = body(req, "BuildImageRequest")?;
    if req.dockerfile.is_some() {
        return Ok(accepted(d.artifacts.begin_build_dockerfile(req, caller)?));
    }
    Ok(accepted(d.artifacts.begin_build_image(req)?))
}

/// Pulls an OCI image; answers with the operation to follow.
#[utoipa::path(post, path = "/v1/images/pull", request_body = PullImageRequest,
    responses((status = 202, body = OperationRecord), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn pull_image(
    State(d): Shared,
    req: Result<Json<PullImageRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiFailure> {
    Ok(accepted(d.artifacts.begin_pull_image(body(req, "PullImageRequest")?)?))
}

/// Registers an ext4 file as an image; answers with the operation to follow.
#[utoipa::path(post, path = "/v1/images/register", request_body = RegisterImageRequest,
    responses((status = 202, body = OperationRecord), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn register_image(
    State(d): Shared,
    CallerOf(caller): CallerOf,
    req: Result<Json<RegisterImageRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiFailure> {
    Ok(accepted(d.artifacts.begin_register_image(body(req, "RegisterImageRequest")?, caller)?))
}

/// Makes a stopped VM's root a new image; answers with the operation to follow.
#[utoipa::path(post, path = "/v1/vms/{vm}/promote", params(("vm" = String, Path, description = "name, id or id prefix")),
    request_body = PromoteRequest,
    responses((status = 202, body = OperationRecord), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn promote_vm(
    State(d): Shared,
    vm: PathParams<String>,
    req: Result<Json<PromoteRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiFailure> {
    let vm = path(vm)?;
    let req = body(req, "PromoteRequest")?;
    Ok(accepted(d.artifacts.begin_promote(&vm, &req.name).await?))
}

/// One image.
#[utoipa::path(get, path = "/v1/images/{name}", params(("name" = String, Path, description = "image name")),
    responses((status = 200, body = ImageRecord), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = 500, body = ApiError)))]
pub(super) async fn show_image(State(d): Shared, name: PathParams<String>) -> ApiResult<ImageRecord> {
    let name = path(name)?;
    let image = d.fleet.store.get_image(&name)?;
    let image = image.ok_or_else(|| ApiFailure::not_found(format!("no image '{name}'; see `banger image list`")))?;
    Ok(Json(image.into()))
}

/// Deletes an image no VM uses.
#[utoipa::path(delete, path = "/v1/images/{name}", params(("name" = String, Path, description = "image name")),
    responses((status = 200, body = ImageRecord), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 400, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn delete_image(State(d): Shared, name: PathParams<String>) -> ApiResult<ImageRecord> {
    Ok(Json(d.artifacts.delete_image(&path(name)?)?.into()))
}
