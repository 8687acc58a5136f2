//! Files in a running guest: `stat`, `list`, `mkdir`, `remove`, a file's contents both ways,
//! and tar streams both ways (the file routes, `banger vm cp`, the MCP tools).
//!
//! Every stream goes through the agent channel's flow control. Guest → host ([`GuestStream`]):
//! a channel in manual credit whose bytes count as consumed only when the consumer polls for
//! the next piece, i.e. once the previous one was handed on (to hyper's bounded write buffer);
//! a slow reader stalls the guest, never grows the daemon. Host → guest ([`Files::write`],
//! [`Files::extract`]): at most [`UPLOAD_WINDOW`] bytes unacknowledged by the agent, so a slow
//! or hostile guest holds the client back instead. No VM lock is held across the guest I/O.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use banger_proto::agent::{parse_ack, AgentFailure, AgentRequest, AgentResponse, Frame, FrameKind};
use banger_proto::fs::{
    valid_guest_path, ArchiveExtracted, FileKind, FileList, FileStat, FsError, FsErrorCode, MkdirRequest,
    DEFAULT_FILE_MODE, LIST_MAX_ENTRIES,
};
use futures_util::{Stream, StreamExt as _};

use crate::agent_conn::{AgentConn, AgentError, Channel};
use crate::services::{Fleet, FleetError};

/// Bytes of an upload the agent may leave unacknowledged.
pub const UPLOAD_WINDOW: usize = crate::services::workspace::UNPACK_WINDOW;
/// Largest `Data` payload sent to the agent.
const UPLOAD_CHUNK: usize = 256 * 1024;
/// Most bytes of JSON lines a listing may take in the daemon (10,000 entries with long names
/// and link targets fit); past it the listing is cut and marked truncated.
pub const LIST_MAX_BYTES: usize = 16 * 1024 * 1024;
/// How long a one-answer request (stat, mkdir, the start of a stream) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a remove may take (a recursive one walks the whole tree).
const REMOVE_TIMEOUT: Duration = Duration::from_secs(600);

/// A file request that failed.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The VM does not exist or does not run.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// The path is not absolute and plain.
    #[error("guest path '{0}' must be absolute, without '.' or '..' parts (e.g. /root/file.txt)")]
    BadPath(String),
    /// The guest refused or failed it.
    #[error("vm '{vm}': {}", .error.message)]
    Guest {
        /// The VM.
        vm: String,
        /// The agent's report.
        error: FsError,
    },
    /// The destination of an archive is not a directory.
    #[error("vm '{vm}': {path} is not a directory; an archive is extracted into an existing directory")]
    NotADirectory {
        /// The VM.
        vm: String,
        /// The path.
        path: String,
    },
    /// The guest refused the archive: an entry that would land outside the directory, or
    /// not a tar stream.
    #[error("vm '{vm}' refused the archive: {why}")]
    Refused {
        /// The VM.
        vm: String,
        /// The agent's reason (it names the entry).
        why: String,
    },
    /// Talking to the agent failed.
    #[error("vm '{vm}': the guest agent failed")]
    Agent {
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: AgentError,
    },
    /// The agent answered something that does not fit the request.
    #[error("vm '{vm}': unexpected answer from the guest agent: {what}")]
    Unexpected {
        /// The VM.
        vm: String,
        /// What came.
        what: String,
    },
    /// The client's upload broke off.
    #[error("the upload to vm '{vm}' broke off: {why}")]
    Upload {
        /// The VM.
        vm: String,
        /// Why.
        why: String,
    },
}

impl FilesError {
    /// The kind of a guest-reported failure, if it is one.
    pub fn guest_code(&self) -> Option<FsErrorCode> {
        match self {
            Self::Guest { error, .. } => Some(error.code),
            _ => None,
        }
    }
}

/// The file service.
pub struct Files {
    fleet: Arc<Fleet>,
}

/// A running VM's name and agent connection.
struct Target {
    vm: String,
    agent: Arc<AgentConn>,
}

