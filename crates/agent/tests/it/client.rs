//! A small blocking host-side client of the agent channel, shared by the integration tests and
//! the real-guest example.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use banger_proto::agent::{
    ack_payload, AgentRequest, AgentResponse, Decoder, ExecRequest, ExitStatus, Frame, FrameKind, SignalRequest,
};

/// A connection to an agent.
pub struct Client {
    stream: UnixStream,
    decoder: Decoder,
    next_channel: u32,
    backlog: VecDeque<Frame>,
    /// Whether `next` grants credit for the streamed bytes it returns (see `manual_acks`).
    auto_ack: bool,
}

/// Everything an exec produced.
#[derive(Debug, Default)]
pub struct ExecOutput {
    /// From `Started`.
    pub pid: Option<u32>,
    /// All stdout bytes.
    pub stdout: Vec<u8>,
    /// All stderr bytes.
    pub stderr: Vec<u8>,
    /// From `Exit`.
    pub status: Option<ExitStatus>,
}

#[allow(dead_code, reason = "each user of this module uses a different part")]
impl Client {
    /// Connects to a unix socket.
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Self { stream, decoder: Decoder::default(), next_channel: 1, backlog: VecDeque::new(), auto_ack: true })
    }

    /// From now on the test sends the `Ack`s itself: `next` no longer grants credit for the
    /// streamed bytes it returns.
    pub fn manual_acks(&mut self) {
        self.auto_ack = false;
    }

    /// Sets how long a read may block.
    pub fn set_timeout(&mut self, timeout: Duration) -> std::io::Result<()> {
        self.stream.set_read_timeout(Some(timeout))
    }

    /// Sends a request on a fresh channel and returns the channel.
    pub fn open(&mut self, request: &AgentRequest) -> std::io::Result<u32> {
        let channel = self.next_channel;
        self.next_channel += 1;
        self.send(&Frame::json(channel, FrameKind::Request, request))?;
        Ok(channel)
    }

    /// Sends one frame.
    pub fn send(&mut self, frame: &Frame) -> std::io::Result<()> {
        self.stream.write_all(&frame.encode())
    }

    /// Makes the next channel id `channel` (to act like a new host on the same stream).
    pub fn set_next_channel(&mut self, channel: u32) {
        self.next_channel = channel;
    }

    /// Sends raw bytes.
    pub fn raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// The next frame for `channel` (frames of other channels are kept for later). Streamed
    /// bytes it returns count as consumed: the agent gets credit for them back at once.
    pub fn next(&mut self, channel: u32) -> std::io::Result<Frame> {
        let frame = self.next_frame(channel)?;
        if self.auto_ack && frame.kind.is_credited() && !frame.payload.is_empty() {
            self.send(&Frame::new(channel, FrameKind::Ack, ack_payload(frame.payload.len())))?;
        }
        Ok(frame)
    }

    fn next_frame(&mut self, channel: u32) -> std::io::Result<Frame> {
        if let Some(i) = self.backlog.iter().position(|f| f.channel == channel) {
            if let Some(frame) = self.backlog.remove(i) {
                return Ok(frame);
            }
        }
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            while let Some(frame) = self.decoder.next_frame().map_err(std::io::Error::other)? {
                if frame.channel == channel {
                    return Ok(frame);
                }
                self.backlog.push_back(frame);
            }
            let n = self.stream.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "agent closed the channel"));
            }
            self.decoder.push(&buf[..n]);
        }
    }

    /// Sends a one-answer request and returns the answer.
    pub fn call(&mut self, request: &AgentRequest) -> std::io::Result<Result<AgentResponse, String>> {
        let channel = self.open(request)?;
        let frame = self.next(channel)?;
        Ok(answer(&frame))
    }

    /// Starts an exec; returns its channel.
    pub fn start(&mut self, argv: &[&str], stdin: bool) -> std::io::Result<u32> {
        let request = ExecRequest { argv: argv.iter().map(|s| (*s).to_owned()).collect(), stdin, ..Default::default() };
        self.open(&AgentRequest::Exec(request))
    }

    /// Sends stdin bytes (empty = EOF).
    pub fn stdin(&mut self, channel: u32, bytes: &[u8]) -> std::io::Result<()> {
        self.send(&Frame::new(channel, FrameKind::Stdin, bytes.to_vec()))
    }

    /// Sends a signal.
    pub fn signal(&mut self, channel: u32, signal: i32) -> std::io::Result<()> {
        self.send(&Frame::json(channel, FrameKind::Signal, &SignalRequest { signal }))
    }

    /// Collects an exec channel until `Exit` or `Error`.
    pub fn finish(&mut self, channel: u32) -> std::io::Result<ExecOutput> {
        let mut out = ExecOutput::default();
        loop {
            let frame = self.next(channel)?;
            match frame.kind {
                FrameKind::Response => {
                    if let Ok(AgentResponse::Started { pid }) = frame.parse("started") {
                        out.pid = Some(pid);
                    }
                }
                FrameKind::Stdout => out.stdout.extend_from_slice(&frame.payload),
                FrameKind::Stderr => out.stderr.extend_from_slice(&frame.payload),
                FrameKind::Exit => {
                    out.status = frame.parse("exit").ok();
                    return Ok(out);
                }
                FrameKind::Error => {
                    let message = answer(&frame).err().unwrap_or_default();
                    return Err(std::io::Error::other(message));
                }
                other => return Err(std::io::Error::other(format!("unexpected {other:?} frame"))),
            }
        }
    }

    /// Runs a command to completion, with optional stdin.
    pub fn exec(&mut self, argv: &[&str], stdin: Option<&[u8]>) -> std::io::Result<ExecOutput> {
        let channel = self.start(argv, stdin.is_some())?;
        if let Some(bytes) = stdin {
            for chunk in bytes.chunks(64 * 1024) {
                self.stdin(channel, chunk)?;
            }
            self.stdin(channel, &[])?;
        }
        self.finish(channel)
    }

    /// Reads a guest file: its bytes and the final `File` answer.
    pub fn read_file(&mut self, path: &str) -> std::io::Result<Result<(Vec<u8>, AgentResponse), String>> {
        let channel = self.open(&AgentRequest::ReadFile { path: path.to_owned() })?;
        let mut data = Vec::new();
        loop {
            let frame = self.next(channel)?;
            match frame.kind {
                FrameKind::Data => data.extend_from_slice(&frame.payload),
                _ => return Ok(answer(&frame).map(|response| (data, response))),
            }
        }
    }

    /// Writes a guest file.
    pub fn write_file(
        &mut self,
        path: &str,
        mode: u32,
        bytes: &[u8],
    ) -> std::io::Result<Result<AgentResponse, String>> {
        let channel = self.open(&AgentRequest::WriteFile { path: path.to_owned(), mode })?;
        for chunk in bytes.chunks(300 * 1024) {
            self.send(&Frame::new(channel, FrameKind::Data, chunk.to_vec()))?;
        }
        self.send(&Frame::new(channel, FrameKind::Data, Vec::new()))?;
        let frame = self.next(channel)?;
        Ok(answer(&frame))
    }
}

/// A `Response` as Ok, an `Error` as its message.
pub fn answer(frame: &Frame) -> Result<AgentResponse, String> {
    match frame.kind {
        FrameKind::Response => frame.parse("response").map_err(|e| e.to_string()),
        FrameKind::Error => {
            Err(frame.parse::<banger_proto::agent::AgentFailure>("error").map_or_else(|e| e.to_string(), |f| f.message))
        }
        other => Err(format!("unexpected {other:?} frame")),
    }
}
