//! Running buildah: each command in a private mount and PID namespace of its own, its storage
//! in the build's work directory, its output streamed line by line to [`BuildEvents`] and
//! cancellable (killing `unshare` kills the namespace's every process).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::{io_error, DockerfileBuild, DockerfileError};

/// Longest output line passed on; the rest of a longer line is dropped.
const MAX_LINE: usize = 1024;
/// Lines of a failed step's output kept for its error.
const TAIL_LINES: usize = 30;
/// How often a running command is checked for cancellation (and output flushed).
const TICK: Duration = Duration::from_millis(100);

/// What a build reports, and how it is asked to stop.
pub trait BuildEvents {
    /// A new stage begins.
    fn stage(&mut self, name: &str);
    /// A line of the builder's output.
    fn output(&mut self, line: &str);
    /// Called while a command runs, at least every 100 ms: a chance to flush batched output.
    fn tick(&mut self) {}
    /// Whether the build should stop.
    fn cancelled(&self) -> bool;
}

/// buildah's storage for one build.
pub(super) struct Storage {
    root: PathBuf,
    run: PathBuf,
}

impl Storage {
    pub(super) fn new(work: &Path) -> Result<Self, DockerfileError> {
        let installed = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("buildah").is_file()));
        if !installed {
            return Err(DockerfileError::NoBuildah);
        }
        let storage = Self { root: work.join("storage"), run: work.join("run") };
        for dir in [&storage.root, &storage.run] {
            std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        }
        Ok(storage)
    }

    /// `unshare … buildah --root … ARGS`.
    fn command(&self, args: &[OsString]) -> Command {
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--mount-proc", "--"])
            .arg("buildah")
            .arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.run)
            .args(["--storage-driver", "overlay"])
            .args(args)
            .env("LC_ALL", "C")
            .env("BUILDAH_ISOLATION", "chroot")
            .stdin(Stdio::null());
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
        // parent; if the daemon's thread dies, the namespace is killed with its `unshare`.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        command
    }

    /// Loads the OCI layout `dir` (tag `latest`) as image `name` (e.g. `banger/minimal`).
    /// `dir` is given relative to its parent (the working directory), as buildah names the
    /// pulled image after the path, which must then be lowercase.
    pub(super) fn load_base(
        &self,
        dir: &Path,
        name: &str,
        events: &mut dyn BuildEvents,
    ) -> Result<(), DockerfileError> {
        let (Some(parent), Some(leaf)) = (dir.parent(), dir.file_name()) else {
            return Err(DockerfileError::Context(dir.to_owned()));
        };
        let reference = format!("oci:{}:latest", leaf.to_string_lossy());
        let mut pull = self.command(&["pull".into(), "--quiet".into(), reference.into()]);
        pull.current_dir(parent);
        let out = self.run_streaming(pull, "base", events)?;
        let id = out.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default().trim().to_owned();
        self.run_streaming(self.command(&["tag".into(), id.into(), name.into()]), "base", events)?;
        Ok(())
    }

    /// `buildah bud` of `build`, tagged `tag`; each `STEP n/m: …` line becomes a stage.
    pub(super) fn build(
        &self,
        build: &DockerfileBuild,
        tag: &str,
        events: &mut dyn BuildEvents,
    ) -> Result<(), DockerfileError> {
        let mut args: Vec<OsString> =
            ["bud", "--isolation", "chroot", "--layers=false", "--pull=missing", "--tag", tag]
                .map(OsString::from)
                .to_vec();
        args.push("--file".into());
        args.push(build.dockerfile.clone().into());
        for (key, value) in &build.build_args {
            args.push("--build-arg".into());
            args.push(format!("{key}={value}").into());
        }
        for (id, file) in &build.secrets {
            args.push("--secret".into());
            args.push(format!("id={id},src={}", file.display()).into());
        }
        args.push(build.context.clone().into());
        self.run_streaming(self.command(&args), "the build", events).map(drop)
    }

    /// Pushes `tag` as an uncompressed OCI layout into `out` (tag `latest`).
    pub(super) fn push(&self, tag: &str, out: &Path, events: &mut dyn BuildEvents) -> Result<(), DockerfileError> {
        let dest = format!("oci:{}:latest", out.display());
        let args = ["push", "--quiet", "--disable-compression", tag].map(OsString::from);
        let mut args = args.to_vec();
        args.push(dest.into());
        self.run_streaming(self.command(&args), "export", events).map(drop)
    }

    /// Removes the storage (nothing is mounted: every mount lived in a namespace now gone).
    pub(super) fn remove(&self) -> Result<(), DockerfileError> {
        for dir in [&self.root, &self.run] {
            std::fs::remove_dir_all(dir).map_err(io_error(dir))?;
        }
        Ok(())
    }

    /// Runs a buildah `command` (from [`Self::command`]), passing its merged stdout and stderr to `events` line by line
    /// (a `STEP` line opens a stage); returns the output. On failure the error names the step
    /// (`phase` before the first) and holds its last lines. Cancellation kills it.
    fn run_streaming(
        &self,
        mut command: Command,
        phase: &str,
        events: &mut dyn BuildEvents,
    ) -> Result<String, DockerfileError> {
        let (reader, writer) = std::io::pipe().map_err(io_error(Path::new("pipe")))?;
        let writer2 = writer.try_clone().map_err(io_error(Path::new("pipe")))?;
        command.stdout(writer).stderr(writer2);
        let command_line = format!("buildah ({phase})");
        let mut child = command
            .spawn()
            .map_err(|e| DockerfileError::Command { command: command_line.clone(), detail: e.to_string() })?;
        // The command's own ends of the pipe must be closed here, or the reader never sees EOF.
        drop(command);
        let lines = spawn_reader(reader);
        let mut step = phase.to_owned();
        let mut tail: VecDeque<String> = VecDeque::new();
        let mut all = String::new();
        let status = loop {
            match lines.recv_timeout(TICK) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("STEP ") {
                        step = format!("STEP {rest}");
                        tail.clear();
                        events.stage(&step);
                        continue;
                    }
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line.clone());
                    if all.len() < 64 * 1024 {
                        all.push_str(&line);
                        all.push('\n');
                    }
                    events.output(&line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => events.tick(),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    break child.wait().map_err(|e| DockerfileError::Command {
                        command: command_line.clone(),
                        detail: e.to_string(),
                    })?
                }
            }
            if events.cancelled() {
                kill(&mut child);
                return Err(DockerfileError::Cancelled);
            }
        };
        events.tick();
        if events.cancelled() {
            return Err(DockerfileError::Cancelled);
        }
        if status.success() {
            return Ok(all);
        }
        // buildah ends with `Error: … : exit status 1`: the reason; the lines before it are the
        // step's output.
        let reason = match tail.back() {
            Some(last) if last.starts_with("Error:") || last.starts_with("error") => {
                let last = tail.pop_back().unwrap_or_default();
                last.rsplit(": ").next().unwrap_or(&last).to_owned()
            }
            _ => status.to_string(),
        };
        let output: Vec<String> = tail.into_iter().collect();
        Err(DockerfileError::Step { step, reason, output: output.join("\n") })
    }
}

