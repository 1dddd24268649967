//! Payload fingerprints: a SHA-256 digest of a canonical byte stream of the payload.
//!
//! Fingerprints are stored with claims, so the byte stream is a stored format: a payload must
//! hash to the same digest in every version. It is defined on the value serde_json's
//! `to_value` makes of the payload:
//!
//! - null is `n`, `true` is `t`, `false` is `f`;
//! - a number is `#` and its text as serde_json's `Number` displays it, length-prefixed;
//! - a string is `s` and its UTF-8 bytes, length-prefixed;
//! - an array is `[`, the count of its items, then each item;
//! - an object is `{`, the count of its entries, then each entry in ascending order of the
//!   keys' bytes: the key's UTF-8 bytes, length-prefixed, then the value;
//!
//! where counts and length prefixes are little-endian `u64`s. (So a digest also depends on how
//! serde_json is built: with its `arbitrary_precision` feature, an `f32` keeps its own
//! shortest text instead of the `f64` one, and integers beyond 64 bits are numbers instead of
//! errors.)
//!
//! [`Canonical`] writes that stream straight from `Serialize`, without building the
//! `serde_json::Value` tree (an allocation for every string, array and object): it makes the
//! same decisions as serde_json's `to_value` for every serde call (a unit variant is a string,
//! a newtype variant a one-entry object, a map key that is an integer or a bool is its text,
//! NaN is null, a `u128` beyond `u64` is an error, the last of equal keys wins, …) and asks
//! serde_json itself wherever its answer is not a plain one (floats as map keys, its errors,
//! its private number and raw-value structs). The tests hold it to the `Value` path, byte for
//! byte.

use std::cell::Cell;
use std::fmt::{self, Display, Write as _};
use std::sync::OnceLock;

use serde::Serialize;
use serde::ser::{self, Impossible};
use sha2::{Digest, Sha256};

use crate::Error;

/// A SHA-256 digest of a payload, stored with a claim to tell a duplicate (same key, same
/// payload) from a reused key (same key, another payload).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Fingerprints any serializable value.
    ///
    /// The value is hashed in a canonical form: map entries are sorted by key, so a
    /// `HashMap` in a message gives the same fingerprint in every process.
    ///
    /// What the value serializes to is hashed, so a field left out of serialization is left out
    /// of the fingerprint. Mark delivery metadata that differs between a message and its resend
    /// (a broker message id, a delivery count) `#[serde(skip_serializing)]`: it is still
    /// decoded, so the handler sees it, and a resend is a duplicate. `#[serde(skip)]` would
    /// keep it out of the fingerprint too, but also leave it empty when the message is decoded.
    ///
    /// ```
    /// use idem_runtime::Fingerprint;
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct OrderPaid {
    ///     order_no: String,
    ///     amount: u64,
    ///     #[serde(skip_serializing)]
    ///     message_id: String,
    /// }
    ///
    /// let first: OrderPaid =
    ///     serde_json::from_str(r#"{"order_no": "A-1", "amount": 990, "message_id": "1-0"}"#)?;
    /// let resend: OrderPaid =
    ///     serde_json::from_str(r#"{"order_no": "A-1", "amount": 990, "message_id": "7-0"}"#)?;
    /// assert_eq!((first.message_id.as_str(), resend.message_id.as_str()), ("1-0", "7-0"));
    /// assert_eq!(Fingerprint::of(&first)?, Fingerprint::of(&resend)?);
    ///
    /// let reused = OrderPaid { amount: 1, ..resend };
    /// assert_ne!(Fingerprint::of(&reused)?, Fingerprint::of(&first)?);
    ///
    /// #[derive(Deserialize)]
    /// struct Skipped {
    ///     #[serde(skip)]
    ///     message_id: String,
    /// }
    /// let skipped: Skipped = serde_json::from_str(r#"{"message_id": "1-0"}"#)?;
    /// assert_eq!(skipped.message_id, "", "`skip` loses the field on decode");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] if the value cannot be serialized.
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        Canonical::with(|stream| {
            value
                .serialize(&mut *stream)
                .map_err(|source| Error::Encode {
                    what: "payload for its fingerprint",
                    source,
                })?;
            Ok(Self(Sha256::digest(&stream.out).into()))
        })
    }

    /// A fingerprint from its 32 stored bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes of the digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(")?;
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        f.write_str("…)")
    }
}

/// The name of serde_json's private struct for a number, as `arbitrary_precision` serializes
/// one.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// The name of serde_json's private struct for a `RawValue`.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// A `Serializer` that writes the canonical byte stream of the value (see the module).
///
/// Everything but an object is written in serialization order. An object's entries are
/// written as they come, each remembered in `entries`; when the object ends they are
/// rewritten in place sorted by key, without the entries a later equal key replaced.
#[derive(Default)]
struct Canonical {
    /// The stream written so far.
    out: Vec<u8>,
    /// The entries of the objects being written, the innermost object's last.
    entries: Vec<Entry>,
}

/// One written entry of an object: its bytes are `out[key..end]`, the length-prefixed key
/// then the value from `value` on.
#[derive(Clone, Copy)]
struct Entry {
    /// Where the key's length prefix starts.
    key: usize,
    /// Where the value starts (and the key's text ends).
    value: usize,
    /// Where the value ends.
    end: usize,
}

/// The largest stream (in bytes) whose buffer a thread keeps for its next fingerprint.
const KEPT_BYTES: usize = 64 * 1024;

/// The most object entries whose buffer a thread keeps for its next fingerprint.
const KEPT_ENTRIES: usize = 1024;

impl Canonical {
    /// An empty stream.
    const fn new() -> Self {
        Self {
            out: Vec::new(),
            entries: Vec::new(),
        }
    }

    /// Runs `write` on an empty stream, with the buffers of the thread's last fingerprint
    /// (unless they grew large).
    fn with<R>(write: impl FnOnce(&mut Self) -> R) -> R {
        thread_local! {
            static KEPT: Cell<Canonical> = const { Cell::new(Canonical::new()) };
        }
        // Taken, not borrowed: a fingerprint taken while this one is written (by a
        // `Serialize` impl) gets buffers of its own. `try_with` fails only in thread-local
        // destructors.
        let mut stream = KEPT.try_with(Cell::take).unwrap_or_default();
        stream.out.clear();
        stream.entries.clear();
        let result = write(&mut stream);
        if stream.out.capacity() <= KEPT_BYTES && stream.entries.capacity() <= KEPT_ENTRIES {
            let _ = KEPT.try_with(|kept| kept.set(stream));
        }
        result
    }

    /// Writes a string: its tag and its length-prefixed bytes.
    fn string(&mut self, text: &str) {
        self.out.push(b's');
        bytes(&mut self.out, text.as_bytes());
    }

    /// Writes a number from the digits of an integer.
    fn integer(&mut self, negative: bool, magnitude: u128) {
        self.out.push(b'#');
        bytes(&mut self.out, Digits::new(negative, magnitude).as_bytes());
    }

    /// Writes a value serde_json made.
    fn json(&mut self, value: &serde_json::Value) -> Result<(), serde_json::Error> {
        match value {
            // As its `Display` shows it. Not through `Serialize`: with `arbitrary_precision`
            // a `Number` serializes as serde_json's private struct, which `serialize_struct`
            // hands back to serde_json, which makes a `Number` of it.
            serde_json::Value::Number(number) => {
                self.out.push(b'#');
                display(&mut self.out, number);
                Ok(())
            }
            other => other.serialize(self),
        }
    }

