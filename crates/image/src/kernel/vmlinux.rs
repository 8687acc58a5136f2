//! Unpack the ELF `vmlinux` from an x86 bzImage.
//!
//! The boot setup header (Documentation/arch/x86/boot.rst) gives `setup_sects` at 0x1f1 and, from
//! protocol 2.08 on, `payload_offset` (0x248) and `payload_length` (0x24c). The offset counts from
//! the protected-mode code, which starts at `(setup_sects + 1) * 512`. The payload is the compressed,
//! stripped ELF kernel, possibly followed by relocation data and a 4-byte size trailer; we
//! decompress it (LZ4 legacy frames as made by `lz4 -l`, gzip, xz or zstd, told apart by magic) and
//! trim it to the ELF image.

use std::io::{self, Read};

/// What went wrong unpacking `vmlinux` from a bzImage.
#[derive(Debug, thiserror::Error)]
pub enum VmlinuxError {
    /// The file has no x86 boot setup header.
    #[error("not an x86 bzImage (no 'HdrS' setup header); pass the kernel's boot/vmlinuz-* file")]
    NotBzImage,
    /// The boot protocol predates the payload fields.
    #[error(
        "boot protocol {major}.{minor:02} is too old to locate the payload (2.08 or later needed); \
         use a newer kernel"
    )]
    OldProtocol {
        /// Major protocol version.
        major: u8,
        /// Minor protocol version.
        minor: u8,
    },
    /// The header points outside the file.
    #[error("payload at offset {offset} with length {length} lies outside the {size}-byte image")]
    PayloadOutOfRange {
        /// Payload start in the file.
        offset: u64,
        /// Payload length.
        length: u64,
        /// File size.
        size: usize,
    },
    /// The payload is in a format we do not decode.
    #[error("unsupported payload compression (magic {magic:02x?}); supported are lz4, gzip, xz and zstd")]
    UnknownCompression {
        /// First bytes of the payload.
        magic: Vec<u8>,
    },
    /// A gzip, xz or zstd payload failed to decompress.
    #[error("corrupt {format} payload")]
    Decompress {
        /// Compression format.
        format: &'static str,
        /// Decoder error.
        #[source]
        source: io::Error,
    },
    /// An LZ4 payload failed to decompress.
    #[error("corrupt lz4 payload: {reason}")]
    Lz4 {
        /// What was wrong.
        reason: String,
    },
    /// The decompressed payload is not an ELF file.
    #[error("the decompressed payload is not an ELF file")]
    NotElf,
}

const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
const PROTOCOL_VERSION: usize = 0x206;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
const SECTOR: u64 = 512;

const ELF_MAGIC: &[u8] = b"\x7fELF";
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// Uncompressed size of every LZ4 legacy block but the last.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Returns the ELF `vmlinux` held in the bzImage `image`.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let payload = payload(image)?;
    let mut elf = decompress(payload)?;
    if !elf.starts_with(ELF_MAGIC) {
        return Err(VmlinuxError::NotElf);
    }
    if let Some(end) = elf64_end(&elf) {
        // Relocation data for the boot decompressor follows the ELF image; it is not ours.
        elf.truncate(end);
    }
    Ok(elf)
}

/// Returns the compressed payload slice of a bzImage.
fn payload(image: &[u8]) -> Result<&[u8], VmlinuxError> {
    if image.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS".as_slice()) {
        return Err(VmlinuxError::NotBzImage);
    }
    let version = le16(image, PROTOCOL_VERSION).ok_or(VmlinuxError::NotBzImage)?;
    let [minor, major] = version.to_le_bytes();
    if version < 0x0208 {
        return Err(VmlinuxError::OldProtocol { major, minor });
    }
    let setup_sects = match image[SETUP_SECTS] {
        // Old kernels leave 0 to mean the historical default of 4.
        0 => 4,
        n => u64::from(n),
    };
    let offset = le32(image, PAYLOAD_OFFSET).ok_or(VmlinuxError::NotBzImage)?;
    let length = le32(image, PAYLOAD_LENGTH).ok_or(VmlinuxError::NotBzImage)?;
    let start = (setup_sects + 1) * SECTOR + u64::from(offset);
    let end = start + u64::from(length);
    let out_of_range =
        || VmlinuxError::PayloadOutOfRange { offset: start, length: u64::from(length), size: image.len() };
    let start = usize::try_from(start).map_err(|_| out_of_range())?;
    let end = usize::try_from(end).map_err(|_| out_of_range())?;
    image.get(start..end).ok_or_else(out_of_range)
}

