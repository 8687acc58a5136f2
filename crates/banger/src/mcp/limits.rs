//! Size limits of the MCP tools, and how output past them is cut: a [`Capped`] buffer keeps the
//! first bytes of a stream and counts the rest (so the guest is never stalled and memory stays
//! bounded), a [`Tail`] keeps the last ones; [`text`] turns what was kept into text with a
//! marker that gives the total size.

use std::collections::VecDeque;

use base64::Engine as _;
use serde::Deserialize;

/// The most of each of stdout and stderr an exec returns by default.
pub const EXEC_OUTPUT_DEFAULT: usize = 256 * 1024;
/// The most `fs_read` returns by default.
pub const READ_DEFAULT: usize = 1024 * 1024;
/// The most a session's log tail returns by default.
pub const LOGS_DEFAULT: usize = 256 * 1024;
/// The highest limit a caller may ask for (MCP messages are held whole by both sides).
pub const MAX_LIMIT: usize = 16 * 1024 * 1024;
/// The most `fs_write` and `session_write` take (after base64 decoding).
pub const WRITE_MAX: usize = 16 * 1024 * 1024;

/// A caller's limit, or the default; at most [`MAX_LIMIT`].
pub fn limit(asked: Option<u64>, default: usize) -> usize {
    asked.map_or(default, |n| usize::try_from(n).unwrap_or(usize::MAX).min(MAX_LIMIT))
}

/// The first `cap` bytes of a stream, and how many there were in all.
#[derive(Debug)]
pub struct Capped {
    kept: Vec<u8>,
    cap: usize,
    total: u64,
}

impl Capped {
    pub fn new(cap: usize) -> Self {
        Self { kept: Vec::new(), cap, total: 0 }
    }