    /// Runs `write`; if it fails, takes back what it wrote, so that a `Serialize` impl that
    /// carries on after an error (serde_json then has nothing of that item) leaves the stream
    /// as serde_json leaves its `Value`.
    fn undo_on_error<T>(
        &mut self,
        write: impl FnOnce(&mut Self) -> Result<T, serde_json::Error>,
    ) -> Result<T, serde_json::Error> {
        let (written, entries) = (self.out.len(), self.entries.len());
        let result = write(self);
        if result.is_err() {
            self.out.truncate(written);
            self.entries.truncate(entries);
        }
        result
    }

    /// Starts an object with one entry, keyed `variant`: the enum variants that carry data.
    fn variant(&mut self, variant: &str) {
        self.out.push(b'{');
        self.out.extend_from_slice(&1_u64.to_le_bytes());
        bytes(&mut self.out, variant.as_bytes());
    }
}

/// Writes `data` with its length before it.
fn bytes(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(data);
}

/// Writes `value`'s `Display` text with its length before it, as `bytes` would write the
/// `String` of `to_string`.
fn display<T: Display + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let at = out.len();
    out.extend_from_slice(&[0; 8]);
    // `to_string`, which serde_json calls, panics with this message.
    write!(Text(out), "{value}").expect("a Display implementation returned an error unexpectedly");
    let len = (out.len() - at - 8) as u64;
    out[at..at + 8].copy_from_slice(&len.to_le_bytes());
}

/// Writes a count (of array items, of object entries) at `at`, where eight bytes were kept.
fn patch_count(out: &mut [u8], at: usize, count: usize) {
    out[at..at + 8].copy_from_slice(&(count as u64).to_le_bytes());
}

/// `fmt::Write` into a byte vector.
struct Text<'a>(&'a mut Vec<u8>);

impl fmt::Write for Text<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// The decimal text of an integer, as serde_json (`itoa`) writes it.
struct Digits {
    /// The text, right-aligned: 39 digits for `u128::MAX` and a sign.
    buf: [u8; 40],
    /// Where the text starts in `buf`.
    start: usize,
}

impl Digits {
    /// The text of `-magnitude` if `negative`, else of `magnitude`.
    fn new(negative: bool, magnitude: u128) -> Self {
        let mut buf = [0; 40];
        let mut start = buf.len();
        let mut push = |digit: u8| {
            start -= 1;
            buf[start] = digit;
        };
        if let Ok(mut small) = u64::try_from(magnitude) {
            // The common case, without 128-bit divisions.
            loop {
                push(b'0' + (small % 10) as u8);
                small /= 10;
                if small == 0 {
                    break;
                }
            }
        } else {
            let mut large = magnitude;
            while large != 0 {
                push(b'0' + (large % 10) as u8);
                large /= 10;
            }
        }
        if negative {
            push(b'-');
        }
        Self { buf, start }
    }

    /// The text.
    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// The error serde_json's `to_value` gives for `value`, which it refuses.
///
/// serde_json's errors cannot be built outside it with their own code (only as a
/// `custom` message); asking it for the error keeps `Error::Encode`'s source exactly the
/// one it has always been. Only called where serde_json is known to fail.
fn refusal<T: Serialize + ?Sized>(value: &T) -> serde_json::Error {
    match serde_json::to_value(value) {
        Err(error) => error,
        Ok(_) => ser::Error::custom("serde_json accepts a value the fingerprint refused"),
    }
}

/// A map with one entry, `key: null`: serde_json's `to_value` of it gives the key's text, or
/// the error for a key it refuses.
struct OneKey<'a, K: ?Sized>(&'a K);

impl<K: Serialize + ?Sized> Serialize for OneKey<'_, K> {
    fn serialize<S: ser::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use ser::SerializeMap as _;
        let mut map = serializer.serialize_map(Some(1))?;
        map.serialize_entry(self.0, &())?;
        map.end()
    }
}

/// serde_json's text for the map key `key`, or its error.
fn key_text<K: Serialize + ?Sized>(key: &K) -> Result<String, serde_json::Error> {
    match serde_json::to_value(OneKey(key))? {
        serde_json::Value::Object(map) => match map.into_iter().next() {
            Some((text, _)) => Ok(text),
            None => Err(ser::Error::custom("serde_json dropped a map key")),
        },
        _ => Err(ser::Error::custom(
            "serde_json made a map into another value",
        )),
    }
}

/// The error serde_json gives for a map key that is not a string, a number, a bool or a
/// char.
fn key_must_be_a_string() -> serde_json::Error {
    refusal(&OneKey(&()))
}

/// A struct serialized through `serialize_struct(name, …)` with at most one field, to replay
/// serde_json's private structs to serde_json.
struct Replay<'a, T: ?Sized> {
    /// The struct's name.
    name: &'static str,
    /// The field, if one was serialized.
    field: Option<(&'static str, &'a T)>,
}

impl<T: Serialize + ?Sized> Serialize for Replay<'_, T> {
    fn serialize<S: ser::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use ser::SerializeStruct as _;
        let mut state = serializer.serialize_struct(self.name, 1)?;
        if let Some((key, value)) = self.field {
            state.serialize_field(key, value)?;
        }
        state.end()
    }
}

/// Whether serde_json's `to_value` reads a struct named `name` as one of its private
/// structs (numbers with `arbitrary_precision`, `RawValue` with `raw_value`) rather than as
/// an object: it depends on how serde_json was built, so serde_json is asked, once.
fn private_to_serde_json(name: &'static str) -> bool {
    fn ask(name: &'static str) -> bool {
        let probe = Replay {
            name,
            field: Some((name, "0")),
        };
        !matches!(
            serde_json::to_value(probe),
            Ok(serde_json::Value::Object(_))
        )
    }
    static NUMBER: OnceLock<bool> = OnceLock::new();
    static RAW_VALUE: OnceLock<bool> = OnceLock::new();
    match name {
        NUMBER_TOKEN => *NUMBER.get_or_init(|| ask(NUMBER_TOKEN)),
        RAW_VALUE_TOKEN => *RAW_VALUE.get_or_init(|| ask(RAW_VALUE_TOKEN)),
        _ => false,
    }
}

impl<'a> ser::Serializer for &'a mut Canonical {
    type Ok = ();
    type Error = serde_json::Error;

    type SerializeSeq = Array<'a>;
    type SerializeTuple = Array<'a>;
    type SerializeTupleStruct = Array<'a>;
    type SerializeTupleVariant = Array<'a>;
    type SerializeMap = Object<'a>;
    type SerializeStruct = Struct<'a>;
    type SerializeStructVariant = Object<'a>;

    fn serialize_bool(self, value: bool) -> Result<(), Self::Error> {
        self.out.push(if value { b't' } else { b'f' });
        Ok(())
    }

    fn serialize_i8(self, value: i8) -> Result<(), Self::Error> {
        self.serialize_i64(value.into())
    }

    fn serialize_i16(self, value: i16) -> Result<(), Self::Error> {
        self.serialize_i64(value.into())
    }

    fn serialize_i32(self, value: i32) -> Result<(), Self::Error> {
        self.serialize_i64(value.into())
    }

    fn serialize_i64(self, value: i64) -> Result<(), Self::Error> {
        self.integer(value < 0, value.unsigned_abs().into());
        Ok(())
    }

    fn serialize_i128(self, value: i128) -> Result<(), Self::Error> {
        // Beyond 64 bits only with `arbitrary_precision`, as `to_value` does.
        if serde_json::Number::from_i128(value).is_none() {
            return Err(refusal(&value));
        }
        self.integer(value < 0, value.unsigned_abs());
        Ok(())
    }

