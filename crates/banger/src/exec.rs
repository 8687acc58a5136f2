//! The CLI's side of `POST /v1/vms/{vm}/exec`: upgrade the HTTP connection, send the exec
//! request, forward stdin (and Ctrl-C as SIGINT), and write the command's output to our stdout
//! and stderr as it arrives. Returns the command's exit code.
//!
//! With `tty` the command runs on a guest pty of our terminal's size, `SIGWINCH` sends
//! `Resize`, and with stdin too our terminal is raw (`tty.rs`): every key, Ctrl-C included,
//! is a byte for the guest. SIGTERM, SIGHUP or SIGQUIT restore the terminal and end the exec
//! (the daemon kills the command when we go) with 128 + the signal.

use anyhow::{bail, Context as _};
use std::future::Future;
use std::pin::Pin;

use banger_proto::agent::{
    AgentFailure, AgentRequest, Decoder, ExecRequest, ExitStatus, Frame, FrameKind, SignalRequest, TtySize,
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
    /// Run on a guest pty (with `stdin`: our terminal raw, every key to the guest).
    pub tty: bool,
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
    if opts.tty && opts.stdin && !crate::tty::stdin_is_terminal() {
        return Err(crate::tty::TtyError::NotATerminal.into());
    }
    let upgraded = upgrade(client, &format!("/v1/vms/{}/exec", segment(vm)), "banger-exec").await?;
    let (mut rd, mut wr) = tokio::io::split(upgraded);

    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
    let mut env = opts.env;
    let tty = opts.tty.then(|| crate::tty::size().unwrap_or(TtySize::DEFAULT));
    if tty.is_some() && !env.iter().any(|(k, _)| k == "TERM") {
        // The guest's programs draw for the terminal they are really on.
        if let Some(term) = std::env::var("TERM").ok().filter(|t| !t.is_empty()) {
            env.push(("TERM".into(), term));
        }
    }
    let request = AgentRequest::Exec(ExecRequest {
        argv: opts.argv,
        env,
        cwd: opts.cwd,
        stdin: opts.stdin,
        tty,
        container: None,
    });
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
    // Signals that end us are watched before raw mode, so none finds it on.
    let mut ended: Pin<Box<dyn Future<Output = i32>>> = Box::pin(std::future::pending());
    let mut raw_mode = None;
    if tty.is_some() {
        ended = Box::pin(crate::tty::terminated()?);
        crate::tty::send_resizes(tx.clone())?;
        if opts.stdin {
            raw_mode = Some(crate::tty::RawMode::enter()?);
        }
    }
    if opts.forward_interrupt && raw_mode.is_none() {
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
        let n = tokio::select! {
            read = rd.read(&mut buf) => read.context("exec stream broke")?,
            signal = &mut ended => {
                drop(raw_mode.take());
                eprintln!("banger: signal {signal}: the terminal is restored and the command ends");
                return Ok(128 + signal);
            }
        };
        if n == 0 {
            bail!("bangerd closed the exec stream before the command ended");
        }
        decoder.push(&buf[..n]);
    }
}