/// Kills `unshare` (its `--kill-child` then kills the namespace's init, and with it every
/// process of the build) and reaps it.
fn kill(child: &mut Child) {
    if let Err(e) = child.kill() {
        tracing::warn!(error = %e, "cannot kill buildah");
    }
    let _ = child.wait();
}

/// Reads `reader` line by line (each cut at [`MAX_LINE`] bytes, lossily decoded) on a thread;
/// the channel closes at EOF.
fn spawn_reader(reader: std::io::PipeReader) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            // A bounded read: at most MAX_LINE bytes of a line are kept, the rest skipped.
            match (&mut reader).take(MAX_LINE as u64).read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            // The rest of a longer line is skipped, in bounded pieces.
            let mut skip = Vec::new();
            let mut more = buf.last() != Some(&b'\n') && buf.len() == MAX_LINE;
            while more {
                skip.clear();
                more = match (&mut reader).take(MAX_LINE as u64).read_until(b'\n', &mut skip) {
                    Ok(n) => n == MAX_LINE && skip.last() != Some(&b'\n'),
                    Err(_) => false,
                };
            }
            let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
pub(crate) mod tests {
    use super::BuildEvents;

    /// Events recorded by a test.
    #[derive(Default)]
    pub(crate) struct Recorded {
        pub(crate) stages: Vec<String>,
        pub(crate) output: Vec<String>,
        pub(crate) cancel: bool,
    }

    impl BuildEvents for Recorded {
        fn stage(&mut self, name: &str) {
            self.stages.push(name.to_owned());
        }
        fn output(&mut self, line: &str) {
            self.output.push(line.to_owned());
        }
        fn cancelled(&self) -> bool {
            self.cancel
        }
    }
}
