//! The agent channel: one multiplexed protocol over a single byte stream (virtio-serial under
//! QEMU, a hybrid vsock socket under Firecracker), between the daemon (host) and
//! `banger-agent` (guest).
//!
//! ## Framing
//! Every frame is `len: u32 BE | channel: u32 BE | kind: u8 | payload`, where `len` counts the
//! channel, kind and payload (so `len >= 5`), and payloads are at most [`MAX_PAYLOAD`] bytes.
//!
//! ## Channels
//! The host opens a channel by sending a [`FrameKind::Request`] on a channel id it has not used
//! on this connection (ids start at 1; 0 is reserved). Everything about that request travels on
//! its channel, so any number of requests run at once. A channel ends with the guest's
//! [`FrameKind::Response`], [`FrameKind::Exit`] or [`FrameKind::Error`]; a `connect` channel is
//! a byte stream instead (see below).
//!
//! | request | host → guest after it | guest → host |
//! |---|---|---|
//! | `ping` | – | `Response(pong)` |
//! | `exec` | `Stdin` chunks, empty `Stdin` = EOF; `Signal`; `Resize` (with `tty`) | `Response(started)`, `Stdout`/`Stderr` chunks, `Exit` |
//! | `read_file` | – | `Data` chunks, then `Response(file)` |
//! | `write_file` | `Data` chunks, empty `Data` = end | `Response(written)` |
//! | `ports` | – | `Response(ports)` |
//! | `connect` | `Data` chunks, empty `Data` = EOF; `Ack`; `Close` | `Response(connected)`, `Data` chunks, empty `Data` = EOF; `Ack` |
//! | `unpack` | tar stream in `Data` chunks, empty `Data` = end; `Close` | `Ack`, then `Response(unpacked)` |
//! | `shutdown` | – | `Response(ok)`, then the guest powers off |
//! | `session` | see [`session`] | see [`session`] |
//! | `reidentify` | – | `Response(ok)` once applied, or `Error` naming what failed |
//! | `stat`, `mkdir`, `remove` | – | `Response(stat/ok)` or `Response(fs_failed)` |
//! | `list` | – | `Data` (JSON lines), `Response(listed)`; or `Response(fs_failed)` |
//! | `read` | – | `Response(opened)`, `Data` chunks, empty `Data` = end; or `Response(fs_failed)` |
//! | `write` | `Data` chunks, empty `Data` = end; `Close` | `Ack`, then `Response(stat)` or `Response(fs_failed)` |
//! | `pack` | – | tar stream in `Data` chunks, `Response(packed)`; or `Response(fs_failed)` |
//!
//! `connect` is a TCP tunnel: the agent connects to the port on the guest's loopback and relays
//! bytes both ways. An empty `Data` half-closes that direction (the agent `shutdown`s its socket
//! for writing when the host's arrives). The channel ends once both directions are closed, with
//! the guest's `Error` (a refused connect, a reset), or with the host's `Close` (the host's
//! client went away: the agent closes the socket at once). Its host → guest direction is
//! flow-controlled like its guest → host one (below): the agent acknowledges what it has
//! written into the socket.
//!
//! `unpack` extracts a tar stream into a guest directory, refusing entries that would land
//! outside it (absolute or `..` paths, writes through symlinks, symlinks pointing out, hard
//! links, device nodes). Its `Data` is flow-controlled like a tunnel's host → guest direction
//! (the agent acknowledges what it has unpacked); `Close` abandons it.
//!
//! ## Flow control: credit for every guest → host stream
//! Every byte the guest streams to the host — `Stdout`, `Stderr` and `Data` on any channel
//! (exec output, session attach and logs, `read_file`, tunnels) — needs credit. A channel
//! starts with [`WINDOW`] bytes of it; the host sends `Ack` (see [`ack_payload`]) with the
//! number of bytes its client has consumed, which grants that many again. The agent stops
//! reading its child's pipe (or socket, or file) while it has no credit, and sends streamed
//! bytes in payloads of at most [`STREAM_CHUNK`]. The host enforces the window: a guest that
//! has more than [`WINDOW`] bytes unacknowledged on a channel, or sends a frame longer than
//! [`MAX_PAYLOAD`], gets that channel closed (the host sends `Close`), never a bigger buffer;
//! other channels go on. Control frames (`Response`, `Exit`, `Error`, ...) need no credit,
//! but the host queues at most [`MAX_PAYLOAD`] bytes of them per channel. The host's `Close`
//! also ends an exec (the process group is killed).
//!
//! ## Terminals
//! An `exec` (or session) with `tty` runs on a pseudo-terminal of that size: the command's
//! stdin, stdout and stderr are the pty's slave (its controlling terminal), its output is one
//! stream sent as `Stdout`, and `Stdin` bytes are typed into it (Ctrl-C as `\x03` makes the
//! guest's line discipline signal its foreground process group). `Resize` (JSON [`TtySize`])
//! changes the window size; the kernel sends the foreground group `SIGWINCH`. Sizes outside
//! [`TtySize::MAX`] are refused by the daemon and ignored by the agent.
//!
//! A command that cannot be found ends with `Exit { code: 127 }` after a line on `Stderr`. When
//! the host side of the stream goes away, the agent kills the processes of that connection (its
//! exec channels; sessions live on) and waits for the next one; the daemon reconnects.

