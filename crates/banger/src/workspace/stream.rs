//! The CLI's side of the workspace streams (protocol in `banger_proto::workspace`): upgrade the
//! HTTP connection, then send the import's tar in `Data` frames (built on a blocking thread,
//! which the socket holds back as fast as the guest unpacks), or receive the export's bytes
//! into a file.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use banger_proto::agent::{AgentFailure, Decoder, Frame, FrameKind, MAX_PAYLOAD};
use banger_proto::workspace::{
    export_too_large, WorkspaceExportQuery, WorkspaceExported, WorkspaceImported, DEFAULT_EXPORT_MAX_BYTES,
    WORKSPACE_PROTOCOL,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

use super::tarball::{self, Stats};
use crate::client::Client;
use crate::cmd::segment;

/// Bytes per `Data` frame of the import.
const CHUNK: usize = 512 * 1024;

/// The daemon's final frame: `Response` parsed as `T`, `Error` as an error. `Data` frames go to
/// `data`.
pub(crate) async fn final_frame<T: serde::de::DeserializeOwned>(
    rd: &mut (impl AsyncRead + Unpin),
    mut data: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<T> {
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        while let Some(frame) = decoder.next_frame().context("corrupt workspace stream from bangerd")? {
            match frame.kind {
                FrameKind::Data => data(&frame.payload)?,
                FrameKind::Response => return Ok(frame.parse("workspace answer")?),
                FrameKind::Error => bail!(frame.parse::<AgentFailure>("error")?.message),
                _ => {}
            }
        }
        let n = rd.read(&mut buf).await.context("the workspace stream broke")?;
        if n == 0 {
            bail!("bangerd closed the workspace stream without an answer");
        }
        decoder.push(&buf[..n]);
    }
}

/// A `Write` that hands full chunks to the sending task (blocking while it is behind).
struct ChunkSink {
    buf: Vec<u8>,
    tx: mpsc::Sender<Vec<u8>>,
}

impl ChunkSink {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the workspace stream ended"))
    }
}

impl std::io::Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Streams the tar of `files` under `top` into `dir` of `vm`; the daemon's answer and what
/// went into the stream.
pub async fn import(
    client: &Client,
    vm: &str,
    top: PathBuf,
    files: Vec<PathBuf>,
    dir: &str,
) -> anyhow::Result<(WorkspaceImported, Stats)> {
    let path = format!("/v1/vms/{}/workspace/import?dir={}", segment(vm), segment(dir));
    let io = crate::exec::upgrade(client, &path, WORKSPACE_PROTOCOL).await?;
    let (mut rd, mut wr) = tokio::io::split(io);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    let builder = tokio::task::spawn_blocking(move || {
        let mut sink = ChunkSink { buf: Vec::with_capacity(CHUNK), tx };
        let stats = tarball::write_tar(&top, &files, &mut sink)?;
        sink.flush().map_err(tarball::TarError::Write)?;
        Ok::<_, tarball::TarError>(stats)
    });
    let send = async {
        while let Some(chunk) = rx.recv().await {
            debug_assert!(chunk.len() <= MAX_PAYLOAD);
            wr.write_all(&Frame::new(1, FrameKind::Data, chunk).encode()).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let answer = final_frame::<WorkspaceImported>(&mut rd, |_| Ok(()));
    tokio::pin!(answer);
    // The daemon may answer early (a refused entry): that ends the sending.
    let sent = tokio::select! {
        sent = send => sent,
        // Returning drops the receiver, which ends the builder too.
        early = &mut answer => match early {
            Err(e) => return Err(e),
            Ok(done) => bail!("bangerd answered before the stream ended ({} entries)", done.entries),
        },
    };
    drop(rx);
    let stats = match builder.await.context("the tar builder failed")? {
        Ok(stats) => stats,
        // The stream ended from the other side: its reason is the error.
        Err(tarball::TarError::Write(_)) if sent.is_err() => {
            answer.await?;
            bail!("the workspace stream ended early")
        }
        Err(e) => {
            // Dropping the connection abandons the import in the guest.
            return Err(anyhow::Error::new(e).context("cannot build the workspace stream"));
        }
    };
    if sent.is_ok() {
        wr.write_all(&Frame::new(1, FrameKind::Data, Vec::new()).encode()).await.ok();
        wr.flush().await.ok();
    }
    Ok((answer.await?, stats))
}

/// Streams an export of `vm` into `out`; the daemon's answer. More than the query's
/// `max_bytes` (the daemon enforces it too) ends it with an error before more is written.
pub async fn export(
    client: &Client,
    vm: &str,
    q: &WorkspaceExportQuery,
    out: &mut std::fs::File,
) -> anyhow::Result<WorkspaceExported> {
    let kind = match q.kind {
        banger_proto::workspace::ExportKind::Bundle => "bundle",
        banger_proto::workspace::ExportKind::Patch => "patch",
    };
    let mut path = format!("/v1/vms/{}/workspace/export?dir={}&kind={kind}", segment(vm), segment(&q.dir));
    if let Some(basis) = &q.basis {
        path.push_str(&format!("&basis={}", segment(basis)));
    }
    let cap = q.max_bytes.unwrap_or(DEFAULT_EXPORT_MAX_BYTES);
    path.push_str(&format!("&max_bytes={cap}"));
    let mut io = crate::exec::upgrade(client, &path, WORKSPACE_PROTOCOL).await?;
    let mut received = 0u64;
    final_frame(&mut io, |data| {
        received = received.saturating_add(data.len() as u64);
        if received > cap {
            bail!("{}", export_too_large(vm, cap));
        }
        out.write_all(data).context("cannot write what the guest sent")
    })
    .await
}