    fn serialize_u8(self, value: u8) -> Result<(), Self::Error> {
        self.serialize_u64(value.into())
    }

    fn serialize_u16(self, value: u16) -> Result<(), Self::Error> {
        self.serialize_u64(value.into())
    }

    fn serialize_u32(self, value: u32) -> Result<(), Self::Error> {
        self.serialize_u64(value.into())
    }

    fn serialize_u64(self, value: u64) -> Result<(), Self::Error> {
        self.integer(false, value.into());
        Ok(())
    }

    fn serialize_u128(self, value: u128) -> Result<(), Self::Error> {
        if serde_json::Number::from_u128(value).is_none() {
            return Err(refusal(&value));
        }
        self.integer(false, value);
        Ok(())
    }

    fn serialize_f32(self, value: f32) -> Result<(), Self::Error> {
        // serde_json widens an `f32` to `f64` (or, with `arbitrary_precision`, keeps its
        // shortest `f32` text) and makes NaN and the infinities null: let it.
        self.json(&serde_json::Value::from(value))
    }

    fn serialize_f64(self, value: f64) -> Result<(), Self::Error> {
        self.json(&serde_json::Value::from(value))
    }

    fn serialize_char(self, value: char) -> Result<(), Self::Error> {
        self.string(value.encode_utf8(&mut [0; 4]));
        Ok(())
    }

    fn serialize_str(self, value: &str) -> Result<(), Self::Error> {
        self.string(value);
        Ok(())
    }

    fn serialize_bytes(self, value: &[u8]) -> Result<(), Self::Error> {
        // An array of numbers.
        self.out.push(b'[');
        self.out
            .extend_from_slice(&(value.len() as u64).to_le_bytes());
        for &byte in value {
            self.integer(false, byte.into());
        }
        Ok(())
    }

    fn serialize_none(self) -> Result<(), Self::Error> {
        self.serialize_unit()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Self::Error> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), Self::Error> {
        self.out.push(b'n');
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Self::Error> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
    ) -> Result<(), Self::Error> {
        self.serialize_str(variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), Self::Error> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Self::Error> {
        self.variant(variant);
        value.serialize(self)
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Array<'a>, Self::Error> {
        // The length is a hint, which serde_json does not trust either: the count is
        // written when the array ends.
        Ok(Array::new(self))
    }

    fn serialize_tuple(self, len: usize) -> Result<Array<'a>, Self::Error> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Array<'a>, Self::Error> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Array<'a>, Self::Error> {
        self.variant(variant);
        Ok(Array::new(self))
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Object<'a>, Self::Error> {
        Ok(Object::new(self))
    }

    fn serialize_struct(self, name: &'static str, _len: usize) -> Result<Struct<'a>, Self::Error> {
        if private_to_serde_json(name) {
            return Ok(Struct::Private {
                stream: self,
                name,
                value: None,
            });
        }
        Ok(Struct::Object(Object::new(self)))
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Object<'a>, Self::Error> {
        self.variant(variant);
        Ok(Object::new(self))
    }

    fn collect_str<T: Display + ?Sized>(self, value: &T) -> Result<(), Self::Error> {
        self.out.push(b's');
        display(&mut self.out, value);
        Ok(())
    }
}

/// An array being written: its items follow a count, written when it ends.
struct Array<'a> {
    /// The stream.
    stream: &'a mut Canonical,
    /// Where the count goes.
    count_at: usize,
    /// The items written so far.
    count: usize,
}

impl<'a> Array<'a> {
    /// Starts an array.
    fn new(stream: &'a mut Canonical) -> Self {
        stream.out.push(b'[');
        let count_at = stream.out.len();
        stream.out.extend_from_slice(&[0; 8]);
        Self {
            stream,
            count_at,
            count: 0,
        }
    }

    /// Writes one item.
    fn item<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), serde_json::Error> {
        self.stream
            .undo_on_error(|stream| value.serialize(stream))?;
        self.count += 1;
        Ok(())
    }

    /// Writes the count.
    fn finish(self) {
        patch_count(&mut self.stream.out, self.count_at, self.count);
    }
}

impl ser::SerializeSeq for Array<'_> {
    type Ok = ();
    type Error = serde_json::Error;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Self::Error> {
        self.item(value)
    }

    fn end(self) -> Result<(), Self::Error> {
        self.finish();
        Ok(())
    }
}

impl ser::SerializeTuple for Array<'_> {
    type Ok = ();
    type Error = serde_json::Error;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Self::Error> {
        self.item(value)
    }

    fn end(self) -> Result<(), Self::Error> {
        self.finish();
        Ok(())
    }
}

impl ser::SerializeTupleStruct for Array<'_> {
    type Ok = ();
    type Error = serde_json::Error;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Self::Error> {
        self.item(value)
    }

    fn end(self) -> Result<(), Self::Error> {
        self.finish();
        Ok(())
    }
}

impl ser::SerializeTupleVariant for Array<'_> {
    type Ok = ();
    type Error = serde_json::Error;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Self::Error> {
        self.item(value)
    }

    fn end(self) -> Result<(), Self::Error> {
        self.finish();
        Ok(())
    }
}

/// An object being written: its entries follow a count; both are rewritten when it ends.
struct Object<'a> {
    /// The stream.
    stream: &'a mut Canonical,
    /// Where the count goes; the entries start after it.
    count_at: usize,
    /// The index of this object's first entry in `stream.entries`.
    first: usize,
    /// Where the key waiting for its value starts, if one was written.
    key: Option<usize>,
}

impl<'a> Object<'a> {
    /// Starts an object.
    fn new(stream: &'a mut Canonical) -> Self {
        stream.out.push(b'{');
        let count_at = stream.out.len();
        stream.out.extend_from_slice(&[0; 8]);
        let first = stream.entries.len();
        Self {
            stream,
            count_at,
            first,
            key: None,
        }
    }

    /// Writes a key. A key still without a value is replaced by it, as serde_json replaces
    /// it (unless this one fails).
    fn key<K: Serialize + ?Sized>(&mut self, key: &K) -> Result<(), serde_json::Error> {
        let at = self.stream.out.len();
        self.stream
            .undo_on_error(|stream| key.serialize(Key(&mut stream.out)))?;
        if let Some(replaced) = self.key {
            // Rare: a `Serialize` impl calling `serialize_key` twice.
            self.stream.out.copy_within(at.., replaced);
            let len = self.stream.out.len() - at;
            self.stream.out.truncate(replaced + len);
        } else {
            self.key = Some(at);
        }
        Ok(())
    }

    /// Writes the value of the last key. A value with no key before it (a bug of the
    /// `Serialize` impl, on which serde_json panics) is an error.
    fn value<V: Serialize + ?Sized>(&mut self, value: &V) -> Result<(), serde_json::Error> {
        let Some(key) = self.key.take() else {
            return Err(ser::Error::custom(
                "serialize_value called before serialize_key",
            ));
        };
        let at = self.stream.out.len();
        let written = self.stream.undo_on_error(|stream| value.serialize(stream));
        if written.is_err() {
            // serde_json has taken the key, and has no entry.
            self.stream.out.truncate(key);
            return written;
        }
        self.stream.entries.push(Entry {
            key,
            value: at,
            end: self.stream.out.len(),
        });
        Ok(())
    }

