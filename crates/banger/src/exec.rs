//! The CLI's side of `POST /v1/vms/{vm}/exec`: upgrade the HTTP connection, send the exec
//! request, forward stdin (and Ctrl-C as SIGINT), and write the command's output to our stdout
//! and stderr as it arrives. Returns the command's exit code.

use anyhow::{bail, Context as _};
use banger_proto::agent::{
    AgentFailure, AgentRequest, Decoder, ExecRequest, ExitStatus, Frame, FrameKind, SignalRequest,
};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::upgrade::Upgraded;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

use crate::client::Client;
use crate::cmd::segment;

/// How to run the command.
pub struct ExecOptions {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    pub cwd: Option<String>,
    /// Forward our stdin.
    pub stdin: bool,
    /// Forward Ctrl-C to the command as SIGINT (otherwise the caller handles Ctrl-C).
    pub forward_interrupt: bool,
}

/// `POST path` with `Upgrade: protocol`; the upgraded stream, or the daemon's error.
pub async fn upgrade(client: &Client, path: &str, protocol: &str) -> anyhow::Result<TokioIo<Upgraded>> {
    let req = Request::post(path)
        .header("host", "bangerd")
        .header("connection", "upgrade")
        .header("upgrade", protocol)
        .body(Full::new(Bytes::new()))
        .context("cannot build the request")?;
    let resp = client.request(req).await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        // The daemon's answer, code kept (`banger mcp` reports it).
        return Err(crate::client::ApiErrorAnswer { status, body: crate::client::api_error(status, &body) }.into());
    }
    let upgraded = hyper::upgrade::on(resp).await.with_context(|| format!("{protocol} upgrade failed"))?;
    Ok(TokioIo::new(upgraded))
}

/// Runs a command in `vm` and returns its exit code.
pub async fn exec(client: &Client, vm: &str, opts: ExecOptions) -> anyhow::Result<i32> {
    let upgraded = upgrade(client, &format!("/v1/vms/{}/exec", segment(vm)), "banger-exec").await?;
    let (mut rd, mut wr) = tokio::io::split(upgraded);

    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
    let request = AgentRequest::Exec(ExecRequest { argv: opts.argv, env: opts.env, cwd: opts.cwd, stdin: opts.stdin });
    tx.send(Frame::json(1, FrameKind::Request, &request)).ok();
    tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if wr.write_all(&frame.encode()).await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
    });
    if opts.stdin {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Frame::new(1, FrameKind::Stdin, Vec::new()));
                        break;
                    }
                    Ok(n) => {
                        if tx.send(Frame::new(1, FrameKind::Stdin, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    if opts.forward_interrupt {
        let tx = tx.clone();
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                let sig = SignalRequest { signal: 2 };
                if tx.send(Frame::json(1, FrameKind::Signal, &sig)).is_err() {
                    break;
                }
            }
        });
    }

    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(frame) = decoder.next_frame().context("corrupt exec stream from bangerd")? {
            match frame.kind {
                FrameKind::Stdout => {
                    stdout.write_all(&frame.payload).await?;
                    stdout.flush().await?;
                }
                FrameKind::Stderr => {
                    stderr.write_all(&frame.payload).await?;
                    stderr.flush().await?;
                }
                FrameKind::Exit => {
                    let status: ExitStatus = frame.parse("exit")?;
                    return Ok(status.code);
                }
                FrameKind::Error => {
                    let failure: AgentFailure = frame.parse("error")?;
                    bail!(failure.message);
                }
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