impl Files {
    /// The service over `fleet`.
    pub fn new(fleet: Arc<Fleet>) -> Self {
        Self { fleet }
    }

    fn target(&self, reference: &str, path: &str) -> Result<Target, FilesError> {
        if !valid_guest_path(path) {
            return Err(FilesError::BadPath(path.to_owned()));
        }
        let (vm, agent) = self.fleet.running_agent(reference)?;
        Ok(Target { vm: vm.name, agent })
    }

    /// `lstat` of `path`.
    pub async fn stat(&self, reference: &str, path: &str) -> Result<FileStat, FilesError> {
        let t = self.target(reference, path)?;
        stat_of(&t, path).await
    }

    /// Makes a directory.
    pub async fn mkdir(&self, reference: &str, req: &MkdirRequest) -> Result<FileStat, FilesError> {
        let t = self.target(reference, &req.path)?;
        let request = AgentRequest::Mkdir { path: req.path.clone(), parents: req.parents, mode: req.mode };
        expect_stat(&t, call(&t, &request, CALL_TIMEOUT).await?)
    }

    /// Removes `path` (a symlink itself; a non-empty directory only when `recursive`).
    pub async fn remove(&self, reference: &str, path: &str, recursive: bool) -> Result<(), FilesError> {
        let t = self.target(reference, path)?;
        let request = AgentRequest::Remove { path: path.to_owned(), recursive };
        match call(&t, &request, REMOVE_TIMEOUT).await? {
            AgentResponse::Ok => Ok(()),
            other => Err(unexpected(&t, &other)),
        }
    }

    /// Lists directory `path`: at most [`LIST_MAX_ENTRIES`] entries, sorted by name.
    pub async fn list(&self, reference: &str, path: &str) -> Result<FileList, FilesError> {
        let t = self.target(reference, path)?;
        let limit = u32::try_from(LIST_MAX_ENTRIES).unwrap_or(u32::MAX);
        let mut closing =
            Closing { channel: open(&t, &AgentRequest::List { path: path.to_owned(), limit }).await?, answered: false };
        let channel = &mut closing.channel;
        let mut lines = Lines::default();
        let mut entries = Vec::new();
        let mut cut = false;
        loop {
            let frame = channel.recv().await.ok_or_else(|| lost(&t))?;
            match frame.kind {
                FrameKind::Data if !cut => {
                    for line in lines.push(&frame.payload) {
                        if entries.len() >= LIST_MAX_ENTRIES {
                            cut = true;
                            break;
                        }
                        let entry: FileStat = serde_json::from_slice(&line).map_err(|e| FilesError::Unexpected {
                            vm: t.vm.clone(),
                            what: format!("a listing line that is no file stat: {e}"),
                        })?;
                        entries.push(entry);
                    }
                    if lines.taken > LIST_MAX_BYTES {
                        cut = true;
                    }
                    if cut {
                        // Enough: the rest is not read (`closing` tells the agent).
                        break;
                    }
                }
                FrameKind::Data => {}
                _ => match answer_of(&t, &frame)? {
                    AgentResponse::Listed { truncated, .. } => {
                        closing.answered = true;
                        cut |= truncated;
                        break;
                    }
                    other => return Err(unexpected(&t, &other)),
                },
            }
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(FileList { path: path.to_owned(), entries, truncated: cut })
    }

    /// Streams a regular file: its whole size, and its bytes (at most `limit`).
    pub async fn read(
        &self,
        reference: &str,
        path: &str,
        limit: Option<u64>,
    ) -> Result<(u64, GuestStream), FilesError> {
        let t = self.target(reference, path)?;
        let mut channel = open(&t, &AgentRequest::Read { path: path.to_owned(), limit }).await?;
        channel.manual_credit();
        let first = first_frame(&t, &mut channel).await?;
        match answer_of(&t, &first)? {
            AgentResponse::Opened { size } => Ok((size, GuestStream::new(t.vm, channel, None, End::EmptyData, limit))),
            other => Err(unexpected(&t, &other)),
        }
    }

    /// Streams `path` (a file or a tree) as a tar archive, its base name the top entry.
    pub async fn pack(&self, reference: &str, path: &str) -> Result<GuestStream, FilesError> {
        let t = self.target(reference, path)?;
        let mut channel = open(&t, &AgentRequest::Pack { path: path.to_owned() }).await?;
        channel.manual_credit();
        let first = first_frame(&t, &mut channel).await?;
        if first.kind == FrameKind::Data {
            return Ok(GuestStream::new(t.vm, channel, Some(first), End::Packed, None));
        }
        // A failure before any data (a tar always has its top entry first).
        let answer = answer_of(&t, &first)?;
        Err(unexpected(&t, &answer))
    }

    /// Writes `body` to `path` (a temporary file renamed over it).
    pub async fn write<S, B, E>(
        &self,
        reference: &str,
        path: &str,
        mode: Option<u32>,
        parents: bool,
        body: S,
    ) -> Result<FileStat, FilesError>
    where
        S: Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let t = self.target(reference, path)?;
        let request =
            AgentRequest::Write { path: path.to_owned(), mode: mode.unwrap_or(DEFAULT_FILE_MODE) & 0o7777, parents };
        let answer = upload(&t, &request, body).await?;
        expect_stat(&t, answer)
    }

