//! Resource names. VM names double as guest hostnames and DNS labels, so they follow RFC 1123
//! label rules restricted to lowercase: `[a-z0-9-]{1,63}`, no leading or trailing dash.

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is the empty string.
    #[error("name is empty; use 1 to 63 characters from a-z, 0-9 and '-'")]
    Empty,
    /// The name is longer than a DNS label may be.
    #[error("name '{name}' is {len} characters long; the limit is 63")]
    TooLong {
        /// The refused name.
        name: String,
        /// Its length.
        len: usize,
    },
    /// The name holds a character outside `[a-z0-9-]`.
    #[error("name '{name}' contains {found:?}; use only a-z, 0-9 and '-' (lowercase)")]
    BadChar {
        /// The refused name.
        name: String,
        /// The first offending character.
        found: char,
    },
    /// The name starts or ends with a dash.
    #[error("name '{name}' starts or ends with '-' or '.'; a name must begin and end with a letter or digit")]
    EdgeDash {
        /// The refused name.
        name: String,
    },
}

/// Checks that `name` is a valid DNS label as banger uses them.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    let len = name.chars().count();
    if len > 63 {
        return Err(NameError::TooLong { name: name.to_owned(), len });
    }
    if let Some(found) = name.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
        return Err(NameError::BadChar { name: name.to_owned(), found });
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::EdgeDash { name: name.to_owned() });
    }
    Ok(())
}

/// Checks an image or kernel name: like a VM name, but dots are allowed too (`debian-6.1-cloud`),
/// and up to 128 characters.
pub fn validate_artifact_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    let len = name.chars().count();
    if len > 128 {
        return Err(NameError::TooLong { name: name.to_owned(), len });
    }
    if let Some(found) =
        name.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.')))
    {
        return Err(NameError::BadChar { name: name.to_owned(), found });
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) || !name.ends_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(NameError::EdgeDash { name: name.to_owned() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "web", "web-1", "0", "a-b-c", "x1y2", &"a".repeat(63)] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_bad_names_with_a_reason() {
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert!(matches!(validate_name(&"a".repeat(64)), Err(NameError::TooLong { len: 64, .. })));
        assert!(matches!(validate_name("Web"), Err(NameError::BadChar { found: 'W', .. })));
        assert!(matches!(validate_name("a_b"), Err(NameError::BadChar { found: '_', .. })));
        assert!(matches!(validate_name("a.b"), Err(NameError::BadChar { found: '.', .. })));
        assert!(matches!(validate_name("a b"), Err(NameError::BadChar { found: ' ', .. })));
        assert!(matches!(validate_name("héllo"), Err(NameError::BadChar { found: 'é', .. })));
        assert!(matches!(validate_name("-a"), Err(NameError::EdgeDash { .. })));
        assert!(matches!(validate_name("a-"), Err(NameError::EdgeDash { .. })));
        assert!(matches!(validate_name("-"), Err(NameError::EdgeDash { .. })));
    }

    #[test]
    fn artifact_names_allow_dots() {
        assert_eq!(validate_artifact_name("debian-6.1-cloud"), Ok(()));
        assert!(validate_artifact_name("a/b").is_err());
        assert!(validate_artifact_name(".hidden").is_err());
        assert!(validate_artifact_name("").is_err());
    }

    #[test]
    fn error_messages_name_the_fix() {
        let msg = validate_name("Bad_Name").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("a-z, 0-9"), "{msg}");
    }
}