use serde::{Deserialize, Serialize};

pub mod meta;
pub mod session;

/// Largest payload in one frame.
pub const MAX_PAYLOAD: usize = 1024 * 1024;
/// Bytes before the payload: length, channel, kind.
pub const HEADER_LEN: usize = 9;
/// Bytes of streamed output (`Stdout`, `Stderr`, `Data`) a sender may have unacknowledged on
/// one channel, per direction: the credit a channel starts with.
pub const WINDOW: usize = 256 * 1024;
/// A receiver acknowledges once it has consumed this much (a quarter of the window, so a
/// sender never waits on bytes that were consumed but not yet acknowledged).
pub const ACK_EVERY: usize = WINDOW / 4;
/// Largest payload of a streamed frame from the guest: a credit wait is never for more than
/// this, and `STREAM_CHUNK + ACK_EVERY <= WINDOW`, so the window always reopens.
pub const STREAM_CHUNK: usize = 64 * 1024;
/// The tunnel's window (the same as every stream's).
pub const TUNNEL_WINDOW: usize = WINDOW;
/// The tunnel's acknowledgement step (the same as every stream's).
pub const TUNNEL_ACK_EVERY: usize = ACK_EVERY;
const _: () = assert!(STREAM_CHUNK + ACK_EVERY <= WINDOW && STREAM_CHUNK <= MAX_PAYLOAD);

/// The payload of an `Ack` frame: bytes consumed since the last one, as `u32` BE.
pub fn ack_payload(consumed: usize) -> Vec<u8> {
    u32::try_from(consumed).unwrap_or(u32::MAX).to_be_bytes().to_vec()
}

/// Reads an `Ack` payload.
pub fn parse_ack(payload: &[u8]) -> Option<usize> {
    let bytes: [u8; 4] = payload.try_into().ok()?;
    usize::try_from(u32::from_be_bytes(bytes)).ok()
}

/// Why `unpack` refuses a symlink at `link` (a path relative to the target directory) pointing
/// to `target`, or `None` when it stays inside: the target must be relative, its `..`s must
/// all come first (after a name, a `..` could climb out through another symlink) and number
/// at most the link's depth.
pub fn symlink_escape(link: &std::path::Path, target: &std::path::Path) -> Option<&'static str> {
    use std::path::Component;
    if target.as_os_str().is_empty() {
        return Some("the symlink has an empty target");
    }
    let depth = link.components().count().saturating_sub(1);
    let (mut ups, mut named) = (0, false);
    for component in target.components() {
        match component {
            Component::Normal(_) => named = true,
            Component::CurDir => {}
            Component::ParentDir if !named => ups += 1,
            Component::ParentDir => return Some("the symlink's target has '..' after a name"),
            Component::RootDir | Component::Prefix(_) => return Some("the symlink points outside (absolute target)"),
        }
    }
    (ups > depth).then_some("the symlink points outside (too many '..')")
}

/// Name of the virtio-serial port the agent serves on.
pub const AGENT_PORT_NAME: &str = "banger.agent";

