//! `sandbox_exec`'s stream: the CLI's exec upgrade (`POST /v1/vms/{vm}/exec`,
//! [`crate::exec::upgrade`]), with the output collected into [`Capped`] buffers instead of
//! written to a terminal. Every frame is read as it arrives, so the daemon credits the guest and
//! the command is never held back; bytes past the limit are dropped and counted. At the timeout
//! the stream is dropped, which makes the daemon kill the command.

use std::time::Duration;

use anyhow::{bail, Context as _};
use banger_proto::agent::{AgentFailure, AgentRequest, Decoder, ExecRequest, ExitStatus, Frame, FrameKind};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::limits::Capped;
use crate::client::Client;
use crate::cmd::segment;

/// How a command ran.
#[derive(Debug)]
pub struct Outcome {
    /// Its exit code (128 + signal when a signal ended it); `None` when the timeout ended it.
    pub exit_code: Option<i32>,
    pub stdout: Capped,
    pub stderr: Capped,
    pub timed_out: bool,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// Bytes for its stdin (then EOF); `None`: stdin is /dev/null.
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
    /// The most of each of stdout and stderr kept.
    pub limit: usize,
}

/// Runs `spec` in `vm` and collects its output.
pub async fn run(client: &Client, vm: &str, spec: Spec) -> anyhow::Result<Outcome> {
    let stream = crate::exec::upgrade(client, &format!("/v1/vms/{}/exec", segment(vm)), "banger-exec").await?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    // No terminal: an agent reads stdout and stderr apart. Fields added later take their default.
    #[allow(clippy::needless_update, reason = "the request grows optional fields (e.g. a tty) that default to off")]
    let request = AgentRequest::Exec(ExecRequest {
        argv: spec.argv,
        env: spec.env,
        cwd: spec.cwd,
        stdin: spec.stdin.is_some(),
        ..Default::default()
    });
    let mut out = Frame::json(1, FrameKind::Request, &request).encode();
    if let Some(input) = &spec.stdin {
        // Chunks under the frame limit, then EOF.
        for chunk in input.chunks(64 * 1024) {
            out.extend(Frame::new(1, FrameKind::Stdin, chunk.to_vec()).encode());
        }
        out.extend(Frame::new(1, FrameKind::Stdin, Vec::new()).encode());
    }
    // Written beside the reads: a command may print before it reads all of its stdin.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&out).await;
        let _ = wr.flush().await;
        wr
    });
    let mut outcome =
        Outcome { exit_code: None, stdout: Capped::new(spec.limit), stderr: Capped::new(spec.limit), timed_out: false };
    let collected = tokio::time::timeout(spec.timeout, collect(&mut rd, &mut outcome)).await;
    writer.abort();
    match collected {
        Ok(Ok(code)) => outcome.exit_code = Some(code),
        Ok(Err(e)) => return Err(e),
        Err(_) => outcome.timed_out = true,
    }
    Ok(outcome)
}

/// Reads frames until the command's exit; returns its code.
async fn collect(rd: &mut (impl tokio::io::AsyncRead + Unpin), outcome: &mut Outcome) -> anyhow::Result<i32> {
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(frame) = decoder.next_frame().context("corrupt exec stream from bangerd")? {
            match frame.kind {
                FrameKind::Stdout => outcome.stdout.push(&frame.payload),
                FrameKind::Stderr => outcome.stderr.push(&frame.payload),
                FrameKind::Exit => return Ok(frame.parse::<ExitStatus>("exit")?.code),
                FrameKind::Error => bail!(frame.parse::<AgentFailure>("error")?.message),
                _ => {}
            }
        }
        let n = rd.read(&mut buf).await.context("exec stream broke")?;
        if n == 0 {
            bail!("bangerd closed the exec stream before the command ended");
        }
        decoder.push(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
        Frame::new(1, kind, payload.to_vec()).encode()
    }

    /// Output past the limit is read (so the daemon keeps crediting the guest), counted and
    /// dropped; the exit code still arrives.
    #[tokio::test]
    async fn output_past_the_limit_is_read_counted_and_dropped() {
        let (mut daemon, mut client) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 60_000];
            for _ in 0..50 {
                daemon.write_all(&frame(FrameKind::Stdout, &chunk)).await.expect("write");
            }
            daemon.write_all(&frame(FrameKind::Stderr, b"warning\n")).await.expect("write");
            let exit = Frame::json(1, FrameKind::Exit, &ExitStatus { code: 3, signal: None }).encode();
            daemon.write_all(&exit).await.expect("write");
        });
        let mut outcome =
            Outcome { exit_code: None, stdout: Capped::new(1000), stderr: Capped::new(1000), timed_out: false };
        let code = collect(&mut client, &mut outcome).await.expect("collect");
        writer.await.expect("writer");
        assert_eq!(code, 3);
        assert_eq!(outcome.stdout.bytes().len(), 1000);
        assert_eq!(outcome.stdout.total(), 3_000_000);
        assert!(outcome.stdout.truncated());
        assert_eq!((outcome.stderr.bytes(), outcome.stderr.truncated()), (&b"warning\n"[..], false));
    }

    #[tokio::test]
    async fn an_error_frame_or_a_closed_stream_is_a_failure() {
        let (mut daemon, mut client) = tokio::io::duplex(4096);
        let failure = Frame::json(1, FrameKind::Error, &AgentFailure { message: "no such command".into() }).encode();
        daemon.write_all(&failure).await.expect("write");
        let mut outcome =
            Outcome { exit_code: None, stdout: Capped::new(10), stderr: Capped::new(10), timed_out: false };
        let err = collect(&mut client, &mut outcome).await.expect_err("error frame");
        assert_eq!(err.to_string(), "no such command");
        drop(daemon);
        let err = collect(&mut client, &mut outcome).await.expect_err("closed");
        assert!(err.to_string().contains("closed the exec stream"), "{err}");
    }
}
