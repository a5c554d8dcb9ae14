//! Which Secret names and data keys are safe to use as path components.
//!
//! Every name the agent turns into a file or directory comes from the API server. A real server
//! already restricts them (Secret names are DNS subdomains, data keys match `[-._a-zA-Z0-9]+` and
//! are never `.`, `..` or `..`-prefixed), but the agent checks again and refuses anything else, so
//! a compromised or buggy server cannot make it write outside its own subtree.

/// The directory inside every target directory that marks it as owned by this agent (an empty
/// directory: runtimes skip directories, so it cannot break key loading).
pub const OWNER_MARKER: &str = ".keysync-agent";
/// Prefix of the hidden names used while replacing a file (always complete and valid content).
pub const TMP_PREFIX: &str = ".keysync-tmp-";
/// Names starting with this are reserved for the agent.
const RESERVED_PREFIX: &str = ".keysync";
/// Longest accepted name (also below `NAME_MAX`, 255 bytes).
pub const MAX_NAME_LEN: usize = 253;

/// A Secret name usable as a directory name: a lowercase RFC 1123 subdomain of at most 253
/// characters (what the API server enforces for Secret names).
pub fn is_safe_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A data key usable as a file name: `[-._a-zA-Z0-9]+`, at most 253 characters, not `.`, `..` or
/// starting with `..`, and not one of the agent's reserved `.keysync*` names.
pub fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name != "."
        && !name.starts_with("..")
        && !name.starts_with(RESERVED_PREFIX)
}

/// Explains why a name is refused (for reports), quoting it with control characters escaped.
pub fn describe_unsafe(name: &str) -> String {
    let shown: String = name.chars().take(80).flat_map(char::escape_default).collect();
    if name.is_empty() {
        "an empty name".into()
    } else if name.len() > MAX_NAME_LEN {
        format!("a name longer than {MAX_NAME_LEN} characters (\"{shown}...\")")
    } else if name.starts_with(RESERVED_PREFIX) {
        format!("\"{shown}\", which starts with the reserved prefix {RESERVED_PREFIX}")
    } else {
        format!("\"{shown}\", which is not a safe path component (allowed: letters, digits, '-', '_', '.'; not '.', '..')")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names() {
        for ok in ["a", "my-key", "a.b.c", "x1", &"a".repeat(63)] {
            assert!(is_safe_secret_name(ok), "{ok}");
        }
        for bad in [
            "",
            "A",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a/b",
            "..",
            "a_b",
            "a b",
            &"a".repeat(64),
            &"a.".repeat(130),
        ] {
            assert!(!is_safe_secret_name(bad), "{bad}");
        }
    }

    #[test]
    fn file_names() {
        for ok in ["key.pem", "a", ".hidden", "A_B-c.d", "x..y"] {
            assert!(is_safe_file_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "..x",
            "a/b",
            "/etc",
            "a\0b",
            "a b",
            "ключ",
            ".keysync-agent",
            ".keysync-tmp-1",
            &"a".repeat(254),
        ] {
            assert!(!is_safe_file_name(bad), "{bad}");
        }
        assert!(describe_unsafe("../x").contains("not a safe path component"));
        assert!(describe_unsafe("a\nb").contains("\\n"));
    }
}