/// The vsock port the agent listens on when the VM has no virtio-serial port (Firecracker); the
/// host reaches it through the VMM's hybrid vsock socket with `CONNECT <port>\n`.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Host → guest: JSON [`AgentRequest`]; opens the channel.
    Request = 1,
    /// Guest → host: JSON [`AgentResponse`].
    Response = 2,
    /// Host → guest: bytes for the command's stdin; empty means EOF.
    Stdin = 3,
    /// Guest → host: bytes the command wrote to stdout.
    Stdout = 4,
    /// Guest → host: bytes the command wrote to stderr.
    Stderr = 5,
    /// Guest → host: JSON [`ExitStatus`]; ends an exec channel.
    Exit = 6,
    /// Host → guest: JSON [`SignalRequest`] for a running command.
    Signal = 7,
    /// Guest → host: JSON [`AgentFailure`]; ends the channel.
    Error = 8,
    /// Either way: file contents, or a tunnel's bytes; empty ends a host → guest upload or
    /// half-closes a tunnel.
    Data = 9,
    /// Host → guest: abandon a `connect` tunnel (its socket is closed at once) or an `unpack`,
    /// or detach a session attach; guest → host: the attach is detached.
    Close = 10,
    /// Either way on a `connect` tunnel, guest → host on an `unpack`: bytes of `Data` consumed
    /// (see [`ack_payload`]).
    Ack = 11,
    /// Host → guest on a `tty` exec or session attach: JSON [`TtySize`], the new window size.
    Resize = 12,
}

impl FrameKind {
    /// Whether the guest needs credit to send this kind (see the module docs): streamed bytes.
    pub fn is_credited(self) -> bool {
        matches!(self, Self::Stdout | Self::Stderr | Self::Data)
    }

    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Stdin,
            4 => Self::Stdout,
            5 => Self::Stderr,
            6 => Self::Exit,
            7 => Self::Signal,
            8 => Self::Error,
            9 => Self::Data,
            10 => Self::Close,
            11 => Self::Ack,
            12 => Self::Resize,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The channel it belongs to.
    pub channel: u32,
    /// What it carries.
    pub kind: FrameKind,
    /// The bytes.
    pub payload: Vec<u8>,
}

/// A stream that does not follow the framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A length below the header size (the stream cannot be followed any more).
    #[error("bad frame length {0}")]
    BadLength(u32),
    /// A frame longer than [`MAX_PAYLOAD`] allows: its bytes are skipped as they arrive, never
    /// buffered, and decoding goes on after it.
    #[error("a frame of {len} bytes on channel {channel} is over the limit of {max} bytes", max = MAX_PAYLOAD + 5)]
    Oversize {
        /// The channel it claimed.
        channel: u32,
        /// Its length field.
        len: u32,
    },
    /// An unknown kind byte.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// A JSON payload that does not parse.
    #[error("bad {what} payload: {message}")]
    BadJson {
        /// What was expected.
        what: &'static str,
        /// What serde said.
        message: String,
    },
}

impl Frame {
    /// A frame with raw bytes.
    pub fn new(channel: u32, kind: FrameKind, payload: Vec<u8>) -> Self {
        Self { channel, kind, payload }
    }

    /// A frame with a JSON payload.
    pub fn json(channel: u32, kind: FrameKind, value: &impl Serialize) -> Self {
        // Serialising these plain data types cannot fail.
        Self::new(channel, kind, serde_json::to_vec(value).unwrap_or_default())
    }

    /// Decodes the payload as JSON.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self, what: &'static str) -> Result<T, FrameError> {
        serde_json::from_slice(&self.payload).map_err(|e| FrameError::BadJson { what, message: e.to_string() })
    }

    /// The frame's bytes on the wire. Payloads over [`MAX_PAYLOAD`] must be split by the caller
    /// (see [`chunks`]).
    pub fn encode(&self) -> Vec<u8> {
        let len = u32::try_from(self.payload.len() + 5).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.channel.to_be_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.payload);
        out
    }
}

/// Splits `data` into payload-sized pieces.
pub fn chunks(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.chunks(MAX_PAYLOAD)
}