/// Decompresses a payload, choosing the decoder by magic number.
fn decompress(payload: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let failed = |format| move |source| VmlinuxError::Decompress { format, source };
    if payload.starts_with(&LZ4_LEGACY_MAGIC) {
        decode_lz4_legacy(payload)
    } else if payload.starts_with(ELF_MAGIC) {
        Ok(payload.to_vec())
    } else if payload.starts_with(GZIP_MAGIC) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(payload).read_to_end(&mut out).map_err(failed("gzip"))?;
        Ok(out)
    } else if payload.starts_with(XZ_MAGIC) {
        decode_xz(payload).map_err(failed("xz"))
    } else if payload.starts_with(ZSTD_MAGIC) {
        decode_zstd(payload).map_err(failed("zstd"))
    } else {
        let magic = payload.iter().take(6).copied().collect();
        Err(VmlinuxError::UnknownCompression { magic })
    }
}

/// Decodes the zstd frame at the start of `payload`, ignoring what follows it.
fn decode_zstd(payload: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    zstd::stream::read::Decoder::with_buffer(payload)?.single_frame().read_to_end(&mut out)?;
    Ok(out)
}

/// Decodes the single xz stream at the start of `payload`, ignoring what follows it (xz2's reader
/// calls trailing bytes corrupt).
fn decode_xz(payload: &[u8]) -> io::Result<Vec<u8>> {
    use xz2::stream::{Action, Status, Stream};
    let mut stream = Stream::new_stream_decoder(u64::MAX, 0)?;
    let mut out = Vec::with_capacity(payload.len().saturating_mul(4));
    loop {
        let before = stream.total_in();
        let consumed = usize::try_from(before).unwrap_or(usize::MAX);
        let input = payload.get(consumed..).unwrap_or_default();
        if out.len() == out.capacity() {
            out.reserve(out.len().max(1 << 20));
        }
        let produced = out.len();
        match stream.process_vec(input, &mut out, Action::Run)? {
            Status::StreamEnd => return Ok(out),
            _ if stream.total_in() == before && out.len() == produced => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "xz stream ends early"))
            }
            _ => {}
        }
    }
}

/// Decodes LZ4 legacy frames: magic, then blocks each preceded by a 32-bit little-endian
/// compressed size, every block but the last expanding to 8 MiB. A repeated magic starts another
/// frame; a lone 4-byte word at the end is the kernel build's size trailer.
fn decode_lz4_legacy(payload: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let lz4_error = |reason: String| VmlinuxError::Lz4 { reason };
    let mut input = payload;
    let mut out = Vec::new();
    while let Some((word, rest)) = input.split_first_chunk::<4>() {
        if rest.is_empty() {
            // The 4-byte size trailer appended by the kernel build.
            input = rest;
            break;
        }
        if *word == LZ4_LEGACY_MAGIC {
            input = rest;
            continue;
        }
        let size = usize::try_from(u32::from_le_bytes(*word))
            .map_err(|_| lz4_error("block size does not fit in memory".into()))?;
        let Some((block, rest)) = rest.split_at_checked(size) else {
            return Err(lz4_error(format!(
                "block of {size} bytes runs past the end of the payload ({} bytes left)",
                rest.len()
            )));
        };
        let start = out.len();
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        let written =
            lz4_flex::block::decompress_into(block, &mut out[start..]).map_err(|e| lz4_error(e.to_string()))?;
        out.truncate(start + written);
        input = rest;
    }
    if !input.is_empty() {
        return Err(lz4_error(format!("{} stray bytes at the end", input.len())));
    }
    if out.is_empty() {
        return Err(lz4_error("no data blocks".into()));
    }
    Ok(out)
}