    /// Extracts the tar stream `body` into existing directory `dir` (the agent's `unpack`:
    /// nothing lands outside it).
    pub async fn extract<S, B, E>(&self, reference: &str, dir: &str, body: S) -> Result<ArchiveExtracted, FilesError>
    where
        S: Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let t = self.target(reference, dir)?;
        let found = stat_of(&t, dir).await?;
        if found.kind != FileKind::Dir {
            return Err(FilesError::NotADirectory { vm: t.vm, path: dir.to_owned() });
        }
        let answer = upload(&t, &AgentRequest::Unpack { dir: dir.to_owned() }, body).await.map_err(|e| match e {
            FilesError::Agent { vm, source: AgentError::Failed(why) } => FilesError::Refused { vm, why },
            e => e,
        })?;
        match answer {
            AgentResponse::Unpacked { entries, bytes } => Ok(ArchiveExtracted { entries, bytes }),
            other => Err(unexpected(&t, &other)),
        }
    }
}

async fn stat_of(t: &Target, path: &str) -> Result<FileStat, FilesError> {
    expect_stat(t, call(t, &AgentRequest::Stat { path: path.to_owned() }, CALL_TIMEOUT).await?)
}

fn expect_stat(t: &Target, answer: AgentResponse) -> Result<FileStat, FilesError> {
    match answer {
        AgentResponse::Stat(stat) => Ok(stat),
        other => Err(unexpected(t, &other)),
    }
}

fn unexpected(t: &Target, answer: &AgentResponse) -> FilesError {
    unexpected_in(&t.vm, answer)
}

fn unexpected_in(vm: &str, answer: &AgentResponse) -> FilesError {
    let mut what = format!("{answer:?}");
    what.truncate(200);
    FilesError::Unexpected { vm: vm.to_owned(), what }
}

fn lost(t: &Target) -> FilesError {
    FilesError::Agent { vm: t.vm.clone(), source: AgentError::Lost }
}

async fn open(t: &Target, request: &AgentRequest) -> Result<Channel, FilesError> {
    t.agent.open(request).await.map_err(|source| FilesError::Agent { vm: t.vm.clone(), source })
}

/// One request, one answer; `FsFailed` becomes [`FilesError::Guest`].
async fn call(t: &Target, request: &AgentRequest, timeout: Duration) -> Result<AgentResponse, FilesError> {
    let mut channel = open(t, request).await?;
    let frame = tokio::time::timeout(timeout, first_answer(t, &mut channel))
        .await
        .map_err(|_| FilesError::Agent { vm: t.vm.clone(), source: AgentError::Timeout(timeout) })??;
    answer_of(t, &frame)
}

