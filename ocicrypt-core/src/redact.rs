//! The one rule for messages: no key material or secret in any error, log line, Event or
//! metric. Errors about hostile input quote at most a short, sanitized token of it.
//!
//! * [`token`] turns a piece of input (a PEM label, a JWK field, a scheme name, a file name from
//!   an archive) into something safe to quote: at most [`MAX_TOKEN`] characters, printable ASCII
//!   only, and nothing at all when it looks like encoded data (a run of base64 or hex).
//! * [`server_text`] makes text that a remote party chose (an error JSON field, a response body)
//!   safe to put into an error or a log: truncated, control characters removed, and every
//!   occurrence of the request's own secrets (API key, bearer token, plaintext) replaced.
//!
//! Every parser and client in the workspace uses these two functions, so the rule is enforced in
//! one place and tested once.

use std::borrow::Cow;

/// The longest token [`token`] returns, in characters (before the ellipsis).
pub const MAX_TOKEN: usize = 24;

/// The longest text [`server_text`] returns, in characters (before the ellipsis).
pub const MAX_SERVER_TEXT: usize = 200;

/// The shortest run of base64/hex alphabet characters that is treated as encoded data.
const ENCODED_RUN: usize = 16;

/// What is quoted in place of input that looks like encoded data.
pub const REDACTED: &str = "<redacted>";

/// A short, sanitized rendering of untrusted input, safe to quote in a message.
///
/// Returns [`REDACTED`] when the input holds a run of 16 or more base64/hex characters
/// (key bodies, JWK values, tokens), otherwise the input with every character outside printable
/// ASCII replaced by `?`, cut to [`MAX_TOKEN`] characters (an ellipsis marks the cut).
///
/// ```
/// use ocicrypt_core::redact::token;
/// assert_eq!(token("RSA PRIVATE KEY"), "RSA PRIVATE KEY");
/// assert_eq!(token("MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"), "<redacted>");
/// assert_eq!(token("a\u{1b}[31mb"), "a?[31mb");
/// ```
pub fn token(input: &str) -> Cow<'static, str> {
    if looks_encoded(input) {
        return Cow::Borrowed(REDACTED);
    }
    let mut out = String::with_capacity(input.len().min(MAX_TOKEN + 3));
    for (n, c) in input.chars().enumerate() {
        if n == MAX_TOKEN {
            out.push('…');
            break;
        }
        out.push(if c.is_ascii_graphic() || c == ' ' { c } else { '?' });
    }
    Cow::Owned(out)
}

/// True when `input` holds a run of at least 16 characters from the base64 (standard or URL-safe)
/// or hex alphabets: the shape of key material, tokens and ciphertexts.
pub fn looks_encoded(input: &str) -> bool {
    let mut run = 0usize;
    for c in input.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '-' | '_') {
            run += 1;
            if run >= ENCODED_RUN {
                return true;
            }
        } else {
            run = 0;
        }
    }
    false
}

/// Text chosen by a remote party, made safe for an error or a log line.
///
/// Every occurrence of each non-empty entry of `secrets` is replaced by [`REDACTED`] (so a
/// server or proxy that echoes the request cannot make us print the API key, a bearer token or a
/// plaintext), control characters (escape sequences, newlines that would forge log lines) become
/// spaces, and the result is cut to [`MAX_SERVER_TEXT`] characters. Only the first 4 KiB of
/// `text` is looked at, so the cost is bounded whatever the server sends.
///
/// ```
/// use ocicrypt_core::redact::server_text;
/// let s = server_text("bad key abc123secret\n[INFO] forged", &["abc123secret"]);
/// assert_eq!(s, "bad key <redacted> [INFO] forged");
/// ```
pub fn server_text(text: &str, secrets: &[&str]) -> String {
    const LOOK_AT: usize = 4096;
    let mut end = text.len().min(LOOK_AT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut s: String = text[..end].to_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        if s.contains(secret) {
            s = s.replace(secret, REDACTED);
        }
    }
    let mut out = String::with_capacity(s.len().min(MAX_SERVER_TEXT + 3));
    let mut truncated = end < text.len();
    for (n, c) in s.chars().enumerate() {
        if n == MAX_SERVER_TEXT {
            truncated = true;
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    if truncated {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn labels_pass_and_bodies_do_not() {
        assert_eq!(token("PRIVATE KEY"), "PRIVATE KEY");
        assert_eq!(token("ENCRYPTED PRIVATE KEY"), "ENCRYPTED PRIVATE KEY");
        let leak = "PRIVATE KEY MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQ";
        assert_eq!(token(leak), REDACTED);
        assert_eq!(token("0123456789abcdef0"), REDACTED);
    }

    #[test]
    fn long_tokens_are_cut() {
        let t = token("a b c d e f g h i j k l m n o p q r s t u v w x y z");
        assert_eq!(t.chars().count(), MAX_TOKEN + 1);
        assert!(t.ends_with('…'));
    }

    #[test]
    fn server_text_scrubs_truncates_and_strips() {
        let big = "x ".repeat(10_000);
        let s = server_text(&big, &[]);
        assert_eq!(s.chars().count(), MAX_SERVER_TEXT + 1);
        assert_eq!(server_text("a\u{1b}[2Jb\r\nc", &[]), "a [2Jb  c");
        assert_eq!(
            server_text("key=hunter2hunter2", &["hunter2hunter2", ""]),
            "key=<redacted>"
        );
    }

    proptest! {
        /// No 16-character window of a base64 secret survives either function.
        #[test]
        fn no_secret_run_survives(prefix in "[ -~]{0,40}", secret in "[A-Za-z0-9+/]{40,80}") {
            let input = format!("{prefix}{secret}");
            let t = token(&input);
            prop_assert!(!t.contains(&secret[..16]));
            let s = server_text(&input, &[&secret]);
            prop_assert!(!s.contains(&secret[..16]) || prefix.contains(&secret[..16]));
        }

        #[test]
        fn token_is_short_and_printable(input in any::<String>()) {
            let t = token(&input);
            prop_assert!(t.chars().count() <= MAX_TOKEN + 1);
            prop_assert!(t.chars().all(|c| c.is_ascii_graphic() || c == ' ' || c == '…'));
        }
    }
}
