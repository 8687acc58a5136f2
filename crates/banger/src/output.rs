//! Printing data on stdout: pretty JSON for `--json`, aligned tables for humans.

use std::io::Write as _;

use anyhow::Context as _;
use serde::Serialize;

/// Prints `value` as pretty JSON followed by a newline.
/// Buffered: stdout is line-buffered, and a thousand VMs are tens of thousands of lines.
pub fn json(value: &impl Serialize) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Prints a JSON document received from bangerd as [`json`] would print its decoded value
/// (pretty, keys in the order they came), without decoding it into types first.
pub fn json_bytes(raw: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    write_json_bytes(raw, &mut out)?;
    out.flush()?;
    Ok(())
}

fn write_json_bytes(raw: &[u8], mut out: impl std::io::Write) -> anyhow::Result<()> {
    let mut from = serde_json::Deserializer::from_slice(raw);
    serde_transcode::transcode(&mut from, &mut serde_json::Serializer::pretty(&mut out))
        .context("bangerd's answer is not JSON")?;
    from.end().context("bangerd's answer has trailing bytes after its JSON")?;
    writeln!(out)?;
    Ok(())
}

/// Prints rows under `headers`, columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| if i == last { (*c).to_owned() } else { format!("{c:<w$}") })
            .collect::<Vec<_>>()
            .join("  ")
    };
    writeln!(out, "{}", line(headers.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    out.flush()?;
    Ok(())
}

/// Prints `key: value` lines, keys aligned.
pub fn fields(pairs: &[(&str, String)]) -> anyhow::Result<()> {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for (k, v) in pairs {
        writeln!(out, "{:<width$}  {v}", format!("{k}:"), width = width + 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_json_prints_as_its_decoded_value_would() -> anyhow::Result<()> {
        let raw = br#"{"vms":[{"id":"ab","name":"x","vcpus":2,"guest_ip":null,"paths":{"dir":"/v"},"alive":false,"e":"\u00e9\n"}],"n":[]}"#;
        let mut printed = Vec::new();
        write_json_bytes(raw, &mut printed)?;
        let value: serde_json::Value = serde_json::from_slice(raw)?;
        // The same document, pretty, on as many lines as serde_json's own pretty printing...
        let reparsed: serde_json::Value = serde_json::from_slice(&printed)?;
        assert_eq!(reparsed, value);
        let text = String::from_utf8(printed)?;
        let expected = serde_json::to_string_pretty(&value)?;
        assert_eq!(text.lines().count(), expected.lines().count());
        assert!(text.ends_with("}\n"));
        // ...with the keys in the answer's order (a decoded `Value` would sort them).
        let at = |key: &str| text.find(key).unwrap_or(usize::MAX);
        assert!(at("\"name\"") < at("\"vcpus\""), "{text}");
        Ok(())
    }

    #[test]
    fn a_truncated_answer_is_an_error() {
        assert!(write_json_bytes(br#"{"vms":["#, Vec::new()).is_err());
        assert!(write_json_bytes(br#"{} x"#, Vec::new()).is_err());
    }
}
