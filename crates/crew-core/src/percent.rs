//! Percent-encoding (RFC 3986), the one implementation of the workspace:
//! store URLs (`file://`, `s3://` prefixes and options), the daemon's API
//! paths and queries, and the clients that build them.

use std::fmt::Write;

/// Decodes `%XX` escapes (two hexadecimal digits, either case); every
/// other byte stands for itself. `None` when an escape is malformed.
#[must_use]
pub fn decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = char::from(bytes.next()?).to_digit(16)?;
            let lo = char::from(bytes.next()?).to_digit(16)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
        } else {
            out.push(b);
        }
    }
    Some(out)
}

/// [`decode`] into UTF-8 text; `None` when an escape is malformed or the
/// bytes are not UTF-8.
#[must_use]
pub fn decode_utf8(text: &str) -> Option<String> {
    String::from_utf8(decode(text)?).ok()
}

/// A query value (`application/x-www-form-urlencoded`): `+` is a space,
/// then [`decode_utf8`].
#[must_use]
pub fn decode_query(text: &str) -> Option<String> {
    decode_utf8(&text.replace('+', " "))
}

/// Appends `text` to `out`, percent-encoding every byte but the unreserved
/// ones (`A-Z a-z 0-9 - . _ ~`) and those `keep` accepts.
pub fn encode_into(out: &mut String, text: &str, keep: impl Fn(u8) -> bool) {
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep(b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// `text` as one URL path segment or query value: every byte but the
/// unreserved ones encoded.
#[must_use]
pub fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    encode_into(&mut out, text, |_| false);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_round_trip_and_malformed_ones_are_refused() {
        let text = "a b/c%d+é~";
        let enc = encode_component(text);
        assert_eq!(enc, "a%20b%2Fc%25d%2B%C3%A9~");
        assert_eq!(decode_utf8(&enc).as_deref(), Some(text));
        assert_eq!(decode("%2f%2F").as_deref(), Some(&b"//"[..]));
        // Only hexadecimal digits: from_str_radix would take "+1".
        for bad in ["%", "%2", "%zz", "%+1", "%-1", "% 1"] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
        assert_eq!(decode_utf8("%FF"), None);
        assert_eq!(decode_query("a+b%2B").as_deref(), Some("a b+"));
        let mut out = String::new();
        encode_into(&mut out, "a/b c", |b| b == b'/');
        assert_eq!(out, "a/b%20c");
    }
}