/// Incremental decoder: feed bytes as they arrive, take whole frames out. It holds at most one
/// frame plus what was pushed since: a caller that takes every frame after each push (of at
/// most `n` bytes) never has more than `MAX_PAYLOAD + HEADER_LEN + n` bytes in it.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of an oversize frame still to discard.
    skip: usize,
}

impl Decoder {
    /// Appends received bytes.
    pub fn push(&mut self, mut bytes: &[u8]) {
        if self.skip > 0 {
            let n = self.skip.min(bytes.len());
            self.skip -= n;
            bytes = &bytes[n..];
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one has arrived. After [`FrameError::Oversize`] decoding can go
    /// on (the frame is skipped); after another error the stream is out of step.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        let total = usize::try_from(len).unwrap_or(usize::MAX);
        if total < 5 {
            return Err(FrameError::BadLength(len));
        }
        if total > MAX_PAYLOAD + 5 {
            if self.buf.len() < HEADER_LEN {
                return Ok(None);
            }
            let channel = u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]);
            let whole = total.saturating_add(4);
            let here = whole.min(self.buf.len());
            self.buf.drain(..here);
            self.skip = whole - here;
            return Err(FrameError::Oversize { channel, len });
        }
        if self.buf.len() < 4 + total {
            return Ok(None);
        }
        let channel = u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]);
        let kind = FrameKind::from_u8(self.buf[8]).ok_or(FrameError::BadKind(self.buf[8]))?;
        let payload = self.buf[HEADER_LEN..4 + total].to_vec();
        self.buf.drain(..4 + total);
        Ok(Some(Frame { channel, kind, payload }))
    }

    /// Bytes received but not yet part of a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// A request that opens a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AgentRequest {
    /// Is the agent there?
    Ping,
    /// Run a command.
    Exec(ExecRequest),
    /// Send a file's contents.
    ReadFile {
        /// Absolute guest path.
        path: String,
    },
    /// Receive a file's contents in `Data` frames.
    WriteFile {
        /// Absolute guest path.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// List listening TCP and UDP ports.
    Ports,
    /// Open a TCP connection to this port on the guest's loopback and relay it in `Data` frames.
    Connect {
        /// Guest port.
        port: u16,
    },
    /// Stop every process, sync, and power off.
    Shutdown,
    /// Start, list, signal, attach to or read the logs of supervised sessions.
    Session(session::SessionOp),
    /// Extract the tar stream that follows in `Data` frames into this directory (made if
    /// missing), refusing anything that would land outside it.
    Unpack {
        /// Absolute guest directory.
        dir: String,
    },
    /// Take on an identity after a restore from a memory snapshot: set the clock, and for a
    /// fork also the hostname, NIC address, ssh host key and machine id.
    Reidentify(Identity),
    /// Before a memory snapshot: fault in (the kernel zeroes) most of the free memory and
    /// release it again, so free pages are zero and the snapshot leaves them out. Answers `Ok`.
    ScrubFreeMemory,
    /// `lstat` a path: answers `Stat`, or `FsFailed`.
    Stat {
        /// Absolute guest path.
        path: String,
    },
    /// List a directory: `Data` chunks of JSON lines (one [`crate::fs::FileStat`] per entry,
    /// sorted by name, at most `limit`), then `Listed`; or `FsFailed` before any `Data`.
    List {
        /// Absolute guest directory.
        path: String,
        /// Most entries to send.
        limit: u32,
    },
    /// Make a directory: answers `Stat`, or `FsFailed`.
    Mkdir {
        /// Absolute guest path.
        path: String,
        /// Make missing parents (`0755`) too, and accept an existing directory.
        parents: bool,
        /// Permission bits (default `0755`).
        mode: Option<u32>,
    },
    /// Remove a path (a symlink itself, never its target; a non-empty directory only with
    /// `recursive`; never `/`): answers `Ok`, or `FsFailed`.
    Remove {
        /// Absolute guest path.
        path: String,
        /// Remove a directory with what it holds.
        recursive: bool,
    },
    /// Stream a regular file (symlinks followed): `Opened` (or `FsFailed`), then `Data` chunks
    /// of at most `limit` bytes in all, an empty `Data` at the end (an `Error` mid-way).
    Read {
        /// Absolute guest path.
        path: String,
        /// Most bytes to send.
        limit: Option<u64>,
    },
    /// Write a file from the `Data` chunks that follow (an empty one ends them), acknowledged
    /// like `unpack`'s, to a temporary file renamed over `path`: answers `Stat`, or `FsFailed`.
    Write {
        /// Absolute guest path.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Make missing parent directories (`0755`).
        parents: bool,
    },
    /// A tar stream of `path` (its base name the top entry; symlinks stored as symlinks, never
    /// followed) in `Data` chunks, then `Packed`; `FsFailed` before any `Data`, `Error` mid-way.
    Pack {
        /// Absolute guest path.
        path: String,
    },
    /// Mount the ext4 file system on the spare disk whose virtio serial is `serial` (the host
    /// has just grown it from empty) read-write at `dir` (made when missing; an existing one
    /// must be an empty directory): answers `Ok`, or `Error`.
    MountDisk {
        /// The disk's serial (`/sys/block/vd*/serial`), e.g. `banger-slot0`.
        serial: String,
        /// Absolute guest directory.
        dir: String,
    },
    /// Unmount what is mounted at `dir` (a disk `mount_disk` mounted): answers `Ok`, or `Error`.
    UnmountDisk {
        /// Absolute guest directory.
        dir: String,
    },
}

