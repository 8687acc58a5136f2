//! The check of a patch a guest hands back (`workspace export --patch`), before it is written.
//!
//! The patch is parsed the way `git apply` reads it, and anything this parser does not read
//! exactly is refused rather than guessed at:
//! - it is a sequence of `diff --git` sections; inside a section only git's extended header
//!   lines, `---`/`+++`, hunks whose line counts match their `@@` header, and `GIT binary
//!   patch` data may appear (no stray lines, which `git apply` would skip and might then read
//!   as a traditional diff);
//! - every path is C-unquoted first (`"b/\056\056/x"` is `b/../x`), must carry its `a/`/`b/`
//!   prefix, be the same on every line of its section, and be relative, without `.`, `..`,
//!   empty or `.git` components;
//! - every section states its mode (`index … MODE`, `new file mode`, …), so that a hunk cannot
//!   silently retarget a symlink the host has; modes are files (100644, 100755) or symlinks
//!   (120000); submodules and type changes between a file and a symlink are refused;
//! - a symlink's new target (created or retargeted) is its hunk's one `+` line, with no context
//!   and no newline; it must point inside the repository (`symlink_escape`); binary symlink
//!   data is refused;
//! - renames and copies are refused (the export asks git for neither, with `--no-renames`).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

/// A patch that is refused.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The patch is not a git diff, or reaches outside the repository.
    #[error("the guest's patch is refused: {0}; nothing was written")]
    Refused(String),
}

/// What a checked patch holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatchSummary {
    /// Files it changes.
    pub files: usize,
}

/// A file's mode as a patch states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    File,
    Symlink,
}

fn parse_mode(text: &[u8]) -> Result<Mode, String> {
    match text {
        b"100644" | b"100755" => Ok(Mode::File),
        b"120000" => Ok(Mode::Symlink),
        b"160000" => Err("it changes a submodule (mode 160000), which is not accepted".into()),
        other => Err(format!("mode '{}' is not accepted (only files and symlinks)", shown(other))),
    }
}

/// Bytes for an error message.
fn shown(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).escape_debug().to_string()
}

/// Where the parser is inside a section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Extended header lines, `---`, `+++`.
    Header,
    /// Inside a hunk with (old, new) lines left.
    Hunk(u64, u64),
    /// Just after a hunk: another hunk, a `\` marker or the next section.
    AfterHunk,
    /// `GIT binary patch`: expecting `literal N` / `delta N` (or the end after `blocks`).
    BinaryStart { blocks: u8 },
    /// Base85 lines of a binary block, up to an empty line.
    BinaryData { blocks: u8 },
}

/// One `diff --git` section.
struct Section {
    /// The path (without its prefix), as bytes.
    path: Vec<u8>,
    /// Whether any mode line of the section names a file, or a symlink.
    file_mode: bool,
    symlink_mode: bool,
    created: bool,
    deleted: bool,
    at: At,
    hunks: usize,
    /// Where the first hunk starts (old, new).
    old_start: u64,
    new_start: u64,
    binary: bool,
    /// Of the hunks: context lines, and the `+` lines' contents.
    context: usize,
    added: Vec<Vec<u8>>,
    /// Whether the last `+` line had "\ No newline at end of file" after it.
    added_no_newline: bool,
    /// The kind of the last hunk line (for the `\` marker).
    last: u8,
}

impl Section {
    fn new(rest: &[u8]) -> Result<Self, String> {
        let path = header_names(rest)?;
        check_path(&path)?;
        Ok(Self {
            path,
            file_mode: false,
            symlink_mode: false,
            created: false,
            deleted: false,
            at: At::Header,
            hunks: 0,
            old_start: 0,
            new_start: 0,
            binary: false,
            context: 0,
            added: Vec::new(),
            added_no_newline: false,
            last: 0,
        })
    }

    fn shown(&self) -> String {
        shown(&self.path)
    }