async fn first_answer(t: &Target, channel: &mut Channel) -> Result<Frame, FilesError> {
    loop {
        let frame = channel.recv().await.ok_or_else(|| lost(t))?;
        if matches!(frame.kind, FrameKind::Response | FrameKind::Error) {
            return Ok(frame);
        }
    }
}

/// The first frame of a stream (data or its answer), within [`CALL_TIMEOUT`].
async fn first_frame(t: &Target, channel: &mut Channel) -> Result<Frame, FilesError> {
    tokio::time::timeout(CALL_TIMEOUT, channel.recv())
        .await
        .map_err(|_| FilesError::Agent { vm: t.vm.clone(), source: AgentError::Timeout(CALL_TIMEOUT) })?
        .ok_or_else(|| lost(t))
}

/// A `Response` or `Error` frame as an answer; `FsFailed` and `Error` as errors.
fn answer_of(t: &Target, frame: &Frame) -> Result<AgentResponse, FilesError> {
    answer_in(&t.vm, frame)
}

fn answer_in(vm: &str, frame: &Frame) -> Result<AgentResponse, FilesError> {
    let bad = |e: banger_proto::agent::FrameError| FilesError::Unexpected { vm: vm.to_owned(), what: e.to_string() };
    match frame.kind {
        FrameKind::Response => match frame.parse::<AgentResponse>("response").map_err(bad)? {
            AgentResponse::FsFailed(error) => Err(FilesError::Guest { vm: vm.to_owned(), error }),
            answer => Ok(answer),
        },
        FrameKind::Error => {
            let failure: AgentFailure = frame.parse("error").map_err(bad)?;
            Err(FilesError::Agent { vm: vm.to_owned(), source: AgentError::Failed(failure.message) })
        }
        other => Err(FilesError::Unexpected { vm: vm.to_owned(), what: format!("a {other:?} frame") }),
    }
}

/// Sends `body` as `Data` after `request`, never more than [`UPLOAD_WINDOW`] unacknowledged;
/// returns the agent's answer.
async fn upload<S, B, E>(t: &Target, request: &AgentRequest, mut body: S) -> Result<AgentResponse, FilesError>
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    let mut closing = Closing { channel: open(t, request).await?, answered: false };
    let channel = &mut closing.channel;
    let mut in_flight = 0usize;
    let mut ended = false;
    loop {
        tokio::select! {
            next = body.next(), if !ended && in_flight < UPLOAD_WINDOW => match next {
                Some(Ok(bytes)) => {
                    for piece in bytes.as_ref().chunks(UPLOAD_CHUNK) {
                        in_flight += piece.len();
                        channel.send(FrameKind::Data, piece.to_vec()).map_err(|_| lost(t))?;
                    }
                }
                Some(Err(e)) => {
                    let _ = channel.send(FrameKind::Close, Vec::new());
                    return Err(FilesError::Upload { vm: t.vm.clone(), why: e.to_string() });
                }
                None => {
                    ended = true;
                    channel.send(FrameKind::Data, Vec::new()).map_err(|_| lost(t))?;
                }
            },
            frame = channel.recv() => {
                let frame = frame.ok_or_else(|| lost(t))?;
                match frame.kind {
                    FrameKind::Ack => in_flight = in_flight.saturating_sub(parse_ack(&frame.payload).unwrap_or(0)),
                    FrameKind::Response | FrameKind::Error => {
                        closing.answered = true;
                        return answer_of(t, &frame);
                    }
                    other => tracing::debug!(vm = %t.vm, kind = ?other, "ignoring a frame on an upload channel"),
                }
            }
        }
    }
}

/// A channel that sends the agent `Close` when dropped before its answer (an error here, or
/// the HTTP client went away and its request was dropped): the agent stops at once instead of
/// waiting for data or credit that will not come.
struct Closing {
    channel: Channel,
    answered: bool,
}