/// What a guest restored from a memory snapshot becomes. The clock is always set; every other
/// part only when present (a plain resume of the same VM sends the time alone).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The host's wall-clock time in milliseconds since the Unix epoch, read just before
    /// sending: the guest clock is set to it.
    pub time_unix_ms: u64,
    /// New hostname (also written to /etc/hostname).
    #[serde(default)]
    pub hostname: Option<String>,
    /// New `eth0` MAC address and IPv4 configuration.
    #[serde(default)]
    pub net: Option<NetIdentity>,
    /// New ssh host key, installed for sshd (which reads it for each new connection; open
    /// ssh sessions stay). banger's copy on the work disk is rewritten at the next boot.
    #[serde(default)]
    pub host_key: Option<HostKey>,
    /// New /etc/machine-id contents (32 lowercase hex digits).
    #[serde(default)]
    pub machine_id: Option<String>,
}

/// The guest NIC's new identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetIdentity {
    /// MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Address and prefix, e.g. `172.30.0.3/24`.
    pub cidr: String,
    /// Default gateway.
    pub gateway: Option<String>,
    /// Name server(s) for /etc/resolv.conf, comma-separated.
    pub dns: Option<String>,
}

/// An ssh host key pair in OpenSSH text form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKey {
    /// The private key (OpenSSH PEM text).
    pub private_key: String,
    /// The public key line.
    pub public_key: String,
}

/// A command to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up on `PATH`.
    pub argv: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; `/root` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Whether the host will send stdin; otherwise stdin is /dev/null (with `tty`: the pty,
    /// into which nothing is typed).
    #[serde(default)]
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size (stdout and stderr become one `Stdout` stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
    /// Run it as a container process: in a private mount namespace whose root is the VM's
    /// container disk, with exactly `env` and as this user (the containerd shim's tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerExec>,
}

/// How a container process runs (from its OCI spec's `process`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerExec {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary group ids (at most [`ContainerExec::MAX_GROUPS`]).
    #[serde(default)]
    pub groups: Vec<u32>,
    /// The root to enter: a disk attached to the running VM and mounted at a directory under
    /// [`ContainerExec::ROOTS_DIR`] (a pod's container); `None` for the VM's own container disk
    /// (a task VM, a pod's sandbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
}

impl ContainerExec {
    /// The most supplementary groups a container process gets.
    pub const MAX_GROUPS: usize = 64;
    /// Where the roots of a pod's containers are mounted in the guest, one directory each.
    pub const ROOTS_DIR: &'static str = "/run/banger/containers";