/// Returns where a little-endian ELF64 image ends: the furthest of its headers, program segments
/// and section contents. `None` if the header does not describe a sane ELF64 file.
fn elf64_end(elf: &[u8]) -> Option<usize> {
    const ELFCLASS64: u8 = 2;
    const ELFDATA2LSB: u8 = 1;
    const SHT_NOBITS: u32 = 8;
    if elf.get(4) != Some(&ELFCLASS64) || elf.get(5) != Some(&ELFDATA2LSB) {
        return None;
    }
    let phoff = le64(elf, 0x20)?;
    let shoff = le64(elf, 0x28)?;
    let ehsize = u64::from(le16(elf, 0x34)?);
    let phentsize = u64::from(le16(elf, 0x36)?);
    let phnum = u64::from(le16(elf, 0x38)?);
    let shentsize = u64::from(le16(elf, 0x3a)?);
    let shnum = u64::from(le16(elf, 0x3c)?);

    let mut end = ehsize.max(phoff.checked_add(phentsize * phnum)?).max(shoff.checked_add(shentsize * shnum)?);
    for i in 0..phnum {
        let ph = usize::try_from(phoff + i * phentsize).ok()?;
        let (offset, filesz) = (le64(elf, ph + 0x08)?, le64(elf, ph + 0x20)?);
        end = end.max(offset.checked_add(filesz)?);
    }
    for i in 0..shnum {
        let sh = usize::try_from(shoff + i * shentsize).ok()?;
        if le32(elf, sh + 0x04)? != SHT_NOBITS {
            let (offset, size) = (le64(elf, sh + 0x18)?, le64(elf, sh + 0x20)?);
            end = end.max(offset.checked_add(size)?);
        }
    }
    usize::try_from(end).ok().filter(|&end| end <= elf.len())
}

fn le16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(*bytes.get(at..)?.first_chunk()?))
}

fn le32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(*bytes.get(at..)?.first_chunk()?))
}

