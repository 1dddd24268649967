//! Names that stores put into statements or keys: checked once, when the store is built.

use crate::Error;

/// The longest identifier every supported database accepts (PostgreSQL's limit is 63 bytes).
pub const MAX_IDENTIFIER_LEN: usize = 63;

/// Checks that `name` is a plain SQL identifier: an ASCII letter or `_`, then ASCII letters,
/// digits or `_`, at most [`MAX_IDENTIFIER_LEN`] bytes. Such a name needs no quoting in any
/// dialect, so it can be placed in a statement as is.
///
/// # Errors
///
/// [`Error::InvalidName`] saying what is wrong.
#[cfg_attr(
    not(any(feature = "sqlite", feature = "postgres", feature = "mysql")),
    allow(dead_code)
)]
pub(crate) fn sql_identifier(what: &'static str, name: &str) -> Result<(), Error> {
    let invalid = |reason| {
        Err(Error::InvalidName {
            what,
            name: name.to_owned(),
            reason,
        })
    };
    let mut chars = name.chars();
    match chars.next() {
        None => return invalid("it is empty"),
        Some(first) if !(first.is_ascii_alphabetic() || first == '_') => {
            return invalid("it must start with an ASCII letter or `_`");
        }
        Some(_) => {}
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return invalid("it may only contain ASCII letters, digits and `_`");
    }
    if name.len() > MAX_IDENTIFIER_LEN {
        return invalid("it is longer than 63 bytes");
    }
    Ok(())
}

/// Checks a Redis key prefix: 1 to 64 bytes of ASCII letters, digits, `_`, `-`, `.` and `:`,
/// with no `{` or `}` (those mark the hash tag that keeps a record in one cluster slot).
///
/// # Errors
///
/// [`Error::InvalidName`] saying what is wrong.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn key_prefix(name: &str) -> Result<(), Error> {
    let invalid = |reason| {
        Err(Error::InvalidName {
            what: "key prefix",
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > 64 {
        return invalid("it is longer than 64 bytes");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
    {
        return invalid("it may only contain ASCII letters, digits, `_`, `-`, `.` and `:`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_identifiers_pass_and_anything_else_is_rejected() {
        for good in ["idem_records", "_t", "T1", &"a".repeat(63)] {
            assert!(sql_identifier("table name", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1abc",
            "idem records",
            "idem;drop table x",
            "\"quoted\"",
            "schema.table",
            "tablé",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(
                    sql_identifier("table name", bad),
                    Err(Error::InvalidName { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn key_prefixes_exclude_hash_tags_and_spaces() {
        assert!(key_prefix("idem:v1").is_ok());
        for bad in ["", "a b", "{tag}", "x\n", &"p".repeat(65)] {
            assert!(key_prefix(bad).is_err(), "{bad:?}");
        }
    }
}
