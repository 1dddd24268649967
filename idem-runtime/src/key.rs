//! Business keys and their scopes.

use std::borrow::Cow;
use std::fmt;
use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::Error;

/// Keys (and scopes) longer than this many bytes are stored as their SHA-256 hash.
pub const MAX_KEY_BYTES: usize = 128;

/// The prefix of a hashed key. A key that starts with it is hashed too, so a hashed key can
/// never collide with a literal one.
pub const HASHED_PREFIX: &str = "sha256:";

/// The record key of one idempotent operation: the handler's scope and the business key.
///
/// Both parts are stored as given when they are short; a part longer than [`MAX_KEY_BYTES`],
/// containing a NUL byte or starting with [`HASHED_PREFIX`] is replaced by
/// `sha256:<64 hex digits>` of its bytes. Nothing is ever truncated or rejected for length.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RecordKey {
    scope: String,
    key: String,
}

impl RecordKey {
    /// Builds the record key for `key` in `scope`.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyScope`] if `scope` is empty, [`Error::EmptyKey`] if `key` is empty or only
    /// whitespace.
    ///
    /// ```
    /// use idem_runtime::RecordKey;
    ///
    /// let key = RecordKey::new("orders::pay", "A-1001")?;
    /// assert_eq!(key.key(), "A-1001");
    ///
    /// let long = "x".repeat(500);
    /// let hashed = RecordKey::new("orders::pay", &long)?;
    /// assert!(hashed.key().starts_with("sha256:"));
    /// assert!(RecordKey::new("orders::pay", "  ").is_err());
    /// # Ok::<(), idem_runtime::Error>(())
    /// ```
    pub fn new(scope: &str, key: &str) -> Result<Self, Error> {
        if scope.is_empty() {
            return Err(Error::EmptyScope);
        }
        if key.trim().is_empty() {
            return Err(Error::EmptyKey {
                scope: scope.to_owned(),
            });
        }
        Ok(Self {
            scope: storable(scope).into_owned(),
            key: storable(key).into_owned(),
        })
    }

    /// Builds the record key from any [`IdempotencyKey`] value (strings, integers, uuids,
    /// tuples of those).
    ///
    /// # Errors
    ///
    /// As [`RecordKey::new`], and [`Error::EmptyKey`] if a part of a composite key is empty or
    /// only whitespace.
    pub fn from_value<K: IdempotencyKey + ?Sized>(scope: &str, key: &K) -> Result<Self, Error> {
        if scope.is_empty() {
            return Err(Error::EmptyScope);
        }
        if key.is_blank() {
            return Err(Error::EmptyKey {
                scope: scope.to_owned(),
            });
        }
        let mut text = String::new();
        key.write_key(&mut text);
        Self::new(scope, &text)
    }

    /// The scope (hashed if it was long).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The business key (hashed if it was long).
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.scope, self.key)
    }
}

fn storable(part: &str) -> Cow<'_, str> {
    if part.len() <= MAX_KEY_BYTES && !part.contains('\0') && !part.starts_with(HASHED_PREFIX) {
        return Cow::Borrowed(part);
    }
    let digest = Sha256::digest(part.as_bytes());
    let mut hashed = String::with_capacity(HASHED_PREFIX.len() + 64);
    hashed.push_str(HASHED_PREFIX);
    for byte in digest {
        // Writing to a String cannot fail.
        let _ = write!(hashed, "{byte:02x}");
    }
    Cow::Owned(hashed)
}

/// A value that can serve as a business key.
///
/// Implemented for strings, integers, `char`, [`uuid::Uuid`], references to those and tuples
/// of up to six keys (composite keys). Tuple parts are joined with `:` and a `:` or `\` inside
/// a part is escaped, so `("a:b", "c")` and `("a", "b:c")` stay distinct.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used as an idempotency key",
    label = "this key expression has type `{Self}`",
    note = "keys are strings, integers, `char`, `uuid::Uuid` or tuples of those (composite keys); \
            convert with `.to_string()` or implement `idem_runtime::IdempotencyKey`"
)]
pub trait IdempotencyKey {
    /// Appends this key's text form to `out`.
    fn write_key(&self, out: &mut String);

    /// Whether the key, or any part of a composite key, is empty or only whitespace: such a
    /// key is rejected with [`Error::EmptyKey`], so `("acme", "")` cannot stand for every
    /// order of a tenant. The default writes the key and looks at the text.
    fn is_blank(&self) -> bool {
        let mut text = String::new();
        self.write_key(&mut text);
        text.trim().is_empty()
    }
}

impl IdempotencyKey for str {
    fn write_key(&self, out: &mut String) {
        out.push_str(self);
    }

    fn is_blank(&self) -> bool {
        self.trim().is_empty()
    }
}

impl IdempotencyKey for String {
    fn write_key(&self, out: &mut String) {
        out.push_str(self);
    }

    fn is_blank(&self) -> bool {
        self.trim().is_empty()
    }
}