    /// Ends the object: its entries sorted by key, the last of equal keys kept, and their
    /// count.
    fn finish(self) {
        let Canonical { out, entries } = self.stream;
        if let Some(at) = self.key {
            // A key without a value: serde_json drops it.
            out.truncate(at);
        }
        let mine = &mut entries[self.first..];
        let text = |entry: &Entry| &out[entry.key + 8..entry.value];
        // Objects from a `BTreeMap` or a `Value`, and structs whose fields are declared
        // in order, need no rewriting.
        let in_order = mine.windows(2).all(|pair| text(&pair[0]) < text(&pair[1]));
        let count = if in_order {
            mine.len()
        } else {
            // By key, and among equal keys the last written first (offsets grow); then
            // only the first of equal keys is kept.
            mine.sort_unstable_by(|a, b| text(a).cmp(text(b)).then(b.key.cmp(&a.key)));
            let mut count = 0;
            for i in 0..mine.len() {
                if count == 0 || text(&mine[count - 1]) != text(&mine[i]) {
                    mine[count] = mine[i];
                    count += 1;
                }
            }
            // Copied in order past the end of the stream, then moved back over the entries.
            let written = out.len();
            for entry in &mine[..count] {
                out.extend_from_within(entry.key..entry.end);
            }
            let start = self.count_at + 8;
            let len = out.len() - written;
            out.copy_within(written.., start);
            out.truncate(start + len);
            count
        };
        entries.truncate(self.first);
        patch_count(out, self.count_at, count);
    }
}

impl ser::SerializeMap for Object<'_> {
    type Ok = ();
    type Error = serde_json::Error;

    fn serialize_key<K: Serialize + ?Sized>(&mut self, key: &K) -> Result<(), Self::Error> {
        self.key(key)
    }

    fn serialize_value<V: Serialize + ?Sized>(&mut self, value: &V) -> Result<(), Self::Error> {
        self.value(value)
    }

    fn end(self) -> Result<(), Self::Error> {
        self.finish();
        Ok(())
    }
}

impl ser::SerializeStructVariant for Object<'_> {
    type Ok = ();
    type Error = serde_json::Error;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Self::Error> {
        self.key(key)?;
        self.value(value)
    }

    fn end(self) -> Result<(), Self::Error> {
        self.finish();
        Ok(())
    }
}

/// A struct being written: an object, or one of serde_json's private structs.
enum Struct<'a> {
    /// An object of the fields.
    Object(Object<'a>),
    /// A number (`arbitrary_precision`) or a `RawValue`, which `to_value` parses from the
    /// struct's field: serde_json is given the field and its value is written.
    Private {
        /// The stream.
        stream: &'a mut Canonical,
        /// The struct's name.
        name: &'static str,
        /// What serde_json made of the last field.
        value: Option<serde_json::Value>,
    },
}

impl ser::SerializeStruct for Struct<'_> {
    type Ok = ();
    type Error = serde_json::Error;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Self::Error> {
        match self {
            Self::Object(object) => {
                object.key(key)?;
                object.value(value)
            }
            Self::Private {
                name, value: made, ..
            } => {
                let replay = Replay {
                    name,
                    field: Some((key, value)),
                };
                *made = Some(serde_json::to_value(replay)?);
                Ok(())
            }
        }
    }

    fn end(self) -> Result<(), Self::Error> {
        match self {
            Self::Object(object) => {
                object.finish();
                Ok(())
            }
            Self::Private {
                stream,
                name,
                value,
            } => {
                let value = match value {
                    Some(value) => value,
                    // serde_json's answer (it panics) to the struct without its field.
                    None => serde_json::to_value(Replay::<()> { name, field: None })?,
                };
                stream.json(&value)
            }
        }
    }
}

/// A `Serializer` for a map key: writes its text, length-prefixed, as serde_json's
/// `to_value` makes a key string.
struct Key<'a>(&'a mut Vec<u8>);

impl Key<'_> {
    /// Writes the key's text.
    fn text(self, text: &str) -> Result<(), serde_json::Error> {
        bytes(self.0, text.as_bytes());
        Ok(())
    }

    /// Writes an integer key's digits.
    fn integer(self, negative: bool, magnitude: u128) -> Result<(), serde_json::Error> {
        bytes(self.0, Digits::new(negative, magnitude).as_bytes());
        Ok(())
    }

    /// Writes a float key as serde_json writes it (an `f32` in its own shortest text, not
    /// widened as a value is), or gives its error for NaN and the infinities.
    fn float<F: Serialize>(self, value: F) -> Result<(), serde_json::Error> {
        let text = key_text(&value)?;
        self.text(&text)
    }
}

