//! Client helpers for the daemon's file routes (`/v1/vms/{vm}/files/...`): plain async
//! functions over a [`Client`], used by `banger vm cp` and the MCP server. Errors from the
//! daemon are [`ApiErrorAnswer`]s (their status tells a missing path, 404, from the rest).

pub mod untar;

use std::pin::Pin;
use std::task::{Context, Poll};

use anyhow::Context as _;
use banger_proto::fs::{ArchiveExtracted, FileList, FileStat, MkdirRequest, FILE_SIZE_HEADER};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::mpsc;

use crate::client::{api_error, ApiErrorAnswer, Client};
use crate::cmd::segment;

/// A query value, percent-encoded.
fn q(value: &str) -> String {
    segment(value)
}

fn files_path(vm: &str, route: &str) -> String {
    format!("/v1/vms/{}/files{route}", segment(vm))
}

/// The `lstat` of a guest path.
pub async fn stat(client: &Client, vm: &str, path: &str) -> anyhow::Result<FileStat> {
    client.get(&format!("{}?path={}", files_path(vm, "/stat"), q(path))).await
}

/// A guest directory's entries (at most 10,000; see `truncated`).
pub async fn list(client: &Client, vm: &str, path: &str) -> anyhow::Result<FileList> {
    client.get(&format!("{}?path={}", files_path(vm, "/list"), q(path))).await
}

/// Makes a guest directory.
pub async fn mkdir(client: &Client, vm: &str, req: &MkdirRequest) -> anyhow::Result<FileStat> {
    client.call(Method::POST, &files_path(vm, "/mkdir"), Some(req)).await
}

/// Removes a guest path (a symlink itself; a non-empty directory only when `recursive`).
pub async fn remove(client: &Client, vm: &str, path: &str, recursive: bool) -> anyhow::Result<()> {
    let uri = format!("{}?path={}&recursive={recursive}", files_path(vm, ""), q(path));
    let resp = send(client, Method::DELETE, &uri, Full::new(Bytes::new())).await?;
    checked(resp).await.map(drop)
}

/// Reads a guest file whole into memory, at most `limit` bytes: (its whole size, the bytes).
pub async fn read(client: &Client, vm: &str, path: &str, limit: u64) -> anyhow::Result<(u64, Vec<u8>)> {
    let (size, mut body) = read_stream(client, vm, path, Some(limit)).await?;
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.with_context(|| format!("reading {vm}:{path} broke off"))?;
        if let Ok(data) = frame.into_data() {
            let room = usize::try_from(limit).unwrap_or(usize::MAX).saturating_sub(out.len());
            out.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    Ok((size, out))
}

/// Opens a guest file for streaming: (its whole size, the body).
pub async fn read_stream(client: &Client, vm: &str, path: &str, limit: Option<u64>) -> anyhow::Result<(u64, Incoming)> {
    let mut uri = format!("{}?path={}", files_path(vm, "/content"), q(path));
    if let Some(limit) = limit {
        uri.push_str(&format!("&limit={limit}"));
    }
    let resp = checked(send(client, Method::GET, &uri, Full::new(Bytes::new())).await?).await?;
    let size =
        resp.headers().get(FILE_SIZE_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok((size, resp.into_body()))
}

/// Writes `bytes` to a guest file (atomically: a temporary file renamed over it).
pub async fn write(
    client: &Client,
    vm: &str,
    path: &str,
    mode: Option<u32>,
    parents: bool,
    bytes: Vec<u8>,
) -> anyhow::Result<FileStat> {
    let uri = write_uri(vm, path, mode, parents);
    json(send(client, Method::PUT, &uri, Full::new(Bytes::from(bytes))).await?).await
}

fn write_uri(vm: &str, path: &str, mode: Option<u32>, parents: bool) -> String {
    let mut uri = format!("{}?path={}&parents={parents}", files_path(vm, "/content"), q(path));
    if let Some(mode) = mode {
        uri.push_str(&format!("&mode={mode}"));
    }
    uri
}

/// A guest file or tree as a tar stream (its base name the top entry).
pub async fn archive(client: &Client, vm: &str, path: &str) -> anyhow::Result<Incoming> {
    let uri = format!("{}?path={}", files_path(vm, "/archive"), q(path));
    Ok(checked(send(client, Method::GET, &uri, Full::new(Bytes::new())).await?).await?.into_body())
}

/// Extracts the tar stream `body` into existing guest directory `dir`.
pub async fn extract(client: &Client, vm: &str, dir: &str, body: ChannelBody) -> anyhow::Result<ArchiveExtracted> {
    let uri = format!("{}?path={}", files_path(vm, "/archive"), q(dir));
    json(send(client, Method::PUT, &uri, body).await?).await
}

/// A request body fed from a channel: send `Ok(bytes)` pieces, an `Err` to abort it; dropping
/// the sender ends it. The channel's bound is the back-pressure.
pub struct ChannelBody {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
}

impl ChannelBody {
    /// A body and its sender, holding at most `depth` pieces.
    pub fn new(depth: usize) -> (mpsc::Sender<std::io::Result<Bytes>>, Self) {
        let (tx, rx) = mpsc::channel(depth);
        (tx, Self { rx })
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx).map(|piece| piece.map(|r| r.map(Frame::data)))
    }
}

async fn send<B>(client: &Client, method: Method, uri: &str, body: B) -> anyhow::Result<Response<Incoming>>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "bangerd")
        .body(body)
        .context("cannot build request")?;
    client.request_with(req).await
}

/// The response when it succeeded, else its error body as an [`ApiErrorAnswer`].
async fn checked(resp: Response<Incoming>) -> anyhow::Result<Response<Incoming>> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    // Error bodies are small JSON; a misbehaving daemon's is cut at 64 KiB.
    let bytes = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Err(ApiErrorAnswer { status, body: api_error(status, &bytes) }.into())
}

async fn json<T: serde::de::DeserializeOwned>(resp: Response<Incoming>) -> anyhow::Result<T> {
    let resp = checked(resp).await?;
    let bytes = resp.into_body().collect().await.context("cannot read bangerd's answer")?.to_bytes();
    serde_json::from_slice(&bytes).context("cannot decode bangerd's answer")
}

/// Whether `error` is the daemon's 404 (no such path, or no such VM).
pub fn is_not_found(error: &anyhow::Error) -> bool {
    error.downcast_ref::<ApiErrorAnswer>().is_some_and(|e| e.status == StatusCode::NOT_FOUND)
}
