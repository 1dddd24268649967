//! The `Idempotency-Key` header's syntax (see [the module](super#the-key)).

use axum::http::StatusCode;
use axum::http::header::{HeaderMap, HeaderName};

use super::Problem;
use super::problem_type::KEY_MALFORMED;

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The longest key accepted, in bytes (without the quotes).
pub const MAX_KEY_LEN: usize = 255;

/// The request's key: `None` without the header, a `400` problem for a malformed one.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(malformed("is sent more than once"));
    }
    parse(value.as_bytes()).map(Some).map_err(malformed)
}

/// The key of one header value, or what is wrong with it.
fn parse(value: &[u8]) -> Result<String, &'static str> {
    let Ok(text) = std::str::from_utf8(value) else {
        return Err("holds bytes beyond ASCII");
    };
    let text = text.trim_matches([' ', '\t']);
    let (key, quoted) = match text.strip_prefix('"') {
        Some(rest) => match rest.find('"') {
            Some(end) if end + 1 == rest.len() => (&rest[..end], true),
            Some(_) => {
                return Err(
                    "has a quote inside the key (escapes are not accepted), or text after the closing quote",
                );
            }
            None => return Err("opens a quote it does not close"),
        },
        None => (text, false),
    };
    if key.is_empty() {
        return Err("is empty");
    }
    if key.len() > MAX_KEY_LEN {
        return Err("is too long");
    }
    for c in key.chars() {
        let refused = match c {
            '"' => Some("has a quote that does not open or close the key"),
            '\\' => Some("holds a backslash"),
            ' ' | '\t' => Some("holds a space"),
            ',' | ';' if !quoted => Some("holds `,` or `;` outside quotes"),
            c if c.is_ascii_control() => Some("holds a control character"),
            c if !c.is_ascii() => Some("holds characters beyond ASCII"),
            _ => None,
        };
        if let Some(why) = refused {
            return Err(why);
        }
    }
    Ok(key.to_owned())
}

fn malformed(why: &str) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "Idempotency-Key malformed",
        format!(
            "the `Idempotency-Key` header {why}; send one key of 1 to {MAX_KEY_LEN} visible ASCII characters other than `\"` and `\\`, as a quoted string: `Idempotency-Key: \"8e03978e-40d5-43e8-bc93-6894a57f9324\"`"
        ),
    )
    .with_type(KEY_MALFORMED)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(
                IDEMPOTENCY_KEY,
                HeaderValue::from_bytes(value).expect("a header value"),
            );
        }
        map
    }

    #[test]
    fn good_keys() {
        assert_eq!(idempotency_key(&HeaderMap::new()), Ok(None));
        let long = "k".repeat(MAX_KEY_LEN);
        let quoted_long = format!("\"{long}\"");
        for (value, key) in [
            (
                &b"\"8e03978e-40d5-43e8-bc93-6894a57f9324\""[..],
                "8e03978e-40d5-43e8-bc93-6894a57f9324",
            ),
            (
                b"8e03978e-40d5-43e8-bc93-6894a57f9324",
                "8e03978e-40d5-43e8-bc93-6894a57f9324",
            ),
            (b"abc-1", "abc-1"),
            (b"\"abc-1\"", "abc-1"),
            (b" \"abc-1\"\t", "abc-1"),
            (b"\"a;b,c\"", "a;b,c"),
            (
                b"~!#$%&'()*+-./:<=>?@[]^_`{|}",
                "~!#$%&'()*+-./:<=>?@[]^_`{|}",
            ),
            (long.as_bytes(), long.as_str()),
            (quoted_long.as_bytes(), long.as_str()),
        ] {
            assert_eq!(
                idempotency_key(&headers(&[value])),
                Ok(Some(key.to_owned())),
                "{}",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn bad_keys_are_400_with_a_reason() {
        let too_long = "k".repeat(MAX_KEY_LEN + 1);
        let cases: &[(&[&[u8]], &str)] = &[
            (&[b""], "is empty"),
            (&[b"  "], "is empty"),
            (&[b"\"\""], "is empty"),
            (&[b"a", b"b"], "more than once"),
            (&[b"\"abc"], "does not close"),
            (&[b"abc\""], "does not open or close"),
            (&[b"\"a\"b\""], "text after the closing quote"),
            (&[b"\"abc\";p=1"], "text after the closing quote"),
            (&[b"\"a\", \"b\""], "text after the closing quote"),
            (&[b"\"a\\\"b\""], "text after the closing quote"),
            (&[b"\"a\\b\""], "backslash"),
            (&[b"a b"], "space"),
            (&[b"\"a b\""], "space"),
            (&[b"a\tb"], "space"),
            (&[b"a,b"], "outside quotes"),
            (&[b"a;b"], "outside quotes"),
            (&[b"caf\xe9"], "beyond ASCII"),
            (&[too_long.as_bytes()], "too long"),
        ];
        for (values, why) in cases {
            let problem = idempotency_key(&headers(values)).expect_err("malformed");
            assert_eq!(problem.status(), StatusCode::BAD_REQUEST, "{values:?}");
            assert_eq!(problem.kind(), KEY_MALFORMED);
            assert!(
                problem.detail().contains(why),
                "{values:?}: {}",
                problem.detail()
            );
        }
    }
}