impl ser::Serializer for Key<'_> {
    type Ok = ();
    type Error = serde_json::Error;

    type SerializeSeq = Impossible<(), serde_json::Error>;
    type SerializeTuple = Impossible<(), serde_json::Error>;
    type SerializeTupleStruct = Impossible<(), serde_json::Error>;
    type SerializeTupleVariant = Impossible<(), serde_json::Error>;
    type SerializeMap = Impossible<(), serde_json::Error>;
    type SerializeStruct = Impossible<(), serde_json::Error>;
    type SerializeStructVariant = Impossible<(), serde_json::Error>;

    fn serialize_bool(self, value: bool) -> Result<(), Self::Error> {
        self.text(if value { "true" } else { "false" })
    }

    fn serialize_i8(self, value: i8) -> Result<(), Self::Error> {
        self.serialize_i64(value.into())
    }

    fn serialize_i16(self, value: i16) -> Result<(), Self::Error> {
        self.serialize_i64(value.into())
    }

    fn serialize_i32(self, value: i32) -> Result<(), Self::Error> {
        self.serialize_i64(value.into())
    }

    fn serialize_i64(self, value: i64) -> Result<(), Self::Error> {
        self.integer(value < 0, value.unsigned_abs().into())
    }

    fn serialize_i128(self, value: i128) -> Result<(), Self::Error> {
        // Any 128-bit key is text, even where the value would be out of range.
        self.integer(value < 0, value.unsigned_abs())
    }

    fn serialize_u8(self, value: u8) -> Result<(), Self::Error> {
        self.serialize_u64(value.into())
    }

    fn serialize_u16(self, value: u16) -> Result<(), Self::Error> {
        self.serialize_u64(value.into())
    }

    fn serialize_u32(self, value: u32) -> Result<(), Self::Error> {
        self.serialize_u64(value.into())
    }

    fn serialize_u64(self, value: u64) -> Result<(), Self::Error> {
        self.integer(false, value.into())
    }

    fn serialize_u128(self, value: u128) -> Result<(), Self::Error> {
        self.integer(false, value)
    }

    fn serialize_f32(self, value: f32) -> Result<(), Self::Error> {
        self.float(value)
    }

    fn serialize_f64(self, value: f64) -> Result<(), Self::Error> {
        self.float(value)
    }

    fn serialize_char(self, value: char) -> Result<(), Self::Error> {
        self.text(value.encode_utf8(&mut [0; 4]))
    }

    fn serialize_str(self, value: &str) -> Result<(), Self::Error> {
        self.text(value)
    }

    fn serialize_bytes(self, _value: &[u8]) -> Result<(), Self::Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_none(self) -> Result<(), Self::Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result<(), Self::Error> {
        // Refused without looking inside, as serde_json does.
        Err(key_must_be_a_string())
    }

    fn serialize_unit(self) -> Result<(), Self::Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Self::Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
    ) -> Result<(), Self::Error> {
        self.text(variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), Self::Error> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _variant_index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<(), Self::Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, Self::Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, Self::Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, Self::Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, Self::Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, Self::Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, Self::Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, Self::Error> {
        Err(key_must_be_a_string())
    }

    fn collect_str<T: Display + ?Sized>(self, value: &T) -> Result<(), Self::Error> {
        display(self.0, value);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::panic::{self, AssertUnwindSafe};

    use proptest::prelude::*;
    use serde::ser::{SerializeMap as _, SerializeSeq as _, SerializeStruct as _};
    use serde::{Serialize, Serializer};
    use serde_json::{Value, json};

    use super::*;

    /// The stream as it was first defined and computed: over the tree `to_value` makes. The
    /// streaming serializer must agree with it on every value; this is the code of
    /// `Fingerprint::of` and `hash_canonical` before it, unchanged.
    fn oracle<T: Serialize + ?Sized>(value: &T) -> Result<Fingerprint, Error> {
        let value = serde_json::to_value(value).map_err(|source| Error::Encode {
            what: "payload for its fingerprint",
            source,
        })?;
        let mut hasher = Sha256::new();
        hash_canonical(&value, &mut hasher);
        Ok(Fingerprint(hasher.finalize().into()))
    }

    /// Feeds `value` to the hasher with a type tag and a length before every variable-length
    /// part, so that distinct values can never produce the same byte stream.
    fn hash_canonical(value: &serde_json::Value, hasher: &mut Sha256) {
        use serde_json::Value;
        fn bytes(hasher: &mut Sha256, data: &[u8]) {
            hasher.update((data.len() as u64).to_le_bytes());
            hasher.update(data);
        }
        match value {
            Value::Null => hasher.update(b"n"),
            Value::Bool(b) => hasher.update(if *b { b"t" } else { b"f" }),
            Value::Number(n) => {
                hasher.update(b"#");
                bytes(hasher, n.to_string().as_bytes());
            }
            Value::String(s) => {
                hasher.update(b"s");
                bytes(hasher, s.as_bytes());
            }
            Value::Array(items) => {
                hasher.update(b"[");
                hasher.update((items.len() as u64).to_le_bytes());
                for item in items {
                    hash_canonical(item, hasher);
                }
            }
            Value::Object(map) => {
                hasher.update(b"{");
                hasher.update((map.len() as u64).to_le_bytes());
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                for (key, item) in entries {
                    bytes(hasher, key.as_bytes());
                    hash_canonical(item, hasher);
                }
            }
        }
    }

    /// `Ok` if `Fingerprint::of` and the oracle agree on `value`: the same digest, or the
    /// same `Error::Encode` (serde_json's error with the same text, category and position).
    fn compare<T: Serialize + ?Sized>(value: &T) -> Result<(), String> {
        let shown = || match serde_json::to_value(value) {
            Ok(tree) => tree.to_string(),
            Err(error) => format!("<{error}>"),
        };
        match (Fingerprint::of(value), oracle(value)) {
            (Ok(new), Ok(old)) if new == old => Ok(()),
            (
                Err(Error::Encode {
                    what: new_what,
                    source: new,
                }),
                Err(Error::Encode {
                    what: old_what,
                    source: old,
                }),
            ) if new_what == old_what
                && new.to_string() == old.to_string()
                && new.classify() == old.classify()
                && (new.line(), new.column()) == (old.line(), old.column()) =>
            {
                Ok(())
            }
            (new, old) => Err(format!("{}: got {new:?}, the oracle {old:?}", shown())),
        }
    }

    #[track_caller]
    fn assert_same<T: Serialize + ?Sized>(value: &T) {
        if let Err(difference) = compare(value) {
            panic!("{difference}");
        }
    }

    #[track_caller]
    fn assert_encode_error<T: Serialize + ?Sized>(value: &T, message: &str) {
        assert_same(value);
        match Fingerprint::of(value) {
            Err(Error::Encode { source, .. }) => assert_eq!(source.to_string(), message),
            other => panic!("expected Error::Encode, got {other:?}"),
        }
    }

    /// Whether serde_json was built with `arbitrary_precision`, as `cargo test -p
    /// idem-runtime --features serde_json/arbitrary_precision` builds it: its numbers beyond
    /// 64 bits are numbers and an `f32` keeps its own text, so digests of those differ from
    /// the default build's (in the oracle as in the serializer).
    fn arbitrary_precision() -> bool {
        serde_json::Number::from_u128(u128::MAX).is_some()
    }

    fn hex(fingerprint: &Fingerprint) -> String {
        fingerprint
            .as_bytes()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    // ---- Values serialized by hand, for what derived impls never do. ----

    /// A map serialized from its pairs in their order, duplicates and all.
    #[derive(Clone, Debug)]
    struct Pairs<K, V>(Vec<(K, V)>);

    impl<K: Serialize, V: Serialize> Serialize for Pairs<K, V> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(Some(self.0.len()))?;
            for (key, value) in &self.0 {
                map.serialize_entry(key, value)?;
            }
            map.end()
        }
    }

    /// Bytes through `serialize_bytes`, as `serde_bytes` serializes them.
    struct Bytes<'a>(&'a [u8]);

    impl Serialize for Bytes<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(self.0)
        }
    }

    /// A value through `collect_str`.
    struct Shown<T>(T);

    impl<T: std::fmt::Display> Serialize for Shown<T> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_str(&self.0)
        }
    }

    /// A sequence whose length hint is wrong (or absent).
    struct Lying(Option<usize>, Vec<u8>);

    impl Serialize for Lying {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut seq = serializer.serialize_seq(self.0)?;
            for item in &self.1 {
                seq.serialize_element(item)?;
            }
            seq.end()
        }
    }

    /// A recursive value whose maps keep their order and duplicates: what `Value`, whose
    /// objects come sorted and unique, cannot exercise.
    #[derive(Clone, Debug)]
    enum Tree {
        Leaf(Value),
        List(Vec<Tree>),
        Map(Pairs<String, Tree>),
        Struct(Vec<(&'static str, Tree)>),
        Variant(&'static str, Box<Tree>),
    }

    impl Serialize for Tree {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            match self {
                Self::Leaf(value) => value.serialize(serializer),
                Self::List(items) => items.serialize(serializer),
                Self::Map(pairs) => pairs.serialize(serializer),
                Self::Struct(fields) => {
                    let mut state = serializer.serialize_struct("Tree", fields.len())?;
                    for (key, value) in fields {
                        state.serialize_field(key, value)?;
                    }
                    state.end()
                }
                Self::Variant(variant, value) => {
                    serializer.serialize_newtype_variant("Tree", 3, variant, value)
                }
            }
        }
    }

    // ---- Strategies. ----

    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            prop_oneof![
                Just(u64::MAX),
                Just(0),
                Just(1),
                Just(i64::MAX as u64),
                Just(i64::MAX as u64 + 1)
            ]
            .prop_map(Value::from),
            prop_oneof![Just(i64::MIN), Just(-1)].prop_map(Value::from),
            prop_oneof![
                Just(0.0),
                Just(-0.0),
                Just(0.1),
                Just(1e16),
                Just(1e-7),
                Just(f64::MAX),
                Just(f64::MIN_POSITIVE),
                Just(5e-324),
                Just(123_456_789.125)
            ]
            .prop_map(Value::from),
            (-1e6..1e6_f64).prop_map(Value::from),
        ]
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            number(),
            any::<String>().prop_map(Value::from),
            "[a-cé😀]{0,3}".prop_map(Value::from),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(5, 96, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![any::<String>(), "[a-cé😀]{0,3}"],
                    inner,
                    0..8
                )
                .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    /// Keys from a small alphabet, so that equal keys and shared prefixes are common.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![4 => "[ab\u{e9}]{0,3}", 1 => any::<String>()]
    }

    fn tree() -> impl Strategy<Value = Tree> {
        let names = prop_oneof![Just("a"), Just("b"), Just("ab"), Just("é"), Just("")];
        leaf()
            .prop_map(Tree::Leaf)
            .prop_recursive(5, 96, 8, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Tree::List),
                    prop::collection::vec((key(), inner.clone()), 0..8)
                        .prop_map(|pairs| Tree::Map(Pairs(pairs))),
                    prop::collection::vec((names.clone(), inner.clone()), 0..6)
                        .prop_map(Tree::Struct),
                    (names.clone(), inner)
                        .prop_map(|(name, value)| Tree::Variant(name, Box::new(value))),
                ]
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn json_values_stream_as_the_oracle_hashes_them(value in json_value()) {
            prop_assert_eq!(compare(&value), Ok(()));
        }

        #[test]
        fn unsorted_maps_with_duplicate_keys_stream_as_the_oracle_hashes_them(value in tree()) {
            prop_assert_eq!(compare(&value), Ok(()));
        }

        #[test]
        fn typed_values_stream_as_the_oracle_hashes_them(
            ints in any::<(i8, i16, i32, i64, u8, u16, u32, u64)>(),
            wide in any::<(i128, u128)>(),
            narrow in (any::<i64>(), any::<u64>()),
            floats in any::<(f32, f64)>(),
            text in any::<(char, String, Option<String>)>(),
            maps in any::<(HashMap<i32, bool>, HashMap<bool, u8>, BTreeMap<char, i8>)>(),
        ) {
            prop_assert_eq!(compare(&ints), Ok(()));
            prop_assert_eq!(compare(&wide), Ok(()));
            prop_assert_eq!(compare(&(i128::from(narrow.0), u128::from(narrow.1))), Ok(()));
            prop_assert_eq!(compare(&floats), Ok(()));
            prop_assert_eq!(compare(&text), Ok(()));
            prop_assert_eq!(compare(&maps), Ok(()));
        }

        #[test]
        fn map_keys_of_every_kind_stream_as_the_oracle_hashes_them(
            small in prop::collection::vec((0..4_u8, any::<i16>()), 0..10),
            floats in prop::collection::vec((any::<f32>(), any::<u8>()), 0..4),
            doubles in prop::collection::vec((any::<f64>(), any::<u8>()), 0..4),
            wide in prop::collection::vec((any::<i128>(), any::<u128>()), 0..4),
            chars in prop::collection::vec((any::<char>(), any::<bool>()), 0..6),
            bools in prop::collection::vec((any::<bool>(), key()), 0..6),
        ) {
            prop_assert_eq!(compare(&Pairs(small)), Ok(()));
            prop_assert_eq!(compare(&Pairs(floats)), Ok(()));
            prop_assert_eq!(compare(&Pairs(doubles)), Ok(()));
            prop_assert_eq!(compare(&Pairs(wide)), Ok(()));
            prop_assert_eq!(compare(&Pairs(chars)), Ok(()));
            prop_assert_eq!(compare(&Pairs(bools)), Ok(()));
        }
    }

    // ---- Typed cases. ----

    /// A representative message: the digest of its fingerprint is pinned below.
    mod pinned {
        use std::collections::{BTreeMap, HashMap};

        use serde::Serialize;

        #[derive(Serialize)]
        pub struct Message {
            pub order_no: String,
            pub amount: u64,
            pub delta: i64,
            pub price: f64,
            pub ratio: f32,
            pub flag: bool,
            pub initial: char,
            pub nothing: Option<u8>,
            pub something: Option<&'static str>,
            pub unit: (),
            pub pair: (u8, &'static str),
            pub customer: Customer,
            pub tags: Vec<&'static str>,
            pub attributes: HashMap<&'static str, i32>,
            pub by_id: BTreeMap<u32, bool>,
            pub states: Vec<State>,
            pub wrapped: Wrapped,
        }

        #[derive(Serialize)]
        pub struct Customer {
            pub name: &'static str,
            pub big: u64,
        }

        #[derive(Serialize)]
        pub struct Wrapped(pub u16);

        #[derive(Serialize)]
        pub enum State {
            Idle,
            Paid(u64),
            Moved(i8, i8),
            Failed { code: u16, reason: &'static str },
        }

        pub fn message() -> Message {
            Message {
                order_no: "A-1001".to_owned(),
                amount: 250,
                delta: -17,
                price: 19.99,
                ratio: 0.1,
                flag: true,
                initial: 'Ω',
                nothing: None,
                something: Some("ünïcödé ✓"),
                unit: (),
                pair: (7, "seven"),
                customer: Customer {
                    name: "Zoë",
                    big: u64::MAX,
                },
                tags: vec!["b", "a", ""],
                attributes: HashMap::from([("zeta", 26), ("alpha", 1), ("mu", -12)]),
                by_id: BTreeMap::from([(10, true), (2, false)]),
                states: vec![
                    State::Idle,
                    State::Paid(5),
                    State::Moved(-1, 1),
                    State::Failed {
                        code: 402,
                        reason: "card declined",
                    },
                ],
                wrapped: Wrapped(65535),
            }
        }
    }

    #[test]
    fn the_digest_of_a_representative_message_is_pinned() {
        // Computed by the `to_value` implementation this serializer replaced. Stored
        // fingerprints depend on it: it must never change.
        const PINNED: &str = "24921d8aa8681e1f268eba6b807ddb3a92c8da05dde8d1116271710742e24de3";
        let message = pinned::message();
        assert_same(&message);
        if !arbitrary_precision() {
            assert_eq!(hex(&Fingerprint::of(&message).unwrap()), PINNED);
            assert_eq!(hex(&oracle(&message).unwrap()), PINNED);
        }
    }

    #[test]
    fn fingerprints_are_canonical_and_tell_payloads_apart() {
        let mut a = HashMap::new();
        let mut b = HashMap::new();
        for i in 0..64 {
            a.insert(format!("k{i}"), i);
        }
        for i in (0..64).rev() {
            b.insert(format!("k{i}"), i);
        }
        assert_eq!(Fingerprint::of(&a).unwrap(), Fingerprint::of(&b).unwrap());
        assert_same(&a);
        assert_ne!(
            Fingerprint::of(&("ab", "c")).unwrap(),
            Fingerprint::of(&("a", "bc")).unwrap()
        );
        assert_ne!(
            Fingerprint::of(&None::<u8>).unwrap(),
            Fingerprint::of(&0).unwrap()
        );
    }

    #[derive(Serialize)]
    struct Inner {
        z: u8,
        a: Vec<Option<i32>>,
    }

    #[derive(Serialize)]
    struct Outer {
        name: String,
        inner: Inner,
        list: Vec<Inner>,
        unit: (),
        tuple: (u8, char, f32),
    }

    #[derive(Serialize)]
    struct Point(i32, i32);

    #[derive(Serialize)]
    struct Meters(f64);

    #[derive(Serialize)]
    struct Marker;

    #[derive(Serialize)]
    enum Shape {
        Empty,
        Circle(f64),
        Line(Point, Point),
        Rect { width: u32, height: u32 },
        Nested(Option<Box<Shape>>),
    }

    #[test]
    fn structs_tuples_and_units() {
        let inner = || Inner {
            z: 9,
            a: vec![Some(-1), None, Some(i32::MAX)],
        };
        assert_same(&Outer {
            name: "outer".to_owned(),
            inner: inner(),
            list: vec![inner(), inner()],
            unit: (),
            tuple: (1, 'x', 2.5),
        });
        assert_same(&Point(-3, 4));
        assert_same(&Meters(1.5));
        assert_same(&Marker);
        assert_same(&());
        assert_same(&((), ((),), (1, (2, (3,)))));
        assert_same(&Vec::<u8>::new());
        assert_same(&[[0_u8; 0]; 3]);
    }

    #[test]
    fn enum_variants_of_every_kind() {
        for shape in [
            Shape::Empty,
            Shape::Circle(2.0),
            Shape::Line(Point(0, 0), Point(-1, 7)),
            Shape::Rect {
                width: 3,
                height: 4,
            },
            Shape::Nested(None),
            Shape::Nested(Some(Box::new(Shape::Rect {
                width: 1,
                height: 2,
            }))),
        ] {
            assert_same(&shape);
            assert_same(&vec![shape]);
        }
    }

    #[derive(Serialize)]
    #[serde(tag = "type")]
    enum Internal {
        Plain,
        Fields { b: u8, a: u8 },
        Wrapped(Inner),
    }

    #[derive(Serialize)]
    #[serde(tag = "t", content = "c")]
    enum Adjacent {
        Unit,
        Tuple(u8, u8),
        Fields { b: u8 },
    }

    #[derive(Serialize)]
    #[serde(untagged)]
    enum Untagged {
        Number(u64),
        Text(String),
        Fields { b: u8 },
    }

    #[test]
    fn tagged_and_untagged_enums() {
        assert_same(&Internal::Plain);
        assert_same(&Internal::Fields { b: 2, a: 1 });
        assert_same(&Internal::Wrapped(Inner {
            z: 0,
            a: vec![None],
        }));
        assert_same(&Adjacent::Unit);
        assert_same(&Adjacent::Tuple(1, 2));
        assert_same(&Adjacent::Fields { b: 3 });
        assert_same(&Untagged::Number(5));
        assert_same(&Untagged::Text("five".to_owned()));
        assert_same(&Untagged::Fields { b: 5 });
    }

    #[derive(Serialize)]
    struct Flattened {
        id: u32,
        #[serde(flatten)]
        inner: Inner,
        #[serde(flatten)]
        extra: BTreeMap<String, Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        #[serde(skip)]
        _skipped: u8,
        #[serde(rename = "A")]
        renamed: bool,
    }

    #[test]
    fn flattened_and_skipped_fields() {
        for note in [None, Some("n".to_owned())] {
            assert_same(&Flattened {
                id: 1,
                inner: Inner {
                    z: 2,
                    a: vec![Some(3)],
                },
                extra: BTreeMap::from([
                    ("m".to_owned(), json!({"y": 1, "x": [true]})),
                    // The same key as a flattened field: the later wins in both.
                    ("z".to_owned(), json!("later")),
                ]),
                note,
                _skipped: 9,
                renamed: true,
            });
        }
    }

    #[test]
    fn options_chars_and_strings() {
        assert_same(&None::<String>);
        assert_same(&Some(Some(3_u8)));
        assert_same(&Some(None::<u8>));
        for c in ['a', 'é', '\u{0}', '😀', char::MAX] {
            assert_same(&c);
        }
        assert_same(&"");
        assert_same(&"ünïcödé 😀 \u{0} \"quoted\"");
        assert_same(&String::from_utf8(vec![b'x'; 1000]).unwrap());
        assert_same(&Shown(3.5_f32));
        assert_same(&Shown("shown"));
        assert_same(&Pairs(vec![(Shown(-12_i64), Shown('k'))]));
    }

    #[test]
    fn floats_like_serde_json() {
        for f in [
            0.0,
            -0.0,
            0.1,
            -2.5,
            1.0,
            1e16,
            1e17,
            1e-7,
            123_456_789.0,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            f64::EPSILON,
            5e-324,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            assert_same(&f);
            assert_same(&Pairs(vec![(f, f)]));
        }
        for f in [
            0.1_f32,
            -0.0,
            16_777_217.0,
            1e-45,
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ] {
            assert_same(&f);
            assert_same(&Pairs(vec![(f, f)]));
        }
        // A NaN value is null; a NaN key is an error.
        assert_eq!(
            Fingerprint::of(&f64::NAN).unwrap(),
            Fingerprint::of(&()).unwrap()
        );
        assert_encode_error(
            &Pairs(vec![(f32::NAN, 1)]),
            "float key must be finite (got NaN or +/-inf)",
        );
        // An f32 value is widened to f64, an f32 key is not.
        if !arbitrary_precision() {
            assert_ne!(
                Fingerprint::of(&0.1_f32).unwrap(),
                Fingerprint::of(&0.1_f64).unwrap()
            );
        }
        assert_eq!(
            Fingerprint::of(&Pairs(vec![(0.1_f32, ())])).unwrap(),
            Fingerprint::of(&Pairs(vec![("0.1", ())])).unwrap()
        );
    }

    #[test]
    fn integers_up_to_128_bits() {
        for i in [
            0,
            -1,
            i64::MIN.into(),
            u64::MAX.into(),
            i128::MIN,
            i128::MAX,
        ] {
            assert_same(&i);
            assert_same(&Pairs(vec![(i, i)]));
        }
        for u in [0, u64::MAX.into(), u128::from(u64::MAX) + 1, u128::MAX] {
            assert_same(&u);
        }
        assert_same(&(i8::MIN, i16::MIN, i32::MIN, u8::MAX, u16::MAX, u32::MAX));
        // Beyond 64 bits a value is an error, a key is text.
        if !arbitrary_precision() {
            assert_encode_error(&u128::MAX, "number out of range");
            assert_encode_error(&(i128::from(i64::MIN) - 1), "number out of range");
        }
        assert_eq!(
            Fingerprint::of(&Pairs(vec![(u128::MAX, ())])).unwrap(),
            Fingerprint::of(&Pairs(vec![(u128::MAX.to_string(), ())])).unwrap()
        );
    }

    #[test]
    fn bytes_are_an_array_of_numbers() {
        assert_same(&Bytes(b""));
        assert_same(&Bytes(&[0, 1, 127, 128, 255]));
        assert_eq!(
            Fingerprint::of(&Bytes(&[1, 2])).unwrap(),
            Fingerprint::of(&[1, 2]).unwrap()
        );
    }

    #[test]
    fn sequence_length_hints_are_not_trusted() {
        assert_same(&Lying(None, vec![1, 2, 3]));
        assert_same(&Lying(Some(1), vec![1, 2, 3]));
        assert_same(&Lying(Some(9), vec![]));
    }

    #[derive(Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
    enum Color {
        Red,
        Green,
    }

    #[derive(Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
    struct Id(u32);

    #[test]
    fn maps_with_keys_of_every_kind() {
        assert_same(&HashMap::from([(1_i32, "a"), (-20, "b"), (3, "c")]));
        assert_same(&BTreeMap::from([(10_u64, 1), (9, 2), (100, 3)]));
        assert_same(&HashMap::from([(true, 1), (false, 2)]));
        assert_same(&BTreeMap::from([('b', 1), ('a', 2), ('é', 3)]));
        assert_same(&BTreeMap::from([(Color::Red, 1), (Color::Green, 2)]));
        assert_same(&BTreeMap::from([(Id(2), 1), (Id(10), 2)]));
        assert_same(&HashMap::<String, u8>::new());
        // Keys sort as bytes: "10" < "9", "Z" < "a" < "é".
        assert_same(&Pairs(vec![("é", 1), ("a", 2), ("Z", 3), ("", 4)]));
        // An integer key and its text are the same key.
        assert_eq!(
            Fingerprint::of(&BTreeMap::from([(7, true)])).unwrap(),
            Fingerprint::of(&BTreeMap::from([("7", true)])).unwrap()
        );
    }

    #[test]
    fn the_last_of_equal_keys_wins_and_counts_once() {
        let duplicated = Pairs(vec![("b", 1), ("a", 2), ("b", 3), ("a", 4), ("c", 5)]);
        assert_same(&duplicated);
        assert_eq!(
            Fingerprint::of(&duplicated).unwrap(),
            Fingerprint::of(&json!({"a": 4, "b": 3, "c": 5})).unwrap()
        );
        // Equal after conversion to text.
        assert_same(&Pairs(vec![(Shown(1), 1), (Shown(1), 2)]));
        assert_same(&Pairs(vec![
            (1, Pairs(vec![("x", 1), ("x", 2)])),
            (1, Pairs(vec![])),
        ]));
    }

    #[test]
    fn keys_serde_json_refuses_are_encode_errors() {
        #[derive(Serialize, PartialEq, Eq, Hash)]
        struct Composite {
            a: u8,
        }
        let message = "key must be a string";
        assert_encode_error(&HashMap::from([(Composite { a: 1 }, 1)]), message);
        assert_encode_error(&HashMap::from([((1, 2), 1)]), message);
        assert_encode_error(&HashMap::from([(Some("k"), 1)]), message);
        assert_encode_error(&HashMap::from([((), 1)]), message);
        assert_encode_error(&HashMap::from([(vec![1], 1)]), message);
        assert_encode_error(&Pairs(vec![(Bytes(b"k"), 1)]), message);
        assert_encode_error(&Pairs(vec![(Shape::Circle(1.0), 1)]), message);
        assert_encode_error(&Pairs(vec![(Marker, 1)]), message);
        // Deep inside a value, after entries that did serialize.
        assert_encode_error(
            &(
                json!([1, {"a": 2}]),
                vec![Pairs(vec![(1, 1)]), Pairs(vec![])],
                HashMap::from([(Some(1), 1)]),
            ),
            message,
        );
    }

    /// A `Serialize` impl failing with its own error.
    struct Failing;

    impl Serialize for Failing {
        fn serialize<S: Serializer>(&self, _serializer: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("no fingerprint for you"))
        }
    }

    #[test]
    fn errors_of_serialize_impls_are_encode_errors() {
        assert_encode_error(&Failing, "no fingerprint for you");
        assert_encode_error(&(1, vec![Failing]), "no fingerprint for you");
        assert_encode_error(&BTreeMap::from([(1, Failing)]), "no fingerprint for you");
        assert_encode_error(
            &Pairs(vec![("fine", None), ("failing", Some(Failing))]),
            "no fingerprint for you",
        );
    }

    /// A map serialized with odd but legal calls: a key replaced before its value, a
    /// trailing key without one, and errors the impl ignores and carries on after.
    struct Odd;

    impl Serialize for Odd {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(None)?;
            map.serialize_key("replaced")?;
            map.serialize_key("b")?;
            map.serialize_value(&1)?;
            // A key that fails leaves the key before it waiting.
            map.serialize_key("a")?;
            assert!(map.serialize_key(&()).is_err());
            map.serialize_value(&vec![Pairs(vec![("y", 1), ("x", 2)])])?;
            // A value that fails takes its key, and leaves no entry.
            map.serialize_key("c")?;
            assert!(
                map.serialize_value(&(1, Pairs(vec![("z", 1), ("y", 1)]), Failing))
                    .is_err()
            );
            map.serialize_entry("d", &4)?;
            map.serialize_key("trailing")?;
            map.end()
        }
    }

    /// A list whose impl ignores a failing item and carries on.
    struct Forgiving;

    impl Serialize for Forgiving {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut seq = serializer.serialize_seq(Some(3))?;
            seq.serialize_element(&1)?;
            assert!(
                seq.serialize_element(&BTreeMap::from([(2, Failing)]))
                    .is_err()
            );
            seq.serialize_element(&3)?;
            seq.end()
        }
    }

    /// A map in key order whose impl ignores failing entries and carries on, and leaves a
    /// key without a value.
    struct ForgivingMap;

    impl Serialize for ForgivingMap {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(Some(3))?;
            map.serialize_entry("a", &1)?;
            let failing = Pairs(vec![("z", None), ("y", Some(Failing))]);
            assert!(map.serialize_entry("b", &failing).is_err());
            assert!(map.serialize_entry(&None::<u8>, &2).is_err());
            map.serialize_entry("c", &3)?;
            map.serialize_key("d")?;
            map.end()
        }
    }

    #[test]
    fn serialize_impls_that_carry_on_after_errors() {
        assert_same(&Odd);
        assert_eq!(
            Fingerprint::of(&Odd).unwrap(),
            Fingerprint::of(&json!({"a": [{"x": 2, "y": 1}], "b": 1, "d": 4})).unwrap()
        );
        assert_same(&ForgivingMap);
        assert_eq!(
            Fingerprint::of(&ForgivingMap).unwrap(),
            Fingerprint::of(&json!({"a": 1, "c": 3})).unwrap()
        );
        assert_same(&Forgiving);
        assert_eq!(
            Fingerprint::of(&Forgiving).unwrap(),
            Fingerprint::of(&[1, 3]).unwrap()
        );
    }

    /// A value that serializes the fingerprint of another, taken while it is itself being
    /// fingerprinted.
    struct Nested(Vec<u32>);

    impl Serialize for Nested {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let inner = Fingerprint::of(&self.0).map_err(serde::ser::Error::custom)?;
            let mut map = serializer.serialize_map(Some(2))?;
            map.serialize_entry("values", &self.0)?;
            map.serialize_entry("digest", &hex(&inner))?;
            map.end()
        }
    }

    #[test]
    fn fingerprints_taken_inside_a_fingerprint_and_after_a_large_one() {
        assert_same(&Nested(vec![1, 2, 3]));
        assert_same(&vec![Nested(vec![]), Nested(vec![4])]);
        let large: Vec<String> = (0..10_000).map(|i| format!("item {i}")).collect();
        assert_same(&large);
        assert_same(&Nested(vec![5]));
    }

    /// A map that serializes a value before any key.
    struct ValueFirst;

    impl Serialize for ValueFirst {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(None)?;
            map.serialize_value(&1)?;
            map.end()
        }
    }

    /// serde_json panics on a map value written before its key (a bug of the `Serialize`
    /// impl); the fingerprint refuses it with an error instead.
    #[test]
    fn a_value_before_its_key_is_an_encode_error() {
        let old = panic::catch_unwind(AssertUnwindSafe(|| oracle(&ValueFirst)));
        assert!(old.is_err(), "serde_json panics");
        match Fingerprint::of(&ValueFirst) {
            Err(Error::Encode { source, .. }) => assert!(
                source.to_string().contains("before serialize_key"),
                "{source}"
            ),
            other => panic!("expected Error::Encode, got {other:?}"),
        }
    }

    #[test]
    fn raw_values_are_parsed_as_serde_json_parses_them() {
        use serde_json::value::RawValue;

        #[derive(Serialize)]
        struct Envelope {
            id: u8,
            body: Box<RawValue>,
        }
        for raw in [
            r#"{"b": [1, 2.50, -0, 1e2], "a": null, "b": "again"}"#,
            "12345678901234567890123",
            "-0.0",
            r#""text""#,
            "[]",
        ] {
            let envelope = Envelope {
                id: 1,
                body: RawValue::from_string(raw.to_owned()).unwrap(),
            };
            assert_same(&envelope);
            assert_same(&envelope.body);
        }
    }

    #[test]
    fn json_values_with_every_kind_of_number() {
        assert_same(&json!({
            "u": u64::MAX,
            "i": i64::MIN,
            "f": 0.30000000000000004,
            "e": 1e300,
            "nested": [{"b": [], "a": {}}, [[]], null, "", true, false],
            "é": "😀",
        }));
    }
}