    /// The guest directory the root of container `name` is mounted at: under
    /// [`ContainerExec::ROOTS_DIR`], `name` reduced to at most 64 of `[a-z0-9_-]`.
    pub fn root_dir(name: &str) -> String {
        let clean: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c.to_ascii_lowercase() } else { '-' })
            .take(64)
            .collect();
        format!("{}/{clean}/rootfs", Self::ROOTS_DIR)
    }

    /// Whether `dir` is a directory [`ContainerExec::root_dir`] can give (what the agent enters).
    pub fn valid_root(dir: &str) -> bool {
        let Some(rest) = dir.strip_prefix(Self::ROOTS_DIR).and_then(|r| r.strip_prefix('/')) else { return false };
        let Some(name) = rest.strip_suffix("/rootfs") else { return false };
        !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    }
}

/// A terminal's window size, in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
pub struct TtySize {
    /// Lines, 1 to 4096 ([`TtySize::MAX`]).
    #[cfg_attr(feature = "api", schema(minimum = 1, maximum = 4096))]
    pub rows: u16,
    /// Columns, 1 to 4096 ([`TtySize::MAX`]).
    #[cfg_attr(feature = "api", schema(minimum = 1, maximum = 4096))]
    pub cols: u16,
}

impl TtySize {
    /// The largest number of rows or columns accepted (far beyond any screen; it bounds what a
    /// client can make the guest's programs lay out).
    pub const MAX: u16 = 4096;

    /// The size a terminal gets when the caller has none to give.
    pub const DEFAULT: Self = Self { rows: 24, cols: 80 };

    /// Why this size is refused, or `None` when both sides are within 1..=[`Self::MAX`].
    pub fn check(self) -> Option<String> {
        let ok = |n: u16| (1..=Self::MAX).contains(&n);
        (!ok(self.rows) || !ok(self.cols)).then(|| {
            format!(
                "terminal size {}x{} (rows x columns) is out of range: each must be 1 to {}",
                self.rows,
                self.cols,
                Self::MAX
            )
        })
    }

    /// Reads a `Resize` payload, refusing sizes out of range.
    pub fn parse_resize(payload: &[u8]) -> Result<Self, String> {
        let size: Self = serde_json::from_slice(payload).map_err(|e| format!("bad resize payload: {e}"))?;
        match size.check() {
            Some(why) => Err(why),
            None => Ok(size),
        }
    }
}

/// A guest's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentResponse {
    /// Answer to `ping`.
    Pong {
        /// The agent's version.
        version: String,
        /// Guest uptime in milliseconds.
        uptime_ms: u64,
        /// Guest kernel release.
        kernel: String,
    },
    /// An exec's process started.
    Started {
        /// Its guest pid.
        pid: u32,
    },
    /// A `read_file` finished.
    File {
        /// Bytes sent.
        size: u64,
        /// Permission bits.
        mode: u32,
    },
    /// A `write_file` finished.
    Written {
        /// Bytes written.
        size: u64,
    },
    /// Answer to `ports`.
    Ports {
        /// Listening sockets.
        ports: Vec<ListeningPort>,
    },
    /// A `connect` tunnel is open.
    Connected {
        /// The guest address it reached, e.g. `127.0.0.1:8000`.
        address: String,
    },
    /// An `unpack` finished.
    Unpacked {
        /// Entries extracted (files, directories, symlinks).
        entries: u64,
        /// Bytes of file contents written.
        bytes: u64,
    },
    /// Generic success.
    Ok,
    /// One session's state.
    Session(session::SessionState),
    /// Every session the agent knows.
    Sessions {
        /// Oldest first.
        sessions: Vec<session::SessionState>,
    },
    /// A path's `lstat` (`stat`, `mkdir`, `write`).
    Stat(crate::fs::FileStat),
    /// A `list` finished.
    Listed {
        /// Entries sent.
        count: u64,
        /// Whether the directory holds more than were sent.
        truncated: bool,
    },
    /// A `read`'s file is open; its `Data` follows.
    Opened {
        /// The file's whole size.
        size: u64,
    },
    /// A `pack` finished.
    Packed {
        /// Entries in the stream.
        entries: u64,
        /// Bytes of file contents in it.
        bytes: u64,
    },
    /// A file request failed before it streamed anything.
    FsFailed(crate::fs::FsError),
}

/// A listening socket in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListeningPort {
    /// `tcp`, `tcp6`, `udp` or `udp6`.
    pub proto: String,
    /// Bound address.
    pub address: String,
    /// Port number.
    pub port: u16,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, when it exited; 128 + signal when a signal ended it.
    pub code: i32,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
}

