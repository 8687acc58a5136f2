//! The CLI's streaming session commands: `session attach` (the `banger-attach` upgrade, see
//! bangerd's `session_stream.rs`) and `session logs` (a streamed response body).
//!
//! Detaching: Ctrl-] on a terminal (stdin is put in non-canonical mode, so it arrives at
//! once), Ctrl-C, or the end of stdin for a `pipe` session. A `tty` session is attached with
//! our terminal raw (`tty.rs`) and sized to it (`Resize` now and at each `SIGWINCH`): Ctrl-C
//! is then a byte for the session, and Ctrl-] alone detaches. The client then sends `Close` and
//! waits for the daemon's `Close`, so once `attach` has returned the session's stdin is free
//! for the next attach. Without a terminal (scripts, tests) closing stdin is the way to detach.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use banger_proto::agent::{AgentFailure, AgentResponse, Decoder, ExitStatus, Frame, FrameKind};
use banger_proto::{SessionView, StdinMode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::Request;
use nix::sys::termios::{self, LocalFlags, SetArg, SpecialCharacterIndices, Termios};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

use crate::client::Client;
use crate::cmd::segment;
use crate::tty::RawMode;

/// Ctrl-]: the detach key.
const DETACH_KEY: u8 = 0x1d;

/// Puts the terminal on stdin in non-canonical mode (echo kept) until dropped.
struct TerminalMode {
    saved: Termios,
}

impl TerminalMode {
    fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        // Keys arrive at once (Ctrl-] among them), typed text is still echoed, and Enter echoes as a
        // line break rather than `^J`.
        raw.local_flags.remove(LocalFlags::ICANON | LocalFlags::ECHOCTL);
        raw.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
        raw.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for TerminalMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}

/// Attaches to session `s`; returns 0 once detached, or the session's exit code if it ended.
pub async fn attach(client: &Client, s: &SessionView) -> anyhow::Result<ExitCode> {
    let name = &s.record.name;
    let guest_tty = s.record.stdin_mode == StdinMode::Tty;
    // Whether our stdin is the session's.
    let pipe = s.record.stdin_mode == StdinMode::Pipe || guest_tty;
    let path = format!("/v1/vms/{}/sessions/{}/attach?stdin={pipe}", segment(&s.vm), segment(&s.record.id));
    let upgraded = crate::exec::upgrade(client, &path, "banger-attach").await?;
    let (mut rd, mut wr) = tokio::io::split(upgraded);
    let tty = std::io::stdin().is_terminal();
    let mut ended: std::pin::Pin<Box<dyn std::future::Future<Output = i32>>> = Box::pin(std::future::pending());
    // Our terminal while attached: keys at once with echo kept (a `pipe` or `closed` session),
    // or raw (a `tty` session, whose own terminal echoes). Dropped before any last word.
    let mut mode: (Option<TerminalMode>, Option<RawMode>) = (None, None);
    if tty && guest_tty {
        ended = Box::pin(crate::tty::terminated()?);
        mode.1 = Some(RawMode::enter()?);
    } else if tty {
        mode.0 = TerminalMode::enter();
    }
    let raw = mode.1.is_some();
    // In raw mode a line break needs its carriage return.
    let eol = if raw { "\r\n" } else { "\n" };

    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
    tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if wr.write_all(&frame.encode()).await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
    });
    let detach = tx.clone();
    let stdin_tx = tx.clone();
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    // For a watcher, stdin is not the session's: only Ctrl-]/Ctrl-C detach it.
                    if pipe {
                        let _ = stdin_tx.send(Frame::new(1, FrameKind::Close, Vec::new()));
                    }
                    return;
                }
                Ok(n) => {
                    let chunk = &buf[..n];
                    let key = tty.then(|| chunk.iter().position(|b| *b == DETACH_KEY)).flatten();
                    let data = key.map_or(chunk, |at| &chunk[..at]);
                    if pipe
                        && !data.is_empty()
                        && stdin_tx.send(Frame::new(1, FrameKind::Stdin, data.to_vec())).is_err()
                    {
                        return;
                    }
                    if key.is_some() {
                        let _ = stdin_tx.send(Frame::new(1, FrameKind::Close, Vec::new()));
                        return;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = detach.send(Frame::new(1, FrameKind::Close, Vec::new()));
        }
    });
    if guest_tty && tty {
        // The session's terminal takes our size now and follows it.
        if let Some(size) = crate::tty::size() {
            let _ = tx.send(Frame::json(1, FrameKind::Resize, &size));
        }
        crate::tty::send_resizes(tx.clone())?;
    }

    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(frame) = decoder.next_frame().context("corrupt attach stream from bangerd")? {
            match frame.kind {
                FrameKind::Response => {
                    if let Ok(AgentResponse::Session(_)) = frame.parse::<AgentResponse>("session") {
                        if tty {
                            eprint!("attached to session {name}; Ctrl-] detaches{eol}");
                        }
                    }
                }
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
                    drop(std::mem::take(&mut mode));
                    eprintln!("session {name} exited with code {}", status.code);
                    return Ok(ExitCode::from(u8::try_from(status.code.clamp(0, 255)).unwrap_or(1)));
                }
                FrameKind::Close => {
                    drop(std::mem::take(&mut mode));
                    eprintln!("detached from session {name}; it keeps running");
                    return Ok(ExitCode::SUCCESS);
                }
                FrameKind::Error => {
                    let failure: AgentFailure = frame.parse("error")?;
                    bail!(failure.message);
                }
                _ => {}
            }
        }
        let n = tokio::select! {
            read = rd.read(&mut buf) => read.context("attach stream broke")?,
            signal = &mut ended => {
                drop(std::mem::take(&mut mode));
                eprintln!("banger: signal {signal}: detached from session {name}; it keeps running");
                return Ok(ExitCode::from(u8::try_from(128 + signal).unwrap_or(1)));
            }
        };
        if n == 0 {
            bail!("bangerd closed the attach stream");
        }
        decoder.push(&buf[..n]);
    }
}

/// `GET path` and copies the streamed body to stdout.
pub async fn logs(client: &Client, path: &str) -> anyhow::Result<()> {
    let req =
        Request::get(path).header("host", "bangerd").body(Full::new(Bytes::new())).context("cannot build request")?;
    let resp = client.request(req).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        bail!(crate::client::api_error(status, &bytes).message);
    }
    let mut stdout = tokio::io::stdout();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the log stream broke")?;
        if let Ok(data) = frame.into_data() {
            stdout.write_all(&data).await?;
            stdout.flush().await?;
        }
    }
    Ok(())
}