    /// Keeps what fits under the cap; counts all of it.
    pub fn push(&mut self, bytes: &[u8]) {
        self.total = self.total.saturating_add(bytes.len() as u64);
        let room = self.cap.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// Whether bytes were dropped.
    pub fn truncated(&self) -> bool {
        self.total > self.kept.len() as u64
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn bytes(&self) -> &[u8] {
        &self.kept
    }
}

/// The last `cap` bytes of a stream, and how many there were in all.
#[derive(Debug)]
pub struct Tail {
    kept: VecDeque<u8>,
    cap: usize,
    total: u64,
}

impl Tail {
    pub fn new(cap: usize) -> Self {
        Self { kept: VecDeque::new(), cap, total: 0 }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.total = self.total.saturating_add(bytes.len() as u64);
        let bytes = &bytes[bytes.len().saturating_sub(self.cap)..];
        let overflow = (self.kept.len() + bytes.len()).saturating_sub(self.cap);
        self.kept.drain(..overflow);
        self.kept.extend(bytes);
    }

    pub fn truncated(&self) -> bool {
        self.total > self.kept.len() as u64
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.kept.into()
    }
}

/// `3145728` as `3,145,728`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The marker put where output was cut.
pub fn marker(total: u64) -> String {
    format!("…[truncated: {} bytes in all; see command_for_user]", thousands(total))
}

/// The kept bytes as text (invalid UTF-8 replaced), the marker appended when bytes were
/// dropped after them.
pub fn text(kept: &[u8], total: u64) -> String {
    let mut out = String::from_utf8_lossy(whole_chars(kept)).into_owned();
    if total > kept.len() as u64 {
        out.push_str(&marker(total));
    }
    out
}

/// The kept last bytes as text, the marker put first when bytes were dropped before them.
pub fn tail_text(kept: &[u8], total: u64) -> String {
    // A cut may have split a character at the start: skip its continuation bytes.
    let start =
        if total > kept.len() as u64 { kept.iter().take(3).take_while(|b| **b & 0xC0 == 0x80).count() } else { 0 };
    let body = String::from_utf8_lossy(&kept[start..]);
    if total > kept.len() as u64 {
        format!("{}\n{body}", marker(total))
    } else {
        body.into_owned()
    }
}

/// `bytes` without an incomplete UTF-8 character at its end (one a cut split).
pub fn whole_chars(bytes: &[u8]) -> &[u8] {
    match std::str::from_utf8(bytes) {
        Err(e) if e.error_len().is_none() => &bytes[..e.valid_up_to()],
        _ => bytes,
    }
}

/// How file contents travel in a tool's arguments and results.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// UTF-8 text.
    #[default]
    Utf8,
    /// Base64 (standard alphabet, padded), for binary data.
    Base64,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Utf8 => "utf8",
            Self::Base64 => "base64",
        }
    }

    /// The bytes a tool argument stands for, at most [`WRITE_MAX`].
    pub fn decode(self, content: &str) -> Result<Vec<u8>, String> {
        let bytes = match self {
            Self::Utf8 => content.as_bytes().to_vec(),
            Self::Base64 => base64::engine::general_purpose::STANDARD
                .decode(content.trim())
                .map_err(|e| format!("content is not valid base64 ({e}); send standard, padded base64"))?,
        };
        if bytes.len() > WRITE_MAX {
            return Err(format!(
                "content is {} bytes, more than the limit of {} bytes; copy large files with `banger vm cp`",
                thousands(bytes.len() as u64),
                thousands(WRITE_MAX as u64)
            ));
        }
        Ok(bytes)
    }

    /// File contents as a tool result: text (an error when they are not UTF-8) or base64.
    /// `cut` says the contents were cut at a limit (so a split last character is dropped).
    pub fn encode(self, bytes: &[u8], cut: bool) -> Result<String, String> {
        match self {
            Self::Utf8 => {
                let whole = if cut { whole_chars(bytes) } else { bytes };
                std::str::from_utf8(whole).map(str::to_owned).map_err(|e| {
                    format!(
                        "the file is not UTF-8 text (invalid byte at offset {}); read it with encoding \"base64\"",
                        e.valid_up_to()
                    )
                })
            }
            Self::Base64 => Ok(base64::engine::general_purpose::STANDARD.encode(bytes)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_keeps_the_head_and_counts_everything() {
        let mut c = Capped::new(5);
        c.push(b"abc");
        c.push(b"defgh");
        c.push(b"ij");
        assert_eq!(c.bytes(), b"abcde");
        assert_eq!(c.total(), 10);
        assert!(c.truncated());
        assert_eq!(text(c.bytes(), c.total()), "abcde…[truncated: 10 bytes in all; see command_for_user]");
        let mut small = Capped::new(5);
        small.push(b"abcde");
        assert!(!small.truncated());
        assert_eq!(text(small.bytes(), small.total()), "abcde");
    }

    #[test]
    fn tail_keeps_the_last_bytes_and_counts_everything() {
        let mut t = Tail::new(4);
        t.push(b"ab");
        t.push(b"cdef");
        t.push(b"g");
        assert_eq!(t.total(), 7);
        assert!(t.truncated());
        let total = t.total();
        let kept = t.into_bytes();
        assert_eq!(kept, b"defg");
        assert_eq!(tail_text(&kept, total), "…[truncated: 7 bytes in all; see command_for_user]\ndefg");
        let mut big = Tail::new(3);
        big.push(b"0123456789");
        assert_eq!(big.into_bytes(), b"789");
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        // "é" is two bytes: a cap of 2 keeps "a" and half of "é".
        let mut c = Capped::new(2);
        c.push("aé".as_bytes());
        assert_eq!(text(c.bytes(), c.total()), "a…[truncated: 3 bytes in all; see command_for_user]");
        assert_eq!(tail_text(&"é".as_bytes()[1..], 3), format!("{}\n", marker(3)));
    }

    #[test]
    fn sizes_are_written_with_thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(3_145_728), "3,145,728");
        assert_eq!(marker(3_145_728), "…[truncated: 3,145,728 bytes in all; see command_for_user]");
    }

    #[test]
    fn limits_default_and_are_capped() {
        assert_eq!(limit(None, READ_DEFAULT), 1024 * 1024);
        assert_eq!(limit(Some(10), READ_DEFAULT), 10);
        assert_eq!(limit(Some(u64::MAX), READ_DEFAULT), MAX_LIMIT);
    }

    #[test]
    fn text_and_base64_round_trip_and_binary_is_refused_as_text() {
        let binary = [0u8, 159, 146, 150, 255];
        let b64 = Encoding::Base64.encode(&binary, false).expect("base64");
        assert_eq!(b64, "AJ+Slv8=");
        assert_eq!(Encoding::Base64.decode(&b64).expect("decode"), binary);
        assert_eq!(Encoding::Base64.decode(" AJ+Slv8=\n").expect("decode with spaces"), binary);
        let err = Encoding::Utf8.encode(&binary, false).expect_err("not text");
        assert!(err.contains("encoding \"base64\""), "{err}");
        assert!(Encoding::Base64.decode("not base64!").expect_err("bad").contains("not valid base64"));
        assert_eq!(Encoding::Utf8.decode("héllo").expect("text"), "héllo".as_bytes());
        assert_eq!(Encoding::Utf8.encode("héllo".as_bytes(), false).expect("text"), "héllo");
        // A read cut inside a character is still text.
        assert_eq!(Encoding::Utf8.encode(&"hé".as_bytes()[..2], true).expect("cut text"), "h");
        assert!(Encoding::Utf8.encode(&"hé".as_bytes()[..2], false).is_err());
    }

    #[test]
    fn writes_over_the_limit_are_refused() {
        let big = "a".repeat(WRITE_MAX + 1);
        let err = Encoding::Utf8.decode(&big).expect_err("too big");
        assert!(err.contains("16,777,217 bytes"), "{err}");
    }
}