/// A signal for a running command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalRequest {
    /// Signal number.
    pub signal: i32,
}

/// A request that failed in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentFailure {
    /// One line for humans.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_a_split_stream() {
        let frames = vec![
            Frame::json(
                1,
                FrameKind::Request,
                &AgentRequest::Exec(ExecRequest { argv: vec!["true".into()], ..Default::default() }),
            ),
            Frame::new(1, FrameKind::Stdin, b"hello".to_vec()),
            Frame::new(1, FrameKind::Stdin, Vec::new()),
            Frame::json(2, FrameKind::Exit, &ExitStatus { code: 7, signal: None }),
        ];
        let wire: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        let mut d = Decoder::default();
        let mut out = Vec::new();
        for byte in wire.chunks(3) {
            d.push(byte);
            while let Some(f) = d.next_frame().expect("decode") {
                out.push(f);
            }
        }
        assert_eq!(out, frames);
        assert_eq!(d.pending(), 0);
        let req: AgentRequest = out[0].parse("request").expect("json");
        assert!(matches!(req, AgentRequest::Exec(ExecRequest { ref argv, .. }) if argv == &["true"]));
    }

    #[test]
    fn bad_streams_are_refused() {
        let mut d = Decoder::default();
        d.push(&[0, 0, 0, 2, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::BadLength(2)));
        let mut d = Decoder::default();
        d.push(&[0, 0, 0, 5, 0, 0, 0, 1, 99]);
        assert_eq!(d.next_frame(), Err(FrameError::BadKind(99)));
        let mut d = Decoder::default();
        d.push(&u32::MAX.to_be_bytes());
        assert_eq!(d.next_frame(), Ok(None), "an oversize frame is named by its channel, once that has arrived");
    }

    #[test]
    fn an_oversize_frame_is_skipped_without_buffering_and_decoding_goes_on() {
        let len = u32::try_from(MAX_PAYLOAD + 6).expect("fits");
        let mut d = Decoder::default();
        let mut header = len.to_be_bytes().to_vec();
        header.extend_from_slice(&7u32.to_be_bytes());
        header.push(FrameKind::Stdout as u8);
        d.push(&header);
        assert_eq!(d.next_frame(), Err(FrameError::Oversize { channel: 7, len }));
        // Its payload arrives in pieces and is dropped as it comes.
        for _ in 0..(MAX_PAYLOAD + 1) / 4096 {
            d.push(&[0u8; 4096]);
            assert!(d.pending() == 0, "nothing of it is kept");
        }
        let rest = MAX_PAYLOAD + 1 - (MAX_PAYLOAD + 1) / 4096 * 4096;
        let mut tail = vec![0u8; rest];
        tail.extend(Frame::new(8, FrameKind::Stdout, b"ok".to_vec()).encode());
        d.push(&tail);
        assert_eq!(d.next_frame(), Ok(Some(Frame::new(8, FrameKind::Stdout, b"ok".to_vec()))));
        assert!(FrameKind::Data.is_credited() && !FrameKind::Exit.is_credited());
    }

    #[test]
    fn json_shapes_are_stable() {
        let ping = serde_json::to_string(&AgentRequest::Ping).expect("json");
        assert_eq!(ping, r#"{"op":"ping"}"#);
        let w = serde_json::to_string(&AgentRequest::WriteFile { path: "/x".into(), mode: 0o644 }).expect("json");
        assert_eq!(w, r#"{"op":"write_file","path":"/x","mode":420}"#);
        let started = serde_json::to_string(&AgentResponse::Started { pid: 9 }).expect("json");
        assert_eq!(started, r#"{"type":"started","pid":9}"#);
        let connect = serde_json::to_string(&AgentRequest::Connect { port: 8000 }).expect("json");
        assert_eq!(connect, r#"{"op":"connect","port":8000}"#);
        let unpack = serde_json::to_string(&AgentRequest::Unpack { dir: "/root/r".into() }).expect("json");
        assert_eq!(unpack, r#"{"op":"unpack","dir":"/root/r"}"#);
        let id = AgentRequest::Reidentify(Identity { time_unix_ms: 5, ..Default::default() });
        let text = serde_json::to_string(&id).expect("json");
        assert_eq!(
            text,
            r#"{"op":"reidentify","time_unix_ms":5,"hostname":null,"net":null,"host_key":null,"machine_id":null}"#
        );
        let back: AgentRequest = serde_json::from_str(r#"{"op":"reidentify","time_unix_ms":7}"#).expect("parse");
        assert_eq!(back, AgentRequest::Reidentify(Identity { time_unix_ms: 7, ..Default::default() }));
    }

    #[test]
    fn container_roots_are_plain_directories_under_the_roots_dir() {
        let dir = ContainerExec::root_dir("Abc.123/../x");
        assert_eq!(dir, "/run/banger/containers/abc-123----x/rootfs");
        assert!(ContainerExec::valid_root(&dir));
        assert!(ContainerExec::valid_root(&ContainerExec::root_dir(&"f".repeat(200))));
        for bad in [
            "/run/banger/containers/rootfs",
            "/run/banger/containers//rootfs",
            "/run/banger/containers/../rootfs",
            "/run/banger/containers/a/b/rootfs",
            "/run/banger/container/rootfs",
            "/run/banger/containers/a/rootfs/x",
        ] {
            assert!(!ContainerExec::valid_root(bad), "{bad}");
        }
        // A request without `root` (an older shim) enters the VM's own container disk.
        let old: ContainerExec = serde_json::from_str(r#"{"uid":0,"gid":0}"#).expect("parse");
        assert_eq!(old.root, None);
    }

    #[test]
    fn tty_is_optional_on_the_wire_and_resizes_are_bounded() {
        let old: ExecRequest = serde_json::from_str(r#"{"argv":["sh"]}"#).expect("an old request parses");
        assert_eq!(old.tty, None);
        let plain =
            serde_json::to_string(&ExecRequest { argv: vec!["sh".into()], ..Default::default() }).expect("json");
        assert!(!plain.contains("tty"), "no tty, no field: {plain}");
        let tty =
            ExecRequest { argv: vec!["sh".into()], tty: Some(TtySize { rows: 40, cols: 120 }), ..Default::default() };
        let text = serde_json::to_string(&tty).expect("json");
        assert!(text.ends_with(r#""tty":{"rows":40,"cols":120}}"#), "{text}");
        assert_eq!(serde_json::from_str::<ExecRequest>(&text).expect("parse"), tty);

        let resize = Frame::json(1, FrameKind::Resize, &TtySize { rows: 50, cols: 132 });
        let mut d = Decoder::default();
        d.push(&resize.encode());
        let back = d.next_frame().expect("decode").expect("a frame");
        assert_eq!(back.kind, FrameKind::Resize);
        assert_eq!(TtySize::parse_resize(&back.payload), Ok(TtySize { rows: 50, cols: 132 }));
        for bad in [r#"{"rows":0,"cols":80}"#, r#"{"rows":24,"cols":4097}"#, r#"{"rows":-1,"cols":80}"#, "[]"] {
            assert!(TtySize::parse_resize(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!(TtySize::DEFAULT.check(), None);
        assert!(!FrameKind::Resize.is_credited());
    }

    #[test]
    fn symlinks_must_stay_inside() {
        use std::path::Path;
        let escape = |link: &str, target: &str| symlink_escape(Path::new(link), Path::new(target));
        for (link, target) in [("l", "x"), ("l", "./x/y"), ("a/l", "../x"), ("a/b/l", "../../x/y"), ("a/l", "..")] {
            assert_eq!(escape(link, target), None, "{link} -> {target}");
        }
        for (link, target) in [("l", "../x"), ("l", "/etc"), ("a/l", "../../x"), ("a/b/l", "x/../../.."), ("l", "")] {
            assert!(escape(link, target).is_some(), "{link} -> {target}");
        }
        let close = Frame::new(3, FrameKind::Close, Vec::new()).encode();
        let mut d = Decoder::default();
        d.push(&close);
        assert_eq!(d.next_frame().expect("decode").map(|f| f.kind), Some(FrameKind::Close));
        assert_eq!(parse_ack(&ack_payload(65536)), Some(65536));
        assert_eq!(parse_ack(b"xy"), None);
    }
}