impl Drop for Closing {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self.channel.send(FrameKind::Close, Vec::new());
        }
    }
}

/// Splits `Data` payloads into lines (the caller bounds what is pushed in all).
#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
    /// Bytes pushed so far.
    taken: usize,
}

impl Lines {
    /// The lines `bytes` completes.
    fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.taken += bytes.len();
        self.partial.extend_from_slice(bytes);
        let Some(last) = self.partial.iter().rposition(|&b| b == b'\n') else { return Vec::new() };
        let rest = self.partial.split_off(last + 1);
        let whole = std::mem::replace(&mut self.partial, rest);
        whole.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()
    }
}

/// How a guest stream ends well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// An empty `Data` (`read`).
    EmptyData,
    /// A `Packed` answer (`pack`).
    Packed,
}

/// A guest → host byte stream (a file's contents, a tar stream). Credit follows the consumer:
/// a piece counts as consumed when the next one is asked for. A failure mid-way is the
/// stream's last item, an `Err`.
pub struct GuestStream {
    vm: String,
    channel: Channel,
    first: Option<Frame>,
    end: End,
    /// Bytes the consumer may still take (`limit`).
    left: u64,
    /// Streamed bytes handed out and not yet credited.
    unconsumed: usize,
    done: bool,
}

impl GuestStream {
    fn new(vm: String, channel: Channel, first: Option<Frame>, end: End, limit: Option<u64>) -> Self {
        Self { vm, channel, first, end, left: limit.unwrap_or(u64::MAX), unconsumed: 0, done: false }
    }

    fn fail(&mut self, error: FilesError) -> Poll<Option<Result<Vec<u8>, FilesError>>> {
        tracing::warn!(vm = %self.vm, error = %banger_core::error_chain(&error), "a guest file stream failed");
        self.done = true;
        let _ = self.channel.send(FrameKind::Close, Vec::new());
        Poll::Ready(Some(Err(error)))
    }
}

impl Drop for GuestStream {
    fn drop(&mut self) {
        if !self.done {
            // Abandoned by its consumer (the HTTP client went away): the agent stops at once.
            let _ = self.channel.send(FrameKind::Close, Vec::new());
        }
    }
}

impl Stream for GuestStream {
    type Item = Result<Vec<u8>, FilesError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        // The consumer asks for more: what it took before is consumed.
        let taken = std::mem::take(&mut this.unconsumed);
        if taken > 0 {
            this.channel.consumed(taken);
        }
        loop {
            let frame = match this.first.take() {
                Some(frame) => frame,
                None => match this.channel.poll_recv(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(frame)) => frame,
                    Poll::Ready(None) => {
                        let vm = this.vm.clone();
                        return this.fail(FilesError::Agent { vm, source: AgentError::Lost });
                    }
                },
            };
            match frame.kind {
                FrameKind::Data if frame.payload.is_empty() && this.end == End::EmptyData => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                FrameKind::Data if frame.payload.is_empty() => {}
                FrameKind::Data => {
                    let mut payload = frame.payload;
                    this.unconsumed = payload.len();
                    if payload.len() as u64 >= this.left {
                        // The limit is reached: this piece is the last.
                        payload.truncate(usize::try_from(this.left).unwrap_or(usize::MAX));
                        this.done = true;
                        let _ = this.channel.send(FrameKind::Close, Vec::new());
                    }
                    this.left -= payload.len() as u64;
                    return Poll::Ready(Some(Ok(payload)));
                }
                FrameKind::Response | FrameKind::Error => {
                    return match answer_in(&this.vm, &frame) {
                        Ok(AgentResponse::Packed { .. }) if this.end == End::Packed => {
                            this.done = true;
                            Poll::Ready(None)
                        }
                        Ok(other) => {
                            let error = unexpected_in(&this.vm, &other);
                            this.fail(error)
                        }
                        Err(e) => this.fail(e),
                    };
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
#[path = "files_tests.rs"]
mod tests;