fn le64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(*bytes.get(at..)?.first_chunk()?))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap fails the test")]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// An ELF64 header and one PT_LOAD program header covering `body`, then `body`.
    pub(crate) fn tiny_elf(body: &[u8]) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(ELF_MAGIC);
        elf[4] = 2; // ELFCLASS64
        elf[5] = 1; // little endian
        elf[6] = 1; // EV_CURRENT
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        elf[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf[64 + 0x08..64 + 0x10].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        elf[64 + 0x20..64 + 0x28].copy_from_slice(&(body.len() as u64).to_le_bytes()); // p_filesz
        elf.extend_from_slice(body);
        elf
    }

    /// Asserts equality without dumping megabytes of bytes on failure.
    fn assert_same(got: &[u8], want: &[u8]) {
        assert!(
            got == want,
            "got {} bytes, want {}; first difference at {:?}",
            got.len(),
            want.len(),
            got.iter().zip(want).position(|(a, b)| a != b)
        );
    }

    /// LZ4 legacy frame of `data` with the kernel's 4-byte size trailer, in `block`-sized pieces.
    fn lz4_legacy(data: &[u8], block: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_vec();
        for chunk in data.chunks(block) {
            let compressed = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&u32_le(compressed.len()));
            out.extend_from_slice(&compressed);
        }
        out.extend_from_slice(&u32_le(data.len()));
        out
    }

    /// A bzImage-shaped file: `setup_sects` setup sectors, then `junk` bytes, then `payload`.
    pub(crate) fn bzimage(setup_sects: u8, junk: usize, payload: &[u8]) -> Vec<u8> {
        let pm_start = (usize::from(setup_sects) + 1) * 512;
        let mut image = vec![0u8; pm_start + junk];
        image[SETUP_SECTS] = setup_sects;
        image[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        image[PROTOCOL_VERSION..PROTOCOL_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        image[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&u32_le(junk));
        image[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&u32_le(payload.len()));
        image.extend_from_slice(payload);
        image.extend_from_slice(b"trailing setup data");
        image
    }

    fn u32_le(n: usize) -> [u8; 4] {
        u32::try_from(n).unwrap().to_le_bytes()
    }

    /// Pseudo-random but compressible bytes.
    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| u8::try_from((((i * 7) % 251) ^ (i / 1000)) % 256).unwrap()).collect()
    }

    #[test]
    fn lz4_payload_round_trips() {
        let elf = tiny_elf(&sample(100_000));
        let image = bzimage(27, 0x3a1, &lz4_legacy(&elf, LZ4_LEGACY_BLOCK));
        assert_same(&extract_vmlinux(&image).unwrap(), &elf);
    }

    #[test]
    fn lz4_payload_with_several_blocks() {
        let elf = tiny_elf(&sample(LZ4_LEGACY_BLOCK * 2 + 12_345));
        let image = bzimage(4, 0, &lz4_legacy(&elf, LZ4_LEGACY_BLOCK));
        assert_same(&extract_vmlinux(&image).unwrap(), &elf);
    }

    #[test]
    fn trailing_relocations_are_trimmed() {
        let elf = tiny_elf(&sample(5000));
        let mut with_relocs = elf.clone();
        with_relocs.extend_from_slice(&[0xaa; 300]);
        let image = bzimage(4, 16, &lz4_legacy(&with_relocs, LZ4_LEGACY_BLOCK));
        assert_same(&extract_vmlinux(&image).unwrap(), &elf);
    }

    #[test]
    fn gzip_xz_and_zstd_payloads() {
        let elf = tiny_elf(&sample(20_000));
        let size_trailer = u32_le(elf.len());

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).unwrap();
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&elf).unwrap();
        let zst = zstd::encode_all(elf.as_slice(), 1).unwrap();

        for mut payload in [gz.finish().unwrap(), xz.finish().unwrap(), zst] {
            payload.extend_from_slice(&size_trailer);
            let image = bzimage(15, 100, &payload);
            assert_same(&extract_vmlinux(&image).unwrap(), &elf);
        }
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let elf = tiny_elf(b"kernel");
        let mut image = bzimage(4, 0, &lz4_legacy(&elf, LZ4_LEGACY_BLOCK));
        image[SETUP_SECTS] = 0;
        assert_same(&extract_vmlinux(&image).unwrap(), &elf);
    }

    #[test]
    fn rejects_non_bzimage() {
        assert!(matches!(extract_vmlinux(b"just some text"), Err(VmlinuxError::NotBzImage)));
        assert!(matches!(extract_vmlinux(&[0u8; 4096]), Err(VmlinuxError::NotBzImage)));
    }

    #[test]
    fn rejects_old_protocol() {
        let mut image = bzimage(4, 0, b"x");
        image[PROTOCOL_VERSION..PROTOCOL_VERSION + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        let err = extract_vmlinux(&image).unwrap_err();
        assert_eq!(
            err.to_string(),
            "boot protocol 2.06 is too old to locate the payload (2.08 or later needed); \
             use a newer kernel"
        );
    }

    #[test]
    fn rejects_payload_out_of_range() {
        let mut image = bzimage(4, 0, b"abc");
        image[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(extract_vmlinux(&image), Err(VmlinuxError::PayloadOutOfRange { .. })));
    }

    #[test]
    fn rejects_unknown_compression_and_non_elf() {
        let image = bzimage(4, 0, b"BZh91AY&SY");
        let err = extract_vmlinux(&image).unwrap_err();
        assert!(err.to_string().starts_with("unsupported payload compression"));

        let image = bzimage(4, 0, &lz4_legacy(b"not an elf at all", 1024));
        assert!(matches!(extract_vmlinux(&image), Err(VmlinuxError::NotElf)));
    }

    #[test]
    fn rejects_truncated_xz() {
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&tiny_elf(&sample(50_000))).unwrap();
        let mut payload = xz.finish().unwrap();
        payload.truncate(payload.len() / 2);
        let image = bzimage(4, 0, &payload);
        assert!(matches!(extract_vmlinux(&image), Err(VmlinuxError::Decompress { format: "xz", .. })));
    }

    #[test]
    fn rejects_truncated_lz4() {
        let mut payload = lz4_legacy(&tiny_elf(&sample(10_000)), LZ4_LEGACY_BLOCK);
        payload.truncate(payload.len() - 40);
        let image = bzimage(4, 0, &payload);
        assert!(matches!(extract_vmlinux(&image), Err(VmlinuxError::Lz4 { .. })));
    }
}