    fn line(&mut self, line: &[u8]) -> Result<(), String> {
        match self.at {
            At::Hunk(old, new) => self.hunk_line(line, old, new),
            At::BinaryStart { blocks } => {
                let size = line.strip_prefix(b"literal ").or_else(|| line.strip_prefix(b"delta "));
                match size {
                    Some(n) if blocks < 2 && !n.is_empty() && n.iter().all(u8::is_ascii_digit) => {
                        self.at = At::BinaryData { blocks: blocks + 1 };
                        Ok(())
                    }
                    _ => Err(format!("unexpected line '{}' in the binary data of {}", shown(line), self.shown())),
                }
            }
            At::BinaryData { blocks } => {
                if line.is_empty() {
                    self.at = At::BinaryStart { blocks };
                    return Ok(());
                }
                let base85 = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&()*+-;<=>?@^_`{|}~".contains(b);
                if line[0].is_ascii_alphabetic() && line.iter().all(base85) {
                    Ok(())
                } else {
                    Err(format!("unexpected line '{}' in the binary data of {}", shown(line), self.shown()))
                }
            }
            At::Header | At::AfterHunk => self.outside_hunk(line),
        }
    }

    fn hunk_line(&mut self, line: &[u8], old: u64, new: u64) -> Result<(), String> {
        let kind = line.first().copied().unwrap_or(b' ');
        let (old, new) = match kind {
            // `git apply` reads an empty line as an empty context line.
            b' ' => {
                self.context += 1;
                (old.checked_sub(1), new.checked_sub(1))
            }
            b'-' => (old.checked_sub(1), Some(new)),
            b'+' => {
                self.added.push(line[1..].to_vec());
                self.added_no_newline = false;
                (Some(old), new.checked_sub(1))
            }
            b'\\' => {
                self.no_newline_marker()?;
                return Ok(());
            }
            _ => return Err(format!("a hunk of {} ends early, at '{}'", self.shown(), shown(line))),
        };
        let (Some(old), Some(new)) = (old, new) else {
            return Err(format!("a hunk of {} holds more lines than its header says", self.shown()));
        };
        self.last = kind;
        self.at = if old == 0 && new == 0 { At::AfterHunk } else { At::Hunk(old, new) };
        Ok(())
    }

    fn no_newline_marker(&mut self) -> Result<(), String> {
        if self.last == 0 {
            return Err(format!("a '\\' line of {} follows no hunk line", self.shown()));
        }
        if self.last == b'+' {
            self.added_no_newline = true;
        }
        self.last = 0;
        Ok(())
    }

    fn outside_hunk(&mut self, line: &[u8]) -> Result<(), String> {
        if let Some(header) = line.strip_prefix(b"@@ ") {
            let (old_start, old, new_start, new) =
                hunk_header(header).ok_or_else(|| format!("bad hunk header '{}'", shown(line)))?;
            if self.binary {
                return Err(format!("{} has both binary data and hunks", self.shown()));
            }
            self.hunks += 1;
            if self.hunks == 1 {
                (self.old_start, self.new_start) = (old_start, new_start);
            }
            self.last = 0;
            self.at = if old == 0 && new == 0 { At::AfterHunk } else { At::Hunk(old, new) };
            return Ok(());
        }
        if self.at == At::AfterHunk {
            if line.starts_with(b"\\") {
                return self.no_newline_marker();
            }
            return Err(format!("unexpected line '{}' after a hunk of {}", shown(line), self.shown()));
        }
        self.header_line(line)
    }

    fn header_line(&mut self, line: &[u8]) -> Result<(), String> {
        let mode_after = |prefix: &[u8]| line.strip_prefix(prefix).map(parse_mode).transpose();
        if let Some(mode) = mode_after(b"new file mode ")? {
            self.created = true;
            self.stated(mode);
        } else if let Some(mode) = mode_after(b"deleted file mode ")? {
            self.deleted = true;
            self.stated(mode);
        } else if let Some(mode) = mode_after(b"old mode ")?.or(mode_after(b"new mode ")?) {
            self.stated(mode);
        } else if let Some(rest) = line.strip_prefix(b"index ") {
            let mut words = rest.split(|&b| b == b' ');
            let ids = words.next().unwrap_or_default();
            let hex = |id: &[u8]| !id.is_empty() && id.iter().all(u8::is_ascii_hexdigit);
            let ids_ok = ids.windows(2).position(|w| w == b"..").is_some_and(|i| hex(&ids[..i]) && hex(&ids[i + 2..]));
            if !ids_ok {
                return Err(format!("bad index line '{}'", shown(line)));
            }
            if let Some(mode) = words.next() {
                self.stated(parse_mode(mode)?);
            }
            if words.next().is_some() {
                return Err(format!("bad index line '{}'", shown(line)));
            }
        } else if let Some(rest) = line.strip_prefix(b"--- ") {
            self.file_line(rest, b"a/", "---")?;
        } else if let Some(rest) = line.strip_prefix(b"+++ ") {
            self.file_line(rest, b"b/", "+++")?;
        } else if line == b"GIT binary patch" {
            self.binary = true;
            self.at = At::BinaryStart { blocks: 0 };
        } else if ["rename ", "copy ", "similarity index ", "dissimilarity index "]
            .iter()
            .any(|p| line.starts_with(p.as_bytes()))
        {
            return Err(format!(
                "{} is renamed, copied or rewritten ('{}'); the export asks git for plain changes only",
                self.shown(),
                shown(line)
            ));
        } else if line.starts_with(b"Binary files ") {
            return Err(format!("{} is binary but the patch carries no data for it", self.shown()));
        } else {
            return Err(format!("unexpected line '{}' in the header of {}", shown(line), self.shown()));
        }
        Ok(())
    }

    /// A mode line. Which line git takes a mode from is not modelled: a section whose lines
    /// name both a file mode and a symlink mode is refused whatever their order.
    fn stated(&mut self, mode: Mode) {
        match mode {
            Mode::File => self.file_mode = true,
            Mode::Symlink => self.symlink_mode = true,
        }
    }

    /// A `---` or `+++` line: `/dev/null`, or the section's path with its prefix.
    fn file_line(&self, rest: &[u8], prefix: &[u8], what: &str) -> Result<(), String> {
        if rest == b"/dev/null" {
            return Ok(());
        }
        // git ends a name that holds a space with a tab, quoted or not.
        let rest = rest.strip_suffix(b"\t").unwrap_or(rest);
        let name = if rest.first() == Some(&b'"') {
            let (name, used) = unquote(rest)?;
            if used != rest.len() {
                return Err(format!("trailing text after the quoted path in '{what} {}'", shown(rest)));
            }
            name
        } else {
            rest.to_vec()
        };
        let path = name
            .strip_prefix(prefix)
            .ok_or_else(|| format!("the path in '{what} {}' lacks the {} prefix", shown(rest), shown(prefix)))?;
        check_path(path)?;
        if path != self.path.as_slice() {
            return Err(format!("'{what} {}' names another file than its section ({})", shown(rest), self.shown()));
        }
        Ok(())
    }

    /// The checks on a whole section.
    fn finish(self) -> Result<(), String> {
        let name = self.shown();
        match self.at {
            At::Hunk(..) => return Err(format!("the last hunk of {name} ends early")),
            At::BinaryData { .. } => return Err(format!("the binary data of {name} ends early")),
            At::BinaryStart { blocks: 0 } => return Err(format!("the binary data of {name} is missing")),
            _ => {}
        }
        if self.created && self.deleted {
            return Err(format!("{name} is both created and deleted"));
        }
        if !self.file_mode && !self.symlink_mode {
            return Err(format!(
                "the section of {name} states no mode (an 'index … MODE' line), so a symlink cannot be told from a file"
            ));
        }
        if self.file_mode && self.symlink_mode {
            return Err(format!("{name} changes between a file and a symlink"));
        }
        if !self.symlink_mode || self.deleted {
            return Ok(());
        }
        // A symlink made or retargeted: its target is the one `+` line of its one hunk.
        if self.binary {
            return Err(format!("the symlink {name} comes as binary data; its target cannot be checked"));
        }
        if self.hunks == 0 && !self.created {
            // A mode-only section of a symlink leaves it as it is.
            return Ok(());
        }
        let [target] = self.added.as_slice() else {
            return Err(format!("the symlink {name} gets a target of {} lines", self.added.len()));
        };
        if self.hunks != 1 || self.context != 0 || self.new_start != 1 || self.old_start > 1 {
            return Err(format!("the symlink {name} is changed by a hunk that does not replace its whole target"));
        }
        if !self.added_no_newline || target.is_empty() || target.contains(&0) {
            return Err(format!("the symlink {name} gets a malformed target '{}'", shown(target)));
        }
        let link = Path::new(OsStr::from_bytes(&self.path));
        if let Some(why) = banger_proto::agent::symlink_escape(link, Path::new(OsStr::from_bytes(target))) {
            return Err(format!("{why} ({name} -> {})", shown(target)));
        }
        Ok(())
    }
}

/// Checks a patch from the guest: empty, or a git diff that `git apply` would read exactly as
/// checked here (see the module docs).
pub fn check_patch(patch: &[u8]) -> Result<PatchSummary, PatchError> {
    if patch.is_empty() {
        return Ok(PatchSummary::default());
    }
    if !patch.starts_with(b"diff --git ") {
        return Err(PatchError::Refused("it is not a git diff".into()));
    }
    let body = patch
        .strip_suffix(b"\n")
        .ok_or_else(|| PatchError::Refused("it does not end with a newline (cut short?)".into()))?;
    let mut summary = PatchSummary::default();
    let mut section: Option<Section> = None;
    for line in body.split(|&b| b == b'\n') {
        let in_hunk = section.as_ref().is_some_and(|s| matches!(s.at, At::Hunk(..) | At::BinaryData { .. }));
        if !in_hunk {
            if let Some(rest) = line.strip_prefix(b"diff --git ") {
                if let Some(done) = section.take() {
                    done.finish().map_err(PatchError::Refused)?;
                }
                section = Some(Section::new(rest).map_err(PatchError::Refused)?);
                summary.files += 1;
                continue;
            }
        }
        // The patch starts with `diff --git `: there is always a section here.
        if let Some(s) = section.as_mut() {
            s.line(line).map_err(PatchError::Refused)?;
        }
    }
    if let Some(done) = section {
        done.finish().map_err(PatchError::Refused)?;
    }
    Ok(summary)
}

/// `-a,b +c,d @@...` (after the leading `@@ `) → (a, b, c, d); an omitted count is 1.
fn hunk_header(header: &[u8]) -> Option<(u64, u64, u64, u64)> {
    let text = std::str::from_utf8(header).ok()?;
    let mut words = text.split(' ');
    let range = |range: &str| -> Option<(u64, u64)> {
        match range.split_once(',') {
            Some((start, n)) => Some((start.parse().ok()?, n.parse().ok()?)),
            None => Some((range.parse().ok()?, 1)),
        }
    };
    let (old_start, old) = range(words.next()?.strip_prefix('-')?)?;
    let (new_start, new) = range(words.next()?.strip_prefix('+')?)?;
    (words.next()? == "@@").then_some((old_start, old, new_start, new))
}

/// The path of a `diff --git` line: `a/P b/P`, each side C-quoted or not; both sides must
/// name the same path (renames and copies are refused anyway).
fn header_names(rest: &[u8]) -> Result<Vec<u8>, String> {
    let bad = || format!("cannot read the paths of 'diff --git {}'", shown(rest));
    let (old, new) = if rest.first() == Some(&b'"') {
        let (old, used) = unquote(rest)?;
        let tail = rest[used..].strip_prefix(b" ").ok_or_else(bad)?;
        if tail.first() != Some(&b'"') {
            return Err(bad());
        }
        let (new, used) = unquote(tail)?;
        if used != tail.len() {
            return Err(bad());
        }
        (old, new)
    } else {
        if rest.contains(&b'"') || rest.len().is_multiple_of(2) {
            return Err(bad());
        }
        // `a/P b/P`: the two halves around the middle space.
        let half = rest.len() / 2;
        if rest[half] != b' ' {
            return Err(bad());
        }
        (rest[..half].to_vec(), rest[half + 1..].to_vec())
    };
    let old = old
        .strip_prefix(b"a/")
        .ok_or_else(|| format!("the path in 'diff --git {}' lacks the a/ prefix", shown(rest)))?;
    let new = new
        .strip_prefix(b"b/")
        .ok_or_else(|| format!("the path in 'diff --git {}' lacks the b/ prefix", shown(rest)))?;
    check_path(old)?;
    check_path(new)?;
    if old != new {
        return Err(format!("'diff --git {}' names two paths (renames and copies are not accepted)", shown(rest)));
    }
    Ok(new.to_vec())
}

/// Reads a C-quoted name at the start of `text` (git's `quote_c_style`: `\a \b \t \n \v \f
/// \r \" \\` and three-digit octal); returns the name and the bytes used, quotes included.
fn unquote(text: &[u8]) -> Result<(Vec<u8>, usize), String> {
    let bad = |why: &str| format!("bad quoted path {}: {why}", shown(text));
    let mut out = Vec::new();
    let mut i = 1;
    loop {
        let Some(&b) = text.get(i) else { return Err(bad("no closing quote")) };
        i += 1;
        match b {
            b'"' => return Ok((out, i)),
            b'\\' => {
                let Some(&e) = text.get(i) else { return Err(bad("it ends in an escape")) };
                i += 1;
                out.push(match e {
                    b'a' => 0x07,
                    b'b' => 0x08,
                    b't' => b'\t',
                    b'n' => b'\n',
                    b'v' => 0x0b,
                    b'f' => 0x0c,
                    b'r' => b'\r',
                    b'"' | b'\\' => e,
                    b'0'..=b'3' => {
                        let digits = text.get(i..i + 2).ok_or_else(|| bad("a short octal escape"))?;
                        if !digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                            return Err(bad("a bad octal escape"));
                        }
                        i += 2;
                        ((e - b'0') << 6) | ((digits[0] - b'0') << 3) | (digits[1] - b'0')
                    }
                    _ => return Err(bad("an unknown escape")),
                });
            }
            _ => out.push(b),
        }
    }
}

/// A path inside the repository: relative, not empty, no `.`, `..`, empty or `.git` components
/// (any case), no NUL.
fn check_path(path: &[u8]) -> Result<(), String> {
    let name = shown(path);
    if path.is_empty() {
        return Err("a path is empty".into());
    }
    if path.starts_with(b"/") {
        return Err(format!("the path '{name}' is absolute"));
    }
    if path.contains(&0) {
        return Err(format!("the path '{name}' holds a NUL byte"));
    }
    for component in path.split(|&b| b == b'/') {
        if component == b".." || component.split(|&b| b == b'\\').any(|c| c == b"..") {
            return Err(format!("the path '{name}' goes up with '..'"));
        }
        if component.is_empty() || component == b"." {
            return Err(format!("the path '{name}' is not a plain relative path"));
        }
        if component.eq_ignore_ascii_case(b".git") {
            return Err(format!("the path '{name}' reaches into .git"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{git, repo};
    use super::*;

    fn refused(patch: &[u8]) -> String {
        let err = check_patch(patch).expect_err(&String::from_utf8_lossy(patch));
        let message = err.to_string();
        assert!(message.starts_with("the guest's patch is refused: "), "{message}");
        assert!(message.ends_with("; nothing was written"), "{message}");
        message
    }

    /// Each patch is refused, for its reason.
    fn refused_for(cases: &[(&[u8], &str)]) {
        for (patch, why) in cases {
            let message = refused(patch);
            assert!(message.contains(why), "{why}: {message}");
        }
    }

    /// The guest's export command, run in `top`.
    fn export_diff(top: &Path) -> Vec<u8> {
        git(top, &["add", "-A", "-N", "."]);
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(top)
            .args(["-c", "core.quotepath=on", "diff", "--binary", "--no-color", "--no-ext-diff", "--no-textconv"])
            .args(["--no-renames", "--src-prefix=a/", "--dst-prefix=b/", "HEAD"])
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .expect("git diff");
        assert!(out.status.success());
        out.stdout
    }

    #[test]
    fn what_git_makes_passes_and_applies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let top = repo(dir.path(), "guest");
        std::fs::create_dir(top.join("src")).expect("mkdir");
        std::fs::write(top.join("src/old.rs"), "old\n").expect("write");
        std::fs::write(top.join("gone.txt"), "bye\n").expect("write");
        std::fs::write(top.join("run.sh"), "#!/bin/sh\n").expect("write");
        std::os::unix::fs::symlink("src/old.rs", top.join("link")).expect("symlink");
        std::os::unix::fs::symlink("tracked.txt", top.join("was-link")).expect("symlink");
        git(&top, &["add", "."]);
        git(&top, &["commit", "-qm", "second"]);
        let host = dir.path().join("host");
        git(dir.path(), &["clone", "-q", top.to_str().expect("utf-8"), "host"]);
        // Every kind of change the export makes.
        std::fs::write(top.join("tracked.txt"), "one\ntwo\n").expect("write");
        std::fs::remove_file(top.join("gone.txt")).expect("rm");
        std::fs::write(top.join("new file with spaces.txt"), "s\n").expect("write");
        std::fs::write(top.join("caf\u{e9} \"q\".txt"), "quoted\n").expect("write");
        std::fs::write(top.join("blob.bin"), [0u8, 159, 146, 150, 255, 0, 1]).expect("write");
        std::fs::set_permissions(top.join("run.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        std::fs::remove_file(top.join("link")).expect("rm");
        std::os::unix::fs::symlink("tracked.txt", top.join("link")).expect("retarget inside");
        std::os::unix::fs::symlink("../x", top.join("src/up")).expect("symlink");
        std::fs::remove_file(top.join("was-link")).expect("rm");
        std::fs::write(top.join("was-link"), "now a file\n").expect("typechange");
        let patch = export_diff(&top);
        let text = String::from_utf8_lossy(&patch);
        for want in ["\"b/caf\\303\\251 \\\"q\\\".txt\"", "GIT binary patch", "new mode 100755", "120000"] {
            assert!(text.contains(want), "{want} in {text}");
        }
        assert_eq!(check_patch(&patch).expect("git's own patch").files, 10, "{text}");
        let file = dir.path().join("p.patch");
        std::fs::write(&file, &patch).expect("write");
        git(&host, &["apply", "--check", file.to_str().expect("utf-8")]);
    }

    const RETARGET: &[u8] = b"diff --git a/link b/link\nindex 1234567..89abcde 120000\n--- a/link\n+++ b/link\n\
@@ -1 +1 @@\n-src/x.rs\n\\ No newline at end of file\n+TARGET\n\\ No newline at end of file\n";

    fn retarget(target: &str) -> Vec<u8> {
        String::from_utf8_lossy(RETARGET).replace("TARGET", target).into_bytes()
    }

    #[test]
    fn a_symlink_retargeted_out_of_the_tree_is_refused() {
        assert_eq!(check_patch(&retarget("src/y.rs")).expect("inside").files, 1);
        assert!(refused(&retarget("/etc/shadow")).contains("points outside (absolute target)"));
        assert!(refused(&retarget("../../.ssh")).contains("points outside (too many '..')"));
        assert!(refused(&retarget("x/../../..")).contains("'..' after a name"));
        // No mode stated: `git apply` would take the host's symlink mode and retarget it.
        let no_mode = String::from_utf8_lossy(&retarget("/etc/shadow")).replace("index 1234567..89abcde 120000\n", "");
        assert!(refused(no_mode.as_bytes()).contains("states no mode"));
        let no_mode = no_mode.replace("/etc/shadow", "fine");
        assert!(refused(no_mode.as_bytes()).contains("states no mode"));
        // A target split over lines, kept context, a second hunk, a trailing newline.
        let two =
            String::from_utf8_lossy(RETARGET).replace("@@ -1 +1 @@", "@@ -1 +1,2 @@").replace("+TARGET", "+a\n+b");
        assert!(refused(two.as_bytes()).contains("a target of 2 lines"));
        let ctx =
            String::from_utf8_lossy(RETARGET).replace("@@ -1 +1 @@", "@@ -1,2 +1,2 @@\n ..").replace("+TARGET", "+x");
        assert!(refused(ctx.as_bytes()).contains("does not replace its whole target"));
        let later = String::from_utf8_lossy(&retarget("x")).replace("@@ -1 +1 @@", "@@ -2 +2 @@");
        assert!(refused(later.as_bytes()).contains("does not replace its whole target"));
        let newline = String::from_utf8_lossy(&retarget("x")).replace("+x\n\\ No newline at end of file\n", "+x\n");
        assert!(refused(newline.as_bytes()).contains("malformed target"));
        // A new symlink, a file turned into one, binary symlink data.
        let new = b"diff --git a/l b/l\nnew file mode 120000\nindex 0000000..1234567\n--- /dev/null\n+++ b/l\n\
@@ -0,0 +1 @@\n+/etc\n\\ No newline at end of file\n";
        assert!(refused(new).contains("points outside"));
        let turned = b"diff --git a/l b/l\nold mode 100644\nnew mode 120000\nindex 1..2\n--- a/l\n+++ b/l\n\
@@ -1 +1 @@\n-x\n+y\n\\ No newline at end of file\n";
        assert!(refused(turned).contains("changes between a file and a symlink"));
        let mixed = String::from_utf8_lossy(&retarget("/etc"))
            .replace("index 1234567..89abcde 120000\n", "index 1..2 100644\nindex 1..2 120000\n");
        assert!(refused(mixed.as_bytes()).contains("changes between a file and a symlink"));
        let binary = b"diff --git a/l b/l\nnew file mode 120000\nindex 0000000..1234567\nGIT binary patch\nliteral 4\n\
Lc${NkPjOjI2Cx8)\n\nliteral 0\nHcmV?d00001\n\n";
        assert!(refused(binary).contains("comes as binary data"));
        let module = b"diff --git a/m b/m\nnew file mode 160000\nindex 0000000..1234567\n";
        assert!(refused(module).contains("submodule"));
    }

    #[test]
    fn escaped_paths_are_unquoted_before_they_are_checked() {
        let cases: [(&[u8], &str); 8] = [
            (b"diff --git \"a/\\056\\056/x\" \"b/\\056\\056/x\"\nindex 1..2 100644\n", "goes up"),
            (b"diff --git a/x b/x\nindex 1..2 100644\n--- a/x\n+++ \"b/\\056\\056/x\"\n", "goes up"),
            (b"diff --git \"a/\\057etc/x\" \"b/\\057etc/x\"\nindex 1..2 100644\n", "is absolute"),
            (b"diff --git \"a/.\\107it/hooks/x\" \"b/.\\107it/hooks/x\"\nnew file mode 100755\n", "reaches into .git"),
            (b"diff --git a/.git/config b/.git/config\nindex 1..2 100644\n", "reaches into .git"),
            (b"diff --git \"a/x\\q\" \"b/x\\q\"\nindex 1..2 100644\n", "an unknown escape"),
            (b"diff --git \"a/x\\0\" \"b/x\\0\"\nindex 1..2 100644\n", "octal escape"),
            (b"diff --git \"a/x\\000\" \"b/x\\000\"\nindex 1..2 100644\n", "NUL byte"),
        ];
        refused_for(&cases);
        let fine = b"diff --git \"a/caf\\303\\251\" \"b/caf\\303\\251\"\nindex 1..2 100644\n";
        assert_eq!(check_patch(fine).expect("quoted but inside").files, 1);
    }

    #[test]
    fn forms_that_cannot_be_checked_the_same_way_are_refused() {
        let cases: [(&[u8], &str); 13] = [
            (b"PK\x03\x04zip", "not a git diff"),
            (b"diff --git a/x b/x\nindex 1..2 100644", "does not end with a newline"),
            (b"diff --git a/../../etc/passwd b/../../etc/passwd\n", "goes up"),
            (b"diff --git a/x b/x\nindex 1..2 100644\n--- a/x\n+++ /etc/x\n", "lacks the b/ prefix"),
            (b"diff --git a/x b/x\nindex 1..2 100644\n--- a/x\n+++ b/y\n", "names another file"),
            (b"diff --git a/x b/y\nrename from x\nrename to y\n", "renames and copies"),
            (b"diff --git a/x b/x\nsimilarity index 90%\ncopy from x\n", "renamed, copied"),
            (b"diff --git a/x b/x\nindex 1..2 100644\nBinary files a/x and b/x differ\n", "carries no data"),
            // A traditional diff smuggled after a hunk, which `git apply` would read.
            (
                b"diff --git a/x b/x\nindex 1..2 100644\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n--- a/y\n+++ /etc/y\n",
                "after a hunk",
            ),
            (b"diff --git a/x b/x\nindex 1..2 100644\n@@ -1,3 +1,3 @@\n a\n", "ends early"),
            (b"diff --git a/x b/x\nindex 1..2 100644\n@@ -1,0 +1 @@\n a\n", "more lines than its header"),
            (b"diff --git a/x b/x\nindex 1..2 100644\ngarbage\n", "unexpected line"),
            (b"diff --git a/x b/x\nindex 1..2 100644\nGIT binary patch\nliteral 4\nnot base85\n", "binary data"),
        ];
        refused_for(&cases);
        assert_eq!(check_patch(b"").expect("empty").files, 0);
    }
}
