//! Random identifiers for VMs and operations: 16 lowercase hex digits (64 bits).

use rand::Rng;

/// Length of every id banger makes.
pub const ID_LEN: usize = 16;

/// A fresh random id.
pub fn new_id() -> String {
    let value: u64 = rand::thread_rng().gen();
    format!("{value:016x}")
}

/// Whether `s` could be (a prefix of) an id: lowercase hex only.
pub fn looks_like_id_prefix(s: &str) -> bool {
    !s.is_empty() && s.len() <= ID_LEN && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_and_distinct() {
        let a = new_id();
        let b = new_id();
        assert_eq!(a.len(), ID_LEN);
        assert!(looks_like_id_prefix(&a));
        assert_ne!(a, b);
    }
}