impl IdempotencyKey for Cow<'_, str> {
    fn write_key(&self, out: &mut String) {
        out.push_str(self);
    }

    fn is_blank(&self) -> bool {
        self.trim().is_empty()
    }
}

impl<K: IdempotencyKey + ?Sized> IdempotencyKey for &K {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out);
    }

    fn is_blank(&self) -> bool {
        (**self).is_blank()
    }
}

impl<K: IdempotencyKey + ?Sized> IdempotencyKey for Box<K> {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out);
    }

    fn is_blank(&self) -> bool {
        (**self).is_blank()
    }
}

impl<K: IdempotencyKey + ?Sized> IdempotencyKey for std::sync::Arc<K> {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out);
    }

    fn is_blank(&self) -> bool {
        (**self).is_blank()
    }
}

macro_rules! display_keys {
    ($($ty:ty),*) => {$(
        impl IdempotencyKey for $ty {
            fn write_key(&self, out: &mut String) {
                // Writing to a String cannot fail.
                let _ = write!(out, "{self}");
            }
        }
    )*};
}

display_keys!(
    u8,
    u16,
    u32,
    u64,
    u128,
    usize,
    i8,
    i16,
    i32,
    i64,
    i128,
    isize,
    char,
    uuid::Uuid
);

fn write_part<K: IdempotencyKey + ?Sized>(part: &K, first: bool, out: &mut String) {
    if !first {
        out.push(':');
    }
    let mut text = String::new();
    part.write_key(&mut text);
    for c in text.chars() {
        if c == ':' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
}

macro_rules! tuple_keys {
    ($(($first:ident $(, $rest:ident)*)),*) => {$(
        impl<$first: IdempotencyKey $(, $rest: IdempotencyKey)*> IdempotencyKey for ($first, $($rest,)*) {
            #[allow(non_snake_case)]
            fn write_key(&self, out: &mut String) {
                let ($first, $($rest,)*) = self;
                write_part($first, true, out);
                $(write_part($rest, false, out);)*
            }

            #[allow(non_snake_case)]
            fn is_blank(&self) -> bool {
                let ($first, $($rest,)*) = self;
                $first.is_blank() $(|| $rest.is_blank())*
            }
        }
    )*};
}

tuple_keys!(
    (A),
    (A, B),
    (A, B, C),
    (A, B, C, D),
    (A, B, C, D, E),
    (A, B, C, D, E, F)
);

#[cfg(test)]
mod tests {
    use super::*;

    fn text<K: IdempotencyKey>(key: K) -> String {
        let mut out = String::new();
        key.write_key(&mut out);
        out
    }

    #[test]
    fn composite_keys_escape_their_separator() {
        assert_eq!(text(("a", 1_u32)), "a:1");
        assert_ne!(text(("a:b", "c")), text(("a", "b:c")));
        assert_ne!(text(("a\\", ":c")), text(("a\\:", "c")));
    }

    #[test]
    fn long_unicode_and_prefixed_keys_are_hashed_not_truncated() {
        let long = "é".repeat(100); // 200 bytes
        let a = RecordKey::new("s", &long).unwrap();
        let b = RecordKey::new("s", &format!("{long}x")).unwrap();
        assert!(a.key().starts_with(HASHED_PREFIX));
        assert_eq!(a.key().len(), HASHED_PREFIX.len() + 64);
        assert_ne!(a, b);
        let short = "é".repeat(64); // 128 bytes: kept
        assert_eq!(RecordKey::new("s", &short).unwrap().key(), short);
        let literal = RecordKey::new("s", a.key()).unwrap();
        assert_ne!(literal.key(), a.key());
        assert!(
            RecordKey::new("s", "a\0b")
                .unwrap()
                .key()
                .starts_with(HASHED_PREFIX)
        );
    }

    #[test]
    fn composite_keys_with_a_blank_part_are_rejected() {
        for blank in [
            RecordKey::from_value("s", &("acme", "")),
            RecordKey::from_value("s", &("", 7_u64)),
            RecordKey::from_value("s", &(String::from("acme"), " \t")),
            RecordKey::from_value("s", &("a", ("b", ""))),
            RecordKey::from_value("s", &(' ', 1_u8)),
        ] {
            assert!(matches!(blank, Err(Error::EmptyKey { .. })), "{blank:?}");
        }
        let whole = RecordKey::from_value("s", &("acme", 0_u64)).expect("no blank part");
        assert_eq!(whole.key(), "acme:0");
    }

    #[test]
    fn empty_and_blank_keys_are_rejected() {
        assert!(matches!(
            RecordKey::new("s", ""),
            Err(Error::EmptyKey { .. })
        ));
        assert!(matches!(
            RecordKey::new("s", " \t\n"),
            Err(Error::EmptyKey { .. })
        ));
        assert!(matches!(RecordKey::new("", "k"), Err(Error::EmptyScope)));
    }
}
